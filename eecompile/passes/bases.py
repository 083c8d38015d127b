"""Basis samplers: the random matrices that secret basis changes are built from.

Every sampler is a pure function of a numpy ``Generator`` (usually from
:func:`eecompile.keys.derive_rng`) and its size arguments: the same generator state gives the
same array, byte for byte. Matrices are float64 and act on *row* vectors, ``x @ M``, the way
activations are multiplied by weights in the compiled graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "permutation",
    "permutation_matrix",
    "scales",
    "signs",
    "haar_orthogonal",
    "ones_orthogonal",
    "invertible",
    "complex_pairs",
    "block_diag",
]


def _check_size(n: int, *, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"size must be an int, got {type(n).__name__}")
    n = int(n)
    if n < minimum:
        raise ValueError(f"size must be >= {minimum}, got {n}")
    return n


def _log_uniform(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    if not (0.0 < low <= high):
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    vals = np.exp(rng.uniform(np.log(low), np.log(high), size=n))
    # exp(log(.)) can land an ulp outside the range; clamp so the documented bounds hold exactly.
    return np.clip(vals, low, high).astype(np.float64)


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation vector ``perm`` of ``range(n)`` (int64).

    Its matrix (see :func:`permutation_matrix`) is ``P[perm[j], j] = 1``, so that
    ``(x @ P)[j] == x[perm[j]]``, i.e. ``x @ P == x[..., perm]``.
    """
    n = _check_size(n, minimum=0)
    return rng.permutation(n).astype(np.int64)


def permutation_matrix(perm: Sequence[int] | np.ndarray) -> np.ndarray:
    """The float64 matrix ``P`` of a permutation vector: ``P[perm[j], j] = 1``.

    ``x @ P == x[..., perm]`` and ``P.T`` is the matrix of the inverse permutation.
    """
    perm = np.asarray(perm, dtype=np.int64)
    n = perm.shape[0]
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError("perm must be a permutation of range(len(perm))")
    p = np.zeros((n, n), dtype=np.float64)
    p[perm, np.arange(n)] = 1.0
    return p


def scales(
    rng: np.random.Generator, n: int, *, low: float = 0.5, high: float = 2.0, signed: bool = False
) -> np.ndarray:
    """``n`` scale factors, magnitudes log-uniform in ``[low, high]``; random signs if ``signed``."""
    n = _check_size(n, minimum=0)
    mags = _log_uniform(rng, n, low, high)
    if signed:
        mags = mags * signs(rng, n)
    return mags


