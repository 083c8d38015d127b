"""Where initializer values live while the compiler works: memory for small tensors, files for big ones.

Compilation streams: a large model's weights are never all in memory at once. Source
tensors stay in the model's external-data file and are read one at a time when a rule
folds them; every tensor the compiler rewrites goes to a scratch file; emit copies the
live tensors, one at a time, into the server's ``model.onnx.data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import helper

INLINE_BYTES = 1 << 16  # tensors smaller than this stay in memory / inline in the model


class FileValues(LazyValues):
    """Constant values stored raw (little-endian, C order) in a file at an offset."""

    def __init__(self, path: str | Path, offset: int, shape: tuple[int, ...], dtype: np.dtype,
                 name: str = "", location: str | None = None) -> None:
        self.path = str(path)
        self.offset = int(offset)
        self.np_dtype = np.dtype(dtype)
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(self.np_dtype)
        proto.dims.extend(int(d) for d in shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        length = int(np.prod(shape, dtype=np.int64)) * self.np_dtype.itemsize
        for key, value in (("location", location or self.path), ("offset", str(self.offset)),
                           ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        super().__init__(proto)

    def load(self) -> np.ndarray:
        """Read the array from its file."""
        count = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = np.fromfile(fh, dtype=self.np_dtype, count=count)
        if data.size != count:
            from eecompile.errors import ModelFileError

            raise ModelFileError(f"external data file {self.path} is truncated: tensor '{self.tensor.name}' needs "
                                 f"{count * self.np_dtype.itemsize} bytes at offset {self.offset}, the file holds "
                                 f"{data.size * self.np_dtype.itemsize}")
        return data.reshape(self.shape)


def externalize(model: onnx.ModelProto, store: "TensorStore") -> onnx.ModelProto:
    """Move large embedded initializers out of the protobuf into the store's scratch file.

    A model under 2 GB carries its weights inside the protobuf; shape inference and every
    export would copy them again. After this, the proto holds only external references.
    """
    if store.scratch is None:
        return model
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < INLINE_BYTES:
            continue
        values = store.put(tensor.name, numpy_helper.to_array(tensor))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.extend(values.tensor.external_data)
    return model


def shared_values(values):
    """Values for a second constant reading the same data (graphsurgeon exports a LazyValues'
    TensorProto under its owner's name, so two constants must never share one)."""
    if isinstance(values, FileValues):
        return FileValues(values.path, values.offset, values.shape, values.np_dtype, values.tensor.name)
    if isinstance(values, LazyValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        return LazyValues(proto)
    return values


def external_values(tensor: onnx.TensorProto, base_dir: Path) -> FileValues | None:
    """A :class:`FileValues` for an initializer stored as ONNX external data, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    location = Path(info["location"])
    path = location if location.is_absolute() else base_dir / location
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    values = FileValues(path, int(info.get("offset", 0)), tuple(tensor.dims), dtype, tensor.name)
    needed = values.offset + int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None  # a missing file is reported where it is read
    if size is not None and size < needed:
        from eecompile.errors import ModelFileError

        raise ModelFileError(f"external data file {path} is truncated: tensor '{tensor.name}' needs bytes up to "
                             f"offset {needed}, the file has {size}")
    return values


class TensorStore:
    """Holds rewritten tensors: in memory below :data:`INLINE_BYTES`, in a scratch file above."""

    def __init__(self, scratch: str | Path | None = None) -> None:
        self.scratch = Path(scratch) if scratch is not None else None
        self._handle = None
        self.bytes_written = 0

    def put(self, name: str, array: np.ndarray):
        """Store ``array``; returns what to assign to a ``gs.Constant``'s values."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn scalars into [1])
        if self.scratch is None or array.nbytes < INLINE_BYTES:
            return array
        from eecompile.staging import writing

        with writing(self.scratch):
            if self._handle is None:
                self.scratch.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.scratch, "ab")
            offset = self._handle.seek(0, os.SEEK_END)
            array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(self._handle)
            self._handle.flush()
        self.bytes_written += array.nbytes
        return FileValues(self.scratch, offset, array.shape, array.dtype, name)

    def close(self) -> None:
        """Close the scratch file (its values stay readable)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
