"""`appliance evaluate`: a site's ML team measures a model package on its own labelled studies.

The numbers are checked against independent implementations: scikit-learn for the confusion
matrix, AUC and the proportions, scipy for the Wilson intervals, the pairwise definition and a
bootstrap for DeLong's variance, and torch (not the node's kernels) for the segmentation chain.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.manifest import BUNDLED_DIR
from export.evaluate import delong, delong_interval, wilson_interval
from export.phantoms import make_phantom, write_dicom
from segmentation_support import write_ct_slice, write_segmentation_package

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINDINGS = (None, "nodule", "pneumothorax", "nodule+pneumothorax")
STUDIES = 36


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_labels(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cxr_evaluation(tmp_path_factory):
    """36 labelled 1024-px chest phantoms (one a folder, some MONOCHROME1) and a CT instance the
    package cannot take, evaluated once through the CLI with an extra threshold."""
    root = tmp_path_factory.mktemp("cxr")
    studies = root / "studies"
    studies.mkdir()
    rows = []
    for i in range(STUDIES):
        phantom = make_phantom(7100 + i, 1024, FINDINGS[i % 4], monochrome1=i % 5 == 0)
        name = f"study{i:02d}.dcm"
        if i == 3:  # a study given as a folder
            (studies / "study03").mkdir()
            name = "study03"
            write_dicom(phantom, studies / name / "image.dcm")
        else:
            write_dicom(phantom, studies / name)
        nodule, pneumothorax = phantom.labels
        rows.append([name, "1" if nodule else "0", "yes" if pneumothorax else "no"])
    write_dicom(make_phantom(7999, 256, None), studies / "ct.dcm", Modality="CT")
    rows.append(["ct.dcm", "0", "0"])
    labels = _write_labels(root / "labels.csv", ["path", "nodule", "pneumothorax"], rows)
    out = root / "out"
    code = main(["evaluate", "cxr-triage", "--studies", str(studies), "--labels", str(labels),
                 "--out", str(out), "--threshold", "0.3"])
    assert code == 0
    return {"out": out, "labels": labels, "metrics": json.loads((out / "metrics.json").read_text()),
            "predictions": _read_csv(out / "predictions.csv")}


def _evaluated(result, output: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in result["predictions"] if r["status"] == "evaluated"]
    return (np.array([int(r[f"{output}_label"]) for r in rows]),
            np.array([float(r[f"{output}_probability"]) for r in rows]))


@pytest.mark.slow
def test_evaluation_writes_metrics_and_real_png_plots_per_output(cxr_evaluation):
    from PIL import Image

    out, metrics = cxr_evaluation["out"], cxr_evaluation["metrics"]
    for name in ("nodule", "pneumothorax"):
        for plot in (f"roc_{name}.png", f"calibration_{name}.png"):
            data = (out / plot).read_bytes()
            assert data[:8] == PNG_SIGNATURE, plot
            assert len(data) > 10_000, plot  # curves, axes and labels, not an empty canvas
            with Image.open(out / plot) as image:
                assert image.format == "PNG"
                assert image.width >= 400 and image.height >= 400, (plot, image.size)
    assert metrics["package"]["name"] == "cxr-triage"
    assert metrics["package"]["version"] == "0.1.0"
    assert metrics["package"]["device_uid"].startswith("2.25.")
    assert metrics["package"]["precision"] == "fp32"
    digest = hashlib.sha256(cxr_evaluation["labels"].read_bytes()).hexdigest()
    assert metrics["labels"]["sha256"] == f"sha256:{digest}"
    assert datetime.fromisoformat(metrics["date"]).tzinfo is not None
    assert [o["name"] for o in metrics["outputs"]] == ["nodule", "pneumothorax"]


@pytest.mark.slow
def test_a_study_the_package_cannot_take_is_excluded_and_counted(cxr_evaluation):
    studies = cxr_evaluation["metrics"]["studies"]
    assert studies == {"listed": STUDIES + 1, "evaluated": STUDIES, "excluded": 1,
                       "excluded_by_reason": {"modality": 1}}
    ct = [r for r in cxr_evaluation["predictions"] if r["path"] == "ct.dcm"]
    assert ct[0]["status"] == "excluded: modality" and ct[0]["nodule_probability"] == ""
    for output in cxr_evaluation["metrics"]["outputs"]:
        assert output["positives"] + output["negatives"] == STUDIES


@pytest.mark.slow
def test_outputs_name_studies_only_by_the_sites_keys_never_the_patient(cxr_evaluation):
    keys = {r["path"] for r in cxr_evaluation["predictions"]}
    assert keys == {f"study{i:02d}.dcm" for i in range(STUDIES) if i != 3} | {"study03", "ct.dcm"}
    for path in cxr_evaluation["out"].iterdir():
        if path.suffix in (".json", ".csv"):
            assert "PHANTOM" not in path.read_text(), path.name  # PatientName / PatientID of the phantoms


@pytest.mark.slow
@pytest.mark.parametrize("output", ["nodule", "pneumothorax"])
def test_metrics_equal_scikit_learn_on_the_same_predictions(cxr_evaluation, output):
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_score, recall_score,
                                 roc_auc_score)

    truth, probability = _evaluated(cxr_evaluation, output)
    reported = next(o for o in cxr_evaluation["metrics"]["outputs"] if o["name"] == output)
    assert reported["auc"]["value"] == pytest.approx(roc_auc_score(truth, probability), abs=1e-12)
    assert reported["prevalence"]["value"] == pytest.approx(truth.mean())
    assert [p["threshold"] for p in reported["operating_points"]] == [0.5, 0.3]
    for point in reported["operating_points"]:
        predicted = (probability >= point["threshold"]).astype(int)
        tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[0, 1]).ravel()
        assert point["confusion_matrix"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        assert point["accuracy"]["value"] == pytest.approx(accuracy_score(truth, predicted))
        assert point["sensitivity"]["value"] == pytest.approx(recall_score(truth, predicted))
        assert point["specificity"]["value"] == pytest.approx(recall_score(truth, predicted, pos_label=0))
        if tp + fp:
            assert point["precision"]["value"] == pytest.approx(precision_score(truth, predicted))
        else:
            assert point["precision"]["value"] is None  # no positive call: PPV undefined, not 0
        assert point["npv"]["value"] == pytest.approx(precision_score(truth, predicted, pos_label=0))
        assert point["f1"]["value"] == pytest.approx(f1_score(truth, predicted))


@pytest.mark.slow
def test_reported_intervals_are_wilson_and_delong_computed_independently(cxr_evaluation):
    from scipy.stats import binomtest

    for output in cxr_evaluation["metrics"]["outputs"]:
        for point in output["operating_points"]:
            for name in ("accuracy", "sensitivity", "specificity", "precision", "npv"):
                m = point[name]
                if m["denominator"] == 0:
                    assert m["ci95"] is None
                    continue
                ci = binomtest(m["numerator"], m["denominator"]).proportion_ci(0.95, method="wilson")
                assert m["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9), (output["name"], name)
        truth, probability = _evaluated(cxr_evaluation, output["name"])
        positives, negatives = probability[truth == 1], probability[truth == 0]
        psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
        variance = psi.mean(1).var(ddof=1) / len(positives) + psi.mean(0).var(ddof=1) / len(negatives)
        assert output["auc"]["standard_error"] == pytest.approx(np.sqrt(variance), abs=1e-12)
        low, high = output["auc"]["ci95"]
        assert low <= output["auc"]["value"] <= high


def test_wilson_interval_matches_scipy_including_all_and_none():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (10, 10), (3, 7), (1, 1), (45, 50), (0, 1)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)
    assert wilson_interval(0, 0) is None


def test_delong_variance_on_a_hand_checked_example():
    # Positives 0.35 and 0.8, negatives 0.1 and 0.4.  Each positive's share of negatives below it:
    # 0.5 and 1; each negative's share of positives above it: 1 and 0.5.  AUC 0.75; both sample
    # variances are 0.125, so var = 0.125 / 2 + 0.125 / 2 = 0.125.
    auc, variance = delong(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert auc == 0.75
    assert variance == pytest.approx(0.125, abs=1e-15)
    low, high = delong_interval(auc, variance)
    assert (low, high) == pytest.approx((0.75 - 1.959963984540054 * 0.125 ** 0.5, 1.0))


def test_delong_counts_ties_as_half_as_the_pairwise_definition_does():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    labels = (rng.random(60) < 0.4).astype(int)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    auc, variance = delong(scores, labels)
    assert auc == pytest.approx(psi.mean(), abs=1e-12)
    assert variance == pytest.approx(psi.mean(1).var(ddof=1) / len(positives)
                                     + psi.mean(0).var(ddof=1) / len(negatives), abs=1e-12)


def test_delong_standard_error_agrees_with_a_stratified_bootstrap():
    rng = np.random.default_rng(11)
    labels = np.r_[np.ones(120, int), np.zeros(180, int)]
    scores = rng.normal(labels * 1.2, 1.0)
    _, variance = delong(scores, labels)
    # Resampling positives and negatives separately keeps the prevalence, as DeLong's variance does.
    wins = (scores[labels == 1][:, None] > scores[labels == 0][None, :]).astype(np.float64)
    aucs = [wins[np.ix_(rng.integers(0, 120, 120), rng.integers(0, 180, 180))].mean() for _ in range(1000)]
    assert np.sqrt(variance) == pytest.approx(np.std(aucs, ddof=1), rel=0.12)


def test_a_constant_output_is_not_reported_as_perfectly_separating_the_classes():
    from appliance.manifest import load_package
    from export.evaluate import classification_metrics

    pkg = load_package(BUNDLED_DIR / "cxr-triage")
    truth = np.array([[1, 1], [1, 0], [0, 1], [0, 0], [1, 0], [0, 1]])
    # A sigmoid saturated at 1.0 for nodule; pneumothorax ranked without error.
    probabilities = np.stack([np.ones(6), np.where(truth[:, 1] == 1, 0.9, 0.1)], axis=1)
    nodule, pneumothorax = classification_metrics(pkg, probabilities, truth, None)
    assert nodule["auc"]["value"] == 0.5
    assert "separated" not in nodule["auc"]["note"] and "does not rank" in nodule["auc"]["note"]
    assert pneumothorax["auc"]["value"] == 1.0 and "perfectly separated" in pneumothorax["auc"]["note"]


@pytest.fixture
def two_phantoms(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(2):
        write_dicom(make_phantom(7200 + i, 64, None), studies / f"s{i}.dcm")
    return studies


def test_a_bad_label_is_refused_naming_line_and_column(tmp_path, two_phantoms, capsys):
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "pneumothorax"],
                           [["s0.dcm", "0", "1"], ["s1.dcm", "1", "maybe"]])
    code = main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("appliance: ") and "labels.csv" in err
    assert "line 3" in err and "column pneumothorax" in err and "'maybe'" in err


def test_a_labels_file_naming_a_missing_study_or_column_is_refused(tmp_path, two_phantoms, capsys):
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "pneumothorax"],
                           [["s0.dcm", "0", "1"], ["s9.dcm", "1", "0"]])
    assert main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "line 3" in capsys.readouterr().err
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule"], [["s0.dcm", "0"]])
    assert main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "no column 'pneumothorax'" in capsys.readouterr().err


def test_a_labels_file_saved_by_a_spreadsheet_with_a_byte_order_mark_and_spaced_header_is_read(
        tmp_path, two_phantoms, capsys):
    labels = tmp_path / "labels.csv"
    # Excel's "CSV UTF-8" starts with a byte order mark; people type "path, nodule".
    labels.write_text("\ufeffpath, nodule , pneumothorax\r\ns0.dcm,0,1\r\ns1.dcm,1,0\r\n", encoding="utf-8")
    code = main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["labels"]["key"] == "path"
    assert report["studies"]["evaluated"] == 2
    assert {o["name"]: o["positives"] for o in report["outputs"]} == {"nodule": 1, "pneumothorax": 1}


def test_an_error_names_the_line_of_the_file_even_after_a_blank_line(tmp_path, two_phantoms, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,nodule,pneumothorax\ns0.dcm,0,1\n\ns1.dcm,1,maybe\n")
    assert main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "line 4, column pneumothorax" in capsys.readouterr().err


def test_one_study_named_twice_in_two_spellings_is_refused(tmp_path, two_phantoms, capsys):
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "pneumothorax"],
                           [["s0.dcm", "0", "1"], ["./s0.dcm", "0", "1"]])
    assert main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "line 3" in capsys.readouterr().err
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "nodule", "pneumothorax"],
                           [["s0.dcm", "0", "1", "1"]])
    assert main(["evaluate", "cxr-triage", "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "'nodule' more than once" in capsys.readouterr().err


def test_a_model_giving_nan_is_refused_rather_than_measured(tmp_path, two_phantoms, capsys):
    from onnx import TensorProto, helper, numpy_helper

    package = tmp_path / "nan-model"
    package.mkdir()
    # nodule's logit is sqrt of a negative number: NaN on every image; pneumothorax's is finite.
    sign = numpy_helper.from_array(np.array([[-1.0, 1.0]], np.float32), "sign")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Abs", ["flat"], ["magnitude"]),
         helper.make_node("Add", ["magnitude", "one"], ["positive"]),
         helper.make_node("Mul", ["positive", "sign"], ["signed"]),
         helper.make_node("Sqrt", ["signed"], ["logits"])],
        "nan", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 256, 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [sign, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = package / "model.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    manifest = (BUNDLED_DIR / "cxr-triage" / "manifest.toml").read_text()
    manifest = manifest.replace('heatmap_tensor = "cam"\n', "")
    manifest = manifest[:manifest.index("\n[hashes]\n") + 1] + (
        f'[hashes]\n"model.onnx" = "sha256:{hashlib.sha256(onnx_path.read_bytes()).hexdigest()}"\n')
    (package / "manifest.toml").write_text(manifest)
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "pneumothorax"],
                           [["s0.dcm", "0", "1"], ["s1.dcm", "1", "0"]])
    out = tmp_path / "out"
    code = main(["evaluate", str(package), "--studies", str(two_phantoms), "--labels", str(labels), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "not a number (NaN or infinite) for 2 of the 2 studies" in err and "line 2 (s0.dcm)" in err
    assert not out.exists()


def test_a_detection_package_is_refused_plainly(tmp_path, two_phantoms, capsys):
    package = tmp_path / "detector"
    shutil.copytree(BUNDLED_DIR / "cxr-triage", package)
    manifest = package / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('task = "classification"', 'task = "detection"'))
    labels = _write_labels(tmp_path / "labels.csv", ["path", "nodule", "pneumothorax"], [["s0.dcm", "0", "1"]])
    assert main(["evaluate", str(package), "--studies", str(two_phantoms), "--labels", str(labels)]) == 2
    assert "not supported yet" in capsys.readouterr().err


# ---- segmentation ---------------------------------------------------------------------------------------

ROWS, COLUMNS, SLICES = 96, 80, 3
SPACING_MM, THICKNESS_MM = 0.8, 2.5
# A 3x3 mean filter scaled by GAIN: channel 1 (bright structure) rises above LEVEL_BRIGHT, channel 2
# (dark structure) below LEVEL_DARK; channel 0 (background) is a constant 0 logit.
GAIN, LEVEL_BRIGHT, LEVEL_DARK = 40.0, 0.62, 0.25


def _segmentation_package(folder: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 1, 3, 3), np.float32)
    weights[1, 0] = GAIN / 9.0
    weights[2, 0] = -GAIN / 9.0
    bias = np.array([0.0, -GAIN * LEVEL_BRIGHT, GAIN * LEVEL_DARK], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1])],
        "tiny-seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, ROWS // 2, COLUMNS // 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, ROWS // 2, COLUMNS // 2])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_segmentation_package(folder, model, "tiny-seg", ROWS // 2, COLUMNS // 2)


def _ct_slice(pixels: np.ndarray, path: Path, study: str, series: str, instance: int) -> None:
    write_ct_slice(pixels, path, study, series, instance, PatientName="SEGMENTATION^PHANTOM",
                   PixelSpacing=[SPACING_MM, SPACING_MM], SliceThickness=THICKNESS_MM)


def _disk(rng, rows, columns, lo, hi):
    cy, cx, r = rng.uniform(20, rows - 20), rng.uniform(20, columns - 20), rng.uniform(lo, hi)
    y, x = np.mgrid[:rows, :columns]
    return (y + 0.5 - cy) ** 2 + (x + 0.5 - cx) ** 2 <= r * r


def _expected_masks(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The package's masks by an independent route: torch's area and bilinear resampling."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(volume.astype(np.float32))
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo))[:, None]                        # no window: the image's own range
    x = F.avg_pool2d(x, 2)                                     # area resize to half size
    w = torch.zeros(3, 1, 3, 3)
    w[1], w[2] = GAIN / 9.0, -GAIN / 9.0
    b = torch.tensor([0.0, -GAIN * LEVEL_BRIGHT, GAIN * LEVEL_DARK])
    p = torch.softmax(F.conv2d(x, w, b, padding=1), dim=1)
    p = F.interpolate(p, size=(ROWS, COLUMNS), mode="bilinear", align_corners=False)
    return {"bright": (p[:, 1] >= 0.5).numpy(), "dark": (p[:, 2] >= 0.5).numpy()}


@pytest.fixture(scope="module")
def segmentation_set(tmp_path_factory):
    """Six 3-slice CT studies with a bright and a dark structure, label maps as .npy/.npz, files
    written in the reverse of Instance Number order."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("seg")
    package = _segmentation_package(root / "tiny-seg")
    rng = np.random.default_rng(5)
    rows, expected, uids = [], [], []
    for s in range(6):
        folder = root / "studies" / f"case{s}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        volume = np.zeros((SLICES, ROWS, COLUMNS))
        label_map = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
        for k in range(SLICES):
            bright = _disk(rng, ROWS, COLUMNS, 4, 14)
            dark = _disk(rng, ROWS, COLUMNS, 3, 10) & ~bright if s != 4 else np.zeros_like(bright)
            volume[k] = 2000 + 1500 * bright - 1500 * dark + rng.normal(0, 250, (ROWS, COLUMNS))
            label_map[k][bright], label_map[k][dark] = 1, 2
        volume = np.clip(np.rint(volume), 0, 4095)
        for k in range(SLICES):  # file slice0.dcm holds the last instance
            _ct_slice(volume[k], folder / f"slice{SLICES - 1 - k}.dcm", study, series, k + 1)
        mask = f"masks/case{s}.{'npz' if s == 2 else 'npy'}"
        (root / "masks").mkdir(exist_ok=True)
        if s == 2:
            np.savez(root / mask, mask=label_map)
        else:
            np.save(root / mask, label_map)
        rows.append([f"case{s}", mask])
        expected.append((_expected_masks(volume), label_map))
        uids.append(study)
    labels = _write_labels(root / "labels.csv", ["path", "mask"], rows)
    return {"root": root, "package": package, "labels": labels, "expected": expected, "uids": uids}


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = a.sum() + b.sum()
    return None if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def test_segmentation_dice_and_volumes_match_an_independent_computation(segmentation_set, capsys):
    s = segmentation_set
    out = s["root"] / "out"
    code = main(["evaluate", str(s["package"]), "--studies", str(s["root"] / "studies"),
                 "--labels", str(s["labels"]), "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["outputs"] == metrics["outputs"]
    assert metrics["studies"]["evaluated"] == 6
    rows = _read_csv(out / "predictions.csv")
    voxel_ml = SPACING_MM * SPACING_MM * THICKNESS_MM / 1000.0
    for output, value in (("bright", 1), ("dark", 2)):
        dices, relative = [], []
        for row, (predicted, label_map) in zip(rows, s["expected"]):
            reference = label_map == value
            expected = _dice(predicted[output], reference)
            if expected is None:
                assert row[f"{output}_dice"] == ""
            else:
                assert float(row[f"{output}_dice"]) == pytest.approx(expected, abs=2e-3), (row["path"], output)
                dices.append(expected)
            assert row[f"{output}_unit"] == "mL"
            assert float(row[f"{output}_reference_size"]) == pytest.approx(reference.sum() * voxel_ml)
            assert float(row[f"{output}_predicted_size"]) == pytest.approx(predicted[output].sum() * voxel_ml,
                                                                           rel=0.01)
            if reference.any():
                relative.append(predicted[output].sum() / reference.sum() - 1.0)
        reported = next(o for o in metrics["outputs"] if o["name"] == output)
        assert 0.3 < np.mean(dices) < 0.99  # a real, imperfect segmentation: the check can fail both ways
        assert reported["dice"]["n"] == len(dices)
        assert reported["dice"]["mean"] == pytest.approx(np.mean(dices), abs=2e-3)
        assert reported["dice"]["median"] == pytest.approx(np.median(dices), abs=2e-3)
        low, high = reported["dice"]["ci95"]
        assert min(dices) <= low <= reported["dice"]["mean"] <= high <= max(dices)
        assert reported["relative_volume_error"]["mean"] == pytest.approx(np.mean(relative), abs=0.01)
        assert reported["absolute_volume_error"]["unit"] == "mL"
    dark = next(o for o in metrics["outputs"] if o["name"] == "dark")
    assert dark["empty_in_both"] + dark["empty_reference_marked_by_model"] == 1  # case4 has no dark structure


def test_a_mask_of_the_wrong_shape_is_refused_naming_line_and_file(segmentation_set, tmp_path, capsys):
    s = segmentation_set
    np.save(tmp_path / "small.npy", np.zeros((SLICES, ROWS, COLUMNS - 1), np.uint8))
    labels = _write_labels(tmp_path / "labels.csv", ["path", "mask"], [["case0", "small.npy"]])
    code = main(["evaluate", str(s["package"]), "--studies", str(s["root"] / "studies"), "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 2, column mask" in err and "small.npy" in err and f"{ROWS}x{COLUMNS}" in err


def test_a_single_image_study_with_a_png_label_map_reports_area_in_mm2(segmentation_set, tmp_path, capsys):
    from PIL import Image
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(8)
    bright = _disk(rng, ROWS, COLUMNS, 8, 14)
    image = np.clip(np.rint(2000 + 1500 * bright + rng.normal(0, 250, (ROWS, COLUMNS))), 0, 4095)
    (tmp_path / "studies").mkdir()
    _ct_slice(image, tmp_path / "studies" / "one.dcm", generate_uid(), generate_uid(), 1)
    Image.fromarray(bright.astype(np.uint8)).save(tmp_path / "one.png")
    labels = _write_labels(tmp_path / "labels.csv", ["path", "mask", "mask_dark"],
                           [["one.dcm", "one.png", "one.png"]])
    code = main(["evaluate", str(segmentation_set["package"]), "--studies", str(tmp_path / "studies"),
                 "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert code == 0
    row = _read_csv(tmp_path / "out" / "predictions.csv")[0]
    predicted = _expected_masks(image[None])["bright"][0]
    assert float(row["bright_dice"]) == pytest.approx(_dice(predicted, bright), abs=2e-3)
    assert row["bright_unit"] == "mm2"
    assert float(row["bright_reference_size"]) == pytest.approx(bright.sum() * SPACING_MM ** 2, rel=1e-5)
    # mask_dark is a binary mask: the bright disk, which the dark output does not find.
    assert float(row["dark_dice"]) == 0.0
    assert "bright (threshold 0.5): Dice mean" in capsys.readouterr().out


def test_a_package_named_on_the_search_path_and_studies_keyed_by_study_uid(segmentation_set, tmp_path):
    s = segmentation_set
    config = tmp_path / "appliance.toml"
    config.write_text(f"[models]\ndirs = [{json.dumps(str(s['root']))}]\n")
    labels = _write_labels(tmp_path / "labels.csv", ["study_instance_uid", "mask"],
                           [[uid, str(s["root"] / "masks" / f"case{k}.npy")] for k, uid in enumerate(s["uids"][:2])])
    code = main(["evaluate", "tiny-seg", "--config", str(config), "--studies", str(s["root"] / "studies"),
                 "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert code == 0
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert [r["study_instance_uid"] for r in rows] == s["uids"][:2]
    for row, (predicted, label_map) in zip(rows, s["expected"]):
        assert float(row["bright_dice"]) == pytest.approx(_dice(predicted["bright"], label_map == 1), abs=2e-3)


def test_volume_of_an_overlapping_ct_reconstruction_uses_the_distance_between_slices(segmentation_set, tmp_path):
    """2.5 mm slices reconstructed every 1.25 mm, as CT often is, without Spacing Between Slices:
    a voxel stands for 1.25 mm of the volume, not its 2.5 mm Slice Thickness."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(9)
    study, series = generate_uid(), generate_uid()
    (tmp_path / "studies" / "overlap").mkdir(parents=True)
    label_map = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
    for k in range(SLICES):
        bright = _disk(rng, ROWS, COLUMNS, 8, 14)
        label_map[k][bright] = 1
        pixels = np.clip(np.rint(2000 + 1500 * bright + rng.normal(0, 250, (ROWS, COLUMNS))), 0, 4095)
        # Head first, the table moving out: Image Position's z falls as Instance Number rises.
        write_ct_slice(pixels, tmp_path / "studies" / "overlap" / f"{k}.dcm", study, series, k + 1,
                       PixelSpacing=[SPACING_MM, SPACING_MM], SliceThickness=THICKNESS_MM,
                       ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-40, -30, -100 - 1.25 * k])
    np.save(tmp_path / "overlap.npy", label_map)
    labels = _write_labels(tmp_path / "labels.csv", ["path", "mask"], [["overlap", "overlap.npy"]])
    code = main(["evaluate", str(segmentation_set["package"]), "--studies", str(tmp_path / "studies"),
                 "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert code == 0
    row = _read_csv(tmp_path / "out" / "predictions.csv")[0]
    assert row["bright_unit"] == "mL"
    assert float(row["bright_reference_size"]) == pytest.approx((label_map == 1).sum() * SPACING_MM ** 2 * 1.25 / 1000)


def test_a_label_map_cannot_stand_for_two_outputs_on_the_same_channel(segmentation_set, tmp_path, capsys):
    """Two sigmoid tensors each with a structure in channel 1: value 1 of a label map would be
    both, so one output would be scored against the other's structure."""
    package = tmp_path / "two-heads"
    shutil.copytree(segmentation_set["package"], package)
    manifest = package / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("index = 2", "index = 1"))
    labels = _write_labels(tmp_path / "labels.csv", ["path", "mask"],
                           [["case0", str(segmentation_set["root"] / "masks" / "case0.npy")]])
    code = main(["evaluate", str(package), "--studies", str(segmentation_set["root"] / "studies"),
                 "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "line 2, column mask: outputs bright, dark are all channel 1" in err and "mask_<output name>" in err
    # With a binary mask of its own for one of them, the label map serves the other.
    np.save(tmp_path / "dark.npy", np.zeros((SLICES, ROWS, COLUMNS), np.uint8))
    labels = _write_labels(tmp_path / "labels.csv", ["path", "mask", "mask_dark"],
                           [["case0", str(segmentation_set["root"] / "masks" / "case0.npy"), "dark.npy"]])
    assert main(["evaluate", str(package), "--studies", str(segmentation_set["root"] / "studies"),
                 "--labels", str(labels)]) == 0
