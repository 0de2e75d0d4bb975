"""The fused preprocessing kernel on a GPU: achieved memory bandwidth against the device's peak.

The same batch as benchmarks/preprocess.py (200 slices of 512x512 uint16 -> window -> 256x256 area
-> normalised float32, plus the other shapes below), uploaded once; the kernel alone is timed with
CUDA events, best of N.  Bytes moved = pixels read + tensor written (tap tables and descriptors
are a few KB).  The peak is the device's memory clock x bus width x 2 (double data rate), as the
driver reports them.  End to end (upload, kernel, download) is reported beside it, with the host
build on this machine's CPU for scale.

Run on a GPU host with the `gpu` extra:  .venv/bin/python benchmarks/gpu_preprocess.py [--repeat 50]
Without pycuda or a GPU it says so and exits 0, so it can sit in a script that runs everywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance import kernels  # noqa: E402

CASES = {
    "CT 200x512x512 u16 -> 256x256 f32 (area)": ((200, 512, 512), np.uint16, kernels.ModelInput(256, 256, 1, (0.5,), (0.25,))),
    "CT 200x512x512 u16 -> 256x256 f16 (area)": ((200, 512, 512), np.uint16,
                                                  kernels.ModelInput(256, 256, 1, (0.5,), (0.25,), dtype=np.float16)),
    "DX 16x2048x2048 u16 -> 3x224x224 f32 (area)": ((16, 2048, 2048), np.uint16,
                                                     kernels.ModelInput(224, 224, 3, (0.485, 0.456, 0.406),
                                                                        (0.229, 0.224, 0.225))),
    "CT 64x512x512 i16 -> 512x512 f32 (no resize)": ((64, 512, 512), np.int16, kernels.ModelInput(512, 512)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    gpu = kernels.gpu_kernels()
    lib = kernels.host_library()
    if gpu is None or lib is None:
        print(f"no GPU kernels here ({kernels._gpu_failed or 'the host build is not installed'}); "
              "run this on a GPU host with `pip install -e '.[gpu]'`")
        return 0
    peak = gpu.peak_bandwidth()
    print(f"{gpu.name}, sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}, kernels {gpu.origin}; "
          f"peak memory bandwidth {peak / 1e9:.0f} GB/s")
    print("| case | kernel (ms) | GB/s | of peak | end to end (ms) | host build (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for name, (shape, dtype, target) in CASES.items():
        info = np.iinfo(dtype)
        volume = rng.integers(max(info.min, -2048), min(info.max, 4095), shape, dtype=dtype, endpoint=True)
        images = [kernels.SourceImage(volume[i], 12, 1.0, -1024.0, (40.0, 400.0)) for i in range(shape[0])]
        plan = kernels.plan(images, target, lib)
        moved = volume.nbytes + int(np.prod(plan.out_shape)) * plan.out_dtype.itemsize

        with gpu.current() as cuda:
            batch = gpu.upload(plan)
            gpu.launch(batch)  # warm
            gpu.stream.synchronize()
            start, end = cuda.Event(), cuda.Event()
            best_kernel = float("inf")
            for _ in range(args.repeat):
                start.record(gpu.stream)
                gpu.launch(batch)
                end.record(gpu.stream)
                end.synchronize()
                best_kernel = min(best_kernel, end.time_since(start))  # milliseconds
        end_to_end = min(_timed(lambda: gpu.preprocess(kernels.plan(images, target, lib))) for _ in range(5))
        host = min(_timed(lambda: kernels.preprocess(images, target, using="host")) for _ in range(3))
        rate = moved / (best_kernel / 1e3)
        print(f"| {name} | {best_kernel:.3f} | {rate / 1e9:.0f} | {rate / peak:.0%} | {end_to_end * 1e3:.1f} | "
              f"{host * 1e3:.1f} |")
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
