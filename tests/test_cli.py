"""The ``appliance`` command as an operator uses it: echo, push, results, and a clean SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from export.phantoms import make_phantom, write_dicom
from nodeproc import NodeProcess
from peers import LOOPBACK

pytestmark = pytest.mark.peers


def appliance(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_push_echo_and_results_show_findings_without_patient_names(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    for i, finding in enumerate((None, "nodule")):
        write_dicom(make_phantom(50 + i, size=512, finding=finding), folder / f"{i}.dcm",
                    patient_name="Doe^Jane", patient_id="PID-12345")
    with NodeProcess(tmp_path / "node") as node:
        peer = f"{node.ae_title}@{LOOPBACK}:{node.port}"
        echo = appliance("echo", peer)
        assert echo.returncode == 0, echo.stderr
        push = appliance("push", str(folder), "--to", peer)
        assert push.returncode == 0, push.stderr
        assert "sent 2 of 2" in push.stdout
        assert "2/2" in push.stderr  # progress
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = appliance("results", "--config", str(node.config), "--json")
            rows = json.loads(listed.stdout or "[]")
            if len(rows) == 2:
                break
            time.sleep(0.2)
        assert len(rows) == 2, node.log()
        table = appliance("results", "--config", str(node.config))
        assert node.stop() == 0  # SIGTERM: a clean stop
        log = node.log_path.read_text()
    assert {r["modality"] for r in rows} == {"DX"}
    assert all(r["delivered"] == "kept locally" for r in rows)
    assert {f["name"] for r in rows for f in r["findings"]} == {"nodule", "pneumothorax"}
    assert "cxr-triage" in table.stdout
    for text in (table.stdout, listed.stdout, log, push.stdout, push.stderr):
        assert "Doe^Jane" not in text and "PID-12345" not in text
    assert "stopped" in log


def test_echo_to_a_node_that_is_not_there_says_so(tmp_path):
    from peers import free_port
    done = appliance("echo", f"NOBODY@{LOOPBACK}:{free_port()}")
    assert done.returncode != 0
    assert "association not established" in done.stderr


def test_a_wrong_configuration_stops_start_up_with_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 0\n")
    done = appliance("serve", "--config", str(bad))
    assert done.returncode == 2
    assert "node.port = 0" in done.stderr


def test_models_list_and_show_name_the_package_and_catch_a_changed_file(tmp_path, capsys):
    import shutil

    from appliance.cli import main
    from appliance.manifest import BUNDLED_DIR

    assert main(["models", "show", "cxr-triage"]) == 0
    shown = capsys.readouterr().out
    assert "(27925004, SCT, \"Nodule\")" in shown and "hashes          verified" in shown
    models = tmp_path / "models"
    shutil.copytree(BUNDLED_DIR / "cxr-triage", models / "cxr-triage")
    (models / "cxr-triage" / "model.onnx").write_bytes(b"tampered")
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\ndirs = ["{models}"]\n')
    assert main(["models", "list", "--config", str(config), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "cxr-triage" and rows[0]["hashes"].startswith("MISMATCH")
    assert main(["models", "show", "cxr-triage", "--config", str(config)]) == 1
