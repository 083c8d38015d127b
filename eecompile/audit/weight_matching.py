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
