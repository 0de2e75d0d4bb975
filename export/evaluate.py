"""Measure a model package on the site's own labelled DICOM studies before it goes live.

``appliance evaluate PACKAGE --studies DIR --labels CSV --out DIR`` runs every study through the
node's own decode, preprocessing kernels, runtime and postprocessing (export.studies.predict), and
compares what the package says with what the site's labels say.

Classification packages, per output: prevalence, the confusion matrix at the manifest's
``threshold_positive`` (and at ``--threshold``), accuracy, precision (PPV), sensitivity,
specificity, NPV and F1, each proportion with a Wilson (1927) score interval, and AUC-ROC with a
DeLong (1988) interval; a ROC curve and a calibration plot per output (PNG).  The labels file has
one column per output name holding 1/0 (export/studies.py).

Segmentation packages, per output: Dice and the error of the segmented volume (relative, and in mL,
or mm^2 for a single image, from Pixel Spacing and slice spacing), mean, median and a bootstrap
interval of the mean over studies.  The labels file names a reference mask per study:

* column ``mask``: an integer label map (``.npy``, ``.npz`` or ``.png``) at the image's Rows x
  Columns (or images x Rows x Columns for a series of several images, in Instance Number order);
  pixel value ``v`` belongs to the output whose ``index`` (channel) is ``v``, 0 is background;
* or, per output, column ``mask_<output name>``: a binary mask of that output alone (non-zero is
  inside), for packages whose channel 0 is a structure rather than background.

Mask paths are relative to the labels file's folder.  Detection packages are not supported yet.

Studies the package cannot take (another modality, no pixel data, ...) are excluded and counted by
reason, as the node would reject them.  Nothing written names a patient: studies are named by the
key the site's own labels file uses (``path`` or ``study_instance_uid``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from appliance import __version__
from appliance.manifest import ManifestError, ModelPackage, Output, file_sha256, find_package, load_package
from export.studies import (KEY_COLUMNS, LabelledStudy, LabelsError, StudyPrediction, binary_labels, make_runtime,
                            predict, read_csv, read_labels)

#: The 97.5th percentile of the standard normal distribution: two-sided 95% intervals.
Z95 = 1.959963984540054
#: Resamples and seed of the bootstrap intervals (segmentation): fixed, so a rerun gives the same numbers.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261122
CALIBRATION_BINS = 10


# ---- statistics ----------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson (1927) score interval for a binomial proportion; None when ``n`` is 0.

    Chosen over the Wald interval p +- z sqrt(p(1-p)/n) because a site's validation set is small and
    sensitivities sit near 1: Wald's interval collapses to zero width at 0 or n successes and
    leaves [0, 1], while Wilson's keeps close to its nominal coverage (Brown, Cai, DasGupta 2001).
    """
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denominator
    # At 0 or n successes a bound is exactly 0 or 1; say so rather than leave a rounding error.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0 + 1.0, ends - starts)
    return ranks


