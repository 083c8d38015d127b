"""The encoder matrix: tiny Hugging Face / diffusers encoders, vision and diffusion models × four exporters.

    python benchmarks/encoder_matrix.py --out /tmp/encoder_matrix [--archs bert,vit] \
        [--exporters dynamo20,dynamo23,legacy17,optimum] [--timeout 900] [--results-md benchmarks/RESULTS.md]

For every architecture × exporter (:mod:`eecompile.models.hf_encoders`) the script exports the model
(cached under ``--out``), runs ``eecompile compile MODEL --key K --out DIR`` as a subprocess (one key
for the run; verification on, as by default) and reads from the compile's ``report.json``:

* **verification** — run (never skipped) and its max relative error; a cell is *exact* at ≤ 1e-5;
* **exposed** — the compile's exposure measure: intermediate float tensors the server computes equal
  to the plaintext run, attention scores and per-token statistics excluded by the measure itself.
  Each exposed tensor is also classed here as ``clear-input`` when it depends only on inputs the
  client leaves in clear (a diffusion timestep) and constants — what the server is given anyway;
* **no rule** — nodes of ops without a rule (``unsupported_ops``), by op type;
* **clear inputs** — content inputs the client sends in clear (token ids never allowed; masks,
  positions and segment ids are public by design), each with why: a float scalar per
  sample that reaches the model only through a nonlinear function of itself (``Sin``/``Cos`` of a
  diffusion timestep; any basis of a one-element axis is a scale, revealed by the first product
  with the frequency table) is *allowed*; any other clear float input is a failure;
* **residual** — the residual stream's class: the weakest basis class over the spaces of the
  inputs of the residual ``Add`` nodes (a tensor plus something computed from it — not, say, rotary's
  ``x·cos + rotate_half(x)·sin`` — both operands protected by some space), or,
  without such an Add, of the inputs of the normalisation ops.

Each cell runs in its own subprocess with a timeout.  Writes ``benchmarks/results/encoder_matrix.json``
and ``.md``; with ``--results-md`` also the section "Real exports: encoders, vision, diffusion" of
that file (between ``<!-- encoder-matrix -->`` markers), with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
for _p in (str(REPO), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from decoder_matrix import _last_line, code_version  # noqa: E402 - benchmarks/ on the path

EXACT = 1e-5
"""Largest verified relative error a cell may have (float32)."""
ORDER = ["orthogonal", "ones-orthogonal", "invertible", "block-invertible", "monomial", "signed-monomial",
         "signed-permutation", "permutation", "clear"]
"""Basis classes from strongest to weakest (report.json names); unknown names sort as weakest."""
NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "InstanceNormalization",
            "GroupNormalization", "BatchNormalization"}
NONLINEAR_OF_ITSELF = {"Sin", "Cos"}
"""Ops through which a clear scalar input may enter (its sinusoidal embedding)."""
PASS_THROUGH = {"Cast", "Unsqueeze", "Reshape", "Expand", "Mul", "Div", "Identity", "Squeeze", "Flatten", "Tile",
                "Concat", "Slice", "Gather"}
"""Ops a clear scalar may pass (with constants only) on its way to ``Sin``/``Cos``."""
SECTION_START, SECTION_END = "<!-- encoder-matrix -->", "<!-- /encoder-matrix -->"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _rank(basis: str) -> int:
    return ORDER.index(basis) if basis in ORDER else len(ORDER)


# --- facts about one compile ----------------------------------------------------------------


class ModelFacts:
    """Producers, consumers, constants and input types of an ONNX model's main graph (structure only)."""

    def __init__(self, path: Path) -> None:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        g = proto.graph
        self.nodes = list(g.node)
        self.constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant"
                                                             for o in n.output}
        self.inputs = {i.name: i.type.tensor_type.elem_type for i in g.input if i.name not in self.constants}
        self.input_shapes = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                      for d in i.type.tensor_type.shape.dim] for i in g.input}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(n)
        self.float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                            onnx.TensorProto.BFLOAT16}

    def depends_only_on(self, allowed: set[str]) -> set[str]:
        """Every tensor computed from ``allowed`` inputs, constants and shapes only (no other graph input)."""
        other = set(self.inputs) - allowed
        tainted = set(other)
        for n in self.nodes:  # topological order
            if n.op_type in ("Shape", "Size"):
                continue
            if any(x in tainted for x in n.input if x):
                tainted.update(o for o in n.output if o)
        every = {o for n in self.nodes for o in n.output if o}
        return every - tainted

    def ancestors(self, name: str) -> set[str]:
        """Every tensor ``name`` is computed from (not through shapes), ``name`` excluded."""
        if not hasattr(self, "_producer"):
            self._producer = {o: n for n in self.nodes for o in n.output if o}
        seen: set[str] = set()
        frontier = [name]
        while frontier:
            node = self._producer.get(frontier.pop())
            if node is None or node.op_type in ("Shape", "Size"):
                continue
            for x in node.input:
                if x and x not in seen:
                    seen.add(x)
                    frontier.append(x)
        return seen

    def is_skip_add(self, node: Any) -> bool:
        """Whether ``node`` is a residual connection: an Add of a tensor and something computed from it."""
        if node.op_type != "Add" or len(node.input) != 2:
            return False
        a, b = node.input
        return a in self.ancestors(b) or b in self.ancestors(a)

    def enters_through_sin_cos(self, name: str) -> bool:
        """Whether input ``name`` reaches every non-trivial consumer through ``Sin``/``Cos`` of itself.

        Walks forward from the input through :data:`PASS_THROUGH` ops whose other operands are
        constants or shapes; true when every path ends in ``Sin``/``Cos`` (and at least one does).
        """
        frontier, seen, ends = [name], set(), 0
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in self.consumers.get(t, []):
                if c.op_type in NONLINEAR_OF_ITSELF:
                    ends += 1
                    continue
                if c.op_type in ("Shape", "Size"):
                    continue
                if c.op_type not in PASS_THROUGH:
                    return False
                others = [x for x in c.input if x and x != t]
                if c.op_type not in ("Concat",) and any(x in self.inputs for x in others):
                    return False
                frontier.extend(o for o in c.output if o)
        return ends > 0


