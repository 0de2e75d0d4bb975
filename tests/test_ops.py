"""What ops rely on: a real Prometheus scrapes the node, readiness tells the truth, the audit trail
traces a study, and nothing the node logs or exports names the patient."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest

from export.phantoms import make_phantom, write_dicom
from nodeproc import NodeProcess
from peers import LOOPBACK, PeerError, ensure_tools, free_port, spawn, stop_process, storescu, tail, wait_until

pytestmark = pytest.mark.peers

PATIENT_NAME = "Oyelaran^Adebayo"
PATIENT_ID = "MRN-7731-0042"


def radiograph(path: Path, seed: int, finding: str | None) -> Path:
    write_dicom(make_phantom(seed, size=512, finding=finding), path, patient_name=PATIENT_NAME,
                patient_id=PATIENT_ID)
    return path


def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError:
        return 0, b""  # not listening yet


class Prometheus:
    """A real Prometheus server on loopback scraping one target every second."""

    def __init__(self, workdir: Path, target: str):
        self.exe = ensure_tools("prometheus")["prometheus"]
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: appliance\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log_path = workdir / "prometheus.log"

    def __enter__(self) -> "Prometheus":
        self.process = spawn([self.exe, f"--config.file={self.workdir / 'prometheus.yml'}",
                              f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                              f"--web.listen-address={LOOPBACK}:{self.port}"], self.log_path)
        wait_until(lambda: self._running() and http(f"http://{LOOPBACK}:{self.port}/-/ready")[0] == 200,
                   60, "Prometheus ready", self.log)
        return self

    def _running(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        return True

    def __exit__(self, *exc) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return tail(self.log_path)

    def query(self, expr: str) -> list[dict]:
        status, body = http(f"http://{LOOPBACK}:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_counts_and_histograms_and_nothing_names_the_patient(tmp_path, dcmtk):
    files = [radiograph(tmp_path / f"{i}.dcm", 60 + i, finding) for i, finding in enumerate(("nodule", None))]
    with NodeProcess(tmp_path / "node") as node, \
            Prometheus(tmp_path / "prom", f"{LOOPBACK}:{node.metrics_port}") as prom:
        storescu(files, LOOPBACK, node.port)
        wait_until(lambda: prom.value('appliance_inferences_total{outcome="success"}') == 2.0, 60,
                   "two inferences seen by Prometheus", node.log)
        assert prom.value('appliance_instances_received_total{status="stored"}') == 2.0
        assert prom.value('appliance_series_completed_total{trigger="release"}') == 2.0
        assert prom.value('appliance_stage_seconds_count{stage="inference",model="cxr-triage"}') == 2.0
        p95 = prom.value('histogram_quantile(0.95, sum by (le) (appliance_stage_seconds_bucket{stage="report"}))')
        assert p95 is not None and 0 < p95 < 10
        assert prom.value('appliance_model_loaded{model="cxr-triage"}') == 1.0
        assert prom.value("up") == 1.0
        exported = node.metrics()
        audit = subprocess.run([sys.executable, "-m", "appliance", "audit", "--config", str(node.config), "--json"],
                               capture_output=True, text=True, check=True).stdout
    logged = node.log_path.read_text()
    for text in (logged, exported, audit):
        for phi in (PATIENT_NAME, PATIENT_NAME.replace("^", " "), PATIENT_ID):
            assert phi not in text
    # The log is JSON lines, one event per stage, with the node's own identifiers.
    events = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    kinds = [e.get("event") for e in events]
    assert kinds.count("instance.stored") == 2 and kinds.count("job.done") == 2
    assert all("series" in e for e in events if e.get("event") == "series.routed")


def test_audit_trail_traces_a_study_from_arrival_to_result(tmp_path, dcmtk):
    source = radiograph(tmp_path / "cxr.dcm", 70, "pneumothorax")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    with NodeProcess(tmp_path / "node") as node:
        storescu(source, LOOPBACK, node.port, calling="CT-SCANNER-3")
        wait_until(lambda: 'outcome="success"} 1.0' in node.metrics(), 30, "inference", node.log)
        done = subprocess.run([sys.executable, "-m", "appliance", "audit", "--config", str(node.config),
                               "--since", "1h", "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    assert [r["event"] for r in rows] == ["received", "routed", "produced"]
    received, routed, produced = rows
    assert received["calling_ae"] == "CT-SCANNER-3"
    assert received["sop_instance_uid"] == ds.SOPInstanceUID
    assert routed["series_uid"] == produced["series_uid"] == ds.SeriesInstanceUID
    assert routed["model"] == "cxr-triage"
    assert {f["name"] for f in json.loads(produced["findings"])} == {"nodule", "pneumothorax"}


def test_below_the_disk_watermark_the_node_refuses_new_associations_and_is_not_ready(tmp_path, dcmtk):
    source = radiograph(tmp_path / "cxr.dcm", 80, None)
    # A watermark above any real disk's free space: the node must refuse everything.
    with NodeProcess(tmp_path / "node", extra="") as node:
        status, _ = http(f"http://{LOOPBACK}:{node.metrics_port}/readyz")
        assert status == 200
    text = node.config.read_text().replace("[metrics]", "min_free_mb = 1000000000\n[metrics]", 1)
    node.config.write_text(text)
    with node:
        assert http(f"http://{LOOPBACK}:{node.metrics_port}/healthz")[0] == 200
        status, body = http(f"http://{LOOPBACK}:{node.metrics_port}/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["disk"]["ok"] is False
        # A transient A-ASSOCIATE-RJ: the sender tries again later (0xA700 is for associations
        # already open when the disk fills; tests/test_ingest.py covers it).
        with pytest.raises(PeerError, match="Rejected"):
            storescu(source, LOOPBACK, node.port, extra_args=["-v"])
        metrics = node.metrics()
    assert 'appliance_associations_rejected_total{reason="disk_full"} 1.0' in metrics
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    assert "disk_full" in node.log_path.read_text()


def test_phi_appears_in_logs_only_when_the_operator_turns_the_debug_switch_on(tmp_path, dcmtk):
    source = radiograph(tmp_path / "cxr.dcm", 90, None)
    with NodeProcess(tmp_path / "node", extra="[logging]\ninclude_phi = true\n") as node:
        storescu(source, LOOPBACK, node.port)
        wait_until(lambda: "instance.stored" in node.log_path.read_text(), 30, "a stored instance", node.log)
    logged = node.log_path.read_text()
    assert "include_phi is on" in logged
    assert PATIENT_ID in logged
