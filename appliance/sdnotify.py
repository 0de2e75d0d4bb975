"""Tell systemd how the node is doing: readiness, status, watchdog, stopping (sd_notify(3)).

A service with ``Type=notify`` is "started" for systemd only once it sends ``READY=1``; with
``WatchdogSec=`` it is killed and restarted (``Restart=on-failure``) when ``WATCHDOG=1`` stops
arriving. systemd passes the address of its notification socket in ``$NOTIFY_SOCKET`` and the
watchdog timeout in ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)). This module speaks that protocol
with the standard library only, so the node needs no libsystemd binding.

Outside systemd (a terminal, pytest, a container without it) every call is a harmless no-op that
returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("appliance.sdnotify")

__all__ = ["notify", "watchdog_interval", "Watchdog"]


def _address(value: str) -> str | bytes | None:
    # sd_notify(3): "$NOTIFY_SOCKET [...] may be either a file system path [...] or an abstract
    # namespace socket, indicated by a leading '@'". An abstract name is the same name with a NUL
    # byte in place of the '@'. (systemd 253 added "vsock:CID:PORT" for virtual machines; a node on
    # a scanner-side box never runs under a VM manager that uses it, so it is not supported.)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to systemd as one datagram.

    The states are joined by newlines into one message, as sd_notify(3) specifies, so
    ``notify("READY=1", "STATUS=listening on 11112")`` makes the service ready and sets the
    status ``systemctl status`` shows in one step. Assignments that systemd understands include
    ``READY=1`` (start-up finished), ``STATUS=<one line>``, ``WATCHDOG=1`` (keep-alive),
    ``STOPPING=1`` (shutdown began) and ``ERRNO=<n>``.

    Returns True when the datagram was sent, False when the process is not under systemd
    (``$NOTIFY_SOCKET`` unset or not an address we can send to) or the send failed; like
    sd_notify(3), it never raises for those, because a service must run the same without systemd.
    A state containing a newline raises ValueError: it would be read as two assignments.
    """
    for state in states:
        if "\n" in state or "=" not in state:
            raise ValueError(f"sd_notify state {state!r}: expected one VARIABLE=value assignment on one line")
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not states:
        return False
    address = _address(target)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is neither an absolute path nor an abstract '@name'; not notifying", target)
        return False
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as e:
        # systemd going away (daemon-reexec, shutdown) must not take the node with it.
        log.debug("sd_notify %s to %r failed: %s", states, target, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings systemd expects from this process, or None if it expects none.

    sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the timeout in microseconds (``WatchdogSec=``);
    ``$WATCHDOG_PID``, when set, names the one process the timeout applies to, so a child that
    inherited the environment must not ping. The manual recommends pinging at half the timeout,
    which is what this returns.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        timeout = int(usec)
    except ValueError:
        return None
    if timeout <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return timeout / 2_000_000


class Watchdog:
    """Feeds systemd's watchdog from the node's main loop: ``alive()`` once per loop iteration.

    There is deliberately no thread here. ``WATCHDOG=1`` means "the service is making progress"
    (sd_notify(3): "tells the service manager to update the watchdog timestamp"); a thread that
    pinged on its own would keep a node whose main loop is stuck (a deadlock, a hung disk) alive
    forever. Because the ping is sent from ``alive()``, a stalled loop stops pinging and systemd
    restarts the service after ``WatchdogSec=``.

    ``Watchdog(watchdog_interval())`` is disabled (``alive()`` does nothing) when the interval is
    None, i.e. outside systemd or without ``WatchdogSec=``. The loop must call ``alive()`` more
    often than ``interval``; ``alive()`` rate-limits the pings to one per ``interval``.
    """

    def __init__(self, interval: float | None, clock=time.monotonic):
        if interval is not None and interval <= 0:
            raise ValueError(f"watchdog interval {interval!r}: expected a positive number of seconds or None")
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd expects pings from this process."""
        return self.interval is not None

    def alive(self) -> bool:
        """Record progress of the main loop; send ``WATCHDOG=1`` if an interval passed since the last.

        Returns True when a ping was sent now.
        """
        if self.interval is None:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        if notify("WATCHDOG=1"):
            self._last = now
            return True
        return False
