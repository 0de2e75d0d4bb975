"""Shared fixtures: real peers (Orthanc, dcmtk) and skipping GPU tests on machines without one."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from peers import Orthanc, ensure_tools  # noqa: E402


@functools.cache
def gpu_present() -> bool:
    """True when nvidia-smi exists and lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not gpu_present():
        skip = pytest.mark.skip(reason="no NVIDIA GPU (nvidia-smi not found or reports none)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failing test that used Orthanc shows Orthanc's side of the story.
    report = yield
    pacs = getattr(item, "funcargs", {}).get("orthanc")
    if report.failed and isinstance(pacs, Orthanc):
        report.sections.append(("Orthanc log", pacs.log_tail()))
    return report


@pytest.fixture
def dcmtk() -> dict[str, str]:
    """dcmtk's storescu and echoscu, installed if missing; their paths."""
    return ensure_tools("storescu", "echoscu")


@pytest.fixture
def orthanc():
    """A fresh Orthanc (AE title ORTHANC) on free loopback ports, removed after the test."""
    ensure_tools("Orthanc")
    pacs = Orthanc().start()
    try:
        yield pacs
    finally:
        pacs.stop(wait=False)  # its 2-3 s shutdown overlaps the next test
