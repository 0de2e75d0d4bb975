"""`appliance quantize`: an FP16 or INT8 version of a package, checked against FP32 before it ships.

The demo classifier is quantised on generated, labelled chest phantoms at 1024 px (DICOM through
the node's own preprocessing); the report's numbers are checked against an independent run of
both packages on the same studies, and a quantisation that breaks the model is refused.  A small
segmentation package is checked by the Dice agreement of its FP32 and quantised masks.
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
from appliance.manifest import BUNDLED_DIR, file_sha256, load_package
from appliance.runtime import OnnxRuntime
from export.evaluate import auc_roc
from export.phantoms import make_phantom, write_dicom, write_labelled_set
from export.quantize import REPORT_FILE
from export.studies import binary_labels, calibration_batches, make_runtime, predict, read_labels
from segmentation_support import write_ct_slice, write_segmentation_package

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
    assert report["validation"]["labels"]["sha256"] == file_sha256(phantoms["labels"])   # which labels judged it
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


def test_a_detection_package_is_refused_as_not_supported_yet(tmp_path, capsys):
    source = tmp_path / "det"
    shutil.copytree(DEMO, source)
    manifest = source / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('task = "classification"', 'task = "detection"'))
    assert load_package(source).task == "detection"
    assert main(["quantize", str(source), "--mode", "fp16", "--out", str(tmp_path / "q"), "--force"]) == 2
    assert "detection is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# ---- segmentation: Dice agreement of the FP32 and quantised masks ---------------------------------------

ROWS, COLUMNS, SLICES = 96, 80, 3
# Layer 1: a 3x3 mean filter scaled by GAIN, above LEVEL_BRIGHT (channel 0) and below LEVEL_DARK
# (channel 1), through a ReLU; the 1x1 head turns each into a logit against a constant background.
GAIN, LEVEL_BRIGHT, LEVEL_DARK = 40.0, 0.62, 0.25


def _segmentation_package(folder: Path) -> Path:
    from onnx import TensorProto, helper

    w1 = np.zeros((2, 1, 3, 3), np.float32)
    w1[0, 0], w1[1, 0] = GAIN / 9.0, -GAIN / 9.0
    b1 = np.array([-GAIN * LEVEL_BRIGHT, GAIN * LEVEL_DARK], np.float32)
    w2 = np.zeros((3, 2, 1, 1), np.float32)
    w2[1, 0], w2[2, 1] = 2.0, 2.0
    b2 = np.array([0.0, -1.0, -1.0], np.float32)
    h, w = ROWS // 2, COLUMNS // 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="features"),
         helper.make_node("Relu", ["c1"], ["h"], name="relu"),
         helper.make_node("Conv", ["h", "w2", "b2"], ["logits"], name="head")],
        "small-seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, h, w])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_segmentation_package(folder, model, "small-seg", h, w)


def _ct_study(folder: Path, volume: np.ndarray) -> None:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for k, pixels in enumerate(volume):
        write_ct_slice(np.clip(np.rint(pixels), 0, 4095), folder / f"slice{k}.dcm", study, series, k + 1)


@pytest.fixture(scope="module")
def segmentation_set(tmp_path_factory) -> dict[str, Path]:
    """Studies of 3 CT slices with a bright and a dark disc, and calibration slices of the same kind."""
    root = tmp_path_factory.mktemp("segmentation")
    rng = np.random.default_rng(11)
    y, x = np.mgrid[:ROWS, :COLUMNS]

    def disc(lo: float, hi: float) -> np.ndarray:
        cy, cx, r = rng.uniform(20, ROWS - 20), rng.uniform(20, COLUMNS - 20), rng.uniform(lo, hi)
        return (y + 0.5 - cy) ** 2 + (x + 0.5 - cx) ** 2 <= r * r

    def slices() -> np.ndarray:
        volume = []
        for _ in range(SLICES):
            bright = disc(5, 14)
            dark = disc(4, 10) & ~bright
            volume.append(2000 + 1500 * (bright.astype(float) - dark) + rng.normal(0, 250, (ROWS, COLUMNS)))
        return np.array(volume)

    rows = []
    for s in range(6):
        _ct_study(root / "validation" / f"case{s}", slices())
        rows.append([f"case{s}"])
    labels = root / "validation" / "labels.csv"
    labels.write_text("path\n" + "".join(f"{r[0]}\n" for r in rows))
    for s in range(3):
        _ct_study(root / "calibration" / f"case{s}", slices())
    return {"package": _segmentation_package(root / "small-seg"), "validation": root / "validation",
            "labels": labels, "calibration": root / "calibration"}


def _segment(s, out: Path, mode: str, *extra: object) -> int:
    calib = ["--calibration", str(s["calibration"])] if mode == "int8" else []
    return main(["quantize", str(s["package"]), "--mode", mode, "--out", str(out), *calib,
                 "--validation", str(s["validation"]), "--labels", str(s["labels"]), *map(str, extra)])


def _mask_dice(s, package: Path) -> dict[str, list[float]]:
    """Per output, the Dice of the FP32 and the quantised package's masks per study, computed here."""
    from export.evaluate import predicted_masks

    fp32, quantized = load_package(s["package"]), load_package(package)
    studies = read_labels(s["labels"], s["validation"])
    result: dict[str, list[float]] = {o.name: [] for o in fp32.outputs}
    for a, b in zip(predict(make_runtime(fp32), studies, keep_outputs=True),
                    predict(make_runtime(quantized), studies, keep_outputs=True)):
        ma = predicted_masks(fp32, a.outputs[0], a.sources[0])
        mb = predicted_masks(fp32, b.outputs[0], b.sources[0])
        for name in result:
            x, y = np.stack(ma[name]), np.stack(mb[name])
            if x.sum() + y.sum():
                result[name].append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return result


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_a_segmentation_package_is_checked_by_dice_agreement_of_its_masks(segmentation_set, tmp_path, mode):
    out = tmp_path / f"small-seg-{mode}"
    assert _segment(segmentation_set, out, mode) == 0
    pkg = load_package(out)
    pkg.verify_hashes()
    assert pkg.precision == mode and pkg.task == "segmentation"
    report = _report(out)
    assert report["validation"]["metric"] == "dice_agreement" and report["outcome"] == "accepted"
    expected = _mask_dice(segmentation_set, out)
    for output in report["validation"]["outputs"]:
        dices = expected[output["name"]]
        assert dices and output["studies"] == len(dices)
        assert output["mean_dice"] == pytest.approx(np.mean(dices)) and output["mean_dice"] >= 0.95


