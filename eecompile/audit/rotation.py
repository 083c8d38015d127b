"""Mitigations that keep the encrypted model exactly equivalent, measured with the same attacks.

* **Re-keys.** A *full re-key* recompiles the model with a fresh master key (every basis
  changes: vocabulary permutation, residual basis, head bases, ...). A *vocabulary-only
  re-key* keeps the compiled model and relabels the token ids: the embedding rows and the
  logits columns are permuted by a fresh permutation (no recompilation). Both are exact.
  Their cost: seconds to produce the new server model and client bundle and to load the new
  server model into ONNX Runtime, per million parameters.
* **Linking attack.** A server that keeps the old encrypted weights matches the rows of the
  new embedding table against the old one: a vocabulary-only re-key leaves the rows equal,
  a full re-key changes them by an orthogonal residual basis, which keeps every row norm
  and inner product (:func:`~eecompile.audit.matching.match_rows`). Linked keys let the
  server pool traffic from every key period.
* **Key rotation every K tokens.** Frequency analysis on each key period alone, and on all
  periods pooled through the links.
* **Decoy traffic.** The client mixes in decoy requests (random tokens, or tokens drawn from
  the unigram distribution) to distort the statistics; exact, since decoys are separate
  requests. The server can score every request with its own model (the model's
  log-likelihood of a request is computable in ciphertext: ids and logits share one
  permutation), so the audit measures how well that separates decoys, and frequency
  analysis before and after the server filters them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from eecompile.audit.frequency import NgramModel, frequency_attack, token_accuracy
from eecompile.audit.matching import match_rows
from eecompile.audit.result import MITIGATION, AttackResult, Timer
from eecompile.audit.server import AuditError, ModelView, Truth


# -- re-keys ----------------------------------------------------------------------------------
def full_rekey(base_model: str | Path, out_dir: str | Path, key=None, verify: bool = True) -> dict:
    """Recompile ``base_model`` with a fresh key into ``out_dir``; time the compile and the reload."""
    from eecompile import compile_model, generate_key

    key = key or generate_key()
    with Timer() as t_compile:
        compile_model(base_model, key, out_dir, force=True, verify=verify)
    with Timer() as t_load:
        _load_for_serving(Path(out_dir))
    return {"compile_seconds": t_compile.seconds, "reload_seconds": t_load.seconds, "verified": verify}


def _load_for_serving(out_dir: Path) -> None:
    import onnxruntime as ort

    from eecompile.runtime.client import Client

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ort.InferenceSession(str(out_dir / "server" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    Client.load(out_dir / "client")


def _vocab_tensors(model: onnx.ModelProto, token_input: str, logits_output: str) -> tuple[str, list[str]]:
    """(embedding initializer, initializers whose last axis is the logits' vocabulary axis)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    emb = next((n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == token_input
                and n.input[0] in inits), None)
    if emb is None:
        raise AuditError("the server model has no embedding table indexed by the token ids")
    heads, name = [], logits_output
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            break
        consts = [i for i in node.input if i in inits]
        dynamic = [i for i in node.input if i not in inits]
        if node.op_type in ("MatMul", "Gemm", "Add") and consts:
            heads += consts
            if node.op_type in ("MatMul", "Gemm"):
                return emb, heads
            name = dynamic[0]
        elif node.op_type in ("Identity", "Cast") and dynamic:
            name = dynamic[0]
        else:
            break
    raise AuditError(f"could not find the weight producing '{logits_output}'")


