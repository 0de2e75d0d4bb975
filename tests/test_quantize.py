"""`appliance quantize`: an FP16 or INT8 version of a package, checked against FP32 before it ships.

The demo classifier is quantised on generated, labelled chest phantoms at 1024 px (DICOM through
the node's own preprocessing); the report's numbers are checked against an independent run of
both packages on the same studies, and a quantisation that breaks the model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from appliance.cli import main
from appliance.manifest import BUNDLED_DIR, load_package
from appliance.runtime import OnnxRuntime
from export.evaluate import auc_roc
from export.phantoms import make_phantom, write_dicom, write_labelled_set
from export.quantize import REPORT_FILE
from export.studies import binary_labels, calibration_batches, make_runtime, predict, read_labels

DEMO = BUNDLED_DIR / "cxr-triage"
VALIDATION_STUDIES = 32
CALIBRATION_IMAGES = 12


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """Validation studies with labels; calibration images (other seeds) next to a labels file and a
    CT instance the package does not take; calibration images of one flat grey value."""
    root = tmp_path_factory.mktemp("phantoms")
    labels = write_labelled_set(root / "validation", VALIDATION_STUDIES, size=1024, seed=8_100_000)
    write_labelled_set(root / "calibration", CALIBRATION_IMAGES, size=1024, seed=8_200_000)
    write_dicom(make_phantom(8_300_000, size=1024), root / "calibration" / "ct.dcm", Modality="CT")
    (root / "flat").mkdir()
    for i in range(4):
        p = make_phantom(8_400_000 + i, size=1024)
        # The window's centre everywhere: a calibration set that shows the model nothing it reads.
        flat = dataclasses.replace(p, pixels=np.full_like(p.pixels, int(p.window_center)))
        write_dicom(flat, root / "flat" / f"{i}.dcm")
    return {"validation": root / "validation", "labels": labels, "calibration": root / "calibration",
            "flat": root / "flat"}


def _quantize(*args: object) -> int:
    return main(["quantize", str(DEMO), *map(str, args)])


def _validated(phantoms, out: Path, mode: str, calibration: str = "calibration", *extra: object) -> int:
    calib = ["--calibration", phantoms[calibration]] if mode == "int8" else []
    return _quantize("--mode", mode, "--out", out, *calib, "--validation", phantoms["validation"],
                     "--labels", phantoms["labels"], *extra)


@pytest.fixture(scope="module")
def int8_package(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "cxr-triage-int8"
    assert _validated(phantoms, out, "int8") == 0
    return out


@pytest.fixture(scope="module")
def fp16_package(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "cxr-triage-fp16"
    assert _validated(phantoms, out, "fp16") == 0
    return out


def _report(package: Path) -> dict:
    return json.loads((package / REPORT_FILE).read_text())


def _independent_check(phantoms, package: Path) -> list[dict]:
    """AUC of FP32 and of the written package, decision agreement and largest probability change,
    computed here from both packages' predictions on the validation studies."""
    fp32, quantized = load_package(DEMO), load_package(package)
    studies = read_labels(phantoms["labels"], phantoms["validation"])
    truth = binary_labels(studies, fp32)
    p32 = np.stack([p.probabilities for p in predict(make_runtime(fp32), studies)])
    pq = np.stack([p.probabilities for p in predict(make_runtime(quantized), studies)])
    return [{"name": o.name, "auc_fp32": auc_roc(p32[:, j], truth[:, j]), "auc_quantized": auc_roc(pq[:, j], truth[:, j]),
             "decision_agreement": float(np.mean((p32[:, j] >= o.threshold_positive) == (pq[:, j] >= o.threshold_positive))),
             "max_probability_difference": float(np.abs(p32[:, j] - pq[:, j]).max())}
            for j, o in enumerate(fp32.outputs)]


