"""Synthetic chest phantoms: deterministic, findings where they are drawn, valid DX instances."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from appliance.preprocessing import resize, voi_window
from export.phantoms import (DX_FOR_PRESENTATION, NODULE_BIT, PNEUMOTHORAX_BIT, TYPE2_OMITTABLE, make_phantom,
                             write_dicom)


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _display(phantom) -> np.ndarray:
    """Stored values through the phantom's window to [0, 1], white = dense, as a viewer shows it."""
    x = voi_window(phantom.pixels, phantom.window_center, phantom.window_width)
    return 1.0 - x if phantom.photometric == "MONOCHROME1" else x


def test_same_seed_gives_identical_pixels_and_window():
    a, b = make_phantom(7, 256, "nodule"), make_phantom(7, 256, "nodule")
    assert np.array_equal(a.pixels, b.pixels)
    assert (a.window_center, a.window_width) == (b.window_center, b.window_width)
    assert a.finding_box == b.finding_box


def test_different_seeds_give_different_patients():
    assert not np.array_equal(make_phantom(1, 256).pixels, make_phantom(2, 256).pixels)


def test_pixels_are_12_bit_monochrome2_with_a_window_inside_the_stored_range():
    p = make_phantom(3, 256)
    assert p.pixels.dtype == np.uint16 and p.pixels.shape == (256, 256)
    assert p.photometric == "MONOCHROME2" and p.bits_stored == 12
    assert p.pixels.max() <= 4095
    assert 0 < p.window_center - p.window_width / 2 and p.window_center + p.window_width / 2 < 4096 * 1.1


def test_14_bit_phantoms_use_the_wider_range():
    p = make_phantom(3, 256, bits_stored=14)
    assert p.bits_stored == 14 and 4095 < p.pixels.max() <= 16383


def test_the_same_patient_at_any_matrix_size():
    small = _display(make_phantom(11, 256))
    large = _display(make_phantom(11, 1024))
    shrunk = resize(large, 256, 256, "area")
    # Only the quantum noise differs; the anatomy lies on the same pixels.
    assert np.corrcoef(small.ravel(), shrunk.ravel())[0, 1] > 0.99
    assert float(np.abs(small - shrunk).mean()) < 0.02


def test_lung_fields_are_dark_and_the_mediastinum_bright():
    d = _display(make_phantom(5, 256))
    lungs = np.concatenate([d[80:150, 50:90].ravel(), d[80:150, 166:206].ravel()])
    mediastinum = d[80:150, 120:136]
    assert np.median(lungs) + 0.2 < np.median(mediastinum)


def test_nodule_changes_only_its_own_pixels_inside_a_lung_field():
    normal, nodule = make_phantom(21, 512), make_phantom(21, 512, "nodule")
    mask = (nodule.finding_mask & NODULE_BIT) > 0
    assert mask.sum() > 20 and not (nodule.finding_mask & PNEUMOTHORAX_BIT).any()
    changed = nodule.pixels != normal.pixels
    assert not (changed & ~mask).any()
    # Denser than what it covers, and what it covers is lung: darker than the window centre.
    assert nodule.pixels[mask].astype(float).mean() > normal.pixels[mask].astype(float).mean() + 20
    assert normal.pixels[mask].astype(float).mean() < normal.window_center
    r0, c0, r1, c1 = nodule.finding_box
    assert mask[r0:r1, c0:c1].sum() == mask.sum()


