"""What the ingest tests and benchmark share: a tiny model package, corpora, raw DICOM peers.

The node loads every model package a route names at start-up; the ingest tests and the ingest
benchmark must not depend on the demo package's trained weights (built by another step), so they
bring their own: the bundled manifest with a two-output model of a dozen ONNX nodes that reads the
image's mean. It is a real ONNX model run by ONNX Runtime, so a job that uses it goes through
decode, preprocessing, inference and reporting like any other.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.manifest import BUNDLED_DIR

TINY_MODEL = "tiny-cxr"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def tiny_model_package(models_dir: Path, name: str = TINY_MODEL) -> Path:
    """Write a model package ``models_dir/name``: the demo manifest, a mean-reading ONNX model."""
    import onnx
    from onnx import TensorProto, helper

    folder = Path(models_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    manifest = (BUNDLED_DIR / "cxr-triage" / "manifest.toml").read_text()
    manifest = re.sub(r'(?m)^name = "cxr-triage"$', f'name = "{name}"', manifest)
    manifest = re.sub(r'(?m)^heatmap_tensor = .*$', "", manifest)
    (folder / "manifest.toml").write_text(manifest)
    # logits = mean(image) * [4, -4] + [-1, 1]: a number per output, different per image.
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
         helper.make_node("Unsqueeze", ["mean", "one"], ["column"]),
         helper.make_node("MatMul", ["column", "weight"], ["scaled"]),
         helper.make_node("Add", ["scaled", "bias"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 256, 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
                     helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("weight", TensorProto.FLOAT, [1, 2], [4.0, -4.0]),
                     helper.make_tensor("bias", TensorProto.FLOAT, [2], [-1.0, 1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, folder / "model.onnx")
    return folder


def models_config(models_dir: Path, match: str = 'Modality = ["NONE"]', name: str = TINY_MODEL) -> str:
    """TOML for the node: the tiny package, routed to what ``match`` selects (nothing by default)."""
    return (f'[models]\ndirs = ["{models_dir}"]\n'
            f'[[routes]]\nname = "ingest-test"\nmodels = ["{name}"]\npriority = "urgent"\n'
            f"[routes.match]\n{match}\n")


def image(path: Path, *, rows: int, columns: int, modality: str, sop_class: str, signed: bool,
          series_uid: str, study_uid: str, rng: np.random.Generator, body_part: str = "CHEST") -> Path:
    """One uncompressed single-frame image with noise pixels (so nothing compresses it away)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.BodyPartExamined = modality, body_part
    ds.PatientName, ds.PatientID = "Ingest^Benchmark", "INGEST0001"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter, ds.WindowWidth = 1024, 2048
    dtype = np.int16 if signed else np.uint16
    lo, hi = (-1024, 2047) if signed else (0, 4095)
    ds.PixelData = rng.integers(lo, hi, (rows, columns), dtype=dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, count: int = 200, size: int = 512, seed: int = 1) -> list[Path]:
    """``count`` CT slices of ``size`` x ``size`` int16, one series."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    return [image(folder / f"ct{i:04d}.dcm", rows=size, columns=size, modality="CT", sop_class=CT_IMAGE,
                  signed=True, series_uid=series, study_uid=study, rng=rng, body_part="HEAD")
            for i in range(count)]


def radiographs(folder: Path, count: int = 20, size: int = 2048, seed: int = 2) -> list[Path]:
    """``count`` DX radiographs of ``size`` x ``size`` uint16, each its own study."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [image(folder / f"dx{i:04d}.dcm", rows=size, columns=size, modality="DX", sop_class=DX_IMAGE,
                  signed=False, series_uid=generate_uid(), study_uid=generate_uid(), rng=rng)
            for i in range(count)]


# --- raw upper-layer PDUs, for peers that misbehave on purpose (PS3.8 9.3) ---------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str, calling: str, abstract_syntax: str = "1.2.840.10008.1.1",
                 transfer_syntax: str = "1.2.840.10008.1.2", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (Verification by default)."""
    context = _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.99")
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1")
            + _item(0x20, bytes([1, 0, 0, 0]) + context)
            + _item(0x50, user))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU; (0, b"") when the peer closed the connection."""
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)
