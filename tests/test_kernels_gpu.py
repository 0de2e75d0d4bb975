"""The CUDA kernels: they compile for every supported GPU without a warning or a register spill,
and on a GPU they produce the host build's bits.

The compile check needs only nvcc (no GPU) and runs in `make test`; the device tests are marked
``gpu`` and skip with a reason on a machine without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from appliance import kernels
from appliance.kernels import Gaussian, Median, ModelInput, SourceImage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
from nvcc_flags import ARCHITECTURES, fatbin_command  # noqa: E402

sys.path.remove(str(ROOT / "kernels"))

KERNEL_NAMES = ("ak_preprocess_kernel", "ak_preprocess_gaussian_kernel", "ak_preprocess_median_kernel",
                "ak_sigmoid_kernel", "ak_softmax_kernel", "ak_argmax_kernel", "ak_labels_nearest_kernel")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA compile check needs it")
def test_cuda_kernels_compile_for_every_architecture_without_warnings_or_spills(tmp_path):
    command = fatbin_command("nvcc", ROOT / "kernels" / "preprocess.cu", tmp_path / "kernels.fatbin", verbose=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"nvcc failed:\n{log[-6000:]}"
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'", then its "N bytes spill stores, ..." line
    compiled = defaultdict(set)
    spills = []
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if entry:
            current = (entry.group(1), int(entry.group(2)))
            compiled[current[0]].add(current[1])
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and (int(spill.group(1)) or int(spill.group(2))):
            spills.append(f"{current}: {line.strip()}")
    assert not spills, "register spills:\n" + "\n".join(spills)
    for name in KERNEL_NAMES:
        assert compiled[name] == set(ARCHITECTURES), f"{name} compiled for {sorted(compiled[name])}"
    assert (tmp_path / "kernels.fatbin").stat().st_size > 0


# ---- on a GPU: the device build against the host build -------------------------------------------------

def _batch():
    rng = np.random.default_rng(20)
    return [SourceImage(rng.integers(0, 4096, (512, 512), dtype=np.uint16), 12, 1.0, -1024.0, (40.0, 400.0)),
            SourceImage(rng.integers(-2048, 2048, (97, 301), dtype=np.int16), 12, 1.5, 3.0, (0.0, 900.0), "SIGMOID",
                        True),
            SourceImage(rng.integers(0, 256, (1, 1), dtype=np.uint8), 8),
            SourceImage(rng.normal(0, 100, (64, 33)).astype(np.float32), None, 2.0, 0.0, (5.0, 1.0)),
            SourceImage(rng.integers(0, 1 << 20, (40, 50), dtype=np.uint32), 20, 0.5, -7.0, (1e5, 3e5), "LINEAR_EXACT")]


@pytest.mark.gpu
@pytest.mark.parametrize("target", [
    ModelInput(256, 256, 1, (0.5,), (0.25,), "area"),
    ModelInput(224, 320, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", np.float16),
    ModelInput(64, 64, 1, (0.0,), (1.0,), "area", noise=Gaussian(1.5)),
    ModelInput(100, 90, 2, (0.1, 0.2), (0.5, 0.7), "bilinear", noise=Median(1)),
    ModelInput(33, 17, 1, (0.5,), (0.25,), "area", noise=Median(2)),
])
def test_device_build_gives_the_host_builds_bits(target):
    assert kernels.gpu_kernels() is not None, kernels._gpu_failed
    images = _batch()
    device = kernels.preprocess(images, target, using="gpu")
    host = kernels.preprocess(images, target, using="host")
    np.testing.assert_array_equal(device, host)


@pytest.mark.gpu
def test_device_postprocessing_gives_the_host_builds_bits():
    rng = np.random.default_rng(21)
    logits = rng.normal(0, 8, (2, 4, 37, 29)).astype(np.float32)
    for fn, args in ((kernels.sigmoid, ()), (kernels.softmax, (1,)), (kernels.argmax, (1,)),
                     (kernels.resample, (300, 200)), (kernels.labels_to_source, (300, 201))):
        x = kernels.argmax(logits, 1, using="host") if fn is kernels.labels_to_source else logits
        np.testing.assert_array_equal(fn(x, *args, using="gpu"), fn(x, *args, using="host"))


@pytest.mark.gpu
def test_the_source_compiled_at_first_use_matches_the_fatbin():
    source = (kernels.kernel_source_dir() / "preprocess.cu").read_text()
    compiled = kernels.GpuKernels(source=source)
    images, target = _batch(), ModelInput(128, 128, 1, (0.5,), (0.25,))
    lib = kernels.host_library()
    np.testing.assert_array_equal(compiled.preprocess(kernels.plan(images, target, lib)),
                                  kernels.preprocess(images, target, using="host"))


# ---- the loader's plumbing, on a stand-in driver --------------------------------------------------------

class _Allocation:
    def __init__(self, nbytes: int):
        self.buf = np.zeros(nbytes, np.uint8)


def _stand_in_pycuda(launches: list):
    """pycuda.driver and pycuda.compiler, with 'device memory' in numpy and each kernel run by the
    host build: what reaches a kernel is exactly what the loader packed for the device."""
    import ctypes
    import types

    lib = kernels.host_library().lib
    ptr = lambda a: a.buf.ctypes.data  # noqa: E731

    def run(name, args, block, grid):
        launches.append((name, block, grid))
        if name.startswith("ak_preprocess"):
            images, batch, pixels, first, weight, filt, out = args
            descs = images.buf.view(kernels.IMAGE_DTYPE).copy()
            descs["pixels"] += pixels.buf.ctypes.data  # offsets into the packed buffer -> addresses
            b = batch.buf.view(kernels.BATCH_DTYPE)[0]
            assert name == {0: "ak_preprocess_kernel", 1: "ak_preprocess_gaussian_kernel",
                            2: "ak_preprocess_median_kernel"}[int(b["filter"])]
            assert grid[0] * block[0] >= b["columns"] and grid[1] * block[1] >= b["rows"] and grid[2] == len(descs)
            lib.akh_preprocess(descs.ctypes.data, len(descs), ptr(batch), ptr(first), ptr(weight), ptr(filt), ptr(out), 0)
            return
        src, dst, *scalars = args
        assert all(isinstance(s, np.int64) for s in scalars), "integer kernel arguments must be int64"
        scalars = [int(s) for s in scalars]
        {"ak_sigmoid_kernel": lib.akh_sigmoid, "ak_softmax_kernel": lib.akh_softmax,
         "ak_argmax_kernel": lib.akh_argmax, "ak_labels_nearest_kernel": lib.akh_labels_nearest}[name](
            ptr(src), ptr(dst), *scalars, 0)

    class Module:
        def get_function(self, name):
            return lambda *args, block, grid, stream=None: run(name, args, block, grid)

    class Context:
        def push(self):
            pass

        @staticmethod
        def pop():
            pass

    class Device:
        def __init__(self, index):
            pass

        def name(self):
            return "stand-in"

        def compute_capability(self):
            return (9, 0)

        def retain_primary_context(self):
            return Context()

    def htod(dst, src, stream=None):
        data = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        dst.buf[:data.size] = data

    def dtoh(dst, src, stream=None):
        view = dst.reshape(-1).view(np.uint8)
        view[:] = src.buf[:view.size]

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device, driver.Context, driver.Error = Device, Context, RuntimeError
    driver.Stream = lambda: types.SimpleNamespace(synchronize=lambda: None)
    driver.mem_alloc = _Allocation
    driver.memcpy_htod_async, driver.memcpy_dtoh_async = htod, dtoh
    driver.module_from_file = lambda path: Module()
    compiler = types.ModuleType("pycuda.compiler")
    compiler.SourceModule = lambda *a, **k: Module()
    package = types.ModuleType("pycuda")
    package.driver, package.compiler = driver, compiler
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.compiler": compiler}


def test_gpu_loader_packs_batches_and_arguments_as_the_kernels_take_them(monkeypatch):
    launches = []
    for name, module in _stand_in_pycuda(launches).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "_gpu", None)
    monkeypatch.setattr(kernels, "_gpu_failed", None)
    assert kernels.backend("auto") == "gpu"
    images = _batch()
    for target in (ModelInput(40, 30, 3, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "bilinear", np.float16),
                   ModelInput(20, 20, noise=Median(2)), ModelInput(20, 20, noise=Gaussian(1.0))):
        np.testing.assert_array_equal(kernels.preprocess(images, target), kernels.preprocess(images, target, using="host"))
    rng = np.random.default_rng(22)
    logits = rng.normal(0, 8, (2, 4, 37, 29)).astype(np.float32)
    labels = kernels.argmax(logits, 1, using="host")
    for got, expected in ((kernels.sigmoid(logits), kernels.sigmoid(logits, using="host")),
                          (kernels.softmax(logits, 1), kernels.softmax(logits, 1, using="host")),
                          (kernels.argmax(logits, 1), labels),
                          (kernels.resample(logits, 50, 60), kernels.resample(logits, 50, 60, using="host")),
                          (kernels.labels_to_source(labels, 50, 61), kernels.labels_to_source(labels, 50, 61, using="host"))):
        np.testing.assert_array_equal(got, expected)
    assert {name for name, _, _ in launches} == set(KERNEL_NAMES)