def auc_roc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative, ties half
    (the Mann-Whitney U statistic over the product of the class sizes); NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def delong(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """AUC-ROC and its variance by DeLong, DeLong and Clarke-Pearson (1988), Biometrics 44:837.

    The AUC is a U statistic; its variance is estimated from the structural components, each
    positive's share of negatives it outranks (V10) and each negative's share of positives that
    outrank it (V01): var = s2(V10)/m + s2(V01)/n.  Computed from midranks (Sun and Xu 2014), which
    gives the same components as the pairwise definition in O(N log N).  Chosen over a bootstrap
    because it needs no resampling, no seed and gives the same interval on every run.
    Variance NaN when either class has fewer than two studies.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    x, y = scores[labels], scores[~labels]
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    combined = _midranks(np.concatenate([x, y]))
    v10 = (combined[:m] - _midranks(x)) / n
    v01 = 1.0 - (combined[m:] - _midranks(y)) / m
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return auc, float("nan")
    return auc, float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


def delong_interval(auc: float, variance: float, z: float = Z95) -> tuple[float, float] | None:
    """The normal interval auc +- z sqrt(var), kept inside [0, 1]."""
    if not (math.isfinite(auc) and math.isfinite(variance)):
        return None
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at every distinct score, from (0, 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, l = scores[order], labels[order]
    last_of_value = np.r_[s[1:] != s[:-1], True]  # a threshold admits every study with that score
    tp = np.cumsum(l)[last_of_value]
    fp = np.cumsum(~l)[last_of_value]
    tpr = np.r_[0.0, tp / max(l.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~l).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def bootstrap_interval(values: np.ndarray, statistic=np.mean, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap 95% interval of ``statistic`` over studies (Efron 1979), fixed seed."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    stats = statistic(draws, axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _ratio(numerator: int, denominator: int) -> dict:
    """A proportion with its Wilson interval, in the form metrics.json writes (None when 0/0)."""
    ci = wilson_interval(numerator, denominator)
    return {"value": numerator / denominator if denominator else None, "numerator": numerator,
            "denominator": denominator, "ci95": list(ci) if ci else None}


def operating_point(probabilities: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    """Confusion matrix and the proportions read from it; positive means ``p >= threshold``, as
    the node's findings (appliance.postprocessing.Finding.present) decide."""
    predicted = probabilities >= threshold
    truth = truth.astype(bool)
    tp = int(np.sum(predicted & truth))
    fp = int(np.sum(predicted & ~truth))
    fn = int(np.sum(~predicted & truth))
    tn = int(np.sum(~predicted & ~truth))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "threshold": threshold,
        "confusion_matrix": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, tp + fp),       # positive predictive value
        "sensitivity": _ratio(tp, tp + fn),     # recall, true positive rate
        "specificity": _ratio(tn, tn + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": {"value": f1, "ci95": None},       # no closed-form interval; the two it combines have theirs
    }


def calibration_bins(probabilities: np.ndarray, truth: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width bins of the predicted probability: count, mean prediction, observed frequency."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        positives = int(truth[inside].sum())
        ci = wilson_interval(positives, count)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "mean_probability": float(probabilities[inside].mean()) if count else None,
                     "observed": positives / count if count else None, "observed_ci95": list(ci) if ci else None})
    return rows


# ---- classification ---------------------------------------------------------------------------------------

def classification_metrics(pkg: ModelPackage, probabilities: np.ndarray, truth: np.ndarray,
                           extra_threshold: float | None) -> list[dict]:
    """Per output: prevalence, AUC-ROC (DeLong), calibration and the operating points."""
    results = []
    for j, output in enumerate(pkg.outputs):
        p, t = probabilities[:, j], truth[:, j].astype(bool)
        auc, variance = delong(p, t)
        ci = delong_interval(auc, variance)
        note = None
        if ci is None:
            note = "needs at least two positive and two negative studies"
        elif variance == 0.0 and auc in (0.0, 1.0):
            note = ("the classes are perfectly separated on these studies"
                    + (" with the scores reversed" if auc == 0.0 else "")
                    + ": DeLong's variance is 0 and the interval has no width; more studies are needed to "
                    "bound the AUC")
        elif variance == 0.0:
            # Every positive ties with every negative (a constant or saturated output): nothing is ranked.
            note = ("the model gives every positive the same score as every negative (a constant or saturated "
                    "output): it does not rank these studies, and DeLong's variance is 0")
        points = [dict(operating_point(p, t, output.threshold_positive), source="threshold_positive")]
        if extra_threshold is not None:
            points.append(dict(operating_point(p, t, extra_threshold), source="--threshold"))
        results.append({
            "name": output.name,
            "finding": {"value": output.finding.value, "scheme": output.finding.scheme,
                        "meaning": output.finding.meaning},
            "positives": int(t.sum()), "negatives": int((~t).sum()),
            "prevalence": _ratio(int(t.sum()), len(t)),
            "auc": {"value": auc if math.isfinite(auc) else None, "ci95": list(ci) if ci else None,
                    "standard_error": math.sqrt(variance) if math.isfinite(variance) else None,
                    "method": "DeLong 1988", "note": note},
            "brier_score": float(np.mean((p - t) ** 2)),
            "operating_points": points,
            "calibration": calibration_bins(p, t),
        })
    return results


