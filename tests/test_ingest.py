"""Ingest as scanners and hostile peers meet it: every test file pydicom ships, access control,
malformed PDUs, a full disk, compressed images.

The node runs as users run it (``appliance serve --config FILE``); senders are dcmtk's storescu
and echoscu, pynetdicom where dcmtk cannot send a file, and raw sockets for what no well-behaved
sender does. What was sent and answered is read off the wire by a relay (:class:`Recorder`), so
"stored byte for byte" means the bytes the sender put on the wire.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from appliance.scp import STORAGE_SOP_CLASSES
from ingest_support import (CT_IMAGE, DX_IMAGE, Recorder, encode_data_set, exchanges, image, ingest_node,
                            open_association, p_data, raw_store, read_pdu, tiny_model_package)
from peers import LOOPBACK, PeerError, echoscu, ensure_tools, storescu, wait_until

pytestmark = pytest.mark.peers

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
ALLOWED_CALLING = ["STORESCU", "ECHOSCU", "PYNETDICOM", "SCANNER"]

#: storescu's option that proposes a file's own (compressed) transfer syntax, so it sends it unchanged.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.2": "-xb", "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.100": "-xm", "1.2.840.10008.1.2.4.101": "-xh",
    "1.2.840.10008.1.2.4.102": "-xn", "1.2.840.10008.1.2.4.103": "-xl", "1.2.840.10008.1.2.4.104": "-x2",
    "1.2.840.10008.1.2.4.105": "-x3", "1.2.840.10008.1.2.4.106": "-xo", "1.2.840.10008.1.2.4.107": "-x4",
    "1.2.840.10008.1.2.4.108": "-x5",
}


def standard_store_status(status: int) -> bool:
    """A status PS3.4 B.2.3 or PS3.7 Annex C gives a C-STORE: success, warning, or a failure with a reason."""
    return (status == 0x0000 or status in (0xB000, 0xB006, 0xB007)
            or status >> 8 in (0xA7, 0xA9) or status >> 12 == 0xC
            or status in (0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0x0212))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def data_set_of(path: Path) -> bytes:
    """The bytes after a Part 10 file's File Meta Information."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    tiny_model_package(folder)
    return folder


@pytest.fixture(scope="module")
def intake(tmp_path_factory, models):
    """A node with a calling AE allow-list, called AE checking and a 3 s network timeout."""
    ensure_tools("storescu", "echoscu")
    node = ingest_node(tmp_path_factory.mktemp("intake"), models, node="network_timeout = 3.0\n",
                       extra=f"[access]\ncalling_ae_titles = {ALLOWED_CALLING!r}\nrequire_called_aet = true\n"
                       .replace("'", '"'))
    with node:
        yield node


