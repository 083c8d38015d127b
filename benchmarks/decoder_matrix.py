"""The real-export matrix: tiny Hugging Face decoders × four exporters, compiled and measured.

    python benchmarks/decoder_matrix.py --out /work/exports [--archs llama,phi3] \
        [--exporters optimum,dynamo20,dynamo23,legacy17] [--timeout 1200] [--retry-failed]

For every architecture × exporter (see :mod:`eecompile.models.hf_decoders`) the script exports the
model (cached under ``--out``), runs ``eecompile compile MODEL --key K --out DIR`` as a subprocess
(one key from ``eecompile keygen`` for the whole run) and then measures, independently of what the
compiler's report claims:

* exactness — the original (onnxruntime) against ``EncryptedSession(DIR)`` on fresh random inputs
  (batch 2, sequence 5), maximum relative error of every output; with-past exports also run two
  decode steps that feed ``present.*`` back as ``past_key_values.*`` (ciphertext for the encrypted
  side, the client passes it through);
* exposure — copies of the original and of ``DIR/server/model.onnx`` that output every
  intermediate tensor; the original runs on the plaintext feeds, the server model on the client's
  encryption of them; every float, non-constant, more-than-one-element intermediate whose server
  value equals the plaintext value (same name, same shape, ``np.allclose(rtol=1e-5, atol=1e-6)``)
  is listed with its producing op.  Nothing is excluded, but each match is tagged: ``attention``
  (Softmax outputs, and the score MatMul feeding a Softmax through elementwise ops, and that
  path), ``clear-input`` (computed only from inputs the client leaves in clear — attention mask,
  position ids — and shapes), or ``secret`` (everything else: depends on token ids or the cache).
  ``present.*`` outputs equal to the plaintext ones are counted separately;
* residual basis — from ``report.json``: the basis of the space holding the embedding Gather's
  output, and the number of spaces per basis;
* greedy generation — ``eecompile generate DIR --prompt-ids ... --max-new-tokens 16`` (the CLI, as a
  subprocess) against greedy decoding of the original by a plain onnxruntime loop (KV cache fed back,
  or the whole sequence re-run without one): equal token for token or not.

Each cell runs in its own subprocess with a timeout, so one failing or hanging model does not
stop the others.  Writes ``benchmarks/results/decoder_matrix.json`` and ``.md``; with ``--results-md
benchmarks/RESULTS.md`` also the condensed section "Real exports: Hugging Face decoders × exporters" there
(between ``<!-- decoder-matrix -->`` markers), naming the commit the code was measured at (``--commit``
when the code does not run from a git checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCH, SEQ, DECODE_STEPS = 2, 5, 2
RTOL, ATOL = 1e-5, 1e-6
EXACT_TOLERANCE = 1e-3
"""Measured relative error up to which a cell counts as exact (float32 rounding through 2 layers)."""

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Tanh", "Neg", "Identity", "Max", "Min", "Clip"}
"""Ops that may sit between the attention-score MatMul and its Softmax (scale, mask, soft-cap)."""


# --- feeds ------------------------------------------------------------------------------


def _dim(d: Any, default: int) -> int:
    return d if isinstance(d, int) and d > 0 else default


def make_feeds(session: Any, dims: dict[str, int], seed: int, batch: int = BATCH, seq: int = SEQ,
               past: int = 0, past_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Random feeds for an exported decoder, from its ONNX Runtime input specs.

    ``input_ids`` uniform in the vocabulary, ``attention_mask`` ones over ``past + seq``,
    ``position_ids`` ``past .. past+seq-1``, ``past_key_values.*`` from ``past_values`` or empty
    (length-0) caches with the static head counts / head size of the spec.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        name = spec.name
        if name == "input_ids":
            feeds[name] = rng.integers(0, dims["vocab_size"], size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        elif name.startswith("past"):
            if past_values is not None:
                feeds[name] = past_values[name]
            else:
                shape = spec.shape
                feeds[name] = np.zeros((batch, _dim(shape[1], dims["kv_heads"]), 0, _dim(shape[3], dims["head_dim"])),
                                       dtype=np.float32)
        else:
            raise ValueError(f"unexpected input {name!r}")
    return feeds


def relative_error(expected: Any, actual: Any) -> float:
    """max |expected - actual| / max |expected| (inf on a shape mismatch or a NaN/inf where the other has none)."""
    from eecompile.passes.verify import relative_error as rel

    return rel(expected, actual)


def measure_exactness(model: Path, out_dir: Path, dims: dict[str, int], seed: int = 7,
                      batch: int = BATCH) -> dict[str, Any]:
    """Original vs encrypted: prefill (``batch`` × seq 5) and, with a cache, 2 decode steps.

    Returns ``{"steps": [{"step", "max_rel_err", "per_output"}], "max_rel_err", "present_equal_plain"}``;
    ``present_equal_plain`` counts, over all steps, present outputs the server returned equal to the
    plaintext ones (which a with-past export should never do).
    """
    import numpy as np
    import onnxruntime as ort

    from eecompile.models.hf_decoders import past_name
    from eecompile.runtime.session import EncryptedSession

    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    enc = EncryptedSession(out_dir, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    has_past = any(i.name.startswith("past") for i in ref.get_inputs())
    feeds = make_feeds(ref, dims, seed, batch=batch)
    plain_feeds, enc_feeds = dict(feeds), dict(feeds)
    rng = np.random.default_rng(seed + 1)
    steps, equal_present, past = [], 0, 0
    for step in range(1 + (DECODE_STEPS if has_past else 0)):
        plain = dict(zip(names, ref.run(names, plain_feeds)))
        cipher = dict(zip(names, enc.run(names, enc_feeds)))
        per = {}
        for n in names:
            if n.startswith("present"):
                if plain[n].shape == cipher[n].shape and np.allclose(plain[n], cipher[n], rtol=RTOL, atol=ATOL):
                    equal_present += 1
            else:
                per[n] = relative_error(plain[n], cipher[n])
        steps.append({"step": step, "past": past, "seq": int(plain_feeds["input_ids"].shape[1]),
                      "max_rel_err": max(per.values()), "per_output": per})
        if not has_past:
            break
        past += int(plain_feeds["input_ids"].shape[1])
        ids = rng.integers(0, dims["vocab_size"], size=(batch, 1), dtype=np.int64)
        common = {"input_ids": ids, "attention_mask": np.ones((batch, past + 1), np.int64)}
        if "position_ids" in feeds:
            common["position_ids"] = np.full((batch, 1), past, np.int64)
        plain_feeds = {**common, **{past_name(n): plain[n] for n in names if n.startswith("present")}}
        enc_feeds = {**common, **{past_name(n): cipher[n] for n in names if n.startswith("present")}}
    return {"batch": batch, "steps": steps, "max_rel_err": max(s["max_rel_err"] for s in steps),
            "present_equal_plain": equal_present, "decode_steps": len(steps) - 1}


# --- exposure ---------------------------------------------------------------------------


def _graph_facts(proto: Any, secret_inputs: set[str]) -> dict[str, Any]:
    """Producer op, taint class and attention tag of every top-level node output.

    ``taint[name]`` is ``"constant"`` (only initializers / Constant nodes / shapes of constants),
    ``"clear-input"`` (depends on inputs outside ``secret_inputs`` or on shapes only) or ``"secret"``.
    A Shape node's output carries no data of its input, so it is ``clear-input`` unless constant.
    """
    g = proto.graph
    init = {t.name for t in g.initializer}
    taint: dict[str, str] = {n: "constant" for n in init}
    for i in g.input:
        if i.name not in init:
            taint[i.name] = "secret" if i.name in secret_inputs else "clear-input"
    rank = {"constant": 0, "clear-input": 1, "secret": 2}
    producer: dict[str, str] = {}
    consumers: dict[str, list[Any]] = {}
    for node in g.node:  # ONNX graphs are topologically sorted
        ins = [taint.get(x, "constant") for x in node.input if x]
        level = max(ins, key=rank.__getitem__) if ins else "constant"
        if node.op_type in ("Shape", "Size") and level == "secret":
            level = "clear-input"
        for o in node.output:
            if o:
                taint[o] = level
                producer[o] = node.op_type
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    attention: set[str] = set()
    for node in g.node:
        if node.op_type == "Softmax":
            attention.update(o for o in node.output if o)
            # walk the Softmax's input back through elementwise ops to the score MatMul
            frontier = [node.input[0]]
            path: list[str] = []
            by_output = {o: n for n in g.node for o in n.output}
            seen = set()
            while frontier:
                t = frontier.pop()
                if t in seen or t not in by_output:
                    continue
                seen.add(t)
                p = by_output[t]
                if p.op_type == "MatMul":
                    attention.add(t)
                    attention.update(path)
                elif p.op_type in ELEMENTWISE:
                    path.append(t)
                    frontier.extend(x for x in p.input if x and taint.get(x) == "secret")
            # ops right after Softmax that only clean it up (Cast, IsNaN/Where guards)
            frontier = [o for o in node.output if o]
            while frontier:
                t = frontier.pop()
                for c in consumers.get(t, []):
                    if c.op_type in ("Cast", "Where", "Identity", "Dropout"):
                        for o in c.output:
                            if o and o not in attention:
                                attention.add(o)
                                frontier.append(o)
    return {"taint": taint, "producer": producer, "attention": attention}


def _with_all_outputs(proto: Any, names: list[str]) -> Any:
    """A copy of ``proto`` whose graph also outputs ``names`` (no type info needed by onnxruntime)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    return model


