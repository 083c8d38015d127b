"""The lint report: the analysis made readable (JSON for machines, text and Markdown for people).

Schema (``report.to_dict()``)::

    {"model": str, "warnings": [str],   # e.g. KV-cache outputs the server holds in clear
     "spaces": [{name, size, basis, class, blocks, limited_by: {node, op_type, reason} | null,
                 lift: {kind, how} | null,   # weak/clear spaces: a re-export option, a policy, inherent ...
                 bases_log2: float | null,   # log2 of how many bases its class allows; null: a continuum
                 groups_permuted: str | null,   # the grouped Conv whose groups move as whole blocks here
                 tensors: [str]}],
     "inputs": [{name, protection}], "outputs": [{name, protection}],
     "validity": str (which checks the model passed), "unsupported_ops": [{node, op_type, domain}],
     "weaknesses": [str], "policies": [str],
     "summary": {basis: count}}

A compile adds ``verification`` ({checked, max_relative_error, detail, tolerance: {value, dtype, depth,
unit_roundoff, floor, rule, text} | null}) and ``exposure``
(see :mod:`eecompile.passes.exposure`).
"""

from __future__ import annotations

import math
from collections import Counter

from eecompile.passes.analyze import Analysis
from eecompile.passes.annotations import IndexValues, Protected
from eecompile.passes.normalize import NormalizeResult
from eecompile.passes.plan import describe
from eecompile.passes.rules.quantized import quantized_weight_policies
from eecompile.passes.spaces import BasisClass, Ref, pair_layout

BASIS_ORDER = ["orthogonal", "ones-orthogonal", "invertible", "block-invertible", "complex-pairs", "pair-rotations",
               "pair-scaled-quarter-turns", "monomial", "pair-scales", "pair-positive-scales", "signed-permutation",
               "pair-quarter-turns", "pair-signs", "permutation", "clear"]


WEAK_BASES = ("clear", "permutation", "signed-permutation", "monomial", "pair-scaled-quarter-turns", "pair-scales",
              "pair-positive-scales", "pair-quarter-turns", "pair-signs")
"""Bases the report calls weak: each gets a ``lift`` entry saying what would make it stronger."""

FEW_BASES_LOG2 = 32
"""Spaces whose class allows fewer bases than this (log2) are named in the weaknesses: enumerable."""

RE_EXPORT, POLICY, INHERENT, FOLLOWS, UNKNOWN = ("re-export", "policy", "inherent to the op",
                                                 "follows another space", "unknown")
_STATIC_SHAPES = ("re-export with constant reshape targets and static head sizes: the legacy exporter "
                  "(torch.onnx.export(dynamo=False), opset 17) or dynamo at opset 23, or constant-fold the "
                  "shape arithmetic (onnxsim) before compiling")
