"""The test harness itself: the real peers in tests/peers.py start, talk DICOM and validate."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from peers import LOOPBACK, PeerError, dciodvfy, echoscu, free_port, storescu

pytestmark = pytest.mark.peers


def secondary_capture(path: Path, rows: int = 64, columns: int = 48, seed: int = 0) -> Dataset:
    """Write a small, valid 12-bit greyscale Secondary Capture Image (PS3.3 A.8.1) to ``path``."""
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(rows, columns), dtype=np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient and General Study: Type 2 attributes present, empty where unknown.
    ds.PatientName = "Harness^Test"
    ds.PatientID = "HARNESS-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    # General Series, SC Equipment, General Image.
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    # An unpaired body part, so General Series needs no Laterality (PS3.3 C.7.3.1).
    ds.BodyPartExamined = "CHEST"
    # Image Pixel.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()

    ds.save_as(path, enforce_file_format=True)
    return ds


def test_orthanc_answers_c_echo_from_dcmtk_echoscu(orthanc, dcmtk):
    done = echoscu(orthanc.host, orthanc.dicom_port, aet=orthanc.aet)
    assert done.returncode == 0
    assert orthanc.get("/system")["DicomAet"] == orthanc.aet


def test_echoscu_raises_with_the_reason_when_nothing_listens(dcmtk):
    with pytest.raises(PeerError, match="Association Request Failed"):
        echoscu(LOOPBACK, free_port())


def test_image_sent_with_storescu_arrives_in_orthanc_with_identical_pixel_data(orthanc, dcmtk, tmp_path):
    sent = secondary_capture(tmp_path / "sc.dcm")

    storescu(tmp_path / "sc.dcm", orthanc.host, orthanc.dicom_port, aet=orthanc.aet)

    [instance_id] = orthanc.wait_for_instances(1, timeout=10)
    assert orthanc.sop_instance_uids() == [sent.SOPInstanceUID]
    assert orthanc.sop_instance_uids(modality="OT") == [sent.SOPInstanceUID]
    assert orthanc.sop_instance_uids(modality="SR") == []
    assert orthanc.instance_tags(instance_id)["StudyInstanceUID"] == sent.StudyInstanceUID
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(instance_id)))
    assert stored.PixelData == sent.PixelData


def test_wait_for_instances_gives_up_with_a_timeout_error(orthanc):
    with pytest.raises(TimeoutError, match="expected 1"):
        orthanc.wait_for_instances(1, timeout=0.05)


def _non_loopback_address() -> str | None:
    # The address this host would use towards a documentation network (RFC 5737); no packet is sent.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.254", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_orthanc_serves_and_stores_for_loopback_clients_only(orthanc, dcmtk, tmp_path):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to test from")

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{address}:{orthanc.http_port}/system", timeout=10)
    assert refused.value.code in (401, 403)

    # Orthanc 1.10 listens for DICOM on every interface; the Lua filter drops what is not from loopback.
    secondary_capture(tmp_path / "remote.dcm", seed=1)
    storescu(tmp_path / "remote.dcm", address, orthanc.dicom_port, aet=orthanc.aet)
    local = secondary_capture(tmp_path / "local.dcm", seed=2)
    storescu(tmp_path / "local.dcm", LOOPBACK, orthanc.dicom_port, aet=orthanc.aet)
    orthanc.wait_for_instances(1, timeout=10)
    assert orthanc.sop_instance_uids() == [local.SOPInstanceUID]


def test_dciodvfy_finds_no_errors_in_a_valid_secondary_capture(tmp_path):
    secondary_capture(tmp_path / "good.dcm")

    errors, warnings = dciodvfy(tmp_path / "good.dcm")

    assert (errors, warnings) == ([], [])


def test_dciodvfy_reports_an_error_for_a_missing_sop_class_uid(tmp_path):
    ds = secondary_capture(tmp_path / "good.dcm")
    del ds.SOPClassUID
    ds.save_as(tmp_path / "broken.dcm", enforce_file_format=True)

    errors, _warnings = dciodvfy(tmp_path / "broken.dcm")

    assert any("SOPClassUID" in error or "SOP Class UID" in error for error in errors), errors


def test_dciodvfy_reports_errors_for_a_file_that_is_not_dicom(tmp_path):
    (tmp_path / "not.dcm").write_bytes(b"not DICOM at all")

    errors, _warnings = dciodvfy(tmp_path / "not.dcm")

    assert errors


def test_dciodvfy_raises_for_a_file_that_does_not_exist(tmp_path):
    with pytest.raises(PeerError, match="could not read"):
        dciodvfy(tmp_path / "missing.dcm")
