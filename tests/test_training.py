"""Training the cxr-triage demonstration model: deterministic, exported faithfully, and shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from appliance.manifest import file_sha256, load_package
from appliance.preprocessing import preprocess_pixels, instance_window, modality_values
from appliance.uids import derived_uid
from export.phantoms import make_phantom, write_dicom
from export.train_cxr_triage import PACKAGE_DIR, CxrTriageNet, auc_roc, finding_for, monochrome1_for

ROOT = Path(__file__).resolve().parents[1]


def _quick_run(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "export.train_cxr_triage", "--quick", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_packages(tmp_path_factory) -> tuple[Path, Path]:
    """Two --quick runs, each in its own process and folder."""
    a, b = tmp_path_factory.mktemp("quick-a"), tmp_path_factory.mktemp("quick-b")
    _quick_run(a)
    _quick_run(b)
    return a, b


def _inputs(pkg, seeds: range, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantoms through the node's preprocessing, and their (nodule, pneumothorax) labels."""
    xs, ys = [], []
    for i, seed in enumerate(seeds):
        phantom = make_phantom(seed, size, finding_for(i), monochrome1=monochrome1_for(i))
        ds = write_dicom(phantom)
        window, function = instance_window(ds)
        xs.append(preprocess_pixels(modality_values(ds), window, str(ds.PhotometricInterpretation), pkg, function))
        ys.append(phantom.labels)
    return np.stack(xs), np.array(ys, dtype=bool)


def _run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, cam = session.run(["logits", "cam"], {"image": x})
    return {"logits": logits, "cam": cam}


def test_quick_training_twice_gives_byte_identical_weights_and_model(quick_packages):
    a, b = quick_packages
    assert (a / "weights.pt").read_bytes() == (b / "weights.pt").read_bytes()
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def test_quick_package_onnx_matches_torch(quick_packages):
    out = quick_packages[0]
    pkg = load_package(out)
    model = CxrTriageNet()
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    model.eval()
    x, _ = _inputs(pkg, range(5_000_000, 5_000_003), 256)
    with torch.no_grad():
        logits, cam = (t.numpy() for t in model(torch.from_numpy(x)))
    got = _run_onnx(out / "model.onnx", x)
    assert got["logits"].shape == (3, 2) and got["cam"].shape == (3, 2, 16, 16)
    assert np.abs(got["logits"] - logits).max() < 1e-4
    assert np.abs(got["cam"] - cam).max() < 1e-4
    # The logits are the class activation map averaged over positions.
    assert np.abs(got["cam"].mean(axis=(2, 3)) - got["logits"]).max() < 1e-5


def test_quick_package_manifest_names_its_files_by_hash_and_a_fresh_device_uid(quick_packages):
    out = quick_packages[0]
    pkg = load_package(out)
    pkg.verify_hashes()
    assert set(pkg.hashes) == {"model.onnx", "weights.pt", "export_report.json"}
    assert pkg.device_uid == derived_uid("device", file_sha256(out / "model.onnx").removeprefix("sha256:"))
    assert pkg.export.factory == "export.train_cxr_triage:CxrTriageNet" and pkg.export.weights == "weights.pt"
    assert "not for clinical use" in (out / "MODEL_CARD.md").read_text()


def test_auc_counts_ties_as_half():
    assert auc_roc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc_roc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_shipped_package_hashes_match_its_files():
    pkg = load_package(PACKAGE_DIR)
    pkg.verify_hashes()
    assert {"model.onnx", "weights.pt"} <= set(pkg.hashes)
    assert pkg.device_uid == derived_uid("device", file_sha256(PACKAGE_DIR / "model.onnx").removeprefix("sha256:"))
    assert (PACKAGE_DIR / "model.onnx").stat().st_size < 2 * 1024 * 1024


def test_shipped_model_ranks_fresh_positive_phantoms_above_negatives():
    pkg = load_package(PACKAGE_DIR)
    # Seeds neither the training nor the held-out evaluation used.
    x, y = _inputs(pkg, range(7_000_000, 7_000_040), 512)
    logits = _run_onnx(pkg.onnx_path, x)["logits"]
    for out in pkg.outputs:
        assert y[:, out.index].sum() >= 8
        assert auc_roc(logits[:, out.index], y[:, out.index]) > 0.9, out.name
