"""The compiler pipeline: normalize → analyze → plan → insert → fold → verify → emit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from eecompile import staging
from eecompile.errors import ModelFileError, OutputDirError
from eecompile.genai import GENAI_POLICY, write_server_config
from eecompile.keys import MasterKey, load_key
from eecompile.passes.analyze import Analysis, analyze
from eecompile.passes.fold import fold
from eecompile.passes.graph import ModelGraph, infer_shapes, load_checked
from eecompile.passes.insert import insert
from eecompile.passes.exposure import exposure_for_compile
from eecompile.passes.normalize import normalize
from eecompile.passes.options import CompileOptions
from eecompile.passes.plan import plan
from eecompile.passes.rebase import analyze_with_policy
from eecompile.passes.verify import (DEFAULT_TOLERANCE, CannotVerify, VerifyResult, check_structure, state_transforms,
                                     verify_equivalence)
from eecompile.report import build_report, exposure_warnings, render_markdown
from eecompile.passes.store import (ALIGN, INLINE_BYTES, FileValues, FrozenHeap, TensorStore, model_bytes,
                                    release_memory)
from eecompile.runtime.client import Client

ARTIFACTS = ("server", "client", "report.json", "report.md")
Notice = staging.Notice
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


@contextmanager
def _ort_warnings_quiet():
    """ONNX Runtime's default logger at error level while the block runs (graph-optimizer notes such
    as "UnsqueezeElimination cannot remove node" are not the user's concern), warning level after."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


PHASE_LOGGER = logging.getLogger("eecompile.phase")
"""Logs ``phase NAME SECONDS`` at debug level as each compile phase ends (benchmarks time the phases with it)."""


@contextmanager
def _phase(name: str):
    start = time.perf_counter()
    yield
    PHASE_LOGGER.debug("phase %s %.3f", name, time.perf_counter() - start)


def _initializers_not_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Models of IR version < 4 list every initializer as a graph input too (ONNX Runtime treats them as
    constants, as IR 4 does); drop those inputs and move to IR 4 so that the weights are constants to fold
    and the compiled model passes onnx.checker."""
    if model.ir_version >= 4:
        return model
    weights = {t.name for t in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = 4
    return model


def _analysed(model_path: str | Path, store: TensorStore,
              options: CompileOptions | None = None) -> tuple[ModelGraph, Analysis, object]:
    model_path = Path(model_path).resolve()
    model, validity = load_checked(model_path, store)
    model = _initializers_not_inputs(model)
    mg = ModelGraph(infer_shapes(model), model_path.parent, store)
    mg.options = options or CompileOptions()
    with _ort_warnings_quiet():  # constant folding runs ONNX Runtime sessions of its own
        normalized = normalize(mg)
    row_gains = mg.row_gains
    mg = ModelGraph(infer_shapes(mg.export()), model_path.parent, store)
    mg.validity = validity
    mg.options, mg.row_gains = options or CompileOptions(), row_gains
    return mg, analyze_with_policy(mg, mg.options.policy), normalized


def _record_context(mg: ModelGraph, model_path: str | Path) -> None:
    """Write the model's context length into the server model's metadata when the model states it
    elsewhere (a ``config.json`` beside it, a RoPE cache), so that the server and generation enforce it."""
    from eecompile.runtime.generate import _MAX_POSITION_KEYS, model_context_length

    if any(k in mg.metadata for k in _MAX_POSITION_KEYS):
        return
    length = model_context_length(model_path)
    if length is not None:
        mg.metadata["max_position_embeddings"] = str(length)


def lint_model(model_path: str | Path, *, notice: Notice | None = None,
               options: CompileOptions | None = None) -> dict:
    """The lint report of a model (no key needed): what each space can be protected by.

    ``options`` are the compile options to report for (``policy``, see :class:`CompileOptions`).
    Scratch goes to a staging folder in the system temp dir; folders that killed lints left
    there are removed first (one line each to ``notice``, else the ``eecompile`` logger).
    """
    temp = Path(tempfile.gettempdir())
    staging.recover(temp, staging.LINT_PREFIX, notice=notice or _log_notice, what="lint")
    with staging.Staging(temp, staging.LINT_PREFIX, "lint") as work:
        store = TensorStore(work.path / "scratch.bin")
        _, analysis, normalized = _analysed(model_path, store, options)
        store.close()
        staging.fault_point("lint")
        report = build_report(analysis, normalized, Path(model_path).name)
        report["policy"] = (options or CompileOptions()).policy
        return report


def _log_notice(line: str) -> None:
    logging.getLogger("eecompile").warning("%s", line)


def recover_out_dir(out_dir: str | Path, notice: Notice | None = None) -> list[str]:
    """Finish an interrupted ``--force`` replacement in ``out_dir`` and remove staging folders of killed compiles."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    try:
        return staging.recover(out, staging.OUT_PREFIX, ARTIFACTS, notice or _log_notice)
    except OSError as exc:
        raise OutputDirError(f"{out} holds the leftovers of a killed compile that could not be cleaned up "
                             f"({exc.strerror or exc}: {exc.filename or out})") from None


