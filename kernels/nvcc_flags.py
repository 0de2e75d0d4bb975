"""The one nvcc command line for the CUDA kernels, shared by setup.py (the fatbin built at install)
and tests/test_kernels_nvcc.py (the compile check that `make test` runs).

Every GPU the appliance supports gets its own SASS (Turing through Blackwell consumer parts and
Jetson Orin), and the newest also gets PTX so that a later GPU can JIT it.  ``-fmad=false``: no
contraction of multiply-adds, so the device rounds as the host build (g++ -ffp-contract=off) and
numpy do.  Warnings are errors, and ptxas turns a register spill into an error.
"""

from __future__ import annotations

from pathlib import Path

#: Compute capabilities: T4 and RTX 20xx, A100, RTX 30xx, Jetson Orin, RTX 40xx / L4, H100, RTX 50xx.
ARCHITECTURES = (75, 80, 86, 87, 89, 90, 120)

#: Options that decide the arithmetic; the GPU loader passes the same to SourceModule.
ARITHMETIC = ("-std=c++17", "-fmad=false")


def gencode(architectures=ARCHITECTURES) -> list[str]:
    args = []
    newest = max(architectures)
    for cc in architectures:
        code = f"[sm_{cc},compute_{cc}]" if cc == newest else f"sm_{cc}"
        args += ["-gencode", f"arch=compute_{cc},code={code}"]
    return args


def fatbin_command(nvcc: str, source: str | Path, output: str | Path, architectures=ARCHITECTURES,
                   verbose: bool = False) -> list[str]:
    """nvcc compiling ``source`` into a fatbin for ``architectures``, all in one call: nvcc runs
    the architectures in parallel (``--threads 0``: one per CPU)."""
    ptxas = "--warn-on-spills,--warning-as-error" + (",-v" if verbose else "")
    return [nvcc, "-fatbin", "--threads", "0", *ARITHMETIC, "-Werror", "all-warnings",
            "-Xptxas", ptxas, *gencode(architectures), "-o", str(output), str(source)]
