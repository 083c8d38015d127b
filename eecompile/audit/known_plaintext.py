"""Known-plaintext attacks: pairs of (plaintext, what the server saw) reveal the basis.

* **Protected continuous input** (an MLP's features, a CNN's image channels): the server sees
  ``x' = x T``. ``k`` known pairs give ``T`` by least squares as soon as they span the
  space (``k >= d`` vectors; a CNN image gives one vector per pixel, so one image is enough).
  The figure is the fraction of fresh ciphertexts the estimate decrypts (relative error
  below 5 %), reported against ``k``.
* **Ciphertext only** (no pairs, the input distribution's second moments known): matching
  covariances fixes ``T`` only up to an unknown orthogonal factor; measured the same way.
* **Language model, base model known**: ``k`` positions of known prompt text; the server
  holds their residual-stream states ``H' = H Q`` and computes ``H`` with the base model, so
  ``Q`` follows by least squares once ``k >= hidden``; the estimate of ``Q`` then maps the
  encrypted embedding table back onto the base one, recovering the vocabulary.
* **Language model, no base model**: ``k`` known (token, encrypted id) pairs only fill in a
  partial substitution table; the figure is the fraction of later traffic it decrypts.
"""

from __future__ import annotations

import numpy as np

from eecompile.audit.matching import _nearest
from eecompile.audit.result import KNOWN_BASE, NO_BASE, AttackResult, Timer
from eecompile.audit.server import ModelView, Truth

TOLERANCE = 0.05  # relative error under which a decrypted input counts as recovered


METRIC = "fraction of fresh inputs decrypted to within 5 % relative error"


def _rows(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _input_shape(server: ModelView, name: str, batch: int) -> list[int]:
    dims, _ = server.input_info()[name]
    return [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 8) for i, d in enumerate(dims)]


def _decrypted_fraction(T_hat: np.ndarray, X: np.ndarray, Xc: np.ndarray, samples: int) -> float:
    """Fraction of samples (row groups) whose decryption with ``T_hat`` is within TOLERANCE."""
    X_hat = Xc @ np.linalg.pinv(T_hat)
    per = X.shape[0] // samples
    err = np.linalg.norm((X_hat - X).reshape(samples, per, -1), axis=(1, 2))
    ref = np.linalg.norm(X.reshape(samples, per, -1), axis=(1, 2)) + 1e-30
    return float(np.mean(err / ref < TOLERANCE))


