"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class (pynetdicom).

Statuses (PS3.4 B.2.3, PS3.7 C.4.2):

* 0x0000 only once the instance is in the spool and indexed (:meth:`Spool.store` returned);
* 0xA900 when the data set does not match the SOP class of the request (SOP Class UID differs,
  or an identifying UID is absent or malformed);
* 0xC000 when the data set cannot be parsed at all;
* 0xA700 when the node cannot make the instance durable (disk, index); nothing partial is kept.

Handlers are bound to pynetdicom's events; the association's own thread runs them.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Callable

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from . import audit, metrics
from .config import Config
from .spool import InstanceInfo, Spool, valid_uid

log = logging.getLogger("appliance.scp")

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


class StorageSCP:
    """Accepts associations, stores instances, tells assembly when an association is released."""

    def __init__(self, cfg: Config, spool: Spool, on_released: Callable[[set[str]], None]):
        self.cfg = cfg
        self.spool = spool
        self.on_released = on_released
        self._series_by_assoc: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.network_timeout = cfg.network_timeout
        self.ae.acse_timeout = cfg.network_timeout
        self.ae.dimse_timeout = cfg.network_timeout
        self.ae.maximum_pdu_size = cfg.max_pdu
        self.ae.maximum_associations = 64
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, UNCOMPRESSED)
        self.server = None

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_RELEASED, self._handle_released),
                    (evt.EVT_ABORTED, self._handle_aborted), (evt.EVT_ACCEPTED, self._handle_accepted),
                    (evt.EVT_REJECTED, self._handle_rejected)]
        self.server = self.ae.start_server((self.cfg.bind, self.cfg.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.cfg.ae_title, self.cfg.bind, self.cfg.port)

    def stop_accepting(self) -> None:
        """Close the listening socket; associations already open go on."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def listening(self) -> bool:
        return self.server is not None and self.server.socket.fileno() >= 0

    @property
    def active_associations(self) -> int:
        """Associations established and in use; a TCP connection that never asked for one does not count."""
        return sum(1 for a in self.ae.active_associations if a.is_established)

    def shutdown(self) -> None:
        self.stop_accepting()
        self.ae.shutdown()

    def _handle_store(self, event) -> int:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        calling_ae = event.assoc.requestor.ae_title
        if not valid_uid(sop_instance):
            return self._refuse(event, DATASET_DOES_NOT_MATCH, "Affected SOP Instance UID is not a valid UID")
        try:
            ds = event.dataset
            info = InstanceInfo(
                sop_instance_uid=_text(ds, "SOPInstanceUID"),
                sop_class_uid=_text(ds, "SOPClassUID"),
                study_uid=_text(ds, "StudyInstanceUID"),
                series_uid=_text(ds, "SeriesInstanceUID"),
                transfer_syntax=str(event.context.transfer_syntax),
                modality=_text(ds, "Modality").upper(),
                body_part=_text(ds, "BodyPartExamined").upper(),
                study_date=_text(ds, "StudyDate"),
                study_time=_text(ds, "StudyTime"),
            )
        except Exception as e:  # pydicom's message describes the encoding, not the patient
            return self._refuse(event, CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(e).__name__})")
        if info.sop_class_uid != sop_class or info.sop_instance_uid != sop_instance:
            return self._refuse(event, DATASET_DOES_NOT_MATCH,
                                "SOP Class/Instance UID in the data set differ from the C-STORE request")
        for keyword, value in (("StudyInstanceUID", info.study_uid), ("SeriesInstanceUID", info.series_uid)):
            if not valid_uid(value):
                return self._refuse(event, DATASET_DOES_NOT_MATCH, f"{keyword} is absent or not a valid UID")
        if self.spool.free_mb() < self.cfg.min_free_mb:
            return self._refuse(event, OUT_OF_RESOURCES, f"free disk below node.min_free_mb = {self.cfg.min_free_mb}")
        try:
            stored = self.spool.store(event.encoded_dataset(include_meta=True), info, calling_ae)
        except Exception as e:
            log.exception("C-STORE refused with 0xA700: instance could not be made durable",
                          extra={"event": "instance.refused", "status": "0xA700", "sop_class": sop_class})
            return self._refuse(event, OUT_OF_RESOURCES, f"could not be made durable ({type(e).__name__})",
                                logged=True)
        with self._lock:
            self._series_by_assoc[id(event.assoc)].add(info.series_uid)
        if stored is None:
            metrics.INSTANCES_RECEIVED.labels("duplicate").inc()
            log.info("instance already stored; acknowledged again", extra={"event": "instance.duplicate"})
            return SUCCESS
        metrics.INSTANCES_RECEIVED.labels("stored").inc()
        metrics.LAST_INSTANCE.set_to_current_time()
        fields = {"event": "instance.stored", "instance": stored.instance_id, "series": stored.series_id,
                  "calling_ae": calling_ae, "sop_class": sop_class, "transfer_syntax": info.transfer_syntax}
        if self.cfg.include_phi:
            fields.update(patient_id=_text(ds, "PatientID"), accession_number=_text(ds, "AccessionNumber"))
        log.info("instance stored", extra=fields)
        return SUCCESS

    def _refuse(self, event, status: int, why: str, logged: bool = False) -> int:
        calling_ae = event.assoc.requestor.ae_title
        if not logged:
            log.warning("C-STORE refused with 0x%04X: %s", status, why,
                        extra={"event": "instance.refused", "status": f"0x{status:04X}", "calling_ae": calling_ae})
        metrics.INSTANCES_RECEIVED.labels("refused").inc()
        try:
            audit.record_now(self.spool.index, "refused", calling_ae=calling_ae,
                             sop_class_uid=str(event.request.AffectedSOPClassUID), status=f"0x{status:04X}",
                             detail=why)
        except Exception:  # the refusal stands even if the trail cannot be written (disk full)
            log.warning("audit row for a refusal could not be written", extra={"event": "audit.failed"})
        return status

    def _handle_accepted(self, event) -> None:
        metrics.ASSOCIATIONS_ACCEPTED.inc()

    def _handle_rejected(self, event) -> None:
        # pynetdicom does not pass the reason; derive it from the same checks it made.
        assoc, ae = event.assoc, self.ae
        if ae.require_calling_aet and assoc.requestor.ae_title not in ae.require_calling_aet:
            reason = "calling_ae"
        elif ae.require_called_aet and assoc.requestor.primitive.called_ae_title != self.cfg.ae_title:
            reason = "called_ae"
        elif len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
            reason = "too_many_associations"
        else:
            reason = "other"
        metrics.ASSOCIATIONS_REJECTED.labels(reason).inc()
        log.warning("association rejected (%s)", reason, extra={"event": "association.rejected", "reason": reason})

    def _handle_released(self, event) -> None:
        with self._lock:
            series = self._series_by_assoc.pop(id(event.assoc), set())
        if series:
            self.on_released(series)

    def _handle_aborted(self, event) -> None:
        # An aborted sender may send again; its series complete by the quiet timer instead.
        with self._lock:
            self._series_by_assoc.pop(id(event.assoc), None)
