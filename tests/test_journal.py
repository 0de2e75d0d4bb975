"""The receive journal: what was acknowledged survives the loss of everything not yet flushed."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from appliance import journal
from appliance.index import Index
from appliance.spool import InstanceInfo, Spool

NEVER = 3600.0  # no background checkpoint during the test: what a crash right after 0x0000 finds


def info(n: int, series: str = "1.2.3.1") -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=f"1.2.3.4.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3",
                        series_uid=series, transfer_syntax="1.2.840.10008.1.2.1", modality="CT",
                        body_part="HEAD", study_date="20260101", study_time="120000")


def blob(n: int, size: int = 300_000) -> bytes:
    return bytes([n % 251]) * 132 + os.urandom(size)


def lose_what_was_not_flushed(spool: Spool, index: Index) -> None:
    """What a power cut before the next checkpoint may cost: spool files and index rows."""
    for row in index.query("SELECT path FROM instances"):
        (spool.root / row["path"]).unlink()
    with index.transaction() as db:
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM series")
        db.execute("DELETE FROM audit")


@pytest.fixture(autouse=True)
def needs_o_direct(tmp_path):
    if not journal.supported(tmp_path / "probe"):
        pytest.skip("this file system refuses O_DIRECT: the node runs without a journal here")


def test_acknowledged_instances_lost_before_a_checkpoint_are_restored_byte_for_byte(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    sent = {f"1.2.3.4.{n}": blob(n) for n in range(5)}
    for n in range(5):
        assert spool.store(sent[f"1.2.3.4.{n}"], info(n), "CT1") is not None
    lose_what_was_not_flushed(spool, index)

    Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)  # the restart after the crash
    rows = index.query("SELECT sop_instance_uid, path, size FROM instances")
    assert {r["sop_instance_uid"] for r in rows} == set(sent)
    for r in rows:
        assert (spool.root / r["path"]).read_bytes() == sent[r["sop_instance_uid"]]
    assert index.query("SELECT instance_count FROM series")[0][0] == 5
    assert len(index.query("SELECT * FROM audit WHERE event = 'received'")) == 5


def test_after_a_checkpoint_nothing_is_replayed_twice(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    spool.store(blob(1), info(1), "CT1")
    spool.journal.checkpoint()
    # Gone after the checkpoint means removed on purpose (a retention job, say), not lost.
    lose_what_was_not_flushed(spool, index)
    Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    assert not index.query("SELECT * FROM instances")


def test_a_reception_cut_short_is_not_replayed(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    reception = spool.receive(b"\0" * 132)
    reception.write(os.urandom(2_500_000))   # staged and partly written to the journal, never committed
    Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    assert not index.query("SELECT * FROM instances")
    assert not list(spool.root.rglob("*.dcm")) and not list(spool.root.rglob("*.part"))


def test_a_forged_header_without_the_journal_key_is_not_taken_for_a_record(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    spool.store(blob(1), info(1), "CT1")
    lose_what_was_not_flushed(spool, index)
    spool.close()  # a checkpoint: the record above is covered, and its header no longer counts
    # A sender cannot know the key: a data set carrying header-like bytes (here written straight
    # into the journal, where a reception's data go) with every other field right is ignored.
    meta = json.dumps({"path": "20260101/00/x.dcm", "calling_ae": "X", "received_at": 0.0,
                       "info": info(9).__dict__}).encode()
    body = struct.pack("<QQI", 10**9, 4096, len(meta)) + meta
    block = (journal.MAGIC + bytes(16) + struct.pack("<I", zlib.crc32(body)) + body).ljust(journal.BLOCK, b"\0")
    wal = next((tmp_path / "journal").glob("j*.wal"))
    with open(wal, "r+b") as f:
        f.write(block)
    Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    assert not index.query("SELECT * FROM instances")


def test_the_journal_is_reused_so_a_long_push_does_not_grow_it(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=4, checkpoint_seconds=0.02)
    for n in range(40):   # 12 MB through 4 MiB journal files
        spool.store(blob(n), info(n), "CT1")
    spool.close()
    files = list((tmp_path / "journal").glob("j*.wal"))
    assert 1 <= len(files) <= 4 and all(f.stat().st_size == 4 << 20 for f in files)
    assert len(index.query("SELECT * FROM instances")) == 40


def test_an_instance_too_large_for_the_journal_is_flushed_the_ordinary_way(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    large = blob(1, journal.MAX_RECORD_BYTES + 1)
    flushes = []
    real = spool.flusher._sync
    spool.flusher._sync = lambda: (flushes.append(1), real())[1]
    spool.store(large, info(1), "CT1")
    assert flushes, "an instance past MAX_RECORD_BYTES must be made durable by a flush of the file system"
    spool.store(blob(2), info(2), "CT1")
    assert len(flushes) == 1, "a small instance is durable through the journal, without a flush"


def test_turning_the_journal_off_replays_it_first(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    spool = Spool(tmp_path, index, journal_mb=8, checkpoint_seconds=NEVER)
    data = blob(3)
    spool.store(data, info(3), "CT1")
    lose_what_was_not_flushed(spool, index)
    Spool(tmp_path, index, journal_mb=0)
    row = index.query("SELECT path FROM instances")[0]
    assert (spool.root / row["path"]).read_bytes() == data
    assert not (tmp_path / "journal").exists()
