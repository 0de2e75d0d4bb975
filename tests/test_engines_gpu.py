"""TensorRT engines on a GPU: the demo package builds, its engine gives ONNX Runtime's numbers, and
a second `build-engine --missing-only` finds it current.

Marked ``gpu``; they also skip, with the reason, on a GPU host without TensorRT or pycuda.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from appliance import engines
from appliance.manifest import BUNDLED_DIR, load_package
from appliance.runtime import OnnxRuntime

_MISSING = engines.missing_gpu_pieces(*engines._host_facts())
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING) or "TensorRT can run here")]

# TF32 (on by default for FP32 layers from Ampere) rounds products to a 10-bit mantissa; logits of
# the demo model are of order 10, so they may move by a few hundredths, probabilities by less.
LOGIT_ATOL = 5e-2
PROBABILITY_ATOL = 5e-3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    package = load_package(BUNDLED_DIR / "cxr-triage")
    engines_dir = tmp_path_factory.mktemp("engines")
    platform = engines.probe_platform()
    meta = engines.build_engine(package, engines_dir, platform)
    return package, engines_dir, platform, meta


def test_the_demo_package_builds_an_engine_with_its_metadata_and_timing_cache(built):
    package, engines_dir, platform, meta = built
    paths = engines.engine_paths(engines_dir, platform, package)
    assert paths.plan.stat().st_size == meta.plan_bytes > 0
    assert engines.read_metadata(paths.metadata) == meta
    assert meta.tensorrt == platform.tensorrt and meta.compute_capability == platform.compute_capability
    assert meta.onnx_sha256 == package.hashes["model.onnx"]
    assert paths.timing_cache.stat().st_size > 0
    assert engines.engine_state(package, engines_dir, platform)[1] == []


def test_the_engine_gives_onnx_runtimes_numbers_at_every_batch_size(built):
    package, engines_dir, platform, _ = built
    trt_runtime = engines.TensorRTRuntime(package, engines_dir, platform)
    ort_runtime = OnnxRuntime(package)
    rng = np.random.default_rng(5)
    try:
        for n in (1, 3, package.max_batch):
            batch = rng.normal(0.0, 1.0, (n, 1, package.input_height, package.input_width)).astype(np.float32)
            got, want = trt_runtime.run(batch), ort_runtime.run(batch)
            assert set(got) == set(want)
            for name in want:
                assert got[name].shape == want[name].shape and got[name].dtype == np.float32
            np.testing.assert_allclose(got["logits"], want["logits"], atol=LOGIT_ATOL)
            sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
            np.testing.assert_allclose(sigmoid(got["logits"]), sigmoid(want["logits"]), atol=PROBABILITY_ATOL)
    finally:
        trt_runtime.close()


def test_build_engine_missing_only_finds_the_engine_current(built):
    package, engines_dir, _, _ = built
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "appliance", "build-engine", "cxr-triage", "--missing-only",
                           "--engines-dir", str(engines_dir)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cxr-triage: current" in done.stdout


def test_a_tampered_engine_is_refused_by_the_runtime(built, tmp_path):
    package, engines_dir, platform, meta = built
    paths = engines.engine_paths(engines_dir, platform, package)
    copy = tmp_path / "engines"
    copy_paths = engines.engine_paths(copy, platform, package)
    engines.write_atomically(copy_paths.metadata, paths.metadata.read_bytes())
    plan = bytearray(paths.plan.read_bytes())
    plan[len(plan) // 2] ^= 0xFF
    engines.write_atomically(copy_paths.plan, bytes(plan))
    with pytest.raises(engines.EngineError, match="appliance build-engine"):
        engines.TensorRTRuntime(package, copy, platform)
    # The metadata names the GPU it was built on, for the operator.
    assert json.loads(copy_paths.metadata.read_text())["gpu_name"] == platform.gpu_name
