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
from typing import Any

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
    r = _Reader(manifest, doc)
    model = r.table("model")
    pre = r.table("preprocessing")
    inp = r.table("input")
    app = r.table("applicability")
    window = None
    if "window" in pre.doc:
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
    for o in r.array_of_tables("outputs"):
        positive = o.number("threshold_positive", lo=0.0, hi=1.0)
        critical = o.number("threshold_critical", lo=0.0, hi=1.0, default=1.0)
        if critical < positive:
            raise ManifestError(f"{manifest}: outputs.threshold_critical = {critical} is below "
                                f"threshold_positive = {positive}; a critical finding must also be positive")
        outputs.append(Output(
            name=o.string("name"),
            tensor=o.string("tensor"),
            index=o.integer("index", minimum=0),
            activation=o.choice("activation", ACTIVATIONS, default="sigmoid"),
            finding=o.code("finding"),
            finding_site=o.code("finding_site") if "finding_site" in o.doc else None,
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
        heatmap_tensor=model.string("heatmap_tensor", default="") or None,
        preprocessing=preprocessing,
        applicability=Applicability(
            modalities=tuple(app.strings("modalities")),
            body_parts=tuple(app.strings("body_parts", default=[])),
            sop_classes=tuple(app.strings("sop_classes", default=[])),
            photometric_interpretations=tuple(app.strings(
                "photometric_interpretations", default=["MONOCHROME1", "MONOCHROME2"])),
        ),
        outputs=tuple(outputs),
        hashes=dict(r.doc.get("hashes", {})),
    )
    model.done()
    inp.done()
    app.done()
    r.known("model", "input", "preprocessing", "applicability", "outputs", "hashes")
    if not pkg.onnx_path.is_file():
        raise ManifestError(f"{manifest}: model.file = {pkg.model_file!r} does not exist in {path}")
    return pkg


def find_package(name: str, search: list[Path]) -> ModelPackage:
    """Find the package called ``name`` in the first folder of ``search`` that holds it."""
    for folder in search:
        candidate = Path(folder) / name
        if (candidate / "manifest.toml").is_file():
            return load_package(candidate)
    where = ", ".join(str(p) for p in search)
    raise ManifestError(f"model package {name!r} not found in {where}; "
                        "add its folder to [models] dirs or fix the route's model name")


_MISSING = object()


class _Reader:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, file: Path, doc: dict[str, Any], prefix: str = ""):
        self.file, self.doc, self.prefix, self.seen = file, doc, prefix, set()

    def _get(self, key: str, default: Any, expected: str) -> Any:
        self.seen.add(key)
        if key in self.doc:
            return self.doc[key]
        if default is _MISSING:
            raise ManifestError(f"{self.file}: missing {self.prefix}{key} ({expected})")
        return default

    def _bad(self, key: str, value: Any, expected: str) -> ManifestError:
        return ManifestError(f"{self.file}: {self.prefix}{key} = {value!r}: expected {expected}")

    def table(self, key: str) -> "_Reader":
        value = self._get(key, _MISSING, "a table")
        if not isinstance(value, dict):
            raise self._bad(key, value, "a table")
        return _Reader(self.file, value, f"{self.prefix}{key}.")

    def array_of_tables(self, key: str) -> list["_Reader"]:
        value = self._get(key, [], "an array of tables")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self._bad(key, value, "an array of tables ([[...]])")
        return [_Reader(self.file, v, f"{self.prefix}{key}[{i}].") for i, v in enumerate(value)]

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default, "a string")
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default, "a list of strings")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "a list of strings")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self._get(key, default, f"one of {', '.join(allowed)}")
        if value not in allowed:
            raise self._bad(key, value, f"one of {', '.join(allowed)}")
        return value

    def integer(self, key: str, minimum: int | None = None, default: Any = _MISSING) -> int:
        value = self._get(key, default, "an integer")
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self._bad(key, value, "an integer" + (f" >= {minimum}" if minimum is not None else ""))
        return value

    def number(self, key: str, lo: float | None = None, hi: float | None = None,
               positive: bool = False, default: Any = _MISSING) -> float:
        value = self._get(key, default, "a number")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi) and (not positive or value > 0)
        if not ok:
            rng = f" in [{lo}, {hi}]" if lo is not None else (" > 0" if positive else "")
            raise self._bad(key, value, "a number" + rng)
        return float(value)

    def numbers(self, key: str, positive: bool = False) -> list[float]:
        value = self._get(key, _MISSING, "a list of numbers")
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or (positive and not all(v > 0 for v in value))):
            raise self._bad(key, value, "a non-empty list of numbers" + (" > 0" if positive else ""))
        return [float(v) for v in value]

    def code(self, key: str) -> Code:
        t = self.table(key)
        c = Code(value=t.string("value"), scheme=t.string("scheme"), meaning=t.string("meaning"))
        t.done()
        return c

    def known(self, *keys: str) -> None:
        for key in self.doc:
            if key not in keys:
                raise ManifestError(f"{self.file}: unknown key {self.prefix}{key}; "
                                    f"expected one of {', '.join(keys)}")

    def done(self) -> None:
        self.known(*self.seen)
