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
import threading
import time
from pathlib import Path

from . import assembly, metrics, outbox, queue, routing
from .config import Config
from .delivery import Delivery
from .index import Index
from .manifest import ModelPackage, find_package
from .pipeline import Pipeline
from .runtime import OnnxRuntime, Runtime
from .scp import StorageSCP
from .spool import Spool

log = logging.getLogger("appliance.node")

#: A job's lease: longer than any job takes, short enough that a crashed worker's job is retried
#: soon after a restart (at start-up every lease is released anyway).
LEASE_SECONDS = 300.0


def load_packages(cfg: Config) -> dict[str, ModelPackage]:
    """Every package a route names, validated now so a bad one stops start-up, not a job."""
    names = sorted({m for route in cfg.routes for m in route.models})
    return {name: find_package(name, cfg.model_search_path) for name in names}


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.index = Index(self.data_dir / "index.sqlite")
        self.spool = Spool(self.data_dir, self.index)
        self.packages = load_packages(cfg)
        self.runtimes: dict[str, Runtime] = {
            name: OnnxRuntime(pkg, cfg.inference_threads) for name, pkg in self.packages.items()}
        self.pipeline = Pipeline(cfg, self.index, self.spool, self.runtimes)
        self.delivery = Delivery(cfg, self.index, self.pipeline.results_dir)
        self.scp = StorageSCP(cfg, self.spool, self._released)
        self._stop = threading.Event()
        self._wake_assembly = threading.Event()
        self._wake_worker = threading.Event()
        self._wake_delivery = threading.Event()
        self._released_lock = threading.Lock()
        self._released_series: set[str] = set()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = queue.release_leases(self.index)
        if recovered:
            log.info("%d job(s) interrupted by the last stop will run again", recovered)
        metrics.OUTBOX_DEPTH.set(outbox.depth(self.index))
        self.pipeline.warm_up()
        if self.cfg.metrics_enabled:
            metrics.serve(self.cfg.metrics_bind, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_bind, self.cfg.metrics_port)
        for target, name in ((self._assembly_loop, "assembly"), (self._worker_loop, "worker"),
                             (self._delivery_loop, "delivery")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.scp.start()

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
        log.info("stopped")

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
