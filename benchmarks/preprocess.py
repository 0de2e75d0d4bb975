"""Preprocessing a CT series: the fused host kernels against MONAI, numpy and a memcpy, in one run.

200 slices of 512x512 uint16 -> modality LUT and VOI window -> 256x256 (area) -> normalised float32,
each contender timed best-of-N on the same data in the same process:

* kernels (host build): appliance.kernels with APPLIANCE_KERNELS=host, planning included; into a
                        preallocated tensor (as the memcpy writes into one) and allocating it
* numpy:                the node's numpy pipeline before the kernels (appliance.preprocessing:
                        modality LUT, voi_window, resize as weight matrices, normalise), slice by slice
* MONAI:                Compose([ScaleIntensityRange, Resize(area), NormalizeIntensity]) over the
                        stack, channel-first, torch using every core
* memcpy:               np.copyto of the input into a preallocated array: the memory-speed floor

Run:  .venv/bin/python benchmarks/preprocess.py [--repeat 7] [--append benchmarks/RESULTS.md]
(unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE in that command when set: they slow current numpy.)
Targets (issue 4): at least 8x faster than MONAI on 2 cores, within 4x of the memcpy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from types import SimpleNamespace  # noqa: E402

from appliance import kernels  # noqa: E402
from appliance.manifest import Preprocessing, Window  # noqa: E402
from appliance.preprocessing import preprocess_pixels  # noqa: E402

SECTION = "## Preprocessing (issue 4)"
SECTION_INTRO = ("benchmarks/preprocess.py: the fused host kernels (appliance.kernels, kernels/host.cpp) against a "
                 "memcpy of the input, the node's numpy pipeline and a MONAI transform chain, in one process on the "
                 "same data. Targets: at least 8x faster than MONAI, within 4x of the memcpy. Each run is appended "
                 "below with the command that made it; compare ratios within a run only.")

SLICES, SIZE, OUT = 200, 512, 256
CENTER, WIDTH, INTERCEPT = 40.0, 400.0, -1024.0
MEAN, STD = 0.5, 0.25


def ct_series(seed: int = 0) -> np.ndarray:
    """A synthetic CT stack: air around a water disc with noise, 12 bits stored."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    disc = ((y - SIZE / 2) ** 2 + (x - SIZE / 2) ** 2 < (0.4 * SIZE) ** 2) * 1024
    stack = disc[None] + rng.normal(0, 40, (SLICES, SIZE, SIZE))
    return np.clip(stack, 0, 4095).astype(np.uint16)


