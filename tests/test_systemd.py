"""The systemd units: valid, hardened to an exposure of 2.0 or lower, and not too tight for the node.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` read the unit files
without a running systemd, so these tests run in containers and CI as they run on a host. The last
test starts the real node under the same system call filter, W^X rule and address-family list
the unit asks systemd for, since a unit that blocks something the node needs would only show up
on the first hospital install.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from peers import LOOPBACK, ensure_tools, free_port, spawn, stop_process, tail

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
INSTALLED_BINARY = "/opt/appliance/.venv/bin/appliance"
MAX_EXPOSURE = 2.0


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """Path of systemd-analyze (Debian package systemd), new enough to analyse unit files offline."""
    path = ensure_tools("systemd-analyze")["systemd-analyze"]
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", version)
    if not match or int(match.group(1)) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250 or later; this is {version[:40]!r}")
    return path


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}; systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def stage_units(workdir: Path, gpu_drop_in: bool) -> Path:
    """Copies of the units whose ExecStart= binary exists, in ``workdir``/units.

    ``systemd-analyze verify`` fails a unit whose ExecStart= binary is missing, and
    /opt/appliance/.venv/bin/appliance exists only on an installed appliance. ``--root=`` cannot
    help: it would need a whole systemd installation (sysinit.target, ...) under that root. So
    the copies point ExecStart= at an executable stub; nothing else in them differs.
    """
    stub = workdir / "bin" / "appliance"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    staged = workdir / "units"
    staged.mkdir(parents=True, exist_ok=True)
    sources = [UNITS / "appliance.service", UNITS / "appliance-engines.service"]
    if gpu_drop_in:
        sources.append(UNITS / "appliance.service.d" / "gpu.conf")
    for source in sources:
        target = staged / source.relative_to(UNITS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text().replace(INSTALLED_BINARY, str(stub)))
    return staged


def exposure(systemd_analyze: str, units: Path, name: str) -> tuple[float, str]:
    """``systemd-analyze security --offline=true``'s overall exposure for one unit, and its report."""
    done = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager", f"./{name}"],
                          cwd=units, capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    match = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+(?:\.\d+)?)", report)
    assert match, f"no exposure level in systemd-analyze security's output (rc {done.returncode}):\n{report}"
    return float(match.group(1)), report


# --- the unit files -----------------------------------------------------------------------------


