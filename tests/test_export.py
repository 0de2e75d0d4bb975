"""`appliance export`: PyTorch to ONNX in a model package, proven against PyTorch before it is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export_models as em
from appliance.cli import main
from appliance.manifest import file_sha256, load_package
from appliance.runtime import OnnxRuntime
from appliance.uids import derived_uid
from export.phantoms import make_phantom, write_dicom


def export(package: Path, *args: str) -> int:
    return main(["export", str(package), *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fresh_inputs(batch: int, size: int = em.SIZE) -> np.ndarray:
    return np.random.default_rng(7).normal(0, 1, (batch, 1, size, size)).astype(np.float32)


def assert_exported(package: Path, factory: str) -> None:
    """What a user relies on after an export: the package loads, its hashes hold, its device UID
    is the model file's, and [export] records the source so that a re-export is one command."""
    pkg = load_package(package)
    pkg.verify_hashes()
    assert pkg.device_uid != "2.25.1"
    assert pkg.device_uid == derived_uid("device", file_sha256(pkg.onnx_path).removeprefix("sha256:"))
    assert set(pkg.hashes) == {"model.onnx", "weights.pt", "export_report.json"}
    assert (pkg.export.factory, pkg.export.weights, pkg.export.opset) == (f"export_models:{factory}", "weights.pt", 18)
    model = onnx.load(str(pkg.onnx_path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is free
    report = json.loads((package / "export_report.json").read_text())
    assert sorted({p["batch"] for p in report["parity"]}) == [1, 2, em.MAX_BATCH]
    assert all(p["max_abs_diff"] <= 1e-4 + 1e-3 * p["max_abs_reference"] for p in report["parity"])


@pytest.mark.slow
def test_a_monai_densenet_classifier_exports_through_the_cli_and_matches_torch_at_any_batch(tmp_path, capsys):
    # 32 x 32: DenseNet-121's five poolings leave 1 x 1, and the test stays quick on two cores.
    package = em.make_package(tmp_path / "densenet", "densenet", size=32)
    assert export(package, "--factory", "export_models:densenet", "--weights", str(package / "weights.pt")) == 0
    printed = capsys.readouterr().out
    assert "parity batch 1" in printed and f"parity batch {em.MAX_BATCH}" in printed and "logits" in printed
    assert_exported(package, "densenet")
    # A batch size the parity check did not use, through the node's own runtime.
    x = fresh_inputs(3, size=32)
    with torch.no_grad():
        expected = em.densenet()(torch.from_numpy(x)).numpy()
    got = OnnxRuntime(load_package(package)).run(x)["logits"]
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_a_monai_unet_segmenter_exports_with_parity_on_studies_from_a_folder(tmp_path, capsys):
    package = em.make_package(tmp_path / "unet", "unet", task="segmentation", outputs=em.SEGMENTER_OUTPUTS)
    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(3):
        write_dicom(make_phantom(100 + i, 128, "pneumothorax" if i else None), studies / f"{i}.dcm")
    (studies / "notes.txt").write_text("not DICOM")
    assert export(package, "--factory", "export_models:unet", "--weights", str(package / "weights.pt"),
                  "--studies", str(studies)) == 0
    assert_exported(package, "unet")
    report = json.loads((package / "export_report.json").read_text())
    assert report["parity_inputs"] == "3 instance(s) from --studies"
    assert "repeat them" in capsys.readouterr().out     # 3 instances for a max_batch of 4
    got = OnnxRuntime(load_package(package)).run(fresh_inputs(2))["mask"]
    assert got.shape == (2, 2, em.SIZE, em.SIZE)


def test_a_model_left_in_training_mode_is_caught_and_the_package_left_as_it_was(tmp_path, capsys):
    package = em.make_package(tmp_path / "forgot-eval", "left_in_training")
    before = snapshot(package)
    assert export(package, "--factory", "export_models:left_in_training", "--weights", str(package / "weights.pt")) == 1
    err = capsys.readouterr().err
    assert "parity failed: logits at batch 1" in err
    assert "training mode" in err and "dropout (Dropout)" in err and "features.1 (BatchNorm2d)" in err
    assert "return model.eval()" in err
    assert snapshot(package) == before
    assert sorted(p.name for p in package.iterdir()) == ["manifest.toml", "weights.pt"]


def test_python_control_flow_on_the_batch_size_is_caught_at_another_batch(tmp_path, capsys):
    package = em.make_package(tmp_path / "branching", "batch_branching")
    assert export(package, "--factory", "export_models:batch_branching", "--weights", str(package / "weights.pt")) == 1
    err = capsys.readouterr().err
    assert "parity failed: logits at batch 1" in err and "traced at batch 2" in err
    assert not (package / "model.onnx").exists()


def test_a_state_dict_of_another_model_is_refused_naming_the_keys(tmp_path, capsys):
    package = em.make_package(tmp_path / "wrong-weights", "small_classifier")
    state = torch.load(package / "weights.pt", weights_only=True)
    state["classifier.weight"] = state.pop("head.weight")
    state["head.bias"] = torch.zeros(3)
    torch.save(state, package / "weights.pt")
    assert export(package, "--factory", "export_models:small_classifier", "--weights", str(package / "weights.pt")) == 1
    err = capsys.readouterr().err
    assert "missing keys (1): head.weight" in err
    assert "unexpected keys (1): classifier.weight" in err
    assert "wrong shapes (1): head.bias (3,) (model (2,))" in err


def test_a_reexport_takes_its_source_from_the_manifest_and_new_weights_give_a_new_device_uid(tmp_path, capsys):
    package = em.make_package(tmp_path / "small", "small_classifier")
    elsewhere = tmp_path / "trained" / "weights.pt"
    elsewhere.parent.mkdir()
    (package / "weights.pt").rename(elsewhere)
    assert export(package, "--factory", "export_models:small_classifier", "--weights", str(elsewhere)) == 0
    first = load_package(package)
    assert (package / "weights.pt").read_bytes() == elsewhere.read_bytes()   # the package holds its source

    assert export(package) == 0                      # one command, from [export]
    assert load_package(package).device_uid == first.device_uid

    state = torch.load(elsewhere, weights_only=True)
    state["head.bias"] += 1.0
    retrained = tmp_path / "retrained.pt"
    torch.save(state, retrained)
    assert export(package, "--weights", str(retrained)) == 0
    again = load_package(package)
    again.verify_hashes()
    assert again.device_uid != first.device_uid
    assert (again.export.factory, again.export.weights) == ("export_models:small_classifier", "retrained.pt")


def test_outputs_returned_as_a_dict_are_named_by_key_with_the_heatmap(tmp_path):
    package = em.make_package(tmp_path / "heatmap", "with_heatmap", heatmap="cam")
    assert export(package, "--factory", "export_models:with_heatmap", "--weights", str(package / "weights.pt")) == 0
    got = OnnxRuntime(load_package(package)).run(fresh_inputs(2))
    with torch.no_grad():
        expected = em.with_heatmap()(torch.from_numpy(fresh_inputs(2)))
    for name in ("logits", "cam"):
        np.testing.assert_allclose(got[name], expected[name].numpy(), atol=1e-5, rtol=1e-4)


def test_a_channels_last_model_is_checked_on_the_input_the_node_feeds_it(tmp_path):
    package = em.make_package(tmp_path / "nhwc", "channels_last", layout="NHWC")
    assert export(package, "--factory", "export_models:channels_last", "--weights", str(package / "weights.pt")) == 0
    model = onnx.load(str(package / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [em.SIZE, em.SIZE, 1]
    x = fresh_inputs(2)                          # NCHW, as the preprocessing kernels make it
    with torch.no_grad():
        expected = em.channels_last()(torch.from_numpy(x.transpose(0, 2, 3, 1).copy())).numpy()
    np.testing.assert_allclose(OnnxRuntime(load_package(package)).run(x)["logits"], expected, atol=1e-5, rtol=1e-4)


def test_an_input_shape_the_model_cannot_take_names_the_manifest_keys(tmp_path, capsys):
    package = em.make_package(tmp_path / "rgb", "small_classifier")
    text = (package / "manifest.toml").read_text().replace("channels = 1", "channels = 3")
    (package / "manifest.toml").write_text(text.replace("mean = [0.5]", "mean = [0.5, 0.5, 0.5]")
                                           .replace("std = [0.25]", "std = [0.25, 0.25, 0.25]"))
    assert export(package, "--factory", "export_models:small_classifier", "--weights", str(package / "weights.pt")) == 1
    err = capsys.readouterr().err
    assert "(2, 3, 64, 64) input" in err and "fix [input]" in err


def test_a_package_phantoms_do_not_fit_asks_for_studies(tmp_path, capsys):
    package = em.make_package(tmp_path / "ct", "small_classifier", modalities='["CT"]')
    assert export(package, "--factory", "export_models:small_classifier", "--weights", str(package / "weights.pt")) == 1
    assert "give --studies DIR" in capsys.readouterr().err


def test_without_a_source_anywhere_the_command_says_how_to_give_one(tmp_path, capsys):
    package = em.make_package(tmp_path / "nosource", None)
    assert export(package) == 2
    err = capsys.readouterr().err
    assert "no [export] table" in err and "--factory" in err and "--program" in err


@pytest.mark.slow
def test_a_saved_torch_export_program_is_exported_and_recorded_in_place_of_the_factory(tmp_path, capsys):
    package = em.make_package(tmp_path / "program", "small_classifier")
    assert export(package, "--factory", "export_models:small_classifier", "--weights", str(package / "weights.pt")) == 0
    example = torch.from_numpy(fresh_inputs(2))
    program = torch.export.export(em.small_classifier(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=16)},))
    torch.export.save(program, package / "model.pt2")
    assert export(package, "--program", str(package / "model.pt2")) == 0
    pkg = load_package(package)
    pkg.verify_hashes()
    assert (pkg.export.program, pkg.export.factory, pkg.export.weights) == ("model.pt2", None, None)
    assert "model.pt2" in pkg.hashes
    report = json.loads((package / "export_report.json").read_text())
    assert report["exporter"] == "dynamo" and report["source"] == {"program": "model.pt2"}

    fixed = torch.export.export(em.small_classifier(), (example,))      # no dynamic batch
    torch.export.save(fixed, tmp_path / "fixed.pt2")
    before = snapshot(package)
    assert export(package, "--program", str(tmp_path / "fixed.pt2")) == 1
    assert "fixed batch size of 2" in capsys.readouterr().err
    assert snapshot(package) == before
