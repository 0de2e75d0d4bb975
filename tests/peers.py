"""Real DICOM peers for tests and benchmarks: Orthanc as a PACS, dcmtk's SCUs, dicom3tools' validator.

Nothing here is a mock. Each helper runs the tool a hospital would run, bound to 127.0.0.1, and
installs it from Debian when it is missing and we are root (CI runs on a fresh machine as root).
Under pytest a tool that cannot be had skips the test with the reason; elsewhere it raises
``ToolUnavailable``.

Import as ``from peers import ...`` from tests (tests/conftest.py puts tests/ on sys.path); a
benchmark adds tests/ to sys.path itself.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

LOOPBACK = "127.0.0.1"

# Executable -> the Debian package that provides it.
DEBIAN_PACKAGES = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dsrdump": "dcmtk",
    "dcmdump": "dcmtk",
    "Orthanc": "orthanc",
    "dciodvfy": "dicom3tools",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "systemd-analyze": "systemd",
}

# Orthanc lives in /usr/sbin, which is not on a normal user's PATH.
_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))

_apt_lock = threading.Lock()
_stopping: list[threading.Thread] = []  # Orthanc stops still in progress (Orthanc.stop(wait=False))
_apt_updated = False


class ToolUnavailable(RuntimeError):
    """A peer tool is missing and cannot be installed here."""


class PeerError(RuntimeError):
    """A peer tool ran and failed."""


def _unavailable(reason: str) -> None:
    # Inside a pytest test (setup, call or teardown) a missing peer is a skip, not an error.
    if "PYTEST_CURRENT_TEST" in os.environ:
        import pytest

        pytest.skip(reason)
    raise ToolUnavailable(reason)


def which(tool: str) -> str | None:
    """Path of ``tool`` on PATH or in the sbin folders, or None."""
    return shutil.which(tool) or shutil.which(tool, path=_SBIN)


def _apt_get(args: Sequence[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True)


def _install(packages: list[str]) -> None:
    global _apt_updated
    policy = Path("/usr/sbin/policy-rc.d")
    with _apt_lock:
        if not _apt_updated:
            done = _apt_get(["update"])
            if done.returncode != 0:
                _unavailable(f"apt-get update failed ({done.returncode}): {done.stderr.strip()[-800:]}")
            _apt_updated = True
        # Debian starts a packaged daemon on install (orthanc on 0.0.0.0:4242 and :8042, prometheus
        # on :9090). policy-rc.d answering 101 stops that; container images ship one, a bare VM
        # may not, so we put one in place for the duration of the install only.
        created_policy = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\n# written by tests/peers.py during apt-get install\nexit 101\n")
            policy.chmod(0o755)
            created_policy = True
        try:
            done = _apt_get(["install", "-y", "--no-install-recommends", *packages])
        finally:
            if created_policy:
                policy.unlink(missing_ok=True)
    if done.returncode != 0:
        _unavailable(
            f"apt-get install {' '.join(packages)} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
        )


def ensure_tools(*executables: str) -> dict[str, str]:
    """Make sure each executable exists, installing its Debian package if needed; return their paths.

    Installs only when a tool is missing and we are root, running ``apt-get update`` at most once
    per process. Otherwise skips the current pytest test, or raises ToolUnavailable, with the
    reason and the fix.
    """
    missing = [tool for tool in executables if which(tool) is None]
    if missing:
        unknown = [tool for tool in missing if tool not in DEBIAN_PACKAGES]
        if unknown:
            _unavailable(f"{', '.join(unknown)} not found, and tests/peers.py knows no Debian package for it")
        packages = sorted({DEBIAN_PACKAGES[tool] for tool in missing})
        fix = f"apt-get install -y {' '.join(packages)}"
        if os.geteuid() != 0:
            _unavailable(f"{', '.join(missing)} not installed and not root; install with: sudo {fix}")
        if which("apt-get") is None:
            _unavailable(f"{', '.join(missing)} not installed and there is no apt-get to run: {fix}")
        _install(packages)
    paths = {}
    for tool in executables:
        path = which(tool)
        if path is None:
            _unavailable(f"{tool} still missing after apt-get install {DEBIAN_PACKAGES[tool]}")
        paths[tool] = path
    return paths


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               detail: Callable[[], str] | str = "", interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true and return that; TimeoutError after
    ``timeout`` seconds, naming ``what`` and adding ``detail`` (a log tail, read at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout} s\n{detail() if callable(detail) else detail}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Linux PR_SET_PDEATHSIG: the peer gets SIGTERM when the process (thread) that started it
    # dies, so a SIGKILLed test run or benchmark leaves no Orthanc or node behind.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(args: Sequence[str], log_path: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a peer process with stdout and stderr going to ``log_path``; it dies with us."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: str | os.PathLike, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# Orthanc 1.10 cannot bind its DICOM port to one interface: DCMTK's listener binds INADDR_ANY and
# there is no configuration key for an address. Its HTTP server binds 0.0.0.0 as well, but with
# "RemoteAccessAllowed": false it answers 401 to any client that is not on loopback. For DICOM
# this filter drops every instance that arrives from an address other than 127.0.0.1 (Orthanc
# still answers such a C-STORE with Success, and answers C-ECHO), so the store holds only what
# this host sent; C-FIND/C-MOVE/C-GET are refused for unknown peers by the configuration.
_LOOPBACK_ONLY_LUA = """\
function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] == "DicomProtocol" and origin["RemoteIp"] ~= "127.0.0.1" then
    return false
  end
  return true
