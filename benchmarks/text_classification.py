"""End-to-end encrypted text classification: plaintext vs EE vs CKKS (TenSEAL/SEAL).

A FastText-style classifier (``EmbeddingBag`` mean + ``Linear``) is trained here with torch
on real labelled text shipped by a Debian package: the ``fortunes`` data files
(``/usr/share/games/fortunes/<category>``, ``apt-get install fortunes``), one fortune per
``%``-separated record, labelled by its category file. Words are lowercased
``[a-z0-9']+`` runs; a message keeps its first 64 words; the vocabulary is the 1022 most frequent
training words plus PAD (0, a zero row) and UNK (1): ``p = 1024``.

Three ways to classify a message, each timed per message:

* ``plaintext``: the model exported to ONNX by ``torch.onnx.export`` (``Gather`` →
  ``ReduceMean`` → ``MatMul`` → ``Add``), run by ONNX Runtime.
* ``EE``: that ONNX model compiled by ``eecompile.compile_model`` and run with
  ``eecompile.EncryptedSession`` (client encrypt: permute the token ids; ONNX Runtime; client
  decrypt: undo the logits' basis); argmax on the client.
* ``CKKS``: the embedding lookup by IVE (``fhe_embedding.IVE``: the client sends ``z`` and ``z^m``
  per token, ``z = exp(i theta_id)``; the server evaluates the DCT-basis interpolation of
  the table), then the mean (``log2 L`` slot rotations summing the ``L`` token rows of a
  message; ``1/n`` folded into the next plaintext), then the linear layer (per class one
  plaintext product and ``log2 d`` rotations summing the ``d`` coordinates, plus the bias),
  all under CKKS; the client decrypts the ``C`` logits and takes the argmax. Messages are
  packed ``slots // (L d)`` per ciphertext, ``L`` the power of two at least as long as the
  longest message of the batch (messages are grouped by length; the server learns ``L``
  and each message's length, as EE's server sees the sequence length).

IVE is used because it had the lowest client + server time per lookup at ``p = 1024`` in
``fhe_embedding.py`` (the batched one-hot is faster on the server alone but its client
encrypts and uploads ``p`` ciphertexts per batch).

    python benchmarks/text_classification.py                  # full run
    python benchmarks/text_classification.py --messages 8     # smoke: a few test messages
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fhe_embedding as fe  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
CLASSES = ("computers", "politics", "songs-poems", "zippy")
MAX_TOKENS = 64
PAD, UNK = 0, 1
clock = fe.clock


# ----------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------
def load_corpus(root: Path = FORTUNES, classes=CLASSES) -> tuple[list[list[str]], np.ndarray]:
    """Tokenized fortunes and their category labels."""
    docs, labels = [], []
    for label, name in enumerate(classes):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install the Debian package 'fortunes'")
        text = path.read_text(encoding="latin-1")
        for record in re.split(r"^%$", text, flags=re.M):
            tokens = re.findall(r"[a-z0-9']+", record.lower())[:MAX_TOKENS]
            if tokens:
                docs.append(tokens)
                labels.append(label)
    return docs, np.array(labels)


def build_vocab(docs: list[list[str]], size: int) -> dict[str, int]:
    counts = collections.Counter(w for doc in docs for w in doc)
    return {w: i + 2 for i, (w, _) in enumerate(counts.most_common(size - 2))}


def train(x: list[np.ndarray], y: np.ndarray, vocab_size: int, dim: int, classes: int, epochs: int,
          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EmbeddingBag(mean) + Linear with Adam; returns (E, W, b) as float32 arrays."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bag = torch.nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=PAD)
    linear = torch.nn.Linear(dim, classes)
    opt = torch.optim.Adam(list(bag.parameters()) + list(linear.parameters()), lr=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            flat = torch.from_numpy(np.concatenate([x[i] for i in idx]))
            offsets = torch.from_numpy(np.cumsum([0] + [len(x[i]) for i in idx[:-1]]))
            loss = torch.nn.functional.cross_entropy(linear(bag(flat, offsets)), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return (bag.weight.detach().numpy().copy(), linear.weight.detach().numpy().copy(),
            linear.bias.detach().numpy().copy())


def export_onnx(table: np.ndarray, weight: np.ndarray, bias: np.ndarray, path: Path) -> None:
    """torch.onnx.export of mean(E[ids]) @ W^T + b: Gather, ReduceMean, MatMul, Add."""
    import contextlib
    import io
    import warnings

    import torch

    class FastText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.from_numpy(table))
            self.weight = torch.nn.Parameter(torch.from_numpy(weight))
            self.bias = torch.nn.Parameter(torch.from_numpy(bias))

        def forward(self, ids):
            return torch.nn.functional.embedding(ids, self.table).mean(1) @ self.weight.t() + self.bias

    ids = torch.zeros((1, 5), dtype=torch.int64)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(FastText(), (ids,), str(path), input_names=["ids"], output_names=["logits"],
                          dynamic_shapes=({1: torch.export.Dim("n", min=1, max=MAX_TOKENS)},),
                          opset_version=18, dynamo=True, external_data=False)


# ----------------------------------------------------------------------------------------
# ONNX Runtime paths
# ----------------------------------------------------------------------------------------
def _ort_options(profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def kernel_shares(model: Path, feeds: list[dict], work: Path) -> dict:
    """Per-op-type share of ONNX Runtime kernel time (its profiler, µs resolution), and kernels / session.run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), _ort_options(str(work / model.stem)), providers=["CPUExecutionProvider"])
    for f in feeds:
        sess.run(None, f)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    kernels: dict[str, float] = collections.defaultdict(float)
    runs = 0.0
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            kernels[ev["args"]["op_name"]] += ev["dur"]
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs += ev["dur"]
    total = sum(kernels.values()) or 1.0
    return {"op_share": {k: v / total for k, v in sorted(kernels.items())},
            "kernels_over_run": total / runs if runs else float("nan")}