def test_a_segmentation_quantisation_below_the_dice_tolerance_is_refused_naming_the_output(
        segmentation_set, tmp_path, capsys):
    assert _segment(segmentation_set, tmp_path / "first", "int8") == 0
    outputs = _report(tmp_path / "first")["validation"]["outputs"]
    worst = min(outputs, key=lambda o: o["mean_dice"])
    assert worst["mean_dice"] < 1.0   # INT8 moved some mask boundary
    # A tolerance just above what this model reaches: the same quantisation is now refused.
    tolerance = (worst["mean_dice"] + 1.0) / 2
    out = tmp_path / "second"
    assert _segment(segmentation_set, out, "int8", "--min-agreement", tolerance) == 1
    err = capsys.readouterr().err
    assert f"{worst['name']}: mean Dice between the FP32 and quantised masks" in err
    assert f"--min-agreement {tolerance:g}" in err
    assert not out.exists()


def test_an_int8_package_made_for_onnx_runtime_is_refused_by_build_engine_with_the_fix(int8_package):
    from appliance import engines

    package = load_package(int8_package)
    assert _report(int8_package)["settings"]["target"] == "onnxruntime"
    with pytest.raises(engines.EngineError, match="--target tensorrt"):
        engines.build_engine(package, int8_package / "engines", platform=None)


