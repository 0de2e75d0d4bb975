"""Make an FP16 or INT8 version of a model package and check it against the FP32 one.

    appliance quantize PACKAGE_DIR --mode int8 --calibration DIR --validation DIR --labels CSV --out DIR
    appliance quantize PACKAGE_DIR --mode fp16 --validation DIR --labels CSV --out DIR

Precision is carried by the ONNX graph (DESIGN.md), so one file serves ONNX Runtime on a CPU and a
TensorRT engine build: ``fp16`` converts every float tensor to float16 (onnxconverter-common), input
and outputs included; ``int8`` inserts QuantizeLinear/DequantizeLinear pairs (ONNX Runtime's static
quantisation, QDQ format) with ranges calibrated on the site's DICOM images taken through the
node's own decode and preprocessing, so the ranges are those the model meets in service.

INT8 choices, each for a reason:

* weights: int8, symmetric, per output channel: per-tensor scales let the largest channel of a
  layer flatten the small ones;
* activations: ``--target onnxruntime`` (default) uses uint8 with a zero point, ONNX Runtime's
  advice for x86 (twice as fast as symmetric int8 on the Sapphire Rapids development machines);
  ``--target tensorrt`` uses symmetric int8, the only activation form TensorRT's Q/DQ accepts;
* calibration: min-max over the calibration images by default.  Percentile clipping cuts the rare
  large activations, and for a detector of small findings those are the finding: on the demo
  model, clipping at the 99.99th percentile cost pneumothorax AUC 0.007 and doubled the mean logit
  error, while min-max and the 99.999th percentile were within noise of FP32;
* the head stays in float: from each tensor the manifest reads (outputs, heatmap) back to and
  including the last Conv/Gemm/MatMul.  That layer produces the value compared with
  ``threshold_positive``; an 8-bit step there moves decisions directly, and it is a tiny share of
  the compute.

The quantised model goes through :func:`export.studies.predict` next to the FP32 one on labelled
validation studies: per output, the AUC of both and its change, the agreement of decisions at
``threshold_positive`` and the largest change of a probability.  A model that loses more AUC than
``--max-auc-drop`` or agrees less than ``--min-agreement`` is refused and nothing is written,
unless ``--force``, which writes it and records that it was forced in the report, the manifest's
version (``+int8.forced``) and the model card.  The new package has its own file
(``model.int8.onnx``/``model.fp16.onnx``), precision, version (``0.1.0+int8``), device UID (it is
a different model) and a hashed ``quantization_report.json``.

Segmentation packages are checked by Dice agreement instead: per output, the Dice overlap of the
FP32 and the quantised masks (as the node makes them: activation, resampled onto each image's own
grid, ``>= threshold_positive``) per study, whose mean must reach ``--min-agreement``; the
validation labels file then only names the studies.  Detection packages are not supported yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from appliance import __version__
from appliance.config import ConfigError
from appliance.manifest import ModelPackage, file_sha256, load_package
from export.package import copy_package, device_uid_for, record, set_keys
from export.studies import (LabelsError, StudyPrediction, binary_labels, calibration_batches, make_runtime, predict,
                            read_labels)

MODES = ("fp16", "int8")
TARGETS = ("onnxruntime", "tensorrt")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
REPORT_FILE = "quantization_report.json"
#: Layers with weights: the walk back from an output stops at the first one (see float_head).
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class QuantizationRefused(Exception):
    """The quantised model failed the check against FP32; the message lists each failure."""


# ----------------------------------------------------------------------------------------------
# Conversion

def float_head(model, tensors: list[str]) -> list[str]:
    """Names of the nodes from each of ``tensors`` back to, and including, the last weighted layer
    (Conv, ConvTranspose, Gemm, MatMul) on each path: the layers that make the decision value."""
    producer = {out: node for node in model.graph.node for out in node.output}
    stack = [producer[t] for t in tensors if t in producer]
    names: list[str] = []
    while stack:
        node = stack.pop()
        if node.name in names:
            continue
        names.append(node.name)
        if node.op_type not in WEIGHTED_OPS:
            stack.extend(producer[i] for i in node.input if i in producer)
    return names


def convert_fp16(source: Path, target: Path) -> dict[str, object]:
    """Every float32 tensor of ``source`` as float16, input and outputs included.

    Float16 input and outputs (``keep_io_types=False``): the node's runtime casts the batch and the
    results (appliance.runtime), a TensorRT engine then moves half the bytes, and the converter's
    other mode breaks a graph whose output also feeds another node (``cam`` -> ``logits`` here).
    """
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    # The converter leaves the ops of its block list (Resize, TopK, Range, Min, Max, ...) in float32
    # between Cast nodes: the report names them rather than claim the whole graph is float16.
    kept = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)
            if n.op_type in float16.DEFAULT_OP_BLOCK_LIST]
    converted = float16.convert_float_to_float16(model, keep_io_types=False)
    onnx.save(converted, str(target))
    onnx.checker.check_model(str(target), full_check=True)
    return {"converter": f"onnxconverter-common {_version('onnxconverter_common')}", "io_types": "float16",
            "float32_nodes": kept}


class _Batches:
    """ONNX Runtime's CalibrationDataReader over preprocessed images (one per call), fed as the
    node's runtime feeds them: the preprocessing kernels make NCHW, and an NHWC model
    (``[input] layout``) gets each batch transposed (appliance.runtime.OnnxRuntime.run)."""

    def __init__(self, input_name: str, batches: list[np.ndarray], layout: str = "NCHW"):
        self.input_name = input_name
        self.layout = layout
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        if self.layout == "NHWC":
            batch = batch.transpose(0, 2, 3, 1)
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_int8(pkg: ModelPackage, target: Path, batches: list[np.ndarray], runtime_target: str = "onnxruntime",
                  method: str = "minmax") -> dict[str, object]:
    """``pkg``'s model with Q/DQ nodes, calibrated on ``batches`` (preprocessed NCHW float32)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tensors = [o.tensor for o in pkg.outputs] + ([pkg.heatmap_tensor] if pkg.heatmap_tensor else [])
    with tempfile.TemporaryDirectory(prefix="appliance-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and ONNX Runtime's basic optimisations (constant folding, redundant nodes)
        # first, as ONNX Runtime advises: the quantiser needs every tensor's shape and type.
        quant_pre_process(str(pkg.onnx_path), str(prepared))
        model = onnx.load(str(prepared))
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"   # nodes_to_exclude needs names
        onnx.save(model, str(prepared))
        keep_float = float_head(model, tensors)
        symmetric = runtime_target == "tensorrt"
        quantize_static(
            str(prepared), str(target), _Batches(pkg.input_name, batches, pkg.input_layout),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            nodes_to_exclude=keep_float,
            calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    onnx.checker.check_model(str(target), full_check=True)
    if not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(target)).graph.node):
        raise ConfigError(f"{pkg.onnx_path}: no layer to quantise outside the head kept in float "
                          f"({', '.join(keep_float)}); INT8 would change nothing: use --mode fp16")
    return {"quantizer": f"onnxruntime.quantization {_version('onnxruntime')}, QDQ",
            "target": runtime_target,
            "weights": "int8, symmetric, per channel",
            "activations": "int8, symmetric" if symmetric else "uint8, asymmetric (zero point)",
            "calibration_method": method,
            "float32_nodes": keep_float}


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# The check against FP32

