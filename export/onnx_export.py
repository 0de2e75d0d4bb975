"""Export a PyTorch model into a model package as ONNX, and prove it computes what PyTorch computes.

    appliance export PACKAGE_DIR                                   # the source in the manifest's [export]
    appliance export PACKAGE_DIR --factory pkg.module:fn --weights weights.pt
    appliance export PACKAGE_DIR --program model.pt2               # a saved torch.export program

The source is a factory (``package.module:function``, called with no arguments, returning an
``nn.Module`` ready for inference) with a state dict, or a saved ``torch.export`` program.  The
model is exported with a dynamic batch dimension and a pinned opset, under the manifest's names
(``input.name``, every ``outputs.tensor``, ``heatmap_tensor``); a model returning a tuple gives
its tensors in that order (output tensors as the ``[[outputs]]`` first name them, then the
heatmap), a model returning a dict gives them by key.  The ONNX file passes ``onnx.checker``
(full check) and shape inference, and ONNX Runtime, as the node runs it, must agree with PyTorch
at batch 1, 2 and the manifest's ``max_batch`` on inputs made by the node's own preprocessing.
Only then are ``model.onnx``, the source and ``export_report.json`` moved into the package and the
manifest updated (``[export]``, a new ``device_uid``, ``[hashes]``); a failed export leaves the
package as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from appliance.manifest import ExportSpec, ManifestError, ModelPackage
from export.package import delete_keys, load_manifest, record, set_keys

WRITTEN_BY = "appliance export"
REPORT_FILE = "export_report.json"
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
#: Seeds of the phantoms used for the parity check when no studies are given; fixed, so a
#: re-export compares on the same inputs.
PHANTOM_SEED = 8_100_000


class ExportError(Exception):
    """An export that did not produce a verified model; the message names the problem and the fix."""


class RepositoryError(ExportError):
    """The package was exported, but its Triton repository entry could not be written."""


@dataclass(frozen=True)
class Source:
    """What the ONNX file is exported from: ``factory`` with ``weights``, or ``program``.
    Paths are as given: relative to the current folder on the command line, or bare names of
    files in the package when they come from the manifest."""

    factory: str | None = None
    weights: Path | None = None
    program: Path | None = None

    def describe(self) -> str:
        return f"{self.factory} with {self.weights.name}" if self.factory else f"program {self.program.name}"


@dataclass(frozen=True)
class Parity:
    """Largest |ONNX Runtime - PyTorch| of one output tensor at one batch size."""

    batch: int
    tensor: str
    max_abs_diff: float
    max_abs_reference: float


@dataclass(frozen=True)
class ExportResult:
    package: ModelPackage
    parity: tuple[Parity, ...]
    opset: int
    exporter: str
    inputs: str
    triton_model: Path | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(p.max_abs_diff for p in self.parity)


# ----------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, metavar="PACKAGE_DIR", help="model package folder (with manifest.toml)")
    source = parser.add_argument_group("source (default: the manifest's [export] table)")
    source.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="function (or class) that returns the nn.Module, e.g. mysite.models:build")
    source.add_argument("--weights", type=Path, metavar="FILE",
                        help="state dict for the factory's module (torch.save(model.state_dict(), FILE))")
    source.add_argument("--program", type=Path, metavar="FILE.pt2",
                        help="a saved torch.export program (torch.export.save) with a dynamic batch dimension")
    parser.add_argument("--opset", type=int, help=f"ONNX opset to pin (default: the manifest's, else {DEFAULT_OPSET})")
    parser.add_argument("--atol", type=float, help=f"absolute parity tolerance (default {DEFAULT_ATOL:g})")
    parser.add_argument("--rtol", type=float, help=f"relative parity tolerance (default {DEFAULT_RTOL:g})")
    parser.add_argument("--studies", type=Path, metavar="DIR",
                        help="DICOM instances the package applies to, for the parity check "
                             "(default for CR/DX packages: synthetic chest phantoms)")
    parser.add_argument("--triton-repo", type=Path, metavar="DIR",
                        help="also write a Triton Inference Server model repository entry DIR/<name>/")
    parser.epilog = ("Outputs: a model returning a tuple gives the manifest's outputs.tensor names in the order the "
                     "[[outputs]] first name them, then heatmap_tensor; a dict gives them by key. "
                     "Exit status 0 exported, 1 the model failed a check (the package is left as it was), "
                     "2 a missing file or a manifest problem.")


def run(args: argparse.Namespace) -> int:
    for module in ("torch", "onnx"):
        if importlib.util.find_spec(module) is None:
            print(f"appliance export: needs {module}, which is not installed here; install the toolchain with "
                  "pip install 'appliance[export]' (a runtime-only node does not carry it)", file=sys.stderr)
            return 2
    if args.program is not None and (args.factory or args.weights):
        raise ManifestError("give either --program or --factory/--weights, not both")
    source = None
    if args.program is not None:
        source = Source(program=args.program)
    elif args.factory or args.weights:
        source = Source(factory=args.factory, weights=args.weights)
    try:
        result = export_package(args.package, source, opset=args.opset, atol=args.atol, rtol=args.rtol,
                                studies=args.studies, triton_repo=args.triton_repo)
    except RepositoryError as e:
        print(f"appliance export: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"appliance export: {e}", file=sys.stderr)
        print(f"appliance export: {args.package} was left as it was", file=sys.stderr)
        return 1
    pkg = result.package
    print(f"exported {pkg.path / pkg.model_file}: opset {result.opset}, device_uid {pkg.device_uid}, "
          f"max |onnxruntime - torch| {result.max_abs_diff:.2e}")
    if result.triton_model is not None:
        print(f"wrote Triton model {result.triton_model}")
    return 0


# ----------------------------------------------------------------------------------------------
# The export

def export_package(package_dir: str | Path, source: Source | None = None, *, opset: int | None = None,
                   atol: float | None = None, rtol: float | None = None, studies: Path | None = None,
                   triton_repo: Path | None = None, log: Callable[[str], None] = print) -> ExportResult:
    """Export ``source`` (default: the manifest's ``[export]``) into the package at ``package_dir``.

    Raises :class:`ExportError` when the model cannot be exported or fails a check, with the
    package untouched; ``ManifestError``/``FileNotFoundError`` for a source that cannot be found.
    """
    package_dir = Path(package_dir)
    pkg = load_manifest(package_dir)
    if pkg.precision != "fp32":
        raise ExportError(f"{package_dir} is an {pkg.precision} package made by `appliance quantize`; export "
                          "into the FP32 package it came from and quantize that again")
    spec = pkg.export
    source = _resolve_source(pkg, spec, source)
    opset = opset or (spec.opset if spec else DEFAULT_OPSET)
    atol = atol if atol is not None else (spec.atol if spec else DEFAULT_ATOL)
    rtol = rtol if rtol is not None else (spec.rtol if spec else DEFAULT_RTOL)
    names = output_names(pkg)

    import torch

    if source.program is not None:
        reference, exportable, exporter = _load_program(source.program, pkg)
    else:
        reference = _load_module(source.factory, source.weights)
        exportable, exporter = reference, "torchscript"

    batch, inputs_note = parity_inputs(pkg, studies, log)
    # torch and ONNX take the declared layout; the node's kernels produce NCHW and its runtime
    # transposes, so the reference is fed what the ONNX file is fed.
    torch_batch = batch.transpose(0, 2, 3, 1).copy() if pkg.input_layout == "NHWC" else batch

    with tempfile.TemporaryDirectory(dir=package_dir, prefix=".export-") as work:
        work = Path(work)
        onnx_path = work / pkg.model_file
        example = torch.from_numpy(torch_batch[:min(2, pkg.max_batch)])
        onnx_names = _export(exportable, exporter, example, onnx_path, pkg.input_name, names, opset)
        check_graph(onnx_path, pkg, onnx_names, opset)
        parity = check_parity(reference, onnx_path, pkg, batch, torch_batch, onnx_names, atol, rtol,
                              traced_at=len(example) if exporter == "torchscript" else None, log=log)
        if isinstance(reference, torch.nn.Module) and _training_layers(reference):
            log(f"note: {source.factory} returned the model in training mode; the export is in eval mode")

        report = _report(source, opset, exporter, atol, rtol, inputs_note, parity)
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        staged = {pkg.model_file: onnx_path, REPORT_FILE: work / REPORT_FILE}
        if source.program is not None:
            export_values: dict[str, object] = {"program": _stage_source(source.program, package_dir, staged, work)}
            removed = ["factory", "weights"]
        else:
            export_values = {"factory": source.factory,
                             "weights": _stage_source(source.weights, package_dir, staged, work)}
            removed = ["program"]
        export_values.update(opset=opset, atol=atol, rtol=rtol)
        source_name = str(export_values.get("program") or export_values["weights"])
        done = _commit(package_dir, pkg, staged, export_values, removed, [source_name], work)

    triton_model = None
    if triton_repo is not None:
        from export.triton import write_repository
        try:
            triton_model = write_repository(triton_repo, done, done.onnx_path)
        except (OSError, ValueError) as e:
            raise RepositoryError(f"{package_dir} was exported, but the Triton repository {triton_repo} could not "
                                  f"be written: {e}; fix that and run the export again") from None
    return ExportResult(done, tuple(parity), opset, exporter, inputs_note, triton_model)


def output_names(pkg: ModelPackage) -> list[str]:
    """The ONNX output names, in the order a model returning a tuple gives them: each
    ``outputs.tensor`` as the ``[[outputs]]`` first name it, then ``heatmap_tensor``."""
    names: list[str] = []
    for out in pkg.outputs:
        if out.tensor not in names:
            names.append(out.tensor)
    if pkg.heatmap_tensor and pkg.heatmap_tensor not in names:
        names.append(pkg.heatmap_tensor)
    if pkg.input_name in names:
        raise ManifestError(f"{pkg.manifest_path}: input.name {pkg.input_name!r} is also an output tensor name; "
                            "ONNX needs distinct names")
    return names


def _resolve_source(pkg: ModelPackage, spec: ExportSpec | None, given: Source | None) -> Source:
    """The command line's source, completed from ``[export]`` (so ``--weights new.pt`` alone
    re-exports the manifest's factory with new weights)."""
    where = pkg.manifest_path
    if given is None or given.program is None and given.factory is None and given.weights is None:
        if spec is None:
            raise ManifestError(f"{where}: no [export] table and no --factory/--weights or --program; "
                                "give the source once on the command line and it is recorded for next time")
        if spec.program is not None:
            given = Source(program=pkg.path / spec.program)
        else:
            given = Source(factory=spec.factory, weights=pkg.path / spec.weights if spec.weights else None)
    elif given.program is None:
        factory = given.factory or (spec.factory if spec else None)
        weights = given.weights
        if weights is None and spec is not None and spec.weights is not None and given.factory:
            weights = pkg.path / spec.weights
        if factory is None:
            raise ManifestError(f"{where}: --weights needs a factory: give --factory MODULE:FUNCTION "
                                "(or an [export] factory in the manifest)")
        given = Source(factory=factory, weights=weights)
    if given.program is None:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", given.factory or ""):
            raise ManifestError(f"--factory {given.factory!r}: expected package.module:function")
        if given.weights is None:
            raise ManifestError(f"{where}: {given.factory} needs --weights FILE: the state dict is what the "
                                "package records and hashes, so the export can be repeated")
    path = given.program if given.program is not None else given.weights
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the export source)")
    return given


