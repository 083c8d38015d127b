"""Where initializer values live while the compiler works: memory for small tensors, files for big ones.

Compilation streams: a large model's weights are never all in memory at once. Source
tensors stay in the model's external-data file and are read one at a time when a rule
folds them; every tensor the compiler rewrites goes to a scratch file; emit copies the
live tensors, one at a time, into the server's ``model.onnx.data``.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

import numpy as np
import onnx
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import helper

INLINE_BYTES = 1 << 16  # tensors smaller than this stay in memory / inline in the model
ALIGN = 4096  # offset alignment of large tensors in a data file (ONNX Runtime can map them in place)
ALIGN_ABOVE = 1 << 20  # tensors at least this large are aligned


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
        """Read the array from its file (after the writes queued for that file have landed)."""
        pending = _APPENDERS.get(self.path)
        if pending is not None:
            pending.drain()
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


def shared_values(values):
    """Values for a second constant reading the same data (graphsurgeon exports a LazyValues'
    TensorProto under its owner's name, so two constants must never share one)."""
    if isinstance(values, FileValues):
        return FileValues(values.path, values.offset, values.shape, values.np_dtype, values.tensor.name)
    if isinstance(values, DerivedValues):
        return values.copy(values.tensor.name)
    if isinstance(values, LazyValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        return LazyValues(proto)
    return values


DERIVED_LOCATION = "eecompile-derived:"
"""External-data location prefix naming a :class:`DerivedValues` of the compile's :class:`TensorStore`
(a graph exported and re-imported during the compile keeps its deferred rewrites)."""


class DerivedValues(LazyValues):
    """A weight rewritten on read: another constant's values, transposed and/or scaled along one axis.

    Normalization's rewrites of large weights (a Transpose of an initializer, a gain folded into a linear
    layer's rows) are deferred to the moment a rule reads the weight to fold it, so the weight is read once
    and written once, finally. ``load`` returns exactly what the eager rewrite stored: the source's values
    transposed (a view), each gain product computed in float64 and rounded once to the weight's dtype.
    """

    def __init__(self, source, name: str, steps: tuple = (), registry: dict | None = None) -> None:
        self.source, self.steps, self.registry = source, tuple(steps), registry
        src_shape = tuple(int(d) for d in (source.shape))
        shape, dtype = src_shape, np.dtype(source.dtype if not isinstance(source, LazyValues)
                                           else helper.tensor_dtype_to_np_dtype(source.tensor.data_type))
        for kind, arg, *_ in self.steps:
            if kind == "transpose":
                shape = tuple(shape[i] for i in arg)
        self.np_dtype = dtype
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        proto.dims.extend(shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        key = f"{id(self):x}"
        entry = proto.external_data.add()
        entry.key, entry.value = "location", DERIVED_LOCATION + key
        super().__init__(proto)
        if registry is not None:
            registry[key] = self

    def then(self, name: str, *step) -> "DerivedValues":
        """These values followed by one more step (``("transpose", perm)`` or ``("scale", gain, axis)``)."""
        return DerivedValues(self.source, name, (*self.steps, tuple(step)), self.registry)

    def copy(self, name: str) -> "DerivedValues":
        """The same rewrite for a second constant (a graphsurgeon export names each proto after its owner)."""
        return DerivedValues(self.source, name, self.steps, self.registry)

    def load(self) -> np.ndarray:
        """The source's values with every step applied."""
        array = self.source.load() if isinstance(self.source, LazyValues) else np.asarray(self.source)
        for kind, arg, *rest in self.steps:
            if kind == "transpose":
                array = np.transpose(array, arg)
            else:
                shape = [1] * array.ndim
                shape[rest[0]] = -1
                scaled = np.empty_like(array, dtype=self.np_dtype)  # in the source's memory order (a transpose)
                np.multiply(array, arg.reshape(shape), out=scaled, casting="same_kind")  # float64, rounded once
                array = scaled
        return array


def derived(values, name: str, store: "TensorStore", *step):
    """``values`` (a constant's ``_values``) followed by ``step``, deferred when the values are a large weight
    still in its file (a :class:`DerivedValues` registered in ``store``), else None (rewrite it now)."""
    if isinstance(values, DerivedValues):
        return values.then(name, *step)
    if isinstance(values, LazyValues) and values.nbytes >= INLINE_BYTES and store.scratch is not None:
        return DerivedValues(values, name, (tuple(step),), store.derived)
    return None


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
    """Holds rewritten tensors: in memory below :data:`INLINE_BYTES`, in a file above.

    Tensors go to the scratch file until :meth:`open_final` names the server's data file; from then
    on (the fold pass, whose tensors are final) they are written there directly, aligned, so that
    emit only records where they are instead of copying them again.
    """

    def __init__(self, scratch: str | Path | None = None) -> None:
        self.scratch = Path(scratch) if scratch is not None else None
        self._handle = None
        self.bytes_written = 0
        self.final: Path | None = None
        self.final_location: str | None = None
        self._final_handle = None
        self.derived: dict[str, DerivedValues] = {}
        """Deferred rewrites by key (:data:`DERIVED_LOCATION`), to re-attach them to a re-imported graph."""

    def resolve(self, tensor: onnx.TensorProto) -> "DerivedValues | None":
        """The :class:`DerivedValues` an exported initializer stands for, or None when it is not one."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location.startswith(DERIVED_LOCATION):
            return None
        values = self.derived.get(location[len(DERIVED_LOCATION):])
        if values is None:
            raise ValueError(f"initializer '{tensor.name}' refers to a deferred rewrite of another compile")
        return values

    def open_final(self, path: str | Path, location: str) -> None:
        """Write every tensor stored from now on into ``path`` (referenced as ``location`` in the model)."""
        if self._final_handle is not None and self._final_handle.path != Path(path):
            appender, self._final_handle = self._final_handle, None
            appender.close()
        self.final, self.final_location = Path(path), location

    def put(self, name: str, array: np.ndarray):
        """Store ``array``; returns what to assign to a ``gs.Constant``'s values."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn scalars into [1])
        if self.scratch is None or array.nbytes < INLINE_BYTES:
            return array
        if self.final is not None:
            return self.append_final(name, array)
        from eecompile.staging import writing

        with writing(self.scratch):
            if self._handle is None:
                self.scratch.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.scratch, "ab")
            offset = self._handle.seek(0, os.SEEK_END)
            _write(self._handle, array)
        self.bytes_written += array.nbytes
        return FileValues(self.scratch, offset, array.shape, array.dtype, name)

    def append_final(self, name: str, array: np.ndarray) -> "FileValues":
        """Append ``array`` to the final data file (offset aligned to :data:`ALIGN` for large tensors).

        The bytes are written by a background thread (:class:`Appender`) while the caller goes on folding;
        ``array`` must not change afterwards. Reading the tensor back (:meth:`FileValues.load`) or
        :meth:`close` waits for the write.
        """
        from eecompile.staging import writing

        array = np.asarray(array, order="C")
        with writing(self.final):
            if self._final_handle is None:
                self._final_handle = Appender(self.final)
            offset = self._final_handle.append(array, aligned=array.nbytes >= ALIGN_ABOVE)
        self.bytes_written += array.nbytes
        return FileValues(self.final, offset, array.shape, array.dtype, name, location=self.final_location)

    def close(self, discard: bool = False) -> None:
        """Close the scratch and final files (their values stay readable); the final file's queued writes are
        waited for (``discard``: dropped, for a compile that failed and whose files go away)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        appender, self._final_handle = self._final_handle, None
        if appender is not None:
            appender.close(discard)

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(discard=exc_type is not None)


WRITE_BEHIND_MIN_BYTES = 16 << 20
"""Bytes an :class:`Appender` may hold before any large array came (its limit then grows with the arrays)."""
_APPENDERS: dict[str, "Appender"] = {}
"""The open appender of each file path (as :class:`FileValues` spells it), so that a read waits for its writes."""


class Appender:
    """Appends arrays to one file from a background thread, in the order given, at offsets decided at once.

    Writing a folded weight is I/O (the page cache, throttled to the disk's pace once enough is dirty),
    folding the next one is BLAS: a thread that writes while the next weight folds overlaps the two. What it
    holds (queued and being written) stays within the largest array it was given (or
    :data:`WRITE_BEHIND_MIN_BYTES`); :meth:`append` blocks beyond that. So the write-behind costs one tensor's
    memory, the largest, whatever the model's size, and many small weights can still queue behind a slow disk.
    A write error is raised, as one line naming the file, by the next :meth:`append`, :meth:`drain` or
    :meth:`close`.
    """

    def __init__(self, path: Path, limit: int = WRITE_BEHIND_MIN_BYTES) -> None:
        self.path, self.limit = Path(path), int(limit)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")
        self.end = self._handle.seek(0, os.SEEK_END)
        self._queue: deque[tuple[int, np.ndarray]] = deque()
        self._queued = 0  # bytes queued or being written
        self._busy = False  # a write is under way
        self._error: OSError | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="eecompile-writer", daemon=True)
        self._thread.start()
        _APPENDERS[str(self.path)] = self

    def append(self, array: np.ndarray, aligned: bool = False) -> int:
        """Queue ``array`` (C order) for writing at the end; returns its offset (aligned to :data:`ALIGN`)."""
        pad = (-self.end) % ALIGN if aligned else 0
        offset = self.end + pad
        with self._cond:
            self.limit = max(self.limit, array.nbytes)  # the largest array so far bounds what waits
            while self._queued and self._queued + array.nbytes > self.limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._queue.append((pad, array))
            self._queued += array.nbytes
            self._cond.notify_all()
        self.end = offset + array.nbytes
        return offset

    def drain(self) -> None:
        """Wait until every queued array is in the file."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise()

    def close(self, discard: bool = False) -> None:
        """Write what is queued (``discard``: drop it), stop the thread and close the file."""
        with self._cond:
            if discard:
                self._queued -= sum(array.nbytes for _, array in self._queue)
                self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        if _APPENDERS.get(str(self.path)) is self:
            del _APPENDERS[str(self.path)]
        self._handle.close()
        if not discard:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            from eecompile.staging import writing

            with writing(self.path):  # one line naming the file and the cause
                raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                pad, array = self._queue.popleft()
                self._busy = True
            try:
                if pad:
                    self._handle.write(b"\0" * pad)
                _write(self._handle, array)  # the GIL is released while the bytes go to the file
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._queued, self._busy = 0, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._queued -= array.nbytes  # a discard subtracted only what had not started
                self._busy = False
                self._cond.notify_all()


def _write(handle, array: np.ndarray) -> None:
    """Raw little-endian C-order bytes of ``array`` at the handle's position, flushed."""
    little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    handle.write(little.reshape(-1).view(np.uint8).data)
    handle.flush()


# -- reading a model's structure without its weights ------------------------------------------
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 1, 2, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if after > end:
            raise ValueError("truncated protobuf field")
        yield number, wire, first, pos, after
        pos = after


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _slim_tensor(buf, start: int, end: int, location: str) -> bytes | None:
    """A TensorProto's bytes with its large ``raw_data`` replaced by an external reference into the file
    itself, or None when it has none worth moving."""
    raw = None
    for number, wire, first, pos, after in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2:
            raw = (first, pos, after)
    if raw is None or raw[2] - raw[1] < INLINE_BYTES:
        return None
    tensor = onnx.TensorProto()
    tensor.ParseFromString(bytes(buf[start:raw[0]]) + bytes(buf[raw[2]:end]))
    length = raw[2] - raw[1]
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    if expected != length:
        from eecompile.errors import ModelFileError

        raise ModelFileError(f"initializer '{tensor.name}' holds {length} bytes of data, its shape "
                             f"{list(tensor.dims)} needs {expected}")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(raw[1])), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor.SerializeToString()


def load_structure(path: str | Path) -> onnx.ModelProto:
    """The model at ``path`` with every large embedded weight left in the file.

    The protobuf is walked without parsing the weights: each initializer whose ``raw_data`` is at
    least :data:`INLINE_BYTES` becomes an external-data reference to its own bytes inside ``path``
    (location: the file's name, relative to its folder), so memory holds the graph, never the
    weights, and nothing is copied. Raises ``ValueError`` on a malformed file.
    """
    import mmap

    path = Path(path)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            parts = []
            graph_parts = []
            for number, wire, first, pos, after in _fields(buf, 0, len(buf)):
                if number != _MODEL_GRAPH or wire != 2:
                    parts.append(bytes(buf[first:after]))
                    continue
                for g_number, g_wire, g_first, g_pos, g_after in _fields(buf, pos, after):
                    slim = None
                    if g_number == _GRAPH_INITIALIZER and g_wire == 2:
                        slim = _slim_tensor(buf, g_pos, g_after, path.name)
                    graph_parts.append(bytes(buf[g_first:g_after]) if slim is None
                                       else _length_field(_GRAPH_INITIALIZER, slim))
    parts.append(_length_field(_MODEL_GRAPH, b"".join(graph_parts)))
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(parts))
    return model


def in_place_session(model: onnx.ModelProto, folder: str | Path, options=None):
    """An ONNX Runtime CPU session of ``model`` (a structure from :func:`load_structure` or one whose weights are
    external) reading its weights in place from the files they live in, relative to ``folder``.

    Nothing is copied to a scratch file: the protobuf handed over holds the graph; ONNX Runtime reads each
    weight from its file (the model file itself for embedded weights) while it builds the session, and
    weight prepacking is off, so the session holds one copy of the weights (for verification and the
    exposure measure, whose inputs are small; the served model keeps ONNX Runtime's defaults).
    """
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    # Prepacking would copy every MatMul weight into a packed layout (a second copy of the model, and the
    # time to make it); without it ONNX Runtime maps aligned weight files and multiplies from them directly.
    for key, value in (("session.disable_prepacking", "1"),
                       ("session.model_external_initializers_file_folder_path", str(Path(folder).resolve()))):
        try:
            same = options.get_session_config_entry(key) == value
        except Exception:  # noqa: BLE001 - ONNX Runtime raises when the entry is not set
            same = False
        if not same:  # options reused for another session (a model run in segments) keep their entries
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def model_bytes(path: str | Path) -> int:
    """Size of an ONNX file plus the external data files it references (the structure is read, not the weights)."""
    path = Path(path)
    total = path.stat().st_size
    model = load_structure(path)
    seen = {path.name}  # weights embedded in the file are referenced into the file itself
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in init.external_data if e.key == "location"), None)
            if location and location not in seen:
                seen.add(location)
                file = path.parent / location
                total += file.stat().st_size if file.exists() else 0
    return total


