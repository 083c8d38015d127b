"""The compiler pipeline: normalize → analyze → plan → insert → fold → verify → emit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from eecompile.errors import ModelFileError, OutputDirError
from eecompile.keys import MasterKey, load_key
from eecompile.passes.analyze import Analysis, analyze
from eecompile.passes.fold import fold
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.insert import insert
from eecompile.passes.normalize import normalize
from eecompile.passes.plan import plan
from eecompile.passes.verify import VerifyResult, check_structure, verify_equivalence
from eecompile.report import build_report, render_markdown
from eecompile.passes.store import INLINE_BYTES, FileValues, TensorStore
from eecompile.runtime.client import Client

ARTIFACTS = ("server", "client", "report.json", "report.md")
EXTERNAL_DATA_THRESHOLD = 256 << 20  # bytes of initializers above which weights stream into model.onnx.data
DATA_FILE = "model.onnx.data"


@dataclass
class CompileResult:
    """What :func:`compile_model` produced."""

    out_dir: Path
    server_model: Path
    client_dir: Path
    report: dict
    verification: VerifyResult


def _analysed(model_path: str | Path, store: TensorStore) -> tuple[ModelGraph, Analysis, object]:
    model_path = Path(model_path).resolve()
    model = load_model(model_path, store)
    mg = ModelGraph(infer_shapes(model), model_path.parent, store)
    normalized = normalize(mg)
    mg = ModelGraph(infer_shapes(mg.export()), model_path.parent, store)
    return mg, analyze(mg), normalized


def lint_model(model_path: str | Path) -> dict:
    """The lint report of a model (no key needed): what each space can be protected by."""
    with tempfile.TemporaryDirectory(prefix="eecompile-lint-") as work:
        store = TensorStore(Path(work).resolve() / "scratch.bin")
        _, analysis, normalized = _analysed(model_path, store)
        store.close()
        return build_report(analysis, normalized, Path(model_path).name)


def check_out_dir(out_dir: str | Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse a non-empty ``out_dir`` unless ``force``, and any input inside the artifacts it would replace."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputDirError(f"output directory {out} is not empty (use --force to replace its eecompile artifacts)")
    for path in inputs:
        resolved = Path(path).resolve()
        for name in ARTIFACTS:
            artifact = (out / name).resolve()
            if resolved == artifact or artifact in resolved.parents:
                raise OutputDirError(f"input {path} lies inside the output artifact {out / name}; "
                                     "compile into another directory")
    return out


def _replace_artifacts(staging: Path, out: Path) -> None:
    """Swap the freshly written artifacts in; only eecompile's own artifacts are removed."""
    for name in ARTIFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(staging / name, path)


def model_id(server_dir: Path) -> str:
    """SHA-256 over the server folder's files: binds a client bundle to one compilation."""
    digest = hashlib.sha256()
    for path in sorted(server_dir.iterdir()):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _emit_server(mg: ModelGraph, server_dir: Path) -> tuple[Path, onnx.ModelProto]:
    """Write the server model; large weights stream, one tensor at a time, into model.onnx.data."""
    server_dir.mkdir(parents=True, exist_ok=True)
    path = server_dir / "model.onnx"
    constants = list({id(t): t for t in mg.graph.tensors().values() if isinstance(t, gs.Constant)}.values())
    total = sum(int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize for c in constants)
    if total > EXTERNAL_DATA_THRESHOLD:
        data_path = server_dir / DATA_FILE
        with open(data_path, "wb") as fh:
            for c in constants:
                array = np.asarray(c.values, order="C")  # keeps 0-d scalars 0-d
                c.data_location = None
                if array.nbytes < INLINE_BYTES:
                    c.values = array
                    continue
                offset = fh.tell()
                array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(fh)
                c._values = FileValues(data_path, offset, array.shape, array.dtype, c.name, location=DATA_FILE)
    else:
        for c in constants:
            if isinstance(c._values, LazyValues):
                c.values = c._values.load()
            c.data_location = None
    model = mg.export()
    onnx.save_model(model, str(path))
    return path, model


def compile_model(model_path: str | Path, key: MasterKey | str | Path, out_dir: str | Path, *,
                  force: bool = False, verify: bool = True, verify_feeds: list[dict] | None = None) -> CompileResult:
    """Compile ``model_path`` with ``key`` into ``out_dir`` (server/, client/, report.json, report.md)."""
    if not isinstance(key, MasterKey):
        key_path = Path(key)
        key = load_key(key)
        check_out_dir(out_dir, force, (Path(model_path), key_path))
    else:
        check_out_dir(out_dir, force, (Path(model_path),))
    if not Path(model_path).is_file():
        raise ModelFileError(f"model file not found: {model_path}")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _compile_into(model_path, key, out, verify, verify_feeds)
    except BaseException:
        if created:  # leave nothing behind for a compilation that failed
            shutil.rmtree(out, ignore_errors=True)
        raise


def _compile_into(model_path: str | Path, key: MasterKey, out: Path, verify: bool,
                  verify_feeds: list[dict] | None) -> CompileResult:
    with tempfile.TemporaryDirectory(dir=out.resolve(), prefix=".eecompile-") as staging:
        staging = Path(staging).resolve()
        store = TensorStore(staging / "scratch.bin")
        mg, analysis, normalized = _analysed(model_path, store)
        bases = plan(analysis, key)
        boundary = insert(analysis, bases)
        fold(analysis, bases)
        server_path, server_model = _emit_server(mg, staging / "server")
        store.close()
        (staging / "scratch.bin").unlink(missing_ok=True)
        check_structure(server_model, server_path)
        client = Client(boundary, model_id(staging / "server"))
        client.save(staging / "client", extra={"key_fingerprint": key.fingerprint()},
                    input_types=_value_types(server_model.graph.input),
                    output_types=_value_types(server_model.graph.output))
        if verify:
            result = verify_equivalence(model_path, server_path, client, feeds_list=verify_feeds)
        else:
            result = VerifyResult(False, None, "skipped by request")
        report = build_report(analysis, normalized, Path(model_path).name, boundary)
        report["verification"] = {"checked": result.checked, "max_relative_error": result.max_relative_error,
                                  "detail": result.detail}
        report["key_fingerprint"] = key.fingerprint()
        report["source_model"] = str(Path(model_path).resolve())
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(render_markdown(report))
        _replace_artifacts(staging, out)
    return CompileResult(out, out / "server" / "model.onnx", out / "client", report, result)


def _value_types(values) -> dict[str, onnx.TypeProto]:
    return {v.name: v.type for v in values if v.type.tensor_type.elem_type}
