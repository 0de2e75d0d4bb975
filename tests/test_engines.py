"""TensorRT engines, the parts that need no GPU: where an engine is kept and what it is keyed by,
the optimisation profile a manifest asks for, the metadata, and the refusal to load an engine
built for another TensorRT, GPU, model or batch range.  Building and running one is in
tests/test_engines_gpu.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from appliance import engines
from appliance.config import ConfigError, load
from appliance.engines import (EngineError, EngineMetadata, Platform, ProfileShapes, check_profile_fits, engine_paths,
                               engine_state, ensure_engine, optimization_profile, read_metadata, read_plan,
                               stale_reasons)
from appliance.manifest import BUNDLED_DIR, file_sha256, load_package
from appliance.runtime import OnnxRuntime

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = Platform(tensorrt="10.3.0", compute_capability=(8, 6), gpu_name="NVIDIA A10", cuda_driver="12.4")


@pytest.fixture(scope="module")
def cxr():
    return load_package(BUNDLED_DIR / "cxr-triage")


def _fake_engine(package, engines_dir: Path, platform: Platform = PLATFORM, plan: bytes = b"plan bytes",
                 **changes) -> EngineMetadata:
    """Plan and metadata on disk as build_engine writes them (the plan's bytes are not a real
    engine: nothing here deserialises them)."""
    import hashlib

    paths = engine_paths(engines_dir, platform, package)
    meta = EngineMetadata(
        package=package.name, package_version=package.version, model_file=package.model_file,
        onnx_sha256=file_sha256(package.onnx_path), tensorrt=platform.tensorrt,
        compute_capability=platform.compute_capability, gpu_name=platform.gpu_name, cuda_driver=platform.cuda_driver,
        profile=engines.profile_json(optimization_profile(package)), precision=package.precision,
        workspace_mb=2048, builder={"strongly_typed": True, "network_flags": 2, "optimization_level": 3, "tf32": True},
        built_at="2026-11-22T02:00:00Z", build_seconds=61.5,
        plan_sha256="sha256:" + hashlib.sha256(plan).hexdigest(), plan_bytes=len(plan))
    meta = dataclasses.replace(meta, **changes)
    engines.write_atomically(paths.plan, plan)
    engines.write_atomically(paths.metadata, meta.to_json().encode())
    return meta


# ---- key and place ------------------------------------------------------------------------------------

def test_engine_is_kept_under_tensorrt_version_compute_capability_and_package_name(cxr, tmp_path):
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    assert paths.plan == tmp_path / "trt-10.3.0" / "sm_86" / "cxr-triage" / "model.plan"
    assert paths.metadata == tmp_path / "trt-10.3.0" / "sm_86" / "cxr-triage" / "model.json"
    # One timing cache per TensorRT and GPU kind, shared by every package's builds.
    assert paths.timing_cache == tmp_path / "trt-10.3.0" / "sm_86" / "timing.cache"
    key = engines.EngineKey("10.3.0", (8, 6), file_sha256(cxr.onnx_path))
    assert key.directory(tmp_path) == paths.plan.parent.parent


def test_a_different_tensorrt_or_gpu_gets_a_different_place(cxr, tmp_path):
    places = {engine_paths(tmp_path, p, cxr).plan for p in (
        PLATFORM, dataclasses.replace(PLATFORM, tensorrt="11.1.0"), dataclasses.replace(PLATFORM, compute_capability=(9, 0)))}
    assert len(places) == 3
    assert engines.sm((12, 0)) == "sm_120" and engines.sm((7, 5)) == "sm_75"


@pytest.mark.parametrize("text, version", [("10.3.0.26", "10.3.0"), ("11.1.0", "11.1.0"), ("10.13.3.9 ", "10.13.3")])
def test_tensorrt_version_is_major_minor_patch(text, version):
    assert engines.tensorrt_version(text) == version


def test_a_version_that_is_not_one_is_refused():
    with pytest.raises(EngineError, match="'dev' is not major.minor.patch"):
        engines.tensorrt_version("dev")


# ---- the optimisation profile -------------------------------------------------------------------------

def test_profile_spans_the_manifests_batch_range_nchw(cxr):
    pkg = dataclasses.replace(cxr, min_batch=2, opt_batch=4, max_batch=16)
    assert optimization_profile(pkg) == {"image": ProfileShapes(min=(2, 1, 256, 256), opt=(4, 1, 256, 256),
                                                                max=(16, 1, 256, 256))}


def test_profile_follows_the_input_layout_nhwc(cxr):
    pkg = dataclasses.replace(cxr, input_layout="NHWC", input_channels=3, input_height=224, input_width=320,
                              min_batch=1, opt_batch=2, max_batch=8)
    assert optimization_profile(pkg) == {"image": ProfileShapes(min=(1, 224, 320, 3), opt=(2, 224, 320, 3),
                                                                max=(8, 224, 320, 3))}


def _onnx_inputs(path: Path) -> dict[str, list[int]]:
    """An ONNX graph's inputs as TensorRT's parsed network reports them: -1 for a dynamic size."""
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def test_the_demo_packages_profile_fits_its_onnx_graph(cxr):
    check_profile_fits(optimization_profile(cxr), _onnx_inputs(cxr.onnx_path), "cxr-triage")


@pytest.mark.parametrize("change, inputs, words", [
    ({"input_layout": "NHWC"}, None, ["[-1, 1, 256, 256]", "input.channels/height/width/layout"]),
    ({"input_name": "pixels"}, None, ["['image']", "does not describe"]),
    ({"input_height": 512}, None, ["[-1, 1, 256, 256]", "[1, 512, 256]"]),
    ({"max_batch": 8}, {"image": [1, 1, 256, 256]}, ["fixed batch of 1", "1..8", "dynamic batch"]),
    ({}, {"image": [-1, 256, 256]}, ["3 dimensions", "check input.layout"]),
])
def test_a_profile_that_does_not_fit_the_graph_names_the_manifest_key(cxr, change, inputs, words):
    pkg = dataclasses.replace(cxr, **change)
    with pytest.raises(EngineError) as e:
        check_profile_fits(optimization_profile(pkg), inputs or _onnx_inputs(cxr.onnx_path), "cxr-triage")
    for word in words:
        assert word in str(e.value)


def test_a_fixed_batch_graph_fits_a_manifest_that_asks_for_that_batch_only(cxr):
    pkg = dataclasses.replace(cxr, min_batch=1, opt_batch=1, max_batch=1)
    check_profile_fits(optimization_profile(pkg), {"image": [1, 1, 256, 256]}, "cxr-triage")


# ---- network definition for TensorRT 10 and 11 -----------------------------------------------------------

def test_tensorrt_10_asks_for_a_strongly_typed_network_by_the_enums_bit():
    # TensorRT 10's enum: EXPLICIT_BATCH = 0 (deprecated, ignored), STRONGLY_TYPED = 1.
    assert engines.network_flags(10, SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)) == 0b10


def test_tensorrt_11_passes_no_flag_because_every_network_is_strongly_typed():
    # TensorRT 11 removed EXPLICIT_BATCH, so STRONGLY_TYPED moved to bit 0, and ignores it.
    assert engines.network_flags(11, SimpleNamespace(STRONGLY_TYPED=0)) == 0
    assert engines.network_flags(12, SimpleNamespace(STRONGLY_TYPED=0)) == 0


class _ParserError:
    def __init__(self, node, name, op, code, desc):
        self._v = (node, name, op, code, desc)

    def node(self): return self._v[0]
    def node_name(self): return self._v[1]
    def node_operator(self): return self._v[2]
    def code(self): return self._v[3]
    def desc(self): return self._v[4]


def test_onnx_parse_errors_are_reported_by_node():
    parser = SimpleNamespace(num_errors=2, get_error=[
        _ParserError(17, "/features/attn/Einsum", "Einsum", "UNSUPPORTED_NODE", "equation not supported"),
        _ParserError(-1, "", "", "INVALID_GRAPH", "no outputs")].__getitem__)
    assert engines.parser_errors(parser) == [
        "node 17 '/features/attn/Einsum' (Einsum): UNSUPPORTED_NODE: equation not supported",
        "graph: INVALID_GRAPH: no outputs"]


# ---- metadata -----------------------------------------------------------------------------------------

def test_metadata_round_trips_through_its_json_file(cxr, tmp_path):
    meta = _fake_engine(cxr, tmp_path)
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    assert read_metadata(paths.metadata) == meta
    doc = json.loads(paths.metadata.read_text())
    # What an operator reads in the file: versions, GPU, hashes, shapes, precision, options.
    assert doc["tensorrt"] == "10.3.0" and doc["compute_capability"] == "8.6" and doc["sm"] == "sm_86"
    assert doc["gpu_name"] == "NVIDIA A10" and doc["onnx_sha256"] == cxr.hashes["model.onnx"]
    assert doc["profile"] == {"image": {"min": [1, 1, 256, 256], "opt": [1, 1, 256, 256], "max": [8, 1, 256, 256]}}
    assert doc["precision"] == "fp32" and doc["workspace_mb"] == 2048 and doc["builder"]["strongly_typed"] is True
    assert doc["plan_sha256"].startswith("sha256:") and doc["built_at"] and doc["build_seconds"] == 61.5


def test_no_metadata_file_means_no_engine(cxr, tmp_path):
    assert read_metadata(tmp_path / "model.json") is None
    _, reasons = engine_state(cxr, tmp_path, PLATFORM)
    assert reasons == ["no engine has been built"]


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1}', '{"format": 99, "tensorrt": "10.3.0"}'])
def test_unreadable_metadata_marks_the_engine_for_rebuild(cxr, tmp_path, text):
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    engines.write_atomically(paths.metadata, text.encode())
    _, reasons = engine_state(cxr, tmp_path, PLATFORM)
    assert len(reasons) == 1 and str(paths.metadata) in reasons[0]


# ---- mismatches: rebuilt, never loaded ----------------------------------------------------------------

def test_a_current_engine_is_accepted(cxr, tmp_path):
    meta = _fake_engine(cxr, tmp_path)
    assert stale_reasons(meta, PLATFORM, cxr, file_sha256(cxr.onnx_path)) == []
    paths, reasons = engine_state(cxr, tmp_path, PLATFORM)
    assert reasons == []
    assert read_plan(paths, meta) == b"plan bytes"


@pytest.mark.parametrize("platform, package_change, words", [
    (dataclasses.replace(PLATFORM, tensorrt="10.4.0"), {}, ["TensorRT 10.3.0", "runs 10.4.0"]),
    (dataclasses.replace(PLATFORM, tensorrt="11.1.0"), {}, ["TensorRT 10.3.0", "runs 11.1.0"]),
    (dataclasses.replace(PLATFORM, compute_capability=(8, 9), gpu_name="NVIDIA L4"), {},
     ["sm_86 (NVIDIA A10)", "sm_89 (NVIDIA L4)"]),
    (PLATFORM, {"max_batch": 16}, ["input shapes", "[16, 1, 256, 256]"]),
    (PLATFORM, {"precision": "fp16"}, ["precision fp32", "says fp16"]),
])
def test_an_engine_for_another_tensorrt_gpu_batch_range_or_precision_is_stale(cxr, platform, package_change, words):
    meta = EngineMetadata.from_json(_metadata_json(cxr))
    reasons = stale_reasons(meta, platform, dataclasses.replace(cxr, **package_change), file_sha256(cxr.onnx_path))
    assert len(reasons) == 1
    for word in words:
        assert word in reasons[0]


def _metadata_json(cxr) -> str:
    return json.dumps({
        "format": 1, "package": cxr.name, "package_version": cxr.version, "model_file": cxr.model_file,
        "onnx_sha256": file_sha256(cxr.onnx_path), "tensorrt": "10.3.0", "compute_capability": "8.6",
        "sm": "sm_86", "gpu_name": "NVIDIA A10", "cuda_driver": "12.4",
        "profile": {"image": {"min": [1, 1, 256, 256], "opt": [1, 1, 256, 256], "max": [8, 1, 256, 256]}},
        "precision": "fp32", "workspace_mb": 2048, "builder": {}, "built_at": "2026-11-22T02:00:00Z",
        "build_seconds": 60.0, "plan_sha256": "sha256:" + "0" * 64, "plan_bytes": 10})


def test_an_engine_built_from_another_onnx_file_is_stale(cxr, tmp_path):
    # A retrained model.onnx in the same package: same name, same shapes, different bytes.
    package_dir = tmp_path / "pkg"
    package_dir.mkdir()
    (package_dir / "manifest.toml").write_text((cxr.path / "manifest.toml").read_text().split("\n[hashes]")[0])
    (package_dir / "model.onnx").write_bytes(cxr.onnx_path.read_bytes())
    pkg = load_package(package_dir)
    _fake_engine(pkg, tmp_path / "engines")
    assert engine_state(pkg, tmp_path / "engines", PLATFORM)[1] == []
    (package_dir / "model.onnx").write_bytes(cxr.onnx_path.read_bytes() + b"\0")
    _, reasons = engine_state(pkg, tmp_path / "engines", PLATFORM)
    assert len(reasons) == 1 and "model.onnx" in reasons[0] and "now has sha256:" in reasons[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_plan_that_does_not_hash_to_its_metadata_is_never_loaded(cxr, tmp_path, damage):
    meta = _fake_engine(cxr, tmp_path, plan=b"x" * 4096)
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    if damage == "flip":
        paths.plan.write_bytes(b"x" * 4095 + b"y")
    elif damage == "truncate":
        paths.plan.write_bytes(b"x" * 2048)
    else:
        paths.plan.unlink()
    with pytest.raises(EngineError, match="appliance build-engine") as e:
        read_plan(paths, meta)
    assert str(paths.plan) in str(e.value)
    assert engine_state(cxr, tmp_path, PLATFORM)[1]


def test_a_stale_engine_is_refused_when_building_is_not_allowed(cxr, tmp_path):
    _fake_engine(cxr, tmp_path, tensorrt="10.0.1")
    with pytest.raises(EngineError) as e:
        ensure_engine(cxr, tmp_path, PLATFORM, build=False)
    message = str(e.value)
    assert "cxr-triage" in message and "TensorRT 10.0.1" in message and "appliance build-engine cxr-triage" in message


def test_a_stale_engine_is_rebuilt_when_building_is_allowed(cxr, tmp_path, monkeypatch):
    _fake_engine(cxr, tmp_path, compute_capability=(7, 5), plan=b"old plan")
    built = []

    def build(package, engines_dir, platform, options=None):  # stands in for TensorRT's builder
        built.append((package.name, platform.sm))
        return _fake_engine(package, engines_dir, platform, plan=b"new plan")

    monkeypatch.setattr(engines, "build_engine", build)
    paths, meta = ensure_engine(cxr, tmp_path, PLATFORM, build=True)
    assert built == [("cxr-triage", "sm_86")]
    assert meta.compute_capability == (8, 6) and read_plan(paths, meta) == b"new plan"
    # Current now: a second call builds nothing.
    ensure_engine(cxr, tmp_path, PLATFORM, build=True)
    assert len(built) == 1


# ---- files --------------------------------------------------------------------------------------------

def test_files_are_replaced_whole_and_leave_no_temporary_behind(tmp_path):
    target = tmp_path / "a" / "model.plan"
    engines.write_atomically(target, b"one")
    engines.write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["model.plan"]


# ---- no GPU -------------------------------------------------------------------------------------------

def test_every_missing_piece_is_named_with_its_fix():
    missing = engines.missing_gpu_pieces(None, [], False, False)
    assert len(missing) == 4
    text = "\n".join(missing)
    for words in ("/dev/nvidia0 does not exist", "libcuda.so.1", "`tensorrt` is not installed",
                  "`pycuda` is not installed", "appliance[gpu]"):
        assert words in text
    assert engines.missing_gpu_pieces("10.3.0.26", ["/dev/nvidia0"], True, True) == []


def test_tensorrt_older_than_10_is_named_as_too_old():
    (problem,) = engines.missing_gpu_pieces("8.6.1.6", ["/dev/nvidia0"], True, True)
    assert "TensorRT 8.6.1.6 is too old" in problem and "tensorrt>=10" in problem


_HOST = engines._host_facts()
_HOST_HAS_GPU = not engines.missing_gpu_pieces(*_HOST)


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(_HOST_HAS_GPU, reason="this host has a GPU, TensorRT and pycuda")
def test_build_engine_without_a_gpu_says_what_is_missing_and_exits_non_zero(tmp_path):
    # The command line of systemd/appliance-engines.service.
    done = _cli("build-engine", "--all", "--missing-only", cwd=tmp_path)
    assert done.returncode == engines.EXIT_NO_GPU, done.stderr
    assert "Traceback" not in done.stderr
    assert "TensorRT engines cannot be built or run on this host" in done.stderr
    for present, words in zip((_HOST[0] is not None, bool(_HOST[1]), _HOST[2], _HOST[3]),
                              ("no TensorRT", "no NVIDIA GPU", "no CUDA driver", "no pycuda")):
        assert (words in done.stderr) != present
    assert "ONNX Runtime" in done.stderr
    assert not (tmp_path / "data").exists()


def test_build_engine_with_nothing_to_build_says_how_to_name_packages(tmp_path):
    done = _cli("build-engine", cwd=tmp_path)
    assert done.returncode == 2 and "give --all" in done.stderr and "Traceback" not in done.stderr


# ---- the GPU thread and the runtime's batch handling ---------------------------------------------------

def test_every_call_runs_on_the_one_gpu_thread_whoever_calls():
    gpu = engines.GpuThread(setup=lambda: None, name="gpu-test")
    try:
        seen = []
        callers = [threading.Thread(target=lambda: seen.append(gpu.call(threading.get_ident))) for _ in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        seen.append(gpu.call(threading.get_ident))
        assert set(seen) == {gpu.ident} and gpu.ident != threading.get_ident()
        with pytest.raises(ZeroDivisionError):  # the call's exception reaches the caller
            gpu.call(lambda: 1 / 0)
        assert gpu.call(lambda: gpu.call(lambda: 42)) == 42  # a call from the GPU thread runs in place
    finally:
        gpu.stop()
    with pytest.raises(EngineError, match="GPU thread has stopped"):
        gpu.call(lambda: None)


def test_a_gpu_thread_whose_setup_fails_raises_in_the_caller():
    def setup():
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

    with pytest.raises(RuntimeError, match="no CUDA-capable device"):
        engines.GpuThread(setup=setup)


def test_a_batch_below_the_engines_minimum_is_padded_with_zero_images():
    batch = np.ones((1, 1, 4, 4), np.float32)
    padded = engines.pad_batch(batch, 4)
    assert padded.shape == (4, 1, 4, 4) and padded[0].all() and not padded[1:].any()
    assert engines.pad_batch(batch, 1) is batch


def test_nhwc_models_get_the_kernels_nchw_batch_transposed():
    batch = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert engines.to_model_layout(batch, "NHWC").shape == (2, 4, 5, 3)
    assert engines.to_model_layout(batch, "NHWC")[1, 2, 3, 0] == batch[1, 0, 2, 3]
    assert engines.to_model_layout(batch, "NCHW") is batch


# ---- which runtime the node uses ----------------------------------------------------------------------

def test_the_default_runtime_is_onnx_runtime(cxr, tmp_path):
    assert load(None).inference_runtime == "onnxruntime"
    assert isinstance(engines.select_runtime(cxr, "onnxruntime", tmp_path), OnnxRuntime)


def test_auto_falls_back_to_onnx_runtime_with_the_reason_logged(cxr, tmp_path, caplog):
    # No engine in an empty engines folder, whether or not this host has a GPU.
    with caplog.at_level("WARNING", logger="appliance.engines"):
        runtime = engines.select_runtime(cxr, "auto", tmp_path)
    assert isinstance(runtime, OnnxRuntime)
    assert any("cxr-triage runs on ONNX Runtime" in r.getMessage() for r in caplog.records)


def test_tensorrt_asked_for_but_unavailable_stops_start_up_with_the_reason(cxr, tmp_path):
    with pytest.raises(ConfigError) as e:  # `appliance serve` prints it and exits 2, no traceback
        engines.select_runtime(cxr, "tensorrt", tmp_path)
    assert 'runtime = "tensorrt"' in str(e.value) and "cxr-triage" in str(e.value)


# ---- the build, against a stand-in for the tensorrt module ---------------------------------------------
# Only to check what build_engine asks of TensorRT and what it writes; the real builder runs in
# tests/test_engines_gpu.py.

class _FakeTensorRT:
    """Records the builder calls build_engine makes; the API names are TensorRT 10/11's."""

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        TF32 = "TF32"

    def __init__(self, version: str, strongly_typed_bit: int, parse_ok: bool = True, saved_cache: bytes = b""):
        self.__version__ = version
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=strongly_typed_bit)
        self.calls: list[tuple] = []
        self.parse_ok = parse_ok
        fake = self

        class Cache:
            def __init__(self, data: bytes):
                self.data = bytes(data)

            def combine(self, other, ignore_mismatch):
                fake.calls.append(("combine", other.data, ignore_mismatch))
                return True

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            builder_optimization_level = 3
            cache = None

            def set_memory_pool_limit(self, pool, size): fake.calls.append(("pool", pool, size))
            def set_flag(self, flag): fake.calls.append(("set_flag", flag))
            def clear_flag(self, flag): fake.calls.append(("clear_flag", flag))
            def add_optimization_profile(self, p): fake.calls.append(("profile", p.shapes))
            def create_timing_cache(self, data): return Cache(data)
            def get_timing_cache(self): return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                self.cache = cache
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx): self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Network:
            num_inputs = 1

            def get_input(self, i): return SimpleNamespace(name="image", shape=(-1, 1, 256, 256))

        class Builder:
            def __init__(self, logger): pass
            def create_network(self, flags): fake.calls.append(("create_network", flags)); return Network()
            def create_builder_config(self): return Config()
            def create_optimization_profile(self): return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", config.builder_optimization_level))
                return b"serialised plan"

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger): pass

            def parse(self, data, path):
                fake.calls.append(("parse", len(data), path))
                return fake.parse_ok

            def get_error(self, i):
                return _ParserError(4, "/stem/conv", "Conv", "UNSUPPORTED_NODE", "3-D kernel not supported")

        self.Builder, self.OnnxParser = Builder, Parser

    def called(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


@pytest.fixture
def fake_trt(monkeypatch):
    def install(*args, **kwargs):
        fake = _FakeTensorRT(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(engines, "_trt_logger_instance", None)
        return fake
    return install


def test_build_makes_a_strongly_typed_network_with_the_profile_workspace_and_no_precision_flags(cxr, tmp_path, fake_trt):
    trt = fake_trt("10.3.0.26", strongly_typed_bit=1)
    meta = engines.build_engine(cxr, tmp_path, PLATFORM, engines.BuildOptions(workspace_mb=512))
    assert trt.called("create_network") == [(0b10,)]
    assert trt.called("parse") == [(cxr.onnx_path.stat().st_size, str(cxr.onnx_path))]
    assert trt.called("profile") == [({"image": ((1, 1, 256, 256), (1, 1, 256, 256), (8, 1, 256, 256))},)]
    assert trt.called("pool") == [("WORKSPACE", 512 << 20)]
    # Precision is the ONNX graph's: no FP16/INT8 builder flags (TensorRT 11 removed them).
    assert trt.called("set_flag") == [] and trt.called("clear_flag") == []
    assert trt.called("build") == [(3,)]
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    assert paths.plan.read_bytes() == b"serialised plan"
    assert read_metadata(paths.metadata) == meta
    assert meta.onnx_sha256 == cxr.hashes["model.onnx"] and meta.workspace_mb == 512
    assert meta.builder["network_flags"] == 0b10 and meta.builder["strongly_typed"] is True
    assert engine_state(cxr, tmp_path, PLATFORM)[1] == []


def test_build_on_tensorrt_11_passes_no_network_flags(cxr, tmp_path, fake_trt):
    trt = fake_trt("11.1.0", strongly_typed_bit=0)
    platform = dataclasses.replace(PLATFORM, tensorrt="11.1.0")
    meta = engines.build_engine(cxr, tmp_path, platform)
    assert trt.called("create_network") == [(0,)] and meta.builder["network_flags"] == 0


def test_the_timing_cache_is_loaded_before_a_build_and_saved_after_it(cxr, tmp_path, fake_trt):
    trt = fake_trt("10.3.0", strongly_typed_bit=1)
    engines.build_engine(cxr, tmp_path, PLATFORM)
    cache_file = engine_paths(tmp_path, PLATFORM, cxr).timing_cache
    assert trt.called("set_timing_cache") == [(b"", False)]  # none yet: an empty one
    assert cache_file.read_bytes() == b"+timings"
    trt = fake_trt("10.3.0", strongly_typed_bit=1)
    engines.build_engine(cxr, tmp_path, PLATFORM, engines.BuildOptions(tf32=False))
    assert trt.called("set_timing_cache") == [(b"+timings", False)]  # the saved one, refused if foreign
    assert trt.called("clear_flag") == [("TF32",)]
    assert cache_file.read_bytes() == b"+timings+timings"


def test_no_tf32_on_a_tensorrt_without_the_flag_is_an_engine_error_not_a_crash(cxr, tmp_path, fake_trt, monkeypatch):
    trt = fake_trt("11.1.0", strongly_typed_bit=0)
    monkeypatch.setattr(trt, "BuilderFlag", SimpleNamespace())
    with pytest.raises(EngineError, match="no BuilderFlag.TF32"):
        engines.build_engine(cxr, tmp_path, dataclasses.replace(PLATFORM, tensorrt="11.1.0"),
                             engines.BuildOptions(tf32=False))
    assert not engine_paths(tmp_path, PLATFORM, cxr).plan.exists()


def test_an_onnx_graph_tensorrt_cannot_parse_is_reported_by_node_and_nothing_is_written(cxr, tmp_path, fake_trt):
    fake_trt("10.3.0", strongly_typed_bit=1, parse_ok=False)
    with pytest.raises(EngineError) as e:
        engines.build_engine(cxr, tmp_path, PLATFORM)
    assert "node 4 '/stem/conv' (Conv): UNSUPPORTED_NODE: 3-D kernel not supported" in str(e.value)
    assert "ONNX Runtime" in str(e.value)
    assert not engine_paths(tmp_path, PLATFORM, cxr).plan.exists()


def test_no_engine_is_built_from_an_onnx_file_that_differs_from_the_manifest(cxr, tmp_path, fake_trt):
    trt = fake_trt("10.3.0", strongly_typed_bit=1)
    pkg = dataclasses.replace(cxr, hashes={**cxr.hashes, "model.onnx": "sha256:" + "1" * 64})
    with pytest.raises(Exception, match="no engine is built from a changed model"):
        engines.build_engine(pkg, tmp_path, PLATFORM)
    assert trt.calls == []


def test_the_metadata_returned_is_the_copy_that_was_judged_current(cxr, tmp_path, monkeypatch):
    # The node loads without the build lock: a build from another manifest (here: another
    # TensorRT's metadata) may replace model.json between the check and the load.  What
    # ensure_engine returns, and what the plan is then hashed against, is what was checked.
    meta = _fake_engine(cxr, tmp_path)
    paths = engine_paths(tmp_path, PLATFORM, cxr)
    stale = dataclasses.replace(meta, tensorrt="10.0.1")
    real_read_plan = engines.read_plan

    def read_plan_then_replace(p, m):
        data = real_read_plan(p, m)
        engines.write_atomically(paths.metadata, stale.to_json().encode())
        return data

    monkeypatch.setattr(engines, "read_plan", read_plan_then_replace)
    _, got = ensure_engine(cxr, tmp_path, PLATFORM, build=False)
    assert got == meta and stale_reasons(got, PLATFORM, cxr, file_sha256(cxr.onnx_path)) == []


# ---- the runtime, against stand-ins for tensorrt and pycuda.driver -------------------------------------
# What TensorRTRuntime asks of them: named tensors, set_input_shape / get_tensor_shape for the
# batch, int addresses and an int stream handle, copies of exactly the batch's bytes; everything
# made, used and freed on the GPU thread.

class _FakeCuda:
    """pycuda.driver: device memory is a bytearray per allocation; every object notes the thread
    it was freed or dropped on (pycuda refuses to free from another thread than the context's)."""

    def __init__(self):
        self.memory: dict[int, bytearray] = {}
        self.freed_on: list[tuple[str, int]] = []
        self.handles: list = []
        fake = self

        class Allocation:
            def __init__(self, nbytes):
                self.address = 0x1000 * (len(fake.memory) + 1)
                fake.memory[self.address] = bytearray(nbytes)

            def __int__(self):
                return self.address

            def free(self):
                fake.freed_on.append(("device", threading.get_ident()))
                del fake.memory[self.address]

        class Stream:
            handle = 0xABC

            def synchronize(self):
                pass

            def __del__(self):
                fake.freed_on.append(("stream", threading.get_ident()))

        self.Allocation, self.Stream = Allocation, Stream

    def mem_alloc(self, nbytes):
        return self.Allocation(nbytes)

    def pagelocked_empty(self, shape, dtype):
        return np.zeros(shape, dtype)

    def memcpy_htod_async(self, dest, src, stream):
        data = np.ascontiguousarray(src).tobytes()
        self.memory[int(dest)][:len(data)] = data

    def memcpy_dtoh_async(self, dest, src, stream):
        dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.memory[int(src)], np.uint8)[:dest.nbytes]


class _FakeRuntimeTensorRT:
    """tensorrt at run time: an engine with input image [-1, 1, 256, 256] and output logits [-1, 3],
    whose 'kernel' writes each image's mean to its three logits."""

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    def __init__(self, cuda: _FakeCuda, logits_shape=("batch", 3)):
        self.executed: list[tuple] = []
        fake = self
        self.nptype = {"FLOAT": np.float32}.__getitem__

        class Context:
            def __init__(self):
                self.shape, self.addresses = None, {}

            def set_input_shape(self, name, shape):
                self.shape = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                n = self.shape[0]
                return self.shape if name == "image" else tuple(n if d == "batch" else d for d in logits_shape)

            def set_tensor_address(self, name, address):
                assert isinstance(address, int)
                self.addresses[name] = address
                return True

            def execute_async_v3(self, stream_handle):
                assert isinstance(stream_handle, int)
                n = self.shape[0]
                images = np.frombuffer(cuda.memory[self.addresses["image"]], np.float32)[:n * 256 * 256]
                logits = np.repeat(images.reshape(n, -1).mean(axis=1, keepdims=True), 3, axis=1).astype(np.float32)
                cuda.memory[self.addresses["logits"]][:logits.nbytes] = logits.tobytes()
                fake.executed.append((stream_handle, self.shape))
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, i): return ["image", "logits"][i]
            def get_tensor_mode(self, name): return "INPUT" if name == "image" else "OUTPUT"
            def get_tensor_dtype(self, name): return "FLOAT"
            def create_execution_context(self): return Context()

        class Runtime:
            def __init__(self, logger): pass
            def deserialize_cuda_engine(self, plan): return Engine()

        self.Runtime = Runtime


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(**kwargs):
        cuda = _FakeCuda()
        trt = _FakeRuntimeTensorRT(cuda, **kwargs)
        pycuda = SimpleNamespace(driver=cuda)
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(engines, "_trt_logger_instance", None)
        return cuda, trt
    return install


