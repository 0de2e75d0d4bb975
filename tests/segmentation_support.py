"""A small segmentation package and CT slices for the toolchain's tests (evaluate, quantize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.manifest import file_sha256

#: The two segments the test models output, as (output name, channel); channel 0 is background.
SEGMENTS = (("bright", 1), ("dark", 2))


def write_segmentation_package(folder: Path, model, name: str, height: int, width: int) -> Path:
    """``folder`` as a segmentation package around the ONNX ``model`` (input ``image`` 1 x height x
    width, output ``logits`` with the background and :data:`SEGMENTS` as channels, softmax)."""
    import onnx

    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    outputs = "".join(f"""
[[outputs]]
name = "{segment}"
tensor = "logits"
index = {index}
activation = "softmax"
finding = {{ value = "108369006", scheme = "SCT", meaning = "Tumor" }}
category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologically Altered Structure" }}
threshold_positive = 0.5
""" for segment, index in SEGMENTS)
    (folder / "manifest.toml").write_text(f"""[model]
name = "{name}"
version = "0.0.1"
device_uid = "2.25.1234"
manufacturer = "test"
task = "segmentation"
intended_use = "test"

[input]
name = "image"
height = {height}
width = {width}
channels = 1

[preprocessing]
resize = "area"
mean = [0.0]
std = [1.0]

[applicability]
modalities = ["CT"]
{outputs}
[hashes]
"model.onnx" = "{file_sha256(folder / 'model.onnx')}"
""")
    return folder


def write_ct_slice(pixels: np.ndarray, path: Path, study: str, series: str, instance: int, **attributes) -> None:
    """One CT slice (12 bits stored, identity rescale) of ``pixels`` (uint16), with more attributes
    by keyword (PixelSpacing, SliceThickness, PatientName, ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, instance
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