def run_known_plaintext_input(server: ModelView, truth: Truth, *, model_name: str = "",
                              ks: list[int] | None = None, seed: int = 0) -> list[AttackResult]:
    """Least-squares recovery of each protected continuous input's basis from ``k`` pairs."""
    rng = np.random.default_rng(seed)
    results = []
    for t in truth.continuous_inputs():
        if t.head_axis is not None:
            continue
        d = t.heads[0].size
        T_true = t.heads[0].right(np.eye(d))
        ks_here = ks or sorted({1, 2, max(1, d // 4), max(1, d // 2), max(1, d - 1), d, d + 1, 2 * d})
        held = 64
        Xh = rng.standard_normal(_input_shape(server, t.name, held)).astype(np.float32)
        Xh_c = truth.client.encrypt({t.name: Xh})[t.name]
        Xh_rows, Xh_c_rows = _rows(Xh, t.axis), _rows(Xh_c, t.axis)
        curve = []
        for k in ks_here:
            X = rng.standard_normal(_input_shape(server, t.name, k)).astype(np.float32)
            Xc = truth.client.encrypt({t.name: X})[t.name]
            with Timer() as timer:
                T_hat = np.linalg.lstsq(_rows(X, t.axis), _rows(Xc, t.axis), rcond=None)[0]
            err = float(np.linalg.norm(T_hat - T_true) / np.linalg.norm(T_true))
            frac = _decrypted_fraction(T_hat, Xh_rows, Xh_c_rows, held)
            curve.append({"k": k, "basis_relative_error": err, "decrypted": frac, "seconds": timer.seconds})
        first_full = next((c["k"] for c in curve if c["decrypted"] == 1.0), None)
        best = curve[-1]
        results.append(AttackResult(
            attack="known plaintext",
            side_knowledge=f"k plaintext/ciphertext pairs of input '{t.name}' (k = {ks_here[-1]} here)",
            target=f"basis of input '{t.name}' ({t.basis or 'dense'}, {d}-dimensional)",
            recovered=best["decrypted"], seconds=best["seconds"],
            metric=METRIC,
            regime=NO_BASE, model=model_name,
            details={"curve": curve, "smallest_k_decrypting_all": first_full, "dimension": d,
                     "rows_per_input": int(_rows(Xh, t.axis).shape[0] // held)}))
        # ciphertext only: covariance matching (input distribution known, no pairs)
        n = max(4 * d, 256)
        X = rng.standard_normal(_input_shape(server, t.name, n)).astype(np.float32)
        Xc = truth.client.encrypt({t.name: X})[t.name]
        with Timer() as timer:
            cov_plain = np.eye(d)  # the attacker's knowledge: standard normal inputs
            Rc = _rows(Xc, t.axis)
            cov_c = Rc.T @ Rc / len(Rc)
            w, v = np.linalg.eigh(cov_c)
            T_hat = np.linalg.inv(np.linalg.cholesky(cov_plain)).T @ (v * np.sqrt(np.maximum(w, 0))) @ v.T
        frac = _decrypted_fraction(T_hat, Xh_rows, Xh_c_rows, held)
        err = float(np.linalg.norm(T_hat - T_true) / np.linalg.norm(T_true))
        results.append(AttackResult(
            attack="known plaintext",
            side_knowledge=f"ciphertexts only ({n} inputs) and the input distribution's second moments",
            target=f"basis of input '{t.name}' ({t.basis or 'dense'}, {d}-dimensional)",
            recovered=frac, seconds=timer.seconds,
            metric=METRIC,
            regime=NO_BASE, model=model_name,
            details={"basis_relative_error": err, "note": "second moments fix the basis only up to an orthogonal factor"}))
    return results


def run_known_plaintext_lm(server: ModelView, attacker: ModelView | None, plain_docs: list[np.ndarray],
                           encrypt, truth_perm: np.ndarray, original_embedding: np.ndarray, *,
                           model_name: str = "", ks: list[int] | None = None, window: int = 64,
                           regime: str = KNOWN_BASE, side_knowledge: str = "") -> AttackResult:
    """Known prompt text against a language model (see the module docstring)."""
    d = server.embedding.shape[1]
    window = min(window, server.max_positions or window)
    ids = [np.asarray(doc[:window], dtype=np.int64) for doc in plain_docs if len(doc) >= 2]
    if attacker is None:
        return _known_tokens(ids, encrypt, truth_perm, model_name, ks)
    ks = ks or sorted({d // 4, d // 2, d - 1, d, 2 * d, 4 * d})
    tensor_s = server.residual_chain[-1]
    tensor_a = attacker.residual_chain[-1]
    # the states the server holds for known prompts, and the attacker's plaintext states for them
    total = max(ks)
    rows_c, rows_p = [], []
    for doc in ids:
        if sum(len(r) for r in rows_c) >= total:
            break
        rows_c.append(server.hidden_states(encrypt(doc)[None, :], [tensor_s])[0][0])
        rows_p.append(attacker.hidden_states(doc[None, :], [tensor_a])[0][0])
    Hc, Hp = np.concatenate(rows_c), np.concatenate(rows_p)
    curve = []
    with Timer() as timer_all:
        for k in ks:
            k = min(k, len(Hc))
            with Timer() as timer:
                Q_hat = np.linalg.lstsq(Hp[:k], Hc[:k], rcond=None)[0]
                # map the encrypted embedding back and match it against the known table
                back = server.embedding @ np.linalg.pinv(Q_hat)
                guess, _ = _nearest(back, attacker.embedding)
            q_true = np.linalg.lstsq(original_embedding[truth_perm], server.embedding, rcond=None)[0]
            curve.append({"k": k, "vocab_recovered": float(np.mean(guess == truth_perm)),
                          "basis_relative_error": float(np.linalg.norm(Q_hat - q_true) / np.linalg.norm(q_true)),
                          "seconds": timer.seconds})
    best = max(curve, key=lambda c: (c["vocab_recovered"], -c["k"]))
    first = next((c["k"] for c in curve if c["vocab_recovered"] >= 0.99), None)
    return AttackResult(
        attack="known plaintext",
        side_knowledge=side_knowledge or f"k known prompt positions (k up to {curve[-1]['k']}) and the base model",
        target="residual-stream basis, hence the vocabulary (via the embedding table)",
        recovered=best["vocab_recovered"], seconds=best["seconds"],
        metric="fraction of vocabulary ids recovered",
        regime=regime, model=model_name,
        details={"curve": curve, "smallest_k_recovering_99pct": first, "hidden": d, "tensor": tensor_s,
                 "total_seconds": timer_all.seconds})


def _known_tokens(ids: list[np.ndarray], encrypt, truth_perm: np.ndarray, model_name: str,
                  ks: list[int] | None) -> AttackResult:
    stream = np.concatenate(ids)
    cipher = encrypt(stream)
    ks = ks or [10, 100, 1000, 10000]
    ks = [k for k in ks if k < len(stream) // 2] or [len(stream) // 2]
    curve = []
    for k in ks:
        with Timer() as timer:
            table = np.full(len(truth_perm), -1, dtype=np.int64)
            table[cipher[:k]] = stream[:k]
            rest = cipher[k:]
            right = float(np.mean(table[rest] == truth_perm[rest]))
        curve.append({"k": k, "later_traffic_decrypted": right, "ids_known": int(np.sum(table >= 0)),
                      "seconds": timer.seconds})
    best = curve[-1]
    return AttackResult(
        attack="known plaintext",
        side_knowledge=f"k known (token, encrypted id) pairs, no model weights (k up to {best['k']})",
        target="token ids (vocabulary permutation)",
        recovered=best["later_traffic_decrypted"], seconds=best["seconds"],
        metric="fraction of later traffic tokens decrypted",
        regime=NO_BASE, model=model_name, details={"curve": curve})