METADATA_INPUT = re.compile(r"mask|position|token_type|segment", re.IGNORECASE)
"""Integer inputs that are public by design (masks, positions, segment ids)."""


def clear_float_inputs(report: dict, facts: ModelFacts) -> list[dict[str, Any]]:
    """Content inputs the client sends in clear, each ``{"name", "allowed", "why"}``: float inputs, and
    integer ones other than masks / positions / segment ids (token ids left clear are never allowed)."""
    out = []
    protection = {i["name"]: i["protection"] for i in report.get("inputs", [])}
    for name, elem in facts.inputs.items():
        if protection.get(name, "clear") != "clear":
            continue
        if elem not in facts.float_types:
            if not METADATA_INPUT.search(name):
                out.append({"name": name, "allowed": False, "why": f"{name} (integer ids) is left in clear"})
            continue
        shape = facts.input_shapes.get(name, [])
        scalar = len(shape) <= 1
        if scalar and facts.enters_through_sin_cos(name):
            out.append({"name": name, "allowed": True, "why": (
                f"{name} (shape {shape or 'scalar'}) enters only through Sin/Cos of itself: a one-element axis "
                "has only scales as bases, and its first product with the constant frequency table reveals it")})
        else:
            out.append({"name": name, "allowed": False, "why": f"{name} (shape {shape}) is left in clear"})
    return out


def residual_class(report: dict, facts: ModelFacts) -> dict[str, Any]:
    """The weakest basis class over the residual stream's spaces and the ops limiting it."""
    space_of: dict[str, dict] = {}
    for s in report.get("spaces", []):
        for t in s["tensors"]:
            cur = space_of.get(t)
            if cur is None or _rank(s["basis"]) > _rank(cur["basis"]):
                space_of[t] = s
    tensors: set[str] = set()
    for n in facts.nodes:
        if n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            if (a not in facts.constants and b not in facts.constants and a in space_of and b in space_of
                    and facts.is_skip_add(n)):
                tensors.update((a, b))
    source = "residual Add inputs"
    if not tensors:
        tensors = {n.input[0] for n in facts.nodes if n.op_type in NORM_OPS and n.input and n.input[0] in space_of}
        source = "normalisation inputs"
    if not tensors:
        return {"class": "clear", "source": "none", "limited_by": ["no residual Add or norm input is protected"]}
    found = {space_of[t]["name"]: space_of[t] for t in tensors}.values()
    weakest = max(found, key=lambda s: _rank(s["basis"]))
    limits = sorted({f"{s['limited_by']['op_type']} {s['limited_by']['node']}" for s in found
                     if s["basis"] == weakest["basis"] and s.get("limited_by")})
    return {"class": weakest["basis"], "source": source, "spaces": len(list(found)), "limited_by": limits[:4]}