@dataclass(frozen=True)
class OutputCheck:
    """One output of a classification package, FP32 against quantised, on the same studies."""

    name: str
    positives: int
    negatives: int
    auc_fp32: float | None             #: None without both positives and negatives
    auc_quantized: float | None
    auc_change: float | None
    threshold_positive: float
    decision_agreement: float          #: share of studies on the same side of threshold_positive
    decisions_changed: int
    max_probability_difference: float
    mean_probability_difference: float
    #: Studies whose quantised probability is NaN or infinite (float16 overflow, say): such a study
    #: would rank above every other in the AUC and never be positive, so any is a failure.
    non_finite: int = 0


def compare(pkg: ModelPackage, reference: list[StudyPrediction], quantized: list[StudyPrediction],
            truth: np.ndarray) -> tuple[list[OutputCheck], int, dict[str, int]]:
    """Per output checks on the studies both models took; the count used and the excluded by reason."""
    from export.evaluate import auc_roc

    used, excluded = [], {}
    for i, (a, b) in enumerate(zip(reference, quantized)):
        if a.probabilities is None or b.probabilities is None:
            reason = a.rejected or b.rejected or "no_image"
            excluded[reason] = excluded.get(reason, 0) + 1
        else:
            used.append(i)
    p32 = np.array([reference[i].probabilities for i in used], dtype=np.float64).reshape(len(used), len(pkg.outputs))
    pq = np.array([quantized[i].probabilities for i in used], dtype=np.float64).reshape(len(used), len(pkg.outputs))
    y = truth[used]
    checks = []
    for j, out in enumerate(pkg.outputs):
        finite = np.isfinite(pq[:, j]) & np.isfinite(p32[:, j])
        a32, aq = auc_roc(p32[:, j], y[:, j]), auc_roc(pq[:, j], y[:, j])
        defined = math.isfinite(a32) and math.isfinite(aq) and bool(finite.all())
        same = (p32[:, j] >= out.threshold_positive) == (pq[:, j] >= out.threshold_positive)
        diff = np.abs(p32[:, j] - pq[:, j])[finite]
        checks.append(OutputCheck(
            name=out.name, positives=int(y[:, j].sum()), negatives=int(len(used) - y[:, j].sum()),
            auc_fp32=a32 if defined else None, auc_quantized=aq if defined else None,
            auc_change=aq - a32 if defined else None, threshold_positive=out.threshold_positive,
            decision_agreement=float(same.mean()) if used else 0.0, decisions_changed=int((~same).sum()),
            max_probability_difference=float(diff.max()) if len(diff) else 0.0,
            mean_probability_difference=float(diff.mean()) if len(diff) else 0.0,
            non_finite=int((~finite).sum())))
    return checks, len(used), excluded


