"""Model package manifests: the bundled one loads, a broken one is refused with the key named."""

import shutil

import pytest

from appliance.manifest import BUNDLED_DIR, ManifestError, find_package, load_package


@pytest.fixture
def package(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    shutil.copy(BUNDLED_DIR / "cxr-triage" / "manifest.toml", folder)
    (folder / "model.onnx").write_bytes(b"")
    return folder


def edit(folder, old, new):
    manifest = folder / "manifest.toml"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


def test_bundled_demo_package_says_it_is_not_for_clinical_use():
    pkg = find_package("cxr-triage", [BUNDLED_DIR])
    assert pkg.task == "classification"
    assert "not for clinical use" in pkg.intended_use
    assert [o.finding.scheme for o in pkg.outputs] == ["SCT", "SCT"]
    assert all(o.threshold_critical >= o.threshold_positive for o in pkg.outputs)


@pytest.mark.parametrize("old, new, names", [
    ('threshold_positive = 0.5', 'threshold_positive = 1.5', ["outputs[0].threshold_positive", "1.5"]),
    ('threshold_critical = 0.9', 'threshold_critical = 0.1', ["threshold_critical", "below"]),
    ('device_uid = ', 'device_uid = "1.2.abc" #', ["model.device_uid", "not a DICOM UID"]),
    ('resize = "area"', 'resize = "cubic"', ["preprocessing.resize", "'cubic'", "area, bilinear"]),
    ('height = 256', 'hieght = 256', ["input.height is required"]),
    ('[applicability]', '[applicability]\nmodality = ["DX"]', ["unknown key applicability.modality"]),
    ('file = "model.onnx"', 'file = "missing.onnx"', ["model.file", "does not exist"]),
])
def test_a_broken_manifest_is_refused_naming_the_key(package, old, new, names):
    edit(package, old, new)
    with pytest.raises(ManifestError) as e:
        load_package(package)
    assert str(package / "manifest.toml") in str(e.value)
    for name in names:
        assert name in str(e.value)


def test_an_unknown_package_name_says_where_it_looked(tmp_path):
    with pytest.raises(ManifestError, match="not found in"):
        find_package("no-such-model", [tmp_path])


@pytest.mark.parametrize("old, new, names", [
    ('max_batch = 8', 'max_batch = 8\nmin_batch = 4\nopt_batch = 2', ["min_batch <= input.opt_batch", "(4, 2, 8)"]),
    ('channels = 1', 'channels = 1\nlayout = "CHW"', ["input.layout", "NCHW, NHWC"]),
    ('task = "classification"', 'task = "classification"\nprecision = "int4"', ["model.precision", "fp32, fp16, int8"]),
    ('resize = "area"', 'resize = "area"\nwindow = "dicom"', ["preprocessing.window", "'dicom'"]),
    ('"model.onnx" = "sha256:', '"model.onnx" = "md5:', ["hashes.model.onnx", "64 lower-case hex"]),
    ('task = "classification"', 'task = "segmentation"', ["outputs[0].category is required"]),
    ('factory = "export.train_cxr_triage:CxrTriageNet"\n', '', ["factory (with weights) or program"]),
    ('factory = "export.train_cxr_triage:CxrTriageNet"', 'factory = "not a factory"', ["export.factory", "package.module:function"]),
])
def test_new_manifest_keys_are_checked_and_named(package, old, new, names):
    edit(package, old, new)
    with pytest.raises(ManifestError) as e:
        load_package(package)
    for name in names:
        assert name in str(e.value)


def test_batch_range_layout_window_and_export_source_are_read(package):
    # The bundled manifest's [export] table is what `appliance export` rebuilds model.onnx from.
    edit(package, 'max_batch = 8', 'max_batch = 8\nmin_batch = 1\nopt_batch = 4\nlayout = "NHWC"')
    edit(package, 'resize = "area"', 'resize = "area"\nwindow = "voi"')
    pkg = load_package(package)
    assert (pkg.min_batch, pkg.opt_batch, pkg.max_batch, pkg.input_layout) == (1, 4, 8, "NHWC")
    assert pkg.preprocessing.window is None
    assert pkg.export.factory == "export.train_cxr_triage:CxrTriageNet" and pkg.export.opset == 17


def test_an_artefact_changed_after_export_stops_the_package(tmp_path):
    folder = tmp_path / "cxr-triage"
    shutil.copytree(BUNDLED_DIR / "cxr-triage", folder)
    load_package(folder).verify_hashes()  # as shipped
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="model.onnx has sha256:.*the file changed after export"):
        load_package(folder).verify_hashes()


def test_the_node_refuses_to_serve_a_segmentation_package_it_cannot_report_yet(tmp_path):
    from onnx import TensorProto, helper

    from appliance.config import parse
    from appliance.node import load_packages
    from segmentation_support import write_segmentation_package

    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"])], "seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 1, 1, 1], [0.0, 1.0, -1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_segmentation_package(tmp_path / "seg", model, "seg", 8, 8)
    cfg = parse({"models": {"dirs": [str(tmp_path)]},
                 "routes": [{"name": "ct", "models": ["seg"], "match": {"Modality": ["CT"]}}]})
    with pytest.raises(ManifestError, match="model.task = 'segmentation': the node serves classification"):
        load_packages(cfg)
