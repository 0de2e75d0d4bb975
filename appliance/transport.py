"""The transport under the SCP: accepting connections, TLS, and reading PDUs so that no peer can stall it.

pynetdicom 3.0.4 provides the upper layer state machine (PS3.8 9.2), association negotiation and
the DIMSE services; this module replaces the parts of its server that a hostile or broken peer
can exploit, and the part of its reader that sets the node's intake speed:

* **Admission in the accept loop.** :meth:`AssociationServer.process_request` asks the
  :class:`~appliance.access.Gate` before any thread exists for the connection: a source outside
  ``[access] networks``, or one over its connection limit, is closed at once.
* **A timeout on every accepted socket** (``node.network_timeout``): a peer that goes silent
  mid-PDU, or in a TLS handshake, ends its own association when the timeout expires.
* **The TLS handshake in the connection's own thread.** pynetdicom wraps the socket in its accept
  loop, so one client that connects and never says hello stalls every later TLS connection; here
  the accept loop only accepts.
* **PDU lengths checked before anything is read** (PS3.8 9.3.1): a P-DATA-TF longer than the
  Maximum Length the node announced (PS3.8 D.1), or any other PDU longer than
  :data:`CONTROL_PDU_LIMIT`, gets an A-ABORT (invalid PDU parameter value) and the connection
  is closed; nothing of it is buffered.
* **C-STORE data sets streamed to the spool as they arrive.** The reader parses P-DATA-TF PDUs
  itself (PS3.8 9.3.5, PS3.7 Annex E) and asks a :data:`Route` what to do with each DIMSE
  message: a C-STORE-RQ's data set fragments go straight from the socket into the spool file, and
  its C-STORE-RSP is queued the moment the instance is durable, from the same thread (no poll
  interval between receipt and response); Storage Commitment's N-ACTION is answered, and its
  N-EVENT-REPORT sent after the response, the same way. Every other message is handed to
  pynetdicom unchanged. The reader sleeps in ``select()`` on the socket and
  on a pipe that wakes it when a response is queued, instead of polling every millisecond.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from datetime import datetime
from typing import Callable, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from .access import Gate, Slot
from .encoding import NO_DATA_SET, parse_command

log = logging.getLogger("appliance.transport")

#: Largest A-ASSOCIATE, A-RELEASE or A-ABORT PDU read (a request proposing 128 presentation
#: contexts with every transfer syntax is well under this).
CONTROL_PDU_LIMIT = 1 << 20
#: Largest DIMSE command set accepted (a C-STORE-RQ's is under 300 bytes).
COMMAND_LIMIT = 64 << 10
#: Read buffer of an association: the most bytes one system call takes from its socket.
CHUNK = 1 << 20
#: A-ABORT PDUs (PS3.8 9.3.8), source: service-provider (2); reason: invalid PDU parameter value (6),
#: or not specified (0).
ABORT_INVALID_PARAMETER = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))
ABORT_NOT_SPECIFIED = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0))


class Reception(Protocol):
    """What the node does with one DIMSE message it takes over from pynetdicom: its data set
    fragments go to :meth:`write`, and :meth:`finish` returns the messages to send in reply."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> list: ...

    def abandon(self) -> None: ...


#: (association, presentation context or None, command set) -> a :class:`Reception` for the message,
#: or None to leave it to pynetdicom.
Route = Callable[[Association, "PresentationContext | None", Dataset], "Reception | None"]


class _Broken(Exception):
    """The peer sent something PS3.8 does not allow; its association is aborted."""


class _Input:
    """Reads a socket in large gulps and hands out exact byte counts: one system call per many PDUs."""

    def __init__(self, size: int = CHUNK):
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0
        self.sock: socket.socket | None = None

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def _fill(self) -> None:
        """Read what the socket has (at least a byte; blocking up to the socket's timeout)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):  # keep the unread tail, make room behind it
            tail = self.end - self.start
            self.buffer[:tail] = self.buffer[self.start:self.end]
            self.start, self.end = 0, tail
        n = self.sock.recv_into(self.view[self.end:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        self.end += n

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (ConnectionError if the peer closes first, TimeoutError if it stalls)."""
        if n <= len(self.buffer):
            while self.buffered < n:
                self._fill()
            data = bytes(self.view[self.start:self.start + n])
            self.start += n
            return data
        parts, left = [], n
        while left:
            if not self.buffered:
                self._fill()
            take = min(left, self.buffered)
            parts.append(bytes(self.view[self.start:self.start + take]))
            self.start += take
            left -= take
        return b"".join(parts)

    def stream(self, n: int, sink: Callable[[memoryview], None], on_progress: Callable[[], None]) -> None:
        """Pass exactly ``n`` bytes to ``sink`` in the pieces they arrive in, without copying them."""
        while n:
            if not self.buffered:
                self._fill()
                on_progress()
            take = min(n, self.buffered)
            sink(self.view[self.start:self.start + take])
            self.start += take
            n -= take


