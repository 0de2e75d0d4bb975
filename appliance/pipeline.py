"""The worker's pipeline for one job: decode -> preprocess -> runtime -> postprocess -> report -> outbox.

A series the model cannot take (wrong modality, unsupported photometric interpretation, no pixel
data, undecodable pixels) is kept in the spool, not inferred; the job is closed as ``rejected``
with a short reason that is logged and counted.  Any other failure is retried up to the
configured number of attempts, then the job is closed as ``failed``.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from . import metrics, outbox, queue, uids
from .config import Config
from .index import Index
from .manifest import ModelPackage
from .postprocessing import Finding, findings
from .preprocessing import InputRejected, prepare_instance
from .reporting import build_report
from .runtime import Runtime
from .spool import Spool, write_durably

log = logging.getLogger("appliance.pipeline")


@dataclass
class Outcome:
    state: str                      # done, rejected, retry, failed
    reason: str | None = None
    findings: list[Finding] | None = None


class Pipeline:
    def __init__(self, cfg: Config, index: Index, spool: Spool, runtimes: dict[str, Runtime]):
        self.cfg = cfg
        self.index = index
        self.spool = spool
        self.runtimes = runtimes
        self.results_dir = Path(cfg.data_dir) / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.destinations = [d.name for d in cfg.destinations]

    def run(self, job: queue.Job) -> Outcome:
        try:
            outcome = self._run(job)
        except InputRejected as e:
            log.warning("job %d: %s cannot take series: %s (%s); kept, not inferred", job.id, job.model, e, e.reason)
            metrics.INPUTS_REJECTED.labels(job.model, e.reason).inc()
            metrics.INFERENCES.labels(job.model, "rejected").inc()
            with self.index.transaction() as db:
                queue.finish(db, job, "rejected", e.reason)
            return Outcome("rejected", e.reason)
        except Exception as e:
            metrics.INFERENCES.labels(job.model, "error").inc()
            reason = type(e).__name__
            if job.attempts >= self.cfg.job_attempts:
                log.exception("job %d (%s) failed for good after %d attempts", job.id, job.model, job.attempts)
                with self.index.transaction() as db:
                    queue.finish(db, job, "failed", reason)
                return Outcome("failed", reason)
            log.exception("job %d (%s) failed (attempt %d of %d); will retry", job.id, job.model,
                          job.attempts, self.cfg.job_attempts)
            queue.retry_later(self.index, job, 2.0 * job.attempts, reason)
            return Outcome("retry", reason)
        metrics.INFERENCES.labels(job.model, "success").inc()
        return outcome

    def _run(self, job: queue.Job) -> Outcome:
        runtime = self.runtimes[job.model]
        pkg = runtime.package
        series = self.index.query("SELECT * FROM series WHERE series_uid = ?", (job.series_uid,))[0]
        sources, inputs, rejection = [], [], None
        for path in self.spool.instance_paths(job.series_uid):
            ds = pydicom.dcmread(path)
            try:
                inputs.append(prepare_instance(ds, pkg))
            except InputRejected as e:
                rejection = rejection or e
                continue
            sources.append(ds)
        if not inputs:
            raise rejection or InputRejected("empty", "the series has no instances")
        outputs = self._infer(runtime, np.stack(inputs))
        found = findings(pkg, outputs)
        sop_uid = uids.result_instance_uid(job.series_uid, pkg.device_uid, pkg.version)
        series_uid = uids.result_series_uid(job.series_uid, pkg.device_uid, pkg.version)
        report = build_report(sources, pkg, found, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        name = f"{sop_uid}.dcm"  # our own derived UID, never one from the wire
        write_durably(self.results_dir, name, buffer.getbuffer())
        record = outbox.ResultRecord(
            sop_instance_uid=sop_uid, series_uid=series_uid, study_uid=series["study_uid"],
            source_series_uid=job.series_uid, model=pkg.name, model_version=pkg.version, path=Path(name),
            modality=series["modality"], study_date=series["study_date"], study_time=series["study_time"],
            findings=found, ready_at=series["ready_at"] or time.time())
        with self.index.transaction() as db:
            outbox.add(db, record, self.destinations)
            queue.finish(db, job, "done")
        log.info("job %d: %s on %d image(s): %s", job.id, pkg.name, len(inputs),
                 ", ".join(f"{f.output.name}={f.probability:.3f}{' present' if f.present else ''}"
                           f"{' CRITICAL' if f.critical else ''}" for f in found))
        return Outcome("done", findings=found)

    @staticmethod
    def _infer(runtime: Runtime, batch: np.ndarray) -> dict[str, np.ndarray]:
        pkg: ModelPackage = runtime.package
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(batch), pkg.max_batch):
            for name, value in runtime.run(batch[start:start + pkg.max_batch]).items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in parts.items()}
