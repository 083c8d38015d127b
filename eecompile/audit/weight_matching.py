"""Weight matching: recover the vocabulary permutation and the residual basis from the weights.

The server holds the encrypted embedding table ``E' = E[perm] @ Q`` (rows permuted by the
vocabulary permutation, columns mixed by the residual-stream basis ``Q``). A server that
knows the public base model holds ``E`` too. Row norms and the Gram matrix are invariant
under an orthogonal ``Q`` (and whitened tables under any invertible one), so the rows can be
matched without knowing ``Q`` (:func:`~eecompile.audit.matching.match_rows`); ``Q`` then
follows by orthogonal Procrustes / least squares.

Without the base model (a privately fine-tuned model), the attacker matches against the
closest public model it has; how much that recovers depends on how far the private weights
moved, which the audit measures.
"""

from __future__ import annotations

import numpy as np

from eecompile.audit.matching import RowMatch, match_rows
from eecompile.audit.result import AttackResult, Timer
from eecompile.audit.server import ModelView


def weight_matching(server: ModelView, known_embedding: np.ndarray, group: str = "auto") -> RowMatch:
    """The attack proper: only the server's weights and a known (public) embedding table."""
    return match_rows(server.embedding, known_embedding, group=group)


def true_basis(server: ModelView, original_embedding: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The residual basis ``Q`` with ``E' = E[perm] Q`` (for scoring; exact up to rounding)."""
    return np.linalg.lstsq(original_embedding[perm], server.embedding, rcond=None)[0]


def basis_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Relative Frobenius error ``||T_hat - T|| / ||T||``."""
    return float(np.linalg.norm(estimate - truth) / (np.linalg.norm(truth) + 1e-30))


def run_weight_matching(server: ModelView, attacker_embedding: np.ndarray, original_embedding: np.ndarray,
                        truth_perm: np.ndarray, *, regime: str, side_knowledge: str,
                        model_name: str = "") -> AttackResult:
    """Run :func:`weight_matching` with the attacker's table; score with the original model and the client.

    The match itself is kept in ``result.match`` (not serialised) for attacks that build on it.
    """
    with Timer() as t:
        match = weight_matching(server, attacker_embedding)
    recovered = float(np.mean(match.perm == truth_perm))
    q_true = true_basis(server, original_embedding, truth_perm)
    err = basis_error(match.transform, q_true)
    result = AttackResult(
        attack="weight matching",
        side_knowledge=side_knowledge,
        target="vocabulary permutation and residual basis (from the embedding table)",
        recovered=recovered,
        seconds=t.seconds,
        metric="fraction of vocabulary ids recovered",
        regime=regime,
        model=model_name,
        details={"vocab": int(len(truth_perm)), "hidden": int(server.embedding.shape[1]),
                 "basis_relative_error": err, "group": match.group, "fit_residual": match.residual,
                 "mutual_nn": match.mutual, "rounds": match.rounds,
                 "random_baseline": 1.0 / len(truth_perm)},
    )
    result.match = match  # type: ignore[attr-defined]
    return result


# -- continuous inputs: the first layer ---------------------------------------------------------
def first_layer(view: ModelView, input_name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W [in, out], b [out])`` of the Gemm/MatMul(+Add) that consumes ``input_name``, if any."""
    consumers = view.consumers.get(input_name, [])
    if len(consumers) != 1:
        return None
    node = consumers[0]
    if node.op_type == "Gemm" and len(node.input) >= 3 and view.is_const(node.input[1]) and view.is_const(node.input[2]):
        attrs = {a.name: a for a in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            return None
        W = view.array(node.input[1]).astype(np.float64)
        if "transB" in attrs and attrs["transB"].i:
            W = W.T
        b = np.broadcast_to(view.array(node.input[2]).astype(np.float64), (W.shape[1],))
        return W, np.asarray(b)
    if node.op_type == "MatMul" and view.is_const(node.input[1]):
        W = view.array(node.input[1]).astype(np.float64)
        adds = [n for n in view.consumers.get(node.output[0], []) if n.op_type == "Add"]
        if len(adds) == 1:
            const = [i for i in adds[0].input if view.is_const(i)]
            if const:
                return W, np.broadcast_to(view.array(const[0]).astype(np.float64), (W.shape[1],)).copy()
    return None


def first_layer_matching(server: ModelView, known: ModelView, input_name: str) -> np.ndarray | None:
    """Estimate the input basis ``T`` (``x' = x T``) from the first layer's weights.

    When the first layer's output space has a permutation basis (e.g. a LayerNorm follows),
    its bias is the known bias permuted: sorting both matches the permutation, and then
    ``T^-1 = W' P^-1 W^+``. Returns None when the layer is not of that kind (the attacker can
    tell: the sorted biases disagree)."""
    enc, base = first_layer(server, input_name), first_layer(known, input_name)
    if enc is None or base is None or enc[0].shape != base[0].shape or enc[0].shape[0] > enc[0].shape[1]:
        return None
    (W_enc, b_enc), (W, b) = enc, base
    order_enc, order = np.argsort(b_enc), np.argsort(b)
    if np.max(np.abs(b_enc[order_enc] - b[order])) > 0.5 * (np.std(b) + 1e-12):
        return None
    pi = np.empty(len(b), dtype=np.int64)
    pi[order_enc] = order  # b_enc[j] ~ b[pi[j]]
    M = np.empty_like(W_enc)
    M[:, pi] = W_enc  # = T^-1 W
    T_inv = M @ np.linalg.pinv(W)
    return np.linalg.inv(T_inv)


def run_first_layer_matching(server: ModelView, known: ModelView, truth, *, regime: str, side_knowledge: str,
                             model_name: str = "", seed: int = 0) -> list[AttackResult]:
    """:func:`first_layer_matching` on every protected continuous input; scored on fresh inputs."""
    from eecompile.audit.known_plaintext import METRIC, TOLERANCE, _input_shape, _rows

    results = []
    rng = np.random.default_rng(seed)
    for t in truth.continuous_inputs():
        if t.head_axis is not None:
            continue
        with Timer() as timer:
            T_hat = first_layer_matching(server, known, t.name)
        if T_hat is None:
            continue
        d = t.heads[0].size
        T_true = t.heads[0].right(np.eye(d))
        X = rng.standard_normal(_input_shape(server, t.name, 64)).astype(np.float32)
        Xc = truth.client.encrypt({t.name: X})[t.name]
        R, Rc = _rows(X, t.axis).reshape(64, -1, d), _rows(Xc, t.axis).reshape(64, -1, d)
        dec = Rc @ np.linalg.inv(T_hat)
        err = np.linalg.norm(dec - R, axis=(1, 2)) / (np.linalg.norm(R, axis=(1, 2)) + 1e-30)
        results.append(AttackResult(
            attack="weight matching", side_knowledge=side_knowledge,
            target=f"basis of input '{t.name}' (from the first layer's bias and weight)",
            recovered=float(np.mean(err < TOLERANCE)), seconds=timer.seconds,
            metric=METRIC, regime=regime, model=model_name,
            details={"basis_relative_error": basis_error(T_hat, T_true), "dimension": d,
                     "median_decryption_error": float(np.median(err))}))
    return results