class _WakingQueue(queue.Queue):
    """The DUL's provider queue: putting a primitive wakes the reader out of ``select()``."""

    def __init__(self, wake_fd: int):
        super().__init__()
        self._wake_fd = wake_fd

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        try:
            os.write(self._wake_fd, b"\0")
        except OSError:  # the pipe is full (a wake-up is pending anyway) or closed (the DUL ended)
            pass


class _SignallingQueue(queue.Queue):
    """A queue the association's thread reads: putting an item wakes that thread."""

    def __init__(self, wake: threading.Event):
        super().__init__()
        self._wake = wake

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        self._wake.set()


class StreamingDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, with the reader and wait loop described above."""

    def __init__(self, assoc: Association, route: Route):
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _WakingQueue(self._wake_w)
        self._route = route
        self._input = _Input()
        self._command = bytearray()
        self._context_id: int | None = None
        self._reception: Reception | None = None
        self._passing = False  # a data set that goes to pynetdicom is in progress
        self._left_idle = False

    # -- the loop ---------------------------------------------------------------------------------

    def run_reactor(self) -> None:
        try:
            self._loop()
        finally:
            self.assoc.wake.set()  # the association notices the upper layer has ended
            self._abandon()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _loop(self) -> None:
        self._idle_timer.start()
        while not self._kill_thread:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("upper layer failed; association aborted", extra={"event": "association.failed"})
                self._send_raw(ABORT_NOT_SPECIFIED)
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            self.state_machine.do_action(event)
            self._after_transition()

    def _after_transition(self) -> None:
        state = self.state_machine.current_state
        if state != "Sta1":
            self._left_idle = True
        elif self._left_idle and not self.assoc.is_established and not self.assoc.is_released:
            # The connection closed before an association was agreed: wake the association's
            # thread, which otherwise waits the whole ACSE timeout for an A-ASSOCIATE-RQ.
            self._left_idle = False
            self.to_user_queue.put(None)

    def _wait(self, timeout: float = 0.05) -> None:
        """Sleep until the peer sends, a primitive is queued to send, or ``timeout`` passes."""
        sock = self.socket.socket if self.socket is not None else None
        if self._input.buffered or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return
        try:
            ready, _, _ = select.select([sock, self._wake_r] if sock is not None else [self._wake_r], [], [], timeout)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(0.001)
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except OSError:
                pass

    # -- reading PDUs -----------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        self._input.sock = self.socket.socket
        return self._input.read(n)

    def _is_transport_event(self) -> bool:
        # As pynetdicom's, but bytes already read from the socket count as incoming data.
        if self.state_machine.current_state != "Sta13" and self._input.buffered:
            self._read_pdu_data()
            return True
        return super()._is_transport_event()

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            return self.assoc.acceptor.maximum_length or 0xFFFFFFFF
        return CONTROL_PDU_LIMIT

    def _read_pdu_data(self) -> None:
        try:
            header = self._recv(6)
        except (OSError, ConnectionError) as e:
            self._transport_closed(e)
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            log.warning("unknown PDU type 0x%02X; association aborted", pdu_type,
                        extra={"event": "association.invalid_pdu"})
            self.event_queue.put("Evt19")
            return
        limit = self._limit(pdu_type)
        if length > limit:
            self._abort(f"a PDU of type 0x{pdu_type:02X} declares {length} bytes, more than the {limit} the node "
                        "accepts (PS3.8 9.3.1, D.1)")
            return
        if pdu_type == 0x04 and self.state_machine.current_state == "Sta6":
            try:
                self._read_p_data(length)
            except _Broken as e:
                self._abort(str(e))
            except (OSError, ConnectionError) as e:
                self._transport_closed(e)
            return
        try:
            body = self._recv(length)
        except (OSError, ConnectionError) as e:
            self._transport_closed(e)
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header + body))
        except Exception:
            log.warning("PDU of type 0x%02X cannot be decoded; association aborted", pdu_type,
                        extra={"event": "association.invalid_pdu"})
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _transport_closed(self, error: Exception) -> None:
        if isinstance(error, TimeoutError):
            log.warning("peer silent for %.0f s in the middle of a PDU; connection closed",
                        self.assoc.network_timeout or 0, extra={"event": "association.timeout"})
        self._abandon()
        self.event_queue.put("Evt17")

    def _abort(self, why: str) -> None:
        """A-ABORT for a protocol violation, then close: the peer's association ends here."""
        log.warning("%s; association aborted", why, extra={"event": "association.invalid_pdu"})
        self._abandon()
        self._send_raw(ABORT_INVALID_PARAMETER)
        self.socket.close()  # queues Evt17: transport connection closed

    def _send_raw(self, data: bytes) -> None:
        try:
            self.socket.socket.sendall(data)
        except (OSError, AttributeError):
            pass

    # -- P-DATA-TF and DIMSE messages (PS3.8 9.3.5, PS3.7 Annex E) ------------------------------

    def _read_p_data(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise _Broken(f"P-DATA-TF has {remaining} bytes left, too few for a PDV item")
            item_length, context_id, control = struct.unpack(">LBB", self._recv(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise _Broken(f"PDV item length {item_length} does not fit its P-DATA-TF")
            self._pdv(context_id, control, item_length - 2)
            remaining -= 4 + item_length

    def _pdv(self, context_id: int, control: int, length: int) -> None:
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        if is_command:
            if self._reception is not None or self._passing:
                raise _Broken("a command fragment arrived before the data set in progress ended")
            if len(self._command) + length > COMMAND_LIMIT:
                raise _Broken(f"a DIMSE command set longer than {COMMAND_LIMIT} bytes")
            self._command += self._recv(length)
            self._context_id = context_id
            if is_last:
                self._command_complete(context_id)
            return
        if context_id != self._context_id:
            raise _Broken(f"a data set fragment on presentation context {context_id}, its command on "
                          f"{self._context_id}")
        if self._reception is not None:
            self._input.sock = self.socket.socket
            self._input.stream(length, self._reception.write, self._idle_timer.restart)
            if is_last:
                self._message_complete(context_id)
            return
        if self._passing:
            self._pass(context_id, bytes((control,)) + self._recv(length))
            self._passing = not is_last
            return
        raise _Broken("a data set fragment arrived without a command")

    def _command_complete(self, context_id: int) -> None:
        raw = bytes(self._command)
        self._command.clear()
        try:
            command = parse_command(raw)
            has_data_set = command.get("CommandDataSetType", NO_DATA_SET) != NO_DATA_SET
            reception = self._route(self.assoc, self.assoc._accepted_cx.get(context_id), command)
        except Exception:
            log.exception("could not route a DIMSE message; pynetdicom takes it", extra={"event": "dimse.unrouted"})
            reception, has_data_set = None, False
        if reception is None:
            # pynetdicom's: the command whole, then its data set as it comes.
            self._passing = has_data_set
            self._pass(context_id, b"\x03" + raw)
        elif has_data_set:
            self._reception = reception
        else:
            self._reply(reception.finish(), context_id)

    def _pass(self, context_id: int, data: bytes) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, data]]
        self.assoc.dimse.receive_primitive(primitive)

    def _message_complete(self, context_id: int) -> None:
        reception, self._reception = self._reception, None
        self._reply(reception.finish(), context_id)

    def _reply(self, messages: list, context_id: int) -> None:
        """Send replies: pynetdicom primitives, or command sets (bytes) that have no data set."""
        for message in messages:
            if not isinstance(message, bytes):
                # Queued to this thread's own provider queue: sent on the next turn of the loop.
                self.assoc.dimse.send_msg(message, context_id)
                continue
            limit = self.assoc.requestor.maximum_length or 0xFFFFFFFF
            if len(message) + 6 <= limit and self.to_provider_queue.empty():
                # One PDV, last command fragment (PS3.8 9.3.5.1); written now, as DT-1 would.
                pdv = struct.pack(">LBB", len(message) + 2, context_id, 0x03) + message
                self.socket.send(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
                continue
            step = max(1, min(limit, 0xFFFFFFF0) - 6)
            for start in range(0, len(message), step):
                last = start + step >= len(message)
                primitive = P_DATA()
                primitive.presentation_data_value_list = [
                    [context_id, bytes((0x03 if last else 0x01,)) + message[start:start + step]]]
                self.send_pdu(primitive)

    def _abandon(self) -> None:
        reception, self._reception, self._passing = self._reception, None, False
        if reception is not None:
            reception.abandon()


class StreamingAssociation(Association):
    """An acceptor association whose upper layer is a :class:`StreamingDUL`, and whose own thread
    sleeps until the upper layer has something for it, instead of waking every millisecond."""

    #: How often the association's thread looks at its timers when nothing wakes it.
    POLL_SECONDS = 0.05

    def __init__(self, ae, route: Route):
        super().__init__(ae, MODE_ACCEPTOR)
        self.wake = threading.Event()
        self.dul = StreamingDUL(self, route)
        self.dul.to_user_queue = _SignallingQueue(self.wake)
        self.dimse.msg_queue = _SignallingQueue(self.wake)
        # The timers live in the DUL: give the new one the values the old one was given.
        self.acse_timeout, self.network_timeout = self.acse_timeout, self.network_timeout
        #: Why the node rejected the association, if it did (a metric label).
        self.rejection: str | None = None

    def kill(self) -> None:
        self.wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (serve DIMSE requests, answer a release, notice an abort, a
        dead upper layer or the network timeout), driven by :attr:`wake`."""
        busy = False
        while not self._kill:
            # Paused while asleep: another thread may use DIMSE on this association meanwhile
            # (pynetdicom's send_*() methods wait for this flag).
            self._is_paused = True
            if not busy:
                self.wake.wait(self.POLL_SECONDS)
            self.wake.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            busy = msg is not None
            if busy:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("no PDU for %.0f s; association aborted", self.network_timeout or 0,
                            extra={"event": "association.timeout"})
                self.abort()
                self.kill()
                return


class AssociationServer(ThreadedAssociationServer):
    """A listener (plain TCP or TLS) whose connections pass the :class:`Gate` before they get a thread."""

    #: Connections the kernel queues while the accept loop is busy (socketserver's default is 5).
    request_queue_size = 128

    def __init__(self, ae, address: tuple[str, int], ae_title: str, contexts: list[PresentationContext], *,
                 ssl_context: ssl.SSLContext | None, evt_handlers: list, gate: Gate, timeout: float,
                 route: Route, on_refused: Callable[[str, str], None]):
        self.gate = gate
        self.connection_timeout = timeout
        self.route = route
        self.on_refused = on_refused
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers)

    def get_request(self) -> tuple[socket.socket, tuple]:
        # Accept only: no handshake and no read here, so no client can hold up the next one.
        return self.socket.accept()

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        source = str(client_address[0])
        slot = self.gate.admit(source)
        if isinstance(slot, str):
            self.on_refused(slot, source)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve, args=(request, client_address, slot),
                                  name=f"connection-{source}", daemon=True)
        thread.start()

    def _serve(self, sock: socket.socket, client_address: tuple, slot: Slot) -> None:
        try:
            sock.settimeout(self.connection_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                sock.do_handshake()
        except (OSError, ssl.SSLError) as e:
            slot.release()
            self.on_refused("tls" if self.ssl_context is not None else "other", str(client_address[0]))
            log.warning("connection from %s closed before an association: %s", client_address[0],
                        type(e).__name__ if isinstance(e, TimeoutError) else e,
                        extra={"event": "connection.failed"})
            self.shutdown_request(sock)
            return
        try:
            assoc = self._association(sock, client_address)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": client_address})
            assoc.start()
            slot.attach(assoc)
        except Exception:
            slot.release()
            log.exception("could not start an association", extra={"event": "association.failed"})
            self.shutdown_request(sock)

    def _association(self, sock: socket.socket, client_address: tuple) -> StreamingAssociation:
        assoc = StreamingAssociation(self.ae, self.route)
        assoc._server = self
        # pynetdicom finds its acceptor threads by this name (AE.active_associations).
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=sock))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.ae_title
        acceptor.address_info = AddressInformation.from_tuple(self.server_address)
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # Shared, not copied: negotiation only reads them (the EVT_REQUESTED handler may narrow them).
        acceptor.supported_contexts = self.contexts
        assoc.requestor.address_info = AddressInformation.from_tuple(client_address)
        for event, handlers in self._handlers.items():
            if event.is_intervention:
                if handlers and handlers[0] is not None:
                    assoc.bind(event, *handlers)
            else:
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc
