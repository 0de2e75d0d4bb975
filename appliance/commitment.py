"""Storage Commitment SCP, push model (PS3.4 Annex J), so a scanner may delete its copy.

The requestor sends an N-ACTION-RQ (Action Type 1, on the well-known SOP Instance
1.2.840.10008.1.20.1.1) listing the instances it wants committed under a Transaction UID. The node
answers it at once, then sends the N-EVENT-REPORT-RQ (J.3.3):

* Event Type 1 when every listed instance is in the spool, durable and indexed, with the SOP
  Class the request names; Event Type 2 otherwise, with a Failed SOP Sequence whose Failure
  Reason is 0x0112 (no such object instance) or 0x0119 (class/instance conflict).
* On the association that carried the request, right after the N-ACTION-RSP, while the
  requestor keeps it open. If the requestor releases or aborts it before answering the
  N-EVENT-REPORT (or answers with a failure), the node opens a new association to the address
  ``[[commitment.requestors]]`` gives for the requestor's AE title, proposing Storage Commitment
  with SCP/SCU role selection (the node, as association requestor, in the SCP role; J.3.3 and
  PS3.7 D.3.3.4), and sends it there, retrying with backoff.

The answer reflects the spool when the request arrives (instances are durable once answered
0x0000, so there is nothing to wait for); requests are not kept across a restart, and a
requestor that hears nothing asks again, as Annex J expects.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StorageCommitmentPushModel
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from . import metrics
from .config import Config
from .spool import Spool, valid_uid

log = logging.getLogger("appliance.commitment")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
#: PS3.4 J.3.1: the one SOP Instance of the Storage Commitment Push Model SOP Class.
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1        # Action Type ID, J.3.2
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs, J.3.3
N_ACTION_RQ, N_EVENT_REPORT_RSP = 0x0130, 0x8100

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_SUCH_ARGUMENT = 0x0114
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

#: Largest Action Information accepted (about 100 000 references).
MAX_REQUEST_BYTES = 16 << 20
#: Tries, and the wait before the first retry (doubling), of a report on a new association.
NEW_ASSOCIATION_ATTEMPTS = 4
RETRY_SECONDS = 2.0


def _accepted(status: int | None) -> bool:
    """A success or warning status (PS3.7 C.1): the requestor took the report."""
    return status is not None and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def _uid(value) -> str:
    return "" if value is None else str(value).strip().rstrip("\0").strip()


class Report:
    """One N-EVENT-REPORT to deliver: what was committed of one transaction, and to whom."""

    def __init__(self, transaction_uid: str, event_type: int, information: Dataset, requestor: str):
        self.transaction_uid = transaction_uid
        self.event_type = event_type
        self.information = information
        self.requestor = requestor

    @property
    def result(self) -> str:
        return "committed" if self.event_type == ALL_COMMITTED else "failures"


class StorageCommitmentSCP:
    def __init__(self, cfg: Config, spool: Spool):
        self.cfg = cfg
        self.spool = spool
        self.requestors = {r.ae_title: r for r in cfg.commitment.requestors}
        self._message_ids = itertools.count(1)
        self._lock = threading.Lock()
        #: id(association) -> {Message ID of our N-EVENT-REPORT-RQ: report} awaiting the requestor's answer.
        self._pending: dict[int, dict[int, Report]] = {}

    # -- messages the reader hands over (see appliance.transport) ------------------------------

    def route(self, assoc, context, command) -> "_ActionRequest | _ReportAnswer | None":
        field = command.get("CommandField")
        if field == N_ACTION_RQ and context is not None and context.abstract_syntax == STORAGE_COMMITMENT:
            return _ActionRequest(self, assoc, context, command)
        if field == N_EVENT_REPORT_RSP:
            with self._lock:
                report = self._pending.get(id(assoc), {}).pop(command.get("MessageIDBeingRespondedTo"), None)
            if report is not None:
                return _ReportAnswer(self, report, command)
        return None

    def association_ended(self, assoc) -> None:
        """Reports the requestor did not answer on its association go out on a new one."""
        with self._lock:
            reports = self._pending.pop(id(assoc), {})
        for report in reports.values():
            self.deliver_later(report)

    # -- what is committed -----------------------------------------------------------------------

    def judge(self, transaction_uid: str, references: list[tuple[str, str]], requestor: str) -> Report:
        """The N-EVENT-REPORT's Event Information for ``references`` (PS3.4 J.3.3.1)."""
        # Rows of instances acknowledged by any association are durable; one flush makes sure of
        # rows whose association is between its commit and its flush right now.
        self.spool.flusher.flush()
        stored: dict[str, str] = {}
        uids = [i for _, i in references if valid_uid(i)]
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            for row in self.spool.index.query(
                    f"SELECT sop_instance_uid, sop_class_uid FROM instances WHERE sop_instance_uid IN "
                    f"({','.join('?' * len(chunk))})", tuple(chunk)):
                stored[row["sop_instance_uid"]] = row["sop_class_uid"]
        committed, failed = Sequence(), Sequence()
        for sop_class, sop_instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            if sop_instance not in stored:
                item.FailureReason = NO_SUCH_OBJECT_INSTANCE
                failed.append(item)
            elif stored[sop_instance] != sop_class:
                item.FailureReason = CLASS_INSTANCE_CONFLICT
                failed.append(item)
            else:
                committed.append(item)
        info = Dataset()
        info.TransactionUID = transaction_uid
        info.RetrieveAETitle = self.cfg.ae_title
        if committed:
            info.ReferencedSOPSequence = committed
        if failed:
            info.FailedSOPSequence = failed
        return Report(transaction_uid, FAILURES_EXIST if failed else ALL_COMMITTED, info, requestor)

    def event_report(self, assoc, context, report: Report) -> N_EVENT_REPORT:
        """The N-EVENT-REPORT-RQ for ``report`` on ``assoc``, registered as awaiting its answer."""
        ts = UID(str(context.transfer_syntax[0]))
        rq = N_EVENT_REPORT()
        rq.MessageID = next(self._message_ids) % 65536 or 1
        rq.AffectedSOPClassUID = STORAGE_COMMITMENT
        rq.AffectedSOPInstanceUID = WELL_KNOWN_INSTANCE
        rq.EventTypeID = report.event_type
        rq.EventInformation = BytesIO(encode(report.information, ts.is_implicit_VR, ts.is_little_endian,
                                             ts.is_deflated))
        with self._lock:
            self._pending.setdefault(id(assoc), {})[rq.MessageID] = report
        return rq

    # -- delivery on a new association ---------------------------------------------------------

    def delivered(self, report: Report, how: str) -> None:
        metrics.STORAGE_COMMITMENTS.labels(report.result).inc()
        log.info("storage commitment reported (%s) %s", report.result, how,
                 extra={"event": "commitment.reported", "calling_ae": report.requestor, "result": report.result,
                        "instances": len(report.information.get("ReferencedSOPSequence", []))})

    def undelivered(self, report: Report, why: str) -> None:
        metrics.STORAGE_COMMITMENTS.labels("undelivered").inc()
        log.error("storage commitment report for %s could not be delivered: %s", report.requestor, why,
                  extra={"event": "commitment.undelivered", "calling_ae": report.requestor})

    def deliver_later(self, report: Report) -> None:
        threading.Thread(target=self._deliver, args=(report,), name="commitment-report", daemon=True).start()

    def _deliver(self, report: Report) -> None:
        peer = self.requestors.get(report.requestor)
        if peer is None:
            self.undelivered(report, f"the association is gone and [[commitment.requestors]] has no entry "
                                     f"for AE title {report.requestor!r}; add its host and port")
            return
        ae = AE(ae_title=self.cfg.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.cfg.network_timeout
        ae.add_requested_context(StorageCommitmentPushModel)
        # The node requests the association but plays the SCP of the SOP Class (PS3.7 D.3.3.4).
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        problem = "not tried"
        for attempt in range(NEW_ASSOCIATION_ATTEMPTS):
            if attempt:
                time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
            if not assoc.is_established:
                problem = f"no association with {peer.ae_title}@{peer.host}:{peer.port}"
                continue
            try:
                status, _ = assoc.send_n_event_report(report.information, report.event_type,
                                                      StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
            finally:
                if assoc.is_established:
                    assoc.release()
            code = status.get("Status") if status is not None else None
            if _accepted(code):
                self.delivered(report, f"on a new association to {peer.ae_title}@{peer.host}:{peer.port}")
                return
            problem = "no answer" if code is None else f"answered 0x{code:04X}"
        self.undelivered(report, f"{problem} after {NEW_ASSOCIATION_ATTEMPTS} tries")


class _ActionRequest:
    """An N-ACTION-RQ of Storage Commitment, its Action Information collected as it arrives."""

    def __init__(self, scp: StorageCommitmentSCP, assoc, context, command):
        self.scp, self.assoc, self.context, self.command = scp, assoc, context, command
        self.data = bytearray()
        self.too_long = False

    def write(self, data: memoryview) -> None:
        if len(self.data) + len(data) > MAX_REQUEST_BYTES:
            self.too_long = True
            self.data.clear()
        elif not self.too_long:
            self.data += data

    def abandon(self) -> None:
        self.data.clear()

    def finish(self) -> list:
        status, references, transaction_uid = self._check()
        rsp = N_ACTION()
        rsp.MessageIDBeingRespondedTo = self.command.get("MessageID")
        rsp.AffectedSOPClassUID = STORAGE_COMMITMENT
        rsp.AffectedSOPInstanceUID = WELL_KNOWN_INSTANCE
        rsp.ActionTypeID = self.command.get("ActionTypeID")
        rsp.Status = status
        requestor = self.assoc.requestor.ae_title
        if status != SUCCESS:
            log.warning("storage commitment request refused with 0x%04X", status,
                        extra={"event": "commitment.refused", "calling_ae": requestor, "status": f"0x{status:04X}"})
            return [rsp]
        report = self.scp.judge(transaction_uid, references, requestor)
        log.info("storage commitment requested for %d instance(s)", len(references),
                 extra={"event": "commitment.requested", "calling_ae": requestor})
        return [rsp, self.scp.event_report(self.assoc, self.context, report)]

    def _check(self) -> tuple[int, list[tuple[str, str]], str]:
        """Status of the N-ACTION (PS3.4 J.3.2.1.1, PS3.7 10.1.4.1.10), the references, the Transaction UID."""
        command = self.command
        if _uid(command.get("RequestedSOPClassUID")) != STORAGE_COMMITMENT:
            return NO_SUCH_SOP_CLASS, [], ""
        if _uid(command.get("RequestedSOPInstanceUID")) != WELL_KNOWN_INSTANCE:
            return NO_SUCH_OBJECT_INSTANCE, [], ""
        if command.get("ActionTypeID") != REQUEST_STORAGE_COMMITMENT:
            return NO_SUCH_ACTION, [], ""
        if self.too_long:
            return RESOURCE_LIMITATION, [], ""
        ts = UID(str(self.context.transfer_syntax[0]))
        try:
            ds = decode(BytesIO(bytes(self.data)), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            transaction_uid = _uid(ds.get("TransactionUID"))
            references = [(_uid(item.get("ReferencedSOPClassUID")), _uid(item.get("ReferencedSOPInstanceUID")))
                          for item in ds.get("ReferencedSOPSequence", [])]
        except Exception:
            return PROCESSING_FAILURE, [], ""
        if not valid_uid(transaction_uid):
            return INVALID_ARGUMENT_VALUE, [], ""
        if not references:
            return NO_SUCH_ARGUMENT, [], ""
        if not all(valid_uid(c) and valid_uid(i) for c, i in references):
            return INVALID_ARGUMENT_VALUE, [], ""
        return SUCCESS, references, transaction_uid


class _ReportAnswer:
    """The requestor's N-EVENT-REPORT-RSP to a report sent on its own association."""

    def __init__(self, scp: StorageCommitmentSCP, report: Report, command):
        self.scp, self.report, self.command = scp, report, command

    def write(self, data: memoryview) -> None:
        pass

    def abandon(self) -> None:
        pass

    def finish(self) -> list:
        status = self.command.get("Status")
        if _accepted(status):
            self.scp.delivered(self.report, "on the requestor's association")
        else:
            log.warning("the requestor answered the N-EVENT-REPORT with 0x%04X; sending it on a new association",
                        status if status is not None else 0xFFFF, extra={"event": "commitment.retry"})
            self.scp.deliver_later(self.report)
        return []
