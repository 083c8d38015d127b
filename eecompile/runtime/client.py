"""The client shim: encrypt inputs, decrypt outputs — in numpy, and as two ONNX models.

A bundle directory holds ``manifest.json`` (format, version, the server model's id, one
entry per input/output), ``transforms.npz`` (the boundary bases, never the master key),
``encrypt.onnx`` and ``decrypt.onnx`` (the same transforms for any ONNX Runtime binding).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eecompile.errors import BundleError, FeedError
from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.insert import BoundarySpec, BoundaryTransform

BUNDLE_FORMAT = "eecompile-client"
BUNDLE_VERSION = 2  # 2: the manifest records SHA-256 digests of itself and of every bundle file
DIGESTED_FILES = ("transforms.npz", "encrypt.onnx", "decrypt.onnx")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content (canonical JSON) without its own ``manifest_digest`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- numpy transforms --------------------------------------------------------------------
REDUCED_FLOATS = ("bfloat16",)
"""Float types numpy holds through ``ml_dtypes`` (kind ``V``): transformed in float64 and returned in their type."""
COMPUTE_WIDER = {TensorProto.FLOAT16: TensorProto.FLOAT, TensorProto.BFLOAT16: TensorProto.FLOAT}
"""Element types the client ONNX models transform in float32 (cast in, transform, cast back): the basis is
applied at float32 precision and rounded once to the model's type, and bfloat16 runs on ONNX Runtime's CPU."""


def _apply(t: BoundaryTransform, value: np.ndarray, inverse: bool) -> np.ndarray:
    if t.kind in ("clear", "state"):
        return value
    if t.kind == "index":
        table = t.index.index_map() if inverse else t.index.inverse().index_map()
        ids = np.asarray(value)
        if ids.dtype.kind not in "iu":
            raise FeedError(f"'{t.name}' holds {ids.dtype} values; token ids must be integers")
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise FeedError(f"'{t.name}' holds ids outside [0, {len(table)})")
        return table[ids].astype(ids.dtype)
    dtype = value.dtype
    if dtype.kind not in "fiu" and dtype.name not in REDUCED_FLOATS:
        raise FeedError(f"'{t.name}' holds {dtype} values; the model expects numbers")
    if t.rank is not None and value.ndim != t.rank or value.ndim == 0:
        raise FeedError(f"'{t.name}' has rank {value.ndim} (shape {list(value.shape)}); the model expects rank {t.rank}")
    array = np.asarray(value, dtype=np.float64)
    axis = t.axis % array.ndim
    if array.shape[axis] != t.heads[0].size:
        raise FeedError(f"'{t.name}' has size {array.shape[axis]} on axis {axis}; the model expects {t.heads[0].size}")
    if t.head_axis is None:
        basis = t.heads[0].inverse() if inverse else t.heads[0]
        out = basis.right(array, axis)
        if inverse and t.gain is not None:  # a norm gain folded out of the server (outputs only)
            out = out * t.gain.reshape([-1 if i == axis else 1 for i in range(out.ndim)])
        return out.astype(dtype)
    parts = []
    for h, basis in enumerate(t.heads):
        part = np.take(array, [h], axis=t.head_axis)
        parts.append((basis.inverse() if inverse else basis).right(part, axis))
    return np.concatenate(parts, axis=t.head_axis).astype(dtype)


class Client:
    """Encrypts feeds and decrypts outputs for one compiled model."""

    def __init__(self, spec: BoundarySpec, model_id: str = "") -> None:
        self.spec = spec
        self.model_id = model_id
        self._inputs = {t.name: t for t in spec.inputs}
        self._outputs = {t.name: t for t in spec.outputs}

    @property
    def state_inputs(self) -> list[str]:
        """Inputs that are server-side state (passed through as ciphertext)."""
        return [t.name for t in self.spec.inputs if t.kind == "state"]

    @property
    def state_outputs(self) -> list[str]:
        """Outputs that are server-side state (returned as ciphertext)."""
        return [t.name for t in self.spec.outputs if t.kind == "state"]

    def encrypt(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plaintext feeds → ciphertext feeds (state inputs pass through)."""
        if not isinstance(feeds, dict):
            raise FeedError(f"feeds must be a dict of input name to array, got {type(feeds).__name__}")
        unknown = sorted(set(feeds) - set(self._inputs))
        if unknown:
            raise FeedError(f"unknown input name(s) {unknown}; the model's inputs are {sorted(self._inputs)}")
        return {name: _apply(self._inputs[name], np.asarray(v), inverse=False) for name, v in feeds.items()}

    def decrypt(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ciphertext outputs → plaintext outputs (state outputs pass through)."""
        if not isinstance(outputs, dict):
            raise FeedError(f"outputs must be a dict of output name to array, got {type(outputs).__name__}")
        unknown = sorted(set(outputs) - set(self._outputs))
        if unknown:
            raise FeedError(f"unknown output name(s) {unknown}; the model's outputs are {sorted(self._outputs)}")
        return {name: _apply(self._outputs[name], np.asarray(v), inverse=True) for name, v in outputs.items()}

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None,
             input_types: dict[str, onnx.TypeProto] | None = None,
             output_types: dict[str, onnx.TypeProto] | None = None) -> Path:
        """Write the bundle (manifest, arrays, encrypt.onnx, decrypt.onnx) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        entries = {"inputs": [], "outputs": []}
        for side, transforms in (("inputs", self.spec.inputs), ("outputs", self.spec.outputs)):
            for i, t in enumerate(transforms):
                entry = {"name": t.name, "kind": t.kind, "protection": t.protection}
                prefix = f"{side}.{i}"
                if t.kind == "axis":
                    entry.update(axis=t.axis, head_axis=t.head_axis, rank=t.rank, basis=t.basis, heads=[])
                    for h, axis_basis in enumerate(t.heads):
                        entry["heads"].append([_store_basis(b, f"{prefix}.h{h}.b{j}", arrays)
                                               for j, b in enumerate(axis_basis.blocks)])
                    if t.gain is not None:
                        arrays[f"{prefix}.gain"] = t.gain
                        entry["gain"] = f"{prefix}.gain"
                elif t.kind == "index":
                    entry["index"] = _store_basis(t.index, f"{prefix}.index", arrays)
                entries[side].append(entry)
        from eecompile.staging import writing

        with writing(directory / "transforms.npz"), open(directory / "transforms.npz", "wb") as fh:
            np.savez(fh, **arrays)
        with writing(directory / "encrypt.onnx"):
            onnx.save(build_client_model(self.spec.inputs, "encrypt", input_types or {}),
                      str(directory / "encrypt.onnx"))
        with writing(directory / "decrypt.onnx"):
            onnx.save(build_client_model(self.spec.outputs, "decrypt", output_types or {}),
                      str(directory / "decrypt.onnx"))
        # the bundle is bound to this compilation: the server's model id, and digests of every file and of
        # the manifest itself, so an edited manifest (say, every input "clear") or transforms are refused
        manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model_id": self.model_id,
                    **(extra or {}), **entries,
                    "files": {name: _file_digest(directory / name) for name in DIGESTED_FILES}}
        manifest["manifest_digest"] = manifest_digest(manifest)
        with writing(directory / "manifest.json"):
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Client":
        """Load a client bundle, failing with one clear line if it is missing or corrupt."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"no client bundle at {directory} (manifest.json missing)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"client bundle manifest {manifest_path} is corrupt ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{manifest_path} is not an eecompile client bundle")
        if manifest.get("version") != BUNDLE_VERSION:
            raise BundleError(f"client bundle {directory} has version {manifest.get('version')}; "
                              f"this eecompile reads version {BUNDLE_VERSION} (recompile the model)")
        _check_integrity(directory, manifest)
        try:
            with np.load(directory / "transforms.npz", allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            spec = BoundarySpec(*[[_load_entry(e, arrays) for e in manifest[side]] for side in ("inputs", "outputs")])
        except (OSError, KeyError, IndexError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            raise BundleError(f"client bundle {directory} is corrupt ({type(exc).__name__}: {exc})") from None
        model_id = manifest.get("model_id", "")
        return cls(spec, model_id if isinstance(model_id, str) else "")


def _check_integrity(directory: Path, manifest: dict) -> None:
    """Refuse a manifest or bundle file whose content is not what the compiler wrote (one line naming the file)."""
    hint = "it was edited or is corrupt; restore it from the compilation or recompile"
    recorded = manifest.get("manifest_digest")
    if not isinstance(recorded, str) or recorded != manifest_digest(manifest):
        raise BundleError(f"client bundle file {directory / 'manifest.json'} does not match its recorded digest: {hint}")
    files = manifest.get("files")
    if not isinstance(files, dict) or "transforms.npz" not in files:
        raise BundleError(f"client bundle file {directory / 'manifest.json'} records no digest of transforms.npz: {hint}")
    for name, digest in sorted(files.items()):
        path = directory / str(name)
        if name != "transforms.npz" and not path.exists():
            continue  # encrypt.onnx / decrypt.onnx are for other clients and may be left out
        try:
            actual = _file_digest(path)
        except OSError as exc:
            raise BundleError(f"cannot read client bundle file {path}: {exc.strerror or exc}") from None
        if actual != digest:
            raise BundleError(f"client bundle file {path} does not match the digest in manifest.json: {hint}")


def _store_basis(basis: Basis, prefix: str, arrays: dict[str, np.ndarray]) -> dict:
    entry = {"size": basis.size}
    if basis.dense is not None:
        arrays[f"{prefix}.dense"] = basis.dense
        entry["dense"] = f"{prefix}.dense"
    if basis.perm is not None:
        arrays[f"{prefix}.perm"] = basis.perm
        entry["perm"] = f"{prefix}.perm"
    if basis.scale is not None:
        arrays[f"{prefix}.scale"] = basis.scale
        entry["scale"] = f"{prefix}.scale"
    return entry


def _load_basis(entry: dict, arrays: dict[str, np.ndarray]) -> Basis:
    """A basis of the bundle, checked: shapes match its size, a permutation is one, values are finite."""
    size = entry["size"]
    if type(size) is not int or size < 1:
        raise ValueError(f"basis size {size!r} is not a positive integer")
    dense = arrays[entry["dense"]] if "dense" in entry else None
    perm = arrays[entry["perm"]] if "perm" in entry else None
    scale = arrays[entry["scale"]] if "scale" in entry else None
    for label, array, shape in (("dense", dense, (size, size)), ("perm", perm, (size,)), ("scale", scale, (size,))):
        if array is None:
            continue
        if array.shape != shape:
            raise ValueError(f"the {label} array of '{entry[label]}' has shape {list(array.shape)}, expected "
                             f"{list(shape)}")
        kind = "iu" if label == "perm" else "f"
        if array.dtype.kind not in kind:
            raise ValueError(f"the {label} array of '{entry[label]}' has dtype {array.dtype}")
        if label != "perm" and not np.isfinite(array).all():
            raise ValueError(f"the {label} array of '{entry[label]}' holds non-finite values")
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(size)):
        raise ValueError(f"'{entry['perm']}' is not a permutation of 0..{size - 1}")
    if scale is not None and (scale == 0).any():
        raise ValueError(f"'{entry['scale']}' holds a zero scale")
    return Basis(size, dense=dense, perm=perm, scale=scale)


def _load_entry(entry: dict, arrays: dict[str, np.ndarray]) -> BoundaryTransform:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"manifest entry {entry!r} is not an input/output description")
    if entry.get("kind") not in ("clear", "state", "axis", "index"):
        raise ValueError(f"'{entry['name']}' has unknown kind {entry.get('kind')!r}")
    t = BoundaryTransform(entry["name"], entry["kind"])
    if t.kind == "axis":
        t.axis, t.head_axis, t.rank = entry["axis"], entry["head_axis"], entry["rank"]
        if type(t.rank) is not int or t.rank < 1 or type(t.axis) is not int or not -t.rank <= t.axis < t.rank:
            raise ValueError(f"'{t.name}' has axis {t.axis!r} / rank {t.rank!r}")
        if t.head_axis is not None and (type(t.head_axis) is not int or not -t.rank <= t.head_axis < t.rank):
            raise ValueError(f"'{t.name}' has head axis {t.head_axis!r}")
        t.basis = entry.get("basis", "")
        t.heads = [AxisBasis(tuple(_load_basis(b, arrays) for b in head)) for head in entry["heads"]]
        if not t.heads or len({h.size for h in t.heads}) != 1:
            raise ValueError(f"'{t.name}' has no bases or heads of different sizes")
        if "gain" in entry:
            gain = arrays[entry["gain"]]
            if (t.head_axis is not None or gain.shape != (t.heads[0].size,) or gain.dtype.kind != "f"
                    or not np.isfinite(gain).all()):
                raise ValueError(f"'{t.name}' has a gain that does not fit its axis")
            t.gain = gain
    elif t.kind == "index":
        t.index = _load_basis(entry["index"], arrays)
    return t


# -- the same transforms as ONNX ---------------------------------------------------------
def _flat(axis_basis: AxisBasis, inverse: bool) -> Basis:
    """One basis for the whole axis: monomial when every block is, dense otherwise."""
    blocks = [b.inverse() if inverse else b for b in axis_basis.blocks]
    if all(b.dense is None for b in blocks):
        perm, scale, offset = [], [], 0
        for b in blocks:
            perm.append(b.index_map() + offset)
            scale.append(b.scale if b.scale is not None else np.ones(b.size))
            offset += b.size
        return Basis.monomial(np.concatenate(perm), np.concatenate(scale))
    return Basis(axis_basis.size, dense=AxisBasis(tuple(blocks)).right(np.eye(axis_basis.size), 1))


def build_client_model(transforms: list[BoundaryTransform], direction: str,
                       types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """An ONNX model applying the transforms (``encrypt`` forward, ``decrypt`` inverse).

    Inputs keep the boundary names; outputs are named ``<name>_encrypted`` /
    ``<name>_decrypted``. Inputs with several heads are encoded with one MatMul per head. Every tensor keeps
    its type; float16 and bfloat16 ones are transformed in float32 between two Casts (:data:`COMPUTE_WIDER`).
    """
    inverse = direction == "decrypt"
    suffix = "_decrypted" if inverse else "_encrypted"
    nodes, inits, inputs, outputs = [], [], [], []
    for i, t in enumerate(transforms):
        out = t.name + suffix
        if t.name in types:
            elem = types[t.name].tensor_type.elem_type
            inputs.append(helper.make_value_info(t.name, types[t.name]))
            outputs.append(helper.make_value_info(out, types[t.name]))
        else:
            elem = TensorProto.INT64 if t.kind == "index" else TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(t.name, elem, None))
            outputs.append(helper.make_tensor_value_info(out, elem, None))
        p = f"t{i}"
        wide = COMPUTE_WIDER.get(elem) if t.kind == "axis" else None
        if wide is not None:  # transform in float32, round once to the model's type
            nodes.append(helper.make_node("Cast", [t.name], [f"{p}_wide"], to=wide))
            t_name, out, final, elem = f"{p}_wide", f"{p}_wide_out", out, wide
        else:
            t_name, final = t.name, None
        if t.kind == "index":
            perm = t.index.index_map()
            table = perm if inverse else np.argsort(perm)
            inits.append(numpy_helper.from_array(table.astype(np.int64), f"{p}_table"))
            nodes.append(helper.make_node("Gather", [f"{p}_table", t.name], [out], axis=0))
        elif t.kind == "axis" and t.head_axis is None:
            basis = _flat(t.heads[0], inverse)
            gain = inverse and t.gain is not None
            nodes.extend(_axis_nodes(basis, t_name, f"{p}_based" if gain else out, t.axis, t.rank, p, inits, elem))
            if gain:  # a norm gain folded out of the server, multiplied in after the basis change
                shape = [1] * t.rank
                shape[t.axis] = t.gain.size
                np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                inits.append(numpy_helper.from_array(t.gain.reshape(shape).astype(np_dtype), f"{p}_gain"))
                nodes.append(helper.make_node("Mul", [f"{p}_based", f"{p}_gain"], [out]))
        elif t.kind == "axis":
            parts = []
            for h, axis_basis in enumerate(t.heads):
                idx = f"{p}_h{h}_idx"
                inits.append(numpy_helper.from_array(np.array([h], dtype=np.int64), idx))
                nodes.append(helper.make_node("Gather", [t_name, idx], [f"{p}_h{h}_in"], axis=t.head_axis))
                nodes.extend(_axis_nodes(_flat(axis_basis, inverse), f"{p}_h{h}_in", f"{p}_h{h}_out",
                                         t.axis, t.rank, f"{p}_h{h}", inits, elem))
                parts.append(f"{p}_h{h}_out")
            nodes.append(helper.make_node("Concat", parts, [out], axis=t.head_axis))
        else:
            nodes.append(helper.make_node("Identity", [t.name], [out]))
        if final is not None:
            nodes.append(helper.make_node("Cast", [out], [final], to=types[t.name].tensor_type.elem_type))
    graph = helper.make_graph(nodes, f"eecompile_{direction}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _axis_nodes(basis: Basis, src: str, dst: str, axis: int, rank: int, p: str, inits: list,
                elem: int) -> list:
    """Nodes computing ``src @ T`` along ``axis`` of a rank-``rank`` tensor."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    if basis.dense is None:
        inits.append(numpy_helper.from_array(basis.index_map().astype(np.int64), f"{p}_perm"))
        shape = [1] * rank
        shape[axis] = basis.size
        scale = basis.scale if basis.scale is not None else np.ones(basis.size)
        inits.append(numpy_helper.from_array(scale.reshape(shape).astype(np_dtype), f"{p}_scale"))
        return [helper.make_node("Gather", [src, f"{p}_perm"], [f"{p}_g"], axis=axis),
                helper.make_node("Mul", [f"{p}_g", f"{p}_scale"], [dst])]
    inits.append(numpy_helper.from_array(basis.dense.astype(np_dtype), f"{p}_matrix"))
    if axis == rank - 1:
        return [helper.make_node("MatMul", [src, f"{p}_matrix"], [dst])]
    order = [i for i in range(rank) if i != axis] + [axis]
    back = [order.index(i) for i in range(rank)]
    return [helper.make_node("Transpose", [src], [f"{p}_t"], perm=order),
            helper.make_node("MatMul", [f"{p}_t", f"{p}_matrix"], [f"{p}_m"]),
            helper.make_node("Transpose", [f"{p}_m"], [dst], perm=back)]
