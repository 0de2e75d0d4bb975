"""The node as a hospital runs it: dcmtk's storescu as the scanner, Orthanc as the PACS.

Every test starts the node with ``appliance serve --config FILE`` in its own process.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance import uids
from appliance.manifest import BUNDLED_DIR, load_package
from appliance.postprocessing import findings
from appliance.preprocessing import prepare_instance
from appliance.reporting import read_report
from appliance.runtime import OnnxRuntime
from export.phantoms import make_phantom, write_dicom
from nodeproc import NodeProcess
from peers import LOOPBACK, Orthanc, dciodvfy, echoscu, ensure_tools, storescu, wait_until

pytestmark = pytest.mark.peers

PACKAGE = load_package(BUNDLED_DIR / "cxr-triage")
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"


def radiograph(path: Path, seed: int, finding: str | None, **kwargs) -> Path:
    write_dicom(make_phantom(seed, size=1024, finding=finding), path, **kwargs)
    return path


def model_findings(path: Path) -> dict[str, float]:
    """What the model says about one file, computed here, independently of the node."""
    runtime = OnnxRuntime(PACKAGE, threads=1)
    ds = pydicom.dcmread(path)
    out = runtime.run(prepare_instance(ds, PACKAGE)[None])
    return {f.output.finding.value: f.probability for f in findings(PACKAGE, out)}


def sr_files(pacs: Orthanc) -> dict[str, pydicom.Dataset]:
    """Every SR Orthanc holds, by its Study Instance UID."""
    from io import BytesIO

    result = {}
    for instance in pacs.find_instances({"Modality": "SR"}):
        ds = pydicom.dcmread(BytesIO(pacs.instance_file(instance)))
        result[ds.StudyInstanceUID] = ds
    return result


def expected_sr_uid(source: Path) -> str:
    series = pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID
    return uids.result_instance_uid(series, PACKAGE.device_uid, PACKAGE.version)


def test_pacs_receives_a_valid_tid1500_report_per_radiograph_with_the_models_findings(tmp_path, orthanc, dcmtk):
    positive = radiograph(tmp_path / "positive.dcm", 11, "nodule")
    negative = radiograph(tmp_path / "negative.dcm", 12, None, omit_type2=True)
    destination = {"name": "pacs", "ae_title": orthanc.aet, "host": LOOPBACK, "port": orthanc.dicom_port}
    with NodeProcess(tmp_path / "node", [destination]) as node:
        storescu([positive, negative], LOOPBACK, node.port)
        orthanc.wait_for_instances(2, timeout=60, modality="SR")
        # Orthanc holds the SR a moment before the node reads its 0x0000 and closes the outbox row.
        wait_until(lambda: "appliance_end_to_end_seconds_count 2.0" in node.metrics(), 10, "both acknowledgements",
                   node.log)
        metrics = node.metrics()
    reports = sr_files(orthanc)
    assert len(reports) == 2
    for source in (positive, negative):
        study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
        sr = reports[study]
        assert sr.SOPInstanceUID == expected_sr_uid(source)
        path = tmp_path / f"{source.stem}-sr.dcm"
        sr.save_as(path)
        errors, _ = dciodvfy(path)
        assert errors == [], f"dciodvfy errors in the SR for {source.name}: {errors}"
        reported = {f.finding.value: f for f in read_report(sr)}
        expected = model_findings(source)
        assert set(reported) == set(expected)
        for code, probability in expected.items():
            output = next(o for o in PACKAGE.outputs if o.finding.value == code)
            assert reported[code].probability == pytest.approx(probability, abs=1e-4)
            assert reported[code].present == (probability >= output.threshold_positive)
    nodule = PACKAGE.outputs[0].finding.value
    assert model_findings(positive)[nodule] > model_findings(negative)[nodule]
    assert 'appliance_inferences_total{model="cxr-triage",outcome="success"} 2.0' in metrics
    assert "appliance_end_to_end_seconds_count 2.0" in metrics


def _outbox_attempted(node: NodeProcess) -> bool:
    try:
        with sqlite3.connect(f"file:{node.data_dir / 'index.sqlite'}?mode=ro", uri=True) as db:
            row = db.execute("SELECT max(attempts) FROM outbox WHERE state = 'pending'").fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])


@pytest.mark.parametrize("when", ["after the report is in the outbox", "right after C-STORE success"])
def test_node_killed_before_delivery_delivers_the_same_report_exactly_once_after_restart(tmp_path, dcmtk, when):
    ensure_tools("Orthanc")
    source = radiograph(tmp_path / "cxr.dcm", 21, "pneumothorax")
    pacs = Orthanc()  # its ports are chosen now; it starts only after the node is killed
    destination = {"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}
    node = NodeProcess(tmp_path / "node", [destination]).start()
    try:
        storescu(source, LOOPBACK, node.port)
        if when == "after the report is in the outbox":
            wait_until(lambda: _outbox_attempted(node), 30, "a failed delivery attempt", node.log)
        node.kill()
        with pacs:
            node.start()
            pacs.wait_for_instances(1, timeout=60, modality="SR")
            time.sleep(1.5)  # a second copy, if the node made one, would arrive in this time
            uids_in_pacs = pacs.sop_instance_uids(modality="SR")
        assert uids_in_pacs == [expected_sr_uid(source)]
    finally:
        node.stop()


def _image(path: Path, modality: str, sop_class: str, photometric: str = "MONOCHROME2",
           pixels: bool = True) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.PatientName, ds.PatientID = "Bad^Input", "BAD0001"
    samples = 3 if photometric == "RGB" else 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.BitsAllocated = ds.BitsStored = 8 if samples == 3 else 16
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if pixels:
        ds.PixelData = np.zeros((64, 64, samples), np.uint8 if samples == 3 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bad_input_is_stored_not_inferred_counted_and_the_node_keeps_serving(tmp_path, dcmtk):
    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    ct = "1.2.840.10008.5.1.4.1.1.2"
    # Every image goes to the model here, so the model's own checks are what refuse them.
    route = '[[routes]]\nname = "all-images"\nmodels = ["cxr-triage"]\n[routes.match]\n' \
            f'SOPClassUID = ["{dx}", "{ct}"]\n'
    bad = [
        _image(tmp_path / "ct.dcm", "CT", ct),
        _image(tmp_path / "rgb.dcm", "DX", dx, photometric="RGB"),
        _image(tmp_path / "nopixels.dcm", "DX", dx, pixels=False),
    ]
    non_images = [PYDICOM_DATA / "test-SR.dcm", PYDICOM_DATA / "waveform_ecg.dcm"]
    good = radiograph(tmp_path / "good.dcm", 31, None)
    with NodeProcess(tmp_path / "node", extra=route) as node:
        storescu(bad + non_images, LOOPBACK, node.port, extra_args=["-R"])
        for reason in ("modality", "photometric", "no_pixel_data"):
            wait_until(lambda: f'reason="{reason}"' in node.metrics(), 30, f"rejection for {reason}", node.log)
        echoscu(LOOPBACK, node.port)
        storescu(good, LOOPBACK, node.port)
        wait_until(lambda: 'outcome="success"} 1.0' in node.metrics(), 30, "inference of a good image", node.log)
        metrics = node.metrics()
        log = node.log_path.read_text()
    assert 'appliance_instances_received_total{status="stored"} 6.0' in metrics
    assert "appliance_series_unrouted_total 2.0" in metrics
    assert 'appliance_inferences_total{model="cxr-triage",outcome="rejected"} 3.0' in metrics
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        states = sorted(r[0] for r in db.execute("SELECT state FROM jobs"))
        stored = db.execute("SELECT count(*) FROM instances").fetchone()[0]
    assert states == ["done", "rejected", "rejected", "rejected"]
    assert stored == 6
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 6
    for phi in ("Bad^Input", "BAD0001"):
        assert phi not in log


def test_a_second_copy_of_an_instance_is_acknowledged_and_reported_once(tmp_path, dcmtk):
    source = radiograph(tmp_path / "cxr.dcm", 41, None)
    with NodeProcess(tmp_path / "node") as node:
        storescu(source, LOOPBACK, node.port)
        storescu(source, LOOPBACK, node.port)
        wait_until(lambda: 'outcome="success"} 1.0' in node.metrics(), 30, "inference", node.log)
        time.sleep(0.5)
        metrics = node.metrics()
    assert 'appliance_instances_received_total{status="duplicate"} 1.0' in metrics
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 1