def pydicom_test_files() -> list[Path]:
    """The DICOM files among pydicom's test data: Part 10 files, and bare data sets with a SOP Instance UID."""
    found = []
    for path in sorted(p for p in PYDICOM_DATA.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                found.append(path)
                continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            if "SOPInstanceUID" in ds:
                found.append(path)
        except Exception:
            pass
    return found


def send_with_pynetdicom(path: Path, port: int) -> str | None:
    """Send a file storescu cannot read or convert with pynetdicom, unchanged; why not, if it cannot."""
    from pynetdicom import AE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        sop_class = str(ds.get("SOPClassUID", "")).strip("\0 ")
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        if sop_class not in STORAGE_SOP_CLASSES or "SOPInstanceUID" not in ds:
            return f"not a storage instance (SOP Class {sop_class or 'absent'})"
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(LOOPBACK, port, ae_title="APPLIANCE")
        if not assoc.is_established:
            return "no association"
        try:
            assoc.send_c_store(ds)
        except Exception as e:  # pydicom cannot encode the file's data set either
            return f"cannot be encoded: {e}"
        finally:
            assoc.release()
    return None


def test_every_pydicom_test_file_is_stored_or_refused_with_a_standard_status_and_reads_back_byte_identical(intake):
    files = pydicom_test_files()
    assert len(files) > 100
    unsent = []
    with Recorder(intake.port) as wire:
        for path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta = pydicom.dcmread(path, force=True, stop_before_pixels=True).get("file_meta")
            ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
            before = len(wire.connections)
            args = ["-R"] + ([STORESCU_PROPOSE[ts]] if ts in STORESCU_PROPOSE else [])
            try:
                storescu(path, LOOPBACK, wire.port, extra_args=args, timeout=60)
            except PeerError:
                pass  # a refusal (checked on the wire below) or a file storescu cannot send
            time.sleep(0.02)  # let the relay hand over the last bytes
            sent = exchanges(wire.connections[before:])
            if not sent:
                why = send_with_pynetdicom(path, wire.port)
                if why is not None:
                    unsent.append((path, why))
        time.sleep(0.2)
        stores = exchanges(wire.connections)
    echoscu(LOOPBACK, intake.port)  # still serving

    # What neither sender could put on the wire is not a storage instance, or not encodable at all.
    for path, why in unsent:
        assert why.startswith(("not a storage instance", "cannot be encoded")), (path, why)
    assert len(unsent) < 20, unsent

    with sqlite3.connect(intake.data_dir / "index.sqlite") as db:
        paths = dict(db.execute("SELECT sop_instance_uid, path FROM instances"))
    statuses, first = {}, {}
    for store in stores:
        uid, status = store["sop_instance_uid"], store["status"]
        assert status is not None, f"no C-STORE-RSP for {uid}"
        assert standard_store_status(status), f"0x{status:04X} for {uid}"
        statuses[status] = statuses.get(status, 0) + 1
        if status == 0x0000:
            # Some test files are the same instance in another encoding: the first copy is the one kept.
            sent = first.setdefault(uid, store["data_set"])
            stored = intake.data_dir / "spool" / paths[uid]
            assert data_set_of(stored) == sent, f"{stored} differs from what was sent"
    assert statuses.get(0x0000, 0) >= 100, statuses
    # Nothing half-written is left behind by refusals.
    assert not list((intake.data_dir / "spool").rglob("*.part"))


def test_unknown_calling_ae_title_and_wrong_called_ae_title_are_rejected(intake):
    with pytest.raises(PeerError, match="Rejected|rejected"):
        echoscu(LOOPBACK, intake.port, calling="STRANGER")
    with pytest.raises(PeerError, match="Rejected|rejected"):
        echoscu(LOOPBACK, intake.port, aet="SOMEONE_ELSE")
    echoscu(LOOPBACK, intake.port)
    metrics = intake.metrics()
    assert metric(metrics, 'appliance_associations_rejected_total{reason="calling_ae"}') >= 1
    assert metric(metrics, 'appliance_associations_rejected_total{reason="called_ae"}') >= 1


def _ct(**changes) -> tuple[Dataset, bytes]:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds, encode_data_set(ds, implicit=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_data_set_that_does_not_match_its_request_or_has_bad_uids_is_refused_and_not_stored(intake):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good, good_bytes = _ct()
        _, bad_study = _ct(StudyInstanceUID="1.2.3.abc")
        _, long_series = _ct(SeriesInstanceUID="1." + "2" * 70)
    sock = open_association(intake.port, "APPLIANCE", "SCANNER", CT_IMAGE)
    try:
        assert raw_store(sock, CT_IMAGE, generate_uid(), good_bytes, 1) == 0xA900      # another instance
        assert raw_store(sock, "1.2.840.10008.5.1.4.1.1.4", good.SOPInstanceUID, good_bytes, 2) in (0xA900, 0x0122)
        assert raw_store(sock, CT_IMAGE, "1.2.03.x", good_bytes, 3) == 0xA900          # not a UID
        assert raw_store(sock, CT_IMAGE, _uid_in(bad_study), bad_study, 4) == 0xA900
        assert raw_store(sock, CT_IMAGE, _uid_in(long_series), long_series, 5) == 0xA900
        assert raw_store(sock, CT_IMAGE, generate_uid(), b"\x08\x00\x16\x00\xff\xff\xff\x7f", 6) in (0xA900, 0xC000)
        assert raw_store(sock, CT_IMAGE, good.SOPInstanceUID, good_bytes, 7) == 0x0000  # and it still works
    finally:
        sock.close()
    with sqlite3.connect(intake.data_dir / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM instances WHERE sop_instance_uid = ?",
                          (good.SOPInstanceUID,)).fetchone()[0] == 1
    assert not list((intake.data_dir / "spool").rglob("*.part"))


def _uid_in(data_set: bytes) -> str:
    from io import BytesIO

    from pydicom.filereader import read_dataset

    return str(read_dataset(BytesIO(data_set), True, True).SOPInstanceUID)


def test_a_truncated_pdu_and_an_oversized_pdu_length_end_only_their_own_association(intake, tmp_path):
    files = [image(tmp_path / f"ct{i}.dcm", rows=64, columns=64, modality="CT", sop_class=CT_IMAGE, signed=True,
                   series_uid=generate_uid(), study_uid=generate_uid(), rng=np.random.default_rng(i))
             for i in range(3)]
    idle = socket.create_connection((LOOPBACK, intake.port))                 # connects, never speaks
    stalled = open_association(intake.port, "APPLIANCE", "SCANNER", CT_IMAGE)
    stalled.sendall(p_data(1, 0x03, b"\x00" * 50)[:30])                      # stops mid-PDU
    oversized = open_association(intake.port, "APPLIANCE", "SCANNER", CT_IMAGE)
    started = time.monotonic()
    oversized.sendall(struct.pack(">BBI", 0x04, 0, 0x7FFFFFF0) + b"\x00" * 64)  # 2 GiB declared
    kind, body = read_pdu(oversized)
    assert kind == 0x07 and body[-2:] == b"\x02\x06", "A-ABORT: service provider, invalid PDU parameter"
    assert read_pdu(oversized) == (0, b""), "then the connection is closed"
    assert time.monotonic() - started < 2.0
    # Meanwhile, and while the stalled association waits for its timeout, others are served.
    storescu(files, LOOPBACK, intake.port)
    echoscu(LOOPBACK, intake.port)
    assert time.monotonic() - started < 2.5
    # The stalled one ends at the network timeout (3 s), not before and not much later.
    stalled.settimeout(10)
    assert read_pdu(stalled)[0] in (0, 0x07)
    assert 2.0 < time.monotonic() - started < 8.0
    idle.settimeout(10)
    assert idle.recv(100) == b"", "the idle connection is closed at its timeout too"
    for s in (idle, stalled, oversized):
        s.close()
    with sqlite3.connect(intake.data_dir / "index.sqlite") as db:
        uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
        stored = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    assert uids <= stored


def test_a_connection_from_outside_the_allowed_networks_is_closed_before_any_dimse(tmp_path, models):
    ensure_tools("echoscu")
    with ingest_node(tmp_path / "node", models, extra='[access]\nnetworks = ["10.0.0.0/8", "192.168.7.7"]\n') as node:
        sock = socket.create_connection((LOOPBACK, node.port), timeout=5)
        started = time.monotonic()
        assert sock.recv(100) == b"", "closed without a byte of DICOM"
        assert time.monotonic() - started < 1.0
        sock.close()
        with pytest.raises(PeerError):
            echoscu(LOOPBACK, node.port)
        metrics = node.metrics()
        log = node.log_path.read_text()
    assert metric(metrics, 'appliance_associations_rejected_total{reason="source_address"}') >= 2
    assert "appliance_associations_accepted_total 0.0" in metrics
    assert "association.rejected" in log and "Association Received" not in log


def test_connections_over_the_per_source_limit_are_closed_and_the_rest_served(tmp_path, models):
    ensure_tools("echoscu")
    with ingest_node(tmp_path / "node", models, extra="[access]\nmax_associations_per_source = 2\n") as node:
        first = socket.create_connection((LOOPBACK, node.port))
        second = socket.create_connection((LOOPBACK, node.port))
        time.sleep(0.2)
        third = socket.create_connection((LOOPBACK, node.port), timeout=5)
        assert third.recv(100) == b""
        with pytest.raises(PeerError):
            echoscu(LOOPBACK, node.port)
        first.close()
        wait_until(lambda: _echo_ok(node.port), 10, "an echo once a connection closed")
        metrics = node.metrics()
        second.close()
        third.close()
    assert metric(metrics, 'appliance_associations_rejected_total{reason="too_many_from_source"}') >= 2


def _echo_ok(port: int) -> bool:
    try:
        echoscu(LOOPBACK, port)
        return True
    except PeerError:
        return False


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs, so the test can fill it; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_below_the_disk_watermark_stores_are_refused_with_A700_associations_rejected_and_nothing_lost(
        tmp_path, models, small_disk):
    from pynetdicom import AE

    ensure_tools("storescu", "echoscu")
    files = [image(tmp_path / f"ct{i}.dcm", rows=512, columns=512, modality="CT", sop_class=CT_IMAGE,
                   signed=True, series_uid=generate_uid(), study_uid=generate_uid(),
                   rng=np.random.default_rng(i)) for i in range(4)]
    node = ingest_node(tmp_path / "node", models, node="min_free_mb = 24\n")
    node.config.write_text(node.config.read_text().replace(str(node.data_dir), str(small_disk / "data")))
    node.data_dir = small_disk / "data"
    with node:
        storescu(files[:2], LOOPBACK, node.port)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CT_IMAGE)
        assoc = ae.associate(LOOPBACK, node.port, ae_title="APPLIANCE")
        assert assoc.is_established
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 20 * 2**20))                      # 20 MiB left < 24
        status = assoc.send_c_store(pydicom.dcmread(files[2]))
        assert status.Status == 0xA700
        assoc.release()
        with pytest.raises(PeerError, match="Rejected|rejected"):            # transient A-ASSOCIATE-RJ
            echoscu(LOOPBACK, node.port)
        # Above the watermark but short of room for the instance: the write fails, nothing is kept.
        filler.unlink()
        big = image(tmp_path / "big.dcm", rows=4096, columns=4096, modality="CT", sop_class=CT_IMAGE,
                    signed=True, series_uid=generate_uid(), study_uid=generate_uid(), rng=np.random.default_rng(9))
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 28 * 2**20))                      # 28 MiB left, instance 32 MiB
        with pytest.raises(PeerError):
            storescu(big, LOOPBACK, node.port)
        assert not list((node.data_dir / "spool").rglob("*.part"))
        filler.unlink()
        storescu(files[3], LOOPBACK, node.port)                              # room again: stored
        metrics = node.metrics()
    assert metric(metrics, 'appliance_associations_rejected_total{reason="disk_full"}') >= 1
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        stored = dict(db.execute("SELECT sop_instance_uid, path FROM instances"))
    expected = {pydicom.dcmread(f).SOPInstanceUID: f for f in (files[0], files[1], files[3])}
    assert set(stored) == set(expected)
    for uid, source in expected.items():
        assert data_set_of(node.data_dir / "spool" / stored[uid]) == data_set_of(source)
    assert not list((node.data_dir / "spool").rglob("*.part"))