# ----------------------------------------------------------------------------------------------
# Loading the PyTorch model

def _load_module(factory: str, weights: Path):
    """The factory's module with ``weights`` loaded strictly, in the mode the factory left it."""
    import torch

    module_name, function_name = factory.split(":")
    # `python -m appliance` puts the current folder on sys.path, the `appliance` script does not;
    # a site's own model code usually sits there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ExportError(f"factory {factory}: cannot import {module_name} ({e}); install it or run from the "
                          "folder that holds it (or put it on PYTHONPATH)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ExportError(f"factory {factory}: {module_name} has no function or class {function_name!r}")
    try:
        model = function()
    except Exception as e:
        raise ExportError(f"factory {factory} raised {type(e).__name__}: {_first_line(e)}; it is called with no "
                          "arguments and must return the model") from None
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, a non-torch file, a whole pickled module
        raise ExportError(f"{weights}: not a state dict torch.load can read with weights_only=True "
                          f"({_first_line(e)}); "
                          "save it with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ExportError(f"{weights}: holds {keys}, not a state dict of tensors; save "
                          "model.state_dict() itself (from a checkpoint, its 'state_dict' entry)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
        hint = ("; the keys start with 'module.': strip that prefix (weights saved from DataParallel)"
                if unexpected and all(k.startswith("module.") for k in unexpected) else
                "; were these weights saved from this architecture and configuration?")
        raise ExportError(f"{weights} does not fit {factory}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)
    return model


def _load_program(path: Path, pkg: ModelPackage):
    """(reference module, the ExportedProgram, "dynamo") from a ``torch.export.save`` file whose
    batch dimension is free."""
    import torch

    try:
        importlib.import_module("onnxscript")
    except ImportError:
        raise ExportError("--program needs the onnxscript package (torch's ONNX exporter for torch.export "
                          "programs): pip install onnxscript; or export from --factory and --weights") from None
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ExportError(f"{path}: not a torch.export program torch.export.load can read ({_first_line(e)}); "
                          "save one with torch.export.save(torch.export.export(model, args), path)") from None
    # A program traced with example inputs only has their batch size fixed in its graph; say so
    # before spending an ONNX export on it.
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if len(placeholders) != 1:
        raise ExportError(f"{path}: the program takes {len(placeholders)} inputs; a model package takes one "
                          "image batch")
    value = placeholders[0].meta.get("val")
    batch = value.shape[0] if value is not None and value.dim() == 4 else None
    if isinstance(batch, int):
        raise ExportError(f"{path}: the program has a fixed batch size of {batch}; export it with a dynamic batch: "
                          "torch.export.export(model, args, dynamic_shapes="
                          f"({{0: torch.export.Dim('batch', max={pkg.max_batch})}},))")
    return program.module(), program, "dynamo"


def _training_layers(model) -> list[str]:
    """Layers that compute differently in training mode and are in it: the usual reason an
    export (made in eval mode) disagrees with the model as the factory returned it."""
    from torch import nn

    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)
    return [f"{name or '(model)'} ({type(m).__name__})" for name, m in model.named_modules()
            if m.training and isinstance(m, kinds)]


def _outputs_by_name(result: Any, names: list[str], what: str) -> dict[str, Any]:
    """The model's outputs under the ONNX names: a dict by key, a tuple by position."""
    import torch

    if isinstance(result, dict):
        absent = [n for n in names if n not in result]
        if absent:
            raise ExportError(f"{what} returns a dict with keys {list(result)}; the manifest names "
                              f"{', '.join(absent)} too: rename the outputs or the manifest's tensors")
        return {n: result[n] for n in names}
    if isinstance(result, torch.Tensor):
        result = (result,)
    if not isinstance(result, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in result):
        raise ExportError(f"{what} returns {type(result).__name__}; expected a tensor, a tuple of tensors "
                          "or a dict of tensors")
    if len(result) != len(names):
        raise ExportError(f"{what} returns {len(result)} tensor(s); the manifest names {len(names)} "
                          f"({', '.join(names)}: outputs.tensor in order, then heatmap_tensor): "
                          "return exactly those, in that order, or a dict by name")
    return dict(zip(names, result))


# ----------------------------------------------------------------------------------------------
# Export and checks of the graph

def _tuple_outputs(model, names: list[str]):
    """``model`` with a forward that returns its dict's tensors as a tuple in ONNX order."""
    from torch import nn

    class NamedOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x)
            return tuple(out[n] for n in names)

    return NamedOutputs()


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the export, then each submodule back in the mode it had: the reference
    runs on the model as the factory returned it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _export(model, exporter: str, example, path: Path, input_name: str, names: list[str], opset: int) -> list[str]:
    """Write the ONNX file; returns its output names (``names``, plus any further keys of a
    program that returns a dict)."""
    import torch

    # One forward pass first, in eval mode, on an input of the manifest's shape: a model that
    # cannot take it is a wrong [input] (or model), which the exporter would report obscurely.
    reference = model.module() if exporter == "dynamo" else model
    # A program's mode was fixed when it was exported; its module refuses train()/eval().
    with torch.no_grad(), (contextlib.nullcontext() if exporter == "dynamo" else _eval_mode(model)):
        try:
            probe = reference(example)
        except Exception as e:
            raise ExportError(f"PyTorch cannot run the model on a {tuple(example.shape)} input, the shape [input] "
                              f"declares: {_first_line(e)}; fix [input] (channels, height, width, layout) "
                              "or the model") from None
    _outputs_by_name(probe, names, "the program" if exporter == "dynamo" else "the model")
    try:
        if exporter == "dynamo":
            # A program's outputs are flattened in its own order (a dict's by insertion) and named
            # by position: name them in that order.
            onnx_names = list(probe) if isinstance(probe, dict) else names
            program = torch.onnx.export(model, (example,), input_names=[input_name], output_names=onnx_names,
                                        opset_version=opset, dynamo=True, optimize=True, verbose=False)
            program.save(str(path))
            return onnx_names
        # The tracer records tuples, not dicts: a dict-returning model is traced through a wrapper.
        traced = _tuple_outputs(model, names) if isinstance(probe, dict) else model
        with torch.no_grad(), _eval_mode(model), warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the torch.export one; it
            # needs no onnxscript, and what its tracing recorded is checked by parity at several
            # batch sizes.
            warnings.simplefilter("ignore")
            torch.onnx.export(traced, (example,), str(path), input_names=[input_name], output_names=names,
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in [input_name, *names]})
        return names
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(e).__name__}: {_first_line(e)}; "
                          "a layer without an ONNX equivalent at this opset may need another --opset") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_graph(path: Path, pkg: ModelPackage, names: list[str], opset: int) -> None:
    """Full ONNX check, strict shape inference, the pinned opset, the manifest's names and input
    shape, and a batch dimension left free."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported ONNX fails onnx.checker/shape inference: {_first_line(e)}") from None
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ExportError(f"the exported ONNX has opset {versions.get('')}, not the requested {opset}")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [pkg.input_name]:
        raise ExportError(f"the ONNX inputs are {[i.name for i in inputs]}; the manifest's input.name is "
                          f"{pkg.input_name!r} and a model package takes one image batch")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    c, h, w = pkg.input_channels, pkg.input_height, pkg.input_width
    declared = [c, h, w] if pkg.input_layout == "NCHW" else [h, w, c]
    if len(dims) != 4 or dims[1:] != declared:
        raise ExportError(f"the model takes {tuple('batch' if d is None else d for d in dims)}; the manifest "
                          f"says input channels={c}, height={h}, width={w} ({pkg.input_layout}): "
                          "fix [input] or the model")
    if dims[0] is not None:
        raise ExportError(f"the ONNX input has a fixed batch size of {dims[0]}; export the program with a "
                          "dynamic batch: torch.export.export(model, args, dynamic_shapes="
                          f"({{0: torch.export.Dim('batch', max={pkg.max_batch})}},))")
    outputs = [o.name for o in model.graph.output]
    if outputs != names:
        raise ExportError(f"the ONNX outputs are {outputs}; the manifest needs {names}")


# ----------------------------------------------------------------------------------------------
# Parity

def parity_inputs(pkg: ModelPackage, studies: Path | None, log: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """``max_batch`` model inputs (NCHW float32) made by the node's own preprocessing
    (:func:`appliance.kernels.prepare`), from ``studies`` or, for CR/DX packages, phantoms."""
    from appliance import kernels
    from appliance.preprocessing import InputRejected

    wanted = pkg.max_batch
    if studies is not None:
        datasets, rejection, seen = _read_studies(studies, pkg, wanted)
        if not datasets:
            why = f" (the first refused: {rejection})" if rejection else ""
            raise ExportError(f"--studies {studies}: none of its {seen} file(s) is a DICOM instance "
                              f"{pkg.name} takes{why}; give instances that match [applicability]")
        note = f"{len(datasets)} instance(s) from --studies"
    else:
        modalities = pkg.applicability.modalities
        chosen = next((m for m in ("DX", "CR") if not modalities or m in modalities), None)
        if chosen is None:
            raise ExportError(f"{pkg.name} takes {', '.join(modalities)}; the parity check needs inputs like "
                              "the model will see: give --studies DIR with a few such DICOM instances")
        from export.phantoms import FINDINGS, make_phantom, write_dicom

        size = max(512, pkg.input_height, pkg.input_width)
        mono1 = "MONOCHROME1" in pkg.applicability.photometric_interpretations
        datasets = [write_dicom(make_phantom(PHANTOM_SEED + i, size, FINDINGS[i % len(FINDINGS)],
                                             monochrome1=mono1 and i % 4 == 3), modality=chosen)
                    for i in range(wanted)]
        note = f"{wanted} synthetic {chosen} chest phantoms (export/phantoms.py, seeds {PHANTOM_SEED} on)"
        log(f"no --studies: the parity check runs on {note}; give --studies DIR to check on the site's own images")
    try:
        batch, accepted, _ = kernels.prepare(datasets, pkg)
    except InputRejected as e:
        raise ExportError(f"the parity inputs were refused by {pkg.name}'s preprocessing: {e}") from None
    if len(batch) < wanted:
        log(f"{len(batch)} input(s) for a max_batch of {wanted}: the larger batches repeat them")
        batch = np.resize(batch, (wanted,) + batch.shape[1:])
    return np.ascontiguousarray(batch, dtype=np.float32), note


def _read_studies(folder: Path, pkg: ModelPackage, wanted: int):
    """Up to ``wanted`` instances under ``folder`` that ``pkg`` takes, in file-name order."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from appliance.preprocessing import InputRejected, check_applicable

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (--studies)")
    datasets, rejection, seen = [], None, 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        seen += 1
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, ValueError):
            continue
        try:
            check_applicable(ds, pkg)
        except InputRejected as e:
            rejection = rejection or str(e)
            continue
        datasets.append(ds)
        if len(datasets) == wanted:
            break
    return datasets, rejection, seen


