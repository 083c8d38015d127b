"""``eecompile export-triton``: a model repository whose config.pbtxt parses as Triton's ModelConfig."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from eecompile.cli import main  # noqa: E402
from eecompile.triton import export_triton, load_config  # noqa: E402


def test_bert_repository(bert_out, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    from eecompile.compiler import model_id
    from eecompile.runtime.client import Client

    result = export_triton(bert_out / "server", tmp_path / "repo", name="bert", max_batch_size=16, instances=2,
                           gpu=True)
    config = load_config(result.config_path)
    assert config.name == "bert" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == \
        [("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1])]
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == \
        [("logits", "TYPE_FP32", [3])]
    assert config.HasField("dynamic_batching")
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == pb.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
    # the version folder is the server folder: same model id as the client bundle records
    bundle_id = Client.load(bert_out / "client").model_id
    assert model_id(result.model_dir / "1") == bundle_id == config.parameters["eecompile_model_id"].string_value
    assert not result.decoder


def test_decoder_without_batching_and_cli(lm_out, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2 as pb

    code = main(["export-triton", str(lm_out / "server"), "--repo", str(tmp_path / "repo"), "--max-batch-size", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "streamed generation with the cache on the server needs 'eecompile serve'" in out
    config = load_config(tmp_path / "repo" / "eecompile" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    dims = {t.name: list(t.dims) for t in config.input}
    assert dims["input_ids"] == [-1, -1] and dims["past_key_values.0.key"] == [-1, 2, -1, 32]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    code = main(["export-triton", str(lm_out / "server"), "--repo", str(tmp_path / "repo"), "--max-batch-size", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1


def test_static_batch_dim_cannot_batch(tmp_path, capsys):
    server = tmp_path / "server"
    server.mkdir()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), str(server / "model.onnx"))
    code = main(["export-triton", str(server), "--repo", str(tmp_path / "repo")])
    _, err = capsys.readouterr()
    assert code == 2 and "use --max-batch-size 0" in err and len(err.splitlines()) == 1
    result = export_triton(server, tmp_path / "repo", max_batch_size=0)
    assert [list(t.dims) for t in load_config(result.config_path).input] == [[1, 4]]
    assert np.array_equal(onnx.load(str(result.model_dir / "1" / "model.onnx")).graph.input[0].type.tensor_type.
                          shape.dim[0].dim_value, 1)


def test_config_schema_rejects_unknown_fields(tmp_path):
    from eecompile.serve.interface import ServeError

    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nmax_batch_sise: 4\n')
    with pytest.raises(ServeError, match="not a valid Triton ModelConfig"):
        load_config(path)
    path.write_text('name: "m"\ninput { name: "x" data_type: TYPE_FLOAT32 dims: 1 }\n')
    with pytest.raises(ServeError, match="not a valid Triton ModelConfig"):
        load_config(path)


@pytest.mark.parametrize("argv, fragment", [
    (["--name", "a/b"], "model name 'a/b'"),
    (["--instances", "0"], "--instances must be >= 1"),
    (["--max-batch-size", "-1"], "--max-batch-size must be >= 0"),
])
def test_bad_options_are_one_line(bert_out, tmp_path, capsys, argv, fragment):
    code = main(["export-triton", str(bert_out / "server"), "--repo", str(tmp_path / "r"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1
