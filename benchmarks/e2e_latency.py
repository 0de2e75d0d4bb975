"""End-to-end latency: a chest radiograph pushed to the node -> its structured report stored in a PACS.

Real peers on loopback: dcmtk's storescu plays the modality, Orthanc the PACS, and the node runs as
its users run it (``appliance serve --config FILE``). Each radiograph is its own study, pushed in its
own association, one after another; the clock starts when storescu returns (association released,
which is when the node may call the series complete) and stops when Orthanc has indexed an SR
whose StudyInstanceUID is the pushed study's (resolution: one poll, 5 ms plus a REST call).

As a yardstick measured in the same run, the first images are also pushed straight into Orthanc:
the time for storescu to store them there is what the PACS alone costs for the same bytes.

    .venv/bin/python benchmarks/e2e_latency.py --count 50 --size 2048

Prints p50, p95, max and mean in seconds, and a Markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

from peers import (  # noqa: E402
    LOOPBACK,
    Orthanc,
    PeerError,
    ToolUnavailable,
    echoscu,
    ensure_tools,
    free_port,
    spawn,
    stop_process,
    storescu,
    tail,
)

NODE_AET = "APPLIANCE"
CALLING_AET = "MODALITY"
POLL_SECONDS = 0.005
REFERENCE_IMAGES = 10


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on; the message says why and what to do."""


def node_command(config: Path, template: str | None = None) -> list[str]:
    """How to start the node: ``template`` with {config} filled in, else the installed console
    script, else the package as a module."""
    if template:
        return [part.replace("{config}", str(config)) for part in shlex.split(template)]
    script = REPO / ".venv" / "bin" / "appliance"
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    return [sys.executable, "-m", "appliance", "serve", "--config", str(config)]


def write_config(path: Path, node_port: int, metrics_port: int, data_dir: Path, pacs: Orthanc) -> None:
    path.write_text(
        f"""[node]
ae_title = "{NODE_AET}"
port = {node_port}
bind = "{LOOPBACK}"
data_dir = "{data_dir}"

[metrics]
port = {metrics_port}
bind = "{LOOPBACK}"

[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "{pacs.host}"
port = {pacs.dicom_port}
"""
    )


def make_radiographs(folder: Path, count: int, size: int) -> list[tuple[Path, str]]:
    """``count`` DX phantoms with mixed findings, each its own study and series: [(file, StudyInstanceUID)]."""
    try:
        from export import phantoms
    except ImportError as error:
        raise BenchmarkError(f"export.phantoms cannot be imported ({error}); the phantoms make the test images") from None
    if not hasattr(phantoms, "write_dicom"):
        raise BenchmarkError("export.phantoms has no write_dicom(phantom, path, ...) yet; it writes the test images")
    import pydicom
    from pydicom.uid import generate_uid

    findings = getattr(phantoms, "FINDINGS", (None, "nodule", "pneumothorax"))
    accepted = inspect.signature(phantoms.write_dicom).parameters
    folder.mkdir(parents=True, exist_ok=True)
    made: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for seed in range(count):
        phantom = phantoms.make_phantom(seed, size=size, finding=findings[seed % len(findings)])
        path = folder / f"cxr-{seed:03d}.dcm"
        uids = {name: generate_uid() for name in ("study_uid", "series_uid") if name in accepted}
        phantoms.write_dicom(phantom, path, **uids)
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        if study in seen:
            # write_dicom gave two seeds one study; the benchmark needs a study per radiograph.
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.save_as(path)
            study = ds.StudyInstanceUID
        seen.add(study)
        made.append((path, study))
    return made