def measure_exposure(model: Path, out_dir: Path, dims: dict[str, int], seed: int = 11,
                     batch: int = BATCH) -> dict[str, Any]:
    """Intermediates (and present.* outputs) the server computes equal to the plaintext ones, prefill run.

    Tags: ``attention`` (scores / probabilities), ``norm-stat`` (secret-dependent per-token scalars,
    last dim 1: the norm statistics an orthogonal basis leaves unchanged by design), ``clear-input``
    and ``secret`` (see :func:`_graph_facts`).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from eecompile.runtime.client import Client

    client = Client.load(out_dir / "client")
    secret_inputs = {t.name for t in client.spec.inputs if t.kind != "clear"}
    orig = onnx.load(str(model))
    server = onnx.load(str(out_dir / "server" / "model.onnx"))
    facts = _graph_facts(orig, secret_inputs)
    graph_outputs = {o.name for o in orig.graph.output}
    candidates = [o for n in orig.graph.node for o in n.output
                  if o and facts["taint"][o] != "constant" and n.op_type != "Constant" and o not in graph_outputs]
    server_names = {o for n in server.graph.node for o in n.output if o}
    matched = [n for n in candidates if n in server_names]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    ref = ort.InferenceSession(_with_all_outputs(orig, candidates).SerializeToString(), opts,
                               providers=["CPUExecutionProvider"])
    srv = ort.InferenceSession(_with_all_outputs(server, matched).SerializeToString(), opts,
                               providers=["CPUExecutionProvider"])
    feeds = make_feeds(ref, dims, seed, batch=batch)
    plain = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    cipher = dict(zip([o.name for o in srv.get_outputs()], srv.run(None, client.encrypt(feeds))))
    exposed, compared = [], 0
    for n in matched:
        a, b = plain.get(n), cipher.get(n)
        if a is None or b is None or not np.issubdtype(np.asarray(a).dtype, np.floating) or np.asarray(a).size <= 1:
            continue
        compared += 1
        if a.shape == b.shape and np.allclose(b, a, rtol=RTOL, atol=ATOL):
            tag = "attention" if n in facts["attention"] else facts["taint"][n]
            if tag == "secret" and a.ndim >= 2 and a.shape[-1] == 1:
                tag = "norm-stat"
            exposed.append({"name": n, "op": facts["producer"][n], "tag": tag, "shape": list(a.shape)})
    presents = [o.name for o in orig.graph.output if o.name.startswith("present")]
    present_equal = [n for n in presents if n in cipher and plain[n].shape == cipher[n].shape
                     and np.allclose(cipher[n], plain[n], rtol=RTOL, atol=ATOL)]
    tags = Counter(e["tag"] for e in exposed)
    return {"intermediates": len(candidates), "matched_names": len(matched), "compared_float": compared,
            "exposed_secret": tags.get("secret", 0), "exposed_attention": tags.get("attention", 0),
            "exposed_clear_input": tags.get("clear-input", 0), "exposed_norm_stat": tags.get("norm-stat", 0),
            "batch": batch,
            "exposed_ops": dict(Counter(f"{e['op']}[{e['tag']}]" for e in exposed)),
            "exposed": exposed, "present_total": len(presents), "present_equal": len(present_equal),
            "present_equal_names": present_equal}


def original_failure(model: Path, dims: dict[str, int], batch: int) -> str | None:
    """``None`` if the original model runs in onnxruntime at ``batch`` × seq 5 (prefill), else the error line.

    Some exports are only valid at batch 1 (e.g. a ``RotaryEmbedding-23`` fed a batch-1 cos/sin cache).
    """
    import onnxruntime as ort

    from eecompile.models.hf_decoders import error_line

    try:
        ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        ref.run(None, make_feeds(ref, dims, 3, batch=batch))
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return error_line(exc)
    return None


# --- greedy generation ------------------------------------------------------------------

GREEDY_PROMPT = [1, 5, 17, 42, 99, 200, 7]
GREEDY_TOKENS = 16


def measure_generation(model: Path, out_dir: Path) -> dict[str, Any]:
    """``eecompile generate`` (greedy, 16 tokens) on the compiled model vs :func:`reference_greedy` on the original."""
    from eecompile.models.hf_decoders import reference_greedy

    expected = reference_greedy(model, GREEDY_PROMPT, GREEDY_TOKENS)
    proc = subprocess.run([sys.executable, "-m", "eecompile", "generate", str(out_dir), "--prompt-ids",
                           ",".join(map(str, GREEDY_PROMPT)), "--max-new-tokens", str(GREEDY_TOKENS),
                           "--provider", "cpu"], capture_output=True, text=True, cwd=str(REPO))
    got = [int(t) for t in proc.stdout.split()] if proc.returncode == 0 else None
    return {"rc": proc.returncode, "equal": got == expected, "plain": expected, "encrypted": got,
            "prompt": GREEDY_PROMPT, "tokens": GREEDY_TOKENS,
            "last_stderr": "" if proc.returncode == 0 else _last_line(proc.stderr)}


# --- the report -------------------------------------------------------------------------


def embedding_output(model: Path, vocab: int) -> str | None:
    """Name of the embedding Gather's output: a Gather of a constant ``[vocab, hidden]`` table by the ids."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    init = {t.name: list(t.dims) for t in proto.graph.initializer}
    consts = {n.output[0]: list(n.attribute[0].t.dims) for n in proto.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    ids_derived = {"input_ids"}
    for node in proto.graph.node:
        if node.op_type == "Gather":
            table = init.get(node.input[0]) or consts.get(node.input[0])
            if table and len(table) == 2 and table[0] == vocab and node.input[1] in ids_derived:
                return node.output[0]
        if any(x in ids_derived for x in node.input) and node.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze",
                                                                          "Squeeze", "Flatten"):
            ids_derived.update(node.output)
    return None


