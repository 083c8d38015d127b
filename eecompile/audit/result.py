"""The result every attack returns, and a small timer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KNOWN_BASE = "base model known"
NO_BASE = "no base model"
MITIGATION = "mitigation"


@dataclass
class AttackResult:
    """One measured attack.

    ``recovered`` is a fraction in [0, 1] whose meaning ``metric`` states (fraction of traffic
    tokens decrypted, of vocabulary entries recovered, of held-out inputs decrypted, ...).
    ``side_knowledge`` says, in words, everything the attacker was given besides what the
    server holds; ``regime`` is "base model known" (the server has the plaintext base weights),
    "no base model" (it does not: at most a related public model, or no model at all) or
    "mitigation" (an attack on a defended deployment). ``seconds`` is the attacker's wall-clock time (not the simulation of clients).
    """

    attack: str
    side_knowledge: str
    target: str
    recovered: float
    seconds: float
    metric: str = ""
    regime: str = ""
    model: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        value = float(self.recovered)
        if not np.isfinite(value):
            value = 0.0
        self.recovered = min(1.0, max(0.0, value))
        self.seconds = float(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (numpy scalars and arrays converted)."""
        return {"attack": self.attack, "side_knowledge": self.side_knowledge, "target": self.target,
                "recovered": round(self.recovered, 6), "seconds": round(self.seconds, 4),
                "metric": self.metric, "regime": self.regime, "model": self.model,
                "details": _jsonable(self.details)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