def plot_roc(path: Path, output: dict, probabilities: np.ndarray, truth: np.ndarray, pkg: ModelPackage) -> None:
    """ROC curve with AUC (and its interval) in the legend and each operating point marked."""
    from matplotlib.figure import Figure  # the object API renders with Agg and touches no pyplot state

    fig = Figure(figsize=(6, 6), dpi=100)
    ax = fig.add_subplot()
    fpr, tpr, _ = roc_curve(probabilities, truth)
    auc = output["auc"]
    label = "AUC n/a" if auc["value"] is None else f"AUC {auc['value']:.3f}"
    if auc["ci95"]:
        label += f" (95% CI {auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f}, DeLong)"
    # Points joined by straight lines: a score shared by positives and negatives moves both rates at
    # once, a diagonal whose area under it is the ties' half counted by the AUC; a staircase is not.
    ax.plot(fpr, tpr, color="C0", label=label)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for point, marker, colour in zip(output["operating_points"], ("o", "s"), ("C3", "C2")):
        sens, spec = point["sensitivity"]["value"], point["specificity"]["value"]
        if sens is None or spec is None:
            continue
        ax.plot([1 - spec], [sens], marker=marker, color=colour, linestyle="none", markersize=8,
                label=f"threshold {point['threshold']:g} ({point['source']}): "
                      f"sens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{pkg.name} {pkg.version}: {output['name']} "
                 f"({output['positives']} positive, {output['negatives']} negative)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.savefig(path, format="png")


def plot_calibration(path: Path, output: dict, probabilities: np.ndarray, pkg: ModelPackage) -> None:
    """Reliability diagram (observed frequency per bin of prediction, Wilson bars) over a
    histogram of the predictions."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 7), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = [b for b in output["calibration"] if b["count"]]
    x = np.array([b["mean_probability"] for b in bins])
    y = np.array([b["observed"] for b in bins])
    low = np.maximum([b["observed"] - b["observed_ci95"][0] for b in bins], 0.0)
    high = np.maximum([b["observed_ci95"][1] - b["observed"] for b in bins], 0.0)
    top.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfectly calibrated")
    top.errorbar(x, y, yerr=[low, high], marker="o", color="C0", capsize=3,
                 label=f"observed (Wilson 95% CI); Brier {output['brier_score']:.3f}")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("observed frequency of the finding")
    top.set_title(f"{pkg.name} {pkg.version}: {output['name']} calibration", fontsize=10)
    top.legend(loc="lower right", fontsize=8)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    bottom.hist(probabilities, bins=edges, color="C0", alpha=0.7)
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("studies")
    bottom.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    fig.savefig(path, format="png")


# ---- segmentation -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceMasks:
    """Where a study's reference masks are: one label map (``mask``) or one file per output."""

    label_map: Path | None
    per_output: dict[str, Path]


def _mask_columns(csv_path: Path, studies: list[LabelledStudy], pkg: ModelPackage) -> list[ReferenceMasks]:
    base = csv_path.resolve().parent
    result = []
    for study in studies:
        per_output = {}
        label_map = None
        for output in pkg.outputs:
            column = f"mask_{output.name}"
            if study.labels.get(column):
                per_output[output.name] = _mask_path(csv_path, study, column, base)
        missing = [o for o in pkg.outputs if o.name not in per_output]
        if missing:
            if not study.labels.get("mask"):
                raise LabelsError(f"{csv_path}, line {study.row}: no reference mask for "
                                  f"{', '.join(o.name for o in missing)}; give a column mask (an integer label "
                                  "map) or mask_<output name> (a binary mask) naming a .npy, .npz or .png file")
            zero = [o.name for o in missing if o.index == 0]
            if zero:
                raise LabelsError(f"{csv_path}, line {study.row}, column mask: output {', '.join(zero)} is channel "
                                  "0, which a label map keeps for background; give it a binary mask in column "
                                  f"mask_{zero[0]}")
            shared = sorted({o.index for o in missing if sum(m.index == o.index for m in missing) > 1})
            if shared:
                # Two outputs on one value of the label map (channel v of two tensors): whichever
                # is measured against it, one of them is measured against the other's structure.
                both = [o.name for o in missing if o.index in shared]
                raise LabelsError(f"{csv_path}, line {study.row}, column mask: outputs {', '.join(both)} are all "
                                  f"channel {shared[0]}, one value of a label map; give each a binary mask in "
                                  f"its own column mask_<output name>")
            label_map = _mask_path(csv_path, study, "mask", base)
        result.append(ReferenceMasks(label_map, per_output))
        for column, path in [("mask", label_map), *((f"mask_{k}", v) for k, v in per_output.items())]:
            if path is not None:
                _load_mask(csv_path, study, column, path)  # a broken mask fails before any inference
    return result


def _load_mask(csv_path: Path, study: LabelledStudy, column: str, path: Path) -> np.ndarray:
    try:
        return read_mask(path)
    except (ValueError, OSError) as e:
        raise LabelsError(f"{csv_path}, line {study.row}, column {column}: {path.name} {e}") from None


def _mask_path(csv_path: Path, study: LabelledStudy, column: str, base: Path) -> Path:
    path = (base / study.labels[column]).resolve()
    if not path.is_file():
        raise LabelsError(f"{csv_path}, line {study.row}, column {column}: {study.labels[column]!r} is not a file "
                          f"(mask paths are relative to {base})")
    if path.suffix.lower() not in (".npy", ".npz", ".png"):
        raise LabelsError(f"{csv_path}, line {study.row}, column {column}: {path.name} is not .npy, .npz or .png")
    return path


def read_mask(path: Path) -> np.ndarray:
    """An integer mask from ``.npy``, ``.npz`` (array ``mask``, or its only array) or ``.png``.
    A ``.npy`` is memory-mapped: checking every mask before inference reads only its header."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            mask = np.asarray(image)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            if "mask" not in names and len(names) != 1:
                raise ValueError(f"holds {names}; name the array 'mask' or keep only one")
            mask = archive["mask" if "mask" in names else names[0]]
    else:
        mask = np.load(path, mmap_mode="r", allow_pickle=False)
    if mask.dtype.kind not in "iub" or mask.ndim not in (2, 3):
        raise ValueError(f"is a {mask.ndim}-D {mask.dtype} array; expected a 2-D or 3-D integer label map")
    return mask


def _instance_number(ds) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _spacing(ds) -> tuple[float | None, str | None]:
    """Area of one pixel in mm^2: Pixel Spacing (PS3.3 C.7.6.2.1.1), else Imager Pixel Spacing
    (at the detector plane, PS3.3 C.8.11.4: a radiograph's projection, not magnification-corrected)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return float(value[0]) * float(value[1]), keyword
        except (TypeError, ValueError):
            continue
    return None, None


def _slice_spacing(slices: list) -> float | None:
    """Thickness one slice stands for: the distance between neighbouring slices' Image Position
    (Patient) along the normal of their Image Orientation (Patient) (PS3.3 C.7.6.2.1.1), else
    Spacing Between Slices, else Slice Thickness.  A CT series reconstructed with overlap (1.25 mm
    slices every 0.625 mm) rarely carries Spacing Between Slices, an MR attribute, and its Slice
    Thickness would count every voxel twice."""
    try:
        orientation = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    except (AttributeError, TypeError, ValueError):
        orientation = positions = None
    if orientation is not None and orientation.shape == (6,) and positions.shape == (len(slices), 3):
        normal = np.cross(orientation[:3], orientation[3:])
        steps = np.diff(np.sort(positions @ normal))   # whatever order the Instance Numbers give
        if len(steps) and np.all(steps > 1e-6) and np.linalg.norm(normal) > 0.5:
            return float(np.median(steps))
    ds = slices[0]
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def predicted_masks(pkg: ModelPackage, outputs: dict[str, np.ndarray], sources: list) -> dict[str, list[np.ndarray]]:
    """Per output, the model's mask on each source image's own grid: the output's activation, the
    probability map resampled onto Rows x Columns (appliance.kernels.resample, the preprocessing's
    resize run backwards), then ``>= threshold_positive``."""
    from appliance import kernels

    masks: dict[str, list[np.ndarray]] = {}
    activated: dict[tuple[str, str], np.ndarray] = {}
    for output in pkg.outputs:
        raw = outputs[output.tensor]
        if raw.ndim != 4 or raw.shape[0] != len(sources) or output.index >= raw.shape[1]:
            raise ManifestError(f"{pkg.manifest_path}: output {output.name} reads channel {output.index} of "
                                f"{output.tensor}, which has shape {raw.shape}; a segmentation output must be "
                                "(images, channels, height, width)")
        key = (output.tensor, output.activation)
        if key not in activated:
            if output.activation == "softmax":
                activated[key] = kernels.softmax(raw, axis=1)
            elif output.activation == "sigmoid":
                activated[key] = kernels.sigmoid(raw)
            else:
                activated[key] = raw.astype(np.float32)
        probability = activated[key][:, output.index]
        masks[output.name] = [
            kernels.resample(probability[i], int(ds.Rows), int(ds.Columns), pkg.preprocessing.resize)
            >= output.threshold_positive
            for i, ds in enumerate(sources)]
    return masks


def dice(predicted: np.ndarray, reference: np.ndarray) -> float | None:
    """Dice (1945) overlap 2|A n B| / (|A| + |B|); None when both are empty (nothing to overlap)."""
    total = int(predicted.sum()) + int(reference.sum())
    return 2.0 * int(np.sum(predicted & reference)) / total if total else None


def segmentation_study(pkg: ModelPackage, prediction: StudyPrediction, masks: ReferenceMasks,
                       csv_path: Path) -> dict[str, dict]:
    """Dice and segmented volume (or area) per output for one study."""
    outputs, sources = prediction.outputs[0], prediction.sources[0]
    order = sorted(range(len(sources)), key=lambda i: _instance_number(sources[i]))
    predicted = predicted_masks(pkg, outputs, sources)
    files: dict[Path, np.ndarray] = {}

    def reference(output: Output) -> list[np.ndarray]:
        path = masks.per_output.get(output.name, masks.label_map)
        column = f"mask_{output.name}" if output.name in masks.per_output else "mask"
        if path not in files:
            files[path] = _load_mask(csv_path, prediction.study, column, path)
        data = files[path]
        stack = data[None] if data.ndim == 2 else data
        expected = [(int(sources[i].Rows), int(sources[i].Columns)) for i in order]
        if len(stack) != len(expected) or any(s.shape != e for s, e in zip(stack, expected)):
            raise LabelsError(f"{csv_path}, line {prediction.study.row}, column {column}: {path.name} has shape "
                              f"{data.shape}; the study's {len(expected)} image(s) taken by {pkg.name} are "
                              f"{', '.join(f'{r}x{c}' for r, c in expected)} (images in Instance Number order)")
        if column == "mask":
            return [s == output.index for s in stack]
        return [s != 0 for s in stack]

    areas = [_spacing(sources[i]) for i in order]
    thickness = _slice_spacing([sources[i] for i in order]) if len(order) > 1 else None
    if any(a is None for a, _ in areas) or (len(order) > 1 and thickness is None):
        unit, scale = None, None
    elif len(order) > 1:
        unit, scale = "mL", [a * thickness / 1000.0 for a, _ in areas]  # mm^3 -> mL
    else:
        unit, scale = "mm2", [areas[0][0]]
    result = {}
    for output in pkg.outputs:
        ref = reference(output)
        pred = [predicted[output.name][i] for i in order]
        ref_pixels = [int(r.sum()) for r in ref]
        pred_pixels = [int(p.sum()) for p in pred]
        ref_size = sum(ref_pixels) if unit is None else sum(n * s for n, s in zip(ref_pixels, scale))
        pred_size = sum(pred_pixels) if unit is None else sum(n * s for n, s in zip(pred_pixels, scale))
        result[output.name] = {
            "dice": dice(np.concatenate([p.ravel() for p in pred]), np.concatenate([r.ravel() for r in ref])),
            "reference_pixels": sum(ref_pixels), "predicted_pixels": sum(pred_pixels),
            "unit": unit or "pixels",
            "reference_size": float(ref_size), "predicted_size": float(pred_size),
            "absolute_error": float(pred_size - ref_size),
            "relative_error": float((pred_size - ref_size) / ref_size) if ref_size else None,
            "spacing_from": areas[0][1],
        }
    return result


def _summary(values: list[float | None]) -> dict:
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(present):
        return {"n": 0, "mean": None, "median": None, "ci95": None}
    ci = bootstrap_interval(present)
    return {"n": int(len(present)), "mean": float(present.mean()), "median": float(np.median(present)),
            "ci95": list(ci) if ci else None}


def segmentation_metrics(pkg: ModelPackage, per_study: list[dict[str, dict]]) -> list[dict]:
    """Per output, over studies: Dice and volume errors, mean, median and bootstrap interval of the mean."""
    results = []
    for output in pkg.outputs:
        rows = [s[output.name] for s in per_study]
        units = {r["unit"] for r in rows}
        unit = units.pop() if len(units) == 1 else None
        results.append({
            "name": output.name, "threshold": output.threshold_positive,
            "finding": {"value": output.finding.value, "scheme": output.finding.scheme,
                        "meaning": output.finding.meaning},
            "dice": _summary([r["dice"] for r in rows]),
            # Dice is undefined where neither the reference nor the model marks anything.
            "empty_in_both": sum(r["dice"] is None for r in rows),
            "empty_reference_marked_by_model": sum(r["reference_pixels"] == 0 < r["predicted_pixels"] for r in rows),
            "relative_volume_error": _summary([r["relative_error"] for r in rows]),
            # In mL, mm^2 or pixels; not summarised when studies differ in unit (volumes and areas).
            "absolute_volume_error": dict(_summary([r["absolute_error"] for r in rows] if unit else []), unit=unit),
            "bootstrap": {"method": "percentile bootstrap of the mean over studies", "resamples": BOOTSTRAP_RESAMPLES,
                          "seed": BOOTSTRAP_SEED},
        })
    return results


# ---- the command ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="a model package folder, or the name of one on the node's model search path")
    parser.add_argument("--studies", required=True, type=Path, help="folder of the labelled DICOM studies")
    parser.add_argument("--labels", required=True, type=Path,
                        help="CSV: a column path (relative to --studies) or study_instance_uid naming each study; "
                             "classification: one 1/0 column per output; segmentation: mask or mask_<output>")
    parser.add_argument("--out", type=Path, help="folder for metrics.json, predictions.csv and the plots")
    parser.add_argument("--json", action="store_true", help="print metrics.json on stdout instead of the summary")
    parser.add_argument("--threshold", type=_probability,
                        help="also report the operating point at this probability (classification)")
    parser.add_argument("--config", help="TOML configuration file whose [models] dirs are searched for PACKAGE")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a probability between 0 and 1")
    return value


def resolve_package(spec: str, config: str | None) -> ModelPackage:
    """A package folder, or a name looked up as the node looks it up ([models] dirs, then bundled)."""
    if Path(spec).is_dir():
        return load_package(spec)
    from appliance.config import load

    return find_package(spec, load(config).model_search_path)


def _key_column(csv_path: Path) -> str:
    _, header = read_csv(csv_path)
    return next((c for c in KEY_COLUMNS if c in header), KEY_COLUMNS[0])


#: Errors in what the user gave; appliance.cli prints them as a sentence and exits 2.
USAGE_ERRORS = (LabelsError,)


def run(args) -> int:
    pkg = resolve_package(args.package, args.config)
    pkg.verify_hashes()  # measure the model the manifest describes, as the node would load it
    if pkg.task == "detection":
        print(f"appliance: {pkg.name} is a detection package; evaluating detection (boxes, FROC) is not "
              "supported yet: evaluate a classification or segmentation package", file=sys.stderr)
        return 2
    studies = read_labels(args.labels, args.studies)
    key_column = _key_column(args.labels)
    # Every label is checked before the first inference: a typo on the last line fails in seconds.
    if pkg.task == "classification":
        try:
            truth = binary_labels(studies, pkg)
        except LabelsError as e:
            raise LabelsError(f"{args.labels}, {e}") from None
        masks = None
    else:
        masks = _mask_columns(args.labels, studies, pkg)
    try:
        runtime = make_runtime(pkg)
    except ValueError as e:  # model.onnx lacks the input or an output tensor the manifest names
        raise ManifestError(str(e)) from None
    predictions = predict(runtime, studies, keep_outputs=pkg.task == "segmentation")

    excluded = Counter()
    evaluated = []
    for i, p in enumerate(predictions):
        if p.probabilities is None:
            excluded[p.rejected or "unknown"] += 1
        elif pkg.task == "segmentation" and len(p.outputs) != 1:
            # One reference mask names images of one series; several series would be a guess.
            p.rejected = "several_series"
            excluded[p.rejected] += 1
        else:
            evaluated.append(i)
    report = {
        "package": {"name": pkg.name, "version": pkg.version, "device_uid": pkg.device_uid, "task": pkg.task,
                    "precision": pkg.precision, "model_sha256": pkg.hashes.get(pkg.model_file)},
        "labels": {"file": args.labels.name, "sha256": file_sha256(args.labels), "key": key_column},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "appliance_version": __version__,
        "runtime": "onnxruntime (CPU)",
        "studies": {"listed": len(studies), "evaluated": len(evaluated), "excluded": sum(excluded.values()),
                    "excluded_by_reason": dict(sorted(excluded.items()))},
    }
    if not evaluated:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(excluded.items()))
        print(f"appliance: {pkg.name} took none of the {len(studies)} studies ({reasons}); check that the "
              "studies are the modality and body part its [applicability] names", file=sys.stderr)
        return 1
    # A NaN ranks above every score in the AUC and is never >= a threshold: metrics computed over
    # one would look like numbers and mean nothing.
    broken = [predictions[i].study for i in evaluated if not np.all(np.isfinite(predictions[i].probabilities))]
    if broken:
        named = ", ".join(f"line {s.row} ({s.key})" for s in broken[:5]) + (", ..." if len(broken) > 5 else "")
        print(f"appliance: {pkg.name} gave a probability that is not a number (NaN or infinite) for {len(broken)} "
              f"of the {len(evaluated)} studies it took: {named}; no metrics are computed over such outputs: "
              "check the model (an overflow, a float16 conversion) on these studies", file=sys.stderr)
        return 1

    rows: list[dict] = []
    if pkg.task == "classification":
        probabilities = np.stack([predictions[i].probabilities for i in evaluated])
        labels = truth[evaluated]
        report["methods"] = {"proportions": "Wilson 1927 score interval, 95%", "auc": "DeLong 1988, 95% normal "
                             "interval of the AUC's U-statistic variance, clipped to [0, 1]"}
        report["outputs"] = classification_metrics(pkg, probabilities, labels, args.threshold)
        by_index = {i: k for k, i in enumerate(evaluated)}
        for i, p in enumerate(predictions):
            row = {key_column: p.study.key, "status": "evaluated" if i in by_index else f"excluded: {p.rejected}"}
            for j, output in enumerate(pkg.outputs):
                row[f"{output.name}_label"] = int(truth[i, j])
                row[f"{output.name}_probability"] = (f"{probabilities[by_index[i], j]:.17g}" if i in by_index else "")
            rows.append(row)
    else:
        per_study = {i: segmentation_study(pkg, predictions[i], masks[i], args.labels) for i in evaluated}
        report["methods"] = {"dice": "Dice 1945 on the source image grid", "intervals": "percentile bootstrap of "
                             f"the mean over studies, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"}
        report["outputs"] = segmentation_metrics(pkg, list(per_study.values()))
        for i, p in enumerate(predictions):
            row = {key_column: p.study.key, "status": "evaluated" if i in per_study else f"excluded: {p.rejected}"}
            for output in pkg.outputs:
                r = per_study.get(i, {}).get(output.name, {})
                row[f"{output.name}_dice"] = "" if r.get("dice") is None else f"{r['dice']:.17g}"
                for size in ("reference_size", "predicted_size"):
                    row[f"{output.name}_{size}"] = f"{r[size]:.6g}" if size in r else ""
                row[f"{output.name}_unit"] = r.get("unit", "")
            rows.append(row)

    if args.out:
        plotted = (probabilities, labels) if pkg.task == "classification" else None
        _write(args.out, report, rows, pkg, plotted)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report, args.out))
    return 0


