"""Matching the rows of two tables that differ by a row permutation and a basis change.

``A ≈ B[perm] @ T``: ``A`` is what the server holds (an encrypted embedding table), ``B`` a
table it knows (the public base model's, or an older encrypted version), ``perm`` the unknown
vocabulary permutation and ``T`` the unknown basis of the hidden space.

* ``T`` orthogonal: row norms and the Gram matrix ``B Bᵀ`` are invariant, so the left
  singular vectors of ``A`` are those of ``B`` permuted (up to one sign per column). Rows are
  matched on those coordinates (signs fixed by each column's third moment, magnitudes where
  the sign is unreliable), then ``T`` is solved by orthogonal Procrustes on the confident
  matches and every row re-matched against ``B T``, a few rounds.
* ``T`` any invertible matrix (monomial scales included): whitening each table,
  ``A (AᵀA)^{-1/2}``, leaves an orthogonal relation between the whitened tables, which is
  matched as above; ``T`` is then the least-squares solution.

Both are tried when the group is unknown; the one that explains ``A`` better wins (the
attacker can compute that residual without any secret).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RowMatch:
    """``A ≈ B[perm] @ T`` with ``perm[i]`` the row of ``B`` matched to row ``i`` of ``A``."""

    perm: np.ndarray
    transform: np.ndarray
    residual: float  # ||A - B[perm] T|| / ||A||
    group: str  # "orthogonal" or "linear"
    rounds: int
    mutual: float  # fraction of rows whose match is a mutual nearest neighbour


def procrustes(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Orthogonal ``T`` minimising ``||X T - Y||``."""
    u, _, vt = np.linalg.svd(X.T @ Y, full_matrices=False)
    return u @ vt


