"""``eecompile audit``: what an honest-but-curious server can recover, measured.

One module per attack; each attack function sees only what the server holds (the server
folder, ciphertext traffic) plus the side knowledge it states, and returns an
:class:`AttackResult` (``attack``, ``side_knowledge``, ``target``, ``recovered`` in [0, 1],
``seconds``, details):

* :mod:`~eecompile.audit.frequency` — frequency analysis of encrypted token ids, on client
  traffic or on text the server samples from the encrypted model itself;
* :mod:`~eecompile.audit.weight_matching` — vocabulary permutation and residual basis from
  the embedding table, given the base model (or a related public one);
* :mod:`~eecompile.audit.known_plaintext` — bases from known (plaintext, ciphertext) pairs;
* :mod:`~eecompile.audit.inversion` — prompts from the hidden states the server holds;
* :mod:`~eecompile.audit.rotation` — exact mitigations (re-keys, key rotation, decoy
  traffic) and the linking attack against re-keys.

:func:`run_audit` runs everything that applies to a compiled model.
"""

from eecompile.audit.result import AttackResult
from eecompile.audit.runner import AuditConfig, AuditReport, run_audit
from eecompile.audit.server import AuditError, ModelView, Truth

__all__ = ["AttackResult", "AuditConfig", "AuditReport", "AuditError", "ModelView", "Truth", "run_audit"]
