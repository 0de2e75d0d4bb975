"""``appliance``: serve the node, check a peer, push studies, list results."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .config import ConfigError, load
from .manifest import ManifestError


def _peer(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (ae_title, host, port)."""
    try:
        aet, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        if not aet or not host:
            raise ValueError
        return aet, host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104") from None


class _Progress:
    """One line that counts up on a terminal; a line per tenth of the work otherwise (logs, CI)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.tty = total, what, sys.stderr.isatty()
        self.step = max(1, total // 10)

    def update(self, done: int, note: str = "") -> None:
        if self.tty:
            print(f"\r{self.what}: {done}/{self.total} {note}".ljust(60), end="", file=sys.stderr, flush=True)
        elif done % self.step == 0 or done == self.total:
            print(f"{self.what}: {done}/{self.total} {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_serve(args) -> int:
    from . import logs, sdnotify
    from .node import Node

    cfg = load(args.config)
    logs.configure(args.log_level or cfg.log_level, cfg.log_format)
    log = logging.getLogger("appliance")
    if cfg.include_phi:
        log.warning("[logging] include_phi is on: log lines carry Patient IDs and Accession Numbers",
                    extra={"event": "node.phi_logging"})
    node = Node(cfg)
    stopping = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %s received", signal.Signals(signum).name, extra={"event": "node.stopping"})
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    summary = (f"{cfg.ae_title} on {cfg.bind}:{cfg.port}, models {','.join(sorted(node.packages))}, "
               f"{len(cfg.destinations)} destination(s), data in {cfg.data_dir}")
    log.info("appliance %s ready: %s", __version__, summary, extra={"event": "node.ready"})
    sdnotify.notify("READY=1", f"STATUS=serving {summary}")
    # The watchdog is fed from this loop, so a node whose main loop stalls stops feeding it and
    # systemd restarts it.  The loop also checks that the stages' threads are alive.
    watchdog = sdnotify.Watchdog(sdnotify.watchdog_interval())
    while not stopping.wait(min(1.0, watchdog.interval or 1.0)):
        if node.healthy():
            watchdog.alive()
        else:
            log.error("a stage thread died; no longer feeding the watchdog", extra={"event": "node.unhealthy"})
    sdnotify.notify("STOPPING=1")
    node.stop()
    return 0


def _scu_ae(calling: str):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def cmd_echo(args) -> int:
    from pynetdicom.sop_class import Verification

    if args.peer:
        aet, host, port = args.peer
    else:
        cfg = load(args.config)
        aet, host, port = cfg.ae_title, ("127.0.0.1" if cfg.bind == "0.0.0.0" else cfg.bind), cfg.port
    ae = _scu_ae(args.calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"C-ECHO to {aet}@{host}:{port}: association not established "
              "(is the node running, and the AE title, host and port right?)", file=sys.stderr)
        return 2
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        print(f"C-ECHO to {aet}@{host}:{port}: status {code}", file=sys.stderr)
        return 1
    print(f"C-ECHO to {aet}@{host}:{port}: success")
    return 0


def _dicom_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def cmd_push(args) -> int:
    import pydicom
    from pydicom.errors import InvalidDicomError

    aet, host, port = args.to
    files, contexts = [], set()
    for f in _dicom_files(args.paths):
        try:
            meta = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            contexts.add((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
            files.append(f)
        except (InvalidDicomError, AttributeError, OSError) as e:
            print(f"skipping {f}: not a DICOM file with a SOP Class UID ({type(e).__name__})", file=sys.stderr)
    if not files:
        print("nothing to send", file=sys.stderr)
        return 1
    ae = _scu_ae(args.calling)
    by_class: dict[str, set[str]] = {}
    for sop_class, syntax in contexts:
        by_class.setdefault(sop_class, set()).add(syntax)
    if len(by_class) > 128:
        print("more than 128 SOP classes in one push; split it", file=sys.stderr)
        return 2
    for sop_class, syntaxes in by_class.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"push to {aet}@{host}:{port}: association not established", file=sys.stderr)
        return 2
    progress = _Progress(len(files), f"C-STORE to {aet}")
    failures = 0
    try:
        for i, f in enumerate(files, 1):
            status = assoc.send_c_store(f)
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                failures += 1
                print(f"\n{f}: status {'none' if code is None else f'0x{code:04X}'}", file=sys.stderr)
            progress.update(i, f"({failures} failed)" if failures else "")
    finally:
        progress.close()
        if assoc.is_established:
            assoc.release()
    print(f"sent {len(files) - failures} of {len(files)} instance(s) to {aet}@{host}:{port}")
    return 1 if failures else 0


def _existing_index(cfg, what: str):
    """The node's index, or None (with a note) when the node has not run with this data_dir yet."""
    from .index import Index

    db_path = Path(cfg.data_dir) / "index.sqlite"
    if not db_path.exists():
        print(f"no {what} yet: {db_path} does not exist", file=sys.stderr)
        return None
    return Index(db_path)