def report_facts(out_dir: Path, model: Path, vocab: int) -> dict[str, Any]:
    """Verification, residual basis, spaces per basis, unsupported ops and weaknesses from report.json."""
    report = json.loads((out_dir / "report.json").read_text())
    emb = embedding_output(model, vocab)
    residual = next((s for s in report["spaces"] if emb and emb in s["tensors"]), None)
    ver = report.get("verification") or {}
    return {
        "verification": {"checked": ver.get("checked"), "max_relative_error": ver.get("max_relative_error"),
                         "detail": ver.get("detail")},
        "embedding_output": emb,
        "residual": None if residual is None else {"name": residual["name"], "basis": residual["basis"],
                                                   "size": residual["size"], "tensors": len(residual["tensors"]),
                                                   "limited_by": residual.get("limited_by")},
        "spaces_per_basis": dict(Counter(s["basis"] for s in report["spaces"])),
        "unsupported_ops": sorted({u["op_type"] for u in report.get("unsupported_ops", [])}),
        "weaknesses": report.get("weaknesses", []),
        "warnings": report.get("warnings", []),
    }


# --- one cell (runs in a subprocess) ----------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def run_cell(root: Path, arch: str, exporter: str, key: Path, retry_failed: bool = False) -> dict[str, Any]:
    """Export, compile and measure one arch × exporter; every stage's failure is recorded, not raised."""
    import onnx

    from eecompile.models import hf_decoders as hd

    row: dict[str, Any] = {"arch": arch, "exporter": exporter}
    exp = hd.export_one(root, arch, exporter, retry_failed=retry_failed)
    row["export"] = exp.to_dict()
    if not exp.path:
        return row
    model = Path(exp.path)
    proto = onnx.load(str(model), load_external_data=False)
    row["export"].update(opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
                         inputs=[i.name for i in proto.graph.input], nodes=len(proto.graph.node),
                         ops=dict(Counter(n.op_type for n in proto.graph.node)))
    del proto
    out_dir = model.parent / "compiled"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eecompile", "compile", str(model), "--key", str(key),
                           "--out", str(out_dir)], capture_output=True, text=True, cwd=str(REPO))
    row["compile"] = {"rc": proc.returncode, "last_stderr": _last_line(proc.stderr),
                      "seconds": round(time.perf_counter() - start, 2)}
    if proc.returncode == 70:  # internal error: rerun with the traceback to record where it happened
        shutil.rmtree(out_dir, ignore_errors=True)
        debug = subprocess.run([sys.executable, "-m", "eecompile", "compile", str(model), "--key", str(key),
                                "--out", str(out_dir)], capture_output=True, text=True, cwd=str(REPO),
                               env={**os.environ, "EECOMPILE_DEBUG": "1"})
        frames = [line.strip() for line in debug.stderr.splitlines() if line.strip().startswith("File ")]
        row["compile"]["where"] = frames[-1] if frames else ""
        row["compile"]["traceback_tail"] = debug.stderr.splitlines()[-12:]
    if proc.returncode != 0 or not (out_dir / "report.json").is_file():
        return row
    dims = hd.model_dims(arch)
    batch = BATCH
    failure = original_failure(model, dims, BATCH)
    if failure:
        row["batch_note"] = f"the original fails in onnxruntime at batch {BATCH} ({failure}); measured at batch 1"
        batch = 1
    for stage, fn in (("report", lambda: report_facts(out_dir, model, dims["vocab_size"])),
                      ("exact", lambda: measure_exactness(model, out_dir, dims, batch=batch)),
                      ("exposure", lambda: measure_exposure(model, out_dir, dims, batch=batch)),
                      ("greedy", lambda: measure_generation(model, out_dir))):
        try:
            row[stage] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded per stage
            row[stage] = {"error": hd.error_line(exc)}
    return row