@dataclass(frozen=True)
class MaskCheck:
    """One output of a segmentation package: FP32 masks against quantised masks, study by study."""

    name: str
    studies: int                       #: studies where either model segmented something
    empty_in_both: int                 #: studies where neither did (no overlap to measure)
    mean_dice: float | None            #: mean over ``studies`` of the Dice of the two masks
    min_dice: float | None
    pixels_fp32: int
    pixels_quantized: int


def compare_masks(pkg: ModelPackage, reference: list[StudyPrediction], quantized: list[StudyPrediction]
                  ) -> tuple[list[MaskCheck], int, dict[str, int]]:
    """Per output Dice agreement of the two models' masks on the studies both took."""
    from export.evaluate import dice, predicted_masks

    used, excluded = 0, {}
    per_output: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {o.name: [] for o in pkg.outputs}
    for a, b in zip(reference, quantized):
        if a.probabilities is None or b.probabilities is None:
            reason = a.rejected or b.rejected or "no_image"
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        used += 1
        masks_a = [predicted_masks(pkg, out, src) for out, src in zip(a.outputs, a.sources)]
        masks_b = [predicted_masks(pkg, out, src) for out, src in zip(b.outputs, b.sources)]
        for o in pkg.outputs:   # one study: its images of every series together
            flat = lambda series: np.concatenate([m.ravel() for s in series for m in s[o.name]])  # noqa: E731
            per_output[o.name].append((flat(masks_a), flat(masks_b)))
    checks = []
    for name, pairs in per_output.items():
        scores = [d for d in (dice(a, b) for a, b in pairs) if d is not None]
        checks.append(MaskCheck(
            name=name, studies=len(scores), empty_in_both=len(pairs) - len(scores),
            mean_dice=float(np.mean(scores)) if scores else None, min_dice=float(min(scores)) if scores else None,
            pixels_fp32=int(sum(a.sum() for a, _ in pairs)), pixels_quantized=int(sum(b.sum() for _, b in pairs))))
    return checks, used, excluded


def failures(checks: list[OutputCheck | MaskCheck], max_auc_drop: float, min_agreement: float) -> list[str]:
    """Each way the quantised model misses the tolerance, as a sentence."""
    found = []
    for c in checks:
        if isinstance(c, MaskCheck):
            if c.mean_dice is None:
                found.append(f"{c.name}: neither model segmented anything on any validation study, so Dice "
                             "agreement is undefined; add studies that show the structure")
            elif c.mean_dice < min_agreement - 1e-12:
                found.append(f"{c.name}: mean Dice between the FP32 and quantised masks {c.mean_dice:.3f} over "
                             f"{c.studies} studies (lowest {c.min_dice:.3f}), below --min-agreement {min_agreement:g}")
            continue
        if c.non_finite:
            found.append(f"{c.name}: {c.non_finite} validation studies got a probability that is not a number "
                         "(NaN or infinite) from one of the models; its AUC and decisions mean nothing there")
        elif c.auc_change is None:
            found.append(f"{c.name}: AUC is undefined: the validation labels have {c.positives} positive and "
                         f"{c.negatives} negative studies; add studies with and without the finding")
        elif c.auc_change < -max_auc_drop - 1e-12:
            found.append(f"{c.name}: AUC {c.auc_fp32:.4f} (FP32) -> {c.auc_quantized:.4f}, a drop of "
                         f"{-c.auc_change:.4f}, more than --max-auc-drop {max_auc_drop:g}")
        if c.decision_agreement < min_agreement - 1e-12:
            found.append(f"{c.name}: {c.decisions_changed} decisions at threshold {c.threshold_positive:g} changed "
                         f"(agreement {c.decision_agreement:.3f}, below --min-agreement {min_agreement:g})")
    return found


