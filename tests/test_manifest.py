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
