"""The node as a user runs it: ``appliance serve --config FILE`` in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from peers import LOOPBACK, free_port, spawn, stop_process, tail


class NodeProcess:
    """Writes a configuration, starts the node, waits until its DICOM port accepts connections."""

    def __init__(self, workdir: Path, destinations: list[dict] | None = None, extra: str = "",
                 ae_title: str = "APPLIANCE"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.metrics_port = free_port()
        self.data_dir = self.workdir / "data"
        self.config = self.workdir / "appliance.toml"
        lines = [
            "[node]", f'ae_title = "{ae_title}"', f"port = {self.port}", f'bind = "{LOOPBACK}"',
            f'data_dir = "{self.data_dir}"',
            "[metrics]", f"port = {self.metrics_port}", f'bind = "{LOOPBACK}"',
            "[delivery]", "retry_initial_seconds = 0.2", "retry_max_seconds = 1.0",
        ]
        for d in destinations or []:
            lines += ["[[destinations]]"] + [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"'
                                             for k, v in d.items()]
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.log_path = self.workdir / "node.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends
        self.process = spawn([sys.executable, "-m", "appliance", "serve", "--config", str(self.config)],
                             self.log_path, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            if "ready:" in self.log_path.read_text(errors="replace")[offset:]:
                return self  # logged after the SCP listens
            time.sleep(0.05)
        raise TimeoutError(f"node not ready after {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a power cut or the OOM killer would leave it."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        stop_process(self.process)
        return self.process.returncode

    def log(self) -> str:
        return tail(self.log_path, 80)

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.stop()
