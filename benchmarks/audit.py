"""The audit table for the trained language model (eecompile/models/tinylm), both regimes, and the
key-rotation mitigations with the linking attack.

    python benchmarks/audit.py [--quick] [--finetune-steps 300] [--rekey-scale 10M]

1. Compiles the shipped tinylm with a fixed key and runs every attack of ``eecompile audit``
   on it (``run_audit``): frequency analysis on N = 10^3..10^6 tokens of real English traffic
   (KJV Bible + fortunes, Debian packages; the attacker's reference text is a disjoint part),
   frequency analysis on text the server samples from the encrypted model itself, weight
   matching / known plaintext / hidden-state inversion with the base model known and with
   public models 1 %, 10 %, 50 % away (simulated fine-tunes), re-keys and the linking attack,
   key rotation every K tokens, decoy traffic.
2. The realistic no-base-model case: fine-tunes the tinylm on the fortunes corpus (a
   "private" model), compiles that, and attacks it with the shipped tinylm as the only
   model the server knows.
3. Re-key cost at a larger scale (a random-weight Llama of the ``--rekey-scale`` size).

Writes benchmarks/results/audit_tinylm.json (every result with details) and
audit_tinylm.md (the full table), and the section between ``<!-- audit -->`` and
``<!-- /audit -->`` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SECTION = ("<!-- audit -->", "<!-- /audit -->")
KEY_SEED = 20_261_123


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f} at start"


# -- the private fine-tune ------------------------------------------------------------------------
def finetune(model_dir: Path, out: Path, steps: int, lr: float = 3e-4, batch: int = 16, seed: int = 0) -> dict:
    """Fine-tune the shipped tinylm on the fortunes corpus; export it to ``out/model.onnx``."""
    import torch
    from torch import nn

    from eecompile.models.corpus import corpus_documents, load_corpus, split_corpus
    from eecompile.models.export import export_llama_module
    from eecompile.models.tinylm import load_checkpoint, load_tokenizer
    from eecompile.models.train_lm import encode_documents, lm_logits, stream_nll

    torch.manual_seed(seed)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    tok = load_tokenizer(model_dir)
    train_text, held_text = split_corpus(load_corpus("fortunes"), 0.05)
    train = encode_documents(tok, corpus_documents(train_text))
    held = encode_documents(tok, corpus_documents(held_text))
    model = load_checkpoint(model_dir)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    context = int(model.config["max_positions"])
    nll0, n0 = stream_nll(model, held, context, max_windows=100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = np.random.default_rng(seed)
    stream = torch.from_numpy(train)
    offsets = torch.arange(context + 1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.from_numpy(gen.integers(0, len(train) - context - 1, size=batch))
        x = stream[starts[:, None] + offsets[None, :]]
        logits = lm_logits(model, x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"fine-tune step {step} loss {loss.item():.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    nll1, n1 = stream_nll(model, held, context, max_windows=100)
    after = model.state_dict()
    mats = [k for k, v in before.items() if v.dim() >= 2]
    change = math.sqrt(sum(float((after[k] - before[k]).pow(2).sum()) for k in mats)
                       / sum(float(before[k].pow(2).sum()) for k in mats))
    emb = "embed_tokens.weight"
    emb_change = float((after[emb] - before[emb]).norm() / before[emb].norm()) if emb in before else None
    out.mkdir(parents=True, exist_ok=True)
    export_llama_module(model, out / "model.onnx", exporter="dynamo", opset=20)
    return {"corpus": "fortunes (train split)", "steps": steps, "batch": batch, "context": context, "lr": lr,
            "seconds": round(seconds, 1), "fortunes_heldout_perplexity_before": math.exp(nll0 / n0),
            "fortunes_heldout_perplexity_after": math.exp(nll1 / n1), "weight_matrices_relative_change": change,
            "embedding_relative_change": emb_change}


# -- re-key cost at a larger scale -------------------------------------------------------------------
SCALES = {
    "10M": dict(vocab_size=8000, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=688),
    "50M": dict(vocab_size=16000, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1376),
}


def rekey_at_scale(name: str, work: Path) -> list[dict]:
    import torch

    from eecompile import compile_model
    from eecompile.audit.rotation import run_rekey_and_link
    from eecompile.keys import MasterKey
    from eecompile.models.export import llama_dynamic_axes, llama_example_inputs, llama_io_names
    from eecompile.models.llama import TinyLlama

    cfg = {**SCALES[name], "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_positions": 256,
           "tied_embeddings": False}
    torch.manual_seed(0)
    with torch.no_grad():
        model = TinyLlama(cfg).eval()
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = work / f"llama-{name}.onnx"
    in_names, out_names = llama_io_names(cfg["layers"])
    torch.onnx.export(model, llama_example_inputs(cfg, batch=1, seq=2, past=1), str(path), dynamo=False,
                      opset_version=17, input_names=in_names, output_names=out_names,
                      dynamic_axes=llama_dynamic_axes(cfg["layers"]), do_constant_folding=False)
    out = work / f"out-{name}"
    compile_model(path, MasterKey(np.random.default_rng(KEY_SEED).bytes(32)), out, force=True)
    rows = [r.to_dict() for r in run_rekey_and_link(path, out, work / f"rekey-{name}", model_name=f"llama-{name}")]
    return rows


# -- the RESULTS.md section ------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f} %" if x < 0.999 or x == 1.0 else f"{100 * x:.2f} %"


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x >= 0.1 else f"{x:.2f} s"


def section(data: dict) -> str:
    rows = data["results"]
    ft = data.get("finetune") or {}
    lines = [SECTION[0], "## Audit: what the server can recover (trained tinylm)", ""]
    lines += [f"**Machine:** {data['machine']}. Times are wall-clock seconds of the attacker's computation "
              "(the machine is shared, so they are upper bounds).",
              f"**Command:** `{data['command']}` ({data['total_minutes']:.0f} min).",
              "Full table with every detail: [`results/audit_tinylm.md`](results/audit_tinylm.md); "
              "data: [`results/audit_tinylm.json`](results/audit_tinylm.json).", "",
              f"**Model:** `eecompile/models/tinylm` (Llama-style, {data['parameters'] / 1e6:.1f} M parameters, "
              f"vocabulary {data['vocabulary']}, hidden {data['hidden']}), compiled with a fixed key: token ids "
              "get a vocabulary permutation (shared with the logits), the residual stream one dense "
              "orthogonal basis. **Traffic:** " + data["corpus"] + ". Attacks see only the server folder "
              "plus the side knowledge stated; the client bundle only simulates clients and scores.", ""]
    lines += ["| attack | side knowledge | setting | recovered | metric | time |", "|---|---|---|---:|---|---:|"]

    def add(r, setting):
        lines.append(f"| {r['attack']} | {r['regime']}: {r['side_knowledge']} | {setting} | "
                     f"{_pct(r['recovered'])} | {r['metric']} | {_secs(r['seconds'])} |")

    for r in rows:
        a, d = r["attack"], r["details"]
        if a == "frequency analysis":
            add(r, f"N = {d['N']:,} traffic tokens")
        elif a == "frequency analysis (server-generated text)":
            add(r, f"{d['generated_tokens']:,} sampled tokens, 0 client tokens")
        elif a == "known plaintext" and r["regime"] == "no base model" and "curve" in d and \
                "later_traffic_decrypted" in d["curve"][0]:
            setting = ", ".join(f"k={c['k']:,}: {_pct(c['later_traffic_decrypted'])}" for c in d["curve"])
            add(r, setting)
        elif a in ("weight matching", "hidden-state inversion", "known plaintext"):
            extra = ""
            if a == "weight matching":
                extra = f"basis error {d['basis_relative_error']:.2g}"
            elif a == "known plaintext":
                extra = f"k = {d.get('smallest_k_recovering_99pct') or '>' + str(d['curve'][-1]['k'])} positions " \
                        "for 99 %"
            else:
                extra = f"{d['prompts']} prompts, {d['tokens']} tokens"
            if r.get("source") == "finetune":
                extra += " (real fine-tune)"
            add(r, extra)
    lines += ["", "### Mitigations (all keep the model exactly equivalent)", "",
              "| mitigation | cost | attack | recovered |", "|---|---|---|---:|"]
    for r in rows:
        d = r["details"]
        if r["attack"] == "linking attack":
            cost = (f"{_secs(d['rekey_cost_seconds'])} for {d['parameters'] / 1e6:.1f} M parameters "
                    f"({d['rekey_seconds_per_million_parameters']:.2f} s per M); decrypted logits differ from the "
                    f"old key's by at most {d['equivalence_exact']:.1g}")
            lines.append(f"| {d['rekey']} ({r['model']}) | {cost} | linking attack ({d['method']}), "
                         f"{_secs(r['seconds'])} | {_pct(r['recovered'])} of ids linked |")
        elif r["attack"] == "frequency analysis under key rotation":
            lines.append(f"| key rotation every {d['period_tokens']:,} tokens ({d['keys']} full re-keys) | "
                         f"one full re-key per {d['period_tokens']:,} tokens | frequency analysis per key period "
                         f"alone: {_pct(d['recovered_each_period_alone'])}; periods linked "
                         f"({_pct(float(np.mean(d['link_accuracy'])))} of ids) and pooled "
                         f"({d['pooled_tokens']:,} tokens) | {_pct(r['recovered'])} |")
        elif r["attack"] == "frequency analysis with decoy traffic":
            lines.append(f"| {d['decoys']} decoy requests, {d['decoy_tokens_per_real_token']:g} per real token | "
                         f"{d['compute_overhead']:.0%} more server compute | frequency analysis on the mix: "
                         f"{_pct(d['recovered_without_filtering'])}; the server scores requests with its own "
                         f"model (decoys told apart: {_pct(d['decoy_detection_accuracy'])}) and drops the unlikely "
                         f"ones: {_pct(d['recovered_after_filtering'])} | {_pct(r['recovered'])} (the better) |")
    if ft:
        lines += ["", f"**Real fine-tune** (no-base-model rows marked so): the tinylm fine-tuned on the fortunes "
                  f"corpus for {ft['steps']} steps (batch {ft['batch']}, lr {ft['lr']}); fortunes held-out "
                  f"perplexity {ft['fortunes_heldout_perplexity_before']:.1f} → "
                  f"{ft['fortunes_heldout_perplexity_after']:.1f}; weight matrices moved "
                  f"{ft['weight_matrices_relative_change']:.1%}, the embedding table "
                  f"{ft['embedding_relative_change']:.1%}. The server knows only the shipped tinylm."]
    lines += ["", "Why no exact re-key survives the linking attack: an exact re-key can change the embedding "
              "table only by a row permutation and a basis of the residual stream that RMSNorm allows, an "
              "orthogonal one, so the Gram matrix of the rows is the old one permuted. Random per-row scales "
              "are not exact: a token's embedding row is added into the residual stream, and no fixed weight "
              "can undo a scale that depends on which token came in.", SECTION[1]]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = ROOT / "RESULTS.md"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION[0] in current and SECTION[1] in current:
        head, rest = current.split(SECTION[0], 1)
        _, tail = rest.split(SECTION[1], 1)
        current = head + text.rstrip("\n") + tail
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes), for trying the script")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--rekey-scale", default="10M", help="'10M', '50M' or 'none'")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--model-dir", default=None, help="a trained model directory (default: the shipped tinylm)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / results/")
    args = parser.parse_args(argv)

    from eecompile import compile_model
    from eecompile.audit.runner import AuditConfig, run_audit
    from eecompile.keys import MasterKey
    from eecompile.models.tinylm import load_tinylm, tinylm_dir

    t_start = time.perf_counter()
    started_machine = machine()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else tinylm_dir()
    onnx_path, tok_path, config = load_tinylm(model_dir)
    model_sha = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    out = work / "out-tinylm"
    compile_model(onnx_path, MasterKey(np.random.default_rng(KEY_SEED).bytes(32)), out, force=True)

    if args.quick:
        cfg = AuditConfig(traffic_tokens=(1_000, 10_000), generated_tokens=(10_000,), inversion_prompts=2,
                          inversion_length=8, rotation_periods=(1_000,), rotation_keys=2, decoy_tokens=2_000)
    else:
        cfg = AuditConfig(traffic_tokens=(1_000, 10_000, 100_000, 1_000_000), generated_tokens=(100_000, 1_000_000),
                          rotation_periods=(1_000, 10_000, 100_000), rotation_keys=4, decoy_tokens=10_000,
                          frequency_keys=3)
    log("audit of the shipped tinylm")
    report = run_audit(out, onnx_path, None, tokenizer=tok_path, config=cfg, model_name="tinylm", progress=log)
    results = [r.to_dict() for r in report.results]

    ft_info = None
    if args.finetune_steps > 0:
        log(f"fine-tuning the tinylm on fortunes for {args.finetune_steps} steps")
        ft_dir = work / "finetuned"
        ft_info = finetune(model_dir, ft_dir, 20 if args.quick else args.finetune_steps)
        ft_out = work / "out-finetuned"
        compile_model(ft_dir / "model.onnx", MasterKey(np.random.default_rng(KEY_SEED + 1).bytes(32)), ft_out,
                      force=True)
        ft_cfg = AuditConfig(frequency=False, generated_tokens=(), mitigations=False, public_changes=(),
                             inversion_prompts=cfg.inversion_prompts, inversion_length=cfg.inversion_length)
        ft_report = run_audit(ft_out, ft_dir / "model.onnx", None, tokenizer=tok_path, config=ft_cfg,
                              public_models=[("the shipped tinylm, before the private fine-tune", onnx_path)],
                              model_name="tinylm fine-tuned on fortunes", progress=log)
        for r in ft_report.results:
            if r.regime == "no base model":
                row = r.to_dict()
                row["source"] = "finetune"
                results.append(row)

    if args.rekey_scale != "none" and not args.quick:
        log(f"re-key cost at scale {args.rekey_scale}")
        results += rekey_at_scale(args.rekey_scale, work)

    total = (time.perf_counter() - t_start) / 60
    command = "python benchmarks/audit.py" + (" --quick" if args.quick else "") + \
        (f" --finetune-steps {args.finetune_steps}" if args.finetune_steps != 300 else "") + \
        (f" --rekey-scale {args.rekey_scale}" if args.rekey_scale != "10M" else "")
    data = {"command": command, "machine": started_machine, "date": time.strftime("%Y-%m-%d"),
            "total_minutes": total, "parameters": report.info.get("parameters"),
            "vocabulary": report.info.get("vocabulary"), "hidden": report.info.get("hidden"),
            "corpus": report.info.get("corpus", ""), "notes": report.notes, "finetune": ft_info,
            "model_onnx_sha256": model_sha,
            "results": results}
    text = section(data)
    if args.no_write:
        print(text)
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit_tinylm.json").write_text(json.dumps(data, indent=2) + "\n")
    full = ["# Audit of the trained tinylm (full table)", "", f"Command: `{command}`; machine: {started_machine}.",
            "", "| model | attack | regime | side knowledge | target | recovered | metric | seconds | details |",
            "|---|---|---|---|---|---:|---|---:|---|"]
    for r in results:
        details = json.dumps(r["details"], separators=(",", ":"))
        full.append(f"| {r['model']} | {r['attack']} | {r['regime']} | {r['side_knowledge']} | {r['target']} | "
                    f"{r['recovered']:.4f} | {r['metric']} | {r['seconds']:.2f} | `{details}` |")
    (RESULTS / "audit_tinylm.md").write_text("\n".join(full) + "\n")
    write_section(text)
    print(text)
    log(f"done in {total:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
