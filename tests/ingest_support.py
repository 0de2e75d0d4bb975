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
    from export.package import record

    record(folder, "tests/ingest_support.py", artefacts=["model.onnx"])  # the node checks the hashes
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


# --- a wire recorder: what a sender really sent, and what the node really answered -------------


class Recorder:
    """A TCP relay on 127.0.0.1 between senders and the node that keeps both directions of each connection.

    ``with Recorder(node_port) as wire:`` send to ``wire.port``; ``wire.connections`` then holds
    ``(sent, answered)`` byte strings, one pair per connection, for :func:`exchanges`.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        import threading

        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[bytearray, bytearray]] = []
        self._threads: list = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent, answered = bytearray(), bytearray()
            with self._lock:
                self.connections.append((sent, answered))
            for src, dst, log in ((client, server, sent), (server, client, answered)):
                t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                log += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _messages(stream: bytes) -> list[tuple[int, dict, bytes | None]]:
    """DIMSE messages in one direction of a connection: (context ID, command, data set bytes or None)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    messages, command, data, offset = [], bytearray(), None, 0
    while offset + 6 <= len(stream):
        kind, _, length = struct.unpack_from(">BBI", stream, offset)
        body = stream[offset + 6:offset + 6 + length]
        offset += 6 + length
        if kind != 0x04:
            continue
        pos = 0
        while pos + 6 <= len(body):
            item_length, context_id, control = struct.unpack_from(">IBB", body, pos)
            fragment = body[pos + 6:pos + 4 + item_length]
            pos += 4 + item_length
            if control & 0x01:
                command += fragment
                if control & 0x02:
                    ds = read_dataset(BytesIO(bytes(command)), True, True)
                    cmd = {e.keyword: e.value for e in ds}
                    command = bytearray()
                    if cmd.get("CommandDataSetType", 0x0101) == 0x0101:
                        messages.append((context_id, cmd, None))
                    else:
                        data = (context_id, cmd, bytearray())
            else:
                data[2].extend(fragment)
                if control & 0x02:
                    messages.append((data[0], data[1], bytes(data[2])))
                    data = None
    return messages


def exchanges(connections) -> list[dict]:
    """Every C-STORE on the recorded connections: instance UID, data set as sent, status as answered."""
    stores = []
    for sent, answered in connections:
        statuses = {cmd.get("MessageIDBeingRespondedTo"): cmd.get("Status")
                    for _, cmd, _ in _messages(bytes(answered)) if cmd.get("CommandField") == 0x8001}
        for _, cmd, data in _messages(bytes(sent)):
            if cmd.get("CommandField") == 0x0001:
                stores.append({"sop_instance_uid": str(cmd.get("AffectedSOPInstanceUID", "")).rstrip("\0 "),
                               "data_set": data, "status": statuses.get(cmd.get("MessageID"))})
    return stores


# --- raw DIMSE over raw sockets, for requests no well-behaved sender makes ----------------------


def command_set(**elements) -> bytes:
    """A DIMSE command set (Implicit VR Little Endian) with its Command Group Length, via pydicom."""
    def encode(ds: Dataset) -> bytes:
        return encode_data_set(ds, implicit=True)

    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds)
    head = Dataset()
    head.CommandGroupLength = len(body)
    return encode(head) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one PDV (control: 0x01 command, 0x02 last fragment)."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def open_association(port: int, called: str, calling: str, abstract_syntax: str = "1.2.840.10008.1.1",
                     transfer_syntax: str = "1.2.840.10008.1.2", timeout: float = 10.0) -> socket.socket:
    """A raw connection with an accepted association (presentation context 1); AssertionError if not."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(associate_rq(called, calling, abstract_syntax, transfer_syntax))
    kind, body = read_pdu(sock)
    assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{kind:02X}"
    return sock


def raw_store(sock: socket.socket, sop_class: str, sop_instance: str, data_set: bytes, message_id: int = 1) -> int:
    """Send one C-STORE-RQ on context 1 of ``sock`` and return the status of its C-STORE-RSP."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    command = command_set(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=message_id, Priority=0,
                          CommandDataSetType=0x0000, AffectedSOPInstanceUID=sop_instance)
    sock.sendall(p_data(1, 0x03, command) + p_data(1, 0x02, data_set))
    kind, body = read_pdu(sock)
    assert kind == 0x04, f"expected P-DATA-TF with the C-STORE-RSP, got PDU type 0x{kind:02X}"
    return read_dataset(BytesIO(body[6:]), True, True).Status


def encode_data_set(ds: Dataset, implicit: bool = False) -> bytes:
    """A data set as it travels in a C-STORE (no File Meta Information), Little Endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def ingest_node(workdir: Path, models_dir: Path, node: str = "", extra: str = "", match: str = 'Modality = ["NONE"]'):
    """A :class:`NodeProcess` with the tiny model package, more ``[node]`` keys and more TOML."""
    from nodeproc import NodeProcess

    process = NodeProcess(workdir, extra=models_config(models_dir, match) + extra)
    process.config.write_text(process.config.read_text().replace("[node]\n", "[node]\n" + node, 1))
    return process