def cmd_results(args) -> int:
    cfg = load(args.config)
    index = _existing_index(cfg, "results")
    if index is None:
        return 0
    rows = index.query(
        """SELECT r.*, (SELECT group_concat(o.destination || ':' || o.state, ' ') FROM outbox o
                        WHERE o.result_id = r.id) AS deliveries
           FROM results r ORDER BY r.produced_at DESC LIMIT ?""", (args.limit,))
    out = []
    for r in rows:
        found = json.loads(r["findings"])
        latency = (r["delivered_at"] or r["produced_at"]) - r["ready_at"]
        out.append({
            "study_date": r["study_date"], "study_time": r["study_time"], "modality": r["modality"],
            "model": f"{r['model']} {r['model_version']}",
            "findings": [{k: f[k] for k in ("name", "probability", "present", "critical")} for f in found],
            "latency_s": round(latency, 3), "delivered": r["deliveries"] or "kept locally",
            "sop_instance_uid": r["sop_instance_uid"], "file": str(Path(cfg.data_dir) / "results" / r["path"]),
        })
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'study date':<10} {'time':<6} {'mod':<4} {'model':<18} {'findings':<44} {'latency':>8}  delivery")
    for r in out:
        text = ", ".join(f"{f['name']} {'PRESENT' if f['present'] else 'absent'} {f['probability']:.2f}"
                         f"{' CRITICAL' if f['critical'] else ''}" for f in r["findings"])
        print(f"{r['study_date'] or '-':<10} {(r['study_time'] or '-')[:6]:<6} {r['modality']:<4} "
              f"{r['model']:<18} {text:<44} {r['latency_s']:>7.2f}s  {r['delivered']}")
    return 0


def _since(text: str) -> float:
    """An ISO date/time (UTC unless it says otherwise), or a duration like 30m, 12h, 7d, before now."""
    from datetime import datetime, timezone

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an ISO date/time (2026-11-21T08:00) "
                                         "or a duration such as 30m, 12h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def cmd_audit(args) -> int:
    from . import audit

    cfg = load(args.config)
    index = _existing_index(cfg, "audit trail")
    if index is None:
        return 0
    rows = audit.query(index, args.since, args.event or None, args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["ts"]))
        detail = " ".join(f"{k}={r[k]}" for k in audit.COLUMNS if r.get(k) and k != "findings")
        if r.get("findings"):
            detail += " findings=" + ",".join(
                f"{f['name']}:{f['probability']:.2f}{'+' if f['present'] else '-'}" for f in json.loads(r["findings"]))
        print(f"{when} {r['event']:<15} {detail}")
    return 0


def _packages(cfg) -> list[tuple[Path, object]]:
    """Every package folder on the model search path: (folder, package or the error loading it)."""
    from .manifest import load_package

    found, seen = [], set()
    for folder in cfg.model_search_path:
        if not Path(folder).is_dir():
            continue
        for candidate in sorted(Path(folder).iterdir()):
            if (candidate / "manifest.toml").is_file() and candidate.name not in seen:
                seen.add(candidate.name)  # the first folder on the search path wins, as in find_package
                try:
                    found.append((candidate, load_package(candidate)))
                except ManifestError as e:
                    found.append((candidate, e))
    return found


def _hash_state(pkg) -> str:
    try:
        pkg.verify_hashes()
        return "verified"
    except ManifestError as e:
        return f"MISMATCH: {e}"


def cmd_models_list(args) -> int:
    cfg = load(args.config)
    routed = {m for route in cfg.routes for m in route.models}
    rows = []
    for folder, pkg in _packages(cfg):
        if isinstance(pkg, ManifestError):
            rows.append({"name": folder.name, "path": str(folder), "error": str(pkg)})
            continue
        rows.append({"name": pkg.name, "version": pkg.version, "task": pkg.task, "precision": pkg.precision,
                     "modalities": list(pkg.applicability.modalities), "routed": pkg.name in routed,
                     "hashes": _hash_state(pkg), "path": str(folder)})
    bad = any("error" in r or r["hashes"].startswith("MISMATCH") for r in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 1 if bad else 0
    print(f"{'name':<24} {'version':<10} {'task':<15} {'prec':<5} {'modalities':<12} {'routed':<7} hashes")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} INVALID: {r['error']}")
            continue
        print(f"{r['name']:<24} {r['version']:<10} {r['task']:<15} {r['precision']:<5} "
              f"{','.join(r['modalities']):<12} {'yes' if r['routed'] else 'no':<7} {r['hashes'].split(':')[0]}")
    return 1 if bad else 0


