"""The DICOM SCP: C-ECHO, C-STORE of every storage SOP class, Storage Commitment (pynetdicom).

Every storage SOP class pynetdicom knows is accepted in every transfer syntax it knows, compressed
ones included; for each proposed presentation context the node takes the first transfer syntax the
sender proposed, and stores the data set exactly as it came (decoding happens when a model needs
the pixels). Statuses (PS3.4 B.2.3, PS3.7 C.4.2):

* 0x0000 only once the instance is in the spool, durable and indexed (:meth:`Spool.commit` returned);
  a second copy of an instance already stored is answered 0x0000 and not stored again;
* 0xA900 when the data set does not match the request: its SOP Class or Instance UID differs from
  the C-STORE-RQ's, or a UID the node uses (SOP Class, SOP Instance, Study and Series Instance) is
  absent or not a UID (PS3.5 9.1: digits and dots, at most 64 characters); UIDs are checked before
  any use;
* 0xC000 when the data set cannot be parsed;
* 0xA700 when free disk under ``data_dir`` is below ``node.min_free_mb``, or the instance cannot be
  made durable; nothing partial is kept. Below the watermark new associations are also rejected,
  transiently (A-ASSOCIATE-RJ: rejected-transient, temporary congestion), so senders retry later.

Associations pass :mod:`appliance.access` first (source address and connection limits in the
accept loop; AE titles on A-ASSOCIATE-RQ). C-STORE data sets are streamed to the spool by
:mod:`appliance.transport`; handlers bound to pynetdicom's events do the rest, in each
association's own thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from typing import Callable

import pydicom
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from . import audit, metrics
from .access import REJECTIONS, Gate
from .commitment import StorageCommitmentSCP
from .config import Config
from .encoding import C_STORE_RSP, NO_DATA_SET, encode_command, read_identifiers
from .spool import InstanceInfo, Reception, Spool, file_meta, valid_uid
from .transport import AssociationServer

log = logging.getLogger("appliance.scp")

C_STORE_RQ = 0x0001

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

#: Every transfer syntax pynetdicom knows (PS3.5 Section 10 and Annex A), compressed ones included.
TRANSFER_SYNTAXES = frozenset(ALL_TRANSFER_SYNTAXES)
#: Every storage SOP class pynetdicom knows (PS3.4 B.5).
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

#: Bytes of a data set kept in memory while it streams to disk, to read its identifiers from.
HEAD_BYTES = 64 << 10
#: The attributes read from a data set before it is stored: identifiers, routing, (debug) PHI.
HEADER_TAGS = ["SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
               "Modality", "BodyPartExamined", "StudyDate", "StudyTime", "PatientID", "AccessionNumber"]


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip().rstrip("\0").strip()


def _uid(value) -> str:
    return "" if value is None else str(value).strip().rstrip("\0").strip()


class StorageSCP:
    """Accepts associations, stores instances, tells assembly when an association is released."""

    def __init__(self, cfg: Config, spool: Spool, on_released: Callable[[set[str]], None],
                 commitment: "StorageCommitmentSCP | None" = None):
        self.cfg = cfg
        self.spool = spool
        self.on_released = on_released
        self.commitment = commitment
        self._series_by_assoc: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        # pynetdicom's "standard" handlers format every PDU for a debug log the node never keeps.
        _config.LOG_HANDLER_LEVEL = "none"
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.network_timeout = cfg.network_timeout
        self.ae.acse_timeout = cfg.network_timeout
        self.ae.dimse_timeout = cfg.network_timeout
        self.ae.maximum_pdu_size = cfg.max_pdu
        self.ae.maximum_associations = cfg.access.max_associations
        self.ae.add_supported_context(Verification)
        for sop_class in sorted(STORAGE_SOP_CLASSES):
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        if commitment is not None:
            self.ae.add_supported_context(StorageCommitmentPushModel)
        self._supported = {str(cx.abstract_syntax): cx for cx in self.ae.supported_contexts}
        self.gate = Gate(cfg.access, cfg.ae_title)
        self.servers: list[AssociationServer] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, tls_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``node.port``, and with ``tls_context`` on ``tls.port`` too."""
        handlers = [(evt.EVT_REQUESTED, self._handle_requested), (evt.EVT_ACCEPTED, self._handle_accepted),
                    (evt.EVT_REJECTED, self._handle_rejected), (evt.EVT_RELEASED, self._handle_released),
                    (evt.EVT_ABORTED, self._handle_aborted), (evt.EVT_C_STORE, self._handle_store)]
        listeners = [(self.cfg.port, None)]
        if tls_context is not None:
            listeners.append((self.cfg.tls.port, tls_context))
        for port, context in listeners:
            server = AssociationServer(
                self.ae, (self.cfg.bind, port), self.cfg.ae_title, self.ae.supported_contexts,
                ssl_context=context, evt_handlers=handlers, gate=self.gate, timeout=self.cfg.network_timeout,
                route=self._route, on_refused=self._connection_refused)
            self.ae._servers.append(server)
            threading.Thread(target=server.serve_forever, name=f"listener-{port}", daemon=True).start()
            self.servers.append(server)
            log.info("listening as %s on %s:%d%s", self.cfg.ae_title, self.cfg.bind, port,
                     " (DICOM TLS)" if context is not None else "")

    def stop_accepting(self) -> None:
        """Close the listening sockets; associations already open go on."""
        servers, self.servers = self.servers, []
        for server in servers:
            server.shutdown()

    @property
    def listening(self) -> bool:
        return bool(self.servers) and all(s.socket.fileno() >= 0 for s in self.servers)

    @property
    def active_associations(self) -> int:
        """Associations established and in use; a TCP connection that never asked for one does not count."""
        return sum(1 for a in self.ae.active_associations if a.is_established)

    def shutdown(self) -> None:
        self.stop_accepting()
        self.ae.shutdown()

    # -- associations ----------------------------------------------------------------------------

    def _connection_refused(self, reason: str, source: str) -> None:
        metrics.ASSOCIATIONS_REJECTED.labels(reason).inc()
        log.warning("connection from %s refused (%s)", source, reason,
                    extra={"event": "association.rejected", "reason": reason, "source": source})

    def _handle_requested(self, event) -> None:
        """A-ASSOCIATE-RQ: AE titles, free disk, then the presentation contexts the node will take."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        reason = self.gate.check_association(str(rq.calling_ae_title), str(rq.called_ae_title))
        if reason is None and self.spool.free_mb() < self.cfg.min_free_mb:
            reason = "disk_full"
        if reason is not None:
            assoc.rejection = reason
            assoc.acse.send_reject(*REJECTIONS[reason])
            # pynetdicom fires no EVT_REJECTED for a rejection made here, and would close the
            # socket before the A-ASSOCIATE-RJ is out: count it, and wait for the upper layer.
            self._count_rejection(assoc)
            assoc.kill()
            return
        # For each abstract syntax the node supports, the transfer syntaxes it knows in the order
        # the sender proposed them: negotiation takes the sender's first choice (store as sent).
        wanted: dict[str, list] = {}
        for cx in rq.presentation_context_definition_list:
            abstract = str(cx.abstract_syntax)
            if abstract in self._supported:
                syntaxes = wanted.setdefault(abstract, [])
                syntaxes += [ts for ts in cx.transfer_syntax if ts in TRANSFER_SYNTAXES and ts not in syntaxes]
        contexts = []
        for abstract, syntaxes in wanted.items():
            if not syntaxes:  # none the node knows: negotiation answers "transfer syntaxes not supported"
                contexts.append(self._supported[abstract])
                continue
            cx = PresentationContext()
            cx.abstract_syntax = abstract
            cx.transfer_syntax = syntaxes
            contexts.append(cx)
        assoc.acceptor.supported_contexts = contexts

    def _handle_accepted(self, event) -> None:
        metrics.ASSOCIATIONS_ACCEPTED.inc()

    def _handle_rejected(self, event) -> None:
        self._count_rejection(event.assoc)

    def _count_rejection(self, assoc) -> None:
        reason = getattr(assoc, "rejection", None) or "other"
        metrics.ASSOCIATIONS_REJECTED.labels(reason).inc()
        rq = assoc.requestor.primitive
        log.warning("association from %s rejected (%s)", assoc.requestor.address, reason,
                    extra={"event": "association.rejected", "reason": reason,
                           "calling_ae": str(rq.calling_ae_title).strip() if rq else None,
                           "source": assoc.requestor.address})

    def _handle_released(self, event) -> None:
        with self._lock:
            series = self._series_by_assoc.pop(id(event.assoc), set())
        if series:
            self.on_released(series)
        if self.commitment is not None:
            self.commitment.association_ended(event.assoc)

    def _handle_aborted(self, event) -> None:
        # An aborted sender may send again; its series complete by the quiet timer instead.
        with self._lock:
            self._series_by_assoc.pop(id(event.assoc), None)
        if self.commitment is not None:
            self.commitment.association_ended(event.assoc)

    # -- C-STORE ---------------------------------------------------------------------------------

    def _route(self, assoc, context: PresentationContext | None, command) -> "Incoming | None":
        """What the reader does with a DIMSE message (see :mod:`.transport`); None: pynetdicom's."""
        field = command.get("CommandField")
        if field == C_STORE_RQ and context is not None:
            # pynetdicom builds (and validates) new UID objects on every access to these
            # properties; per C-STORE that was a measurable share of a CT slice's time.
            uids = getattr(context, "_appliance_uids", None)
            if uids is None:
                uids = context._appliance_uids = (str(context.abstract_syntax), str(context.transfer_syntax[0]))
            sop_class = _uid(command.get("AffectedSOPClassUID"))
            if sop_class == uids[0]:
                return Incoming(self, assoc, sop_class, _uid(command.get("AffectedSOPInstanceUID")), uids[1],
                                message_id=command.get("MessageID"))
        if self.commitment is not None:
            return self.commitment.route(assoc, context, command)
        return None

    def _handle_store(self, event) -> int:
        """C-STOREs that reach pynetdicom (not streamed): the same checks, on the whole data set."""
        request, context = event.request, event.context
        sop_class = _uid(request.AffectedSOPClassUID)
        incoming = Incoming(self, event.assoc, sop_class, _uid(request.AffectedSOPInstanceUID),
                            str(context.transfer_syntax))
        if sop_class != context.abstract_syntax:
            incoming.refuse(SOP_CLASS_NOT_SUPPORTED, "the C-STORE-RQ's SOP Class differs from its presentation context")
        incoming.write(memoryview(request.DataSet.getbuffer()))
        return incoming.status()

    def _refuse(self, assoc, sop_class: str, status: int, why: str, logged: bool = False) -> int:
        calling_ae = assoc.requestor.ae_title
        if not logged:
            log.warning("C-STORE refused with 0x%04X: %s", status, why,
                        extra={"event": "instance.refused", "status": f"0x{status:04X}", "calling_ae": calling_ae})
        metrics.INSTANCES_RECEIVED.labels("refused").inc()
        try:
            audit.record_now(self.spool.index, "refused", calling_ae=calling_ae, sop_class_uid=sop_class or None,
                             status=f"0x{status:04X}", detail=why)
        except Exception:  # the refusal stands even if the trail cannot be written (disk full)
            log.warning("audit row for a refusal could not be written", extra={"event": "audit.failed"})
        return status

    def _stored(self, assoc, series_uid: str) -> None:
        with self._lock:
            self._series_by_assoc[id(assoc)].add(series_uid)