def _batches(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, max_batch) if b <= max_batch})


def check_parity(reference, onnx_path: Path, pkg: ModelPackage, batch: np.ndarray, torch_batch: np.ndarray,
                 names: list[str], atol: float, rtol: float, traced_at: int | None = None,
                 log: Callable[[str], None] = print) -> list[Parity]:
    """ONNX Runtime (the node's runtime) against PyTorch at batch 1, 2 and ``max_batch``: every
    element within ``atol + rtol * |reference|``, else :class:`ExportError`."""
    import torch

    from appliance.runtime import OnnxRuntime

    staged = dataclasses.replace(pkg, path=onnx_path.parent, model_file=onnx_path.name)
    try:
        runtime = OnnxRuntime(staged)
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_first_line(e)}") from None
    training = _training_layers(reference) if isinstance(reference, torch.nn.Module) else []
    train_hint = (f"; the model is in training mode ({', '.join(training[:6])}{', ...' if len(training) > 6 else ''} "
                  "compute differently there): return model.eval() from the factory") if training else ""
    results: list[Parity] = []
    for b in _batches(pkg.max_batch):
        with torch.no_grad():
            try:
                got = _outputs_by_name(reference(torch.from_numpy(torch_batch[:b])), names, "the model")
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"PyTorch cannot run the model at batch {b}: {_first_line(e)}{train_hint}") from None
        expected = {n: t.detach().float().numpy() for n, t in got.items()}
        try:
            actual = runtime.run(batch[:b])
        except Exception as e:
            raise ExportError(f"ONNX Runtime cannot run the exported model at batch {b}: {_first_line(e)}"
                              f"{_batch_hint(traced_at, b)}") from None
        line = []
        for name in names:
            ref, out = expected[name], np.asarray(actual[name], dtype=np.float32)
            if ref.shape != out.shape:
                raise ExportError(f"at batch {b}, {name} has shape {out.shape} in ONNX Runtime and {ref.shape} in "
                                  f"PyTorch{_batch_hint(traced_at, b)}{train_hint}")
            diff = np.abs(out.astype(np.float64) - ref)
            p = Parity(b, name, float(diff.max(initial=0.0)), float(np.abs(ref).max(initial=0.0)))
            results.append(p)
            line.append(f"{name} {p.max_abs_diff:.2e}")
            excess = diff - (atol + rtol * np.abs(ref))
            if np.any(~np.isfinite(diff)) or excess.max(initial=0.0) > 0:
                worst = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(excess), excess, np.inf))), diff.shape)
                raise ExportError(
                    f"parity failed: {name} at batch {b} differs by {diff[worst]:.3g} at index {tuple(map(int, worst))} "
                    f"(ONNX Runtime {out[worst]:.6g}, PyTorch {ref[worst]:.6g}; allowed {atol:g} + {rtol:g} x |PyTorch|)"
                    f"{train_hint or _batch_hint(traced_at, b)}")
        log(f"parity batch {b}: max |onnxruntime - torch| " + ", ".join(line))
    return results