def test_the_runtime_runs_each_batch_size_and_frees_everything_on_the_gpu_thread(cxr, tmp_path, fake_gpu):
    cuda, trt = fake_gpu()
    _fake_engine(cxr, tmp_path)
    gpu = engines.GpuThread(setup=lambda: None, name="gpu-test")
    try:
        runtime = engines.TensorRTRuntime(cxr, tmp_path, PLATFORM, thread=gpu)
        for n in (1, 3, cxr.max_batch):
            batch = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 1, 256, 256), np.float32)
            got = runtime.run(batch)
            assert set(got) == {"logits"} and got["logits"].shape == (n, 3) and got["logits"].dtype == np.float32
            np.testing.assert_allclose(got["logits"][:, 0], np.arange(n))
        assert [e[0] for e in trt.executed] == [0xABC] * 3
        assert [e[1][0] for e in trt.executed] == [1, 3, cxr.max_batch]
        first = got["logits"].copy()
        runtime.run(np.zeros((2, 1, 256, 256), np.float32))
        np.testing.assert_array_equal(got["logits"], first)  # results are not views of reused buffers
        runtime.close()
        runtime.close()  # idempotent
        assert cuda.memory == {}
        assert {kind for kind, _ in cuda.freed_on} == {"device", "stream"}
        assert {thread for _, thread in cuda.freed_on} == {gpu.ident}
        with pytest.raises(EngineError, match="closed"):
            runtime.run(np.zeros((1, 1, 256, 256), np.float32))
    finally:
        gpu.stop()


def test_a_runtime_that_fails_to_load_frees_what_it_made_on_the_gpu_thread(cxr, tmp_path, fake_gpu):
    cuda, _ = fake_gpu(logits_shape=("batch", -1))  # a data-dependent output shape: refused after allocating
    _fake_engine(cxr, tmp_path)
    gpu = engines.GpuThread(setup=lambda: None, name="gpu-test")
    try:
        with pytest.raises(EngineError, match="data-dependent shape"):
            engines.TensorRTRuntime(cxr, tmp_path, PLATFORM, thread=gpu)
        assert cuda.memory == {}
        assert ("stream", gpu.ident) in cuda.freed_on and {t for _, t in cuda.freed_on} == {gpu.ident}
    finally:
        gpu.stop()