end
"""


@atexit.register
def _join_stopping() -> None:
    for finishing in _stopping:
        finishing.join(timeout=15)


class Orthanc:
    """An Orthanc PACS in a temporary folder, on free ports, for loopback clients only.

    ``with Orthanc() as pacs:`` starts it and waits until its REST API answers; leaving the block
    stops it and removes the folder (unless ``keep``). ``pacs.dicom_port``, ``pacs.aet``,
    ``pacs.http_port`` and ``pacs.url`` say where it is; its log is ``pacs.log_path``.
    """

    host = LOOPBACK

    def __init__(
        self,
        aet: str = "ORTHANC",
        *,
        workdir: str | os.PathLike | None = None,
        keep: bool = False,
        config: dict[str, Any] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.aet = aet
        self.keep = keep
        self.startup_timeout = startup_timeout
        self.extra_config = dict(config or {})
        self._tmp: tempfile.TemporaryDirectory | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="orthanc-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://{self.host}:{self.http_port}"
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._stop_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with (keys as in /etc/orthanc/orthanc.json)."""
        config = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [str(self.workdir / "loopback-only.lua")],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            # Loopback only (see above), so no password on the REST API.
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "SaveJobs": False,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> "Orthanc":
        exe = ensure_tools("Orthanc")["Orthanc"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "loopback-only.lua").write_text(_LOOPBACK_ONLY_LUA)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        started = time.monotonic()
        self.process = spawn([exe, str(config_path), f"--logfile={self.log_path}"], self.workdir / "orthanc.stdout")
        deadline = started + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                self._fail(f"Orthanc exited with status {self.process.returncode} during start-up")
            try:
                self.get("/system")
                break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self._fail(f"Orthanc did not answer {self.url}/system within {self.startup_timeout:.0f} s")
            time.sleep(0.01)
        self.startup_seconds = time.monotonic() - started
        return self

    def _fail(self, problem: str) -> None:
        logs = tail(self.log_path) + "\n" + tail(self.workdir / "orthanc.stdout")
        self.stop()
        raise PeerError(f"{problem}. Orthanc log:\n{logs}")

    def stop(self, wait: bool = True) -> None:
        """Stop Orthanc cleanly (SIGTERM; SIGKILL after 10 s) and remove its folder unless kept.

        Orthanc takes 2-3 s to stop (its HTTP and DICOM servers poll once a second). With
        ``wait=False`` the signal is sent now and the rest happens in a background thread that
        the interpreter joins at exit; the ports are never reused, so a test can move on.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
        if wait:
            self._finish_stop()
        else:
            finishing = threading.Thread(target=self._finish_stop, name="orthanc-stop", daemon=True)
            finishing.start()
            _stopping.append(finishing)

    def _finish_stop(self) -> None:
        with self._stop_lock:
            stop_process(self.process)
            if self._tmp is not None and not self.keep:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    # --- REST API --------------------------------------------------------------------------------

    def _request(self, path: str, body: Any = None, timeout: float = 30.0) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def get(self, path: str) -> Any:
        """GET ``path`` from the REST API and decode the JSON answer."""
        return json.loads(self._request(path))

    def post(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON to ``path`` and decode the JSON answer."""
        return json.loads(self._request(path, body))

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return self.get("/instances")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (``/instances/{id}/simplified-tags``)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file exactly as Orthanc stored it."""
        return self._request(f"/instances/{instance_id}/file")

    def find_instances(self, query: dict[str, str], expand: bool = False) -> list[Any]:
        """Instances whose main DICOM tags match ``query`` (``/tools/find``, Level Instance).

        Tags of the study and series may be queried too (StudyInstanceUID, Modality).
        """
        return self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": expand})

    def sop_instance_uids(self, modality: str | None = None) -> list[str]:
        """SOP Instance UIDs of the stored instances, of one modality if given."""
        found = self.find_instances({"Modality": modality} if modality else {}, expand=True)
        return [instance["MainDicomTags"]["SOPInstanceUID"] for instance in found]

    def wait_for_instances(self, n: int, timeout: float = 30.0, modality: str | None = None) -> list[str]:
        """Poll every 10 ms until at least ``n`` instances (of ``modality``) are stored; return their ids.

        Raises TimeoutError, with the tail of Orthanc's log, when they do not all arrive in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            ids = self.find_instances({"Modality": modality}) if modality else self.instances()
            if len(ids) >= n:
                return ids
            if time.monotonic() > deadline:
                kind = f" {modality}" if modality else ""
                raise TimeoutError(
                    f"Orthanc holds {len(ids)}{kind} instances after {timeout:.1f} s, expected {n}. "
                    f"Orthanc log:\n{self.log_tail()}"
                )
            time.sleep(0.01)