def test_pneumothorax_is_a_lucent_rim_without_markings_at_the_apex_or_lateral_wall():
    normal, ptx = make_phantom(22, 512), make_phantom(22, 512, "pneumothorax")
    gap = (ptx.finding_mask & PNEUMOTHORAX_BIT) > 0
    assert gap.sum() > 200
    changed = ptx.pixels != normal.pixels
    # Changes lie on the gap and its visceral pleural line, a few pixels inside it (but for a
    # handful where the line runs along a gap too thin to count as one).
    assert (changed & ~_dilate(gap, 6)).sum() < 0.005 * changed.sum()
    diff = ptx.pixels.astype(float) - normal.pixels.astype(float)
    assert diff[gap].mean() < -5                      # more lucent: fewer markings, more air
    assert diff[gap].std() < normal.pixels[gap].astype(float).std()  # flatter: no vessels
    # One side, reaching the upper third of the chest.
    cols = np.nonzero(gap.any(axis=0))[0]
    assert cols.max() < 256 or cols.min() >= 256
    assert np.nonzero(gap.any(axis=1))[0].min() < 512 // 3


def test_monochrome1_stores_inverted_values_that_display_the_same():
    m2, m1 = make_phantom(9, 256), make_phantom(9, 256, monochrome1=True)
    assert m1.photometric == "MONOCHROME1"
    assert np.array_equal(m1.pixels, 4095 - m2.pixels)
    assert np.abs(_display(m1) - _display(m2)).max() < 1e-5


def test_unknown_finding_is_refused():
    with pytest.raises(ValueError, match="finding"):
        make_phantom(1, 256, "fracture")


def test_written_dicom_reads_back_as_dx_for_presentation(tmp_path):
    p = make_phantom(4, 256, "pneumothorax")
    path = tmp_path / "dx.dcm"
    write_dicom(p, path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DX_FOR_PRESENTATION == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert float(ds.WindowCenter) == p.window_center and float(ds.WindowWidth) == p.window_width
    assert ds.ViewPosition == "PA" and ds.ImageLaterality
    assert np.array_equal(ds.pixel_array, p.pixels)


def test_writing_the_same_phantom_twice_gives_the_same_uids():
    p = make_phantom(4, 256)
    a, b = write_dicom(p), write_dicom(p)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == \
           (b.StudyInstanceUID, b.SeriesInstanceUID, b.SOPInstanceUID)
    other = write_dicom(make_phantom(4, 256, "nodule"))
    assert other.SOPInstanceUID != a.SOPInstanceUID


def test_omit_type2_really_leaves_them_out(tmp_path):
    path = tmp_path / "bare.dcm"
    write_dicom(make_phantom(4, 256), path, omit_type2=True)
    ds = pydicom.dcmread(path)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID"):
        assert keyword in TYPE2_OMITTABLE
        assert keyword not in ds, keyword
    assert ds.PatientID and ds.StudyInstanceUID


def test_overrides_set_and_delete_attributes():
    ds = write_dicom(make_phantom(4, 256), Modality="CR", WindowCenter=None, patient_id="ANON-1")
    assert ds.Modality == "CR" and "WindowCenter" not in ds and ds.PatientID == "ANON-1"


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not on PATH")
@pytest.mark.parametrize("finding, monochrome1", [(None, False), ("nodule+pneumothorax", True)])
def test_written_dicom_passes_dciodvfy_without_errors(tmp_path, finding, monochrome1):
    path = tmp_path / "dx.dcm"
    write_dicom(make_phantom(6, 256, finding, monochrome1=monochrome1), path)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    assert "DXImageForPresentation" in report
    assert [line for line in report.splitlines() if line.startswith("Error")] == []


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not on PATH")
def test_dciodvfy_flags_the_omitted_type2_attributes(tmp_path):
    path = tmp_path / "bare.dcm"
    write_dicom(make_phantom(6, 256), path, omit_type2=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert any("PatientBirthDate" in e for e in errors) and any("StudyDate" in e for e in errors)


def test_command_line_writes_the_requested_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "export.phantoms", "--out", str(tmp_path), "--count", "3",
                          "--finding", "mixed", "--size", "128", "--seed", "40"],
                         capture_output=True, text=True, check=True)
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 3 and out.stdout.count("\n") == 3
    assert [pydicom.dcmread(f).Rows for f in files] == [128, 128, 128]
