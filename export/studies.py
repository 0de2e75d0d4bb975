"""Labelled DICOM studies for the toolchain, run through a package the way the node runs it.

``appliance evaluate`` and ``appliance quantize`` measure a model on a site's own studies.  Their
numbers mean something only if the model sees what it sees in service, so a study goes through
the node's own stages: pydicom decode, :func:`appliance.kernels.prepare` (same kernels, same
preprocessing from the manifest), the runtime (ONNX Runtime here), and
:func:`appliance.postprocessing.findings` (a series' probability is the highest over its images;
a study's, the highest over its series).

The labels file is CSV with a header.  One column names the study: ``path`` (a DICOM file or a
folder, relative to the studies folder) or ``study_instance_uid`` (matched against the studies
found under it).  The other columns are labels; for a classification package, one column per
output name holding 1/0 (also true/false, yes/no, positive/negative).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.manifest import ModelPackage
from appliance.preprocessing import InputRejected

KEY_COLUMNS = ("path", "study_instance_uid")
_TRUE = {"1", "true", "yes", "positive", "present"}
_FALSE = {"0", "false", "no", "negative", "absent"}


class LabelsError(ValueError):
    """A labels file or studies folder that cannot be used; the message names the row and column."""


@dataclass(frozen=True)
class LabelledStudy:
    key: str                       #: the row's ``path`` or ``study_instance_uid``, as the site wrote it
    row: int                       #: line number in the CSV (the header is line 1)
    files: tuple[Path, ...]
    labels: dict[str, str]         #: every other column, as written


@dataclass
class StudyPrediction:
    study: LabelledStudy
    #: Probability per package output (in manifest order), or None when the package took no image.
    probabilities: np.ndarray | None
    rejected: str | None = None    #: why no image was taken (InputRejected reason)
    images: int = 0
    #: Raw model outputs per series that was run, for tasks that need more than a probability.
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    #: The datasets each series' outputs belong to, in the same order (pixels not kept).
    sources: list[list] = field(default_factory=list)


def _dicom_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _study_uid(path: Path) -> str | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
    except (InvalidDicomError, AttributeError, OSError):
        return None


def read_csv(csv_path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line number, row) of each data row, and the header, of a labels file.

    Read as ``utf-8-sig``: a spreadsheet's "CSV UTF-8" starts with a byte order mark, which would
    otherwise make the first column ``\ufeffpath``.  Column names are stripped (``path, nodule``
    is as good as ``path,nodule``).  The line is the reader's, so a blank line or a quoted value
    over two lines does not shift the line an error names.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # a blank line (or one of empty cells) names no study
            row = dict(zip(header, values))
            if len(values) < len(header):
                row.update((c, "") for c in header[len(values):])
            rows.append((reader.line_num, row))
    return rows, header


def read_labels(csv_path: Path, studies_dir: Path) -> list[LabelledStudy]:
    """The labelled studies a CSV names, each with its DICOM files, checked before any inference."""
    csv_path, studies_dir = Path(csv_path), Path(studies_dir)
    if not studies_dir.is_dir():
        raise FileNotFoundError(f"{studies_dir}: no such folder of studies")
    try:
        rows, header = read_csv(csv_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{csv_path}: no such labels file") from None
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise LabelsError(f"{csv_path}: the header names the column(s) {', '.join(map(repr, repeated))} more than "
                          "once; which one holds the label would be a guess: keep one")
    keys = [c for c in KEY_COLUMNS if c in header]
    if len(keys) != 1:
        raise LabelsError(f"{csv_path}: the header needs exactly one of the columns {', '.join(KEY_COLUMNS)} "
                          f"to name each study; it has {header or 'nothing'}")
    key = keys[0]
    by_uid: dict[str, list[Path]] = defaultdict(list)
    if key == "study_instance_uid":
        for path in _dicom_files(studies_dir):
            uid = _study_uid(path)
            if uid:
                by_uid[uid].append(path)
    studies, seen = [], set()
    for line, row in rows:
        name = (row.get(key) or "").strip()
        if not name:
            raise LabelsError(f"{csv_path}, line {line}: column {key} is empty")
        if name in seen:
            raise LabelsError(f"{csv_path}, line {line}: {key} {name!r} appears twice")
        seen.add(name)
        if key == "path":
            target = (studies_dir / name).resolve()
            if not target.is_relative_to(studies_dir.resolve()) or not target.exists():
                raise LabelsError(f"{csv_path}, line {line}: path {name!r} is not a file or folder "
                                  f"inside {studies_dir}")
            if target in seen:  # "a.dcm" and "./a.dcm": one study counted twice would weigh double
                raise LabelsError(f"{csv_path}, line {line}: path {name!r} is a study an earlier line names")
            seen.add(target)
            files = _dicom_files(target)
        else:
            files = by_uid.get(name, [])
        if not files:
            raise LabelsError(f"{csv_path}, line {line}: no DICOM files for {key} {name!r} under {studies_dir}")
        labels = {k: (v or "").strip() for k, v in row.items() if k != key}
        studies.append(LabelledStudy(name, line, tuple(files), labels))
    if not studies:
        raise LabelsError(f"{csv_path}: no rows")
    return studies


def binary_labels(studies: list[LabelledStudy], pkg: ModelPackage) -> np.ndarray:
    """(studies, outputs) 0/1 array from the columns named after the package's outputs."""
    out = np.zeros((len(studies), len(pkg.outputs)), dtype=np.int8)
    for i, study in enumerate(studies):
        for j, output in enumerate(pkg.outputs):
            if output.name not in study.labels:
                raise LabelsError(f"line {study.row}: no column {output.name!r}; a classification package's "
                                  f"labels need one column per output ({', '.join(o.name for o in pkg.outputs)})")
            value = study.labels[output.name].lower()
            if value not in _TRUE | _FALSE:
                raise LabelsError(f"line {study.row}, column {output.name}: {study.labels[output.name]!r} is not "
                                  "1/0, true/false, yes/no or positive/negative")
            out[i, j] = value in _TRUE
    return out


