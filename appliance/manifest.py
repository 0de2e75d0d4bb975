"""Model packages: a folder with ``manifest.toml`` and ``model.onnx``.

The manifest says what a radiologist and a PACS need to know about a model: who made it, which
version, which device UID identifies this trained instance in a report (new on every retrain),
what it takes (modality, body part, photometric interpretation), how its input is prepared, and
what each output means as a coded concept with its thresholds.  Every key is validated on load;
an error names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .tomltable import Table

#: The demo packages that ship inside the distribution.
BUNDLED_DIR = Path(__file__).resolve().parent / "model_packages"

TASKS = ("classification", "segmentation", "detection")
ACTIVATIONS = ("sigmoid", "softmax", "none")
RESIZE_MODES = ("area", "bilinear")
MONOCHROME1_MODES = ("invert", "keep")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ManifestError(ValueError):
    """A model package manifest that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): value, coding scheme designator and meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Window:
    """A fixed VOI window (centre, width) in modality units."""

    center: float
    width: float


@dataclass(frozen=True)
class Preprocessing:
    #: ``None`` means "from the DICOM VOI": the instance's first Window Center/Width, or else the
    #: full range of its stored pixel values after the modality LUT.
    window: Window | None
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    monochrome1: str


@dataclass(frozen=True)
class Output:
    """One finding the model reports."""

    name: str
    tensor: str
    index: int
    activation: str
    finding: Code
    finding_site: Code | None
    threshold_positive: float
    threshold_critical: float


@dataclass(frozen=True)
class Applicability:
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    sop_classes: tuple[str, ...]
    photometric_interpretations: tuple[str, ...]


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    name: str
    version: str
    device_uid: str
    manufacturer: str
    task: str
    intended_use: str
    model_file: str
    input_name: str
    input_height: int
    input_width: int
    input_channels: int
    max_batch: int
    heatmap_tensor: str | None
    preprocessing: Preprocessing
    applicability: Applicability
    outputs: tuple[Output, ...]
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.path / self.model_file


def load_package(path: str | Path) -> ModelPackage:
    """Read and validate ``path/manifest.toml``."""
    path = Path(path)
    manifest = path / "manifest.toml"
    try:
        with open(manifest, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{manifest}: no manifest; a model package is a folder with manifest.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{manifest}: not valid TOML: {e}") from None
    r = Table(doc, "", lambda message: ManifestError(f"{manifest}: {message}"))
    model = r.table("model")
    pre = r.table("preprocessing")
    inp = r.table("input")
    app = r.table("applicability")
    window = None
    if pre.has("window"):
        w = pre.table("window")
        window = Window(w.number("center"), w.number("width", positive=True))
        w.done()
    channels = inp.integer("channels", minimum=1)
    mean = tuple(pre.numbers("mean"))
    std = tuple(pre.numbers("std", positive=True))
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise ManifestError(
            f"{manifest}: [preprocessing] mean and std must have 1 or {channels} (input.channels) values each, "
            f"got {len(mean)} and {len(std)}")
    preprocessing = Preprocessing(
        window=window,
        resize=pre.choice("resize", RESIZE_MODES, default="area"),
        mean=mean,
        std=std,
        monochrome1=pre.choice("monochrome1", MONOCHROME1_MODES, default="invert"),
    )
    pre.done()
    outputs = []
    for o in r.tables("outputs"):
        positive = o.number("threshold_positive", minimum=0.0, maximum=1.0)
        critical = o.number("threshold_critical", 1.0, minimum=0.0, maximum=1.0)
        if critical < positive:
            raise ManifestError(f"{manifest}: outputs.threshold_critical = {critical} is below "
                                f"threshold_positive = {positive}; a critical finding must also be positive")
        outputs.append(Output(
            name=o.string("name"),
            tensor=o.string("tensor"),
            index=o.integer("index", minimum=0),
            activation=o.choice("activation", ACTIVATIONS, default="sigmoid"),
            finding=_code(o, "finding"),
            finding_site=_code(o, "finding_site") if o.has("finding_site") else None,
            threshold_positive=positive,
            threshold_critical=critical,
        ))
        o.done()
    if not outputs:
        raise ManifestError(f"{manifest}: no [[outputs]]; a package must report at least one finding")
    device_uid = model.string("device_uid")
    if len(device_uid) > 64 or not _UID_RE.match(device_uid):
        raise ManifestError(f"{manifest}: model.device_uid = {device_uid!r} is not a DICOM UID "
                            "(digits and dots, at most 64 characters)")
    pkg = ModelPackage(
        path=path,
        name=model.string("name"),
        version=model.string("version"),
        device_uid=device_uid,
        manufacturer=model.string("manufacturer"),
        task=model.choice("task", TASKS),
        intended_use=model.string("intended_use"),
        model_file=model.string("file", default="model.onnx"),
        input_name=inp.string("name"),
        input_height=inp.integer("height", minimum=1),
        input_width=inp.integer("width", minimum=1),
        input_channels=channels,
        max_batch=inp.integer("max_batch", minimum=1, default=8),
        heatmap_tensor=model.string("heatmap_tensor", None),
        preprocessing=preprocessing,
        applicability=Applicability(
            modalities=tuple(app.strings("modalities")),
            body_parts=tuple(app.strings("body_parts", default=[])),
            sop_classes=tuple(app.strings("sop_classes", default=[])),
            photometric_interpretations=tuple(app.strings(
                "photometric_interpretations", default=["MONOCHROME1", "MONOCHROME2"])),
        ),
        outputs=tuple(outputs),
        hashes=dict(r.table("hashes", {}).doc),
    )
    model.done()
    inp.done()
    app.done()
    r.done()
    if not pkg.onnx_path.is_file():
        raise ManifestError(f"{manifest}: model.file = {pkg.model_file!r} does not exist in {path}")
    return pkg


def _code(t: Table, key: str) -> Code:
    c = t.table(key)
    code = Code(value=c.string("value"), scheme=c.string("scheme"), meaning=c.string("meaning"))
    c.done()
    return code


def find_package(name: str, search: list[Path]) -> ModelPackage:
    """Find the package called ``name`` in the first folder of ``search`` that holds it."""
    for folder in search:
        candidate = Path(folder) / name
        if (candidate / "manifest.toml").is_file():
            return load_package(candidate)
    where = ", ".join(str(p) for p in search)
    raise ManifestError(f"model package {name!r} not found in {where}; "
                        "add its folder to [models] dirs or fix the route's model name")
