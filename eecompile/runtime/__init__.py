"""Client shim and ONNX Runtime sessions."""
