"""sd_notify readiness and watchdog, driven through a real AF_UNIX datagram socket this test opens.

The socket plays systemd's part: systemd creates a datagram socket, passes its address in
``$NOTIFY_SOCKET`` and reads ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1`` from it (sd_notify(3)).
With ``SO_PASSCRED`` the kernel tells us which process sent each datagram, as it tells systemd
when it enforces ``NotifyAccess=main``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import sdnotify
from appliance.sdnotify import Watchdog, notify, watchdog_interval
from peers import LOOPBACK, free_port, spawn, stop_process, tail

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Datagram:
    states: list[str]
    pid: int
    at: float


class NotifySocket:
    """A notification socket as systemd opens one: AF_UNIX, SOCK_DGRAM, SO_PASSCRED."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._dir = None
        if abstract:
            name = f"appliance-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
            self._dir = tempfile.mkdtemp(prefix="sdn-")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float) -> Datagram | None:
        """The next datagram, or None if none arrives within ``timeout`` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("3i", payload[: struct.calcsize("3i")])
        return Datagram(data.decode().split("\n"), pid, time.monotonic())

    def wait_for(self, state: str, timeout: float, seen: list[Datagram] | None = None) -> Datagram | None:
        """Read datagrams until one carries ``state``; every datagram read is appended to ``seen``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            datagram = self.receive(left)
            if datagram is None:
                return None
            if seen is not None:
                seen.append(datagram)
            if state in datagram.states:
                return datagram
        return None

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify_socket(monkeypatch):
    listener = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    yield listener
    listener.close()


# --- the protocol -------------------------------------------------------------------------------


def test_ready_and_status_arrive_as_one_datagram(notify_socket):
    assert notify("READY=1", "STATUS=listening on port 11112") is True
    datagram = notify_socket.receive(timeout=2)
    assert datagram.states == ["READY=1", "STATUS=listening on port 11112"]
    assert datagram.pid == os.getpid()


def test_abstract_socket_names_work(monkeypatch):
    listener = NotifySocket(abstract=True)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        assert listener.address.startswith("@")
        assert notify("READY=1") is True
        assert listener.receive(timeout=2).states == ["READY=1"]
    finally:
        listener.close()


def test_not_under_systemd_notify_returns_false_and_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify("READY=1") is False