def vocab_only_rekey(old_out: str | Path, new_out: str | Path, seed: int | None = None) -> dict:
    """Relabel the token ids of a compiled model with a fresh permutation ``sigma``.

    New encrypted id ``j`` stands for old encrypted id ``sigma[j]``: embedding rows and
    logits columns are permuted, the client's permutations composed. Writes ``new_out/server``
    and ``new_out/client`` (a bundle's encrypted tokenizer is not rewritten). Returns the
    timings and ``sigma``.
    """
    from eecompile.compiler import model_id
    from eecompile.passes.basis import AxisBasis, Basis
    from eecompile.runtime.client import Client

    old_out, new_out = Path(old_out), Path(new_out)
    rng = np.random.default_rng(seed)
    with Timer() as t_rekey:
        client = Client.load(old_out / "client")
        index = [t for t in client.spec.inputs if t.kind == "index"]
        if len(index) != 1:
            raise AuditError("a vocabulary-only re-key needs exactly one token-id input")
        tok = index[0]
        perm_old = np.asarray(tok.index.index_map(), dtype=np.int64)
        V = len(perm_old)
        sigma = rng.permutation(V)
        logits = [t for t in client.spec.outputs if t.kind == "axis" and t.heads and t.heads[0].size == V]
        if len(logits) != 1:
            raise AuditError("a vocabulary-only re-key needs exactly one output over the vocabulary")
        out_t = logits[0]
        model = onnx.load(str(old_out / "server" / "model.onnx"), load_external_data=True)
        emb, heads = _vocab_tensors(model, tok.name, out_t.name)
        for init in model.graph.initializer:
            if init.name == emb:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[sigma], init.name))
            elif init.name in heads:
                arr = numpy_helper.to_array(init)
                if arr.shape[-1] == V:
                    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr[..., sigma]), init.name))
        (new_out / "server").mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(new_out / "server" / "model.onnx"))
        tok.index = Basis.monomial(perm_old[sigma])
        blocks = out_t.heads[0].blocks
        if len(blocks) != 1 or blocks[0].dense is not None or blocks[0].scale is not None:
            raise AuditError("the logits basis is not a plain permutation")
        out_t.heads = [AxisBasis((Basis.monomial(np.asarray(blocks[0].index_map())[sigma]),))]
        new_client = Client(client.spec, model_id(new_out / "server"))
        if (new_out / "client").exists():
            shutil.rmtree(new_out / "client")
        new_client.save(new_out / "client")
    with Timer() as t_load:
        _load_for_serving(new_out)
    return {"rekey_seconds": t_rekey.seconds, "reload_seconds": t_load.seconds, "sigma": sigma}


# -- the linking attack -------------------------------------------------------------------------
def linking_attack(old: ModelView, new: ModelView) -> tuple[np.ndarray, float, str]:
    """Link new encrypted ids to old ones from the two embedding tables only.

    Returns ``(link, seconds, method)`` with ``link[j]`` the old id guessed for new id ``j``.
    Identical rows are linked exactly (a hash of each row); otherwise rows are matched under
    an unknown orthogonal / invertible change of basis.
    """
    A, B = new.embedding, old.embedding
    with Timer() as t:
        keys = {row.tobytes(): i for i, row in enumerate(B)}
        link = np.array([keys.get(row.tobytes(), -1) for row in A], dtype=np.int64)
        method = "identical rows"
        if np.any(link < 0) or len(np.unique(link)) < len(link):
            match = match_rows(A, B)
            link, method = match.perm, f"row matching ({match.group} basis)"
    return link, t.seconds, method


def true_link(old_perm: np.ndarray, new_perm: np.ndarray) -> np.ndarray:
    """For scoring: the old encrypted id of each new encrypted id."""
    return np.argsort(old_perm)[new_perm]


