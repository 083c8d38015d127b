"""The lint report: the analysis made readable (JSON for machines, text and Markdown for people).

Schema (``report.to_dict()``)::

    {"model": str, "spaces": [{name, size, basis, blocks, limited_by: {node, op_type, reason} | null,
                                tensors: [str]}],
     "inputs": [{name, protection}], "outputs": [{name, protection}],
     "unsupported_ops": [{node, op_type, domain}], "weaknesses": [str], "policies": [str],
     "summary": {basis: count}}
"""

from __future__ import annotations

from collections import Counter

from eecompile.passes.analyze import Analysis
from eecompile.passes.annotations import IndexValues, Protected
from eecompile.passes.normalize import NormalizeResult
from eecompile.passes.plan import describe
from eecompile.passes.spaces import BasisClass, Ref

BASIS_ORDER = ["orthogonal", "ones-orthogonal", "invertible", "block-invertible", "complex-pairs", "monomial",
               "signed-permutation", "permutation", "clear"]


def _space_entry(analysis: Analysis, root: int) -> dict:
    spaces = analysis.ctx.spaces
    leaf = spaces.leaves[root]
    blocks = spaces.expand((Ref(root),))
    classes = [spaces.cls(b) for b in blocks]
    weakest = max(classes, key=lambda c: BASIS_ORDER.index(describe(c)))
    basis = describe(weakest, split=len(blocks) > 1)
    limit = None
    for b in [Ref(root), *blocks]:
        for cls, lim in reversed(spaces.root_leaf(b).limits):
            if cls == weakest:
                limit = lim
                break
        if limit:
            break
    if limit is None and len(blocks) > 1:
        limit = spaces.root_leaf(Ref(root)).split_by
    tensors = list(leaf.tensors)
    for b in blocks:
        tensors.extend(t for t in spaces.root_leaf(b).tensors if t not in tensors)
    return {
        "name": leaf.name,
        "size": leaf.size,
        "basis": basis,
        "class": weakest.value,
        "blocks": len(blocks),
        "limited_by": None if limit is None else {"node": limit.node, "op_type": limit.op_type,
                                                  "reason": limit.reason},
        "tensors": tensors,
    }


def build_report(analysis: Analysis, normalized: NormalizeResult, model_name: str,
                 boundary=None) -> dict:
    """The report dictionary for an analysed model (``boundary``: the insert pass's spec)."""
    spaces = analysis.ctx.spaces
    entries = [_space_entry(analysis, r) for r in spaces.top_roots()]
    entries = [e for e in entries if e["tensors"] or e["basis"] != "clear"]
    io = {}
    for side, tensors in (("inputs", analysis.mg.graph.inputs), ("outputs", analysis.mg.graph.outputs)):
        rows = []
        for i, t in enumerate(tensors):
            if boundary is not None:
                protection = getattr(boundary, side)[i].protection
            else:
                protection = _protection(analysis, t)
            rows.append({"name": t.name, "protection": protection})
        io[side] = rows
    policies = list(analysis.policies)
    if normalized.gains_folded:
        policies.append(f"norm gains folded into the following linear layers: {len(normalized.gains_folded)} "
                        "(lets normalised spaces take orthogonal bases)")
    if normalized.transposes_folded:
        policies.append("constant transposes folded into new initializers (a tied embedding/LM head is untied: "
                        f"{', '.join(normalized.transposes_folded)})")
    if normalized.clones:
        policies.append(f"{normalized.clones} shared initializer uses cloned so each can be folded on its own")
    return {
        "model": model_name,
        "spaces": entries,
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "unsupported_ops": [{"node": u.node, "op_type": u.op_type, "domain": u.domain} for u in analysis.unsupported],
        "weaknesses": _weaknesses(analysis, entries),
        "policies": policies,
        "summary": dict(Counter(e["basis"] for e in entries)),
    }


def _protection(analysis: Analysis, tensor) -> str:
    if tensor.name in analysis.state_inputs or tensor.name in analysis.state_outputs:
        return "server-side state (ciphertext, passed through)"
    ann = analysis.ctx.get(tensor)
    spaces = analysis.ctx.spaces
    if isinstance(ann, IndexValues):
        if spaces.cls(ann.ref) == BasisClass.CLEAR:
            return "clear"
        return f"permuted index values ({spaces.size(ann.ref)} classes)"
    if isinstance(ann, Protected):
        classes = {describe(spaces.cls(r)) for r in spaces.expand(ann.refs)}
        return f"basis change on axis {ann.axis}: {', '.join(sorted(classes))}"
    return "clear"