def _nearest(A: np.ndarray, B: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``A`` the index of its nearest row of ``B`` and the squared distance."""
    b2 = np.einsum("ij,ij->i", B, B)
    idx = np.empty(len(A), dtype=np.int64)
    dist = np.empty(len(A))
    for s in range(0, len(A), chunk):
        a = A[s:s + chunk]
        d = b2[None, :] - 2.0 * (a @ B.T)
        j = np.argmin(d, axis=1)
        idx[s:s + chunk] = j
        dist[s:s + chunk] = np.maximum(d[np.arange(len(a)), j] + np.einsum("ij,ij->i", a, a), 0.0)
    return idx, dist


def _thin_svd(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of a tall ``X`` (via the small Gram matrix)."""
    w, v = np.linalg.eigh(X.T @ X)
    order = np.argsort(w)[::-1]
    w, v = np.maximum(w[order], 0.0), v[:, order]
    s = np.sqrt(w)
    return (X @ v) / np.maximum(s, s.max() * 1e-12 + 1e-300), s


def _whiten(X: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(X.T @ X)
    w = np.maximum(w, w.max() * 1e-12)
    return X @ (v / np.sqrt(w)) @ v.T


def _spectral_descriptors(X: np.ndarray, k: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``U S`` on the top ``k`` singular directions whose singular value is isolated.

    Returns (signed coordinates, mask of columns whose sign could be fixed by the third moment).
    """
    u, s = _thin_svd(X)
    rel = np.abs(np.diff(s)) / np.maximum(s[:-1], 1e-30)
    left = np.concatenate([[np.inf], rel])
    right = np.concatenate([rel, [np.inf]])
    isolated = np.minimum(left, right) > gap
    cols = np.flatnonzero(isolated)[:k]
    if len(cols) < min(4, X.shape[1]):
        cols = np.arange(min(k, X.shape[1]))
    coords = u[:, cols] * s[cols]
    skew = np.einsum("ij,ij,ij->j", coords, coords, coords) / (np.sum(coords ** 2, axis=0) ** 1.5 + 1e-30)
    coords = coords * np.where(skew < 0, -1.0, 1.0)
    reliable = np.abs(skew) > 0.05
    return coords, reliable


def _gram_descriptors(X: np.ndarray, m: int = 32, chunk: int = 1024) -> np.ndarray:
    """Per row: its squared norm and its ``m`` largest |inner products| with other rows, sorted."""
    n = len(X)
    m = min(m, n - 1)
    out = np.empty((n, m + 1))
    for s in range(0, n, chunk):
        g = np.abs(X[s:s + chunk] @ X.T)
        rows = np.arange(len(g))
        out[s:s + chunk, 0] = g[rows, s + rows]
        g[rows, s + rows] = -np.inf
        top = -np.partition(-g, m - 1, axis=1)[:, :m]
        out[s:s + chunk, 1:] = -np.sort(-top, axis=1)
    return out


def _initial_match_gram(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    da, db = _gram_descriptors(A), _gram_descriptors(B)
    scale = np.sqrt(np.mean(db ** 2)) + 1e-30
    return _nearest(da / scale, db / scale)[0]


def _initial_match(A: np.ndarray, B: np.ndarray, gap: float) -> np.ndarray:
    """A first guess of ``perm`` from rotation-invariant row descriptors (spectral coordinates)."""
    k = min(A.shape[1], 64)
    ca, ra = _spectral_descriptors(A, k, gap)
    cb, rb = _spectral_descriptors(B, k, gap)
    m = min(ca.shape[1], cb.shape[1])
    ca, cb = ca[:, :m], cb[:, :m]
    signed = ra[:m] & rb[:m]
    da = np.where(signed, ca, np.abs(ca))
    db = np.where(signed, cb, np.abs(cb))
    na = np.linalg.norm(A, axis=1, keepdims=True)
    nb = np.linalg.norm(B, axis=1, keepdims=True)
    scale = np.sqrt(np.mean(na ** 2)) + 1e-30
    idx, _ = _nearest(np.hstack([da, 2.0 * na]) / scale, np.hstack([db, 2.0 * nb]) / scale)
    return idx


def _refine(A: np.ndarray, B: np.ndarray, perm: np.ndarray, solve, rounds: int) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Alternate: solve ``T`` on confident matches, re-match every row against ``B T``."""
    n = len(A)
    keep = np.ones(n, dtype=bool)
    T = solve(B[perm[keep]], A[keep])
    done = 0
    mutual_frac = 0.0
    for done in range(1, rounds + 1):
        BT = B @ T
        new, dist = _nearest(A, BT)
        back, _ = _nearest(BT, A)
        mutual = back[new] == np.arange(n)
        mutual_frac = float(mutual.mean())
        # confident: mutual nearest neighbours with a distance below the median of those
        if mutual.sum() >= max(A.shape[1] + 1, 8):
            cut = np.quantile(dist[mutual], 0.9)
            keep = mutual & (dist <= cut)
        else:
            keep = np.ones(n, dtype=bool)
        changed = np.any(new != perm)
        perm = new
        T = solve(B[perm[keep]], A[keep])
        if not changed and done > 1:
            break
    return perm, T, done, mutual_frac


def _lstsq(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(X, Y, rcond=None)[0]


def match_rows(A: np.ndarray, B: np.ndarray, group: str = "auto", rounds: int = 12,
               gap: float = 0.01) -> RowMatch:
    """Find ``perm`` and ``T`` with ``A ≈ B[perm] @ T`` (``group``: orthogonal, linear or auto)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"tables have {A.shape[1]} and {B.shape[1]} columns")
    results = []
    norm_a = np.linalg.norm(A) + 1e-30
    if group in ("orthogonal", "auto"):
        for start in (_initial_match(A, B, gap), _initial_match_gram(A, B)):
            perm, T, done, mutual = _refine(A, B, start, procrustes, rounds)
            res = np.linalg.norm(A - B[perm] @ T) / norm_a
            results.append(RowMatch(perm, T, float(res), "orthogonal", done, mutual))
            if res < 1e-6:
                break
    if group in ("linear", "auto") and not (results and results[-1].residual < 1e-6):
        Aw, Bw = _whiten(A), _whiten(B)
        perm, _, done, mutual = _refine(Aw, Bw, _initial_match_gram(Aw, Bw), procrustes, rounds)
        T = _lstsq(B[perm], A)
        res = np.linalg.norm(A - B[perm] @ T) / norm_a
        results.append(RowMatch(perm, T, float(res), "linear", done, mutual))
    if not results:
        raise ValueError(f"unknown group {group!r}")
    # compare fits by their residual per remaining degree of freedom (a dense T has more freedom)
    n = A.size
    d = A.shape[1]

    def score(r: RowMatch) -> float:
        params = d * (d - 1) / 2 if r.group == "orthogonal" else d * d
        return r.residual ** 2 / max(1.0 - params / n, 1e-3)

    return min(results, key=score)