# ----------------------------------------------------------------------------------------------
# The command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="the FP32 model package folder to quantise")
    parser.add_argument("--mode", required=True, choices=MODES,
                        help="fp16: float16 conversion; int8: Q/DQ nodes calibrated on --calibration")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the new package folder (must not exist, or be empty)")
    parser.add_argument("--calibration", type=Path, metavar="DIR",
                        help="int8: folder of DICOM images the package takes, for the activation ranges "
                             "(not the validation studies)")
    parser.add_argument("--calibration-limit", type=int, default=128, metavar="N",
                        help="use at most N calibration images (default 128)")
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
                        help="int8: how activation ranges are chosen from the calibration images (default minmax)")
    parser.add_argument("--target", choices=TARGETS, default="onnxruntime",
                        help="int8: onnxruntime (uint8 activations, fastest on x86) or tensorrt "
                             "(symmetric int8 activations, which TensorRT requires); default onnxruntime")
    parser.add_argument("--validation", type=Path, metavar="DIR", help="folder of labelled DICOM studies to check against FP32")
    parser.add_argument("--labels", type=Path, metavar="CSV", help="CSV naming each validation study (path or study_instance_uid); "
                        "classification: one 1/0 column per output")
    parser.add_argument("--max-auc-drop", type=float, default=0.01, metavar="AUC",
                        help="refuse when an output's AUC drops by more than this (default 0.01)")
    parser.add_argument("--min-agreement", type=float, default=0.95, metavar="SHARE",
                        help="refuse when, for any output, fewer than this share of studies keep their decision "
                             "at threshold_positive (classification), or the mean Dice between the FP32 and the "
                             "quantised masks is lower (segmentation); default 0.95")
    parser.add_argument("--force", action="store_true",
                        help="write the package even if it misses the tolerance or was not checked; "
                             "the report, manifest and model card say so")


#: Errors in what the user gave; appliance.cli prints them as a sentence and exits 2.
USAGE_ERRORS = (LabelsError,)