def signs(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` independent uniformly random signs, as float64 ``±1.0``."""
    n = _check_size(n, minimum=0)
    return np.where(rng.integers(0, 2, size=n) == 1, 1.0, -1.0).astype(np.float64)


def haar_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A Haar-distributed ``n×n`` orthogonal matrix.

    QR of a standard Gaussian matrix with the sign fix ``Q * sign(diag(R))`` (columns of Q
    scaled so R has a positive diagonal), which makes the distribution exactly Haar.
    """
    n = _check_size(n)
    g = rng.standard_normal((n, n))
    q = _cholesky_qr2(g) if n >= CHOLESKY_QR_MIN else None
    if q is not None:
        return q
    q, r = np.linalg.qr(g)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return np.ascontiguousarray(q * d, dtype=np.float64)


CHOLESKY_QR_MIN = 256
"""From this size on, :func:`haar_orthogonal` factors by CholeskyQR2 (matrix products and a Cholesky, which BLAS
runs about twice as fast as Householder QR at n = 2048), falling back to Householder QR."""


def _cholesky_qr2(g: np.ndarray) -> np.ndarray | None:
    """The Q of ``g = Q R`` with ``diag(R) > 0`` by CholeskyQR2, or None when ``g`` is too ill-conditioned.

    ``GᵀG = LLᵀ`` gives ``R = Lᵀ`` (positive diagonal) and ``Q = G L⁻ᵀ``; a second pass on that Q
    restores orthogonality to rounding (Yamamoto et al. 2015, for cond(G) up to about u^(-1/2)). It is the
    same factor Householder QR with the sign fix returns (the QR with a positive diagonal is unique), so the
    matrix, and its Haar distribution, are those of the QR path up to rounding. The result is checked; a
    Cholesky that fails or an orthogonality error above 1e-12 returns None.
    """
    q = g
    try:
        for _ in range(2):
            lower = np.linalg.cholesky(q.T @ q)
            q = np.linalg.solve(lower, q.T).T  # G L^-T
    except np.linalg.LinAlgError:
        return None
    gram = q.T @ q
    gram[np.diag_indices_from(gram)] -= 1.0
    if not np.all(np.isfinite(gram)) or float(np.max(np.abs(gram))) > 1e-12:
        return None
    return np.ascontiguousarray(q, dtype=np.float64)


def ones_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random orthogonal ``Q`` that fixes the all-ones vector: ``Q @ 1 = 1`` and ``1ᵀ Q = 1ᵀ``.

    Such a Q commutes with mean-centering (``x - mean(x)``), so it can pass through a
    LayerNorm. Built as ``H · diag(1, Haar(n-1)) · H`` with H the Householder reflection that
    swaps ``1/√n`` and ``e₁``; it is Haar on the orthogonal group fixing 1. ``n = 1`` gives
    ``[[1]]``.
    """
    n = _check_size(n)
    if n == 1:
        return np.ones((1, 1), dtype=np.float64)
    u = np.full(n, 1.0 / np.sqrt(n))
    v = u.copy()
    v[0] -= 1.0  # v = u - e1; nonzero since n >= 2
    c = 2.0 / (v @ v)
    m = np.eye(n)
    m[1:, 1:] = haar_orthogonal(rng, n - 1)
    # H M H with H = I - c v vᵀ, as two rank-1 updates (O(n²), not two n³ products)
    m -= c * np.outer(v, v @ m)
    m -= c * np.outer(m @ v, v)
    return np.ascontiguousarray(m, dtype=np.float64)


def invertible(rng: np.random.Generator, n: int, *, max_condition: float = 4.0) -> np.ndarray:
    """A random invertible ``n×n`` matrix with condition number at most ``max_condition``.

    ``U · diag(s) · Vᵀ`` with U, V Haar orthogonal and singular values s log-uniform in
    ``[1/√c, √c]`` (c = ``max_condition``), so ``cond₂ ≤ c`` and ``‖M‖₂, ‖M⁻¹‖₂ ≤ √c``.
    """
    n = _check_size(n)
    if not max_condition >= 1.0:
        raise ValueError(f"max_condition must be >= 1, got {max_condition}")
    root = float(np.sqrt(max_condition))
    u = haar_orthogonal(rng, n)
    v = haar_orthogonal(rng, n)
    s = _log_uniform(rng, n, 1.0 / root, root)
    return np.ascontiguousarray((u * s) @ v.T, dtype=np.float64)


def _pairs(n: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    h = n // 2
    if layout == "half":
        a = np.arange(h)
        return a, a + h
    if layout == "interleaved":
        a = 2 * np.arange(h)
        return a, a + 1
    raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")


def complex_pairs(
    rng: np.random.Generator,
    n: int,
    *,
    layout: str = "half",
    low: float = 0.5,
    high: float = 2.0,
    unit: bool = False,
) -> np.ndarray:
    """A matrix acting as a random complex scalar ``r·e^{iθ}`` on each pair of coordinates.

    ``n`` must be even. ``layout="half"`` pairs ``(i, i + n/2)`` (the rotate_half RoPE
    convention); ``layout="interleaved"`` pairs ``(2i, 2i + 1)``. For a row vector x, ``x @ T``
    on a pair (a, b) is ``(x_a·r·cosθ − x_b·r·sinθ, x_a·r·sinθ + x_b·r·cosθ)``, i.e. the
    complex number ``x_a + i·x_b`` multiplied by ``r·e^{iθ}``.

    Because RoPE with the same pairing is also multiplication by a unit complex number per
    pair, T commutes with it: ``rope(x @ T) == rope(x) @ T``. ``inv(T).T`` has the same form
    (``r → 1/r``, same θ), so the dual basis stays in the family. θ is uniform in
    ``[0, 2π)``; r is log-uniform in ``[low, high]``, or 1 if ``unit``.
    """
    n = _check_size(n, minimum=2)
    if n % 2:
        raise ValueError(f"complex_pairs needs an even size, got {n}")
    a, b = _pairs(n, layout)
    h = n // 2
    theta = rng.uniform(0.0, 2.0 * np.pi, size=h)
    r = np.ones(h) if unit else _log_uniform(rng, h, low, high)
    c, s = r * np.cos(theta), r * np.sin(theta)
    t = np.zeros((n, n), dtype=np.float64)
    t[a, a] = c
    t[b, a] = -s
    t[a, b] = s
    t[b, b] = c
    return t


def block_diag(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """The float64 block-diagonal matrix with the given 2-D blocks along the diagonal."""
    mats = [np.asarray(bk, dtype=np.float64) for bk in blocks]
    for m in mats:
        if m.ndim != 2:
            raise ValueError(f"block_diag blocks must be 2-D, got shape {m.shape}")
    rows = sum(m.shape[0] for m in mats)
    cols = sum(m.shape[1] for m in mats)
    out = np.zeros((rows, cols), dtype=np.float64)
    i = j = 0
    for m in mats:
        out[i : i + m.shape[0], j : j + m.shape[1]] = m
        i += m.shape[0]
        j += m.shape[1]
    return out