@pytest.mark.parametrize("gpu_drop_in", [False, True], ids=["cpu-host", "gpu-host"])
def test_units_pass_systemd_analyze_verify_without_a_warning(systemd_analyze, tmp_path, gpu_drop_in):
    units = stage_units(tmp_path, gpu_drop_in)
    done = subprocess.run([systemd_analyze, "verify", "./appliance.service", "./appliance-engines.service"],
                          cwd=units, capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    # verify exits 0 on an unknown key or a bad value and only prints it: any output is a defect.
    assert done.returncode == 0 and output == "", f"systemd-analyze verify (rc {done.returncode}):\n{output}"


def test_appliance_service_is_rated_at_an_exposure_of_two_or_lower(systemd_analyze, tmp_path):
    level, report = exposure(systemd_analyze, stage_units(tmp_path, gpu_drop_in=False), "appliance.service")
    assert level <= MAX_EXPOSURE, report


def test_the_gpu_drop_in_and_the_engine_builder_stay_at_two_or_lower(systemd_analyze, tmp_path):
    units = stage_units(tmp_path, gpu_drop_in=True)
    for name in ("appliance.service", "appliance-engines.service"):
        level, report = exposure(systemd_analyze, units, name)
        assert level <= MAX_EXPOSURE, report


def test_the_node_is_a_watched_notify_service_that_restarts_itself():
    service = unit_settings(UNITS / "appliance.service")["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{INSTALLED_BINARY} serve --config /etc/appliance/appliance.toml"]
    # The node's main loop pings every WatchdogSec/2 and turns at least once a second.
    assert int(service["WatchdogSec"][0]) >= 4
    assert service["Restart"] == ["on-failure"]
    assert service["DynamicUser"] == ["yes"]
    assert service["StateDirectory"] == ["appliance"]
    assert service["ConfigurationDirectory"] == ["appliance"]
    assert service["CapabilityBoundingSet"] == [""]
    assert "@system-service" in service["SystemCallFilter"]


def test_engines_are_built_before_the_node_and_only_on_gpu_hosts():
    node = unit_settings(UNITS / "appliance.service")["Unit"]
    engines = unit_settings(UNITS / "appliance-engines.service")
    assert "appliance-engines.service" in " ".join(node["Wants"]).split()
    assert "appliance-engines.service" in " ".join(node["After"]).split()
    assert engines["Unit"]["ConditionPathExists"] == ["/dev/nvidia0"]
    assert engines["Unit"]["Before"] == ["appliance.service"]
    assert engines["Service"]["Type"] == ["oneshot"]
    # The node's own configuration: the same routes, and engines where the node looks for them.
    node_exec = unit_settings(UNITS / "appliance.service")["Service"]["ExecStart"][0]
    config = node_exec.split("--config ", 1)[1]
    assert engines["Service"]["ExecStart"] == [f"{INSTALLED_BINARY} build-engine --all --missing-only --config {config}"]
    # The same dynamic user, so the engines it writes belong to the node.
    for key in ("User", "StateDirectory"):
        assert engines["Service"][key] == unit_settings(UNITS / "appliance.service")["Service"][key]


# --- the node under the unit's kernel-side restrictions -----------------------------------------

# Run with `python -c LAUNCHER SPEC NODE-ARGV...`. In a mount namespace of its own it makes the
# file system read-only but for the given writable paths (ProtectSystem=strict, with /tmp standing
# for PrivateTmp= and the data folder for StateDirectory=) and mounts a /proc that shows only
# processes (ProtectProc=invisible, ProcSubset=pid). Then it drops every capability
# (CapabilityBoundingSet= and AmbientCapabilities= empty), sets no_new_privs (NoNewPrivileges=yes),
# installs the seccomp filters systemd 252 (Debian 12) installs for MemoryDenyWriteExecute=,
# RestrictAddressFamilies= and SystemCallFilter= with SystemCallArchitectures=native, and execs the
# node. One filter per setting, as systemd does; the kernel applies the strictest answer of all.
# Not emulated: DynamicUser= (the interpreter here may live under /root, which only root can
# enter, so the node stays uid 0, without any capability), ProtectHome= (same reason),
# PrivateDevices=, PrivateUsers= and the cgroup-based settings.
LAUNCHER = r"""
import ctypes, ctypes.util, json, os, sys

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

def check(rc, what):
    if rc != 0:  # the sandbox cannot be built here (an unprivileged container): say so, exit 125
        err = -rc if rc < -1 else ctypes.get_errno()
        sys.stderr.write(f"launcher: {what}: {os.strerror(err)}\n")
        sys.exit(125)

last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
        "relatime": 1 << 21}
mounts = spec["mounts"]
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
if mounts["read_only"]:
    writable = [os.path.realpath(p) for p in mounts["writable"]]
    for path in writable:
        check(libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
    def under(point, roots):
        return any(point == root or point.startswith(root.rstrip("/") + "/") for root in roots)
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        if under(point, writable + ["/dev", "/proc"]) or "ro" in fields[5].split(","):
            continue
        flags = sum(KEEP.get(option, 0) for option in fields[5].split(","))
        check(libc.mount(None, point.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None),
              f"read-only {point}")
if mounts["proc_options"]:
    check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, mounts["proc_options"].encode()),
          "mount /proc")

for cap in range(last_cap + 1):
    check(libc.prctl(24, cap, 0, 0, 0), "prctl(PR_CAPBSET_DROP)")
check(libc.prctl(47, 4, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")

class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()), "capset")
check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")

seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(Cmp)]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]

for f in spec["filters"]:
    ctx = seccomp.seccomp_init(f["default"])
    for action, name, cmps in f["rules"]:
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call of this architecture (socketcall, *32, ...)
            continue
        array = (Cmp * len(cmps))(*[Cmp(*c) for c in cmps]) if cmps else None
        check(seccomp.seccomp_rule_add_array(ctx, action, nr, len(cmps), array), f"seccomp rule for {name}")
    check(seccomp.seccomp_load(ctx), "seccomp_load")

os.execv(sys.argv[2], sys.argv[2:])
"""

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 4, 5, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def scmp_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def syscall_group(systemd_analyze: str, name: str) -> set[str]:
    """The system calls in a systemd group such as ``@system-service``, nested groups expanded."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run([systemd_analyze, "syscall-filter", name], capture_output=True, text=True,
                             check=True).stdout.splitlines()[1:]
    calls: set[str] = set()
    for line in listing:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= syscall_group(systemd_analyze, entry)
    return calls


def unit_seccomp_filters(systemd_analyze: str, service: dict[str, list[str]]) -> list[dict]:
    """The unit's MemoryDenyWriteExecute=, RestrictAddressFamilies= and SystemCallFilter= as seccomp filters."""
    filters = []
    if service.get("MemoryDenyWriteExecute") == ["yes"]:
        # systemd 252 (src/shared/seccomp-util.c): no mapping both writable and executable, no
        # making memory executable afterwards, no executable SysV shared memory.
        eperm = scmp_errno(errno.EPERM)
        filters.append({"default": SCMP_ACT_ALLOW, "rules": [
            [eperm, "mmap", [[2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC]]],
            [eperm, "mprotect", [[2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
            [eperm, "pkey_mprotect", [[2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
            [eperm, "shmat", [[2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC]]],
        ]})
    families = " ".join(service.get("RestrictAddressFamilies", [])).split()
    if families:
        assert not families[0].startswith("~"), "only an allow-list of address families is emulated"
        allowed = {int(getattr(socket, name)) for name in families}
        refuse = scmp_errno(errno.EAFNOSUPPORT)
        rules = [[refuse, "socket", [[0, SCMP_CMP_EQ, family, 0]]] for family in range(64) if family not in allowed]
        rules.append([refuse, "socket", [[0, SCMP_CMP_GE, 64, 0]]])
        filters.append({"default": SCMP_ACT_ALLOW, "rules": rules})
    allowed_calls: set[str] | None = None
    for value in service.get("SystemCallFilter", []):
        if not value:
            allowed_calls = None
        elif value.startswith("~"):
            assert allowed_calls is not None, "only an allow-list of system calls is emulated"
            for group in value[1:].split():
                allowed_calls -= syscall_group(systemd_analyze, group)
        else:
            for group in value.split():
                allowed_calls = (allowed_calls or set()) | syscall_group(systemd_analyze, group)
    if allowed_calls is not None:
        error = service.get("SystemCallErrorNumber", [""])[0]
        default = scmp_errno(getattr(errno, error)) if error else SCMP_ACT_KILL_PROCESS
        # Last: from here on the launcher itself may only call what the node may call (execve).
        filters.append({"default": default, "rules": [[SCMP_ACT_ALLOW, call, []] for call in sorted(allowed_calls)]})
    return filters


PROBE = r"""
import errno, json, mmap, os, socket

def outcome(call):
    try:
        call()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "allowed"

status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "write+exec mapping": outcome(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "read+write mapping": outcome(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)),
    "netlink socket": outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()),
    "inet socket": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "unix socket": outcome(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
    "sched_setaffinity (@resources)": outcome(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "write to /etc": outcome(lambda: open("/etc/appliance-probe", "w").close()),
    "write to /tmp": outcome(lambda: os.unlink(open(f"/tmp/appliance-probe-{os.getpid()}", "w").name)),
    "/proc/cpuinfo": "visible" if os.path.exists("/proc/cpuinfo") else "hidden",
    "/proc hides other users' processes": any(
        line.split()[4] == "/proc" and "hidepid=invisible" in line.split(" - ")[1]
        for line in open("/proc/self/mountinfo")),
    "bounding set": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp filters": status.get("Seccomp_filters", "?").strip(),
}))
"""


def unit_mounts(service: dict[str, list[str]], writable: list[Path]) -> dict:
    """The unit's ProtectSystem=, PrivateTmp=, ProtectProc= and ProcSubset= for the launcher."""
    proc = []
    if service.get("ProtectProc") == ["invisible"]:
        proc.append("hidepid=invisible")
    if service.get("ProcSubset") == ["pid"]:
        proc.append("subset=pid")
    keep = [str(p) for p in writable] + (["/tmp", "/var/tmp"] if service.get("PrivateTmp") == ["yes"] else [])
    return {"read_only": service.get("ProtectSystem") == ["strict"], "writable": keep, "proc_options": ",".join(proc)}


def launch_under_unit(systemd_analyze: str, argv: list[str], writable: list[Path]) -> list[str]:
    """argv run the way appliance.service runs the node, as far as the kernel's side goes."""
    service = unit_settings(UNITS / "appliance.service")["Service"]
    spec = {"filters": unit_seccomp_filters(systemd_analyze, service), "mounts": unit_mounts(service, writable)}
    return [sys.executable, "-c", LAUNCHER, json.dumps(spec), *argv]


def test_the_emulated_unit_restrictions_really_apply(systemd_analyze, tmp_path):
    # Guards the test below: it proves something only if the launcher restricts what it should.
    if _libseccomp_missing():
        pytest.skip("libseccomp (Debian package libseccomp2) is needed to install the unit's filters")
    if os.geteuid() != 0:
        pytest.skip("dropping the capability bounding set as systemd does needs root")
    done = subprocess.run(launch_under_unit(systemd_analyze, [sys.executable, "-c", PROBE], [tmp_path]),
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 125:
        pytest.skip(f"the unit's sandbox cannot be built here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "write+exec mapping": "EPERM",
        "read+write mapping": "allowed",
        "netlink socket": "EAFNOSUPPORT",
        "inet socket": "allowed",
        "unix socket": "allowed",
        "sched_setaffinity (@resources)": "EPERM",
        "write to /etc": "EROFS",
        "write to /tmp": "allowed",
        "/proc/cpuinfo": "visible",  # ONNX Runtime reads the CPU's features there (no ProcSubset=pid)
        "/proc hides other users' processes": True,
        "bounding set": "0000000000000000",
        "no_new_privs": "1",
        "seccomp filters": "3",
    }


def _models_unavailable() -> str | None:
    from appliance.config import parse
    from appliance.node import load_packages

    try:
        load_packages(parse({}))
    except Exception as e:  # the node would exit at start-up with the same message
        return str(e)
    return None


def _libseccomp_missing() -> bool:
    import ctypes.util

    return ctypes.util.find_library("seccomp") is None


@pytest.mark.slow
def test_node_serves_and_infers_under_the_units_syscall_filter_and_write_xor_execute(systemd_analyze, tmp_path):
    """ONNX Runtime on the CPU, SQLite, pynetdicom and the sd_notify socket all work under the
    restrictions appliance.service asks for; in particular nothing maps writable and executable
    memory, so MemoryDenyWriteExecute=yes is safe."""
    from test_sdnotify import NotifySocket

    if (reason := _models_unavailable()) is not None:
        pytest.skip(f"the node cannot start without its model ({reason}); build it with `make models`")
    if _libseccomp_missing():
        pytest.skip("libseccomp (Debian package libseccomp2) is needed to install the unit's filters")
    if os.geteuid() != 0:
        pytest.skip("dropping the capability bounding set as systemd does needs root")

    service = unit_settings(UNITS / "appliance.service")["Service"]
    assert service.get("MemoryDenyWriteExecute") == ["yes"], "this test exists to back MemoryDenyWriteExecute=yes"
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[node]\nport = {port}\nbind = "{LOOPBACK}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[metrics]\nport = {metrics_port}\nbind = "{LOOPBACK}"\n')
    listener = NotifySocket()
    # The environment systemd gives a DynamicUser= service, plus the notify socket and watchdog.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/",
           "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "30000000", "PYTHONUNBUFFERED": "1"}
    for assignment in " ".join(service.get("Environment", [])).split():
        name, _, value = assignment.partition("=")
        env[name] = value
    log_path = tmp_path / "node.log"
    node = spawn(launch_under_unit(systemd_analyze, [sys.executable, "-m", "appliance", "serve", "--config",
                                                     str(config)], [tmp_path]), log_path, env=env)

    def explain(problem: str) -> str:
        return f"{problem}\nnode log:\n{tail(log_path, 80)}"

    try:
        ready = None
        deadline = time.monotonic() + 180
        while ready is None and node.poll() is None and time.monotonic() < deadline:
            ready = listener.wait_for("READY=1", timeout=1)
        if node.poll() == 125:
            pytest.skip(f"the unit's sandbox cannot be built here: {tail(log_path, 3)}")
        assert node.poll() is None, explain(
            f"node exited with {node.returncode}" + (" (SIGSYS: a system call outside the filter)"
                                                     if node.returncode == -signal.SIGSYS else ""))
        assert ready is not None, explain("no READY=1 within 180 s under the unit's filters")

        # A radiograph through the whole pipeline: C-STORE, spool, routing, ONNX Runtime, SR.
        from export.phantoms import make_phantom, write_dicom

        image = tmp_path / "cxr.dcm"
        write_dicom(make_phantom(1, size=512, finding=None), image)
        push = subprocess.run([sys.executable, "-m", "appliance", "push", "--to", f"APPLIANCE@{LOOPBACK}:{port}",
                               str(image)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, explain(f"push failed: {push.stdout}{push.stderr}")
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        inferred = re.compile(r'^appliance_inferences_total\{[^}]*outcome="success"[^}]*\} ([1-9][0-9.e+]*)$', re.M)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=5) as response:
                if inferred.search(response.read().decode()):
                    break
            assert node.poll() is None, explain(f"node exited with {node.returncode} while inferring")
            time.sleep(0.25)
        else:
            pytest.fail(explain("no successful inference within 120 s under the unit's filters"))

        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0, explain(f"node exited with {node.returncode} after SIGTERM")
        log = log_path.read_text(errors="replace")
        # With SystemCallErrorNumber=EPERM a refused call is an error the node may have swallowed; a
        # hidden /proc file or a read-only $HOME shows as a library's warning.
        for symptom in ("Operation not permitted", "PermissionError", "Address family not supported",
                        "Read-only file system", "Error in cpuinfo", "performance degradation", "telemetry"):
            assert symptom not in log, explain(f"{symptom!r} in the node's log under the unit's filters")
    finally:
        stop_process(node)
        listener.close()