# --- the table --------------------------------------------------------------------------


def _fmt_err(x: Any) -> str:
    return "—" if x is None else f"{x:.1e}"


def cell_summary(row: dict[str, Any]) -> dict[str, str]:
    """The table's columns for one row (strings); error messages go to ``status`` once."""
    cols = {k: "—" for k in ("compile", "verification", "exact", "matched", "exposed", "attn", "norm", "clear",
                             "kv", "residual", "greedy")}
    exp = row.get("export", {})
    if row.get("error"):
        return {**cols, "status": f"harness: {row['error']}"}
    if not exp.get("path"):
        return {**cols, "status": f"export failed: {exp.get('error')}"}
    comp = row.get("compile", {})
    if comp.get("rc") != 0:
        where = f" [{comp['where']}]" if comp.get("where") else ""
        return {**cols, "compile": str(comp.get("rc")), "status": comp.get("last_stderr", "") + where}
    rep, ex, expo = row.get("report", {}), row.get("exact", {}), row.get("exposure", {})
    notes = []
    if exp.get("note"):
        notes.append(exp["note"])
    if row.get("batch_note"):
        note = row["batch_note"]
        if "Status Message:" in note:  # keep onnxruntime's reason, drop the boilerplate
            node = note.split("running ", 1)[-1].split(" node", 1)[0] if "running " in note else "a node"
            note = (f"original fails at batch {BATCH} in {node}: "
                    f"{note.split('Status Message:', 1)[1].split(');', 1)[0].strip()}; measured at batch 1")
        notes.append(note)
    cols["compile"] = "0"
    ver = {}
    if "error" in rep:
        cols["verification"] = "?"
        notes.append(f"report: {rep['error']}")
    else:
        ver = rep.get("verification", {})
        cols["verification"] = (f"yes / {_fmt_err(ver.get('max_relative_error'))}" if ver.get("checked")
                                else "not run")
        res = rep.get("residual")
        cols["residual"] = f"{res['basis']} ({res['size']})" if res else "not found"
        if rep.get("unsupported_ops"):
            notes.append("unsupported: " + ",".join(rep["unsupported_ops"]))
        if not ver.get("checked"):
            notes.append(f"verification: {ver.get('detail')}")
    if "error" in ex:
        cols["exact"] = "error"
        notes.append(f"exactness run: {ex['error']}")
    else:
        tag = "yes" if ex["max_rel_err"] <= EXACT_TOLERANCE else "**NO**"
        cols["exact"] = (f"{tag} {_fmt_err(ex['max_rel_err'])}"
                         + (f" (+{ex['decode_steps']} dec)" if ex["decode_steps"] else "")
                         + (f" b{ex['batch']}" if ex.get("batch", BATCH) != BATCH else ""))
    if "error" in expo:
        cols["exposed"] = "error"
        notes.append(f"exposure run: {expo['error']}")
    else:
        cols["exposed"] = f"{expo['exposed_secret']}/{expo['compared_float']}"
        cols["matched"] = f"{expo['matched_names']}/{expo['intermediates']}"
        cols["attn"], cols["clear"] = str(expo["exposed_attention"]), str(expo["exposed_clear_input"])
        cols["norm"] = str(expo.get("exposed_norm_stat", 0))
        cols["kv"] = f"{expo['present_equal']}/{expo['present_total']}" if expo["present_total"] else "n/a"
    gen = row.get("greedy", {})
    if "error" in gen:
        cols["greedy"] = "error"
        notes.append(f"generation: {gen['error']}")
    elif gen:
        cols["greedy"] = "equal" if gen.get("equal") else ("**DIFF**" if gen.get("rc") == 0 else f"rc {gen.get('rc')}")
        if gen.get("rc"):
            notes.append(f"eecompile generate: {gen.get('last_stderr')}")
    return {**cols, "status": "; ".join(notes)}


