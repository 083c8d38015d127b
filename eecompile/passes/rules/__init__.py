"""Registry of op rules and subgraph patterns, one module per op family.

Adding an op is adding a rule (a subclass of :class:`OpRule` registered here) and a test;
the analysis and folding passes never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_graphsurgeon as gs

from eecompile.passes.rules.base import OpRule, Pattern, PatternInstance

_RULES: dict[tuple[str, str], OpRule] = {}
_PATTERNS: list[Pattern] = []

# Ops that only read a tensor's shape: any protection passes unharmed.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def register(rule: OpRule) -> OpRule:
    """Register ``rule`` for each of its op types."""
    for op in rule.op_types:
        _RULES[(rule.domain, op)] = rule
    return rule


def register_pattern(pattern: Pattern) -> Pattern:
    """Register a subgraph pattern."""
    _PATTERNS.append(pattern)
    return pattern


def rule_for(node: gs.Node) -> OpRule | None:
    """The rule for a node's op, or None when the registry has none."""
    domain = node.domain or ""
    if domain == "ai.onnx":
        domain = ""
    return _RULES.get((domain, node.op))


def patterns() -> list[Pattern]:
    """Registered patterns, in registration order."""
    return list(_PATTERNS)


def supported_ops() -> list[tuple[str, str]]:
    """(domain, op_type) pairs that have a rule."""
    return sorted(_RULES)


@contextlib.contextmanager
def unregistered(op_type: str, domain: str = "") -> Iterator[None]:
    """Temporarily remove the rule for ``op_type`` (for tests of unsupported ops)."""
    rule = _RULES.pop((domain, op_type), None)
    try:
        yield
    finally:
        if rule is not None:
            _RULES[(domain, op_type)] = rule


def _load_families() -> None:
    from eecompile.passes.rules import (  # noqa: F401  (registration side effects)
        attention,
        comparisons,
        contrib_attention,
        contrib_norms,
        elementwise,
        embedding,
        gather_index,
        group_norms,
        linear,
        norms,
        pooling,
        qdq,
        quantized,
        reductions,
        rotary,
        shape,
        spatial,
        strided,
    )


__all__ = ["OpRule", "Pattern", "PatternInstance", "register", "register_pattern", "rule_for",
           "patterns", "supported_ops", "unregistered", "SHAPE_ONLY_OPS"]

_load_families()
