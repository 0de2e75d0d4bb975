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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from . import audit, kernels, metrics, outbox, queue, uids
from .config import Config
from .index import Index
from .manifest import ModelPackage
from .postprocessing import Finding, findings
from .preprocessing import InputRejected
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

    def warm_up(self) -> None:
        """Run every loaded model once through the whole pipeline on a blank in-memory image.

        The first call of each library (pixel decoding, ONNX Runtime's allocations, highdicom's
        tables) costs several hundred milliseconds; paying them at start keeps them out of the
        first patient's triage time.  Nothing is written.
        """
        for runtime in self.runtimes.values():
            pkg = runtime.package
            ds = _blank_image(pkg)
            try:  # also loads the preprocessing kernels (GPU module, host build) before the first job
                batch = kernels.preprocess([kernels.source_image(ds, pkg)], kernels.model_input(pkg))
            except InputRejected:  # a package for other images: warm the runtime alone
                batch = np.zeros((1, pkg.input_channels, pkg.input_height, pkg.input_width), np.float32)
            found = findings(pkg, self._infer(runtime, batch))
            uid = uids.derived_uid("warm-up", pkg.name)
            build_report([ds], pkg, found, series_instance_uid=uid + ".1", sop_instance_uid=uid + ".2")

    def run(self, job: queue.Job) -> Outcome:
        fields = {"job": job.id, "model": job.model, "attempt": job.attempts}
        try:
            outcome = self._run(job)
        except InputRejected as e:
            log.warning("%s cannot take the series: %s; kept, not inferred", job.model, e,
                        extra={"event": "job.rejected", "reason": e.reason, **fields})
            metrics.INPUTS_REJECTED.labels(job.model, e.reason).inc()
            metrics.INFERENCES.labels(job.model, "rejected").inc()
            with self.index.transaction() as db:
                queue.finish(db, job, "rejected", e.reason)
                audit.record(db, "rejected", series_uid=job.series_uid, model=job.model, status=e.reason,
                             detail=str(e))
            return Outcome("rejected", e.reason)
        except Exception as e:
            metrics.INFERENCES.labels(job.model, "error").inc()
            reason = type(e).__name__
            if job.attempts >= self.cfg.job_attempts:
                log.exception("job failed for good after %d attempts", job.attempts,
                              extra={"event": "job.failed", "reason": reason, **fields})
                with self.index.transaction() as db:
                    queue.finish(db, job, "failed", reason)
                    audit.record(db, "failed", series_uid=job.series_uid, model=job.model, status=reason)
                return Outcome("failed", reason)
            log.exception("job failed (attempt %d of %d); will retry", job.attempts, self.cfg.job_attempts,
                          extra={"event": "job.retry", "reason": reason, **fields})
            queue.retry_later(self.index, job, 2.0 * job.attempts, reason)
            return Outcome("retry", reason)
        metrics.INFERENCES.labels(job.model, "success").inc()
        return outcome

    def _run(self, job: queue.Job) -> Outcome:
        runtime = self.runtimes[job.model]
        pkg = runtime.package
        series = self.index.query("SELECT rowid AS id, * FROM series WHERE series_uid = ?", (job.series_uid,))[0]
        stage = _StageTimer(pkg.name)
        with stage("decode"):
            datasets = [pydicom.dcmread(path) for path in self.spool.instance_paths(job.series_uid)]
        with stage("preprocess"):  # the whole series in one batch: GPU, else the host build
            batch, sources, _ = kernels.prepare(datasets, pkg)
        with stage("inference"):
            outputs = self._infer(runtime, batch)
        found = findings(pkg, outputs)
        sop_uid = uids.result_instance_uid(job.series_uid, pkg.device_uid, pkg.version)
        series_uid = uids.result_series_uid(job.series_uid, pkg.device_uid, pkg.version)
        with stage("report"):
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
            result_id = outbox.add(db, record, self.destinations)
            queue.finish(db, job, "done")
            audit.record(db, "produced", study_uid=series["study_uid"], series_uid=job.series_uid,
                         sop_instance_uid=sop_uid, model=f"{pkg.name} {pkg.version}",
                         findings=outbox.findings_json(found))
        for f in found:
            for level, reached in (("positive", f.present), ("critical", f.critical)):
                if reached:
                    metrics.FINDINGS.labels(pkg.name, f.output.name, level).inc()
        log.info("result produced from %d image(s): %s", len(sources),
                 ", ".join(f"{f.output.name}={f.probability:.3f}{' present' if f.present else ''}"
                           f"{' CRITICAL' if f.critical else ''}" for f in found),
                 extra={"event": "job.done", "job": job.id, "series": series["id"], "result": result_id,
                        "model": pkg.name, "critical": any(f.critical for f in found), **stage.observe()})
        return Outcome("done", findings=found)

    @staticmethod
    def _infer(runtime: Runtime, batch: np.ndarray) -> dict[str, np.ndarray]:
        pkg: ModelPackage = runtime.package
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(batch), pkg.max_batch):
            for name, value in runtime.run(batch[start:start + pkg.max_batch]).items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(values) for name, values in parts.items()}


class _StageTimer:
    """Adds up the time a job spends in each stage (a stage may run once per image)."""

    def __init__(self, model: str):
        self.model = model
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start

    def observe(self) -> dict[str, float]:
        """One observation per stage into ``appliance_stage_seconds``; the totals for the log line."""
        for stage, seconds in self.totals.items():
            metrics.STAGE_SECONDS.labels(stage, self.model).observe(seconds)
        return {f"{stage}_s": round(seconds, 4) for stage, seconds in self.totals.items()}


def _blank_image(pkg: ModelPackage) -> pydicom.Dataset:
    """A minimal single-frame image of a modality the package takes, built in memory."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pkg.applicability.sop_classes[0] if pkg.applicability.sop_classes else "1.2.840.10008.5.1.4.1.1.1.1"
    base = uids.derived_uid("warm-up-source", pkg.name)
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = base + ".1", base + ".2", base + ".3"
    ds.Modality = pkg.applicability.modalities[0] if pkg.applicability.modalities else "OT"
    ds.PatientName, ds.PatientID = "", ""
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    return ds