def _weaknesses(analysis: Analysis, entries: list[dict]) -> list[str]:
    out = []
    ctx = analysis.ctx
    if any(isinstance(ctx.get(t), IndexValues) for t in analysis.mg.graph.inputs):
        out.append("token ids are protected only by a vocabulary permutation (a substitution cipher): frequency "
                   "analysis of encrypted traffic recovers it, a language model's server can sample its own "
                   "ciphertext to do the same, and re-keying does not help (old and new weights link the keys); "
                   "measure it with `eecompile audit OUT_DIR` (benchmarks/RESULTS.md#audit-what-the-server-can-recover-trained-tinylm)")
    if any(e["basis"] in ("orthogonal", "ones-orthogonal") for e in entries):
        out.append("orthogonal bases keep row norms and Gram matrices: a server that knows the public base model, "
                   "or the one a fine-tune started from, matches the embedding rows, recovers the vocabulary and "
                   "the basis, then inverts hidden states; measure it with `eecompile audit OUT_DIR --base-model "
                   "MODEL.onnx` (benchmarks/RESULTS.md#audit-what-the-server-can-recover-trained-tinylm)")
    if any(e["basis"] in ("permutation", "signed-permutation", "monomial") for e in entries):
        out.append("permutation-type bases hide which coordinate is which, not the multiset of values")
    if any(n.op in ("Softmax",) for n in analysis.mg.nodes):
        out.append("attention patterns (softmax scores) are computed in clear on the server")
    if any(n.op in ("Conv", "MaxPool", "AveragePool") for n in analysis.mg.nodes):
        out.append("spatial layout (pixel positions) is not protected; only channels are")
    if any(n.op in ("ArgMax", "ArgMin", "TopK") for n in analysis.mg.nodes):
        out.append("ArgMax/ArgMin/TopK over a permuted axis break exact ties by permuted position, so a tied "
                   "result may differ from the plaintext one (ties between distinct float scores are rare)")
    if analysis.unsupported:
        out.append(f"{len(analysis.unsupported)} node(s) without an op rule left their spaces in clear")
    clear = [e["name"] for e in entries if e["basis"] == "clear"]
    if clear:
        out.append(f"{len(clear)} space(s) stay in clear")
    out.append("shapes, sequence lengths and timing are visible to the server")
    return out


def render_text(report: dict) -> str:
    """A terminal table: one row per space, then I/O, unsupported ops and weaknesses."""
    lines = [f"eecompile lint: {report['model']}", ""]
    summary = ", ".join(f"{report['summary'][b]} {b}" for b in BASIS_ORDER if b in report["summary"])
    lines.append(f"spaces: {len(report['spaces'])}" + (f" ({summary})" if summary else ""))
    lines.append("")
    header = ("space", "size", "basis", "limited by")
    rows = [(s["name"], str(s["size"]) + (f" ({s['blocks']} blocks)" if s["blocks"] > 1 else ""), s["basis"],
             "-" if not s["limited_by"] else f"{s['limited_by']['op_type']} {s['limited_by']['node']}: "
                                             f"{s['limited_by']['reason']}") for s in report["spaces"]]
    widths = [min(48, max(len(r[i]) for r in [header, *rows])) for i in range(3)]
    for r in [header, *rows]:
        name = r[0] if len(r[0]) <= widths[0] else "…" + r[0][-(widths[0] - 1):]
        lines.append(f"{name:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    lines.append("")
    for side in ("inputs", "outputs"):
        lines.append(f"{side}:")
        lines.extend(f"  {io['name']}: {io['protection']}" for io in report[side])
    if report["unsupported_ops"]:
        lines.append("unsupported ops (their spaces stay clear):")
        lines.extend(f"  {u['node']} ({u['domain']}::{u['op_type']})" for u in report["unsupported_ops"])
    if report["policies"]:
        lines.append("policies:")
        lines.extend(f"  - {p}" for p in report["policies"])
    lines.append("weaknesses:")
    lines.extend(f"  - {w}" for w in report["weaknesses"])
    return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
    """The report as Markdown for people."""
    out = [f"# eecompile report: `{report['model']}`", "", "## Spaces", "",
           "| space | size | basis | limited by |", "|---|---|---|---|"]
    for s in report["spaces"]:
        lim = "—" if not s["limited_by"] else (f"`{s['limited_by']['node']}` ({s['limited_by']['op_type']}): "
                                               f"{s['limited_by']['reason']}")
        size = f"{s['size']}" + (f" ({s['blocks']} blocks)" if s["blocks"] > 1 else "")
        out.append(f"| `{s['name']}` | {size} | {s['basis']} | {lim} |")
    for side in ("inputs", "outputs"):
        out += ["", f"## {side.capitalize()}", ""]
        out += [f"- `{io['name']}`: {io['protection']}" for io in report[side]]
    out += ["", "## Unsupported ops", ""]
    out += [f"- `{u['node']}` ({u['domain']}::{u['op_type']})" for u in report["unsupported_ops"]] or ["none"]
    out += ["", "## Policies", ""] + ([f"- {p}" for p in report["policies"]] or ["none"])
    out += ["", "## Weaknesses", ""] + [f"- {w}" for w in report["weaknesses"]]
    return "\n".join(out) + "\n"
