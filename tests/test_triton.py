"""`appliance export --triton-repo`: a model repository entry Triton reads, agreeing with the ONNX file."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

import export_models as em
from appliance.cli import main
from appliance.manifest import load_package
from export.triton import write_repository


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A package with two output tensors (logits and a heatmap), exported with --triton-repo."""
    root = tmp_path_factory.mktemp("triton")
    package = em.make_package(root / "cxr-cam", "with_heatmap", heatmap="cam")
    text = (package / "manifest.toml").read_text().replace("max_batch = 4", "max_batch = 4\nopt_batch = 2")
    (package / "manifest.toml").write_text(text)
    repo = root / "repository"
    assert main(["export", str(package), "--factory", "export_models:with_heatmap",
                 "--weights", str(package / "weights.pt"), "--triton-repo", str(repo)]) == 0
    return package, repo


def test_the_config_parses_with_tritons_own_protobuf_and_serves_the_onnx_file(exported):
    package, repo = exported
    pkg = load_package(package)
    config = parse(repo / "cxr-cam" / "config.pbtxt")
    assert (config.name, config.platform, config.default_model_filename) == ("cxr-cam", "onnxruntime_onnx", "model.onnx")
    assert config.max_batch_size == pkg.max_batch == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
    assert (repo / "cxr-cam" / "1" / "model.onnx").read_bytes() == pkg.onnx_path.read_bytes()


def test_the_configs_tensors_are_the_onnx_graphs_without_the_batch_dimension(exported):
    package, repo = exported
    config = parse(repo / "cxr-cam" / "config.pbtxt")
    graph = onnx.load(str(package / "model.onnx")).graph

    def declared(values):
        return [(v.name, model_config_pb2.DataType.Name(v.data_type), list(v.dims)) for v in values]

    def from_onnx(values):
        return [(v.name, "TYPE_FP32" if v.type.tensor_type.elem_type == TensorProto.FLOAT else "?",
                 [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]) for v in values]

    assert declared(config.input) == from_onnx(graph.input) == [("image", "TYPE_FP32", [1, em.SIZE, em.SIZE])]
    assert declared(config.output) == from_onnx(graph.output)
    assert [o.name for o in config.output] == ["logits", "cam"]


def test_a_tensorrt_plan_entry_serves_the_engine_on_the_gpu(exported, tmp_path):
    package, _ = exported
    pkg = load_package(package)
    engine = tmp_path / "cxr-cam.engine"
    engine.write_bytes(b"a serialised TensorRT engine")
    entry = write_repository(tmp_path / "repo", pkg, pkg.onnx_path, engine=engine)
    config = parse(entry / "config.pbtxt")
    assert (config.platform, config.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert [i.name for i in config.input] == ["image"] and [o.name for o in config.output] == ["logits", "cam"]
    assert (entry / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not (entry / "1" / "model.onnx").exists()


def test_rewriting_an_entry_replaces_it_and_leaves_the_other_models_alone(exported, tmp_path):
    package, _ = exported
    pkg = load_package(package)
    repo = tmp_path / "repo"
    other = repo / "other-model" / "1"
    other.mkdir(parents=True)
    (other / "model.onnx").write_bytes(b"someone else's model")
    write_repository(repo, pkg, pkg.onnx_path, engine=_engine(tmp_path))
    entry = write_repository(repo, pkg, pkg.onnx_path)
    assert sorted(p.name for p in repo.iterdir()) == ["cxr-cam", "other-model"]
    assert sorted(p.name for p in (entry / "1").iterdir()) == ["model.onnx"]
    assert (other / "model.onnx").read_bytes() == b"someone else's model"
    assert (entry.stat().st_mode & 0o755) == 0o755     # readable by a server running as another user


def test_data_types_come_from_the_graph_and_a_fixed_batch_is_refused(tmp_path):
    pkg = load_package(_package_with_onnx(tmp_path))
    half = _identity_model(tmp_path / "half.onnx", TensorProto.FLOAT16, "batch")
    entry = write_repository(tmp_path / "repo", pkg, half)
    config = parse(entry / "config.pbtxt")
    assert [model_config_pb2.DataType.Name(t.data_type) for t in [*config.input, *config.output]] == ["TYPE_FP16"] * 2
    fixed = _identity_model(tmp_path / "fixed.onnx", TensorProto.FLOAT, 1)
    with pytest.raises(ValueError, match="without a free batch dimension"):
        write_repository(tmp_path / "repo", pkg, fixed)


def _engine(folder: Path) -> Path:
    engine = folder / "model.engine"
    engine.write_bytes(b"engine")
    return engine


def _identity_model(path: Path, elem_type: int, batch: int | str) -> Path:
    shape = [batch, 1, em.SIZE, em.SIZE]
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", elem_type, shape)],
                              [helper.make_tensor_value_info("logits", elem_type, shape)])
    onnx.save(helper.make_model(graph), str(path))
    return path


def _package_with_onnx(tmp_path: Path) -> Path:
    package = em.make_package(tmp_path / "identity", None)
    _identity_model(package / "model.onnx", TensorProto.FLOAT, "batch")
    return package
