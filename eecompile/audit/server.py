"""What an attacker holds: a model's graph and weights (``ModelView``) — the encrypted server
model, or a plaintext model it knows — and, for scoring only, the client's ground truth.

Nothing in :class:`ModelView` uses a key or a client bundle: it reads an ONNX file the way a
curious server would, finds the token embedding table (the constant table of the ``Gather``
whose indices are a graph input), the residual stream (the chain of ``Add`` nodes fed by that
gather) and runs the model with any intermediate tensor exposed as an output.

:class:`Truth` reads the client bundle. Attacks never see it; the audit uses it to score
their guesses.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from eecompile.errors import EECompileError


class AuditError(EECompileError):
    """The audit cannot run on the given inputs (missing server folder, model, corpus, ...)."""


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise AuditError(f"model file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types
        raise AuditError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


class ModelView:
    """An ONNX model as an attacker sees it: its graph, its weights, and a way to run it."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        self.path = path
        self.model = _load(path)
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.input_names = [i.name for i in g.input if i.name not in self.inits]
        self.output_names = [o.name for o in g.output]

    # -- weights -----------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """An initializer (or Constant node) as a numpy array."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        raise KeyError(name)

    def is_const(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.inits or (node is not None and node.op_type == "Constant")

    @cached_property
    def parameter_count(self) -> int:
        """Number of weights (elements of every initializer)."""
        return int(sum(np.prod(t.dims, dtype=np.int64) for t in self.model.graph.initializer))

    def _embedding_node(self) -> onnx.NodeProto | None:
        for n in self.model.graph.node:
            if n.op_type != "Gather" or len(n.input) < 2:
                continue
            if self.is_const(n.input[0]) and n.input[1] in self.input_names:
                return n
        return None

    @cached_property
    def token_input(self) -> str | None:
        """The graph input holding token ids (indices of the embedding gather), if any."""
        node = self._embedding_node()
        return None if node is None else node.input[1]

    @cached_property
    def embedding(self) -> np.ndarray:
        """The token embedding table ``[vocab, hidden]`` (float64)."""
        node = self._embedding_node()
        if node is None:
            raise AuditError(f"{self.path} has no token embedding (a Gather from a constant table indexed by a "
                             "graph input)")
        return self.array(node.input[0]).astype(np.float64)

    @cached_property
    def max_positions(self) -> int | None:
        """Rows of a learned position table (another constant-table ``Gather`` as wide as the embedding)."""
        tok = self._embedding_node()
        if tok is None:
            return None
        width = self.embedding.shape[1]
        rows = []
        for n in self.model.graph.node:
            if n.op_type == "Gather" and n is not tok and self.is_const(n.input[0]):
                shape = self.array(n.input[0]).shape
                if len(shape) == 2 and shape[1] == width:
                    rows.append(shape[0])
        return min(rows) if rows else None

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @cached_property
    def residual_chain(self) -> list[str]:
        """Tensors of the residual stream: the embedding output, then each ``Add`` fed by the previous one.

        Follows, from the embedding gather's output, the unique ``Add`` consumer whose output
        is itself consumed by a further ``Add`` or a normalisation — the skip connections of a
        pre-norm transformer. The first entry is the token embedding (plus position
        embedding where the model adds one).
        """
        node = self._embedding_node()
        if node is None:
            return []
        chain = [node.output[0]]
        seen = set(chain)
        while True:
            adds = [n for n in self.consumers.get(chain[-1], []) if n.op_type == "Add"
                    and not any(self.is_const(i) for i in n.input)]
            if len(adds) != 1 or adds[0].output[0] in seen:
                break
            chain.append(adds[0].output[0])
            seen.add(chain[-1])
        return chain

    # -- running ------------------------------------------------------------------------
    def session(self, extra_outputs: tuple[str, ...] = ()):
        """An ONNX Runtime CPU session with ``extra_outputs`` exposed as graph outputs."""
        key = tuple(extra_outputs)
        cache = self.__dict__.setdefault("_sessions", {})
        if key not in cache:
            import onnxruntime as ort

            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            present = {o.name for o in model.graph.output}
            for name in extra_outputs:
                if name not in present:
                    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            cache[key] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return cache[key]

    def input_info(self) -> dict[str, tuple[list, int]]:
        """Input name -> (dims with names/ints, ONNX element type)."""
        out = {}
        for i in self.model.graph.input:
            if i.name in self.inits:
                continue
            tt = i.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out[i.name] = (dims, tt.elem_type)
        return out

    def lm_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for a language model given token ids ``[batch, seq]``: empty KV cache, full mask."""
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        feeds = {}
        for name, (dims, elem) in self.input_info().items():
            if name == self.token_input:
                feeds[name] = ids
            elif "mask" in name:
                feeds[name] = np.ones((b, s), dtype=np.int64)
            elif "position" in name:
                feeds[name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
            elif "past" in name or "cache" in name:
                shape = [b if i == 0 else (0 if isinstance(d, str) or d is None else d) for i, d in enumerate(dims)]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                feeds[name] = np.zeros(shape, dtype=dtype)
            else:
                raise AuditError(f"do not know how to feed input {name!r} of {self.path}")
        return feeds

    def hidden_states(self, ids: np.ndarray, tensors: list[str], batch: int = 256) -> list[np.ndarray]:
        """Run the model on token ids ``[n, seq]`` and return the named intermediate tensors."""
        sess = self.session(tuple(tensors))
        outs: list[list[np.ndarray]] = [[] for _ in tensors]
        for start in range(0, len(ids), batch):
            res = sess.run(list(tensors), self.lm_feeds(ids[start:start + batch]))
            for k, r in enumerate(res):
                outs[k].append(r)
        return [np.concatenate(o, axis=0).astype(np.float64) for o in outs]


class Truth:
    """The client's secrets, for scoring attacks only (never passed to an attack)."""

    def __init__(self, client_dir: str | Path) -> None:
        from eecompile.runtime.client import Client

        self.client = Client.load(client_dir)

    def transform(self, name: str):
        for t in self.client.spec.inputs + self.client.spec.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def vocab_perm(self, token_input: str) -> np.ndarray:
        """``perm`` with ``plain = perm[cipher]`` for the token-id input."""
        t = self.transform(token_input)
        if t.kind != "index":
            raise AuditError(f"input {token_input!r} is not protected by an index permutation")
        return np.asarray(t.index.index_map(), dtype=np.int64)

    def encrypt_ids(self, token_input: str, ids: np.ndarray) -> np.ndarray:
        return self.client.encrypt({token_input: np.asarray(ids, dtype=np.int64)})[token_input]

    def continuous_inputs(self) -> list:
        """Boundary transforms of inputs protected by a basis change on an axis."""
        return [t for t in self.client.spec.inputs if t.kind == "axis"]