def exposure_facts(report: dict, facts: ModelFacts) -> dict[str, Any]:
    """The compile's exposure measure, each exposed tensor classed ``clear-input`` or ``secret``."""
    expo = report.get("exposure") or {}
    if not expo.get("checked"):
        return {"checked": False, "detail": expo.get("detail")}
    clear_inputs = {i["name"] for i in report.get("inputs", []) if i["protection"] == "clear"}
    from_clear = facts.depends_only_on(clear_inputs)
    exposed = [e for e in expo.get("exposed", []) if e["kind"] == "intermediate"]
    secret = [e for e in exposed if e["tensor"] not in from_clear]
    return {"checked": True, "compared": expo.get("intermediates_compared"), "exposed": len(exposed),
            "exposed_secret": len(secret), "exposed_clear_input": len(exposed) - len(secret),
            "secret_ops": dict(Counter(e["op_type"] for e in secret)),
            "secret_first": [e["tensor"] for e in secret[:6]], "excluded": expo.get("excluded", {}),
            "state_exposed": expo.get("state_outputs_exposed", 0)}


def report_facts(out_dir: Path, model: Path) -> dict[str, Any]:
    """Everything the table needs from one compile's ``report.json`` and the original model."""
    report = json.loads((out_dir / "report.json").read_text())
    facts = ModelFacts(model)
    ver = report.get("verification") or {}
    return {
        "verification": {"checked": bool(ver.get("checked")), "max_relative_error": ver.get("max_relative_error"),
                         "detail": ver.get("detail")},
        "exposure": exposure_facts(report, facts),
        "unsupported": dict(Counter(u["op_type"] for u in report.get("unsupported_ops", []))),
        "clear_float_inputs": clear_float_inputs(report, facts),
        "residual": residual_class(report, facts),
        "spaces_per_basis": report.get("summary", {}),
    }


# --- one cell (runs in a subprocess) ----------------------------------------------------


def run_cell(root: Path, arch: str, exporter: str, key: Path, retry_failed: bool = False) -> dict[str, Any]:
    """Export, compile and read one arch × exporter; every stage's failure is recorded, not raised."""
    import onnx

    from eecompile.models import hf_encoders as he

    row: dict[str, Any] = {"arch": arch, "exporter": exporter}
    exp = he.export_one(root, arch, exporter, retry_failed=retry_failed)
    row["export"] = {**exp.to_dict(), "error": exp.error and ANSI.sub("", exp.error),
                     "note": ANSI.sub("", exp.note)}
    if not exp.path:
        return row
    model = Path(exp.path)
    proto = onnx.load(str(model), load_external_data=False)
    row["export"].update(opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
                         nodes=len(proto.graph.node))
    del proto
    out_dir = model.parent / "compiled"
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "eecompile", "compile", str(model), "--key", str(key), "--out", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    row["compile"] = {"rc": proc.returncode, "last_stderr": _last_line(proc.stderr),
                      "seconds": round(time.perf_counter() - start, 2)}
    if proc.returncode == 70:  # internal error: rerun with the traceback to record where it happened
        shutil.rmtree(out_dir, ignore_errors=True)
        debug = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO),
                               env={**os.environ, "EECOMPILE_DEBUG": "1"})
        frames = [line.strip() for line in debug.stderr.splitlines() if line.strip().startswith("File ")]
        row["compile"]["where"] = frames[-1] if frames else ""
    if proc.returncode != 0 or not (out_dir / "report.json").is_file():
        return row
    try:
        row["report"] = report_facts(out_dir, model)
    except Exception as exc:  # noqa: BLE001 - recorded
        row["report"] = {"error": he.error_line(exc)}
    return row


# --- the table --------------------------------------------------------------------------


