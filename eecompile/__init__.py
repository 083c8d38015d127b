"""eecompile: equivariant encryption of ONNX models."""