def ort_paths(model: Path, ee_dir: Path, msgs: list[np.ndarray], reps: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Logits and per-message CPU times of the plaintext model and of EE, measured interleaved.

    For every message, each quantity (plaintext ``session.run``; EE ``EncryptedSession.run``,
    and its parts: client encrypt, server ``session.run``, client decrypt) is timed once per
    round, ``reps`` rounds after 3 warm-up rounds; the per-message median is averaged over
    the messages. Interleaving keeps a drifting machine load from favouring either path.
    """
    import onnxruntime as ort

    import eecompile

    plain = ort.InferenceSession(str(model), _ort_options(), providers=["CPUExecutionProvider"])
    sess = eecompile.EncryptedSession(ee_dir, providers=["CPUExecutionProvider"])
    # EncryptedSession opens ONNX Runtime with its default thread pool; for CPU-time
    # measurements the same server model is reopened with one thread (no spinning workers).
    sess.session = ort.InferenceSession(str(ee_dir / "server" / "model.onnx"), _ort_options(),
                                        providers=["CPUExecutionProvider"])
    logits_pl = np.concatenate([plain.run(None, {"ids": m[None, :]})[0] for m in msgs])
    logits_ee = np.concatenate([sess.run(None, {"ids": m[None, :]})[0] for m in msgs])
    keys = ("plain", "ee", "ee_enc", "ee_srv", "ee_dec")
    sums = dict.fromkeys(keys, 0.0)
    for m in msgs:
        feeds = {"ids": m[None, :]}
        cfeeds = sess.client.encrypt(feeds)
        raw = sess.session.run(None, cfeeds)[0]
        fns = {"plain": lambda: plain.run(None, feeds), "ee": lambda: sess.run(None, feeds),
               "ee_enc": lambda: sess.client.encrypt(feeds), "ee_srv": lambda: sess.session.run(None, cfeeds),
               "ee_dec": lambda: sess.client.decrypt({"logits": raw})}
        times: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(reps + 3):
            for k in keys:
                c0 = clock()
                fns[k]()
                if r >= 3:
                    times[k].append(clock() - c0)
        for k in keys:
            sums[k] += statistics.median(times[k])
    ms = {k: 1e3 * v / len(msgs) for k, v in sums.items()}
    return logits_pl, logits_ee, {"plaintext": {"run_ms": ms["plain"]},
                                  "ee": {"run_ms": ms["ee"], "client_enc_ms": ms["ee_enc"], "server_ms": ms["ee_srv"],
                                         "client_dec_ms": ms["ee_dec"]}}


# ----------------------------------------------------------------------------------------
# CKKS path
# ----------------------------------------------------------------------------------------
class FheFastText:
    """IVE lookup + mean (rotations) + linear layer (plaintext products, rotations) under CKKS."""

    def __init__(self, table: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        self.p, self.d = table.shape
        self.classes = weight.shape[0]
        if self.d & (self.d - 1):
            raise ValueError("the CKKS path sums coordinates with rotations: d must be a power of two")
        steps = [self.d << k for k in range(int(np.log2(MAX_TOKENS)))] + [1 << k for k in range(int(np.log2(self.d)))]
        self.ive = fe.IVE(table.astype(np.float64), extra_levels=1, rotations=tuple(steps))
        self.he = self.ive.he
        self.weight = weight.astype(np.float64)
        self.bias = bias.astype(np.float64)
        self.slots = self.he.slots
        self.prepared = False

    def capacity(self, length: int) -> int:
        """Messages per ciphertext when every message is padded to ``length`` tokens."""
        return self.slots // (length * self.d)

    def classify(self, msgs: list[np.ndarray], length: int) -> tuple[np.ndarray, dict]:
        """Logits of ``msgs`` (each at most ``length`` tokens) from one ciphertext batch."""
        he, ev, d = self.he, self.he.evaluator, self.d
        if len(msgs) > self.capacity(length):
            raise ValueError("too many messages for one ciphertext")
        region = length * d
        ids = np.full(self.ive.batch, PAD, dtype=np.int64)
        for m, msg in enumerate(msgs):
            ids[m * length: m * length + len(msg)] = msg
        times = {}
        # client: 2 ciphertexts (z, z^m), one token per block of d slots
        query, times["client_enc"], _ = fe._timed(self.ive.encrypt, ids)
        if not self.prepared:
            self.ive.prepare(query)
            self.prepared = True
        # server: lookup
        rows, times["lookup"], _ = fe._timed(self.ive.evaluate, query)

        def mean(ct):
            tmp = he.seal.Ciphertext()
            step = d
            while step < region:
                ev.rotate_vector(ct, step, he.galois_keys, tmp)
                ev.add_inplace(ct, tmp)
                step *= 2
            return ct

        summed, times["mean"], _ = fe._timed(mean, rows)

        def linear(ct):
            outs = []
            tmp = he.seal.Ciphertext()
            q = he.last_prime(ct.parms_id())
            for c in range(self.classes):
                w = np.zeros(self.slots)
                bvec = np.zeros(self.slots)
                for m, msg in enumerate(msgs):
                    w[m * region: m * region + d] = self.weight[c] / len(msg)
                    bvec[m * region] = self.bias[c]
                out = he.seal.Ciphertext()
                ev.multiply_plain(ct, he.encode(w, ct.parms_id(), q), out)
                ev.rescale_to_next_inplace(out)
                out.scale = fe.DELTA
                step = 1
                while step < d:
                    ev.rotate_vector(out, step, he.galois_keys, tmp)
                    ev.add_inplace(out, tmp)
                    step *= 2
                ev.add_plain_inplace(out, he.encode(bvec, out.parms_id(), fe.DELTA))
                outs.append(out)
            return outs

        logit_cts, times["linear"], _ = fe._timed(linear, summed)

        def decrypt(cts):
            pos = np.arange(len(msgs)) * region
            return np.stack([he.decrypt(ct)[pos] for ct in cts], axis=1)

        logits, times["client_dec"], _ = fe._timed(decrypt, logit_cts)
        return logits, times


def length_batches(lengths: list[int], fhe: FheFastText) -> list[tuple[int, list[int]]]:
    """Group message indices into ciphertext batches of one padded length L (a power of two).

    Short messages first; a partial batch at the end of a length class is carried into the
    next class (padded further) rather than sent half empty.
    """
    buckets: dict[int, list[int]] = collections.defaultdict(list)
    for i, n in enumerate(lengths):
        buckets[1 << max(0, int(np.ceil(np.log2(n))))].append(i)
    out, carry = [], []
    for length in sorted(buckets):
        pending = carry + buckets[length]
        cap = fhe.capacity(length)
        full = len(pending) // cap * cap
        out += [(length, pending[s:s + cap]) for s in range(0, full, cap)]
        carry = pending[full:]
    if carry:
        length = max(1 << max(0, int(np.ceil(np.log2(lengths[i])))) for i in carry)
        cap = fhe.capacity(length)
        out += [(length, carry[s:s + cap]) for s in range(0, len(carry), cap)]
    return out


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def fmt(ms: float) -> str:
    return fe.fmt(ms)


def render(res: dict, info: dict, command: str) -> str:
    pl, ee, fh = res["plaintext"], res["ee"], res["ckks"]
    n_eval, n_fhe = res["n_test"], fh["messages"]
    lines = [
        "# Encrypted text classification: plaintext vs EE vs CKKS", "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, TenSEAL {info['tenseal']}, "
        f"ONNX Runtime {info['onnxruntime']} (CPU); {info['date']}. Load average {info['load_start']:.1f} → "
        f"{info['load_end']:.1f} (a shared machine). Times: CPU time of this process, one thread everywhere.", "",
        f"Command: `{command}`", "",
        f"Data: Debian `fortunes`, categories {', '.join(res['classes'])}: {res['n_train']} training and "
        f"{n_eval} test messages (80/20 split, seed {res['seed']}); vocabulary p = {res['vocab']} "
        f"(PAD, UNK, {res['vocab'] - 2} words), first {MAX_TOKENS} words of a message "
        f"(mean {res['mean_tokens']:.1f} words). Model: EmbeddingBag(mean, d = {res['dim']}) + Linear({res['dim']} → "
        f"{len(res['classes'])}), {res['epochs']} epochs of Adam. Majority class: {res['majority']:.3f}.", "",
        "| path | accuracy | agrees with plaintext | per-message latency | embedding step share |",
        "|---|---:|---:|---:|---:|",
        f"| plaintext (ORT) | {pl['accuracy']:.4f} ({n_eval} msgs) | — | {fmt(pl['run_ms'])} | "
        f"{pl['kernels']['op_share'].get('Gather', 0):.0%} of kernel time (kernels are "
        f"{pl['kernels']['kernels_over_run']:.0%} of session.run) |",
        f"| EE (eecompile + ORT) | {ee['accuracy']:.4f} ({n_eval} msgs) | {ee['agreement']:.4f} | "
        f"{fmt(ee['run_ms'])} | {ee['kernels']['op_share'].get('Gather', 0):.0%} of kernel time "
        f"(kernels are {ee['kernels']['kernels_over_run']:.0%} of session.run) |",
        f"| CKKS (IVE lookup + mean + linear) | {fh['accuracy']:.4f} ({n_fhe} msgs"
        + ("" if n_fhe == n_eval else f"; plaintext on these: {fh['plaintext_accuracy_same_msgs']:.4f}")
        + f") | {fh['agreement']:.4f} | "
        f"{fmt(fh['per_message_ms'])} amortized; {fmt(fh['batch_latency_ms'])} per batch | "
        f"{fh['share']['lookup']:.0%} of server time |",
        "",
        "Where the time goes, per message (EE's parts timed one at a time; their sum is below "
        "`EncryptedSession.run`, which also checks the feeds and allocates):", "",
        "| path | client encrypt | embedding lookup | mean | linear | client decrypt |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plaintext | — | ORT session.run {fmt(pl['run_ms'])} (all steps) | | | — |",
        f"| EE | {fmt(ee['client_enc_ms'])} | ORT session.run {fmt(ee['server_ms'])} (all steps) | | | "
        f"{fmt(ee['client_dec_ms'])} |",
        f"| CKKS | {fmt(fh['per_message']['client_enc'])} | {fmt(fh['per_message']['lookup'])} | "
        f"{fmt(fh['per_message']['mean'])} | {fmt(fh['per_message']['linear'])} | "
        f"{fmt(fh['per_message']['client_dec'])} |",
        "",
        f"CKKS: {fh['batches']} ciphertext batches (N = 16384, {fh['slots']} slots; messages grouped by length, "
        f"{fh['mean_per_batch']:.1f} messages per batch on average); max |logit(CKKS) − logit(plaintext)| = "
        f"{fh['max_logit_err']:.2g}. EE: max |logit(EE) − logit(plaintext)| = {ee['max_logit_err']:.2g}. "
        f"EE / plaintext latency: {ee['run_ms'] / pl['run_ms']:.2f}×; CKKS (amortized) / EE: "
        f"{fh['per_message_ms'] / ee['run_ms']:.3g}×.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pl, ee, fh = res["plaintext"], res["ee"], res["ckks"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["plaintext\n(ORT)", "EE\n(eecompile+ORT)", "CKKS\n(amortized)", "CKKS\n(one batch)"]
    vals = [pl["run_ms"], ee["run_ms"], fh["per_message_ms"], fh["batch_latency_ms"]]
    a.bar(names, vals, color=["#4c72b0", "#55a868", "#c44e52", "#8c2d2f"])
    a.set_yscale("log")
    a.set_ylabel("ms per message (CPU, 1 thread)")
    for x, v in enumerate(vals):
        a.text(x, v, fmt(v), ha="center", va="bottom", fontsize=8)
    a.set_title("latency per message")
    steps = ["client_enc", "lookup", "mean", "linear", "client_dec"]
    share = {k: fh["per_message"][k] / sum(fh["per_message"][s] for s in steps) for k in steps}
    ee_total = ee["client_enc_ms"] + ee["server_ms"] + ee["client_dec_ms"]
    bars = {"CKKS": [share[k] for k in steps],
            "EE": [ee["client_enc_ms"] / ee_total, ee["server_ms"] / ee_total, 0, 0, ee["client_dec_ms"] / ee_total]}
    left = np.zeros(2)
    colors = ["#dd8452", "#c44e52", "#8172b3", "#937860", "#64b5cd"]
    labels = ["client encrypt", "lookup (EE: whole ORT run)", "mean", "linear", "client decrypt"]
    for k, (lab, col) in enumerate(zip(labels, colors)):
        vals = np.array([bars["CKKS"][k], bars["EE"][k]])
        b.barh(["CKKS", "EE"], vals, left=left, color=col, label=lab)
        left += vals
    b.set_xlim(0, 1)
    b.set_xlabel("share of end-to-end time")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    b.set_title("where the time goes")
    fig.suptitle(f"FastText on Debian fortunes ({len(res['classes'])} classes, p = {res['vocab']}, d = {res['dim']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir: Path, prefix: str = "textcls", dim: int = 16, vocab: int = 1024, epochs: int = 10,
        messages: int | None = None, fhe_messages: int | None = None, reps: int = 20, seed: int = 0,
        root: Path = FORTUNES, command: str = "", log=print) -> dict:
    """Train, export, compile, evaluate the three paths; write ``{prefix}.md/.png/.json``."""
    import eecompile

    load_start = os.getloadavg()[0]
    docs, labels = load_corpus(root)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_test = len(docs) // 5
    test, train_idx = order[:n_test], order[n_test:]
    words = build_vocab([docs[i] for i in train_idx], vocab)
    x = [np.array([words.get(w, UNK) for w in doc], dtype=np.int64) for doc in docs]
    c0 = clock()
    table, weight, bias = train([x[i] for i in train_idx], labels[train_idx], vocab, dim, len(CLASSES), epochs, seed)
    log(f"trained in {clock() - c0:.1f}s CPU")
    if messages is not None:
        test = test[:messages]
    msgs = [x[i] for i in test]
    y = labels[test]
    res: dict = {"classes": list(CLASSES), "n_train": len(train_idx), "n_test": len(test), "vocab": vocab,
                 "dim": dim, "epochs": epochs, "seed": seed, "mean_tokens": float(np.mean([len(m) for m in msgs])),
                 "majority": float(np.bincount(labels[train_idx]).max() / len(train_idx))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "fasttext.onnx"
        export_onnx(table, weight, bias, model)
        compiled = eecompile.compile_model(model, eecompile.generate_key(), tmp / "ee")
        res["ee_bases"] = {s["name"]: s["basis"] for s in compiled.report.get("spaces", [])}
        reference = np.stack([table[m].mean(0) @ weight.T + bias for m in msgs])

        logits_pl, logits_ee, timing = ort_paths(model, compiled.out_dir, msgs, reps)
        if not np.allclose(logits_pl, reference, atol=1e-4):
            raise AssertionError("ONNX Runtime logits differ from the numpy reference")
        t_pl, t_ee = timing["plaintext"], timing["ee"]
        t_pl["accuracy"] = float((logits_pl.argmax(1) == y).mean())
        t_pl["kernels"] = kernel_shares(model, [{"ids": m[None, :]} for m in msgs], tmp)
        res["plaintext"] = t_pl
        log(f"plaintext: accuracy {t_pl['accuracy']:.4f}, {fmt(t_pl['run_ms'])}/message")
        t_ee["accuracy"] = float((logits_ee.argmax(1) == y).mean())
        t_ee["agreement"] = float((logits_ee.argmax(1) == logits_pl.argmax(1)).mean())
        t_ee["max_logit_err"] = float(np.abs(logits_ee - logits_pl).max())
        client = eecompile.Client.load(compiled.client_dir)
        feeds = [client.encrypt({"ids": m[None, :]}) for m in msgs]
        t_ee["kernels"] = kernel_shares(compiled.server_model, feeds, tmp)
        res["ee"] = t_ee
        log(f"EE: accuracy {t_ee['accuracy']:.4f}, agreement {t_ee['agreement']:.4f}, {fmt(t_ee['run_ms'])}/message")
        if t_ee["agreement"] != 1.0:
            raise AssertionError("EE predictions differ from the plaintext predictions")

    fhe = FheFastText(table, weight, bias)
    fhe_idx = list(range(len(msgs) if fhe_messages is None else min(fhe_messages, len(msgs))))
    batches = length_batches([len(msgs[i]) for i in fhe_idx], fhe)
    logits_fhe = np.zeros((len(fhe_idx), len(CLASSES)))
    totals: dict[str, float] = collections.defaultdict(float)
    batch_latency = []
    wall0 = time.perf_counter()
    for k, (length, members) in enumerate(batches):
        out, times = fhe.classify([msgs[i] for i in members], length)
        logits_fhe[members] = out
        for key, v in times.items():
            totals[key] += v
        batch_latency.append(sum(times.values()))
        if k % 10 == 0 or k == len(batches) - 1:
            log(f"CKKS batch {k + 1}/{len(batches)} (L={length}, {len(members)} msgs): {sum(times.values()):.2f}s CPU "
                f"[{time.perf_counter() - wall0:.0f}s wall]")
    n_f = len(fhe_idx)
    per_message = {k: 1e3 * v / n_f for k, v in totals.items()}
    server = sum(totals[k] for k in ("lookup", "mean", "linear"))
    pred = logits_fhe.argmax(1)
    res["ckks"] = {
        "messages": n_f, "batches": len(batches), "slots": fhe.slots, "mean_per_batch": n_f / len(batches),
        "accuracy": float((pred == y[fhe_idx]).mean()),
        "agreement": float((pred == logits_pl[fhe_idx].argmax(1)).mean()),
        "max_logit_err": float(np.abs(logits_fhe - logits_pl[fhe_idx]).max()),
        "plaintext_accuracy_same_msgs": float((logits_pl[fhe_idx].argmax(1) == y[fhe_idx]).mean()),
        "per_message": per_message, "per_message_ms": sum(per_message.values()),
        "batch_latency_ms": 1e3 * statistics.median(batch_latency),
        "share": {k: totals[k] / server for k in ("lookup", "mean", "linear")},
        "share_end_to_end": {k: v / sum(totals.values()) for k, v in totals.items()},
    }
    log(f"CKKS: accuracy {res['ckks']['accuracy']:.4f}, agreement {res['ckks']['agreement']:.4f}, "
        f"max logit err {res['ckks']['max_logit_err']:.2g}, {fmt(res['ckks']['per_message_ms'])}/message")
    if res["ckks"]["max_logit_err"] > 1e-2:
        raise AssertionError(f"CKKS logits differ from plaintext by {res['ckks']['max_logit_err']:.3g}")
    info = fe.machine()
    info.update(load_start=load_start, load_end=os.getloadavg()[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}.md").write_text(render(res, info, command))
    (out_dir / f"{prefix}.json").write_text(json.dumps({"machine": info, "command": command, **res}, indent=1) + "\n")
    plot(res, out_dir / f"{prefix}.png")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=fe.RESULTS, help="results directory")
    ap.add_argument("--prefix", default="textcls", help="file name prefix of the results")
    ap.add_argument("--dim", type=int, default=16, help="embedding width (a power of two)")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary size p, PAD and UNK included")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--messages", type=int, default=None, help="evaluate only the first N test messages")
    ap.add_argument("--fhe-messages", type=int, default=None, help="run CKKS on only the first N of those")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per message (plaintext, EE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fortunes", type=Path, default=FORTUNES, help="directory of the fortunes data files")
    args = ap.parse_args(argv)
    command = ("python benchmarks/text_classification.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    run(args.out, args.prefix, args.dim, args.vocab, args.epochs, args.messages, args.fhe_messages, args.reps,
        args.seed, args.fortunes, command)
    print(f"wrote {args.out / (args.prefix + '.md')}, .png, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