def run_rekey_and_link(base_model: str | Path, old_out: str | Path, work_dir: str | Path, *,
                       model_name: str = "", parameters: int | None = None) -> list[AttackResult]:
    """Both re-keys of ``old_out``: their cost, and the linking attack against each."""
    old_out, work_dir = Path(old_out), Path(work_dir)
    old = ModelView(old_out / "server")
    old_truth = Truth(old_out / "client")
    token_input = old.token_input
    perm_old = old_truth.vocab_perm(token_input)
    params = parameters or old.parameter_count
    results = []
    for kind in ("vocabulary-only re-key", "full re-key"):
        new_out = work_dir / ("rekey-vocab" if kind.startswith("vocab") else "rekey-full")
        if kind.startswith("vocab"):
            info = vocab_only_rekey(old_out, new_out)
            cost = info["rekey_seconds"] + info["reload_seconds"]
            cost_detail = {"rekey_seconds": info["rekey_seconds"], "reload_seconds": info["reload_seconds"]}
        else:
            info = full_rekey(base_model, new_out)
            cost = info["compile_seconds"] + info["reload_seconds"]
            cost_detail = {"compile_seconds": info["compile_seconds"], "reload_seconds": info["reload_seconds"],
                           "verified_on_compile": info["verified"]}
        new = ModelView(new_out / "server")
        perm_new = Truth(new_out / "client").vocab_perm(new.token_input)
        exact = _check_exact(old_out, new_out, token_input)
        link, seconds, method = linking_attack(old, new)
        linked = float(np.mean(link == true_link(perm_old, perm_new)))
        results.append(AttackResult(
            attack="linking attack", side_knowledge=f"old and new encrypted server models ({kind})",
            target="which new encrypted id is which old one (to pool traffic across keys)",
            recovered=linked, seconds=seconds, metric="fraction of vocabulary ids linked",
            regime=MITIGATION, model=model_name,
            details={"rekey": kind, "method": method, "rekey_cost_seconds": cost,
                     "rekey_seconds_per_million_parameters": cost / max(params / 1e6, 1e-9),
                     "parameters": params, "equivalence_exact": exact, **cost_detail}))
    return results


def _check_exact(old_out: Path, new_out: Path, token_input: str, seed: int = 0) -> float:
    """Max |difference| of the decrypted logits of the old and new compiled models on random ids."""
    from eecompile.runtime.client import Client

    views = [ModelView(old_out / "server"), ModelView(new_out / "server")]
    clients = [Client.load(old_out / "client"), Client.load(new_out / "client")]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, views[0].vocab_size, size=(2, min(16, views[0].max_positions or 16)))
    outs = []
    for view, client in zip(views, clients):
        feeds = view.lm_feeds(client.encrypt({token_input: ids})[token_input])
        sess = view.session()
        name = view.output_names[0]
        raw = sess.run([name], feeds)[0]
        outs.append(client.decrypt({name: raw})[name])
    return float(np.max(np.abs(outs[0] - outs[1])))