def make_runtime(pkg: ModelPackage, threads: int = 0):
    """The runtime the node would use for ``pkg`` on this machine (ONNX Runtime on a CPU)."""
    from appliance.runtime import OnnxRuntime

    return OnnxRuntime(pkg, threads)


def predict(runtime, studies: list[LabelledStudy], keep_outputs: bool = False) -> list[StudyPrediction]:
    """Each study through decode, the node's preprocessing, the runtime and its postprocessing."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from appliance import kernels
    from appliance.pipeline import Pipeline
    from appliance.postprocessing import findings

    pkg: ModelPackage = runtime.package
    results = []
    for study in studies:
        series: dict[str, list] = defaultdict(list)
        for path in study.files:
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, OSError):
                continue  # not DICOM (a README in the folder, say): the node would never see it
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
        prediction = StudyPrediction(study, None)
        best: np.ndarray | None = None
        for datasets in series.values():
            try:
                batch, sources, _ = kernels.prepare(datasets, pkg)
            except InputRejected as e:
                prediction.rejected = prediction.rejected or e.reason
                continue
            outputs = Pipeline._infer(runtime, batch)
            probs = np.array([f.probability for f in findings(pkg, outputs)])
            best = probs if best is None else np.maximum(best, probs)
            prediction.images += len(sources)
            if keep_outputs:
                prediction.outputs.append(outputs)
                prediction.sources.append(sources)
        if best is not None:
            prediction.probabilities, prediction.rejected = best, None
        elif prediction.rejected is None:
            prediction.rejected = "no_dicom"
        results.append(prediction)
    return results


def calibration_batches(pkg: ModelPackage, studies_dir: Path, limit: int = 64):
    """Preprocessed model inputs (one per image, NCHW float32) from the DICOM files under a folder,
    for INT8 calibration: the node's own preprocessing, so the ranges are the ones seen in service."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from appliance import kernels

    taken = 0
    for path in _dicom_files(Path(studies_dir)):
        if taken >= limit:
            return
        try:
            ds = pydicom.dcmread(path)
            batch, _, _ = kernels.prepare([ds], pkg)
        except (InvalidDicomError, OSError, InputRejected):
            continue
        taken += 1
        yield batch