def _assert_report_matches(report: dict, expected: list[dict]) -> None:
    outputs = report["validation"]["outputs"]
    assert [o["name"] for o in outputs] == [e["name"] for e in expected]
    for got, want in zip(outputs, expected):
        assert got["auc_fp32"] == pytest.approx(want["auc_fp32"], abs=1e-12)
        assert got["auc_quantized"] == pytest.approx(want["auc_quantized"], abs=1e-12)
        assert got["auc_change"] == pytest.approx(want["auc_quantized"] - want["auc_fp32"], abs=1e-12)
        assert got["decision_agreement"] == pytest.approx(want["decision_agreement"])
        assert got["max_probability_difference"] == pytest.approx(want["max_probability_difference"], abs=1e-6)


@pytest.mark.slow
def test_int8_package_loads_with_verified_hashes_precision_and_a_new_device_uid(int8_package):
    source, pkg = load_package(DEMO), load_package(int8_package)
    pkg.verify_hashes()
    assert pkg.precision == "int8" and pkg.model_file == "model.int8.onnx"
    assert pkg.version == f"{source.version}+int8"
    assert pkg.device_uid != source.device_uid
    assert set(pkg.hashes) == {"model.int8.onnx", REPORT_FILE}
    assert not (int8_package / "model.onnx").exists()   # the FP32 model stays in its own package
    assert "INT8 version" in (int8_package / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_int8_graph_has_qdq_nodes_and_keeps_the_head_in_float(int8_package):
    model = onnx.load(str(int8_package / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 6
    producer = {o: n for n in model.graph.node for o in n.output}
    head = producer["cam"]   # the layer whose output is compared with threshold_positive, via its mean
    assert head.op_type == "Conv"
    weights = {i.name: i for i in model.graph.initializer}
    assert weights[head.input[1]].data_type == onnx.TensorProto.FLOAT
    feature_convs = [n for n in model.graph.node if n.op_type == "Conv" and n is not head]
    assert feature_convs and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in feature_convs)


@pytest.mark.slow
def test_int8_runs_in_the_nodes_onnx_runtime_and_its_report_is_what_the_package_does(phantoms, int8_package):
    pkg = load_package(int8_package)
    runtime = OnnxRuntime(pkg, threads=2)
    batch = next(calibration_batches(pkg, phantoms["validation"], 1))
    outputs = runtime.run(np.repeat(batch, 3, axis=0))
    assert outputs["logits"].shape == (3, 2) and outputs["cam"].shape == (3, 2, 16, 16)
    report = _report(int8_package)
    assert report["outcome"] == "accepted" and not report["forced"] and report["failures"] == []
    assert report["validation"]["studies"] == VALIDATION_STUDIES
    _assert_report_matches(report, _independent_check(phantoms, int8_package))
    for output in report["validation"]["outputs"]:
        assert output["auc_change"] >= -0.01 and output["decision_agreement"] >= 0.95   # the default tolerance


@pytest.mark.slow
def test_calibration_reads_dicom_through_the_nodes_preprocessing(phantoms, int8_package):
    report = _report(int8_package)
    # labels.csv is not DICOM and the CT instance is not a modality the package takes: both skipped.
    assert report["calibration"]["images"] == CALIBRATION_IMAGES
    inputs = np.concatenate(list(calibration_batches(load_package(DEMO), phantoms["calibration"])))
    assert len(inputs) == CALIBRATION_IMAGES
    # The input's quantisation range is the range of the preprocessed images (min-max, uint8 with a
    # zero point, 0 always representable), not of the stored pixel values (0..4095).
    lo, hi = min(float(inputs.min()), 0.0), max(float(inputs.max()), 0.0)
    model = onnx.load(str(int8_package / "model.int8.onnx"))
    quantize_input = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert float(weights[quantize_input.input[1]]) == pytest.approx((hi - lo) / 255.0, rel=1e-5)


@pytest.mark.slow
def test_fp16_package_has_float16_tensors_runs_on_onnx_runtime_and_reports_its_auc_change(phantoms, fp16_package):
    pkg = load_package(fp16_package)
    pkg.verify_hashes()
    assert pkg.precision == "fp16" and pkg.version.endswith("+fp16")
    model = onnx.load(str(fp16_package / "model.fp16.onnx"))
    types = {i.data_type for i in model.graph.initializer}
    assert types == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    runtime = OnnxRuntime(pkg, threads=2)
    assert runtime.input_dtype == np.float16
    batch = next(calibration_batches(pkg, phantoms["validation"], 1))
    assert runtime.run(batch)["logits"].dtype == np.float32   # the node's postprocessing reads float32
    report = _report(fp16_package)
    assert report["outcome"] == "accepted" and report["calibration"] is None
    _assert_report_matches(report, _independent_check(phantoms, fp16_package))


@pytest.mark.slow
def test_a_quantisation_that_misses_the_tolerance_is_refused_and_nothing_is_written(phantoms, tmp_path, capsys):
    out = tmp_path / "cxr-triage-int8"
    assert _validated(phantoms, out, "int8", "flat") == 1
    err = capsys.readouterr().err
    assert "refused, nothing written" in err and "--max-auc-drop 0.01" in err and "--force" in err
    assert "nodule: AUC" in err   # names the output that lost it
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []   # no half-written package left beside it


@pytest.mark.slow
def test_force_writes_a_failing_quantisation_with_the_failure_on_record(phantoms, tmp_path, capsys):
    out = tmp_path / "cxr-triage-int8"
    assert _validated(phantoms, out, "int8", "flat", "--force") == 0
    pkg = load_package(out)
    pkg.verify_hashes()
    assert pkg.version.endswith("+int8.forced")   # every report the node makes with it says so
    assert "FORCED" in (out / "manifest.toml").read_text()
    report = _report(out)
    assert report["outcome"] == "forced" and report["forced"]
    dropped = [o for o in report["validation"]["outputs"] if o["auc_change"] < -0.01]
    assert dropped and len(report["failures"]) >= len(dropped)
    assert "--force" in (out / "MODEL_CARD.md").read_text()


def test_an_unchecked_quantisation_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "fp16"
    assert _quantize("--mode", "fp16", "--out", out) == 1
    assert "not checked" in capsys.readouterr().err and not out.exists()
    assert _quantize("--mode", "fp16", "--out", out, "--force") == 0
    report = _report(out)
    assert report["outcome"] == "forced" and report["validation"] is None
    assert load_package(out).version.endswith("+fp16.forced")


def test_int8_without_calibration_images_is_refused_with_the_fix(tmp_path, capsys):
    assert _quantize("--mode", "int8", "--out", tmp_path / "q", "--force") == 2
    assert "needs --calibration DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _quantize("--mode", "int8", "--out", tmp_path / "q", "--force", "--calibration", tmp_path / "empty") == 2
    assert "no DICOM image there" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_an_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "manifest.toml").write_text("# someone else's package\n")
    assert _quantize("--mode", "fp16", "--out", out, "--force") == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "manifest.toml").read_text() == "# someone else's package\n"


def test_a_tampered_source_package_is_not_quantised(tmp_path, capsys):
    source = tmp_path / "cxr-triage"
    shutil.copytree(DEMO, source)
    with open(source / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["quantize", str(source), "--mode", "fp16", "--out", str(tmp_path / "q"), "--force"]) == 2
    assert "the file changed after export" in capsys.readouterr().err


def test_a_segmentation_package_is_refused_as_not_supported_yet(tmp_path, capsys):
    source = tmp_path / "seg"
    shutil.copytree(DEMO, source)
    manifest = source / "manifest.toml"
    category = '\ncategory = { value = "49755003", scheme = "SCT", meaning = "Morphologically abnormal structure" }'
    text = manifest.read_text().replace('task = "classification"', 'task = "segmentation"')
    manifest.write_text(text.replace("threshold_critical = 0.9", "threshold_critical = 0.9" + category)
                        .replace("threshold_critical = 0.8", "threshold_critical = 0.8" + category))
    assert load_package(source).task == "segmentation"
    assert main(["quantize", str(source), "--mode", "fp16", "--out", str(tmp_path / "q"), "--force"]) == 2
    assert "not supported yet" in capsys.readouterr().err
