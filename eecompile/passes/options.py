"""Compile options the passes read (through ``ModelGraph.options``): one place, typed, with defaults."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("default", "rebase")
"""Compile policies: ``default`` (zero overhead) or ``rebase`` (see :mod:`eecompile.passes.rebase`)."""


@dataclass(frozen=True)
class CompileOptions:
    """What a user chose beyond the defaults; every field's default is the exact, zero-overhead choice."""

    requantize: bool = False
    """Quantised weights (MatMulNBits) are dequantised, folded with a dense basis and re-quantised with the
    same bits and block size, instead of kept on their grid. Not exact: the accuracy change is measured."""

    policy: str = "default"
    """``rebase``: a dense re-basing MatMul after each op that binds a space to a permutation where one lifts
    it (:mod:`eecompile.passes.rebase`), at the cost of a d×d MatMul per point; ``default`` inserts nothing."""
