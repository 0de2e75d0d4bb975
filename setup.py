"""Builds the preprocessing kernels when the package is installed (metadata is in pyproject.toml).

* ``appliance/_kernels_host*.so``: kernels/host.cpp with g++ and OpenMP, a plain C library that
  appliance/kernels.py loads with ctypes.  Needs only a C++17 compiler.
* ``appliance/_kernels.fatbin``: kernels/preprocess.cu for every supported GPU architecture, when
  nvcc is on PATH (or in $CUDA_HOME/bin).  Without it, or if it fails, the GPU loader compiles
  the source at first use instead.  ``APPLIANCE_FATBIN=0`` skips it.
* ``appliance/_kernels_src/``: the CUDA sources, for that first-use compile in an installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
sys.path.insert(0, str(KERNELS))
from nvcc_flags import fatbin_command  # noqa: E402  (one list of nvcc flags for setup.py and the tests)


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return None


class BuildKernels(build_ext):
    """build_ext, then the fatbin beside the host library."""

    def run(self) -> None:
        super().run()
        if os.environ.get("APPLIANCE_FATBIN", "1") == "0":
            return
        nvcc = find_nvcc()
        if nvcc is None:
            print("appliance: nvcc not found; the GPU kernels will be compiled at first use", file=sys.stderr)
            return
        target = Path(self.get_ext_fullpath("appliance._kernels_host")).parent / "_kernels.fatbin"
        target.parent.mkdir(parents=True, exist_ok=True)
        command = fatbin_command(nvcc, KERNELS / "preprocess.cu", target)
        print("appliance: " + " ".join(command), file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            # The install must not fail on a CUDA toolchain problem: a CPU box runs the host build,
            # and `make test` runs the same compile as a test, which shows the error.
            print(f"appliance: nvcc failed ({done.returncode}); the GPU kernels will be compiled at first use\n"
                  f"{done.stderr[-4000:]}", file=sys.stderr)
            target.unlink(missing_ok=True)


class BuildPyWithKernelSources(build_py):
    """build_py, plus the CUDA sources inside the package for SourceModule in an installed wheel."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "appliance" / "_kernels_src"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("pixel_math.h", "preprocess.cu"):
            shutil.copyfile(KERNELS / name, target / name)


host = Extension(
    "appliance._kernels_host",
    sources=["kernels/host.cpp"],
    include_dirs=["kernels"],
    depends=["kernels/pixel_math.h", "kernels/host_loops.inc"],
    language="c++",
    # -ffp-contract=off: no fused multiply-add, so the host rounds as numpy and the device do.
    extra_compile_args=["-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off", "-g0"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[host], cmdclass={"build_ext": BuildKernels, "build_py": BuildPyWithKernelSources})
