"""Spool, assembly, routing and queue: each hand-over is durable and idempotent."""

import time

import pytest

from appliance import assembly, queue, routing
from appliance.config import DEFAULT_ROUTE, PRIORITIES, Route
from appliance.index import Index
from appliance.spool import InstanceInfo, Spool, valid_uid

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def info(n: int, series: str = "1.2.3.1", modality: str = "DX", body_part: str = "CHEST", sop_class: str = DX):
    return InstanceInfo(sop_instance_uid=f"1.2.3.4.{n}", sop_class_uid=sop_class, study_uid="1.2.3",
                        series_uid=series, transfer_syntax="1.2.840.10008.1.2.1", modality=modality,
                        body_part=body_part, study_date="20260101", study_time="120000")


@pytest.fixture
def index(tmp_path):
    return Index(tmp_path / "index.sqlite")


@pytest.fixture
def spool(tmp_path, index):
    return Spool(tmp_path, index)


def test_stored_instance_reads_back_byte_identical_under_a_name_of_our_own(spool):
    data = b"\0" * 128 + b"DICM" + bytes(range(256)) * 10
    assert spool.store(data, info(1), "SCANNER") is not None
    (path,) = spool.instance_paths("1.2.3.1")
    assert path.read_bytes() == data
    assert "1.2.3.4.1" not in str(path)  # never a UID from the wire in a file name
    assert not list(path.parent.glob(".*.tmp"))


def test_second_copy_of_an_instance_is_idempotent(spool, index):
    assert spool.store(b"first", info(1), "A") is not None
    assert spool.store(b"second", info(1), "B") is None
    (path,) = spool.instance_paths("1.2.3.1")
    assert path.read_bytes() == b"first"
    assert index.query("SELECT instance_count FROM series")[0][0] == 1
    assert len(list(spool.root.rglob("*.dcm"))) == 1


def test_uid_validation_follows_ps3_5():
    assert valid_uid("1.2.840.10008.5.1.4.1.1.1.1")
    assert not valid_uid("1.2.03")          # leading zero in a component
    assert not valid_uid("1.2.a")
    assert not valid_uid("../../etc/passwd")
    assert not valid_uid("1." + "2" * 63)   # 65 characters


def test_series_is_ready_when_its_association_is_released(spool, index):
    spool.store(b"x", info(1), "A")
    assert assembly.complete_released(index, {"1.2.3.1"}) == ["1.2.3.1"]
    assert index.query("SELECT state, ready_by FROM series")[0][:] == ("ready", "release")
    assert assembly.complete_released(index, {"1.2.3.1"}) == []  # already complete


def test_series_is_ready_after_the_quiet_time_without_release(spool, index):
    spool.store(b"x", info(1), "A")
    now = time.time()
    assert assembly.complete_quiet(index, 5.0, now=now + 1) == []
    assert assembly.complete_quiet(index, 5.0, now=now + 6) == ["1.2.3.1"]
    assert index.query("SELECT ready_by FROM series")[0][0] == "quiet"


def test_routing_queues_matching_series_and_keeps_unmatched_ones(spool, index):
    spool.store(b"x", info(1, series="1.2.3.1"), "A")
    spool.store(b"x", info(2, series="1.2.3.2", modality="CT", body_part="HEAD", sop_class="1.2.840.10008.5.1.4.1.1.2"), "A")
    assembly.complete_released(index, {"1.2.3.1", "1.2.3.2"})
    assert routing.route_ready(index, [DEFAULT_ROUTE]) == 1
    states = dict(index.query("SELECT series_uid, state FROM series"))
    assert states == {"1.2.3.1": "routed", "1.2.3.2": "unrouted"}
    assert [tuple(r) for r in index.query("SELECT series_uid, model FROM jobs")] == [("1.2.3.1", "cxr-triage")]
    assert len(spool.instance_paths("1.2.3.2")) == 1  # unrouted, still kept


def test_first_matching_route_wins():
    a = Route("a", {"Modality": ("DX",)}, ("first",), PRIORITIES["routine"])
    b = Route("b", {}, ("second",), PRIORITIES["routine"])
    assert routing.choose([a, b], {"Modality": "DX"}) is a
    assert routing.choose([a, b], {"Modality": "CT"}) is b


def _job(index, series, priority):
    with index.transaction() as db:
        db.execute("INSERT INTO jobs (series_uid, model, priority, state, created_at) VALUES (?, 'm', ?, 'pending', 0)",
                   (series, priority))


def test_queue_serves_stat_before_routine_whatever_the_arrival_order(index):
    _job(index, "routine-1", PRIORITIES["routine"])
    _job(index, "stat-1", PRIORITIES["stat"])
    _job(index, "urgent-1", PRIORITIES["urgent"])
    order = [queue.take(index, 60).series_uid for _ in range(3)]
    assert order == ["stat-1", "urgent-1", "routine-1"]
    assert queue.take(index, 60) is None


def test_a_job_whose_worker_died_is_taken_again_when_its_lease_runs_out(index):
    _job(index, "s", 1)
    now = time.time()
    first = queue.take(index, 10, now=now)
    assert queue.take(index, 10, now=now + 5) is None          # leased
    again = queue.take(index, 10, now=now + 11)                 # lease expired
    assert again.id == first.id and again.attempts == 2


def test_start_up_releases_every_lease(index):
    _job(index, "s", 1)
    queue.take(index, 3600)
    assert queue.release_leases(index) == 1
    assert queue.take(index, 60).series_uid == "s"