def _radiograph(path: Path, seed: int) -> Path:
    return image(path, rows=512, columns=512, modality="DX", sop_class=DX_IMAGE, signed=False,
                 series_uid=generate_uid(), study_uid=generate_uid(), rng=np.random.default_rng(seed))


def test_compressed_radiographs_are_decoded_and_inferred_and_an_undecodable_one_is_kept_and_counted(tmp_path, models):
    ensure_tools("storescu")
    sent = {}
    for name, ts, option in (("j2k", JPEG2000Lossless, "-xv"), ("rle", RLELossless, "-xr")):
        path = _radiograph(tmp_path / f"{name}.dcm", len(sent))
        ds = pydicom.dcmread(path)
        ds.compress(ts)
        ds.save_as(path, enforce_file_format=True)
        sent[path] = option
    broken = _radiograph(tmp_path / "broken.dcm", 7)
    ds = pydicom.dcmread(broken)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])  # a J2K marker, then noise
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(broken, enforce_file_format=True)
    sent[broken] = "-xv"
    with ingest_node(tmp_path / "node", models, match='Modality = ["DX"]') as node:
        for path, option in sent.items():
            storescu(path, LOOPBACK, node.port, extra_args=[option])
        wait_until(lambda: 'reason="decode"' in node.metrics()
                 and 'outcome="success"} 2.0' in node.metrics(), 60, "two inferences and a decode rejection")
        metrics = node.metrics()
    assert 'appliance_inputs_rejected_total{model="tiny-cxr",reason="decode"} 1.0' in metrics
    assert 'appliance_inferences_total{model="tiny-cxr",outcome="success"} 2.0' in metrics
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        rows = dict(db.execute("SELECT sop_instance_uid, transfer_syntax FROM instances"))
        jobs = sorted(r[0] for r in db.execute("SELECT state FROM jobs"))
    assert sorted(rows.values()) == sorted([str(JPEG2000Lossless), str(RLELossless), str(JPEG2000Lossless)])
    assert jobs == ["done", "done", "rejected"]
    assert pydicom.dcmread(broken).SOPInstanceUID in rows  # kept, though never processed