LIFT_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # (op type regex, reason regex, kind, what would lift it); the first match wins
    ("", r"rotary embedding", INHERENT,
     "RoPE commutes only with a complex scalar per frequency pair; a norm with a gain before it (q/k norm) "
     "narrows that to a quarter turn (1, i, -1, -i) or a sign per pair"),
    ("", r"per-head norm's gain", INHERENT,
     "one gain vector shared by all heads before RoPE: only a sign per frequency pair commutes with norm, "
     "gain and rotation (the decomposed norm allows quarter turns)"),
    (r"MatMulNBits", r"quanti[sz]", POLICY,
     "compile with --requantize: the quantised weights are re-quantised after a dense basis is folded in (not "
     "exact; compile measures the logit and greedy-token change against the original), or quantise after "
     "compiling the float model"),
    ("", r"no rule for op", RE_EXPORT, "re-export with the op decomposed into standard ONNX ops (or add an op "
                                       "rule to eecompile.passes.rules)"),
    ("", r"cannot follow the protected axis|reshape of a tensor with unknown shape|with computed (bounds|axes)"
         r"|with unknown axes|unknown rank", RE_EXPORT, _STATIC_SHAPES),
    ("", r"(split|slice) inside attention heads", RE_EXPORT,
     "re-export with separate q/k/v projections (unfuse the fused QKV weight)"),
    ("", r"its gain cannot be folded: ", POLICY,
     "the norm's gain reaches an op that is neither a linear layer nor a move of the feature axis (named in the "
     "reason), so it stays in the graph and must be permuted; `--policy rebase` moves it into one inserted d×d "
     "MatMul after the norm, or re-export with the gain applied where only linear layers read it"),
    ("", r"its gain is kept", FOLLOWS,
     "another op already permutes this space (see its other limits); once that is lifted the gain folds"),
    ("", r"per-coordinate constant|gain", POLICY,
     "fold the gain into what reads the normalised tensor: eecompile does so when it reaches only linear "
     "layers, ops that move the feature axis (Gather/Slice/Reshape/Transpose) and graph outputs (the client "
     "applies it); a tied embedding must be untied"),
    ("", r"tied|shares? the token-id permutation|vocabulary", INHERENT,
     "logits share the token-id permutation so generated ids feed back; only a permutation reads ids"),
    ("", r"token ids|index values|gather (along|from)", INHERENT,
     "a table lookup reads its indices in clear order: only a permutation of the table rows commutes"),
    ("", r"attention mask|rotary cos/sin|positions?", INHERENT, "masks and positions are public by design"),
    ("", r"clear (operand|part|activation)|with a clear|protected and clear", FOLLOWS,
     "lift the space of the clear operand first (see its row)"),
    ("", r"non-constant statistics", RE_EXPORT, "export in eval mode so BatchNormalization's statistics are constants"),
    ("", r"without a constant B|non-constant weight", RE_EXPORT, "export with constant weights"),
    ("", r"grouped/depthwise", INHERENT, "grouped convolutions mix only within a group: monomial within groups"),
    (r"Softmax|LogSoftmax|ArgMax|ArgMin|TopK|Hardmax", r"", INHERENT,
     "commutes only with permutations of the reduced axis"),
    (r"Relu|LeakyRelu|PRelu|MaxPool|Clip|Max|Min", r"", INHERENT,
     "commutes only with positive monomial bases (a permutation with positive scales)"),
    ("", r"elementwise nonlinear|commutes only with|squares|product of|quotient|reciprocal|cast of protected",
     INHERENT, "an elementwise nonlinearity or product commutes only with (signed, scaled) permutations"),
    ("", r"pooling|spatial", INHERENT, "spatial layout is visible to pooling"),
    ("", r"split into \d+ blocks", INHERENT, "per-head blocks: the basis is block-diagonal by design"),
)


def lift(limit: dict | None, basis: str) -> dict | None:
    """What would lift a weak or clear space: ``{kind, how}`` from :data:`LIFT_TABLE` (None if not weak)."""
    import re

    if basis not in WEAK_BASES:
        return None
    if limit is None:
        return {"kind": UNKNOWN, "how": "no limiting node was recorded"}
    for op_re, reason_re, kind, how in LIFT_TABLE:
        if op_re and not re.fullmatch(op_re, limit["op_type"] or ""):
            continue
        if reason_re and not re.search(reason_re, limit["reason"] or "", re.IGNORECASE):
            continue
        return {"kind": kind, "how": how}
    return {"kind": UNKNOWN, "how": f"no known remedy for {limit['op_type'] or 'this limit'}: {limit['reason']}"}


def rebase_hints(analysis: Analysis) -> dict[int, dict]:
    """``{space root: lift}`` for the weak spaces the ``rebase`` policy would lift, naming the binding ops and
    the cost (none once the policy was applied: its points are already in the graph)."""
    from eecompile.passes.rebase import rebase_points

    if any(p.startswith("policy rebase") for p in analysis.policies):
        return {}
    spaces = analysis.ctx.spaces
    by_root: dict[int, list] = {}
    for point in rebase_points(analysis):
        by_root.setdefault(spaces.find(Ref(point.space)).space, []).append(point)
    hints = {}
    for root, points in by_root.items():
        d = points[0].size
        ops = _names([f"{p.binding_op} '{p.binding_node}'" for p in points], 3)
        hints[root] = {"kind": POLICY, "how": (
            f"`--policy rebase` would make this dense at the cost of one {d}×{d} MatMul per binding op "
            f"({len(points)} here, after {ops}): the stream after each starts a fresh space that takes a dense "
            f"basis, measured side by side by `eecompile bench`; the default adds nothing")}
    return hints


