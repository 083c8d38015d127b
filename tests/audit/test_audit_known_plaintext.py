"""Known-plaintext recovery of bases."""

from __future__ import annotations

from eecompile.audit.known_plaintext import run_known_plaintext_input, run_known_plaintext_lm
from eecompile.audit.result import KNOWN_BASE


def test_mlp_input_basis_needs_d_pairs(zoo_mlp):
    pairs, cipher_only = run_known_plaintext_input(zoo_mlp.server, zoo_mlp.truth)
    d = pairs.details["dimension"]
    curve = {c["k"]: c["decrypted"] for c in pairs.details["curve"]}
    assert all(curve[k] == 0.0 for k in curve if k <= d // 2)
    assert all(curve[k] < 1.0 for k in curve if k < d)
    assert all(curve[k] == 1.0 for k in curve if k >= d)
    assert pairs.details["smallest_k_decrypting_all"] == d
    assert cipher_only.recovered == 0.0  # second moments leave an orthogonal factor unknown


def test_cnn_one_image_is_enough(zoo_cnn):
    pairs = run_known_plaintext_input(zoo_cnn.server, zoo_cnn.truth)[0]
    assert pairs.details["smallest_k_decrypting_all"] == 1  # one image = one pair per pixel


def test_lm_states_with_base_model(zoo_llama, char_split):
    r = run_known_plaintext_lm(zoo_llama.server, zoo_llama.base, char_split.traffic, zoo_llama.encrypt,
                               zoo_llama.perm, zoo_llama.base.embedding, regime=KNOWN_BASE)
    d = zoo_llama.server.embedding.shape[1]
    assert r.recovered > 0.99
    assert r.details["smallest_k_recovering_99pct"] <= d


def test_lm_known_tokens_without_weights(tinylm, tinylm_split):
    r = run_known_plaintext_lm(tinylm.server, None, tinylm_split.traffic, tinylm.encrypt, tinylm.perm,
                               tinylm.base.embedding, ks=[10, 100, 1_000])
    fractions = [c["later_traffic_decrypted"] for c in r.details["curve"]]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
