"""Model packages: a folder with ``manifest.toml`` and ``model.onnx``.

The manifest says what a radiologist and a PACS need to know about a model: who made it, which
version, which device UID identifies this trained instance in a report (new on every retrain),
what it takes (modality, body part, photometric interpretation), how its input is prepared, and
what each output means as a coded concept with its thresholds.  Every key is validated on load;
an error names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .tomltable import Table

#: The demo packages that ship inside the distribution.
BUNDLED_DIR = Path(__file__).resolve().parent / "model_packages"

TASKS = ("classification", "segmentation", "detection")
PRECISIONS = ("fp32", "fp16", "int8")
LAYOUTS = ("NCHW", "NHWC")
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
    #: Segmented property category (PS3.3 C.8.20.2, CID 7150); required for segmentation outputs,
    #: where ``finding`` is the segmented property type and ``index`` the channel of the mask.
    category: Code | None = None


@dataclass(frozen=True)
class Applicability:
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    sop_classes: tuple[str, ...]
    photometric_interpretations: tuple[str, ...]


@dataclass(frozen=True)
class ExportSpec:
    """How ``appliance export`` rebuilds ``model.onnx`` from PyTorch (the ``[export]`` table).

    Exactly one source: ``factory`` (``package.module:function`` returning an ``nn.Module``) with
    ``weights`` (a state dict in the package), or ``program`` (a saved ``torch.export`` program).
    """

    factory: str | None
    weights: str | None
    program: str | None
    opset: int
    atol: float
    rtol: float


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
    #: "NCHW" or "NHWC"; the preprocessing kernels produce NCHW and the runtime transposes.
    input_layout: str = "NCHW"
    #: The batch range an engine is built for (TensorRT optimisation profile: min, opt, max).
    min_batch: int = 1
    opt_batch: int = 1
    #: Numeric precision of ``model_file``: "fp32", or "fp16"/"int8" when ``appliance quantize``
    #: produced it (precision is carried by the ONNX graph itself: FP16 tensors, Q/DQ nodes).
    precision: str = "fp32"
    export: ExportSpec | None = None

    @property
    def onnx_path(self) -> Path:
        return self.path / self.model_file

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.toml"

    def verify_hashes(self) -> None:
        """Refuse artefacts that differ from the SHA-256 the manifest records for them.

        A model is a medical device's software: a file changed after export (a copy gone wrong, an
        edit, a swap) must stop the package from loading, not silently change results.
        """
        if self.model_file not in self.hashes:
            raise ManifestError(f"{self.manifest_path}: [hashes] has no entry for {self.model_file!r}; "
                                "run `appliance export` (or `appliance models rehash`) to record it")
        for name, expected in self.hashes.items():
            artefact = self.path / name
            if not artefact.is_file():
                raise ManifestError(f"{self.manifest_path}: [hashes] names {name!r}, which is not in {self.path}")
            actual = file_sha256(artefact)
            if actual != expected:
                raise ManifestError(f"{self.manifest_path}: {name} has {actual}, the manifest records {expected}; "
                                    "the file changed after export: restore it or export the package again")


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
    if isinstance(pre.doc.get("window"), str):
        pre.choice("window", ("voi",))  # "voi": from the instance (PS3.3 C.11.2), same as no window
    elif pre.has("window"):
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
    task = model.choice("task", TASKS)
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
            category=_code(o, "category") if task == "segmentation" or o.has("category") else None,
        ))
        o.done()
    if not outputs:
        raise ManifestError(f"{manifest}: no [[outputs]]; a package must report at least one finding")
    max_batch = inp.integer("max_batch", minimum=1, default=8)
    min_batch = inp.integer("min_batch", minimum=1, default=1)
    opt_batch = inp.integer("opt_batch", minimum=1, default=min_batch)
    if not min_batch <= opt_batch <= max_batch:
        raise ManifestError(f"{manifest}: input.min_batch <= input.opt_batch <= input.max_batch does not hold "
                            f"({min_batch}, {opt_batch}, {max_batch}); these are the engine's batch range")
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
        task=task,
        intended_use=model.string("intended_use"),
        model_file=model.string("file", default="model.onnx"),
        input_name=inp.string("name"),
        input_height=inp.integer("height", minimum=1),
        input_width=inp.integer("width", minimum=1),
        input_channels=channels,
        max_batch=max_batch,
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
        hashes=_hashes(r.table("hashes", {})),
        input_layout=inp.choice("layout", LAYOUTS, default="NCHW"),
        min_batch=min_batch,
        opt_batch=opt_batch,
        precision=model.choice("precision", PRECISIONS, default="fp32"),
        export=_export_spec(r.table("export")) if r.has("export") else None,
    )
    model.done()
    inp.done()
    app.done()
    r.done()
    if not pkg.onnx_path.is_file():
        raise ManifestError(f"{manifest}: model.file = {pkg.model_file!r} does not exist in {path}")
    return pkg


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file, the form ``[hashes]`` records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _hashes(t: Table) -> dict[str, str]:
    hashes = {}
    for name in t.doc:
        value = t.string(name)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise t._bad(name, value, '"sha256:" and 64 lower-case hex digits')
        if "/" in name or name.startswith("."):
            raise t._bad(name, value, "an artefact name inside the package folder")
        hashes[name] = value
    t.done()
    return hashes


def _export_spec(t: Table) -> ExportSpec:
    spec = ExportSpec(
        factory=t.string("factory", None),
        weights=t.string("weights", None),
        program=t.string("program", None),
        opset=t.integer("opset", minimum=7, default=18),
        atol=t.number("atol", 1e-4, minimum=0.0),
        rtol=t.number("rtol", 1e-3, minimum=0.0),
    )
    if (spec.factory is None) == (spec.program is None):
        raise t.error("export: give either factory (with weights) or program, not both or neither")
    if spec.factory is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec.factory):
        raise t._bad("factory", spec.factory, "package.module:function")
    t.done()
    return spec


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