class Incoming:
    """One C-STORE-RQ's data set: checked before it is written, streamed to the spool, then judged.

    The decisions that need no data set (UIDs of the request, a copy already stored, free disk)
    are taken when the command arrives, so a refused or duplicate data set is read and dropped,
    never written. The others are taken when the last fragment is in.
    """

    def __init__(self, scp: StorageSCP, assoc, sop_class: str, sop_instance: str, transfer_syntax: str,
                 message_id: int | None = None):
        self.scp, self.assoc, self.message_id = scp, assoc, message_id
        self.sop_class, self.sop_instance, self.transfer_syntax = sop_class, sop_instance, transfer_syntax
        self.refusal: tuple[int, str] | None = None
        self.duplicate = False
        self.reception: Reception | None = None
        self.head = bytearray()  # the data set's first HEAD_BYTES: where its identifiers are
        self.size = 0
        spool, cfg = scp.spool, scp.cfg
        if not valid_uid(sop_class) or not valid_uid(sop_instance):
            self.refuse(DATASET_DOES_NOT_MATCH, "the C-STORE-RQ's SOP Class or Instance UID is not a valid UID")
        elif spool.contains(sop_instance):
            self.duplicate = True
        elif spool.free_mb() < cfg.min_free_mb:
            self.refuse(OUT_OF_RESOURCES, f"free disk below node.min_free_mb = {cfg.min_free_mb}")
        else:
            try:
                self.reception = spool.receive(file_meta(sop_class, sop_instance, transfer_syntax,
                                                         assoc.requestor.ae_title))
            except OSError as e:
                self.refuse(OUT_OF_RESOURCES, f"could not be written ({type(e).__name__}: {e.strerror})")

    def refuse(self, status: int, why: str) -> None:
        if self.refusal is None:
            self.refusal = (status, why)
        self.abandon()

    def write(self, data: memoryview) -> None:
        if self.reception is None:
            return
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        self.size += len(data)
        try:
            self.reception.write(data)
        except OSError as e:  # ENOSPC, EIO: refuse, keep nothing
            self.refuse(OUT_OF_RESOURCES, f"could not be written ({type(e).__name__}: {e.strerror})")

    def abandon(self) -> None:
        reception, self.reception = self.reception, None
        if reception is not None:
            reception.discard()

    def finish(self) -> list[bytes]:
        """The C-STORE-RSP's command set (PS3.7 9.3.1.2), once the instance is durable or refused."""
        status = self.status()
        # The UIDs are optional in a response: left out when the request's is not a UID.
        uids = {keyword: value for keyword, value in (("AffectedSOPClassUID", self.sop_class),
                                                       ("AffectedSOPInstanceUID", self.sop_instance))
                if valid_uid(value)}
        return [encode_command(CommandField=C_STORE_RSP, MessageIDBeingRespondedTo=self.message_id or 0,
                               CommandDataSetType=NO_DATA_SET, Status=status, **uids)]

    def status(self) -> int:
        """The status of the C-STORE, once the instance is durable or refused."""
        scp, assoc = self.scp, self.assoc
        if self.refusal is not None:
            return scp._refuse(assoc, self.sop_class, *self.refusal)
        if self.duplicate:
            return self._acknowledge_again()
        reception = self.reception
        try:
            ds = self._identifiers()
            info = InstanceInfo(
                sop_instance_uid=_uid(ds.get("SOPInstanceUID")), sop_class_uid=_uid(ds.get("SOPClassUID")),
                study_uid=_uid(ds.get("StudyInstanceUID")), series_uid=_uid(ds.get("SeriesInstanceUID")),
                transfer_syntax=self.transfer_syntax, modality=_text(ds, "Modality").upper(),
                body_part=_text(ds, "BodyPartExamined").upper(), study_date=_text(ds, "StudyDate"),
                study_time=_text(ds, "StudyTime"))
        except Exception as e:  # pydicom's message describes the encoding, not the patient
            self.abandon()
            return scp._refuse(assoc, self.sop_class, CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(e).__name__})")
        if info.sop_class_uid != self.sop_class or info.sop_instance_uid != self.sop_instance:
            self.abandon()
            return scp._refuse(assoc, self.sop_class, DATASET_DOES_NOT_MATCH,
                               "SOP Class/Instance UID in the data set differ from the C-STORE request")
        for keyword, value in (("StudyInstanceUID", info.study_uid), ("SeriesInstanceUID", info.series_uid)):
            if not valid_uid(value):
                self.abandon()
                return scp._refuse(assoc, self.sop_class, DATASET_DOES_NOT_MATCH, f"{keyword} is absent or not a valid UID")
        calling_ae = assoc.requestor.ae_title
        self.reception = None
        try:
            stored = scp.spool.commit(reception, info, calling_ae)
        except Exception as e:
            log.exception("C-STORE refused with 0xA700: instance could not be made durable",
                          extra={"event": "instance.refused", "status": "0xA700", "sop_class": self.sop_class})
            return scp._refuse(assoc, self.sop_class, OUT_OF_RESOURCES, f"could not be made durable ({type(e).__name__})",
                               logged=True)
        scp._stored(assoc, info.series_uid)
        if stored is None:
            metrics.INSTANCES_RECEIVED.labels("duplicate").inc()
            log.info("instance already stored; acknowledged again", extra={"event": "instance.duplicate"})
            return SUCCESS
        metrics.INSTANCES_RECEIVED.labels("stored").inc()
        metrics.LAST_INSTANCE.set_to_current_time()
        fields = {"event": "instance.stored", "instance": stored.instance_id, "series": stored.series_id,
                  "calling_ae": calling_ae, "sop_class": self.sop_class, "transfer_syntax": self.transfer_syntax}
        if scp.cfg.include_phi:
            fields.update(patient_id=_text(ds, "PatientID"), accession_number=_text(ds, "AccessionNumber"))
        log.info("instance stored", extra=fields)
        return SUCCESS

    def _identifiers(self):
        """The data set's identifying attributes: read from its first bytes, or by pydicom if need be."""
        found = read_identifiers(self.head, self.transfer_syntax, complete=self.size <= len(self.head))
        if found is not None:
            return found
        return pydicom.dcmread(self.reception.part, stop_before_pixels=True, specific_tags=HEADER_TAGS)

    def _acknowledge_again(self) -> int:
        rows = self.scp.spool.index.query("SELECT series_uid FROM instances WHERE sop_instance_uid = ?",
                                          (self.sop_instance,))
        if rows:
            self.scp._stored(self.assoc, rows[0]["series_uid"])
        metrics.INSTANCES_RECEIVED.labels("duplicate").inc()
        log.info("instance already stored; acknowledged again", extra={"event": "instance.duplicate"})
        return SUCCESS