def _batch_hint(traced_at: int | None, batch: int) -> str:
    if traced_at is None or traced_at == batch:
        return ""
    return (f"; the model was traced at batch {traced_at}: Python control flow or a shape fixed from "
            "x.shape[0] was recorded for that batch size; compute from the tensor (e.g. x.flatten(1)) "
            "or save a torch.export program with a dynamic batch and use --program")


# ----------------------------------------------------------------------------------------------
# Moving the result into the package

def _stage_source(path: Path, package_dir: Path, staged: dict[str, Path], work: Path) -> str:
    """The source file's name in the package; a file from elsewhere is copied in, so the
    package holds (and hashes) what it was exported from."""
    if path.resolve().parent == package_dir.resolve():
        return path.name
    if path.name in ("manifest.toml", REPORT_FILE) or path.name in staged:
        raise ExportError(f"{path}: a source named {path.name} would overwrite the package's own file; rename it")
    copy = work / ("source-" + path.name)
    shutil.copy2(path, copy)
    staged[path.name] = copy
    return path.name


def _commit(package_dir: Path, pkg: ModelPackage, staged: dict[str, Path], export_values: dict[str, object],
            removed: list[str], sources: list[str], work: Path) -> ModelPackage:
    """Move the staged files in and rewrite the manifest; on any failure put the old ones back."""
    manifest = package_dir / "manifest.toml"
    text = manifest.read_text()
    new_text = set_keys(delete_keys(text, "export", removed), "export", export_values)
    backup = work / "previous"
    backup.mkdir()
    replaced: list[str] = []
    try:
        shutil.copy2(manifest, backup / "manifest.toml")
        for name, path in staged.items():
            target = package_dir / name
            if target.exists():
                os.replace(target, backup / name)
            replaced.append(name)
            os.replace(path, target)
        tmp = manifest.with_suffix(".toml.tmp")
        tmp.write_text(new_text)
        tmp.replace(manifest)
        kept = [name for name in pkg.hashes if (package_dir / name).is_file()]
        return record(package_dir, WRITTEN_BY, artefacts=sorted(set(kept) | set(staged) | set(sources)))
    except BaseException:
        for name in replaced:
            (package_dir / name).unlink(missing_ok=True)
            if (backup / name).exists():
                os.replace(backup / name, package_dir / name)
        os.replace(backup / "manifest.toml", manifest)
        raise


def _report(source: Source, opset: int, exporter: str, atol: float, rtol: float, inputs: str,
            parity: list[Parity]) -> dict[str, object]:
    import onnx
    import onnxruntime
    import torch

    from appliance import __version__

    return {
        "written_by": WRITTEN_BY,
        "source": ({"program": source.program.name} if source.program is not None else
                   {"factory": source.factory, "weights": source.weights.name}),
        "exporter": exporter,
        "opset": opset,
        "tolerance": {"atol": atol, "rtol": rtol},
        "parity_inputs": inputs,
        "parity": [{"batch": p.batch, "tensor": p.tensor, "max_abs_diff": float(f"{p.max_abs_diff:.3g}"),
                    "max_abs_reference": float(f"{p.max_abs_reference:.4g}")} for p in parity],
        "versions": {"appliance": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
