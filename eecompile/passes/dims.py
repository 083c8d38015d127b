"""Symbolic tensor dimensions as algebra: products and equality of dims like ``4*batch``.

Shape inference leaves dimensions as ints, as names (``batch_size``) or as expressions over
names (``4*batch``, ``past_sequence_length + sequence_length``, written by ONNX Runtime's
symbolic inference). Reshape rules must decide whether two runs of axes hold the same
number of elements — e.g. ``[batch, 4] -> [4*batch]`` merges heads into the batch axis —
so dims are parsed into sympy expressions (every name a positive integer symbol) and
compared as polynomials. Unknown dims (None, or ``unk__N`` placeholders that carry no
relation to anything) make a product unknown.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Sequence

import sympy

Dim = int | str | sympy.Expr | None

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod}
_UNKNOWN = re.compile(r"^unk__\d+$")


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> sympy.Expr | None:
    names: dict[str, sympy.Symbol] = {}

    def placeholder(match: re.Match) -> str:
        name = match.group(0)
        if name in _FUNCTIONS:
            return name
        if _UNKNOWN.match(name):
            raise ValueError("unknown dim")
        key = f"_d{len(names)}"
        names.setdefault(key, sympy.Symbol(name, positive=True, integer=True))
        return key

    try:
        source = _NAME.sub(placeholder, text)
        return sympy.sympify(source, locals={**names, **_FUNCTIONS})
    except (ValueError, TypeError, SyntaxError, sympy.SympifyError):
        if _UNKNOWN.match(text):
            return None
        return sympy.Symbol(text, positive=True, integer=True)  # an opaque name


def expr(dim: Dim) -> sympy.Expr | None:
    """A dimension as a sympy expression; None when unknown."""
    if isinstance(dim, sympy.Basic):
        return dim
    if isinstance(dim, numbers.Integral):
        return sympy.Integer(int(dim))
    if isinstance(dim, str):
        return _parse(dim)
    return None


def product(dims: Sequence[Dim]) -> sympy.Expr | None:
    """The number of elements of a run of axes; None when any dim is unknown."""
    out = sympy.Integer(1)
    for d in dims:
        e = expr(d)
        if e is None:
            return None
        out = out * e
    return out


def equal(a: sympy.Expr | Dim | None, b: sympy.Expr | Dim | None) -> bool:
    """Whether two dims (or products) are provably equal."""
    ea = a if isinstance(a, sympy.Basic) else expr(a)
    eb = b if isinstance(b, sympy.Basic) else expr(b)
    if ea is None or eb is None:
        return False
    return sympy.expand(ea - eb) == 0


def same_elements(din: Sequence[Dim], i: int, j: int, dout: Sequence[Dim], k: int, l: int) -> bool:
    """Whether axes ``din[i:j]`` and ``dout[k:l]`` provably hold the same number of elements."""
    return equal(product(din[i:j]), product(dout[k:l]))


def as_int(dim: sympy.Expr | Dim | None) -> int | None:
    """The dim as an int when it is a known constant."""
    e = dim if isinstance(dim, sympy.Basic) else expr(dim)
    if e is not None and e.is_Integer:
        return int(e)
    return None


def quotient(numerator: sympy.Expr | None, denominator: sympy.Expr | None) -> sympy.Expr | None:
    """``numerator / denominator`` when it is a polynomial in the dims (a Reshape's ``-1``)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    q = sympy.cancel(numerator / denominator)
    _, den = sympy.fraction(q)
    return q if den == 1 else None