def test_a_vanished_notify_socket_does_not_take_the_node_down(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("STATUS=still here") is False


def test_a_state_with_a_newline_is_refused_rather_than_sent_as_two(notify_socket):
    with pytest.raises(ValueError, match="one line"):
        notify("STATUS=two\nREADY=1")
    assert notify_socket.receive(timeout=0.1) is None


def test_a_child_process_notifies_through_the_inherited_environment(notify_socket):
    child = subprocess.run(
        [sys.executable, "-c", "from appliance.sdnotify import notify; raise SystemExit(0 if notify('READY=1') else 1)"],
        cwd=ROOT, env=dict(os.environ), timeout=60)
    assert child.returncode == 0
    datagram = notify_socket.receive(timeout=5)
    assert datagram.states == ["READY=1"]
    assert datagram.pid not in (-1, os.getpid())


# --- the watchdog -------------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdogsec(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # WatchdogSec=30
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0


def test_no_watchdog_without_watchdogsec_or_for_another_process(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for our parent, inherited
    assert watchdog_interval() is None
    assert Watchdog(watchdog_interval()).alive() is False


def test_watchdog_pings_at_most_once_per_interval(notify_socket):
    now = [100.0]
    watchdog = Watchdog(1.0, clock=lambda: now[0])
    sent = []
    for _ in range(30):  # a main loop turning every 0.1 s for 3 s
        sent.append(watchdog.alive())
        now[0] += 0.1
    assert sum(sent) == 3
    pings = [notify_socket.receive(timeout=1) for _ in range(3)]
    assert all(p.states == ["WATCHDOG=1"] for p in pings)
    assert notify_socket.receive(timeout=0.1) is None


def test_a_stalled_main_loop_stops_feeding_the_watchdog(notify_socket):
    # WatchdogSec=1: systemd would expect a ping every 0.5 s and kill after 1 s of silence.
    timeout = 1.0
    watchdog = Watchdog(timeout / 2)
    stall, release = threading.Event(), threading.Event()
    stalled_at: list[float] = []
    threads_before = threading.active_count()

    def main_loop():
        while True:
            if stall.is_set():
                stalled_at.append(time.monotonic())
                release.wait()  # a deadlock: the loop does not turn again until the test ends
                return
            watchdog.alive()
            time.sleep(0.02)

    threading.Thread(target=main_loop, daemon=True).start()
    assert threading.active_count() == threads_before + 1  # the watchdog started no thread of its own

    healthy: list[Datagram] = []
    deadline = time.monotonic() + 3
    while (datagram := notify_socket.receive(deadline - time.monotonic())) is not None:
        healthy.append(datagram)
    assert len(healthy) >= 5, "a turning main loop pings every interval"
    gaps = [b.at - a.at for a, b in zip(healthy, healthy[1:])]
    assert max(gaps) < timeout

    stall.set()
    while not stalled_at:
        time.sleep(0.01)
    # A ping sent just before the stall may still be queued; after it, silence for two timeouts,
    # long enough for systemd to have killed and restarted the service.
    after: list[Datagram] = []
    while (datagram := notify_socket.receive(timeout=2 * timeout)) is not None:
        after.append(datagram)
    release.set()
    assert len(after) <= 1 and all(d.at - stalled_at[0] < 0.1 for d in after), \
        f"{len(after)} ping(s) came from a stalled main loop"


# --- the real node ------------------------------------------------------------------------------


def _models_unavailable() -> str | None:
    """Why the node could not load its default models here, or None if it can."""
    from appliance.config import parse
    from appliance.node import load_packages

    try:
        load_packages(parse({}))
    except Exception as e:  # ManifestError and friends: the node would exit at start-up
        return str(e)
    return None


@pytest.mark.slow
def test_node_is_ready_after_its_port_listens_pings_the_watchdog_and_says_when_it_stops(tmp_path):
    if (reason := _models_unavailable()) is not None:
        pytest.skip(f"the node cannot start without its model ({reason}); build it with `make models`")
    listener = NotifySocket()
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "appliance.toml"
    config.write_text(
        "[node]\n"
        f"port = {port}\n"
        f'bind = "{LOOPBACK}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "[metrics]\n"
        f"port = {metrics_port}\n"
        f'bind = "{LOOPBACK}"\n')
    log_path = tmp_path / "node.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="2000000")
    env.pop("WATCHDOG_PID", None)
    node = spawn([sys.executable, "-m", "appliance", "serve", "--config", str(config)], log_path, env=env)
    seen: list[Datagram] = []

    def explain(problem: str) -> str:
        return f"{problem}\ndatagrams: {[d.states for d in seen]}\nnode log:\n{tail(log_path, 60)}"

    try:
        deadline = time.monotonic() + 120
        ready = None
        while ready is None and time.monotonic() < deadline and node.poll() is None:
            ready = listener.wait_for("READY=1", timeout=1, seen=seen)
        assert node.poll() is None, explain(f"node exited with {node.returncode}")
        assert ready is not None, explain("no READY=1 within 120 s (is sdnotify wired into `appliance serve`?)")
        # READY=1 means "serving": the DICOM port must take connections at that moment already.
        with socket.create_connection((LOOPBACK, port), timeout=1):
            pass
        # NotifyAccess=main: systemd ignores datagrams from any process but the main one.
        assert ready.pid == node.pid, explain(f"READY=1 came from pid {ready.pid}, not the node's {node.pid}")
        assert all("READY=1" not in d.states for d in seen[:-1])

        # WATCHDOG_USEC=2 s: a ping every second or so, never 2 s of silence.
        pings: list[Datagram] = []
        end = time.monotonic() + 6
        while (left := end - time.monotonic()) > 0:
            datagram = listener.receive(left)
            if datagram is not None:
                seen.append(datagram)
                if "WATCHDOG=1" in datagram.states:
                    pings.append(datagram)
        assert len(pings) >= 3, explain(f"{len(pings)} WATCHDOG=1 in 6 s with WATCHDOG_USEC=2000000")
        gaps = [b.at - a.at for a, b in zip([ready] + pings, pings)]
        # (0.25 s for this test reading a datagram later than it arrived, on a loaded machine)
        assert max(gaps) < 2.0 + 0.25, explain(f"watchdog gaps {gaps} reach the 2 s timeout")
        assert all(p.pid == node.pid for p in pings)

        node.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", timeout=30, seen=seen)
        assert stopping is not None, explain("no STOPPING=1 after SIGTERM")
        assert node.wait(60) == 0, explain(f"node exited with {node.returncode} after SIGTERM")
    finally:
        stop_process(node)
        listener.close()


def test_sdnotify_needs_only_the_standard_library():
    source = Path(sdnotify.__file__).read_text()
    imports = [line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= set(sys.stdlib_module_names) | {"__future__"}