RELEASE_MIN_BYTES = 32 << 20
"""Below this many released bytes :func:`release_memory` does nothing: a full garbage collection costs
0.1–0.5 s in a process with many objects (most of a small model's compile), and what it would return is small."""


class FrozenHeap:
    """Keeps the objects alive at each :meth:`freeze` out of later garbage collections, until the ``with`` ends.

    A compile holds its graph and analysis (hundreds of thousands of Python objects) while it folds, verifies
    and measures exposure; each :func:`release_memory` there runs a full collection, which would walk all of
    them (0.25–0.5 s each, several per segmented run) to find the few cycles a released session left.
    ``gc.freeze`` moves what is alive into a generation the collector skips; ``gc.unfreeze`` on exit hands it
    back.
    """

    def __init__(self) -> None:
        self.frozen = False

    def __enter__(self) -> "FrozenHeap":
        return self

    def freeze(self) -> None:
        """Move every object alive now out of the collector's reach (until exit)."""
        import gc

        gc.freeze()
        self.frozen = True

    def __exit__(self, *exc) -> None:
        if self.frozen:
            import gc

            gc.unfreeze()
            self.frozen = False


def release_memory(released: int | None = None) -> None:
    """Hand memory freed by a released session (or a folded weight) back to the system.

    glibc's allocator keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its heap, so
    the weights of a released ONNX Runtime session stay resident and add to the next session's; a
    ``malloc_trim`` returns them. A no-op where the C library has none, and when ``released`` (the bytes
    the caller just let go, such as a model's weights) is below :data:`RELEASE_MIN_BYTES`.
    """
    import ctypes
    import ctypes.util
    import gc

    if released is not None and released < RELEASE_MIN_BYTES:
        return
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