def test_an_nhwc_package_is_calibrated_on_its_own_layout_and_quantised(segmentation_set, tmp_path):
    """The node's kernels make NCHW and its runtime transposes for an NHWC model; calibration
    feeds the model what the runtime feeds it."""
    from onnx import TensorProto, helper

    nchw = onnx.load(segmentation_set["package"] / "model.onnx")
    h, w = ROWS // 2, COLUMNS // 2
    graph = nchw.graph
    nodes = [helper.make_node("Transpose", ["pixels"], ["image"], perm=[0, 3, 1, 2], name="to_nchw"), *graph.node]
    model = helper.make_model(
        helper.make_graph(nodes, "small-seg-nhwc",
                          [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", h, w, 1])],
                          list(graph.output), list(graph.initializer)),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    package = write_segmentation_package(tmp_path / "small-seg-nhwc", model, "small-seg-nhwc", h, w)
    manifest = package / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('name = "image"\n', 'name = "pixels"\nlayout = "NHWC"\n'))
    assert load_package(package).input_layout == "NHWC"
    nhwc = dict(segmentation_set, package=package)

    out = tmp_path / "small-seg-nhwc-int8"
    assert _segment(nhwc, out, "int8") == 0
    report = _report(out)
    assert report["outcome"] == "accepted" and report["calibration"]["images"] > 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out / "model.int8.onnx").graph.node)
    for output in report["validation"]["outputs"]:
        assert output["mean_dice"] >= 0.95


def test_the_fp16_report_names_the_layers_the_converter_leaves_in_float32(tmp_path):
    """A U-Net's upsampling (Resize) stays float32 in onnxconverter-common's float16 graph."""
    from onnx import TensorProto, helper

    from export.quantize import convert_fp16

    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["c"], name="conv"),
         helper.make_node("Resize", ["c", "", "scales"], ["up"], mode="linear", name="upsample")],
        "up", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("up", TensorProto.FLOAT, ["N", 1, 16, 16])], [w, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    settings = convert_fp16(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")
    converted = onnx.load(tmp_path / "model.fp16.onnx")
    resize = next(n for n in converted.graph.node if n.op_type == "Resize")
    cast = next(n for n in converted.graph.node if resize.input[0] in n.output)
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
    assert settings["float32_nodes"] == ["upsample"]


def test_a_quantised_model_giving_nan_for_a_study_is_refused(tmp_path):
    """A NaN (float16 overflow, say) ranks above every study in the AUC and is never positive, so
    on a positive study scored negative by FP32 neither the AUC nor the decisions would notice."""
    from export.quantize import compare, failures
    from export.studies import LabelledStudy, StudyPrediction

    pkg = load_package(DEMO)
    truth = np.array([[1, 1], [1, 0], [0, 1], [0, 0], [1, 0], [0, 1]], dtype=np.int8)
    p32 = np.array([[0.9, 0.8], [0.7, 0.2], [0.2, 0.3], [0.1, 0.1], [0.6, 0.2], [0.3, 0.7]])
    pq = p32.copy()
    pq[2, 1] = np.nan   # a positive study FP32 scores below threshold_positive
    studies = [LabelledStudy(f"s{i}.dcm", i + 2, (tmp_path / f"s{i}.dcm",), {}) for i in range(len(truth))]
    checks, used, _ = compare(pkg, [StudyPrediction(s, p) for s, p in zip(studies, p32)],
                              [StudyPrediction(s, p) for s, p in zip(studies, pq)], truth)
    assert used == 6
    pneumothorax = next(c for c in checks if c.name == "pneumothorax")
    assert pneumothorax.non_finite == 1 and pneumothorax.auc_change is None
    assert np.isfinite(pneumothorax.max_probability_difference)
    found = failures(checks, max_auc_drop=0.01, min_agreement=0.95)
    assert len(found) == 1 and found[0].startswith("pneumothorax: 1 validation studies got a probability that is not")
