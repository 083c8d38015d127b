"""Weight matching: the vocabulary permutation and residual basis from the embedding table."""

from __future__ import annotations

from eecompile.audit.public import perturbed_copy
from eecompile.audit.result import KNOWN_BASE, NO_BASE
from eecompile.audit.server import ModelView
from eecompile.audit.weight_matching import run_weight_matching


def _run(compiled, attacker_table, regime=KNOWN_BASE):
    return run_weight_matching(compiled.server, attacker_table, compiled.base.embedding, compiled.perm,
                               regime=regime, side_knowledge="test")


def test_known_base_llama_recovers_vocabulary_and_basis(zoo_llama):
    r = _run(zoo_llama, zoo_llama.base.embedding)
    assert r.recovered > 0.9
    assert r.details["basis_relative_error"] < 1e-3
    assert r.details["group"] == "orthogonal"


def test_known_base_gpt2_tied_head(zoo_gpt2):
    r = _run(zoo_gpt2, zoo_gpt2.base.embedding)
    assert r.recovered > 0.9


def test_no_side_knowledge_unrelated_model(zoo_llama, zoo_llama_other_seed):
    r = _run(zoo_llama, ModelView(zoo_llama_other_seed).embedding, NO_BASE)
    assert 0.0 <= r.recovered < 0.2


def test_public_model_close_to_private(zoo_llama, tmp_path):
    near = ModelView(perturbed_copy(zoo_llama.original, tmp_path / "near.onnx", 0.01))
    far = ModelView(perturbed_copy(zoo_llama.original, tmp_path / "far.onnx", 0.5))
    assert _run(zoo_llama, near.embedding, NO_BASE).recovered > 0.9
    assert _run(zoo_llama, far.embedding, NO_BASE).recovered < 0.5


def test_tinylm_known_base(tinylm):
    r = _run(tinylm, tinylm.base.embedding)
    assert r.recovered > 0.99
    assert r.details["basis_relative_error"] < 1e-3


def test_mlp_input_basis_from_first_layer(zoo_mlp, zoo_mlp_other_seed):
    from eecompile.audit.weight_matching import run_first_layer_matching

    known = run_first_layer_matching(zoo_mlp.server, zoo_mlp.base, zoo_mlp.truth, regime=KNOWN_BASE,
                                     side_knowledge="test")
    assert len(known) == 1 and known[0].recovered == 1.0
    assert known[0].details["basis_relative_error"] < 1e-4
    other = ModelView(zoo_mlp_other_seed)
    unrelated = run_first_layer_matching(zoo_mlp.server, other, zoo_mlp.truth, regime=NO_BASE, side_knowledge="test")
    assert all(r.recovered == 0.0 for r in unrelated)  # the biases do not match: nothing, or garbage