def run(args) -> int:
    try:
        return _run(args)
    except QuantizationRefused as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    src = load_package(args.package)
    src.verify_hashes()   # quantise the model the manifest describes, not a file changed since
    _check_arguments(args, src)
    out: Path = args.out
    studies = truth = None
    if args.validation is not None:
        # Every label is read before any work: a typo on the last line fails in a second.
        studies = read_labels(args.labels, args.validation)
        if src.task == "classification":
            try:
                truth = binary_labels(studies, src)
            except LabelsError as e:
                raise LabelsError(f"{args.labels}, {e}") from None

    model_file = f"model.{args.mode}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)   # mkdtemp's 0700 would become the package folder's mode
    try:
        copy_package(src.path, staging)   # manifest and model card; the FP32 artefacts stay behind
        calibration_images = 0
        if args.mode == "fp16":
            if args.calibration is not None:
                print("--calibration is not used by --mode fp16 (float16 needs no ranges)", file=sys.stderr)
            settings = convert_fp16(src.onnx_path, staging / model_file)
        else:
            batches = list(calibration_batches(src, args.calibration, args.calibration_limit))
            if not batches:
                raise ConfigError(f"--calibration {args.calibration}: no DICOM image there that {src.name} takes "
                                  f"(modalities {', '.join(src.applicability.modalities)}); point it at the "
                                  "site's own studies of the kind the model reads")
            calibration_images = len(batches)
            print(f"calibrating on {calibration_images} images through the node's preprocessing", file=sys.stderr)
            settings = quantize_int8(src, staging / model_file, batches, args.target, args.calibration_method)
        quantized = replace(src, path=staging, model_file=model_file, precision=args.mode, hashes={})

        checks, used, excluded, found = [], 0, {}, []
        if studies is not None:
            print(f"checking against FP32 on {len(studies)} validation studies", file=sys.stderr)
            masks = src.task == "segmentation"
            reference = predict(make_runtime(src), studies, keep_outputs=masks)
            candidate = predict(make_runtime(quantized), studies, keep_outputs=masks)
            if masks:
                checks, used, excluded = compare_masks(src, reference, candidate)
            else:
                checks, used, excluded = compare(src, reference, candidate, truth)
            if used == 0:
                found = [f"none of the {len(studies)} validation studies could be read by {src.name} "
                         f"(excluded: {excluded}); no check was made"]
            else:
                found = failures(checks, args.max_auc_drop, args.min_agreement)
        else:
            found = ["not checked: no --validation studies were given"]
        print(_summary(args.mode, checks, used), file=sys.stderr)
        if found and not args.force:
            if studies is None:
                fix = "Give --validation DIR --labels CSV to check it against FP32"
            elif args.mode == "int8":
                fix = ("Check that the calibration images are the site's own studies of the kind the model reads "
                       "(and enough of them), or try --mode fp16")
            else:
                fix = "Keep the FP32 package: this model loses too much in float16"
            raise QuantizationRefused(
                f"{args.mode.upper()} version of {src.name} {src.version} refused, nothing written to {out}:\n  "
                + "\n  ".join(found)
                + f"\n{fix}; or give --force to write it anyway with the failure on record.")

        outcome = "forced" if found else "accepted"
        version = _version_for(src.version, args.mode, forced=bool(found))
        report = {
            "written_by": f"appliance quantize {__version__}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outcome": outcome,
            "forced": bool(found),
            "failures": found,
            "mode": args.mode,
            "source": {"name": src.name, "version": src.version, "device_uid": src.device_uid,
                       "model_file": src.model_file, "sha256": file_sha256(src.onnx_path)},
            "quantized": {"model_file": model_file, "precision": args.mode, "version": version,
                          "device_uid": device_uid_for(staging / model_file),
                          "sha256": file_sha256(staging / model_file)},
            "settings": settings,
            "calibration": {"images": calibration_images, "limit": args.calibration_limit}
            if args.mode == "int8" else None,
            "validation": None if studies is None else {
                "labels": {"file": args.labels.name, "sha256": file_sha256(args.labels)},
                "studies": len(studies), "used": used, "excluded": excluded,
                "metric": "dice_agreement" if src.task == "segmentation" else "auc_and_decision_agreement",
                "tolerance": {"max_auc_drop": args.max_auc_drop, "min_agreement": args.min_agreement},
                "outputs": [asdict(c) for c in checks]},
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _write_manifest(staging, src, model_file, args.mode, version, outcome, found)
        _append_model_card(staging, report)
        if out.exists():
            out.rmdir()   # checked empty in _check_arguments; rename needs it gone
        staging.rename(out)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    pkg = load_package(out)
    pkg.verify_hashes()
    verdict = "FORCED past the tolerance" if found else "within the tolerance"
    print(f"{out}: {pkg.name} {pkg.version} ({pkg.precision}, device UID {pkg.device_uid}), {verdict}; "
          f"report {REPORT_FILE}")
    return 0


def _check_arguments(args, src: ModelPackage) -> None:
    if src.task not in ("classification", "segmentation"):
        raise ConfigError(f"{src.path}: {src.name} is a {src.task} package; quantize checks classification "
                          "(AUC, decision agreement) and segmentation (Dice agreement) packages: checking "
                          "detection is not supported yet")
    if src.precision != "fp32":
        raise ConfigError(f"{src.path}: {src.name} is already {src.precision}; quantise the FP32 package it was "
                          "made from")
    if args.mode == "int8" and args.calibration is None:
        raise ConfigError("--mode int8 needs --calibration DIR: DICOM images the package takes, from which the "
                          "activation ranges are measured")
    if args.calibration is not None and not args.calibration.is_dir():
        raise FileNotFoundError(f"--calibration {args.calibration}: no such folder")
    if (args.validation is None) != (args.labels is None):
        raise ConfigError("--validation DIR and --labels CSV go together: the studies and what each one shows")
    if not 0.0 <= args.max_auc_drop <= 1.0:
        raise ConfigError(f"--max-auc-drop {args.max_auc_drop}: expected an AUC difference between 0 and 1")
    if not 0.0 <= args.min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement {args.min_agreement}: expected a share between 0 and 1")
    if args.calibration_limit < 1:
        raise ConfigError(f"--calibration-limit {args.calibration_limit}: expected at least 1 image")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not an empty folder; choose a new folder "
                          "(a quantised model is a new package) or remove that one")
    if out.resolve() == src.path.resolve():
        raise ConfigError(f"--out {out} is the source package; choose a new folder")