def _space_entry(analysis: Analysis, root: int, hints: dict[int, dict] | None = None) -> dict:
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
    limited_by = None if limit is None else {"node": limit.node, "op_type": limit.op_type, "reason": limit.reason}
    return {
        "name": leaf.name,
        "size": leaf.size,
        "basis": basis,
        "class": weakest.value,
        "blocks": len(blocks),
        "limited_by": limited_by,
        "lift": _lift_with_hints(limited_by, basis, [root, *(b.space for b in blocks)], hints or {}),
        "bases_log2": bases_log2([(spaces.cls(b), spaces.size(b)) for b in blocks]),
        "groups_permuted": next((order.node for order in analysis.group_orders
                                 if {b.space for b in blocks} & {leaf for run in order.roots for leaf in run}), None),
        "tensors": tensors,
    }


def bases_log2(blocks: list[tuple[BasisClass, int]]) -> float | None:
    """log2 of how many bases the blocks' classes allow, when that number is finite (permutations, signs,
    quarter turns); None when a block draws from a continuum (dense bases, scales). A clear block counts 1."""
    total = 0.0
    for cls, size in blocks:
        layout = pair_layout(cls)
        if cls == BasisClass.CLEAR:
            continue
        if cls == BasisClass.PERMUTATION:
            total += math.lgamma(size + 1) / math.log(2)
        elif cls == BasisClass.SIGNED_PERMUTATION:
            total += math.lgamma(size + 1) / math.log(2) + size
        elif layout is not None and layout[1] == 1 and layout[2] in (1, 2, 3):  # unit modulus, discrete angle
            total += (size // 2) * {1: 2, 2: 1, 3: 0}[layout[2]]
        else:
            return None
    return round(total, 1)


def _lift_with_hints(limited_by: dict | None, basis: str, roots: list[int], hints: dict[int, dict]) -> dict | None:
    """The rebase hint for a space the policy would lift, else :func:`lift`'s table entry."""
    found = lift(limited_by, basis)
    if found is None:
        return None
    return next((hints[r] for r in roots if r in hints), found)


def build_report(analysis: Analysis, normalized: NormalizeResult, model_name: str,
                 boundary=None) -> dict:
    """The report dictionary for an analysed model (``boundary``: the insert pass's spec)."""
    spaces = analysis.ctx.spaces
    hints = rebase_hints(analysis)
    entries = [_space_entry(analysis, r, hints) for r in spaces.top_roots()]
    entries = [e for e in entries if e["tensors"] or e["basis"] != "clear"]
    io = {}
    for side, tensors in (("inputs", analysis.mg.graph.inputs), ("outputs", analysis.mg.graph.outputs)):
        rows = []
        for i, t in enumerate(tensors):
            transform = getattr(boundary, side)[i] if boundary is not None else None
            rows.append({"name": t.name, "protection": _protection(analysis, t, transform)})
        io[side] = rows
    policies = list(analysis.policies)
    if normalized.gains_folded:
        policies.append(f"norm gains folded into the following linear layers: {len(normalized.gains_folded)} "
                        "(lets normalised spaces take orthogonal bases)")
    gains = getattr(analysis, "gains", None)
    if gains is not None and gains.folded:
        outs = sorted(gains.output_gains)
        policies.append(f"norm gains folded through feature-preserving ops (Gather/Slice/Reshape/Transpose...) into "
                        f"the linear layers they reach: {len(gains.folded)}"
                        + (f"; the client multiplies the gain into output(s) {_names(outs)} after decrypting"
                           if outs else ""))
    if normalized.transposes_folded:
        policies.append("constant transposes folded into new initializers (a tied embedding/LM head is untied: "
                        f"{', '.join(normalized.transposes_folded)})")
    if normalized.parts_selected:
        policies.append(f"fused projections reshaped into (parts, heads) at once have each part selected before its "
                        f"head split ({len(normalized.parts_selected)} reshapes), so each part's heads are followed")
    if normalized.clones:
        policies.append(f"{normalized.clones} shared initializer uses cloned so each can be folded on its own")
    policies.extend(quantized_weight_policies(analysis.mg, analysis.ctx))
    return {
        "model": model_name,
        "warnings": _warnings(analysis, io),
        "spaces": entries,
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "validity": analysis.mg.validity.describe() if getattr(analysis.mg, "validity", None) else "onnx.checker",
        "unsupported_ops": [{"node": u.node, "op_type": u.op_type, "domain": u.domain} for u in analysis.unsupported],
        "weaknesses": _weaknesses(analysis, entries),
        "policies": policies,
        "summary": dict(Counter(e["basis"] for e in entries)),
    }


def _coverage(analysis: Analysis, ann) -> tuple[int, int, str, list[str]]:
    """``(clear units, units, unit name, basis names of the protected units)`` of an annotation.

    A headed annotation counts heads (a head is clear when every block of its basis is clear);
    a flat one counts the blocks of its axis. Unknown annotation kinds count as one clear unit.
    """
    spaces = analysis.ctx.spaces
    if isinstance(ann, IndexValues):
        cls = spaces.cls(ann.ref)
        return (int(cls == BasisClass.CLEAR), 1, "block", [] if cls == BasisClass.CLEAR else [describe(cls)])
    if isinstance(ann, Protected):
        if ann.head_axis is not None:
            units = [spaces.expand((r,)) for r in ann.refs]
            unit = "head"
        else:
            units = [(b,) for b in spaces.expand(ann.refs)]
            unit = "block"
        clear, classes = 0, set()
        for blocks in units:
            kinds = [spaces.cls(b) for b in blocks]
            if all(k == BasisClass.CLEAR for k in kinds):
                clear += 1
            classes.update(describe(k) for k in kinds if k != BasisClass.CLEAR)
        return clear, len(units), unit, sorted(classes)
    return 1, 1, "block", []


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("s" if n != 1 else "")


def _protection(analysis: Analysis, tensor, transform=None) -> str:
    """What protects one graph input or output, from the bases its annotation actually got.

    ``transform`` is the insert pass's :class:`BoundaryTransform` when compiling: a boundary
    whose basis came out as the identity is clear whatever its class. Server-side state is
    called ciphertext only when its space has a non-clear basis.
    """
    ann = analysis.ctx.get(tensor)
    clear, total, unit, classes = _coverage(analysis, ann)
    if transform is not None and transform.kind == "clear":
        clear, classes = total, []
    if transform is not None and transform.kind == "axis" and all(h.is_identity for h in transform.heads):
        clear, classes = total, []
    state = tensor.name in analysis.state_inputs or tensor.name in analysis.state_outputs
    if state:
        if clear == total:
            return CLEAR_STATE
        where = _where(ann)
        if clear:
            return (f"server-side state: {clear} of {_plural(total, unit)} clear (ciphertext on the rest: "
                    f"{', '.join(classes)}{where}; passed through)")
        return f"server-side state (ciphertext: {', '.join(classes)}{where}; passed through)"
    if clear == total:
        return "clear"
    if isinstance(ann, IndexValues):
        return f"permuted index values ({analysis.ctx.spaces.size(ann.ref)} classes)"
    text = f"basis change on axis {ann.axis}: {', '.join(classes)}"
    if clear:
        text += f"; {clear} of {_plural(total, unit)} clear"
    return text


CLEAR_STATE = "server-side state in CLEAR (the server holds the plaintext values)"


def _where(ann) -> str:
    if isinstance(ann, Protected):
        per_head = f", per index of axis {ann.head_axis}" if ann.head_axis is not None else ""
        return f" on axis {ann.axis}{per_head}"
    return ""


def _warnings(analysis: Analysis, io: dict) -> list[str]:
    """Top-level warnings: server-side state (KV cache) the server holds in clear, wholly or partly."""
    out = []
    state_out = set(analysis.state_outputs)
    rows = [r for r in io["outputs"] if r["name"] in state_out]
    clear = [r["name"] for r in rows if r["protection"] == CLEAR_STATE]
    partly = [r for r in rows if r["protection"].startswith("server-side state:")]
    if clear:
        out.append(f"{len(clear)} of {len(rows)} KV-cache output(s) are CLEAR state: the server holds the "
                   f"plaintext values of {_names(clear)}")
    for r in partly:
        detail = r["protection"].split(":", 1)[1].split("(")[0].strip()
        out.append(f"KV-cache output {r['name']} is partly clear state: {detail}")
    state_in = set(analysis.state_inputs)
    clear_in = [r["name"] for r in io["inputs"] if r["name"] in state_in and r["protection"] == CLEAR_STATE]
    if clear_in and not clear:
        out.append(f"{len(clear_in)} KV-cache input(s) are CLEAR state: {_names(clear_in)}")
    return out


def _names(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    if any(e["basis"] in ("pair-quarter-turns", "pair-signs", "pair-scales", "pair-positive-scales",
                          "pair-scaled-quarter-turns") for e in entries):
        out.append("per-pair bases (q/k norm with a gain before RoPE) hide little: each query/key coordinate's "
                   "magnitude is visible up to a swap within its frequency pair (signs: exactly), so squared or "
                   "absolute Q/K values are largely plaintext even where whole tensors differ")
    if any(n.op in ("Softmax",) for n in analysis.mg.nodes):
        out.append("attention patterns (softmax scores) are computed in clear on the server")
    if any(n.op in ("Conv", "MaxPool", "AveragePool") for n in analysis.mg.nodes):
        out.append("spatial layout (pixel positions) is not protected; only channels are")
    if any(n.op in ("ArgMax", "ArgMin", "TopK") for n in analysis.mg.nodes):
        out.append("ArgMax/ArgMin/TopK over a permuted axis break exact ties by permuted position, so a tied "
                   "result may differ from the plaintext one (ties between distinct float scores are rare)")
    if analysis.unsupported:
        out.append(f"{len(analysis.unsupported)} node(s) without an op rule left their spaces in clear")
    few = sorted((e for e in entries if e["basis"] != "clear" and e.get("bases_log2") is not None
                  and e["bases_log2"] < FEW_BASES_LOG2), key=lambda e: e["bases_log2"])
    if few:
        named = _names([f"{e['name']} (2^{e['bases_log2']:g})" for e in few])
        out.append(f"{len(few)} protected space(s) allow fewer than 2^{FEW_BASES_LOG2} bases, so a server that can "
                   f"test a guess (knowing the public model) tries them all: {named}")
    clear = [e["name"] for e in entries if e["basis"] == "clear"]
    if clear:
        out.append(f"{len(clear)} space(s) stay in clear")
    out.append("shapes, sequence lengths and timing are visible to the server")
    return out


def _blocks_text(space: dict) -> str:
    """`` (4 blocks)``, `` (4 blocks, moved as whole groups)``, or nothing for one block."""
    if space["blocks"] <= 1:
        return ""
    moved = ", moved as whole groups" if space.get("groups_permuted") else ""
    return f" ({space['blocks']} blocks{moved})"


def render_text(report: dict) -> str:
    """A terminal table: one row per space, then I/O, unsupported ops and weaknesses."""
    lines = [f"eecompile lint: {report['model']}"]
    lines.extend(f"WARNING: {w}" for w in report.get("warnings", []))
    lines.append("")
    summary = ", ".join(f"{report['summary'][b]} {b}" for b in BASIS_ORDER if b in report["summary"])
    lines.append(f"spaces: {len(report['spaces'])}" + (f" ({summary})" if summary else ""))
    lines.append("")
    header = ("space", "size", "basis", "limited by")
    rows = [(s["name"], str(s["size"]) + _blocks_text(s), s["basis"],
             "-" if not s["limited_by"] else f"{s['limited_by']['op_type']} {s['limited_by']['node']}: "
                                             f"{s['limited_by']['reason']}") for s in report["spaces"]]
    widths = [min(48, max(len(r[i]) for r in [header, *rows])) for i in range(3)]
    for r in [header, *rows]:
        name = r[0] if len(r[0]) <= widths[0] else "…" + r[0][-(widths[0] - 1):]
        lines.append(f"{name:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    lifts = [s for s in report["spaces"] if s.get("lift")]
    if lifts:
        lines.append("")
        lines.append("what would lift the weak spaces:")
        lines.extend(f"  {s['name']} ({s['basis']}): {s['lift']['kind']}: {s['lift']['how']}" for s in lifts)
    lines.append("")
    for side in ("inputs", "outputs"):
        lines.append(f"{side}:")
        lines.extend(f"  {io['name']}: {io['protection']}" for io in report[side])
    if report.get("validity"):
        lines.append(f"validity: {report['validity']}")
    if report["unsupported_ops"]:
        lines.append("unsupported ops (their spaces stay clear):")
        lines.extend(f"  {u['node']} ({u['domain']}::{u['op_type']})" for u in report["unsupported_ops"])
    if report["policies"]:
        lines.append("policies:")
        lines.extend(f"  - {p}" for p in report["policies"])
    lines.append("weaknesses:")
    lines.extend(f"  - {w}" for w in report["weaknesses"])
    if report.get("verification"):
        lines.append(f"verification: {verification_line(report['verification'])}")
        if report["verification"].get("tolerance"):
            lines.append(f"verification tolerance: {report['verification']['tolerance']['text']}")
    if report.get("exposure"):
        lines.append(exposure_line(report["exposure"]))
        exposed = report["exposure"].get("exposed", [])
        lines.extend(f"  {e['tensor']} ({e['op_type']} {e['node']})" for e in exposed[:20])
    return "\n".join(lines) + "\n"


def exposure_warnings(e: dict) -> list[str]:
    """Warnings for a measured exposure: tensors and KV-cache outputs equal to the plaintext run."""
    if not e.get("checked"):
        return []
    out = []
    inter = [x for x in e["exposed"] if x.get("kind") != "state"]
    state = [x for x in e["exposed"] if x.get("kind") == "state"]
    if state:
        out.append(f"{len(state)} of {e['state_outputs_compared']} KV-cache output(s) equal the plaintext run: "
                   f"{_names([x['tensor'] for x in state])}")
    if inter:
        where = [f"{x['node'] or x['tensor']} ({x['op_type']})" for x in inter]
        out.append(f"{len(inter)} of {e['intermediates_compared']} intermediate tensor(s) equal the plaintext run, "
                   f"first at {_names(where, 4)}")
    return out


def verification_line(v: dict) -> str:
    """One line for the verification result of a compile."""
    return ("passed (" if v.get("checked") else "not run (") + f"{v.get('detail', '')})"


def exposure_line(e: dict) -> str:
    """The one-line exposure summary (``exposure: 0 of 412 intermediate tensors and ...``)."""
    if not e.get("checked"):
        return f"exposure: not measured ({e.get('detail', '')})"
    text = (f"exposure: {e['intermediates_exposed']} of {e['intermediates_compared']} intermediate tensors")
    if e.get("state_outputs_compared"):
        text += f" and {e['state_outputs_exposed']} of {e['state_outputs_compared']} KV-cache outputs"
    text += " equal the plaintext run"
    extra = []
    if e.get("excluded_by_design"):
        extra.append(f"{e['excluded_by_design']} visible by design excluded")
    if e.get("unmatched"):
        extra.append(f"{e['unmatched']} not matched by name")
    return text + (f" ({', '.join(extra)})" if extra else "")


def render_markdown(report: dict) -> str:
    """The report as Markdown for people."""
    out = [f"# eecompile report: `{report['model']}`", ""]
    if report.get("warnings"):
        out += [f"> **Warning:** {w}" + "  " for w in report["warnings"]] + [""]
    out += ["## Spaces", "", "| space | size | basis | limited by | would lift it |", "|---|---|---|---|---|"]
    for s in report["spaces"]:
        lim = "—" if not s["limited_by"] else (f"`{s['limited_by']['node']}` ({s['limited_by']['op_type']}): "
                                               f"{s['limited_by']['reason']}")
        size = f"{s['size']}" + _blocks_text(s)
        up = "—" if not s.get("lift") else f"{s['lift']['kind']}: {s['lift']['how']}"
        out.append(f"| `{s['name']}` | {size} | {s['basis']} | {lim} | {up} |")
    for side in ("inputs", "outputs"):
        out += ["", f"## {side.capitalize()}", ""]
        out += [f"- `{io['name']}`: {io['protection']}" for io in report[side]]
    if report.get("validity"):
        out += ["", "## Validity", "", f"checked by {report['validity']}"]
    out += ["", "## Unsupported ops", ""]
    out += [f"- `{u['node']}` ({u['domain']}::{u['op_type']})" for u in report["unsupported_ops"]] or ["none"]
    out += ["", "## Policies", ""] + ([f"- {p}" for p in report["policies"]] or ["none"])
    out += ["", "## Weaknesses", ""] + [f"- {w}" for w in report["weaknesses"]]
    if report.get("verification"):
        out += ["", "## Verification", "", verification_line(report["verification"])]
        if report["verification"].get("tolerance"):
            out += ["", f"verification tolerance: {report['verification']['tolerance']['text']}"]
    if report.get("exposure"):
        e = report["exposure"]
        out += ["", "## Exposure", "", exposure_line(e)]
        if e.get("exposed"):
            out += ["", "| tensor | node | op |", "|---|---|---|"]
            out += [f"| `{x['tensor']}` | `{x['node']}` | {x['op_type']} |" for x in e["exposed"]]
    return "\n".join(out) + "\n"