def _write(out: Path, report: dict, rows: list[dict], pkg: ModelPackage,
           plotted: tuple[np.ndarray, np.ndarray] | None) -> None:
    """metrics.json, predictions.csv and, for classification, each output's two plots."""
    out.mkdir(parents=True, exist_ok=True)
    files = ["metrics.json", "predictions.csv"]
    if plotted is not None:
        probabilities, truth = plotted
        for j, output in enumerate(report["outputs"]):
            plot_roc(out / f"roc_{output['name']}.png", output, probabilities[:, j], truth[:, j], pkg)
            plot_calibration(out / f"calibration_{output['name']}.png", output, probabilities[:, j], pkg)
            files += [f"roc_{output['name']}.png", f"calibration_{output['name']}.png"]
    report["files"] = files
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(metric: dict | None, digits: int = 3) -> str:
    if not metric or metric.get("value", metric.get("mean")) is None:
        return "n/a"
    value = metric.get("value", metric.get("mean"))
    ci = metric.get("ci95")
    return f"{value:.{digits}f}" + (f"  [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def summary(report: dict, out: Path | None) -> str:
    """The report for a person: what was measured, on what, and the numbers with their intervals."""
    pkg, s = report["package"], report["studies"]
    lines = [f"{pkg['name']} {pkg['version']} ({pkg['task']}, {pkg['precision']}; device UID {pkg['device_uid']})",
             f"labels {report['labels']['file']} ({report['labels']['sha256'][:19]}...): {s['listed']} studies, "
             f"{s['evaluated']} evaluated, {s['excluded']} excluded"
             + (" (" + ", ".join(f"{r}: {n}" for r, n in s["excluded_by_reason"].items()) + ")" if s["excluded"] else ""),
             "95% intervals in brackets: " + "; ".join(f"{k} {v}" for k, v in report["methods"].items())]
    for o in report["outputs"]:
        lines.append("")
        if pkg["task"] == "classification":
            lines.append(f"{o['name']}: {o['positives']} positive, {o['negatives']} negative; "
                         f"prevalence {_fmt(o['prevalence'])}")
            lines.append(f"  AUC-ROC      {_fmt(o['auc'])}" + (f"  ({o['auc']['note']})" if o["auc"]["note"] else ""))
            for point in o["operating_points"]:
                c = point["confusion_matrix"]
                lines.append(f"  at threshold {point['threshold']:g} ({point['source']}): "
                             f"TP {c['tp']}  FP {c['fp']}  FN {c['fn']}  TN {c['tn']}")
                for name in ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1"):
                    lines.append(f"    {name:<12} {_fmt(point[name])}")
        else:
            unit = o["absolute_volume_error"]["unit"]
            lines.append(f"{o['name']} (threshold {o['threshold']:g}): Dice mean {_fmt(o['dice'])}, median "
                         + ("n/a" if o["dice"]["median"] is None else f"{o['dice']['median']:.3f}")
                         + f" over {o['dice']['n']} studies ({o['empty_in_both']} empty in both)")
            lines.append(f"  relative volume error mean {_fmt(o['relative_volume_error'])}")
            if unit:
                lines.append(f"  absolute volume error mean {_fmt(o['absolute_volume_error'], 4)} {unit}")
    if out:
        lines += ["", f"written to {out}: {', '.join(report.get('files', []))}"]
    return "\n".join(lines)