def check_out_dir(out_dir: str | Path, force: bool, inputs: tuple[Path, ...] = (),
                  notice: Notice | None = None) -> Path:
    """Refuse a non-empty ``out_dir`` unless ``force``, and any input inside the artifacts it would replace.

    Leftovers of killed compiles are dealt with first (see :func:`recover_out_dir`).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory")
    recover_out_dir(out, notice)
    owner = staging.live_owner(out, staging.OUT_PREFIX) if out.is_dir() else None
    if owner is not None:
        raise OutputDirError(f"another eecompile compile (pid {owner.get('pid', '?')}) is writing into {out}; "
                             "wait for it to finish or choose another --out directory")
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


def model_id(server_dir: Path) -> str:
    """SHA-256 over the server folder's files: binds a client bundle to one compilation."""
    digest = hashlib.sha256()
    for path in sorted(server_dir.iterdir()):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _emit_server(mg: ModelGraph, server_dir: Path, store: TensorStore | None = None) -> tuple[Path, onnx.ModelProto]:
    """Write the server model; large weights go to model.onnx.data, one tensor at a time.

    Tensors the fold pass wrote into that file (``store.open_final``) stay where they are; the others
    (weights no rule changed, small constants above :data:`INLINE_BYTES`) are appended. At most
    :data:`EXTERNAL_DATA_THRESHOLD` bytes of weights in all, everything is inlined into model.onnx instead.
    """
    server_dir.mkdir(parents=True, exist_ok=True)
    path = server_dir / "model.onnx"
    data_path = server_dir / DATA_FILE
    store = store if store is not None else TensorStore(None)
    if store.final is None or store.final.resolve() != data_path.resolve():
        store.open_final(data_path, DATA_FILE)
    constants = list({id(t): t for t in mg.graph.tensors().values() if isinstance(t, gs.Constant)}.values())
    total = sum(int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize for c in constants)
    final = str(data_path.resolve())
    if total > EXTERNAL_DATA_THRESHOLD:
        for c in constants:
            c.data_location = None
            values = c._values
            if isinstance(values, FileValues) and str(Path(values.path).resolve()) == final:
                continue
            array = np.asarray(values.load() if isinstance(values, LazyValues) else values, order="C")  # 0-d stays 0-d
            c._values = array if array.nbytes < INLINE_BYTES else store.append_final(c.name, array)
        store.close()
        _compact(constants, data_path)
    else:
        for c in constants:
            if isinstance(c._values, LazyValues):
                c.values = c._values.load()
            c.data_location = None
        store.close()
        data_path.unlink(missing_ok=True)
    model = mg.export()
    with staging.writing(path):
        onnx.save_model(model, str(path))
    return path, model


