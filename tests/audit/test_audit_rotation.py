"""Mitigations: re-keys, the linking attack, key rotation and decoy traffic."""

from __future__ import annotations

import numpy as np

from eecompile.audit.frequency import NgramModel
from eecompile.audit.rotation import (_check_exact, full_rekey, linking_attack, run_decoys, run_rekey_and_link,
                                      run_rotation, true_link, vocab_only_rekey)
from eecompile.audit.server import ModelView, Truth


def test_vocab_only_rekey_is_exact_and_linked(zoo_llama, tmp_path):
    info = vocab_only_rekey(zoo_llama.out, tmp_path / "new", seed=3)
    assert _check_exact(zoo_llama.out, tmp_path / "new", zoo_llama.server.token_input) < 1e-4
    new = ModelView(tmp_path / "new" / "server")
    link, _, method = linking_attack(zoo_llama.server, new)
    perm_new = Truth(tmp_path / "new" / "client").vocab_perm(new.token_input)
    assert method == "identical rows"
    assert np.mean(link == true_link(zoo_llama.perm, perm_new)) == 1.0
    assert np.array_equal(true_link(zoo_llama.perm, perm_new), info["sigma"])


def test_full_rekey_is_linked(zoo_llama, tmp_path):
    results = run_rekey_and_link(zoo_llama.original, zoo_llama.out, tmp_path)
    kinds = {r.details["rekey"]: r for r in results}
    assert set(kinds) == {"vocabulary-only re-key", "full re-key"}
    for r in results:
        assert 0.0 <= r.recovered <= 1.0
        assert r.details["equivalence_exact"] < 1e-4
        assert r.details["rekey_seconds_per_million_parameters"] > 0
    assert kinds["full re-key"].recovered > 0.9  # orthogonal bases keep the Gram matrix


def test_rotation_pools_linked_periods(zoo_llama, char_split, tmp_path):
    ngram = NgramModel.fit(char_split.reference, 64)
    full_rekey(zoo_llama.original, tmp_path / "k1", verify=False)
    periods = [(zoo_llama.server, zoo_llama.truth),
               (ModelView(tmp_path / "k1" / "server"), Truth(tmp_path / "k1" / "client"))]
    r = run_rotation(char_split.traffic, ngram, periods, 300)
    assert r.details["link_accuracy"] == [1.0]
    assert 0.0 <= r.details["recovered_each_period_alone"] <= 1.0
    assert r.recovered >= r.details["recovered_each_period_alone"] - 0.05


def test_decoys_are_scored_by_the_server_model(tinylm, tinylm_split):
    ngram = NgramModel.fit(tinylm_split.reference, tinylm.server.vocab_size)
    r = run_decoys(tinylm.server, tinylm.truth, tinylm_split.traffic, ngram, 1_000, "uniform", 1.0, bos=1)
    assert 0.0 <= r.recovered <= 1.0
    # the trained model finds uniform random tokens far less likely than English
    assert r.details["decoy_nll_mean"] > r.details["real_nll_mean"]
    assert r.details["decoy_detection_accuracy"] > 0.9
