"""The node: the stages of the data flow wired together, each in its own thread.

    SCP (association threads) -> spool -> assembly + routing (one thread) -> queue
        -> worker (pipeline) -> outbox -> delivery (one thread)

Threads hand over through the index, and wake each other with events so a released association
reaches the worker at once instead of at the next poll.  ``stop()`` closes the listening socket
first, lets open associations finish, lets the worker finish its job and delivery its send; what
is left is durable in the index and is picked up at the next start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from . import __version__, assembly, metrics, outbox, queue, routing
from .commitment import StorageCommitmentSCP
from .config import PRIORITIES, Config
from .delivery import Delivery
from .exposition import OpsServer
from .index import Index
from .manifest import ManifestError, ModelPackage, find_package
from .pipeline import Pipeline
from .runtime import OnnxRuntime, Runtime
from .scp import StorageSCP
from .spool import Spool
from .tls import server_context

log = logging.getLogger("appliance.node")

PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}

#: A job's lease: longer than any job takes, short enough that a crashed worker's job is retried
#: soon after a restart (at start-up every lease is released anyway).
LEASE_SECONDS = 300.0


def load_packages(cfg: Config) -> dict[str, ModelPackage]:
    """Every package a route names, validated now so a bad one stops start-up, not a job.

    Artefacts are checked against the manifest's SHA-256 too: a model file that changed after
    export must not change results silently.
    """
    names = sorted({m for route in cfg.routes for m in route.models})
    packages = {name: find_package(name, cfg.model_search_path) for name in names}
    for pkg in packages.values():
        pkg.verify_hashes()
        if pkg.task != "classification":
            # The node reports findings as TID 1500 qualitative evaluations; segmentations (DICOM
            # SEG) and detections are measured by `appliance evaluate` but not yet served.
            raise ManifestError(f"{pkg.manifest_path}: model.task = {pkg.task!r}: the node serves classification "
                                "packages only for now; route this package's series to a classification package")
    return packages


def _runtime(pkg: ModelPackage, cfg: Config) -> Runtime:
    """ONNX Runtime unless ``[inference] runtime`` asks for TensorRT (appliance.engines decides
    whether it can run, and logs the fallback under "auto")."""
    if cfg.inference_runtime == "onnxruntime":
        return OnnxRuntime(pkg, cfg.inference_threads)
    from .engines import select_runtime

    return select_runtime(pkg, cfg.inference_runtime, cfg.engines_dir, cfg.inference_threads)


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.index = Index(self.data_dir / "index.sqlite")
        self.spool = Spool(self.data_dir, self.index)
        self.packages = load_packages(cfg)
        self.runtimes: dict[str, Runtime] = {name: _runtime(pkg, cfg) for name, pkg in self.packages.items()}
        self.pipeline = Pipeline(cfg, self.index, self.spool, self.runtimes)
        self.delivery = Delivery(cfg, self.index, self.pipeline.results_dir)
        commitment = StorageCommitmentSCP(cfg, self.spool) if cfg.commitment.enabled else None
        self.scp = StorageSCP(cfg, self.spool, self._released, commitment)
        self.tls_context = server_context(cfg.tls) if cfg.tls.enabled else None
        self._stop = threading.Event()
        self._wake_assembly = threading.Event()
        self._wake_worker = threading.Event()
        self._wake_delivery = threading.Event()
        self._released_lock = threading.Lock()
        self._released_series: set[str] = set()
        self._threads: list[threading.Thread] = []
        self.ops: OpsServer | None = None
        self.ready = False
        self._checks = self.readiness_checks()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = queue.release_leases(self.index)
        if recovered:
            log.info("%d job(s) interrupted by the last stop will run again", recovered,
                     extra={"event": "queue.recovered", "jobs": recovered})
        # Under runtime = "auto" some models may run on TensorRT and others on ONNX Runtime.
        kinds = sorted({getattr(r, "kind", "onnxruntime") for r in self.runtimes.values()}) or ["onnxruntime"]
        devices = sorted({getattr(r, "device", "cpu") for r in self.runtimes.values()}) or ["cpu"]
        metrics.BUILD_INFO.info({"version": __version__, "runtime": "+".join(kinds), "device": "+".join(devices)})
        if self.cfg.metrics_enabled:
            self.ops = OpsServer(self.cfg.metrics_bind, self.cfg.metrics_port, self._checks, self.update_gauges)
            self.ops.start()
            log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", self.cfg.metrics_bind,
                     self.cfg.metrics_port, extra={"event": "ops.listening"})
        for name in self.packages:
            metrics.MODEL_LOADED.labels(name).set(0)
        self.pipeline.warm_up()
        for name in self.packages:
            metrics.MODEL_LOADED.labels(name).set(1)
        for target, name in ((self._assembly_loop, "assembly"), (self._worker_loop, "worker"),
                             (self._delivery_loop, "delivery")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.scp.start(self.tls_context)
        self.ready = True

    def healthy(self) -> bool:
        """True while every stage thread is running."""
        return all(t.is_alive() for t in self._threads)

    # -- what ops see ----------------------------------------------------------------------------

    def readiness_checks(self) -> dict:
        def scp():
            return self.scp.listening, f"{self.cfg.ae_title} on port {self.cfg.port}"

        def index():
            with self.index.transaction() as db:  # BEGIN IMMEDIATE takes the write lock
                db.execute("SELECT 1")
            return True, "writable"

        def models():
            loaded = self.ready
            return loaded, ("loaded: " if loaded else "loading: ") + ",".join(sorted(self.packages))

        def disk():
            free = self.spool.free_mb()
            return free >= self.cfg.min_free_mb, f"{free:.0f} MiB free, watermark {self.cfg.min_free_mb} MiB"

        return {"scp": scp, "index": index, "models": models, "disk": disk}

    def update_gauges(self) -> None:
        """Gauges read from the index when Prometheus scrapes, so they are never stale."""
        depth = queue.depth(self.index)
        for priority, name in PRIORITY_NAMES.items():
            metrics.QUEUE_DEPTH.labels(name).set(depth.get(priority, 0))
        metrics.OUTBOX_DEPTH.set(outbox.depth(self.index))
        oldest = self.index.query("SELECT min(r.produced_at) AS t FROM outbox o JOIN results r ON r.id = o.result_id "
                                  "WHERE o.state = 'pending'")[0]["t"]
        metrics.OUTBOX_OLDEST.set(time.time() - oldest if oldest else 0.0)
        metrics.SPOOL_BYTES.set(self.index.query("SELECT coalesce(sum(size), 0) AS n FROM instances")[0]["n"])
        st = os.statvfs(self.data_dir)
        metrics.DISK_FREE.set(st.f_bavail * st.f_frsize)
        for name, check in self._checks.items():
            try:
                ok = check()[0]
            except Exception:
                ok = False
            metrics.READY.labels(name).set(1 if ok else 0)

    def stop(self, grace_seconds: float = 10.0) -> None:
        log.info("stopping: no new associations")
        self.scp.stop_accepting()
        deadline = time.monotonic() + grace_seconds
        while self.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.scp.shutdown()
        self._stop.set()
        for event in (self._wake_assembly, self._wake_worker, self._wake_delivery):
            event.set()
        for t in self._threads:
            t.join(timeout=grace_seconds)
        if self.ops is not None:
            self.ops.stop()
        log.info("stopped", extra={"event": "node.stopped"})

    # -- stages ----------------------------------------------------------------------------------

    def _released(self, series_uids: set[str]) -> None:
        with self._released_lock:
            self._released_series |= series_uids
        self._wake_assembly.set()

    def _assembly_loop(self) -> None:
        period = min(0.5, self.cfg.quiet_seconds / 4)
        while not self._stop.is_set():
            self._wake_assembly.clear()
            try:
                with self._released_lock:
                    released, self._released_series = self._released_series, set()
                assembly.complete_released(self.index, released)
                assembly.complete_quiet(self.index, self.cfg.quiet_seconds)
                if routing.route_ready(self.index, self.cfg.routes):
                    self._wake_worker.set()
            except Exception:
                log.exception("assembly/routing pass failed; retrying")
            self._wake_assembly.wait(period)

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_worker.clear()
            try:
                job = queue.take(self.index, LEASE_SECONDS)
            except Exception:
                log.exception("could not take a job from the queue; retrying")
                job = None
            if job is None:
                self._wake_worker.wait(1.0)
                continue
            if job.attempts == 1:
                metrics.QUEUE_WAIT.labels(PRIORITY_NAMES.get(job.priority, "routine")).observe(
                    max(0.0, time.time() - job.created_at))
            if job.model not in self.runtimes:
                # A route changed since the job was queued; its package is not loaded.
                log.error("job %d names model %s, which no route loads; failed", job.id, job.model)
                with self.index.transaction() as db:
                    queue.finish(db, job, "failed", "model not loaded")
                continue
            outcome = self.pipeline.run(job)
            if outcome.state == "done" and self.cfg.destinations:
                self._wake_delivery.set()

    def _delivery_loop(self) -> None:
        while not self._stop.is_set():
            wait = 1.0
            self._wake_delivery.clear()
            try:
                nxt = self.delivery.send_due()
                if nxt is not None:
                    wait = min(wait, max(0.0, nxt - time.time()))
            except Exception:
                log.exception("delivery pass failed; retrying")
            if wait > 0:
                self._wake_delivery.wait(wait)