def _version_for(version: str, mode: str, forced: bool) -> str:
    """``0.1.0`` -> ``0.1.0+int8`` (semantic versioning build metadata: same release, other build);
    ``.forced`` is added when the check failed, so every report the node makes with it says so."""
    tag = mode + (".forced" if forced else "")
    return f"{version}.{tag}" if "+" in version else f"{version}+{tag}"


def _write_manifest(staging: Path, src: ModelPackage, model_file: str, mode: str, version: str, outcome: str,
                    found: list[str]) -> None:
    manifest = staging / "manifest.toml"
    origin = f"quantised from {src.name} {src.version} (device UID {src.device_uid}) by appliance quantize"
    note = (f"FORCED past the validation tolerance ({len(found)} failure(s)); {origin}; see {REPORT_FILE}"
            if outcome == "forced" else f"{origin}; checked against FP32, see {REPORT_FILE}")
    manifest.write_text(set_keys(manifest.read_text(), "model", {"precision": mode}, {"precision": note}))
    record(staging, "appliance quantize", model={"file": model_file, "version": version},
           artefacts=[model_file, REPORT_FILE])


def _append_model_card(staging: Path, report: dict) -> None:
    card = staging / "MODEL_CARD.md"
    if not card.is_file():
        return
    lines = ["", "", f"## {report['mode'].upper()} version ({report['quantized']['version']})", "",
             f"Made by `appliance quantize` on {report['created']} from {report['source']['name']} "
             f"{report['source']['version']}; outcome: **{report['outcome']}**. The metrics above are the FP32 "
             f"model's; this version's change against them is in `{REPORT_FILE}`."]
    if report["failures"]:
        lines += ["", "It missed the check and was written with --force:", ""] + [f"- {f}" for f in report["failures"]]
    validation = report["validation"]
    if validation and validation["outputs"] and validation["metric"] == "dice_agreement":
        lines += ["", f"On {validation['used']} validation studies, Dice between the FP32 and the quantised masks:", "",
                  "| output | studies | mean Dice | lowest Dice | pixels FP32 | pixels quantised |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for o in validation["outputs"]:
            lines.append(f"| {o['name']} | {o['studies']} | {_num(o['mean_dice'], '.3f')} | "
                         f"{_num(o['min_dice'], '.3f')} | {o['pixels_fp32']} | {o['pixels_quantized']} |")
    elif validation and validation["outputs"]:
        lines += ["", f"On {validation['used']} validation studies:", "",
                  "| output | AUC FP32 | AUC quantised | change | decision agreement | max prob. difference |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for o in validation["outputs"]:
            lines.append(f"| {o['name']} | {_num(o['auc_fp32'])} | {_num(o['auc_quantized'])} | "
                         f"{_num(o['auc_change'], '+.4f')} | {o['decision_agreement']:.3f} | "
                         f"{o['max_probability_difference']:.4f} |")
    card.write_text(card.read_text().rstrip("\n") + "\n".join(lines) + "\n")


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _summary(mode: str, checks: list[OutputCheck | MaskCheck], used: int) -> str:
    if not checks:
        return f"{mode}: no validation"
    if isinstance(checks[0], MaskCheck):
        rows = [f"{mode} against fp32 on {used} studies, Dice of the two masks:",
                f"  {'output':<16} {'studies':>8} {'mean Dice':>10} {'lowest':>8}"]
        rows += [f"  {c.name:<16} {c.studies:>8} {_num(c.mean_dice, '.3f'):>10} {_num(c.min_dice, '.3f'):>8}"
                 for c in checks]
        return "\n".join(rows)
    rows = [f"{mode} against fp32 on {used} studies:",
            f"  {'output':<16} {'AUC fp32':>9} {'AUC ' + mode:>9} {'change':>8} {'agreement':>10} {'max |dp|':>9}"]
    for c in checks:
        rows.append(f"  {c.name:<16} {_num(c.auc_fp32):>9} {_num(c.auc_quantized):>9} "
                    f"{_num(c.auc_change, '+.4f'):>8} {c.decision_agreement:>10.3f} {c.max_probability_difference:>9.4f}")
    return "\n".join(rows)
