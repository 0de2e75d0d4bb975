"""export.package: the toolchain's edits keep a person's manifest and leave one the node loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import export_models as em
from appliance.manifest import BUNDLED_DIR, ManifestError, file_sha256, load_package
from appliance.uids import derived_uid
from export.package import copy_package, delete_keys, load_manifest, record, set_hashes, set_keys

SHIPPED = (BUNDLED_DIR / "cxr-triage" / "manifest.toml").read_text()


def test_set_keys_replaces_lines_in_place_and_keeps_every_comment():
    text = set_keys(SHIPPED, "model", {"version": "0.2.0"}, {"version": "bumped by a test"})
    assert 'version = "0.2.0"   # bumped by a test' in text
    assert text.count("\nversion = ") == 1
    assert [line for line in SHIPPED.splitlines() if line.startswith("#")] == \
           [line for line in text.splitlines() if line.startswith("#")]
    assert tomllib.loads(text)["model"]["name"] == "cxr-triage"


def test_set_keys_adds_a_missing_key_to_its_own_table_and_a_missing_table_at_the_end():
    text = set_keys(SHIPPED, "input", {"opt_batch": 4})
    text = set_keys(text, "engines", {"workspace_mib": 512})
    doc = tomllib.loads(text)
    assert doc["input"]["opt_batch"] == 4 and doc["input"]["max_batch"] == 8
    assert doc["engines"] == {"workspace_mib": 512}
    assert "opt_batch" not in doc["preprocessing"]


def test_set_hashes_replaces_the_table_instead_of_adding_a_second():
    once = set_hashes(SHIPPED, {"model.onnx": "sha256:" + "a" * 64}, "a test")
    twice = set_hashes(once, {"model.onnx": "sha256:" + "b" * 64, "weights.pt": "sha256:" + "c" * 64}, "a test")
    assert [line.strip() for line in twice.splitlines()].count("[hashes]") == 1
    assert tomllib.loads(twice)["hashes"] == {"model.onnx": "sha256:" + "b" * 64, "weights.pt": "sha256:" + "c" * 64}
    assert "written by a test" in twice


def test_delete_keys_removes_only_the_named_keys_of_the_named_table():
    text = delete_keys(SHIPPED, "export", ["factory", "weights", "program"])
    doc = tomllib.loads(text)
    assert doc["export"] == {"opset": 17, "atol": 0.0001, "rtol": 0.001}
    assert doc["model"]["file"] == "model.onnx" and "weights.pt" in doc["hashes"]
    assert delete_keys(text, "no-such-table", ["factory"]) == text


def test_record_derives_a_new_device_uid_and_hashes_the_artefacts(tmp_path):
    package = em.make_package(tmp_path / "pkg", "small_classifier")
    (package / "model.onnx").write_bytes(b"an onnx file")
    pkg = record(package, "a test", artefacts=["model.onnx", "weights.pt"])
    assert pkg.device_uid == derived_uid("device", file_sha256(package / "model.onnx").removeprefix("sha256:"))
    assert pkg.hashes == {"model.onnx": file_sha256(package / "model.onnx"),
                          "weights.pt": file_sha256(package / "weights.pt")}
    (package / "model.onnx").write_bytes(b"another onnx file")
    again = record(package, "a test")          # the artefacts already listed
    assert again.device_uid != pkg.device_uid and set(again.hashes) == {"model.onnx", "weights.pt"}
    load_package(package).verify_hashes()


def test_load_manifest_reads_a_package_before_its_first_export_but_no_broken_one(tmp_path):
    package = em.make_package(tmp_path / "new", None)
    with pytest.raises(ManifestError, match="does not exist"):
        load_package(package)
    pkg = load_manifest(package)
    assert pkg.path == package and pkg.input_height == em.SIZE and not (package / "model.onnx").exists()
    manifest = package / "manifest.toml"
    manifest.write_text(manifest.read_text().replace("height = ", "hieght = "))
    with pytest.raises(ManifestError, match="input.height is required"):
        load_manifest(package)


def test_copy_package_takes_the_manifest_the_card_and_only_the_named_artefacts(tmp_path):
    copy_package(BUNDLED_DIR / "cxr-triage", tmp_path / "copy", ["model.onnx"])
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["MODEL_CARD.md", "manifest.toml", "model.onnx"]
    assert load_package(tmp_path / "copy").name == "cxr-triage"


def test_the_shipped_manifest_names_its_export_source_so_one_command_rebuilds_it():
    pkg = load_package(BUNDLED_DIR / "cxr-triage")
    assert (pkg.export.factory, pkg.export.weights, pkg.export.opset) == (
        "export.train_cxr_triage:CxrTriageNet", "weights.pt", 17)
    assert Path(pkg.path / pkg.export.weights).is_file()
