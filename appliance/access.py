"""Who may talk to the node, decided as early as possible.

Two moments, two kinds of check:

* a TCP connection arrives (the accept loop, before any thread starts for it): its source address
  must be in ``[access] networks``, and neither the node nor that source may already hold its
  maximum number of connections. A refused connection is closed at once; it never costs a thread,
  a TLS handshake or a byte of DICOM.
* its A-ASSOCIATE-RQ arrives (PS3.8 7.1.1): the calling AE title must be allowed and, with
  ``require_called_aet``, the called AE title must be the node's. The refusal is an
  A-ASSOCIATE-RJ with the result, source and reason PS3.8 Table 9-21 gives (:data:`REJECTIONS`).

Every refusal has a short reason, the label of ``appliance_associations_rejected_total``.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .config import Access

#: reason -> (result, source, reason/diagnostic) of the A-ASSOCIATE-RJ, PS3.8 Table 9-21.
REJECTIONS = {
    "calling_ae": (0x01, 0x01, 0x03),       # permanent; service-user; calling AE title not recognized
    "called_ae": (0x01, 0x01, 0x07),        # permanent; service-user; called AE title not recognized
    "disk_full": (0x02, 0x03, 0x01),        # transient; service-provider (presentation); temporary congestion
}

#: Reasons a connection is closed before it gets a thread.
CONNECTION_REASONS = ("source_address", "too_many_associations", "too_many_from_source")


@dataclass
class Slot:
    """One admitted connection; it counts until :meth:`release` or until its association thread ends."""

    source: str
    _alive: Callable[[], bool] | None = None
    _released: bool = False

    def attach(self, association: threading.Thread) -> None:
        """From now on the connection lives as long as ``association``'s thread."""
        self._alive = association.is_alive

    def release(self) -> None:
        self._released = True

    @property
    def open(self) -> bool:
        if self._released:
            return False
        return self._alive is None or self._alive()


class Gate:
    """Connection admission and association checks for every listener of the node (plain and TLS)."""

    def __init__(self, policy: Access, ae_title: str):
        self.policy = policy
        self.ae_title = ae_title
        self._lock = threading.Lock()
        self._slots: list[Slot] = []

    def allowed_source(self, address: str) -> bool:
        if not self.policy.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.policy.networks)

    def admit(self, address: str) -> Slot | str:
        """A :class:`Slot` for a new connection from ``address``, or the reason it is refused."""
        if not self.allowed_source(address):
            return "source_address"
        with self._lock:
            self._slots = [s for s in self._slots if s.open]
            if len(self._slots) >= self.policy.max_associations:
                return "too_many_associations"
            if sum(1 for s in self._slots if s.source == address) >= self.policy.max_associations_per_source:
                return "too_many_from_source"
            slot = Slot(address)
            self._slots.append(slot)
            return slot

    def open_connections(self) -> Counter:
        """Open connections by source address."""
        with self._lock:
            self._slots = [s for s in self._slots if s.open]
            return Counter(s.source for s in self._slots)

    def check_association(self, calling_ae: str, called_ae: str) -> str | None:
        """The reason an A-ASSOCIATE-RQ is refused, or None (PS3.8 7.1.1.3-4: AE titles)."""
        if self.policy.calling_ae_titles and calling_ae.strip() not in self.policy.calling_ae_titles:
            return "calling_ae"
        if self.policy.require_called_aet and called_ae.strip() != self.ae_title:
            return "called_ae"
        return None
