"""Ingest throughput: the node against dcmtk's storescp, same sender, same corpora, same run.

The sender is dcmtk's ``storescu`` with ``TCP_NODELAY=1`` (a scanner), on loopback. Two corpora:
200 CT slices of 512x512 int16 (one series, ~100 MB) and 20 radiographs of 2048x2048 uint16
(~160 MB). Each is pushed in one association, then split over 4 concurrent associations (4
storescu processes). The receivers:

* the node, as its users run it (``appliance serve --config FILE``), durability on: 0x0000 only
  once the instance is on disk and indexed (fsync'd), as always;
* dcmtk ``storescp`` (``TCP_NODELAY=1``, ``-od DIR``, writing every instance to disk; ``--fork``
  for the concurrent runs, one process per association, which is how dcmtk serves several at
  once). storescp does not fsync.

Every (receiver, corpus, associations) cell is timed ``--rounds`` times, alternating receivers,
each round into an empty spool / output folder; the best round counts (absolute times drift by
2x between runs on these machines, so compare only within one run). The clock runs from starting
the senders to the last one exiting (association released).

The "flush floor" column is what durability alone costs on this disk, measured in the same run:
writing each file of the corpus to a new file and flushing the file system after each (the
node's own mechanism, one ``syncfs`` per instance), one after another, with no network and no
DICOM. A single association cannot be faster than that; storescp does not pay it.

    .venv/bin/python benchmarks/ingest.py              # 5 rounds, prints a Markdown table

The ratio column is node images/s divided by storescp images/s (>1: the node is faster).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

from ingest_support import ct_series, ingest_node, radiographs, tiny_model_package  # noqa: E402
from peers import LOOPBACK, ensure_tools, free_port, spawn, stop_process, tail  # noqa: E402

SENDER_AET = "BENCH"


def split(files: list[Path], parts: int) -> list[list[Path]]:
    return [files[i::parts] for i in range(parts)]


def push(files: list[Path], port: int, aet: str, associations: int) -> float:
    """Send ``files`` over ``associations`` concurrent storescu processes; seconds until all exit."""
    exe = ensure_tools("storescu")["storescu"]
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aet", SENDER_AET, "-aec", aet, LOOPBACK, str(port), *map(str, part)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for part in split(files, associations)]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited with {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def run_dcmtk(files: list[Path], associations: int, work: Path) -> float:
    exe = ensure_tools("storescp")["storescp"]
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    args = [exe, "-aet", "DCMTK", "-od", str(out)] + (["--fork"] if associations > 1 else []) + [str(port)]
    proc = spawn(args, work / "storescp.log", env=dict(os.environ, TCP_NODELAY="1"))
    try:
        wait_port(port)
        seconds = push(files, port, "DCMTK", associations)
    finally:
        stop_process(proc)
    stored = sum(1 for _ in out.iterdir())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files:\n{tail(work / 'storescp.log')}")
    return seconds


def run_node(files: list[Path], associations: int, work: Path, models: Path) -> float:
    node_dir = work / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    # The benchmark's disk is a shared one: a small watermark keeps the node from refusing.
    node = ingest_node(node_dir, models, node="min_free_mb = 64\n")
    with node:
        seconds = push(files, node.port, node.ae_title, associations)
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
    if stored != len(files):
        raise RuntimeError(f"the node indexed {stored} of {len(files)} files:\n{node.log()}")
    return seconds


def flush_floor(files: list[Path], work: Path) -> float:
    """Seconds to write ``files`` to new files on ``work``'s file system, flushing it after each."""
    from appliance.spool import Flusher

    out = work / "floor"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    flusher = Flusher(out)
    data = [f.read_bytes() for f in files]
    started = time.perf_counter()
    for i, blob in enumerate(data):
        fd = os.open(out / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        flusher.flush()
    seconds = time.perf_counter() - started
    flusher.close()
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell; the best counts")
    parser.add_argument("--ct", type=int, default=200, help="CT slices (512x512 int16)")
    parser.add_argument("--dx", type=int, default=20, help="radiographs (2048x2048 uint16)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--only", choices=["ct", "dx"], help="run one corpus only")
    parser.add_argument("--workdir", type=Path, help="keep corpora and spools here (default: a temporary folder)")
    args = parser.parse_args(argv)
    ensure_tools("storescu", "storescp")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=REPO / "benchmarks"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = work / "models"
        tiny_model_package(models)
        corpora = {}
        if args.only in (None, "ct"):
            corpora["CT 200 x 512x512 int16" if args.ct == 200 else f"CT {args.ct}"] = ct_series(work / "ct", args.ct)
        if args.only in (None, "dx"):
            corpora["DX 20 x 2048x2048 uint16" if args.dx == 20 else f"DX {args.dx}"] = radiographs(work / "dx", args.dx)
        rows = []
        load = os.getloadavg()[0]
        for name, files in corpora.items():
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            floor = min(flush_floor(files, work) for _ in range(args.rounds))
            for associations in args.associations:
                best = {"node": float("inf"), "dcmtk": float("inf")}
                for r in range(args.rounds):
                    for receiver in ("dcmtk", "node") if r % 2 == 0 else ("node", "dcmtk"):
                        if receiver == "dcmtk":
                            seconds = run_dcmtk(files, associations, work)
                        else:
                            seconds = run_node(files, associations, work, models)
                        best[receiver] = min(best[receiver], seconds)
                        print(f"  {name}, {associations} assoc, round {r + 1}, {receiver}: {seconds:.3f} s",
                              file=sys.stderr, flush=True)
                node_rate, dcmtk_rate = len(files) / best["node"], len(files) / best["dcmtk"]
                rows.append((name, megabytes, associations, best["node"], node_rate, best["dcmtk"], dcmtk_rate,
                             node_rate / dcmtk_rate, floor))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, best of {args.rounds}, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| corpus | MB | associations | node s | node images/s | storescp s | storescp images/s | node/dcmtk "
          "| flush floor s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, mb, assoc, ns, nr, ds, dr, ratio, floor in rows:
        print(f"| {name} | {mb:.0f} | {assoc} | {ns:.3f} | {nr:.1f} | {ds:.3f} | {dr:.1f} | {ratio:.2f} | {floor:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
