"""Storage Commitment, push model (PS3.4 Annex J): what a scanner hears before it deletes its copy.

The scanner stores with dcmtk's storescu, then asks for commitment with pynetdicom (dcmtk has no
storage commitment SCU) and listens for the N-EVENT-REPORT: on the association of its request
while it keeps it open, or on a new association to its own listener when it has gone.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from ingest_support import (CT_IMAGE, command_set, encode_data_set, image, ingest_node, open_association,
                            p_data, tiny_model_package)
from peers import LOOPBACK, ensure_tools, free_port, storescu

pytestmark = pytest.mark.peers

WELL_KNOWN = "1.2.840.10008.1.20.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


class Listener:
    """The scanner's own SCP, where a node that finds the request's association gone reports."""

    def __init__(self, ae_title: str = "MODALITY"):
        self.port = free_port()
        self.reports: list[tuple[int, Dataset]] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = ae.start_server((LOOPBACK, self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_report)])

    def on_report(self, event) -> int:
        self.reports.append((event.request.EventTypeID, event.event_information))
        return 0x0000, None


@pytest.fixture(scope="module")
def listener():
    scanner = Listener()
    yield scanner
    scanner.server.shutdown()


@pytest.fixture(scope="module")
def node(tmp_path_factory, listener):
    ensure_tools("storescu")
    models = tmp_path_factory.mktemp("models")
    tiny_model_package(models)
    process = ingest_node(tmp_path_factory.mktemp("commitment"), models, extra=(
        f'[[commitment.requestors]]\nae_title = "MODALITY"\nhost = "{LOOPBACK}"\nport = {listener.port}\n'))
    with process:
        yield process


@pytest.fixture(scope="module")
def stored(node, tmp_path_factory) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of two CT images the scanner stored on the node."""
    folder = tmp_path_factory.mktemp("ct")
    files = [image(folder / f"ct{i}.dcm", rows=64, columns=64, modality="CT", sop_class=CT_IMAGE, signed=True,
                   series_uid=generate_uid(), study_uid=generate_uid(), rng=np.random.default_rng(i))
             for i in range(2)]
    storescu(files, LOOPBACK, node.port, calling="MODALITY")
    return [(CT_IMAGE, str(pydicom.dcmread(f).SOPInstanceUID)) for f in files]


def request(references: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def ask_and_wait(node, references) -> tuple[Dataset, int, Dataset]:
    """Request commitment on an association the scanner keeps open until the report is in."""
    reports, received = [], threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        received.set()
        return 0x0000, None

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="APPLIANCE", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        asked = request(references)
        status, _ = assoc.send_n_action(asked, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
        assert received.wait(10), "no N-EVENT-REPORT on the request's association"
    finally:
        assoc.release()
    event_type, info = reports[0]
    return asked, event_type, info


def referenced(sequence) -> set[tuple[str, str]]:
    return {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in sequence}


def test_commitment_of_stored_instances_is_reported_on_the_requests_association(node, stored):
    asked, event_type, info = ask_and_wait(node, stored)
    assert event_type == 1  # all committed
    assert info.TransactionUID == asked.TransactionUID
    assert referenced(info.ReferencedSOPSequence) == set(stored)
    assert "FailedSOPSequence" not in info
    assert info.RetrieveAETitle == "APPLIANCE"


def test_unknown_and_mismatched_instances_are_reported_as_failures_with_their_reason(node, stored):
    unknown = (CT_IMAGE, generate_uid())
    wrong_class = (MR_IMAGE, stored[1][1])
    asked, event_type, info = ask_and_wait(node, [stored[0], unknown, wrong_class])
    assert event_type == 2  # failures exist
    assert referenced(info.ReferencedSOPSequence) == {stored[0]}
    reasons = {str(i.ReferencedSOPInstanceUID): i.FailureReason for i in info.FailedSOPSequence}
    assert reasons == {unknown[1]: 0x0112, wrong_class[1]: 0x0119}  # no such instance, class conflict
    metrics = node.metrics()
    assert 'appliance_storage_commitments_total{result="failures"}' in metrics


def test_when_the_requestor_has_gone_the_report_comes_on_a_new_association(node, stored, listener):
    asked = request(stored)
    command = command_set(RequestedSOPClassUID=str(StorageCommitmentPushModel), CommandField=0x0130, MessageID=7,
                          CommandDataSetType=0x0000, RequestedSOPInstanceUID=WELL_KNOWN, ActionTypeID=1)
    sock = open_association(node.port, "APPLIANCE", "MODALITY", str(StorageCommitmentPushModel))
    sock.sendall(p_data(1, 0x03, command) + p_data(1, 0x02, encode_data_set(asked, implicit=True)))
    sock.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT right behind it, then gone
    sock.close()
    deadline = time.monotonic() + 15
    while not any(i.TransactionUID == asked.TransactionUID for _, i in listener.reports):
        assert time.monotonic() < deadline, "no N-EVENT-REPORT on a new association"
        time.sleep(0.05)
    ((event_type, info),) = [(t, i) for t, i in listener.reports if i.TransactionUID == asked.TransactionUID]
    assert event_type == 1
    assert referenced(info.ReferencedSOPSequence) == set(stored)
    assert "on a new association" in node.log_path.read_text()


def test_a_request_that_is_not_storage_commitment_is_refused(node):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="APPLIANCE")
    try:
        status, _ = assoc.send_n_action(request([(CT_IMAGE, generate_uid())]), 2, StorageCommitmentPushModel,
                                        WELL_KNOWN)
        assert status.Status == 0x0123  # no such action
        empty = Dataset()
        empty.TransactionUID = generate_uid()
        status, _ = assoc.send_n_action(empty, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0114  # no references: no such argument
    finally:
        assoc.release()