def start_node(workdir: Path, pacs: Orthanc, timeout: float, template: str | None = None
               ) -> tuple[subprocess.Popen, int, Path]:
    """Start ``appliance serve`` and wait until it answers C-ECHO; return (process, DICOM port, log)."""
    node_port = free_port()
    config = workdir / "appliance.toml"
    write_config(config, node_port, free_port(), workdir / "data", pacs)
    command = node_command(config, template)
    log = workdir / "node.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        process = spawn(command, log, env=env)
    except OSError as error:
        raise BenchmarkError(f"cannot start the node with {shlex.join(command)}: {error}") from None
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchmarkError(
                f"the node exited with status {process.returncode} before answering C-ECHO.\n"
                f"command: {shlex.join(command)}\nits log ({log}):\n{tail(log)}"
            )
        try:
            echoscu(LOOPBACK, node_port, aet=NODE_AET, calling=CALLING_AET, timeout=10)
            return process, node_port, log
        except (PeerError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            raise BenchmarkError(
                f"the node did not answer C-ECHO on {LOOPBACK}:{node_port} within {timeout:.0f} s.\n"
                f"command: {shlex.join(command)}\nits log ({log}):\n{tail(log)}"
            )
        time.sleep(0.1)


def wait_for_report(pacs: Orthanc, study_uid: str, timeout: float, node: subprocess.Popen) -> float:
    """Poll Orthanc until an SR of ``study_uid`` is stored; return time.perf_counter() at that moment."""
    query = {"StudyInstanceUID": study_uid, "Modality": "SR"}
    deadline = time.perf_counter() + timeout
    while True:
        if pacs.find_instances(query):
            return time.perf_counter()
        if node.poll() is not None:
            raise TimeoutError(f"the node exited with status {node.returncode} before the SR of study {study_uid} came")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no SR for study {study_uid} in Orthanc after {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def git_revision() -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return done.stdout.strip() + ("+dirty" if dirty else "") if done.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def run(args: argparse.Namespace, workdir: Path) -> int:
    ensure_tools("Orthanc", "storescu", "echoscu")
    node = None
    pacs = Orthanc(workdir=workdir / "orthanc")
    try:
        pacs.start()
        print(f"Orthanc up in {pacs.startup_seconds:.2f} s (DICOM {pacs.dicom_port}, HTTP {pacs.http_port})",
              file=sys.stderr)
        started = time.monotonic()
        node, node_port, node_log = start_node(workdir, pacs, args.start_timeout, args.node)
        print(f"node answers C-ECHO after {time.monotonic() - started:.2f} s (port {node_port})", file=sys.stderr)

        print(f"making {args.warmup} + {args.count} DX radiographs of {args.size}x{args.size} ...", file=sys.stderr)
        radiographs = make_radiographs(workdir / "images", args.warmup + args.count, args.size)
        warmup, measured = radiographs[: args.warmup], radiographs[args.warmup:]

        latencies: list[float] = []
        pushes: list[float] = []
        for index, (path, study) in enumerate(warmup + measured):
            pushed_at = time.perf_counter()
            storescu(path, LOOPBACK, node_port, aet=NODE_AET, calling=CALLING_AET)
            released = time.perf_counter()
            try:
                stored = wait_for_report(pacs, study, args.timeout, node)
            except TimeoutError as error:
                raise BenchmarkError(f"{error}.\nnode log ({node_log}):\n{tail(node_log)}\n"
                                     f"Orthanc log:\n{pacs.log_tail(20)}") from None
            if index >= len(warmup):
                latencies.append(stored - released)
                pushes.append(released - pushed_at)
                print(f"  {len(latencies):3d}/{len(measured)} {path.name}: push {pushes[-1]:.3f} s, "
                      f"released -> SR stored {latencies[-1]:.3f} s", file=sys.stderr)

        # Yardstick: the same images stored straight into the PACS by the same storescu.
        reference = []
        for path, _study in measured[:REFERENCE_IMAGES]:
            begun = time.perf_counter()
            storescu(path, pacs.host, pacs.dicom_port, aet=pacs.aet, calling=CALLING_AET)
            reference.append(time.perf_counter() - begun)
    finally:
        stop_process(node, timeout=15)
        pacs.stop()

    report(args, latencies, pushes, reference)
    return 0


def report(args: argparse.Namespace, latencies: list[float], pushes: list[float], reference: list[float]) -> None:
    p50, p95 = percentile(latencies, 0.50), percentile(latencies, 0.95)
    worst, mean = max(latencies), statistics.fmean(latencies)
    ingest = statistics.fmean(reference)
    command = shlex.join([".venv/bin/python", "benchmarks/e2e_latency.py", "--count", str(args.count),
                          "--size", str(args.size), "--warmup", str(args.warmup),
                          *(["--node", args.node] if args.node else [])])
    machine = f"{platform.node() or 'host'}, {os.cpu_count()} CPUs"
    print()
    print(f"End-to-end latency, association released -> SR stored in Orthanc "
          f"({len(latencies)} DX studies of {args.size}x{args.size}, {args.warmup} warm-up not counted)")
    print(f"  p50  {p50:.3f} s")
    print(f"  p95  {p95:.3f} s")
    print(f"  max  {worst:.3f} s")
    print(f"  mean {mean:.3f} s")
    print(f"  push to the node (storescu, mean)           {statistics.fmean(pushes):.3f} s")
    print(f"  push straight to Orthanc (storescu, mean of {len(reference)}) {ingest:.3f} s "
          f"-> latency p50 is {p50 / ingest:.1f}x the PACS's own ingest")
    print()
    print(f"command: {command}")
    print()
    print("| date | revision | machine | images | p50 s | p95 s | max s | mean s | p50 / Orthanc ingest | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {datetime.date.today().isoformat()} | {git_revision()} | {machine} | {len(latencies)} x DX "
          f"{args.size}x{args.size} | {p50:.3f} | {p95:.3f} | {worst:.3f} | {mean:.3f} | {p50 / ingest:.1f}x | "
          f"`{command}` |")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="studies measured (default 50)")
    parser.add_argument("--size", type=int, default=2048,
                        help="matrix of each radiograph in pixels (default 2048, as a DX detector; 1024 also usual)")
    parser.add_argument("--warmup", type=int, default=1, help="studies pushed first and not counted (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one study's SR")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the node's C-ECHO")
    parser.add_argument("--node", metavar="COMMAND",
                        help="command that starts the node, {config} standing for the config file "
                             "(default: .venv/bin/appliance serve --config {config})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (images, logs, spool)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.warmup < 0 or not 16 <= args.size <= 4096:
        parser.error("--count must be >= 1, --warmup >= 0, --size within 16..4096")

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the node and Orthanc.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="e2e-latency-"))
    try:
        return run(args, workdir)
    except (BenchmarkError, ToolUnavailable, PeerError) as error:
        print(f"e2e_latency: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("e2e_latency: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
