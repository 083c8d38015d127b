"""Weight Transposes applied before ONNX Runtime builds a segment's session.

An export that keeps a linear layer's weight as trained (``[out, in]``, ``do_constant_folding=False``) puts a
Transpose node in front of every MatMul. ONNX Runtime folds each such node when it builds a session (at its
default optimisation level), into memory it allocates then, and runs it on every call where optimisation is
off (the exposure measure). Fresh memory is the expensive part on a virtual machine that hands freed pages
back to its host: about 2.5 ms per MiB at first touch against 0.04 ms for memory the process reuses. Most of a
large original model's session builds were that folding (8.45 s of the 1B sweep point's 9.2-11.5 s segmented
verification run).

A transposition moves values and computes nothing, so applying it here gives ONNX Runtime exactly the tensor
its own folding makes. :class:`TransposedWeights` finds every Transpose whose input is a large weight stored
in a file; a segment drops those nodes, declares their outputs as weights and hands their values over in
memory (``SessionOptions.add_initializer``: ONNX Runtime multiplies from that memory, copying nothing),
transposed in row blocks into buffers that are reused from one segment to the next (the segment's session is
released before its buffers are refilled), so after the first segment no page is new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

AHEAD_BYTES = 1 << 20
"""Weights at least this large have their Transposes applied ahead (smaller ones cost ONNX Runtime little)."""
BLOCK_ROWS = 16
"""Source rows transposed at a time: each block writes whole cache lines of every output row."""


def _perm(node: onnx.NodeProto, rank: int) -> tuple[int, ...]:
    for attr in node.attribute:
        if attr.name == "perm":
            return tuple(int(p) for p in attr.ints)
    return tuple(range(rank - 1, -1, -1))


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _numpy_dtype(elem_type: int) -> np.dtype | None:
    if elem_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.STRING) or elem_type >= onnx.TensorProto.FLOAT8E4M3FN:
        return None  # no plain numpy type (or not a fixed-size one)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


class TransposedWeights:
    """The Transposes of ``model``'s large file-stored weights, to apply before ONNX Runtime sees a segment.

    ``folder`` is where the weights' files are (locations are relative to it, as for
    :func:`~eecompile.passes.store.in_place_session`). A Transpose whose output is a graph output stays a node.
    """

    def __init__(self, model: onnx.ModelProto, folder: str | Path) -> None:
        self.folder = Path(folder)
        graph = model.graph
        weights = {t.name: t for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        self.sources: dict[str, tuple[onnx.TensorProto, tuple[int, ...]]] = {}
        """Transpose output name → (its weight, the permutation)."""
        for node in graph.node:
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
                continue
            weight = weights.get(node.input[0])
            if weight is None or not node.output or node.output[0] in outputs or _external(weight) is None:
                continue
            dtype = _numpy_dtype(weight.data_type)
            if dtype is None or int(np.prod(weight.dims, dtype=np.int64)) * dtype.itemsize < AHEAD_BYTES:
                continue
            self.sources[node.output[0]] = (weight, _perm(node, len(weight.dims)))
        self._buffers: list[np.ndarray] = []  # one per weight of a segment, reused by the next segment
        self._read: np.ndarray | None = None  # the source weight's bytes, reused

    def __bool__(self) -> bool:
        return bool(self.sources)

    def applied(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` is one of the Transposes applied here (a segment leaves it out)."""
        return node.op_type == "Transpose" and bool(node.output) and node.output[0] in self.sources

    def declaration(self, name: str) -> onnx.TensorProto:
        """The weight a segment declares for Transpose output ``name``; its values come in memory.

        ONNX Runtime requires an external weight's file to exist even when the session is handed the values,
        so the declaration names the source weight's file at its very end: a session that were not handed
        the values could not read them and would fail to build, rather than run on other bytes."""
        weight, perm = self.sources[name]
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = weight.data_type
        proto.dims.extend(int(weight.dims[p]) for p in perm)
        proto.data_location = onnx.TensorProto.EXTERNAL
        length = int(np.prod(proto.dims, dtype=np.int64)) * _numpy_dtype(weight.data_type).itemsize
        location = _external(weight)["location"]
        end = (self.folder / location).stat().st_size
        for key, value in (("location", location), ("offset", str(end)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def handed(self, proto: onnx.TensorProto) -> bool:
        """Whether a segment's weight ``proto`` is one whose values this object hands over."""
        return proto.name in self.sources and proto.data_location == onnx.TensorProto.EXTERNAL

    def values(self, names: list[str]) -> list[np.ndarray]:
        """The transposed weights ``names``, in this object's buffers: valid until the next call (release the
        session that uses them first)."""
        out = []
        for i, name in enumerate(names):
            weight, perm = self.sources[name]
            source = self._source(weight)
            shape = tuple(source.shape[p] for p in perm)
            if i == len(self._buffers):
                self._buffers.append(np.empty(0, np.uint8))
            if self._buffers[i].size < source.nbytes:
                self._buffers[i] = np.empty(source.nbytes, np.uint8)
            target = self._buffers[i][:source.nbytes].view(source.dtype).reshape(shape)
            transpose_into(source, perm, target)
            out.append(target)
        return out

    def _source(self, weight: onnx.TensorProto) -> np.ndarray:
        """The weight's values, read from its file into the reused read buffer."""
        from eecompile.errors import ModelFileError

        info = _external(weight)
        dtype = _numpy_dtype(weight.data_type)
        shape = tuple(int(d) for d in weight.dims)
        length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._read is None or self._read.size < length:
            self._read = np.empty(length, np.uint8)
        view = self._read[:length]
        path = self.folder / info["location"]
        got = 0
        with open(path, "rb", buffering=0) as fh:
            fh.seek(int(info.get("offset", 0)))
            while got < length and (n := fh.readinto(memoryview(view)[got:])):
                got += n
        if got != length:
            raise ModelFileError(f"external data file {path} is truncated: tensor '{weight.name}' needs {length} "
                                 f"bytes at offset {info.get('offset', 0)}, the file holds {got}")
        return view.view(dtype).reshape(shape)


def transpose_into(source: np.ndarray, perm: tuple[int, ...], target: np.ndarray) -> None:
    """``target[...] = source.transpose(perm)``; a 2-D swap goes :data:`BLOCK_ROWS` source rows at a time."""
    if source.ndim == 2 and tuple(perm) == (1, 0):
        for r in range(0, source.shape[0], BLOCK_ROWS):
            target[:, r:r + BLOCK_ROWS] = source[r:r + BLOCK_ROWS].T
        return
    np.copyto(target, np.transpose(source, perm))
