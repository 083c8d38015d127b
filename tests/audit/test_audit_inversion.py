"""Hidden-state inversion by vocabulary matching."""

from __future__ import annotations

import numpy as np

from eecompile.audit.inversion import run_inversion
from eecompile.audit.result import KNOWN_BASE, NO_BASE
from eecompile.audit.server import ModelView
from eecompile.audit.weight_matching import weight_matching


def test_zoo_llama_known_base(zoo_llama, char_split):
    prompts = [np.asarray(d[:8]) for d in char_split.traffic[:2]]
    Q = weight_matching(zoo_llama.server, zoo_llama.base.embedding).transform
    r = run_inversion(zoo_llama.server, zoo_llama.base, Q, prompts, zoo_llama.encrypt, regime=KNOWN_BASE,
                      side_knowledge="test")
    assert r.recovered == 1.0
    assert r.details["prompts_exact"] == 2


def test_zoo_llama_unrelated_model(zoo_llama, zoo_llama_other_seed, char_split):
    other = ModelView(zoo_llama_other_seed)
    prompts = [np.asarray(d[:8]) for d in char_split.traffic[:2]]
    Q = weight_matching(zoo_llama.server, other.embedding).transform
    r = run_inversion(zoo_llama.server, other, Q, prompts, zoo_llama.encrypt, regime=NO_BASE, side_knowledge="test")
    assert 0.0 <= r.recovered < 0.5


def test_tinylm_known_base(tinylm, tinylm_split):
    prompts = [np.asarray(tinylm_split.traffic[-1][:6])]
    Q = weight_matching(tinylm.server, tinylm.base.embedding).transform
    r = run_inversion(tinylm.server, tinylm.base, Q, prompts, tinylm.encrypt, regime=KNOWN_BASE,
                      side_knowledge="test")
    assert r.recovered > 0.8
