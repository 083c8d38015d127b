"""Run every applicable attack on a compiled model and render the results.

:func:`run_audit` takes a compiler output directory. Attacks see only the ``server/`` folder
(plus the side knowledge each one states); the ``client/`` bundle simulates the clients
(encrypting traffic) and scores the attacks. ``base_model`` (the original ONNX model) enables
the regime where the server knows the base weights, the no-base-model regime's public
stand-ins, and the re-key mitigations.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from eecompile.audit.result import KNOWN_BASE, NO_BASE, AttackResult
from eecompile.audit.server import AuditError, ModelView, Truth

RESULTS_LINK = "benchmarks/RESULTS.md#audit"


@dataclass
class AuditConfig:
    """How much work the audit does (the defaults take a few minutes on a small model)."""

    frequency: bool = True  # frequency analysis and known tokens on client traffic
    traffic_tokens: tuple[int, ...] = (1_000, 10_000, 100_000)
    generated_tokens: tuple[int, ...] = (100_000,)
    known_tokens: tuple[int, ...] = (10, 100, 1_000, 10_000)
    public_changes: tuple[float, ...] = (0.01, 0.1, 0.5)
    inversion_prompts: int = 4
    inversion_length: int = 16
    mitigations: bool = True
    rotation_periods: tuple[int, ...] = (1_000, 10_000)
    rotation_keys: int = 4
    decoys: tuple[str, ...] = ("uniform", "unigram")
    decoy_tokens: int = 10_000
    time_budget: float | None = None  # per frequency-analysis run, seconds
    frequency_keys: int = 1  # keys (ciphertext relabellings) averaged per traffic size up to 10^5 tokens
    seed: int = 0


@dataclass
class AuditReport:
    """Results plus what they were measured on."""

    model: str
    results: list[AttackResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps([r.to_dict() for r in self.results], indent=2) + "\n"

    def render_text(self) -> str:
        lines = [f"eecompile audit: {self.model}"]
        lines += [f"  {k}: {v}" for k, v in self.info.items()]
        lines.append("")
        rows = [("attack", "regime", "side knowledge", "recovered", "metric", "seconds")]
        for r in self.results:
            rows.append((r.attack, r.regime, _short(r.side_knowledge, 70), f"{r.recovered:.3f}", r.metric,
                         f"{r.seconds:.2f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def render_markdown(self) -> str:
        out = [f"### Audit of `{self.model}`", ""]
        out += [f"- {k}: {v}" for k, v in self.info.items()]
        out += ["", "| attack | regime | side knowledge | target | recovered | metric | seconds |",
                "|---|---|---|---|---:|---|---:|"]
        for r in self.results:
            out.append(f"| {r.attack} | {r.regime} | {r.side_knowledge} | {r.target} | {r.recovered:.3f} | "
                       f"{r.metric} | {r.seconds:.2f} |")
        if self.notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _tokenizer_for(server: ModelView, tokenizer: str | Path | None, base_model: str | Path | None):
    from eecompile.audit.text import CharTokenizer, HFTokenizer

    if tokenizer is not None:
        tok = HFTokenizer(tokenizer)
    elif base_model is not None and (Path(base_model).parent / "tokenizer.json").is_file():
        tok = HFTokenizer(Path(base_model).parent / "tokenizer.json")
    elif server.vocab_size <= 256:
        return CharTokenizer(server.vocab_size), "characters (the model ships no tokenizer)"
    else:
        return None, None
    if tok.vocab_size > server.vocab_size:
        raise AuditError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary has {server.vocab_size}")
    return tok, f"{tok.path.parent.name}/{tok.path.name}"


def _is_decoder(server: ModelView) -> bool:
    """Does the first output range over the vocabulary (logits of a language model)?"""
    out = server.model.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    return len(dims) >= 2 and dims[-1].HasField("dim_value") and dims[-1].dim_value == server.vocab_size


def run_audit(out_dir: str | Path, base_model: str | Path | None = None, corpus: str | Path | None = None, *,
              tokenizer: str | Path | None = None, public_models: list[tuple[str, str | Path]] | None = None,
              config: AuditConfig | None = None, model_name: str | None = None,
              progress: Callable[[str], None] | None = None) -> AuditReport:
    """Every applicable attack on the compiled model in ``out_dir`` (see the module docstring)."""
    from eecompile.audit import frequency, inversion, known_plaintext, rotation, weight_matching
    from eecompile.audit.public import perturbed_copy, relative_change
    from eecompile.audit.text import read_corpus, split_traffic

    cfg = config or AuditConfig()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    if not (out / "server" / "model.onnx").is_file():
        raise AuditError(f"{out} is not a compiler output directory (no server/model.onnx)")
    if not (out / "client" / "manifest.json").is_file():
        raise AuditError(f"{out} has no client bundle (client/manifest.json): the audit needs it to simulate "
                         "clients and to score the attacks")
    server = ModelView(out / "server")
    truth = Truth(out / "client")
    base = ModelView(base_model) if base_model is not None else None
    name = model_name or (Path(base_model).name if base_model else out.name)
    report = AuditReport(name)
    report.info["parameters"] = server.parameter_count
    results = report.results

    attackers: list[tuple[str, str, ModelView]] = []
    if base is not None:
        attackers.append((KNOWN_BASE, "the base model's weights (the public model served as is)", base))
        if public_models:
            for label, path in public_models:
                attackers.append((NO_BASE, f"a related public model ({label}), not the private weights",
                                  ModelView(path)))
        else:
            tmp = Path(tempfile.mkdtemp(prefix="eecompile-audit-public-"))
            for change in cfg.public_changes:
                path = perturbed_copy(base_model, tmp / f"public-{change:g}.onnx", change, seed=cfg.seed + 1)
                attackers.append((NO_BASE, f"a public model {change:.0%} away from the private weights "
                                  "(simulated fine-tune: Gaussian change of every weight matrix)", ModelView(path)))

    if server.token_input is not None:
        token_input = server.token_input
        perm = truth.vocab_perm(token_input)
        V = server.vocab_size
        report.info["vocabulary"] = V
        report.info["hidden"] = int(server.embedding.shape[1])
        if base is not None and (base.token_input is None or base.vocab_size != V):
            raise AuditError(f"--base-model {base_model} has no embedding table of {V} tokens; is it the model "
                             "that was compiled?")

        def encrypt(ids):
            return truth.encrypt_ids(token_input, ids)

        tok, tok_desc = _tokenizer_for(server, tokenizer, base_model)
        split = None
        if V > frequency.MAX_DENSE_VOCAB:
            tok = None
            report.notes.append(f"frequency analysis not measured: this implementation handles vocabularies of up "
                                f"to {frequency.MAX_DENSE_VOCAB} ids (the model has {V}); that is a limit of the "
                                "attack code, not a protection")
        elif tok is None:
            report.notes.append(f"frequency analysis skipped: no tokenizer for a {V}-token vocabulary "
                                "(pass --tokenizer tokenizer.json)")
        else:
            corpus_name, parts = read_corpus(corpus)
            need = max(cfg.traffic_tokens + (cfg.decoy_tokens, max(cfg.rotation_periods or (0,)) * cfg.rotation_keys))
            say(f"tokenizing {corpus_name}")
            split = split_traffic(tok, parts, corpus_name, seed=cfg.seed)
            report.info["corpus"] = (f"{corpus_name}: {split.traffic_tokens} traffic tokens, "
                                     f"{split.reference_tokens} disjoint reference tokens; tokenizer {tok_desc}")
            if split.traffic_tokens < need:
                report.notes.append(f"the corpus gives {split.traffic_tokens} traffic tokens; larger N were cut to that")
            say("fitting reference n-grams")
            ngram = frequency.NgramModel.fit(split.reference, V)
            candidates = {corpus_name: ngram}
            for part, docs in split.reference_parts.items():
                candidates[part] = frequency.NgramModel.fit(docs, V)
            for n in cfg.traffic_tokens if cfg.frequency else ():
                n = min(n, split.traffic_tokens)
                say(f"frequency analysis, N={n}")
                results.append(frequency.run_frequency(split.traffic, split.reference, encrypt, perm, V, n,
                                                       model_name=name, corpus=corpus_name, ngram=ngram,
                                                       time_budget=cfg.time_budget,
                                                       repeats=cfg.frequency_keys if n <= 100_000 else 1))
            for n in cfg.generated_tokens if _is_decoder(server) else ():
                say(f"frequency analysis on {n} tokens the server samples itself")
                # the server sees which encrypted id starts the requests (the tokenizer's <s>)
                starts = np.array([encrypt(d)[0] for d in split.traffic[:200]])
                values, counts = np.unique(starts, return_counts=True)
                results.append(frequency.run_generated_frequency(
                    server, split.reference, perm, n, values[counts == counts.max()],
                    ngram=ngram, candidates=candidates, model_name=name, encrypt=encrypt, seed=cfg.seed,
                    eval_docs=_take(split.traffic, max(cfg.traffic_tokens)), time_budget=cfg.time_budget))
            if cfg.frequency:
                say("known plaintext (token pairs)")
                results.append(known_plaintext.run_known_plaintext_lm(
                    server, None, split.traffic, encrypt, perm, server.embedding, model_name=name,
                    ks=list(cfg.known_tokens)))

        if base is not None:
            prompts = []
            if split is not None and _is_decoder(server):
                heldout = split.traffic[::-1][: cfg.inversion_prompts]
                L = min(cfg.inversion_length, server.max_positions or cfg.inversion_length)
                prompts = [np.asarray(d[:L], dtype=np.int64) for d in heldout if len(d) >= 2]
            for regime, side, view in attackers:
                say(f"weight matching with {side}")
                wm = weight_matching.run_weight_matching(server, view.embedding, base.embedding, perm,
                                                         regime=regime, side_knowledge=side, model_name=name)
                wm.details["public_embedding_relative_change"] = relative_change(view.embedding, base.embedding)
                results.append(wm)
                match = wm.match  # type: ignore[attr-defined]
                if prompts:
                    say(f"hidden-state inversion with {side}")
                    results.append(inversion.run_inversion(
                        server, view, match.transform, prompts, encrypt, regime=regime, model_name=name,
                        side_knowledge=f"{side}; residual basis estimated by weight matching"))
                if split is not None and _is_decoder(server):
                    say(f"known plaintext (prompt states) with {side}")
                    d = server.embedding.shape[1]
                    results.append(known_plaintext.run_known_plaintext_lm(
                        server, view, split.traffic[::-1], encrypt, perm, base.embedding, model_name=name,
                        ks=sorted({max(1, d // 2), d, 2 * d, 8 * d}), regime=regime,
                        side_knowledge=f"{side}; k known prompt positions and the states the server holds"))

            if cfg.mitigations and _is_decoder(server):
                work = Path(tempfile.mkdtemp(prefix="eecompile-audit-rekey-"))
                say("re-keys and the linking attack")
                results.extend(rotation.run_rekey_and_link(base_model, out, work, model_name=name))
                if split is not None and cfg.rotation_periods:
                    from eecompile import compile_model
                    from eecompile.keys import MasterKey

                    periods = [(server, truth)]
                    for k in range(1, cfg.rotation_keys):
                        key_dir = work / f"period-{k}"
                        compile_model(base_model, MasterKey(np.random.default_rng(cfg.seed + 100 + k).bytes(32)),
                                      key_dir, force=True, verify=False)
                        periods.append((ModelView(key_dir / "server"), Truth(key_dir / "client")))
                    for period in cfg.rotation_periods:
                        say(f"key rotation every {period} tokens")
                        results.append(rotation.run_rotation(split.traffic, ngram, periods, period, model_name=name,
                                                             time_budget=cfg.time_budget))
                if split is not None:
                    bos = int(np.bincount([d[0] for d in split.traffic[:200]]).argmax())
                    for kind in cfg.decoys:
                        say(f"decoy traffic ({kind})")
                        results.append(rotation.run_decoys(server, truth, split.traffic, ngram, cfg.decoy_tokens,
                                                           kind, 1.0, model_name=name, bos=bos,
                                                           time_budget=cfg.time_budget))
        else:
            report.notes.append("no --base-model: the base-model regime, its public stand-ins and the re-key "
                                "mitigations were not measured")

    if truth.continuous_inputs():
        say("known plaintext (continuous inputs)")
        results.extend(known_plaintext.run_known_plaintext_input(server, truth, model_name=name))
        for regime, side, view in attackers:
            say(f"first-layer weight matching with {side}")
            found = weight_matching.run_first_layer_matching(server, view, truth, regime=regime, model_name=name,
                                                             side_knowledge=side + "; the first layer's weights")
            results.extend(found)
            if not found and view is base:
                report.notes.append("weight matching of the continuous inputs not measured: the first layer's "
                                    "output basis is not a permutation (the bias-matching attack needs one)")
    if not results:
        report.notes.append("no protected input found that an attack here applies to")
    return report


def _take(docs, n):
    from eecompile.audit.text import take_tokens

    return take_tokens(docs, n)