def cell_status(row: dict[str, Any]) -> dict[str, Any]:
    """The table's columns for one row and whether the cell meets the bar (``ok``)."""
    cols = {k: "—" for k in ("compile", "verification", "exposed", "no_rule", "clear_inputs", "residual")}
    exp = row.get("export", {})
    if row.get("error"):
        return {**cols, "ok": False, "na": False, "status": f"harness: {row['error']}"}
    if not exp.get("path"):
        na = "optimum exports diffusers" in (exp.get("error") or "")
        return {**cols, "ok": False, "na": na, "status": f"{'not exported' if na else 'export failed'}: {exp.get('error')}"}
    comp = row.get("compile", {})
    notes = [exp["note"]] if exp.get("note") else []
    if comp.get("rc") != 0:
        where = f" [{comp['where']}]" if comp.get("where") else ""
        return {**cols, "compile": str(comp.get("rc")), "ok": False, "na": False,
                "status": "; ".join(notes + [comp.get("last_stderr", "") + where])}
    rep = row.get("report", {})
    cols["compile"] = "0"
    if "error" in rep:
        return {**cols, "ok": False, "na": False, "status": f"report: {rep['error']}"}
    ver, expo = rep["verification"], rep["exposure"]
    err = ver.get("max_relative_error")
    exact = ver["checked"] and err is not None and err <= EXACT
    cols["verification"] = (f"{'yes' if exact else '**NO**'} {err:.1e}" if ver["checked"] and err is not None
                            else "**not run**")
    if not ver["checked"]:
        notes.append(f"verification: {ver.get('detail')}")
    if expo.get("checked"):
        cols["exposed"] = f"{expo['exposed_secret']}/{expo['compared']}"
        if expo["exposed_clear_input"]:
            cols["exposed"] += f" (+{expo['exposed_clear_input']} from clear inputs)"
        if expo["exposed_secret"]:
            notes.append("exposed: " + ", ".join(f"{k}×{v}" for k, v in expo["secret_ops"].items()))
    else:
        cols["exposed"] = "not measured"
        notes.append(f"exposure: {expo.get('detail')}")
    unsupported = rep["unsupported"]
    cols["no_rule"] = str(sum(unsupported.values())) + (
        " (" + ", ".join(f"{k}×{v}" for k, v in sorted(unsupported.items())) + ")" if unsupported else "")
    clear = rep["clear_float_inputs"]
    cols["clear_inputs"] = ", ".join(f"{c['name']}{'†' if c['allowed'] else ' **(not allowed)**'}"
                                     for c in clear) or "none"
    res = rep["residual"]
    cols["residual"] = res["class"]
    if res["class"] not in ("orthogonal", "ones-orthogonal", "invertible") and res.get("limited_by"):
        cols["residual"] += f" ({res['limited_by'][0]})"
    ok = (exact and expo.get("checked") and expo["exposed_secret"] == 0 and not unsupported
          and all(c["allowed"] for c in clear))
    return {**cols, "ok": bool(ok), "na": False, "status": "; ".join(notes)}


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of every row."""
    lines = ["| model | exporter | compile | verified (max rel. err) | exposed | ops without a rule | "
             "clear inputs | residual stream | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = cell_status(row)
        status = c["status"].replace("|", "\\|")[:300]
        lines.append(f"| {row['arch']} | {row['exporter']} | {c['compile']} | {c['verification']} | {c['exposed']} | "
                     f"{c['no_rule']} | {c['clear_inputs']} | {c['residual']} | {status} |")
    return lines


def totals(rows: list[dict[str, Any]]) -> str:
    """One line: cells meeting the bar, not exportable, failing."""
    stats = [cell_status(r) for r in rows]
    ok = sum(s["ok"] for s in stats)
    na = sum(s["na"] for s in stats)
    return (f"**{ok} of {len(rows) - na} exported cells meet the bar** (compile exit 0, verification run, "
            f"≤ {EXACT:g}, no secret-dependent tensor exposed, no op without a rule, no clear content input but "
            f"allowed ones); {na} cells not exportable by that exporter.")


def results_section(rows: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    """The RESULTS.md section."""
    clear_why = next((c["why"] for r in rows for c in (r.get("report") or {}).get("clear_float_inputs", [])
                      if c.get("allowed")), None)
    lines = [SECTION_START, "## Real exports: encoders, vision, diffusion", "",
             f"**Command:** `{command}` (exports cached under the folder given). **Code:** commit `{meta['commit']}`; "
             f"measured {meta['date']} UTC, torch {meta['torch']}, transformers {meta['transformers']}, diffusers "
             f"{meta['diffusers']}, onnxruntime {meta['onnxruntime']}, CPU. Raw: `results/encoder_matrix.json`.", "",
             "Tiny random-weight models (`eecompile/models/hf_encoders.py`: hidden 32, 2 layers, 4 heads, vocabulary "
             "100, 32×32 images, a two-level diffusers UNet2DModel and AutoencoderKL decoder; noise on every "
             "parameter), exported with `torch.onnx.export(dynamo=True)` at the default opset and at 23, the "
             "TorchScript exporter at opset 17, and optimum's `main_export` (transformers 4.57, second venv). "
             "Each compiled by `eecompile compile` with verification.", "",
             "Columns: **verified** the compile's own check (report.json), exact at ≤ 1e-5; **exposed** the "
             "compile's exposure measure (attention scores and per-token statistics excluded by it): tensors "
             "that depend on a protected input and equal the plaintext run, out of those compared; `+N from clear "
             "inputs` are those computed only from inputs the client sends in clear (the server holds them anyway); "
             "**ops without a rule** nodes the analysis clears; **clear inputs** content inputs sent in clear (ids never "
             "allowed; masks and positions are public; `†` = allowed, see below); "
             "**residual stream** the weakest class over the spaces of the residual (skip-connection) Adds' inputs (norm inputs where "
             "there is no residual Add), with the op binding it when weaker than invertible.", ""]
    if clear_why:
        lines += [f"† {clear_why}.", ""]
    lines += table(rows) + ["", totals(rows), SECTION_END]
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, section: str) -> None:
    """Replace the ``<!-- encoder-matrix -->`` section of ``path`` with ``section`` (append it if absent)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "exports": str(args.out),
            "torch": version("torch"), "transformers": version("transformers"), "diffusers": version("diffusers"),
            "onnxruntime": version("onnxruntime"), "commit": getattr(args, "commit", None) or code_version()}


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, final: bool) -> None:
    """``encoder_matrix.json`` / ``.md`` under ``--results``; at the end the RESULTS.md section if asked."""
    from eecompile.models.hf_encoders import ARCHS, EXPORTERS

    meta = _meta(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "encoder_matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                                 default=str) + "\n")
    command = f"python benchmarks/encoder_matrix.py --out {args.out}"
    if args.archs != ",".join(ARCHS):
        command += f" --archs {args.archs}"
    if args.exporters != ",".join(EXPORTERS):
        command += f" --exporters {args.exporters}"
    (args.results / "encoder_matrix.md").write_text(results_section(rows, meta, command))
    if final and args.results_md:
        update_results_md(args.results_md, results_section(rows, meta, command + " --results-md " + str(args.results_md)))


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or, with ``--cell``, one cell, printing its JSON row)."""
    from eecompile.models.hf_encoders import ARCHS, EXPORTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for exports and compiled models")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per arch × exporter (default 900)")
    parser.add_argument("--retry-failed", action="store_true", help="retry exports recorded as failed")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json/.md go")
    parser.add_argument("--results-md", type=Path, metavar="RESULTS.md",
                        help="also write the section into this file (e.g. benchmarks/RESULTS.md) at the end")
    parser.add_argument("--commit", help="the commit the code was checked out at (default: git rev-parse HEAD)")
    parser.add_argument("--cell", nargs=2, metavar=("ARCH", "EXPORTER"), help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    unknown = [a for a in args.archs.split(",") if a not in ARCHS] + \
              [e for e in args.exporters.split(",") if e not in EXPORTERS]
    if unknown:
        print(f"error: unknown arch/exporter {', '.join(unknown)} (archs: {', '.join(ARCHS)}; exporters: "
              f"{', '.join(EXPORTERS)})", file=sys.stderr)
        return 2
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
            c = cell_status(row)
            print(f"{arch}/{exporter} ({row['seconds']}s) {'OK' if c['ok'] else 'n/a' if c['na'] else 'FAIL'}: "
                  f"compile {c['compile']}, verified {c['verification']}, exposed {c['exposed']}, no rule "
                  f"{c['no_rule']}, clear {c['clear_inputs']}, residual {c['residual']} {c['status'][:200]}",
                  flush=True)
            write_results(rows, args, final=False)
    write_results(rows, args, final=True)
    print(totals(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