def best_of_interleaved(contenders: dict, repeat: int) -> tuple[dict, dict]:
    """Best time of each contender, running them in turn within each round, so that other work on
    the machine weighs on all of them alike.  The first round warms up (allocations, threads)."""
    best = {name: float("inf") for name in contenders}
    results = {}
    for round_ in range(repeat + 1):
        for name, (fn, rounds) in contenders.items():
            if round_ > rounds:
                continue
            start = time.perf_counter()
            results[name] = fn()
            elapsed = time.perf_counter() - start
            if round_:
                best[name] = min(best[name], elapsed)
    return best, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-monai", action="store_true", help="when MONAI is not installed")
    parser.add_argument("--append", type=Path, help="append the results as markdown to this file")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews times (not ratios within a run as much)

    volume = ct_series()
    images = [kernels.SourceImage(volume[i], 12, 1.0, INTERCEPT, (CENTER, WIDTH)) for i in range(SLICES)]
    target = kernels.ModelInput(OUT, OUT, 1, (MEAN,), (STD,), "area")
    cores = os.cpu_count() or 1
    rows = []

    lib = kernels.host_library()
    if lib is None:
        print("the host build of the kernels is not installed: pip install -e .", file=sys.stderr)
        return 1
    copy = np.empty_like(volume)
    # like the memcpy, into memory that exists: a node reuses its input tensor from series to series
    tensor = np.empty((SLICES, 1, OUT, OUT), np.float32)
    package = SimpleNamespace(  # what preprocess_pixels reads of a model package
        preprocessing=Preprocessing(window=None, resize="area", mean=(MEAN,), std=(STD,), monochrome1="invert"),
        input_height=OUT, input_width=OUT, input_channels=1)

    def numpy_pipeline():
        return np.stack([preprocess_pixels(volume[i].astype(np.float32) + np.float32(INTERCEPT), Window(CENTER, WIDTH),
                                           "MONOCHROME2", package) for i in range(SLICES)])

    contenders = {
        "memcpy of the input (np.copyto)": (lambda: np.copyto(copy, volume), args.repeat),
        f"kernels, host build ({lib.isa}, {lib.threads} threads), into a tensor":
            (lambda: kernels.preprocess(images, target, using="host", out=tensor), args.repeat),
        "kernels, host build, allocating the tensor (first touch of 52 MB)":
            (lambda: kernels.preprocess(images, target, using="host"), args.repeat),
        "kernels, host build, 1 thread, into a tensor":
            (lambda: kernels.preprocess(images, target, using="host", out=tensor, threads=1), args.repeat),
        "numpy pipeline (appliance.preprocessing, per slice)": (numpy_pipeline, max(1, args.repeat // 3)),
    }
    monai_name = None
    if not args.skip_monai:
        import monai
        import torch
        from monai.transforms import Compose, NormalizeIntensity, Resize, ScaleIntensityRange

        torch.set_num_threads(cores)
        # the same LINEAR window (PS3.3 C.11.2.1.2.1) on stored values: its ends less the intercept
        low = CENTER - 0.5 - (WIDTH - 1) / 2 - INTERCEPT
        chain = Compose([
            ScaleIntensityRange(a_min=low, a_max=low + WIDTH - 1, b_min=0.0, b_max=1.0, clip=True),
            Resize((OUT, OUT), mode="area"),
            NormalizeIntensity(subtrahend=MEAN, divisor=STD),
        ])
        monai_name = f"MONAI {monai.__version__} chain (torch {torch.__version__}, {cores} threads)"
        contenders[monai_name] = (lambda: chain(volume), args.repeat)

    best, results = best_of_interleaved(contenders, args.repeat)
    names = list(contenders)
    rows = [(name, best[name]) for name in names]
    t_memcpy, t_host, t_numpy = best[names[0]], best[names[1]], best[names[4]]
    fused = kernels.preprocess(images, target, using="host")
    error = float(np.abs(fused - results[names[4]]).max())
    t_monai = best[monai_name] if monai_name else None
    if monai_name:
        monai_error = float(np.abs(np.asarray(results[monai_name]) - fused[:, 0]).max())

    lines = [f"| contender | best of {args.repeat} (ms) | vs kernels |", "| --- | ---: | ---: |"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / t_host:.2f}x |")
    summary = [f"kernels vs memcpy: {t_host / t_memcpy:.2f}x the memcpy time (target: within 4x)",
               f"numpy pipeline / kernels: {t_numpy / t_host:.1f}x"]
    if t_monai is not None:
        summary.insert(0, f"MONAI / kernels: {t_monai / t_host:.1f}x faster (target: at least 8x)")
        summary.append(f"largest difference from MONAI's output: {monai_error:.2e}")
    summary.append(f"largest difference from the numpy pipeline: {error:.2e}")
    header = (f"{SLICES} slices {SIZE}x{SIZE} uint16 -> window ({CENTER:g}, {WIDTH:g}) -> {OUT}x{OUT} area -> "
              f"(v - {MEAN}) / {STD} float32; {platform.machine()}, {cores} cores, load average {load:.1f} at start")
    print(header)
    print("\n".join(lines))
    print("\n".join(summary))

    if args.append:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "APPLIANCE_KERNELS_ISA")
                       if k in os.environ)
        command = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE " + (env + " " if env else "") + \
            ".venv/bin/python " + " ".join(shlex.quote(a) for a in ["benchmarks/preprocess.py", *sys.argv[1:]])
        existing = args.append.read_text() if args.append.exists() else ""
        with open(args.append, "a") as f:
            if SECTION not in existing:
                f.write(("\n" if existing else "") + SECTION + "\n\n" + SECTION_INTRO + "\n")
            f.write(f"\n### Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                    f"`{command}`\n\n{header}\n\n" + "\n".join(lines) + "\n\n" +
                    "\n".join(f"- {s}" for s in summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