# --- dcmtk and dicom3tools ---------------------------------------------------------------------------


def _run(tool: str, args: Iterable[str], timeout: float) -> subprocess.CompletedProcess:
    exe = ensure_tools(tool)[tool]
    # DCMTK leaves Nagle's algorithm on unless told otherwise; with it on, small PDUs wait ~40 ms.
    env = dict(os.environ, TCP_NODELAY="1")
    command = [exe, *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise PeerError(
            f"{' '.join(command)} exited with status {done.returncode}:\n{done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def storescu(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    host: str,
    port: int,
    aet: str = "APPLIANCE",
    calling: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess:
    """Send ``files`` in one association with dcmtk's storescu (called AE ``aet``, calling AE ``calling``).

    Returns once the association is released. Raises PeerError with storescu's stderr when it
    fails, including a C-STORE answered with a failure status (storescu 3.6.7 exits non-zero then).
    storescu proposes only some SOP classes by default (not Comprehensive 3D SR); pass
    ``extra_args=["-R"]`` to propose exactly those of the files.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return _run("storescu", ["-aet", calling, "-aec", aet, *extra_args, host, port, *files], timeout)


def echoscu(
    host: str,
    port: int,
    aet: str = "APPLIANCE",
    calling: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    """C-ECHO ``aet`` at ``host:port`` with dcmtk's echoscu; raises PeerError if it is not answered."""
    return _run("echoscu", ["-aet", calling, "-aec", aet, *extra_args, host, port], timeout)


def dsrdump(path: str | os.PathLike, extra_args: Sequence[str] = ()) -> str:
    """dcmtk's text rendering of a structured report; raises PeerError if dcmtk cannot read it as SR."""
    return _run("dsrdump", [*extra_args, path], timeout=60.0).stdout


def dciodvfy(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Validate a DICOM file against its IOD with dicom3tools' dciodvfy; return (errors, warnings).

    Each item is one "Error - ..." or "Warning - ..." line without its severity. A file that is
    not DICOM at all gives errors ("Dicom dataset read failed"); a file that cannot be opened
    raises PeerError.
    """
    exe = ensure_tools("dciodvfy")["dciodvfy"]
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    aborts = [line for line in lines if line.startswith("Abort")]
    if aborts:
        raise PeerError(f"dciodvfy could not read {path}: {aborts[0]}")
    errors, warnings = [], []
    for line in lines:
        # Most lines start with the severity; some carry a tag before it ("(0x0009,0x0010) ? - Warning - ...").
        for severity, found in (("Error - ", errors), ("Warning - ", warnings)):
            if severity in line:
                before, _, after = line.partition(severity)
                found.append(f"{before.strip(' -?')} {after}".strip())
    return errors, warnings