# -- key rotation every K tokens ----------------------------------------------------------------
def run_rotation(traffic: list[np.ndarray], ngram: NgramModel, periods: list[tuple[ModelView, Truth]],
                 period_tokens: int, *, model_name: str = "", time_budget: float | None = None) -> AttackResult:
    """Traffic split into key periods of ``period_tokens`` tokens, one (server model, client) per period.

    Attack 1: frequency analysis on each period alone (the server does not link keys).
    Attack 2: link every period's ids to period 0 with :func:`linking_attack`, pool, attack.
    """
    from eecompile.audit.text import take_tokens

    docs = take_tokens(traffic, period_tokens * len(periods))
    segments: list[list[np.ndarray]] = [[] for _ in periods]
    count = 0
    for d in docs:
        k = min(count // period_tokens, len(periods) - 1)
        segments[k].append(d)
        count += len(d)
    token_input = periods[0][0].token_input
    alone, pooled_docs, link_acc, link_seconds = [], [], [], 0.0
    perm0 = periods[0][1].vocab_perm(token_input)
    with Timer() as t:
        for k, ((view, truth), seg) in enumerate(zip(periods, segments)):
            perm = truth.vocab_perm(token_input)
            cipher = [truth.encrypt_ids(token_input, d) for d in seg]
            guess = frequency_attack(cipher, ngram, time_budget=time_budget)
            alone.append(token_accuracy(guess.mapping, cipher, perm))
            if k == 0:
                link = np.arange(len(perm))
            else:
                link, secs, _ = linking_attack(periods[0][0], view)
                link_seconds += secs
                link_acc.append(float(np.mean(link == true_link(perm0, perm))))
            pooled_docs += [link[c] for c in cipher]
        pooled = frequency_attack(pooled_docs, ngram, time_budget=time_budget)
    # score pooled: every token in key-0 ids; the truth is what each token really was
    plain = np.concatenate([np.concatenate(s) for s in segments if s])
    pooled_ids = np.concatenate(pooled_docs)
    pooled_acc = float(np.mean(pooled.mapping[pooled_ids] == plain))
    return AttackResult(
        attack="frequency analysis under key rotation",
        side_knowledge=(f"key changes every {period_tokens} tokens ({len(periods)} keys, full re-keys); "
                        "the server keeps every encrypted model and links them"),
        target="token ids (vocabulary permutation)", recovered=pooled_acc, seconds=t.seconds,
        metric="fraction of traffic tokens decrypted (periods linked and pooled)",
        regime=MITIGATION, model=model_name,
        details={"period_tokens": period_tokens, "keys": len(periods),
                 "recovered_each_period_alone": float(np.mean(alone)), "per_period": alone,
                 "link_accuracy": link_acc, "link_seconds": link_seconds,
                 "pooled_tokens": int(len(pooled_ids))})


# -- decoy traffic ------------------------------------------------------------------------------
def request_nll(server: ModelView, cipher_docs: list[np.ndarray], max_len: int = 64, batch: int = 64) -> np.ndarray:
    """Mean negative log-likelihood per token of each request under the server's own model.

    Computable on ciphertext: the logits' vocabulary axis carries the same permutation as
    the ids, so ``logsoftmax(logits')[t, id'_{t+1}]`` is the plaintext model's value.
    """
    name = server.output_names[0]
    max_len = min(max_len, server.max_positions or max_len)
    sess = server.session()
    out = np.empty(len(cipher_docs))
    # group requests by length for batching
    lens = np.array([min(len(d), max_len) for d in cipher_docs])
    for L in np.unique(lens):
        idx = np.flatnonzero(lens == L)
        if L < 2:
            out[idx] = 0.0
            continue
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            ids = np.stack([cipher_docs[i][:L] for i in part])
            logits = sess.run([name], server.lm_feeds(ids))[0].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll = -np.take_along_axis(logp[:, :-1, :], ids[:, 1:, None], axis=-1)[..., 0]
            out[part] = nll.mean(axis=1)
    return out


def make_decoys(real_docs: list[np.ndarray], kind: str, unigram: np.ndarray, ratio: float,
                seed: int = 0, bos: int | None = None) -> list[np.ndarray]:
    """Decoy requests with the same length distribution as the real ones: ``ratio`` decoy tokens per real token."""
    rng = np.random.default_rng(seed)
    V = len(unigram)
    p = unigram / unigram.sum()
    decoys, total, target = [], 0, ratio * sum(len(d) for d in real_docs)
    while total < target:
        L = len(real_docs[rng.integers(len(real_docs))])
        if kind == "uniform":
            d = rng.integers(0, V, size=L)
        elif kind == "unigram":
            d = rng.choice(V, size=L, p=p)
        elif kind == "flattening":  # inverse frequency: the pooled unigram distribution flattens
            q = 1.0 / np.maximum(p, 1e-9)
            d = rng.choice(V, size=L, p=q / q.sum())
        else:
            raise ValueError(kind)
        if bos is not None and L:
            d[0] = bos
        decoys.append(d.astype(np.int64))
        total += L
    return decoys


def run_decoys(server: ModelView, truth: Truth, traffic: list[np.ndarray], ngram: NgramModel, n_tokens: int,
               kind: str = "uniform", ratio: float = 1.0, *, model_name: str = "", bos: int | None = None,
               time_budget: float | None = None) -> AttackResult:
    """Frequency analysis on real traffic mixed with decoys, before and after the server filters decoys.

    ``recovered`` is the better of the two: a defence cannot count on the server picking the
    worse strategy (the filter also drops real requests the model finds unlikely)."""
    from eecompile.audit.text import take_tokens

    token_input = server.token_input
    perm = truth.vocab_perm(token_input)
    real = take_tokens(traffic, n_tokens)
    decoys = make_decoys(real, kind, ngram.unigram + 1.0, ratio, bos=bos)
    docs = real + decoys
    is_decoy = np.array([False] * len(real) + [True] * len(decoys))
    order = np.random.default_rng(1).permutation(len(docs))
    docs, is_decoy = [docs[i] for i in order], is_decoy[order]
    cipher = [truth.encrypt_ids(token_input, d) for d in docs]
    real_cipher = [c for c, dec in zip(cipher, is_decoy) if not dec]
    with Timer() as t:
        mixed = frequency_attack(cipher, ngram, time_budget=time_budget)
        nll = request_nll(server, cipher)
        # the server's filter: two-means on the per-request NLL; when the two clusters are well
        # separated (bimodal), it keeps the likelier one, otherwise it keeps everything
        thr = _two_means_threshold(nll)
        lo, hi = nll[nll <= thr], nll[nll > thr]
        separation = float((hi.mean() - lo.mean()) / np.sqrt((lo.var() + hi.var()) / 2 + 1e-12)) \
            if len(lo) > 1 and len(hi) > 1 else 0.0
        filters = separation > 2.0
        kept = [c for c, v in zip(cipher, nll) if v <= thr] if filters else cipher
        filtered = frequency_attack(kept, ngram, time_budget=time_budget) if filters else mixed
    flagged = nll > thr
    detection = float(np.mean(flagged == is_decoy))
    acc_mixed = token_accuracy(mixed.mapping, real_cipher, perm)
    acc_filtered = token_accuracy(filtered.mapping, real_cipher, perm)
    return AttackResult(
        attack="frequency analysis with decoy traffic",
        side_knowledge=(f"{ratio:g} {kind} decoy token(s) per real token mixed into {n_tokens} real tokens; "
                        "the server scores each request with its own model and, when the scores split in two "
                        "clusters, drops the unlikely one"),
        target="token ids (vocabulary permutation)", recovered=max(acc_mixed, acc_filtered), seconds=t.seconds,
        metric="fraction of real traffic tokens decrypted (the better of attacking the whole mix and attacking "
               "what the server's decoy filter keeps)",
        regime=MITIGATION, model=model_name,
        details={"decoys": kind, "decoy_tokens_per_real_token": ratio, "compute_overhead": ratio,
                 "recovered_without_filtering": acc_mixed, "recovered_after_filtering": acc_filtered,
                 "decoy_detection_accuracy": detection,
                 "server_filters": filters, "nll_cluster_separation": separation,
                 "real_nll_mean": float(nll[~is_decoy].mean()), "decoy_nll_mean": float(nll[is_decoy].mean())})


def _two_means_threshold(values: np.ndarray) -> float:
    lo, hi = float(np.min(values)), float(np.max(values))
    thr = (lo + hi) / 2
    for _ in range(50):
        a, b = values[values <= thr], values[values > thr]
        if len(a) == 0 or len(b) == 0:
            break
        new = (a.mean() + b.mean()) / 2
        if abs(new - thr) < 1e-9:
            break
        thr = new
    return thr


def workdir(prefix: str = "eecompile-audit-") -> Path:
    """A fresh temporary directory for re-keyed models."""
    return Path(tempfile.mkdtemp(prefix=prefix))


__all__ = ["full_rekey", "vocab_only_rekey", "linking_attack", "run_rekey_and_link", "run_rotation",
           "run_decoys", "request_nll", "make_decoys", "true_link", "workdir"]
