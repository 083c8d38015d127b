"""Frequency analysis of encrypted token ids (the vocabulary permutation is a substitution cipher).

The server sees every request's token ids, encrypted by one secret permutation of the
vocabulary. Side knowledge: the model's public tokenizer and English text that is *disjoint*
from the traffic (the attacker's reference corpus). The attack:

1. **unigram ranks** — the i-th most frequent ciphertext id is guessed to be the i-th most
   frequent token of the reference corpus;
2. **bigram hill-climbing** — swap the guesses of two ciphertext ids whenever that raises the
   log-likelihood of the observed ciphertext bigrams under a smoothed bigram model of the
   reference corpus; every swap's exact gain is computed for all partners at once from two
   running ``V x V`` score tables (rank-one updates after each accepted swap);
3. **trigram refinement** — the same moves, restricted to the best bigram candidates, scored
   by an interpolated trigram model of the reference corpus over the ciphertext trigrams.

The figure reported is the fraction of traffic tokens (with multiplicity) whose plaintext
the final guess gets right.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from eecompile.audit.result import AttackResult, Timer

MAX_DENSE_VOCAB = 8192


@dataclass
class NgramModel:
    """Smoothed n-gram statistics of the attacker's reference corpus."""

    vocab_size: int
    unigram: np.ndarray  # counts
    bigram_logp: np.ndarray  # [V, V] float32, log P(q | p)
    trigram_keys: np.ndarray  # sorted p*V*V + q*V + r
    trigram_logp: np.ndarray  # log P(r | p, q) for those keys (interpolated)
    tokens: int

    @classmethod
    def fit(cls, docs: list[np.ndarray], vocab_size: int, lam2: float = 0.5, lam3: float = 0.6) -> "NgramModel":
        V = vocab_size
        uni = np.zeros(V)
        big = np.zeros((V, V))
        tri_keys = []
        for d in docs:
            d = np.asarray(d, dtype=np.int64)
            uni += np.bincount(d, minlength=V)[:V]
            if len(d) > 1:
                np.add.at(big, (d[:-1], d[1:]), 1.0)
            if len(d) > 2:
                tri_keys.append(d[:-2] * V * V + d[1:-1] * V + d[2:])
        total = uni.sum()
        p_uni = (uni + 0.1) / (total + 0.1 * V)
        row = big.sum(axis=1, keepdims=True)
        p_cond = np.where(row > 0, big / np.maximum(row, 1), 0.0)
        # interpolate with the unigram: rows with few observations lean on it
        w = lam2 * row / (row + 2.0)
        bigram = w * p_cond + (1 - w) * p_uni[None, :]
        logp2 = np.log(bigram).astype(np.float32)
        keys = np.concatenate(tri_keys) if tri_keys else np.zeros(0, dtype=np.int64)
        ukeys, counts = np.unique(keys, return_counts=True)
        ctx = ukeys // V  # p*V + q
        uctx, inv, ctx_counts = np.unique(ctx, return_inverse=True, return_counts=True)
        ctx_total = np.bincount(inv, weights=counts)
        q = ctx % V
        r = ukeys % V
        w3 = lam3 * ctx_total[inv] / (ctx_total[inv] + 2.0)
        p3 = w3 * counts / ctx_total[inv] + (1 - w3) * bigram[q, r]
        return cls(V, uni, logp2, ukeys, np.log(p3).astype(np.float32), int(total))

    def trigram_scores(self, p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        """log P(r | p, q): the interpolated trigram where seen, else the bigram log P(r | q)."""
        V = self.vocab_size
        keys = p * V * V + q * V + r
        out = self.bigram_logp[q, r].astype(np.float64)
        if len(self.trigram_keys):
            pos = np.searchsorted(self.trigram_keys, keys)
            pos = np.minimum(pos, len(self.trigram_keys) - 1)
            hit = self.trigram_keys[pos] == keys
            out[hit] = self.trigram_logp[pos[hit]]
        return out


@dataclass
class CipherStats:
    """Counts of the ciphertext traffic."""

    unigram: np.ndarray
    bigram: np.ndarray  # [V, V] float32
    trigrams: np.ndarray  # [n, 3] cipher ids (distinct trigrams)
    trigram_counts: np.ndarray
    tokens: int

    @classmethod
    def count(cls, docs: list[np.ndarray], vocab_size: int) -> "CipherStats":
        V = vocab_size
        uni = np.zeros(V)
        big = np.zeros((V, V), dtype=np.float32)
        tri = []
        for d in docs:
            d = np.asarray(d, dtype=np.int64)
            uni += np.bincount(d, minlength=V)[:V]
            if len(d) > 1:
                np.add.at(big, (d[:-1], d[1:]), 1.0)
            if len(d) > 2:
                tri.append(d[:-2] * V * V + d[1:-1] * V + d[2:])
        keys = np.concatenate(tri) if tri else np.zeros(0, dtype=np.int64)
        ukeys, counts = np.unique(keys, return_counts=True)
        trigrams = np.stack([ukeys // (V * V), (ukeys // V) % V, ukeys % V], axis=1) if len(ukeys) else \
            np.zeros((0, 3), dtype=np.int64)
        return cls(uni, big, trigrams, counts.astype(np.float64), int(uni.sum()))


@dataclass
class FrequencyGuess:
    """The attacker's guess ``plain = mapping[cipher]`` and how each stage scored (no ground truth)."""

    mapping: np.ndarray
    stages: dict[str, np.ndarray] = field(default_factory=dict)
    swaps: dict[str, int] = field(default_factory=dict)


def unigram_guess(stats: CipherStats, model: NgramModel, seed: int = 0) -> np.ndarray:
    """Rank matching: the i-th most frequent ciphertext id -> the i-th most frequent reference token
    (ties among ciphertext ids broken at random, seeded)."""
    V = model.vocab_size
    c_order = np.lexsort((np.random.default_rng(seed).permutation(V), -stats.unigram))
    p_order = np.lexsort((np.arange(V), -model.unigram))
    mapping = np.empty(V, dtype=np.int64)
    mapping[c_order] = p_order
    return mapping


class _Trigrams:
    """Ciphertext trigrams indexed by the ids they contain, scored under a mapping."""

    def __init__(self, stats: CipherStats, model: NgramModel) -> None:
        V = model.vocab_size
        self.T, self.cnt, self.model = stats.trigrams, stats.trigram_counts, model
        flat = self.T.ravel()
        owner = np.repeat(np.arange(len(self.T)), 3)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(V + 1))
        self.by_id = [np.unique(owner[order[bounds[i]:bounds[i + 1]]]) for i in range(V)]

    def gain(self, m: np.ndarray, a: int, b: int) -> float:
        """Trigram log-likelihood gain of swapping the guesses of ids ``a`` and ``b``."""
        idx = np.union1d(self.by_id[a], self.by_id[b])
        if len(idx) == 0:
            return 0.0
        t = self.T[idx]
        before = self.model.trigram_scores(m[t[:, 0]], m[t[:, 1]], m[t[:, 2]])
        m[a], m[b] = m[b], m[a]
        after = self.model.trigram_scores(m[t[:, 0]], m[t[:, 1]], m[t[:, 2]])
        m[a], m[b] = m[b], m[a]
        return float(np.dot(self.cnt[idx], after - before))


def climb(stats: CipherStats, model: NgramModel, mapping: np.ndarray, sweeps: int = 8,
          trigrams: _Trigrams | None = None, candidates: int = 6,
          deadline: float | None = None, temperatures: list[float] | None = None,
          seed: int = 0) -> tuple[np.ndarray, int]:
    """Greedy swap hill-climbing; returns (mapping, swaps accepted).

    Every swap's exact bigram gain is computed for all partners of an id at once. Without
    ``trigrams`` the best positive bigram gain is taken; with them the ``candidates`` best
    bigram partners are re-scored by the trigram model and the best positive trigram gain wins.
    """
    V = model.vocab_size
    S = model.bigram_logp
    C = stats.bigram
    m = mapping.copy()
    seen = np.flatnonzero(stats.unigram > 0)
    # K_out[x, r] = sum_y C[x, y] S[r, m_y];  K_in[x, r] = sum_y C[y, x] S[m_y, r]
    K_out = (C @ S[:, m].T).astype(np.float64)
    K_in = (C.T @ S[m, :]).astype(np.float64)
    K = K_out + K_in
    diagC = np.diag(C).astype(np.float64)
    order = seen[np.argsort(-stats.unigram[seen])]
    arange = np.arange(V)
    total = 0
    rng = np.random.default_rng(seed)
    schedule = list(temperatures or []) + [0.0] * sweeps
    for sweep, temp in enumerate(schedule):
        accepted = 0
        for a in order:
            if deadline is not None and time.perf_counter() > deadline:
                return m, total
            p = m[a]
            q = m  # q[b] = m_b for every candidate b
            Cab, Cba, Cbb, Caa = C[a, :], C[:, a], diagC, diagC[a]
            Spq, Sqp = S[p, q], S[q, p]
            Sqq, Spp = S[q, q], S[p, p]
            new = (K_out[a, q] - Caa * Sqp - Cab * Sqq
                   + K_out[:, p] - Cba * Spp - Cbb * Spq
                   + K_in[a, q] - Caa * Spq - Cba * Sqq
                   + K_in[:, p] - Cab * Spp - Cbb * Sqp
                   + Caa * Sqq + Cab * Sqp + Cba * Spq + Cbb * Spp)
            old = (K[a, p] - Caa * Spp - Cab * Spq
                   + K_out[arange, q] - Cba * Sqp - Cbb * Sqq
                   - Caa * Spp - Cba * Sqp
                   + K_in[arange, q] - Cab * Spq - Cbb * Sqq
                   + Caa * Spp + Cab * Spq + Cba * Sqp + Cbb * Sqq)
            delta = new - old
            delta[a] = -np.inf
            if trigrams is None and temp > 0:
                delta[a] = 0.0  # "no swap" is one of the choices
                w = np.exp((delta - delta.max()) / temp)
                b = int(rng.choice(V, p=w / w.sum()))
                if b == a:
                    continue
            elif trigrams is None:
                b = int(np.argmax(delta))
                if delta[b] <= 1e-6:
                    continue
            else:
                top = np.argpartition(-delta, candidates)[:candidates]
                gains = [trigrams.gain(m, a, int(b)) for b in top]
                k = int(np.argmax(gains))
                if gains[k] <= 1e-6:
                    continue
                b = int(top[k])
            qb = m[b]
            m[a], m[b] = qb, p
            # rank-one updates of the score tables
            col = (C[:, a] - C[:, b]).astype(np.float64)
            rows = np.flatnonzero(col)
            if len(rows):
                K_out[rows] += np.outer(col[rows], S[:, qb] - S[:, p])
            row = (C[a, :] - C[b, :]).astype(np.float64)
            rows2 = np.flatnonzero(row)
            if len(rows2):
                K_in[rows2] += np.outer(row[rows2], S[qb, :] - S[p, :])
            touched = np.union1d(rows, rows2)
            K[touched] = K_out[touched] + K_in[touched]
            accepted += 1
        total += accepted
        if accepted == 0 and temp == 0.0:
            break
    return m, total


def bigram_loglik(stats: CipherStats, model: NgramModel, mapping: np.ndarray) -> float:
    """Log-likelihood of the ciphertext bigrams under the reference model, given a guess."""
    C = stats.bigram
    rows, cols = np.nonzero(C)
    return float(np.dot(C[rows, cols], model.bigram_logp[mapping[rows], mapping[cols]]))


def frequency_attack(cipher_docs: list[np.ndarray], model: NgramModel, *, trigram: bool = True,
                     sweeps: int = 8, time_budget: float | None = None,
                     temperatures: list[float] | None = None, restarts: int = 1) -> FrequencyGuess:
    """Recover ``plain = mapping[cipher]`` from ciphertext traffic and reference statistics only."""
    if model.vocab_size > MAX_DENSE_VOCAB:
        raise ValueError(f"vocabularies above {MAX_DENSE_VOCAB} ids are not supported by the dense attack")
    deadline = None if time_budget is None else time.perf_counter() + time_budget
    stats = CipherStats.count(cipher_docs, model.vocab_size)
    guess = FrequencyGuess(unigram_guess(stats, model))
    guess.stages["unigram"] = guess.mapping.copy()
    best, best_score, total = None, -np.inf, 0
    for r in range(max(1, restarts)):
        start = guess.mapping if r == 0 else unigram_guess(stats, model, seed=r)
        m, n = climb(stats, model, start, sweeps=sweeps, deadline=deadline, temperatures=temperatures)
        score = bigram_loglik(stats, model, m)
        total += n
        if score > best_score:
            best, best_score = m, score
    m = best
    guess.stages["bigram"], guess.swaps["bigram"] = m.copy(), total
    if trigram and len(stats.trigrams):
        m, n = climb(stats, model, m, sweeps=3, trigrams=_Trigrams(stats, model), deadline=deadline)
        guess.stages["trigram"], guess.swaps["trigram"] = m.copy(), n
    guess.mapping = m
    return guess


def token_accuracy(mapping: np.ndarray, cipher_docs: list[np.ndarray], truth_perm: np.ndarray) -> float:
    """Fraction of traffic tokens decrypted correctly (``truth_perm[cipher]`` is the plaintext)."""
    ids = np.concatenate([np.asarray(d) for d in cipher_docs]) if cipher_docs else np.zeros(0, dtype=np.int64)
    if len(ids) == 0:
        return 0.0
    return float(np.mean(mapping[ids] == truth_perm[ids]))


def run_frequency(traffic: list[np.ndarray], reference: list[np.ndarray], encrypt, truth_perm: np.ndarray,
                  vocab_size: int, n_tokens: int, *, model_name: str = "", corpus: str = "",
                  ngram: NgramModel | None = None, time_budget: float | None = None,
                  side: str = "", repeats: int = 1, seed: int = 0) -> AttackResult:
    """Encrypt the first ``n_tokens`` of ``traffic`` (the clients), attack, score against the truth.

    With ``repeats > 1`` the same traffic is also attacked under ``repeats - 1`` other keys
    (the ciphertext relabelled by random permutations): the search's outcome varies with the
    key, so ``recovered`` is the mean and the details give each run.
    """
    from eecompile.audit.text import take_tokens

    plain_docs = take_tokens(traffic, n_tokens)
    cipher_docs = [encrypt(d) for d in plain_docs]
    fit_seconds = 0.0
    if ngram is None:
        with Timer() as t_fit:
            ngram = NgramModel.fit(reference, vocab_size)
        fit_seconds = t_fit.seconds
    rng = np.random.default_rng(seed)
    runs, seconds = [], []
    for k in range(max(1, repeats)):
        sigma = np.arange(vocab_size) if k == 0 else rng.permutation(vocab_size)
        docs = [sigma[d] for d in cipher_docs]
        truth = truth_perm[np.argsort(sigma)]
        with Timer() as t:
            guess = frequency_attack(docs, ngram, time_budget=time_budget)
        seconds.append(t.seconds)
        runs.append({k2: token_accuracy(v, docs, truth) for k2, v in guess.stages.items()})
        if k == 0:
            ids = np.concatenate(docs)
            seen = np.unique(ids)
            vocab_right = float(np.mean(guess.mapping[seen] == truth[seen]))
    n = int(sum(len(d) for d in cipher_docs))
    last = list(runs[0])[-1]
    final = [r[last] for r in runs]
    stage_acc = {k2: float(np.mean([r[k2] for r in runs])) for k2 in runs[0]}
    return AttackResult(
        attack="frequency analysis",
        side_knowledge=side or (f"public tokenizer; disjoint English reference text ({ngram.tokens} tokens"
                                f"{', ' + corpus if corpus else ''}); {n} encrypted traffic tokens"),
        target="token ids (vocabulary permutation)",
        recovered=float(np.mean(final)),
        seconds=float(np.mean(seconds)) + fit_seconds,
        metric="fraction of traffic tokens decrypted",
        regime="no base model",
        model=model_name,
        details={"N": n, "distinct_ids_seen": int(len(seen)), "seen_ids_right": vocab_right,
                 "stages": stage_acc, "keys": len(runs), "per_key": final, "min": float(np.min(final)),
                 "max": float(np.max(final)), "random_baseline": 1.0 / vocab_size,
                 "reference_tokens": ngram.tokens, "reference_fit_seconds": fit_seconds},
    )


# -- traffic the server makes itself --------------------------------------------------------
def sample_from_server(server, n_tokens: int, start_ids: np.ndarray, length: int = 64, batch: int = 128,
                       seed: int = 0, logits_output: str | None = None) -> list[np.ndarray]:
    """Sample ``n_tokens`` of ciphertext from the server's own model, in ciphertext ids.

    A decoder's token ids and its logits share one vocabulary permutation, so sampling an index
    from the encrypted logits yields a valid encrypted token id to feed back: the server can
    produce unlimited ciphertext with the statistics of the model's training text, without a
    single client request. ``start_ids`` are first tokens seen in real requests (e.g. the
    encrypted ``<s>``). Uses the model's KV cache when it has one.
    """
    rng = np.random.default_rng(seed)
    names = server.output_names
    logits_name = logits_output or names[0]
    length = min(length, server.max_positions or length)
    info = server.input_info()
    past_in = [n for n in server.input_names if "past" in n]
    present_out = {n: n.replace("past_key_values", "present") for n in past_in}
    use_cache = bool(past_in) and all(p in names for p in present_out.values())
    sess = server.session()
    out: list[np.ndarray] = []
    total = 0
    while total < n_tokens:
        b = int(min(batch, max(1, -(-(n_tokens - total) // length))))
        seqs = np.empty((b, length), dtype=np.int64)
        seqs[:, 0] = rng.choice(np.asarray(start_ids, dtype=np.int64), size=b)
        feeds = server.lm_feeds(seqs[:, :1])
        for t in range(1, length):
            if use_cache:
                res = dict(zip(names, sess.run(names, feeds)))
                logits = res[logits_name][:, -1, :]
            else:
                logits = sess.run([logits_name], server.lm_feeds(seqs[:, :t]))[0][:, -1, :]
            g = rng.gumbel(size=logits.shape)
            seqs[:, t] = np.argmax(logits.astype(np.float64) + g, axis=1)
            if use_cache:
                feeds = {n: res[present_out[n]] for n in past_in}
                for name in info:
                    if name == server.token_input:
                        feeds[name] = seqs[:, t:t + 1]
                    elif "mask" in name:
                        feeds[name] = np.ones((b, t + 1), dtype=np.int64)
                    elif "position" in name:
                        feeds[name] = np.full((b, 1), t, dtype=np.int64)
        for row in seqs:
            out.append(row)
        total += b * length
    return out


def run_generated_frequency(server, reference: list[np.ndarray], truth_perm: np.ndarray, n_tokens: int,
                            start_ids: np.ndarray, *, ngram: NgramModel | None = None,
                            candidates: dict[str, NgramModel] | None = None, model_name: str = "",
                            eval_docs: list[np.ndarray] | None = None, encrypt=None,
                            time_budget: float | None = None, seed: int = 0) -> AttackResult:
    """Frequency analysis on ciphertext the server sampled from its own model (no client traffic).

    The model's text need not look like the attacker's reference text, so with several
    ``candidates`` (reference corpora) the attacker deciphers with each and keeps the
    decipherment whose bigram log-likelihood per token is highest (computable without any
    secret). Scored on ``eval_docs`` (real traffic, encrypted by ``encrypt``) when given — the
    fraction of real traffic the recovered table decrypts — else on the generated text itself.
    """
    vocab_size = len(truth_perm)
    if ngram is None:
        ngram = NgramModel.fit(reference, vocab_size)
    candidates = candidates or {"reference": ngram}
    with Timer() as t_gen:
        cipher_docs = sample_from_server(server, n_tokens, start_ids, seed=seed)
    stats = CipherStats.count(cipher_docs, vocab_size)
    tokens = max(1.0, float(stats.bigram.sum()))
    tried = {}
    with Timer() as t:
        for label, model in candidates.items():
            guess = frequency_attack(cipher_docs, model, time_budget=time_budget)
            tried[label] = (guess, bigram_loglik(stats, model, guess.mapping) / tokens)
        chosen = max(tried, key=lambda k: tried[k][1])
    guess = tried[chosen][0]
    scored = [encrypt(d) for d in eval_docs] if eval_docs is not None else cipher_docs
    stage_acc = {k: token_accuracy(v, scored, truth_perm) for k, v in guess.stages.items()}
    n = int(sum(len(d) for d in cipher_docs))
    per_reference = {k: {"loglik_per_bigram": v[1], "recovered": token_accuracy(v[0].mapping, scored, truth_perm)}
                     for k, v in tried.items()}
    return AttackResult(
        attack="frequency analysis (server-generated text)",
        side_knowledge=(f"no client traffic: {n} tokens sampled from the encrypted model itself; public tokenizer; "
                        f"disjoint English reference text ({', '.join(candidates)}; the best-fitting one kept)"),
        target="token ids (vocabulary permutation)",
        recovered=stage_acc[list(guess.stages)[-1]],
        seconds=t.seconds + t_gen.seconds,
        metric="fraction of real traffic tokens decrypted" if eval_docs is not None
        else "fraction of generated tokens decrypted",
        regime="no base model", model=model_name,
        details={"generated_tokens": n, "generation_seconds": t_gen.seconds, "attack_seconds": t.seconds,
                 "stages": stage_acc, "reference_chosen": chosen, "per_reference": per_reference,
                 "random_baseline": 1.0 / vocab_size},
    )
