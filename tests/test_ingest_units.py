"""The ingest's parts on their own: byte-level encodings, admission, group commit, crash recovery, config."""

from __future__ import annotations

import io
import os
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble

from appliance import encoding
from appliance.access import Gate, Slot
from appliance.config import Access, ConfigError, parse
from appliance.index import Index
from appliance.spool import RECOVERY_WINDOW_SECONDS, Flusher, InstanceInfo, Spool, file_meta

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"


def info(n: int, series: str = "1.2.3.1") -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=f"1.2.3.4.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                        series_uid=series, transfer_syntax="1.2.840.10008.1.2.1", modality="CT",
                        body_part="HEAD", study_date="20260101", study_time="120000")


# -- encodings -------------------------------------------------------------------------------------


def _part10_files():
    for path in sorted(PYDICOM_DATA.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    yield path


def test_identifiers_read_from_raw_bytes_are_what_pydicom_reads_or_none():
    checked = 0
    for path in _part10_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                with open(path, "rb") as f:
                    read_preamble(f, False)
                    ts = str(_read_file_meta_info(f).TransferSyntaxUID)
                    data = f.read()
            except Exception:
                continue
        for limit in (len(data), 2048):
            found = encoding.read_identifiers(bytearray(data[:limit]), ts, complete=limit >= len(data))
            if found is None:
                continue
            checked += 1
            for tag, keyword in encoding.IDENTIFIERS.items():
                expected = ds[tag].value if tag in ds else None
                expected = "" if expected is None else str(expected).strip("\0 ")
                assert found.get(keyword, "") == expected, (path.name, keyword)
    assert checked > 100


def test_identifiers_reader_steps_over_nested_undefined_length_sequences():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    inner = Dataset()
    inner.CodeValue = "1"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.5", "1.2.3.6"
    for elem in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        elem.is_undefined_length = True
    for seq in (ds.ReferencedImageSequence, item.PurposeOfReferenceCodeSequence):
        for it in seq:
            it.is_undefined_length_sequence_item = True
    from ingest_support import encode_data_set

    for implicit in (True, False):
        data = encode_data_set(ds, implicit=implicit)
        ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        found = encoding.read_identifiers(data, ts, complete=True)
        assert found["SeriesInstanceUID"] == "1.2.3.6" and found["SOPInstanceUID"] == "1.2.3.4"
        assert encoding.read_identifiers(data[:40], ts, complete=False) is None  # unsure: pydicom decides


def test_command_sets_round_trip_and_the_file_meta_is_what_pydicom_expects():
    raw = encoding.encode_command(CommandField=0x8001, MessageIDBeingRespondedTo=7, CommandDataSetType=0x0101,
                                  Status=0xA700, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                  AffectedSOPInstanceUID="1.2.3.45")
    ds = pydicom.filereader.read_dataset(io.BytesIO(raw), True, True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert ds.CommandGroupLength == len(raw) - 12 and ds.AffectedSOPInstanceUID == "1.2.3.45"
    command = encoding.parse_command(raw)
    assert command.get("Status") == 0xA700 and command.get("AffectedSOPInstanceUID") == "1.2.3.45"
    with pytest.raises(ValueError):
        encoding.parse_command(b"\x08\x00\x16\x00\x02\x00\x00\x00ab")
    meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1", "CT1")
    f = io.BytesIO(meta)
    read_preamble(f, False)
    parsed = _read_file_meta_info(f)
    assert parsed.MediaStorageSOPInstanceUID == "1.2.3.45" and parsed.SourceApplicationEntityTitle == "CT1"
    assert f.tell() == len(meta)


# -- admission -------------------------------------------------------------------------------------


def test_gate_admits_listed_networks_and_counts_connections_until_their_association_ends():
    import ipaddress

    gate = Gate(Access(networks=(ipaddress.ip_network("10.1.0.0/16"),), max_associations=4,
                       max_associations_per_source=2), "APPLIANCE")
    assert gate.admit("192.168.0.1") == "source_address"
    assert isinstance(gate.admit("::ffff:10.1.2.3"), Slot)  # an IPv4 peer on a dual-stack socket
    a, b = gate.admit("10.1.0.5"), gate.admit("10.1.0.5")
    assert gate.admit("10.1.0.5") == "too_many_from_source"
    assert isinstance(gate.admit("10.1.0.7"), Slot)
    assert gate.admit("10.1.0.6") == "too_many_associations"
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    a.attach(thread)
    assert gate.admit("10.1.0.6") == "too_many_associations"
    done.set()
    thread.join()
    assert isinstance(gate.admit("10.1.0.6"), Slot)  # the association ended: its slot is free
    b.release()
    assert gate.open_connections()["10.1.0.5"] == 0


def test_gate_checks_calling_and_called_ae_titles():
    gate = Gate(Access(calling_ae_titles=("CT1",), require_called_aet=True), "APPLIANCE")
    assert gate.check_association("CT1  ", "APPLIANCE ") is None
    assert gate.check_association("CT2", "APPLIANCE") == "calling_ae"
    assert gate.check_association("CT1", "OTHER") == "called_ae"
    assert Gate(Access(), "APPLIANCE").check_association("ANY", "OTHER") is None


# -- durability ------------------------------------------------------------------------------------


def test_group_commit_lets_concurrent_stores_share_flushes(tmp_path):
    flusher = Flusher(tmp_path)
    syncs = []

    def slow_sync():
        syncs.append(time.monotonic())
        time.sleep(0.05)

    flusher._sync = slow_sync
    threads = [threading.Thread(target=flusher.flush) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(syncs) <= 4
    flusher.flush()  # one caller alone gets a flush of its own
    assert len(syncs) <= 5


def test_a_failed_flush_refuses_the_instance_and_leaves_no_trace(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index)

    def broken():
        raise OSError(5, "syncfs of the spool failed: Input/output error")

    spool.flusher._sync = broken
    with pytest.raises(OSError):
        spool.store(b"\0" * 132, info(1), "CT1")
    assert not index.query("SELECT * FROM instances")
    assert not list(spool.root.rglob("*.dcm")) and not list(spool.root.rglob("*.part"))


def test_recovery_drops_only_what_was_never_acknowledged(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index)
    for n in range(4):
        spool.store(bytes(200 + n), info(n), "CT1")
    paths = {r["sop_instance_uid"]: spool.root / r["path"] for r in index.query("SELECT * FROM instances")}
    # An instance acknowledged long ago, outside the window: never looked at.
    index.connection().execute("UPDATE instances SET received_at = received_at - ? WHERE sop_instance_uid = ?",
                               (RECOVERY_WINDOW_SECONDS * 10, "1.2.3.4.0"))
    paths["1.2.3.4.0"].unlink()
    # What a crash may leave: an index row whose file never reached the disk, a short file, a
    # reception cut short, a file whose row never did.
    paths["1.2.3.4.1"].unlink()
    with open(paths["1.2.3.4.2"], "r+b") as f:
        f.truncate(10)
    bucket = paths["1.2.3.4.3"].parent
    (bucket / ".cut.part").write_bytes(b"partial")
    (bucket / "orphan.dcm").write_bytes(b"never indexed")
    Spool(tmp_path, index)
    left = {r["sop_instance_uid"] for r in index.query("SELECT sop_instance_uid FROM instances")}
    assert left == {"1.2.3.4.0", "1.2.3.4.3"}
    assert index.query("SELECT instance_count FROM series")[0][0] == 2
    assert [p.name for p in bucket.iterdir()] == [paths["1.2.3.4.3"].name]
    assert {r["event"] for r in index.query("SELECT event FROM audit WHERE status = '0xA700'")} == {"refused"}


def test_a_reception_that_fails_to_write_leaves_nothing(tmp_path):
    spool = Spool(tmp_path, Index(tmp_path / "index.sqlite"))
    reception = spool.receive(b"meta")
    reception.write(b"data")
    assert reception.part.read_bytes() == b"metadata"
    reception.discard()
    assert not reception.part.exists()


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, names", [
    ({"access": {"networks": ["10.0.0.0/33"]}}, ["access.networks", "10.0.0.0/33", "IP address or network"]),
    ({"access": {"calling_ae_titles": ["A\\B"]}}, ["calling_ae_titles[0]", "AE title"]),
    ({"access": {"max_associations": 0}}, ["access.max_associations", ">= 1"]),
    ({"tls": {"enabled": True}}, ["tls.certificate", "tls.private_key"]),
    ({"tls": {"certificate": "/nonexistent.pem"}}, ["tls.certificate", "no such file"]),
    ({"tls": {"require_client_certificate": True}}, ["tls.ca_certificates"]),
    ({"commitment": {"requestors": [{"ae_title": "CT1", "host": "h"}]}}, ["commitment.requestors[0].port"]),
    ({"commitment": {"peers": []}}, ["unknown key commitment.peers"]),
])
def test_ingest_keys_that_are_wrong_name_the_key_value_and_expectation(doc, names):
    with pytest.raises(ConfigError) as e:
        parse(doc)
    for name in names:
        assert name in str(e.value)


def test_tls_files_are_read_relative_to_the_configuration(tmp_path):
    for name in ("node.crt", "node.key"):
        (tmp_path / name).write_text("x")
    cfg = parse({"tls": {"enabled": True, "certificate": "node.crt", "private_key": "node.key", "port": 2762}},
                base=tmp_path)
    assert cfg.tls.certificate == tmp_path / "node.crt" and cfg.tls.port == 2762
    with pytest.raises(ConfigError, match="tls.port"):
        parse({"node": {"port": 2762}, "tls": {"enabled": True, "certificate": "node.crt",
                                               "private_key": "node.key"}}, base=tmp_path)
    assert os.path.exists(tmp_path / "node.crt")