def cmd_models_show(args) -> int:
    from .manifest import find_package

    cfg = load(args.config)
    pkg = find_package(args.name, cfg.model_search_path)
    pre = pkg.preprocessing

    def code(c) -> str:
        return f"({c.value}, {c.scheme}, \"{c.meaning}\")" if c else "-"

    window = f"centre {pre.window.center:g}, width {pre.window.width:g}" if pre.window else "from the DICOM VOI"
    lines = [
        f"{pkg.name} {pkg.version}  ({pkg.path})",
        f"  task            {pkg.task}, precision {pkg.precision}",
        f"  device UID      {pkg.device_uid}",
        f"  manufacturer    {pkg.manufacturer}",
        f"  intended use    {pkg.intended_use}",
        f"  model file      {pkg.model_file}",
        f"  input           {pkg.input_name}: {pkg.input_channels}x{pkg.input_height}x{pkg.input_width} "
        f"{pkg.input_layout}, batch {pkg.min_batch}/{pkg.opt_batch}/{pkg.max_batch} (min/opt/max)",
        f"  preprocessing   window {window}; resize {pre.resize}; mean {list(pre.mean)}, std {list(pre.std)}; "
        f"MONOCHROME1 {pre.monochrome1}",
        f"  applies to      modalities {', '.join(pkg.applicability.modalities) or 'any'}; "
        f"body parts {', '.join(pkg.applicability.body_parts) or 'any'}; "
        f"SOP classes {', '.join(pkg.applicability.sop_classes) or 'any'}",
        "  outputs",
    ]
    for o in pkg.outputs:
        lines.append(f"    {o.name:<14} {o.tensor}[{o.index}] {o.activation}; finding {code(o.finding)}; "
                     f"site {code(o.finding_site)}; positive >= {o.threshold_positive:g}, "
                     f"critical >= {o.threshold_critical:g}" + (f"; category {code(o.category)}" if o.category else ""))
    if pkg.export:
        source = f"{pkg.export.factory} + {pkg.export.weights}" if pkg.export.factory else pkg.export.program
        lines.append(f"  export          {source}; opset {pkg.export.opset}; "
                     f"tolerance atol {pkg.export.atol:g}, rtol {pkg.export.rtol:g}")
    state = _hash_state(pkg)
    lines.append(f"  hashes          {state}")
    for name, digest in pkg.hashes.items():
        lines.append(f"    {name:<22} {digest}")
    print("\n".join(lines))
    return 0 if state == "verified" else 1


#: Toolchain commands: each module defines ``add_arguments(parser)`` and ``run(args) -> int`` and
#: keeps heavy imports (torch, onnx, tensorrt, matplotlib) inside functions, so listing them here
#: costs the other commands nothing.
_TOOLCHAIN = {
    "export": ("export.onnx_export", "export a PyTorch model to ONNX in a model package, with a parity check"),
    "quantize": ("export.quantize", "make an FP16 or INT8 (Q/DQ) version of a package, checked against FP32"),
    "build-engine": ("appliance.engines", "build TensorRT engines for this GPU from a package's ONNX"),
    "evaluate": ("export.evaluate", "measure a package on labelled DICOM studies through the node's pipeline"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("APPLIANCE_LOG_LEVEL"),
                        help="DEBUG, INFO, WARNING or ERROR (serve: overrides [logging] level)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM node")
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("echo", help="C-ECHO a DICOM node (default: this node, from --config)")
    p.add_argument("peer", nargs="?", type=_peer, help="AET@HOST:PORT")
    p.add_argument("--config")
    p.add_argument("--calling", default="APPLIANCE-SCU", help="calling AE title")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("push", help="send DICOM files or folders by C-STORE")
    p.add_argument("paths", nargs="+")
    p.add_argument("--to", required=True, type=_peer, help="AET@HOST:PORT")
    p.add_argument("--calling", default="APPLIANCE-SCU", help="calling AE title")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("results", help="list the results the node produced (no patient names)")
    p.add_argument("--config")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("audit", help="what came in, was produced, delivered or failed (no patient names)")
    p.add_argument("--config")
    p.add_argument("--since", type=_since, default="24h", help="ISO date/time or duration (default 24h)")
    p.add_argument("--event", action="append", help="only these events (repeatable): received, refused, "
                   "routed, unrouted, produced, rejected, failed, delivered, delivery_failed, dead_lettered")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("models", help="the model packages this node can load")
    models = p.add_subparsers(dest="models_command", required=True)
    q = models.add_parser("list", help="every package on the search path, with its hash check")
    q.add_argument("--config")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_list)
    q = models.add_parser("show", help="one package's manifest: codes, thresholds, preprocessing, hashes")
    q.add_argument("name")
    q.add_argument("--config")
    q.set_defaults(func=cmd_models_show)

    import importlib

    for command, (module, text) in _TOOLCHAIN.items():
        try:
            tool = importlib.import_module(module)
        except ModuleNotFoundError as e:  # export/ is not installed on a runtime-only box
            if e.name and module.startswith(e.name):
                continue
            raise
        p = sub.add_parser(command, help=text, description=(tool.__doc__ or text).strip().split("\n\n")[0])
        tool.add_arguments(p)
        # A tool's own "the user's input is wrong" errors print like a bad config: a sentence, exit 2.
        p.set_defaults(func=tool.run, usage_errors=getattr(tool, "USAGE_ERRORS", ()))

    args = parser.parse_args(argv)
    from . import logs

    logs.configure(args.log_level or "INFO", "text")  # serve re-configures from its config file
    try:
        return args.func(args)
    except (ConfigError, ManifestError, FileNotFoundError, *getattr(args, "usage_errors", ())) as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