def code_version(repo: Path = REPO) -> str:
    """``git rev-parse HEAD`` of ``repo`` (+ ``, uncommitted changes in: ...`` for tracked files under
    eecompile/ and benchmarks/ that differ from it), or ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                "eecompile", "benchmarks"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    files = [line[3:] for line in dirty.splitlines() if line.strip() and not line[3:].startswith("benchmarks/results")]
    return head + (f", uncommitted changes in: {', '.join(files)}" if files else "")


SECTION_START, SECTION_END = "<!-- decoder-matrix -->", "<!-- /decoder-matrix -->"


def results_section(rows: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    """The condensed RESULTS.md section: arch × exporter → compile, verification, exact, exposure, KV, residual, greedy."""
    residual_of = {(r["arch"], r["exporter"]): cell_summary(r)["residual"] for r in rows}
    lines = [SECTION_START, "## Real exports: Hugging Face decoders × exporters", "",
             f"**Command:** `{command}` (about 15 minutes on 2 cores; exports cached under the folder given). "
             f"**Code:** commit `{meta['commit']}`; measured {meta['date']} UTC, torch {meta['torch']}, "
             f"onnxruntime {meta['onnxruntime']}, CPU. Full table with every count, spaces per basis and the "
             "exposed tensors by name: [`results/decoder_matrix.md`](results/decoder_matrix.md) "
             "(raw: `results/decoder_matrix.json`).", "",
             "Tiny random-weight checkpoints of eleven architectures (hidden 64, 2 layers, 4 heads × 16, 2 KV heads "
             "where GQA, vocabulary 256; `eecompile/models/hf_decoders.py`), each exported four ways: optimum "
             "`text-generation-with-past` (KV cache in and out; run under transformers 4.57 in a second venv), "
             "`torch.onnx.export(dynamo=True)` at the default opset 20 and at opset 23 (dynamic batch and sequence, "
             "no cache), and the TorchScript exporter at opset 17.", "",
             "Columns: **compile** exit status of `eecompile compile`; **verification** the compiler's own check "
             "(report.json; with-past exports include a decode step on the fed-back cache); **exact** max relative "
             f"error measured here on fresh inputs, batch {BATCH} × seq {SEQ}, plus {DECODE_STEPS} decode steps "
             "feeding the server's `present.*` back for with-past exports (`b1`: the original only runs at batch "
             "1); **exposed** float intermediates that depend on the ids or the cache, are not attention scores or "
             "per-token norm statistics, and whose server value equals the plaintext one, out of those compared; "
             "**KV** server `present.*` outputs equal to the plaintext model's cache; **residual** the basis of the "
             "residual stream (the embedding output's space), `= legacy` when it equals the opset-17 export's; "
             f"**greedy** `eecompile generate --prompt-ids` ({GREEDY_TOKENS} tokens) vs plain onnxruntime greedy "
             "decoding of the original.", "",
             "| arch | exporter | compile | verification | exact | exposed | KV | residual | greedy |",
             "|---|---|---|---|---|---|---|---|---|"]
    full = {"compile": 0, "verified": 0, "exact": 0, "exact5": 0, "exposed0": 0, "kv0": 0, "greedy": 0}
    for row in rows:
        c = cell_summary(row)
        res = c["residual"]
        legacy = residual_of.get((row["arch"], "legacy17"))
        if row["exporter"] != "legacy17" and legacy and res == legacy:
            res += " = legacy"
        elif row["exporter"] != "legacy17" and legacy and res not in ("—", legacy):
            res += f" (legacy: {legacy})"
        lines.append(f"| {row['arch']} | {row['exporter']} | {c['compile']} | {c['verification']} | {c['exact']} | "
                     f"{c['exposed']} | {c['kv']} | {res} | {c['greedy']} |")
        full["compile"] += c["compile"] == "0"
        full["verified"] += c["verification"].startswith("yes")
        full["exact"] += c["exact"].startswith("yes")
        err = (row.get("exact") or {}).get("max_rel_err")
        full["exact5"] += err is not None and err <= 1e-5
        full["exposed0"] += c["exposed"].startswith("0/")
        full["kv0"] += c["kv"].startswith("0/") or c["kv"] == "n/a"
        full["greedy"] += c["greedy"] == "equal"
    n = len(rows)
    lines += ["", f"**Totals over {n} cells:** compile exit 0: {full['compile']}; verification ran and passed: "
              f"{full['verified']}; exact (≤ {EXACT_TOLERANCE:g}): {full['exact']}, of which ≤ 1e-5: {full['exact5']}; zero exposed intermediates: {full['exposed0']}; "
              f"no plaintext KV cache: {full['kv0']}; greedy generation identical: {full['greedy']}.", SECTION_END]
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, section: str) -> None:
    """Replace the ``<!-- decoder-matrix -->`` section of ``path`` with ``section`` (append it if absent)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, results: Path = RESULTS) -> None:
    """Write ``decoder_matrix.json`` (every measurement) and ``decoder_matrix.md`` (the table)."""
    import onnxruntime
    import torch

    results.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "exports": str(args.out), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "batch": BATCH, "seq": SEQ, "decode_steps": DECODE_STEPS,
            "rtol": RTOL, "atol": ATOL, "exact_tolerance": EXACT_TOLERANCE,
            "commit": getattr(args, "commit", None) or code_version()}
    (results / "decoder_matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    lines = [
        "# Real-export matrix: Hugging Face decoders × exporters",
        "",
        f"Generated by `python benchmarks/decoder_matrix.py --out {args.out}` on {meta['date']} "
        f"at commit `{meta['commit']}` (torch {meta['torch']}, onnxruntime {meta['onnxruntime']}). Tiny random-weight checkpoints "
        "(hidden 64, 2 layers, 4 heads × 16, 2 KV heads where GQA, intermediate 128, vocab 256), "
        "see `eecompile/models/hf_decoders.py`. The compiler is being changed: these are a snapshot.",
        "",
        "Columns: **compile** exit code of `eecompile compile`; **verification** the compiler's own check "
        "(report.json: checked / max relative error); **exact** measured here: max relative error of "
        f"every output, original vs `EncryptedSession`, batch {BATCH} × seq {SEQ} (+ decode steps feeding "
        f"`present.*` back for with-past exports), exact when ≤ {EXACT_TOLERANCE:g}; **exposed** float "
        "intermediates depending on secret inputs (ids / cache), not attention scores, whose server value "
        f"equals the plaintext value (`allclose` rtol {RTOL:g} atol {ATOL:g}), out of the float "
        "intermediates compared by name; **names matched** original non-constant intermediates whose name "
        "exists in the server model / all of them; **attn** such matches that are attention scores / probabilities; "
        "**norm** such matches that are per-token scalars (last dim 1: RMS / LayerNorm statistics, "
        "unchanged by an orthogonal basis by design); "
        "**clear-only** matches computed only from the inputs the client leaves in clear (mask, positions, "
        "shapes); **KV** `present.*` outputs equal to plaintext; **residual** basis (size) of the space "
        "holding the embedding Gather's output; **greedy** `eecompile generate --prompt-ids` "
        f"({GREEDY_TOKENS} new tokens after a {len(GREEDY_PROMPT)}-token prompt) vs greedy decoding of the original "
        "by a plain onnxruntime loop: `equal` token for token.",
        "",
        "Export handling: `optimum` runs `main_export(task=\"text-generation-with-past\")` in a separate "
        "environment (transformers 4.57; optimum needs < 4.58), rebuilding the model there from the same tiny "
        "config and loading the same `model.safetensors` (GPT-NeoX's `embed_out` ↔ `lm_head` key renamed), "
        "eager attention, opset 18; `dynamo20`/`dynamo23`/`legacy17` export `input_ids, attention_mask → logits` "
        "without cache (sdpa attention; eager is the recorded fallback, needed nowhere in this run). "
        "The dynamo opset-23 exports use `RotaryEmbedding-23` with a batch-1 cos/sin cache, which onnxruntime "
        "rejects at batch > 1 for the rotary architectures, so those cells are measured at batch 1 (`b1`).",
        "",
        "| arch | exporter | compile | verification | exact (measured) | names matched | exposed | attn | norm "
        "| clear-only | KV | residual | greedy | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = cell_summary(row)
        status = c["status"].replace("|", "\\|")
        lines.append(f"| {row['arch']} | {row['exporter']} | {c['compile']} | {c['verification']} | {c['exact']} | "
                     f"{c['matched']} | {c['exposed']} | {c['attn']} | {c['norm']} | {c['clear']} | {c['kv']} | {c['residual']} | "
                     f"{c['greedy']} | {status} |")
    lines += ["", "## Spaces per basis (report.json)", "", "| arch | exporter | spaces per basis |", "|---|---|---|"]
    for row in rows:
        rep = row.get("report") or {}
        if rep.get("spaces_per_basis"):
            per = ", ".join(f"{k} {v}" for k, v in sorted(rep["spaces_per_basis"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {row['arch']} | {row['exporter']} | {per} |")
    lines += ["", "## Exposed tensors (op[tag] × count; first names)", ""]
    for row in rows:
        expo = row.get("exposure") or {}
        if expo.get("exposed"):
            ops = ", ".join(f"{k} ×{v}" for k, v in sorted(expo["exposed_ops"].items(), key=lambda kv: -kv[1]))
            names = ", ".join(f"`{e['name']}`" for e in expo["exposed"] if e["tag"] == "secret")
            lines.append(f"- **{row['arch']} / {row['exporter']}**: {ops}" +
                         (f"; secret: {names}" if names else ""))
        if expo.get("present_equal_names"):
            lines.append(f"  - KV outputs equal to plaintext: {', '.join(expo['present_equal_names'])}")
    (results / "decoder_matrix.md").write_text("\n".join(lines) + "\n")
    if getattr(args, "results_md", None) and getattr(args, "final", False):
        command = "python benchmarks/decoder_matrix.py --out " + str(args.out)
        if args.archs != ",".join(_all_names()[0]):
            command += f" --archs {args.archs}"
        if args.exporters != ",".join(_all_names()[1]):
            command += f" --exporters {args.exporters}"
        update_results_md(args.results_md, results_section(rows, meta, command))


def _all_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from eecompile.models.hf_decoders import ARCHS, EXPORTERS

    return ARCHS, EXPORTERS


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or, with ``--cell``, one cell, printing its JSON row)."""
    from eecompile.models.hf_decoders import ARCHS, EXPORTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for exports and compiled models")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per arch × exporter (default 1200)")
    parser.add_argument("--retry-failed", action="store_true", help="retry exports recorded as failed")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json/.md go")
    parser.add_argument("--cell", nargs=2, metavar=("ARCH", "EXPORTER"), help=argparse.SUPPRESS)
    parser.add_argument("--results-md", type=Path, metavar="RESULTS.md",
                        help="also write the condensed section into this file (e.g. benchmarks/RESULTS.md) at the end")
    parser.add_argument("--commit", help="the commit the code was checked out at (default: git rev-parse HEAD)")
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.cell:
        row = run_cell(args.out, args.cell[0], args.cell[1], args.key, args.retry_failed)
        print("CELL-JSON " + json.dumps(row, default=str), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    key = args.out / "matrix.key"
    subprocess.run([sys.executable, "-m", "eecompile", "keygen", str(key), "--force"], check=True,
                   capture_output=True, cwd=str(REPO))
    rows = []
    for arch in args.archs.split(","):
        for exporter in args.exporters.split(","):
            start = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--cell", arch, exporter,
                   "--key", str(key)] + (["--retry-failed"] if args.retry_failed else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=str(REPO),
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("CELL-JSON ")), None)
                row = (json.loads(line[len("CELL-JSON "):]) if line else
                       {"arch": arch, "exporter": exporter, "error": f"rc {proc.returncode}: {_last_line(proc.stderr)}"})
            except subprocess.TimeoutExpired:
                row = {"arch": arch, "exporter": exporter, "error": f"timed out after {args.timeout:.0f}s"}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            c = cell_summary(row)
            print(f"{arch}/{exporter} ({row['seconds']}s): compile {c['compile']}, verification {c['verification']}, "
                  f"exact {c['exact']}, exposed {c['exposed']} attn {c['attn']} norm {c['norm']} clear {c['clear']} "
                  f"kv {c['kv']}, "
                  f"residual {c['residual']}, greedy {c['greedy']} {c['status'][:200]}", flush=True)
            write_results(rows, args, args.results)
    args.final = True
    write_results(rows, args, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
