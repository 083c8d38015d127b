"""Hidden-state inversion: recover a prompt from the residual-stream states the server holds.

The server holds, for every prompt position, the residual-stream state ``h' = h Q`` after
each layer. An attacker with a basis estimate ``Q_hat`` (from weight matching or known
plaintext) and a plaintext model rotates the states back, ``h_hat = h' Q_hat^{-1}``, and
recovers the prompt position by position: for position ``t`` it runs its model on the
recovered prefix followed by every vocabulary token (one batch of ``V`` sequences) and picks
the token whose state at ``t`` is nearest ``h_hat`` (vocabulary matching). It never reads
the token ids the client sent.

With the exact base model this is exact up to ties; with only a related public model it
recovers what the models' states still share, which the audit measures.
"""

from __future__ import annotations

import numpy as np

from eecompile.audit.result import AttackResult, Timer
from eecompile.audit.server import ModelView


def invert_states(states: np.ndarray, Q_hat: np.ndarray, model: ModelView, tensor: str,
                  batch: int = 512) -> np.ndarray:
    """Recover ``len(states)`` token ids from states ``[seq, hidden]`` at ``tensor`` of ``model``."""
    target = states @ np.linalg.pinv(Q_hat)
    V = model.vocab_size
    recovered: list[int] = []
    for t in range(len(target)):
        prefix = np.asarray(recovered, dtype=np.int64)
        cand = np.concatenate([np.broadcast_to(prefix, (V, t)), np.arange(V, dtype=np.int64)[:, None]], axis=1)
        h = model.hidden_states(cand, [tensor], batch=batch)[0][:, t, :]
        recovered.append(int(np.argmin(np.sum((h - target[t]) ** 2, axis=1))))
    return np.asarray(recovered, dtype=np.int64)


def run_inversion(server: ModelView, attacker: ModelView, Q_hat: np.ndarray, prompts: list[np.ndarray],
                  encrypt, *, regime: str, side_knowledge: str, model_name: str = "",
                  layer: int = -1) -> AttackResult:
    """Invert the server's states for each plaintext prompt (encrypted by ``encrypt``); token accuracy."""
    tensor_s = server.residual_chain[layer]
    tensor_a = attacker.residual_chain[layer]
    right = total = 0
    exact = 0
    with Timer() as timer:
        for prompt in prompts:
            held = server.hidden_states(encrypt(prompt)[None, :], [tensor_s])[0][0]
            guess = invert_states(held, Q_hat, attacker, tensor_a)
            right += int(np.sum(guess == prompt))
            total += len(prompt)
            exact += int(np.array_equal(guess, prompt))
    depth = len(server.residual_chain) - 1 if layer < 0 else layer
    return AttackResult(
        attack="hidden-state inversion",
        side_knowledge=side_knowledge,
        target=f"prompt tokens from residual-stream states (after {depth} residual additions)",
        recovered=right / max(total, 1), seconds=timer.seconds,
        metric="fraction of prompt tokens recovered",
        regime=regime, model=model_name,
        details={"prompts": len(prompts), "tokens": total, "prompts_exact": exact, "tensor": tensor_s,
                 "random_baseline": 1.0 / server.vocab_size})
