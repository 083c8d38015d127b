"""How far a deliberately inexact compile (``--requantize``) moves a language model from the original.

Two measures, both against the original model run by ONNX Runtime, on the same seeded prompt:

* **teacher-forced**: the original's greedy continuation of ``tokens`` ids is fed to both models in
  one pass; per position, the maximum absolute logit difference and whether both pick the same
  next token (the greedy-token agreement over ``tokens`` positions);
* **free-running**: both generate ``tokens`` ids greedily on their own; where the first one differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eecompile.passes.verify import relative_error

DEFAULT_TOKENS = 64
DEFAULT_PROMPT = 8


@dataclass
class AccuracyChange:
    """The measured change of an inexact compile."""

    tokens: int
    max_logit_difference: float
    max_relative_error: float
    greedy_agreement: float  # fraction of teacher-forced positions whose argmax agrees
    first_divergence: int | None  # free-running: index of the first differing generated token, None if none

    def describe(self) -> str:
        """One line for the compile summary and the report."""
        free = ("the same greedy continuation" if self.first_divergence is None
                else f"free-running greedy first differs at token {self.first_divergence}")
        return (f"against the original: max logit difference {self.max_logit_difference:.3g} "
                f"(relative {self.max_relative_error:.2e}), greedy-token agreement "
                f"{self.greedy_agreement * self.tokens:.0f}/{self.tokens} (teacher-forced), {free}")

    def to_dict(self) -> dict:
        """For report.json."""
        return asdict(self)


def prefill_feeds(interface, ids: list[int]) -> dict[str, np.ndarray]:
    """Plaintext feeds of one prefill of ``ids`` on an empty cache, for a decoder's interface."""
    feeds = {interface.ids: np.array([ids], dtype=interface.ids_dtype)}
    if interface.attention_mask:
        feeds[interface.attention_mask] = np.ones((1, len(ids)), dtype=interface.mask_dtype)
    if interface.position_ids:
        feeds[interface.position_ids] = np.arange(len(ids), dtype=interface.position_dtype)[None, :]
    for entry in interface.cache:
        feeds[entry.past] = np.zeros(entry.shape, dtype=entry.dtype)
    return feeds


def measure(original: str | Path, compiled_dir: str | Path, tokens: int = DEFAULT_TOKENS, seed: int = 0,
            prompt_length: int = DEFAULT_PROMPT) -> AccuracyChange:
    """Measure ``compiled_dir`` (server/ + client/) against ``original`` (see the module docstring)."""
    from eecompile.runtime.generate import EncryptedGenerator, PlainGenerator
    from eecompile.runtime.ort_session import make_session
    from eecompile.runtime.session import EncryptedSession

    plain = PlainGenerator(original, "cpu")
    vocab = plain.server.vocab_size
    rng = np.random.default_rng(seed)
    prompt = [int(i) for i in rng.integers(0, vocab, prompt_length)]
    reference = plain.generate(prompt, tokens).plain_ids
    compiled = EncryptedGenerator(compiled_dir, "cpu").generate(prompt, tokens).plain_ids
    first = next((i for i, (a, b) in enumerate(zip(reference, compiled)) if a != b),
                 None if len(reference) == len(compiled) else min(len(reference), len(compiled)))

    sequence = prompt + reference[:-1]
    feeds = prefill_feeds(plain.server.interface, sequence)
    names = [plain.server.interface.logits]
    expected = make_session(original, "cpu").run(names, feeds)[0][0, prompt_length - 1:]
    session = EncryptedSession(compiled_dir, ["CPUExecutionProvider"])
    got = session.run(names, feeds)[0][0, prompt_length - 1:]
    agree = float(np.mean(np.argmax(expected, -1) == np.argmax(got, -1))) if len(expected) else 1.0
    return AccuracyChange(len(reference), float(np.max(np.abs(expected.astype(np.float64) - got))),
                          relative_error(expected, got), agree, first)