def _compact(constants: list[gs.Constant], data_path: Path) -> None:
    """Rewrite ``data_path`` with the live tensors only when it holds dead bytes (a tensor folded twice)."""
    final = str(data_path.resolve())
    live = sorted((c._values.offset, c) for c in constants
                  if isinstance(c._values, FileValues) and str(Path(c._values.path).resolve()) == final)
    if not data_path.exists():
        return
    end, dead = 0, False
    for offset, c in live:
        dead |= offset - end >= ALIGN or offset < end
        end = offset + c._values.nbytes
    dead |= data_path.stat().st_size - end >= ALIGN
    if not dead:
        return
    temp = data_path.with_name(data_path.name + ".compact")
    with TensorStore(None) as fresh:
        fresh.open_final(temp, DATA_FILE)
        for _, c in live:
            c._values = fresh.append_final(c.name, c._values.load())
    with staging.writing(data_path):
        os.replace(temp, data_path)
    for _, c in live:
        c._values = FileValues(data_path, c._values.offset, c._values.shape, c._values.np_dtype, c.name,
                               location=DATA_FILE)


def compile_model(model_path: str | Path, key: MasterKey | str | Path, out_dir: str | Path, *,
                  force: bool = False, verify: bool = True, verify_feeds: list[dict] | None = None,
                  verify_shapes: dict[str, int] | None = None, notice: Notice | None = None,
                  options: CompileOptions | None = None, progress: bool | None = None) -> CompileResult:
    """Compile ``model_path`` with ``key`` into ``out_dir`` (server/, client/, report.json, report.md).

    Everything is written into a staging folder inside ``out_dir`` and published at the end;
    with ``force`` the old artifacts are swapped out so that, whenever the process dies, the
    folder holds the old compilation or the new one, complete (a replacement cut short is
    finished by the next compile or session that opens the folder). ``notice`` receives one
    line per leftover of a killed compile that was cleaned up (default: the ``eecompile`` logger).

    With ``verify`` (the default) the compiled model must be checked against the original on
    generated inputs (``verify_shapes``: symbol or role sizes, ``verify_feeds``: the inputs
    themselves); when no inputs fit, :class:`CannotVerify` is raised and nothing is written.
    ``options`` (:class:`CompileOptions`) holds the non-default choices; with ``requantize`` the
    check measures the accuracy change instead of requiring exactness (:mod:`eecompile.accuracy`).
    ``progress``: a progress bar on stderr while the weights fold (None: when stderr is a terminal).

    Memory holds the graph and the tensor being folded, not the model: weights are read from their
    file when their rule folds them and written to the server's data file as soon as they are final.
    """
    if not isinstance(key, MasterKey):
        key_path = Path(key)
        key = load_key(key)
        check_out_dir(out_dir, force, (Path(model_path), key_path), notice)
    else:
        check_out_dir(out_dir, force, (Path(model_path),), notice)
    if not Path(model_path).is_file():
        raise ModelFileError(f"model file not found: {model_path}")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _compile_into(model_path, key, out, verify, verify_feeds, verify_shapes, options or CompileOptions(),
                             progress)
    except BaseException:
        if created:  # leave nothing behind for a compilation that failed
            shutil.rmtree(out, ignore_errors=True)
        raise


