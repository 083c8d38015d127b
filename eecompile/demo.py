"""``eecompile demo``: the whole workflow on a small transformer, start to finish, in seconds.

The default model is built here with ``onnx.helper`` and numpy only (no torch, no
downloads), so a plain ``pip install .`` can run the demo: a one-block decoder-style
transformer on token ids (vocabulary 64, width 32, two attention heads, causal mask),
with seeded random weights that are all distinct.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 64
D_MODEL = 32
HEADS = 2
HEAD_DIM = D_MODEL // HEADS
D_FF = 4 * D_MODEL
MAX_SEQ = 16
OPSET = 20


def build_demo_model(seed: int = 0) -> onnx.ModelProto:
    """A one-block pre-LN decoder transformer: ``input_ids`` [batch, seq] → ``logits`` [batch, seq, vocab].

    Token embedding (Gather) + learned position embedding (a constant [MAX_SEQ, d] table
    gathered at positions ``Range(0, seq)`` computed from the input's shape) → LayerNorm → causal two-head self-attention →
    residual Add → LayerNorm → MLP with Gelu → residual Add → LayerNorm → LM head. Every
    parameter is drawn from a seeded generator, so all initializers are distinct.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, shape: tuple[int, ...], scale: float | None = None, base: float = 0.0) -> str:
        if scale is None:
            scale = 1.0 / np.sqrt(shape[0])
        value = base + scale * rng.standard_normal(shape)
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op.lower()}_{output}", **attrs))
        return output

    def layer_norm(x: str, prefix: str) -> str:
        gain = param(f"{prefix}.weight", (D_MODEL,), 0.1, 1.0)
        bias = param(f"{prefix}.bias", (D_MODEL,), 0.1)
        return node("LayerNormalization", [x, gain, bias], f"{prefix}_out", axis=-1, epsilon=1e-5)

    def linear(x: str, prefix: str, d_in: int, d_out: int) -> str:
        w = param(f"{prefix}.weight", (d_in, d_out))
        b = param(f"{prefix}.bias", (d_out,), 0.02)
        return node("Add", [node("MatMul", [x, w], f"{prefix}_mm"), b], f"{prefix}_out")

    # Embeddings: token table gathered by id, position table sliced to the sequence length.
    tok = node("Gather", [param("tok_emb.weight", (VOCAB, D_MODEL), 1.0), "input_ids"], "tok_emb", axis=0)
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq_len = node("Slice", [shape, const("one", np.array([1], np.int64)), const("two", np.array([2], np.int64))],
                   "seq_len")
    seq_scalar = node("Squeeze", [seq_len, const("axis0", np.array([0], np.int64))], "seq_len_scalar")
    positions = node("Range", [const("range_start", np.array(0, np.int64)), seq_scalar,
                               const("range_step", np.array(1, np.int64))], "positions")
    pos = node("Gather", [param("pos_emb.weight", (MAX_SEQ, D_MODEL), 0.5), positions], "pos_emb", axis=0)
    x0 = node("Add", [tok, pos], "embed")

    # Causal self-attention, two heads.
    h = layer_norm(x0, "ln_1")
    split_heads = const("split_heads_shape", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    heads = {}
    for part in ("q", "k", "v"):
        proj = linear(h, f"attn.{part}", D_MODEL, D_MODEL)
        r = node("Reshape", [proj, split_heads], f"{part}_heads")
        heads[part] = node("Transpose", [r], f"{part}_bhsd", perm=[0, 2, 1, 3])
    k_t = node("Transpose", [heads["k"]], "k_bhds", perm=[0, 1, 3, 2])
    scores = node("MatMul", [heads["q"], k_t], "scores")
    scaled = node("Div", [scores, const("sqrt_head_dim", np.array(np.sqrt(HEAD_DIM), np.float32))], "scores_scaled")
    mask_table = np.triu(np.full((MAX_SEQ, MAX_SEQ), -1e4, np.float32), k=1)
    mask = node("Slice", [const("causal_mask", mask_table), const("zeros2", np.array([0, 0], np.int64)),
                          node("Concat", [seq_len, seq_len], "seq_len2", axis=0),
                          const("axes01", np.array([0, 1], np.int64))], "mask")
    probs = node("Softmax", [node("Add", [scaled, mask], "scores_masked")], "probs", axis=-1)
    ctx = node("MatMul", [probs, heads["v"]], "context")
    ctx = node("Transpose", [ctx], "context_bshd", perm=[0, 2, 1, 3])
    ctx = node("Reshape", [ctx, const("merge_heads_shape", np.array([0, 0, D_MODEL], np.int64))], "context_merged")
    x1 = node("Add", [x0, linear(ctx, "attn.out", D_MODEL, D_MODEL)], "resid_1")

    # MLP with Gelu.
    h = layer_norm(x1, "ln_2")
    up = node("Gelu", [linear(h, "mlp.up", D_MODEL, D_FF)], "mlp_act")
    x2 = node("Add", [x1, linear(up, "mlp.down", D_FF, D_MODEL)], "resid_2")

    # Final norm and LM head.
    h = layer_norm(x2, "ln_f")
    node("MatMul", [h, param("lm_head.weight", (D_MODEL, VOCAB))], "logits")

    graph = helper.make_graph(
        nodes, "eecompile_demo_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="eecompile.demo")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _ids(row: np.ndarray) -> str:
    return " ".join(f"{int(v):2d}" for v in row)


def _top(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    order = np.argsort(-row, kind="stable")[:k]
    return [(int(i), float(row[i])) for i in order]


def run_demo(stream: TextIO = sys.stdout, *, seed: int | None = None) -> int:
    """Run keygen → compile → lint summary → plaintext vs encrypted inference; return an exit code."""
    import onnxruntime as ort

    from eecompile.compiler import compile_model
    from eecompile.keys import generate_key, save_key
    from eecompile.runtime.client import Client
    from eecompile.runtime.session import EncryptedSession

    def say(text: str = "") -> None:
        print(text, file=stream)

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="eecompile-demo-") as tmp:
        tmp = Path(tmp)
        say("eecompile demo: encrypt a small transformer, run it on ciphertext, check the answer.")
        say(f"(working in a temporary directory, deleted at the end: {tmp})")
        say()

        say("1. Generate a secret key. It never leaves the client; everything secret is derived from it.")
        key = generate_key()
        key_path = save_key(key, tmp / "demo.key")
        say(f"   key file {key_path.name} (mode 0600), fingerprint {key.fingerprint()}")
        say()

        say(f"2. Build the model: a one-block decoder transformer on token ids "
            f"(vocabulary {VOCAB}, width {D_MODEL}, {HEADS} heads, causal attention).")
        model_path = tmp / "demo_decoder.onnx"
        onnx.save(build_demo_model(), str(model_path))
        say(f"   {model_path.name}: {len(onnx.load(str(model_path)).graph.node)} ONNX nodes, random weights")
        say()

        say("3. Compile: derive a secret basis for every hidden space and fold it into the weights.")
        out = tmp / "compiled"
        result = compile_model(model_path, key, out)
        report = result.report
        say(f"   server artifact (all the server ever gets): {result.server_model.relative_to(tmp)}")
        say(f"   client bundle (stays with you):             {result.client_dir.relative_to(tmp)}/")
        say(f"   self-check: {result.verification.detail}")
        say()

        say("4. What the compiler could protect (the lint report, summarised):")
        summary = report.get("summary", {})
        from eecompile.report import BASIS_ORDER

        counts = ", ".join(f"{summary[b]} {b}" for b in BASIS_ORDER if b in summary) or "none"
        say(f"   {len(report['spaces'])} hidden spaces: {counts}")
        for side in ("inputs", "outputs"):
            for io in report[side]:
                say(f"   {side[:-1]} {io['name']}: {io['protection']}")
        if report.get("unsupported_ops"):
            say(f"   ops without a rule (left in clear): {len(report['unsupported_ops'])}")
        say()

        say("5. Run a random prompt both ways: the original model on plaintext, "
            "and the compiled model on ciphertext.")
        seq = 8
        ids = rng.integers(0, VOCAB, size=(1, seq), dtype=np.int64)
        plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        (expected,) = plain.run(["logits"], {"input_ids": ids})
        encrypted = EncryptedSession(out, providers=["CPUExecutionProvider"])
        (decrypted,) = encrypted.run(["logits"], {"input_ids": ids})

        # What the server saw: the client-side encryption of the ids, and the server's raw output.
        client = Client.load(out / "client")
        cipher_ids = client.encrypt({"input_ids": ids})["input_ids"]
        (cipher_logits,) = encrypted.session.run(["logits"], {"input_ids": cipher_ids})

        say(f"   plaintext token ids (you):            {_ids(ids[0])}")
        say(f"   ciphertext token ids (the server saw): {_ids(cipher_ids[0])}")
        last = seq - 1
        say(f"   top-3 next-token logits at the last position:")
        say(f"     original model, plaintext:       "
            + ", ".join(f"id {i}: {v:+.4f}" for i, v in _top(expected[0, last], 3)))
        say(f"     compiled model, decrypted:       "
            + ", ".join(f"id {i}: {v:+.4f}" for i, v in _top(decrypted[0, last], 3)))
        say(f"     what the server saw (ciphertext): "
            + ", ".join(f"id {i}: {v:+.4f}" for i, v in _top(cipher_logits[0, last], 3)))
        max_diff = float(np.max(np.abs(decrypted - expected)))
        moved = float(np.mean(cipher_logits != expected))
        say(f"   the server's logits differ from the true ones in {moved:.0%} of the entries: it sees them "
            "under a secret reordering of the vocabulary (a substitution cipher: see the weaknesses in the report)")
        say(f"   max abs difference, decrypted vs original: {max_diff:.3e}")
        say()

        ok = max_diff <= 1e-4 * max(1.0, float(np.max(np.abs(expected))))
        elapsed = time.perf_counter() - started
        if ok:
            say(f"Done in {elapsed:.1f} s: the encrypted model gives the original answers, "
                "and the server only ever saw ciphertext.")
        else:
            say(f"FAILED: decrypted outputs differ from the original by {max_diff:.3e}")
        say("Next: `eecompile keygen my.key`, then `eecompile compile your_model.onnx --key my.key --out out/`.")
        return 0 if ok else 1


# -- eecompile demo --llm ---------------------------------------------------------------
LLM_PROMPT = "And God said,"
LLM_NEW_TOKENS = 40


def _tinylm_files() -> tuple[Path, Path, int | None] | None:
    """(model.onnx, tokenizer.json, trained context) of the small trained language model, or None."""
    try:
        from eecompile.models.tinylm import load_tinylm

        model, tokenizer, config = load_tinylm()
    except (ImportError, FileNotFoundError):
        return None
    if not (Path(model).is_file() and Path(tokenizer).is_file()):
        return None
    return Path(model), Path(tokenizer), config.get("max_positions")


def run_llm_demo(stream: TextIO | None = None, *, prompt: str = LLM_PROMPT, max_new_tokens: int = LLM_NEW_TOKENS,
                 files: tuple[Path, Path, int | None] | None = None) -> int:
    """keygen → compile (with the tokenizer) → encrypted generation from the small trained model,
    with the plaintext generation beside it; return an exit code (0 also when the model is unavailable).

    ``files`` = (model.onnx, tokenizer.json, context length or None) replaces the shipped model.
    """
    from eecompile.compiler import compile_model
    from eecompile.keys import generate_key
    from eecompile.runtime.generate import EncryptedGenerator, PlainGenerator
    from eecompile.runtime.tokenizer import add_tokenizer_to_bundle

    stream = stream or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream)

    files = files or _tinylm_files()
    if files is None:
        say("eecompile demo --llm: the small trained language model (eecompile.models.tinylm) is not available "
            "in this installation; skipping. Run 'eecompile demo' for the built-in transformer.")
        return 0
    model_path, tokenizer_path, context = files
    from tokenizers import Tokenizer

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eecompile-llm-demo-") as tmp:
        tmp = Path(tmp)
        say("eecompile demo --llm: a small language model generates text on ciphertext.")
        say()
        say("1. Generate a secret key (stays with the client).")
        key = generate_key()
        say(f"   fingerprint {key.fingerprint()}")
        say()
        say(f"2. Compile {model_path.name} and encrypt its tokenizer (ids permuted like the model's).")
        out = tmp / "compiled"
        result = compile_model(model_path, key, out)
        add_tokenizer_to_bundle(tokenizer_path, result.client_dir, max_positions=context)
        say(f"   self-check: {result.verification.detail}")
        for side in ("inputs", "outputs"):
            for io in result.report[side]:
                if not io["name"].startswith(("past_key_values", "present")):
                    say(f"   {side[:-1]} {io['name']}: {io['protection']}")
        say("   KV cache (past_key_values.* / present.*): server-side state, kept encrypted on the server")
        say()
        say(f"3. Generate {max_new_tokens} tokens after {prompt!r}, greedy, both ways.")
        encrypted = EncryptedGenerator(out)
        plain = PlainGenerator(model_path, tokenizer=Tokenizer.from_file(str(tokenizer_path)), max_positions=context,
                               eos_tokens=encrypted.client.tokenizer_manifest.get("eos_tokens", ()))
        enc = encrypted.generate(prompt, max_new_tokens)
        ref = plain.generate(prompt, max_new_tokens)
        say(f"   the server saw prompt ids   {_id_list(enc.prompt_wire_ids)}")
        say(f"   (the plaintext ids were     {_id_list(enc.prompt_plain_ids)})")
        say(f"   the server produced ids     {_id_list(enc.wire_ids)}")
        say(f"   the client decrypted ids    {_id_list(enc.plain_ids)}")
        say()
        say(f"   plaintext model:  {prompt}{ref.text}")
        say(f"   encrypted model:  {prompt}{enc.text}")
        say()
        same = enc.plain_ids == ref.plain_ids
        elapsed = time.perf_counter() - started
        on = ", ".join(p.replace("ExecutionProvider", "") for p in encrypted.server.providers[:1])
        if same:
            say(f"Done in {elapsed:.1f} s on {on}: identical tokens; the server only ever saw encrypted ids.")
        else:
            say("FAILED: the encrypted generation differs from the plaintext one")
        say("Next: 'eecompile compile model.onnx --key my.key --out out/ --tokenizer tokenizer.json', then "
            "'eecompile generate out/ --prompt \"...\"'.")
        return 0 if same else 1


def _id_list(ids: list[int], limit: int = 16) -> str:
    text = " ".join(str(i) for i in ids[:limit])
    return text + (" ..." if len(ids) > limit else "")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_demo())