def _compile_into(model_path: str | Path, key: MasterKey, out: Path, verify: bool,
                  verify_feeds: list[dict] | None, verify_shapes: dict[str, int] | None = None,
                  options: CompileOptions = CompileOptions(), progress: bool | None = None) -> CompileResult:
    with staging.Staging(out.resolve(), staging.OUT_PREFIX, "compile") as work, FrozenHeap() as heap, \
            TensorStore(work.path / "scratch.bin") as store:  # a failed compile drops the writes still queued
        scratch = store.scratch
        new = work.path / staging.NEW
        with _phase("analyse"):
            mg, analysis, normalized = _analysed(model_path, store, options)
        heap.freeze()  # the graph and analysis live to the end: collections after this skip them
        size = model_bytes(model_path)  # what the plan's and the fold's scratch scale with (read once it loaded)
        with _phase("plan"):
            bases = plan(analysis, key)
            release_memory(size)  # the samplers' scratch (QR factors) goes back to the system
        boundary = insert(analysis, bases)
        state = state_transforms(analysis, bases) if verify else {}  # in memory only, to verify a non-empty cache
        store.open_final(new / "server" / DATA_FILE, DATA_FILE)  # folded weights are final: written once, there
        with _phase("fold"):
            fold(analysis, bases, progress)
            release_memory(size)
        _record_context(mg, model_path)
        staging.fault_point("emit")
        with _phase("emit"):
            server_path, server_model = _emit_server(mg, new / "server", store)
        scratch.unlink(missing_ok=True)
        server_validity = check_structure(server_model, server_path)
        genai_config = write_server_config(model_path, new / "server", Client(boundary))  # builder folders only
        client = Client(boundary, model_id(new / "server"))
        client.save(new / "client", extra={"key_fingerprint": key.fingerprint()},
                    input_types=_value_types(server_model.graph.input),
                    output_types=_value_types(server_model.graph.output))
        heap.freeze()  # and so does what plan, fold and emit made
        if verify:
            with _phase("verify"):
                result = verify_equivalence(model_path, server_path, client, feeds_list=verify_feeds,
                                            shapes=verify_shapes, state=state,
                                            tolerance=float("inf") if options.requantize else DEFAULT_TOLERANCE)
            if not result.checked:
                raise CannotVerify(f"cannot verify the compiled model: {result.detail}; give the input sizes with "
                                   "--verify-shapes NAME=SIZE,... (symbols such as batch_size, sequence_length, "
                                   "past_sequence_length) or the inputs with --verify-feeds FILE.npz, or skip the "
                                   "check with --no-verify")
        else:
            result = VerifyResult(False, None, "skipped by request")
        report = build_report(analysis, normalized, Path(model_path).name, boundary)
        if genai_config is not None:
            report["policies"].append(GENAI_POLICY)
        if options.requantize and verify:
            report["accuracy"] = _requantized_accuracy(model_path, new)
            report["policies"].append(f"re-quantised weights, measured {report['accuracy']['detail']}")
        report["policy"] = options.policy
        report["verification"] = {"checked": result.checked, "max_relative_error": result.max_relative_error,
                                  "detail": result.detail,
                                  "tolerance": result.tolerance.to_dict() if result.tolerance else None}
        with _phase("exposure"):
            report["exposure"] = exposure_for_compile(model_path, server_path, client, state, result, analysis,
                                                      work.path)
        report["warnings"].extend(exposure_warnings(report["exposure"]))
        report["server_validity"] = server_validity.describe()
        report["key_fingerprint"] = key.fingerprint()
        report["source_model"] = str(Path(model_path).resolve())
        with staging.writing(new / "report.json"):
            (new / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        with staging.writing(new / "report.md"):
            (new / "report.md").write_text(render_markdown(report))
        staging.fault_point("staged")
        staging.commit(work.path, out, ARTIFACTS)
    return CompileResult(out, out / "server" / "model.onnx", out / "client", report, result)


def _requantized_accuracy(model_path: str | Path, staged: Path) -> dict:
    """The measured change of a ``--requantize`` compile (a decoder: logits and greedy tokens), for the report."""
    from eecompile.accuracy import measure
    from eecompile.errors import EECompileError

    try:
        change = measure(model_path, staged)
    except EECompileError as exc:  # not a decoder generation can drive: the verification error stands alone
        return {"measured": False, "detail": f"greedy agreement not measured: {exc}"}
    return {"measured": True, "detail": change.describe(), **change.to_dict()}


def _value_types(values) -> dict[str, onnx.TypeProto]:
    return {v.name: v.type for v in values if v.type.tensor_type.elem_type}
