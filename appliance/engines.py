"""TensorRT engines: built from a model package's ONNX for this GPU, checked before every load.

An engine (a serialised TensorRT plan) is specific to the TensorRT version that built it and to
the GPU's compute capability, and it is a compiled copy of one ONNX file.  So each engine is
stored under a key of all three, with a JSON metadata file beside it::

    <data_dir>/engines/trt-10.3.0/sm_86/timing.cache
    <data_dir>/engines/trt-10.3.0/sm_86/cxr-triage/model.plan
    <data_dir>/engines/trt-10.3.0/sm_86/cxr-triage/model.json

Engines live under the node's ``data_dir``, not in the package: packages may sit on a read-only
path (``/opt/appliance`` under ``ProtectSystem=strict``), and one package folder can serve hosts
with different GPUs.  An engine whose metadata names another TensorRT version, another compute
capability, another ONNX hash, another batch range or precision, or whose plan bytes do not hash
to what the metadata records, is never deserialised: ``appliance build-engine`` rebuilds it, and
the node refuses it (``runtime = "tensorrt"``) or falls back to ONNX Runtime (``"auto"``).

The TensorRT calls are the API shared by TensorRT 10.x and 11.x: a strongly typed network parsed
from ONNX (precision is the graph's: FP32, FP16 tensors, INT8 as Q/DQ nodes; no precision builder
flags, which 11.0 removed), one optimisation profile from the manifest's batch range, a workspace
pool limit, a persistent timing cache, ``build_serialized_network``; at run time named I/O
tensors, ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3``.

``tensorrt`` and ``pycuda`` (extra ``gpu``) are imported inside functions only: the CLI imports
this module to build its parser on every host, GPU or not.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import glob
import hashlib
import importlib
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .manifest import ManifestError, ModelPackage, file_sha256

log = logging.getLogger("appliance.engines")

#: Metadata layout version; a file of another format is stale, not an error.
METADATA_FORMAT = 1
#: TensorRT's builder scratch memory: enough for the tactics of a radiograph classifier or a 2-D
#: U-Net at batch 8, small enough to leave the node's preprocessing kernels room on an 8 GB GPU.
DEFAULT_WORKSPACE_MB = 2048
#: TensorRT's own default level (0 fastest build .. 5 most tactics); recorded in the metadata.
DEFAULT_OPTIMIZATION_LEVEL = 3
#: The oldest TensorRT whose API this module uses (named tensors, execute_async_v3,
#: get_tensor_profile_shape, IParserError.node_name: all in 10.0).
MIN_TENSORRT_MAJOR = 10

EXIT_BUILD_FAILED = 1
EXIT_NO_GPU = 3

RUNTIMES = ("onnxruntime", "tensorrt", "auto")


class EngineError(RuntimeError):
    """An engine that cannot be built or loaded; the message says which, why, and what to do."""


class NoGpuError(EngineError):
    """TensorRT cannot run on this host: the message lists every missing piece."""


# ---- the key: TensorRT version, compute capability, ONNX hash --------------------------------------

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def tensorrt_version(text: str) -> str:
    """``major.minor.patch`` of a TensorRT version string (``tensorrt.__version__`` is e.g.
    ``10.3.0.26``; the build number does not change the plan format, the patch release may)."""
    m = _VERSION_RE.match(text.strip())
    if not m:
        raise EngineError(f"TensorRT version {text!r} is not major.minor.patch; "
                          "is the tensorrt module a real TensorRT build?")
    return ".".join(m.groups())


def sm(compute_capability: tuple[int, int]) -> str:
    """``sm_86`` for compute capability 8.6, the name nvcc and NVIDIA's tables use."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"


@dataclass(frozen=True)
class Platform:
    """What an engine is specific to, read from the running TensorRT and GPU 0."""

    tensorrt: str                       # major.minor.patch
    compute_capability: tuple[int, int]
    gpu_name: str = ""
    cuda_driver: str = ""

    @property
    def sm(self) -> str:
        return sm(self.compute_capability)

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt.split(".")[0])


@dataclass(frozen=True)
class EngineKey:
    """The three things an engine is valid for; any change makes it a different engine."""

    tensorrt: str
    compute_capability: tuple[int, int]
    onnx_sha256: str

    def directory(self, engines_dir: Path) -> Path:
        """The folder of every engine (and the timing cache) for this TensorRT and GPU."""
        return Path(engines_dir) / f"trt-{self.tensorrt}" / sm(self.compute_capability)


@dataclass(frozen=True)
class EnginePaths:
    plan: Path
    metadata: Path
    timing_cache: Path
    lock: Path


def engine_paths(engines_dir: Path, platform: Platform, package: ModelPackage) -> EnginePaths:
    """Where ``package``'s engine for ``platform`` lives.  The package name is a folder of its own
    because every package's model is typically called ``model.onnx``."""
    base = Path(engines_dir) / f"trt-{platform.tensorrt}" / platform.sm
    stem = Path(package.model_file).stem
    folder = base / package.name
    return EnginePaths(plan=folder / f"{stem}.plan", metadata=folder / f"{stem}.json",
                       timing_cache=base / "timing.cache", lock=folder / f".{stem}.lock")


# ---- the optimisation profile -------------------------------------------------------------------------

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileShapes:
    min: Shape
    opt: Shape
    max: Shape

    def as_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def input_shape(package: ModelPackage, batch: int) -> Shape:
    """The model input's shape for ``batch`` images, in the layout the ONNX graph takes."""
    c, h, w = package.input_channels, package.input_height, package.input_width
    if package.input_layout == "NHWC":
        return (batch, h, w, c)
    return (batch, c, h, w)


def optimization_profile(package: ModelPackage) -> dict[str, ProfileShapes]:
    """One TensorRT optimisation profile from the manifest: the batch range (min, opt, max) on
    the batch axis, the fixed C, H, W on the others, placed as ``input.layout`` says."""
    return {package.input_name: ProfileShapes(
        min=input_shape(package, package.min_batch),
        opt=input_shape(package, package.opt_batch),
        max=input_shape(package, package.max_batch),
    )}


def profile_json(profile: dict[str, ProfileShapes]) -> dict[str, dict[str, list[int]]]:
    return {name: shapes.as_json() for name, shapes in profile.items()}


def check_profile_fits(profile: dict[str, ProfileShapes], network_inputs: dict[str, Sequence[int]],
                       where: str) -> None:
    """Refuse a profile that does not fit the ONNX graph's inputs (names, rank, fixed sizes).

    ``network_inputs``: input name -> dimensions as the parsed network reports them, -1 for a
    dynamic one.  TensorRT would refuse too, with a message about "profile dimensions"; this one
    names the manifest key to fix.
    """
    missing = sorted(set(network_inputs) - set(profile))
    if missing:
        raise EngineError(f"{where}: the model has input(s) {missing} that the manifest does not describe "
                          f"(input.name = {sorted(profile)}); the appliance feeds one image input")
    for name, shapes in profile.items():
        if name not in network_inputs:
            raise EngineError(f"{where}: no input named {name!r} (the manifest's input.name); "
                              f"the model has {sorted(network_inputs)}")
        dims = tuple(int(d) for d in network_inputs[name])
        if len(dims) != len(shapes.max):
            raise EngineError(f"{where}: input {name!r} has {len(dims)} dimensions {list(dims)}, the manifest "
                              f"describes {len(shapes.max)} ({list(shapes.max)}); check input.layout")
        for axis, size in enumerate(dims):
            if size < 0:
                continue
            if axis == 0:
                if not shapes.min[0] == shapes.max[0] == size:
                    raise EngineError(
                        f"{where}: input {name!r} has a fixed batch of {size}, the manifest's batch range is "
                        f"{shapes.min[0]}..{shapes.max[0]}; export with a dynamic batch dimension "
                        "(`appliance export`) or set input.min_batch = input.max_batch")
            elif shapes.max[axis] != size:
                raise EngineError(f"{where}: input {name!r} is {list(dims)}, the manifest says {list(shapes.max[1:])} "
                                  "after the batch; fix input.channels/height/width/layout")


def network_flags(tensorrt_major: int, creation_flags: Any) -> int:
    """The ``create_network`` flags of a strongly typed network.

    TensorRT 10: opt in with ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (NvInfer.h 10.x:
    kEXPLICIT_BATCH = 0, deprecated and ignored; kSTRONGLY_TYPED = 1).  TensorRT 11: every network
    is strongly typed; EXPLICIT_BATCH is gone, kSTRONGLY_TYPED = 0 is "retained for API
    compatibility but ignored", and bit 1 is now kPREFER_JIT_PYTHON_PLUGINS, so a hard-coded
    ``1 << 1`` would ask 11 for something else entirely.  Nothing is passed there, and on 10 the
    bit is read from the enum.
    """
    if tensorrt_major >= 11:
        return 0
    return 1 << int(creation_flags.STRONGLY_TYPED)


def parser_errors(parser: Any) -> list[str]:
    """The ONNX parser's errors, one line each, by ONNX node (``IParserError.node_name`` and
    ``node_operator`` exist since TensorRT 10.0)."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node()
        name = e.node_name() if hasattr(e, "node_name") else ""
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        where = f"node {node}" if node >= 0 else "graph"
        if name or op:
            where += f" {name!r}" + (f" ({op})" if op else "")
        lines.append(f"{where}: {e.code()}: {e.desc()}")
    return lines


# ---- metadata -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineMetadata:
    """What an engine was built from and for; written beside the plan, read before every load."""

    package: str
    package_version: str
    model_file: str
    onnx_sha256: str
    tensorrt: str
    compute_capability: tuple[int, int]
    gpu_name: str
    cuda_driver: str
    profile: dict[str, dict[str, list[int]]]
    precision: str
    workspace_mb: int
    builder: dict[str, Any]
    built_at: str
    build_seconds: float
    plan_sha256: str
    plan_bytes: int
    format: int = METADATA_FORMAT

    @property
    def key(self) -> EngineKey:
        return EngineKey(self.tensorrt, self.compute_capability, self.onnx_sha256)

    def to_json(self) -> str:
        doc = {**self.__dict__, "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
               "sm": sm(self.compute_capability)}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EngineMetadata":
        """Parse a metadata file; :class:`EngineError` when it is not one this version writes."""
        try:
            doc = json.loads(text)
            if doc.get("format") != METADATA_FORMAT:
                raise EngineError(f"metadata format {doc.get('format')!r}, this appliance writes {METADATA_FORMAT}")
            major, minor = (int(x) for x in str(doc["compute_capability"]).split("."))
            doc.pop("sm", None)
            return cls(**{**doc, "compute_capability": (major, minor)})
        except EngineError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EngineError(f"not an engine metadata file ({type(e).__name__}: {e})") from None


def read_metadata(path: Path) -> EngineMetadata | None:
    """The metadata at ``path``, or None when there is none; unreadable is an :class:`EngineError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return EngineMetadata.from_json(text)
    except EngineError as e:
        raise EngineError(f"{path}: {e}") from None


def stale_reasons(meta: EngineMetadata | None, platform: Platform, package: ModelPackage,
                  onnx_sha256: str) -> list[str]:
    """Why an engine must not be loaded for ``package`` on ``platform`` (empty: it may be, once
    its plan hashes to ``meta.plan_sha256``; see :func:`read_plan`)."""
    if meta is None:
        return ["no engine has been built"]
    reasons = []
    if meta.tensorrt != platform.tensorrt:
        reasons.append(f"built with TensorRT {meta.tensorrt}, this host runs {platform.tensorrt}")
    if meta.compute_capability != platform.compute_capability:
        reasons.append(f"built for {sm(meta.compute_capability)} ({meta.gpu_name or 'unknown GPU'}), "
                       f"this GPU is {platform.sm} ({platform.gpu_name or 'unknown'})")
    if meta.onnx_sha256 != onnx_sha256:
        reasons.append(f"built from {package.model_file} with {meta.onnx_sha256}, the package's file now has "
                       f"{onnx_sha256}")
    if meta.package != package.name or meta.model_file != package.model_file:
        reasons.append(f"built for {meta.package}/{meta.model_file}, not {package.name}/{package.model_file}")
    wanted = profile_json(optimization_profile(package))
    if meta.profile != wanted:
        reasons.append(f"built for input shapes {meta.profile}, the manifest now asks for {wanted}")
    if meta.precision != package.precision:
        reasons.append(f"built for precision {meta.precision}, the manifest says {package.precision}")
    return reasons


def read_plan(paths: EnginePaths, meta: EngineMetadata) -> bytes:
    """The plan's bytes, once they hash to what the metadata records.

    The hash is taken over the very bytes that are then deserialised, so a file replaced between
    check and load cannot slip through.  This catches a truncated or corrupted plan (a full disk,
    a copy gone wrong), which TensorRT would otherwise reject with an opaque error or, worse, load.
    It is not authentication: NVIDIA's guidance is to deserialise only plans built on a trusted
    host, and the engines directory is the node's own (``StateDirectory=``, mode 0750).
    """
    try:
        data = paths.plan.read_bytes()
    except FileNotFoundError:
        raise EngineError(f"{paths.plan}: the plan file is missing though {paths.metadata.name} names it; "
                          "run `appliance build-engine` to rebuild it") from None
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest != meta.plan_sha256 or len(data) != meta.plan_bytes:
        raise EngineError(f"{paths.plan}: {len(data)} bytes with {digest}, the metadata records {meta.plan_bytes} "
                          f"bytes with {meta.plan_sha256}; the plan is damaged: run `appliance build-engine` "
                          "to rebuild it")
    return data


# ---- files written atomically -------------------------------------------------------------------------

def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so a reader sees the old file or the new one, never a part: a temporary file
    in the same folder, flushed to disk, renamed over it, and the folder synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One build of an engine at a time (the boot-time unit and an operator's command)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another build of %s is running; waiting for it", path.parent)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- is there a GPU TensorRT can use? -----------------------------------------------------------------

def missing_gpu_pieces(tensorrt_version_text: str | None, device_nodes: Sequence[str], driver_loadable: bool,
                       pycuda_importable: bool) -> list[str]:
    """What this host lacks to build or run a TensorRT engine, each with its fix (empty: nothing)."""
    missing = []
    if not device_nodes:
        missing.append("no NVIDIA GPU: /dev/nvidia0 does not exist (no GPU in this host, or the NVIDIA "
                       "kernel driver is not loaded; check `nvidia-smi`)")
    if not driver_loadable:
        missing.append("no CUDA driver: libcuda.so.1 cannot be loaded (install the NVIDIA driver)")
    if tensorrt_version_text is None:
        missing.append("no TensorRT: the Python module `tensorrt` is not installed "
                       "(pip install 'appliance[gpu]', TensorRT 10 or 11)")
    else:
        try:
            major = int(tensorrt_version(tensorrt_version_text).split(".")[0])
        except EngineError as e:
            missing.append(str(e))
        else:
            if major < MIN_TENSORRT_MAJOR:
                missing.append(f"TensorRT {tensorrt_version_text} is too old: the appliance uses the API of "
                               f"TensorRT {MIN_TENSORRT_MAJOR} and later (pip install 'tensorrt>={MIN_TENSORRT_MAJOR}')")
    if not pycuda_importable:
        missing.append("no pycuda: the Python module `pycuda` is not installed (pip install 'appliance[gpu]')")
    return missing


def _host_facts() -> tuple[str | None, list[str], bool, bool]:
    try:
        import tensorrt as trt

        version = str(trt.__version__)
    except ImportError:
        version = None
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    try:
        ctypes.CDLL("libcuda.so.1")
        driver = True
    except OSError:
        driver = False
    try:
        importlib.import_module("pycuda.driver")
        pycuda_ok = True
    except ImportError:
        pycuda_ok = False
    return version, nodes, driver, pycuda_ok


def probe_platform() -> Platform:
    """TensorRT's version and GPU 0's compute capability, or :class:`NoGpuError` listing what is
    missing.  Reads the device through pycuda's driver API without creating a context."""
    version, nodes, driver, pycuda_ok = _host_facts()
    missing = missing_gpu_pieces(version, nodes, driver, pycuda_ok)
    if missing:
        raise NoGpuError("TensorRT engines cannot be built or run on this host:\n  - " + "\n  - ".join(missing))
    import pycuda.driver as cuda

    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise NoGpuError("TensorRT engines cannot be built or run on this host: the CUDA driver sees no GPU "
                             "(check `nvidia-smi` and CUDA_VISIBLE_DEVICES)")
        device = cuda.Device(0)
        driver_version = cuda.get_driver_version()  # e.g. 12040 for CUDA 12.4
        return Platform(tensorrt=tensorrt_version(version), compute_capability=tuple(device.compute_capability()),
                        gpu_name=device.name(), cuda_driver=f"{driver_version // 1000}.{driver_version % 1000 // 10}")
    except cuda.Error as e:
        raise NoGpuError(f"TensorRT engines cannot be built or run on this host: the CUDA driver failed ({e}); "
                         "check `nvidia-smi` and the driver installation") from None


# ---- building -----------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    #: TF32 tensor-core maths for FP32 layers (TensorRT's default, Ampere and later).  Off keeps FP32
    #: packages closest to ONNX Runtime's numbers, at some speed.
    tf32: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


_trt_logger_instance = None
_trt_logger_lock = threading.Lock()


def _trt_logger(trt):
    """TensorRT's ILogger into this module's log, one per process (TensorRT keeps the logger of the
    first builder or runtime it creates).  ``log`` must not raise: TensorRT calls it from C++."""
    global _trt_logger_instance
    with _trt_logger_lock:
        if _trt_logger_instance is None:
            levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                      trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG}

            class Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)

                def log(self, severity, msg):
                    with contextlib.suppress(Exception):
                        log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

            _trt_logger_instance = Logger()
        return _trt_logger_instance


#: What ``appliance quantize`` records of how it made an INT8 package (its report's settings).
QUANTIZATION_REPORT = "quantization_report.json"


def tensorrt_refusal(package: ModelPackage) -> str | None:
    """Why TensorRT cannot build this package as it is, or None.

    TensorRT takes INT8 only as symmetric Q/DQ pairs with int8 activations (zero point 0);
    ``appliance quantize --target onnxruntime`` (the default) writes uint8 activations with a zero
    point, which is what ONNX Runtime runs fastest on x86 and what TensorRT's ONNX parser refuses.
    Said before the build, in the package's own terms, instead of as a parser error.
    """
    if package.precision != "int8":
        return None
    report = package.path / QUANTIZATION_REPORT
    try:
        target = json.loads(report.read_text()).get("settings", {}).get("target")
    except (OSError, ValueError):
        return None  # quantised elsewhere: TensorRT's parser is the judge
    if target is not None and target != "tensorrt":
        return (f"{package.name} is an INT8 package made for {target} (uint8 activations with a zero point); "
                "TensorRT needs symmetric int8 Q/DQ: make it with `appliance quantize --mode int8 --target tensorrt`")
    return None


def build_engine(package: ModelPackage, engines_dir: Path, platform: Platform,
                 options: BuildOptions | None = None) -> EngineMetadata:
    """Build ``package``'s engine for ``platform`` and write plan, metadata and timing cache.

    The ONNX bytes are read once, hashed and parsed, so the metadata's hash is of what was built.
    The plan is written before the metadata: a crash in between leaves a plan no metadata vouches
    for, which is never loaded.
    """
    refusal = tensorrt_refusal(package)
    if refusal:
        raise EngineError(refusal)
    import tensorrt as trt

    options = options or BuildOptions()
    paths = engine_paths(engines_dir, platform, package)
    where = f"{package.name} ({package.onnx_path})"
    onnx_bytes = package.onnx_path.read_bytes()
    onnx_sha256 = "sha256:" + hashlib.sha256(onnx_bytes).hexdigest()
    recorded = package.hashes.get(package.model_file)
    if recorded is not None and recorded != onnx_sha256:
        raise ManifestError(f"{package.manifest_path}: {package.model_file} has {onnx_sha256}, the manifest records "
                            f"{recorded}; no engine is built from a changed model: restore it or export again")
    profile = optimization_profile(package)
    started = time.monotonic()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = network_flags(platform.tensorrt_major, trt.NetworkDefinitionCreationFlag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # ``path`` lets the parser find weights stored beside the model (ONNX external data).
    if not parser.parse(onnx_bytes, str(package.onnx_path)):
        raise EngineError(f"{where}: TensorRT's ONNX parser refused the model:\n  " + "\n  ".join(parser_errors(parser))
                          + "\n(an unsupported operator: re-export with another opset, or serve this package on "
                          "ONNX Runtime)")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    check_profile_fits(profile, inputs, where)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.optimization_level
    if not options.tf32:
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is None:
            raise EngineError(f"TensorRT {platform.tensorrt} has no BuilderFlag.TF32 to clear; build without --no-tf32")
        config.clear_flag(tf32)
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(trt_profile)
    cache = _load_timing_cache(config, paths.timing_cache)

    log.info("building the TensorRT %s engine of %s for %s (%s), batch %d..%d; this takes minutes",
             platform.tensorrt, package.name, platform.sm, platform.gpu_name, package.min_batch, package.max_batch,
             extra={"event": "engine.building", "model": package.name})
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{where}: TensorRT could not build an engine (see its errors above); a larger "
                          f"--workspace-mb (now {options.workspace_mb}) helps when tactics ran out of memory")
    data = bytes(memoryview(plan))
    seconds = time.monotonic() - started
    _save_timing_cache(config, config.get_timing_cache() or cache, paths.timing_cache)
    meta = EngineMetadata(
        package=package.name, package_version=package.version, model_file=package.model_file,
        onnx_sha256=onnx_sha256, tensorrt=platform.tensorrt, compute_capability=platform.compute_capability,
        gpu_name=platform.gpu_name, cuda_driver=platform.cuda_driver, profile=profile_json(profile),
        precision=package.precision, workspace_mb=options.workspace_mb,
        builder={"strongly_typed": True, "network_flags": flags, "optimization_level": options.optimization_level,
                 "tf32": options.tf32, "timing_cache": str(paths.timing_cache), **options.extra},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), build_seconds=round(seconds, 1),
        plan_sha256="sha256:" + hashlib.sha256(data).hexdigest(), plan_bytes=len(data),
    )
    write_atomically(paths.plan, data)
    write_atomically(paths.metadata, meta.to_json().encode())
    log.info("built %s in %.0f s: %s (%d MB)", package.name, seconds, paths.plan, len(data) >> 20,
             extra={"event": "engine.built", "model": package.name})
    return meta


def _load_timing_cache(config, path: Path):
    """The timing cache from ``path`` (or an empty one), attached to ``config``.

    A cache from another GPU of the same compute capability is refused by ``set_timing_cache``
    with ``ignore_mismatch=False`` (its timings would mislead tactic selection); the build then
    starts from an empty cache, and that cache replaces the file."""
    data = b""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as e:  # a damaged file costs only the time it would have saved
        log.warning("timing cache %s cannot be read (%s); starting an empty one", path, e)
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made on another GPU or TensorRT; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, cache, path: Path) -> None:
    """Save the build's timing cache, merged with what other builds saved meanwhile (packages
    build one after another here, but an operator's command may run beside the boot-time unit)."""
    if cache is None:
        return
    with build_lock(path.with_name(f".{path.name}.lock")):
        with contextlib.suppress(Exception):  # none saved, or damaged: this build's cache replaces it
            saved = config.create_timing_cache(path.read_bytes())
            # ITimingCache.combine (TensorRT 10 and 11); ignore_mismatch=False skips a foreign cache.
            if not cache.combine(saved, False):
                log.info("timing cache %s was not merged (made on another GPU or TensorRT); replacing it", path)
        write_atomically(path, bytes(memoryview(cache.serialize())))


def _check_engine(package: ModelPackage, engines_dir: Path,
                  platform: Platform) -> tuple[EnginePaths, EngineMetadata | None, list[str]]:
    """Where ``package``'s engine is, the metadata read once, and why it must be (re)built."""
    paths = engine_paths(engines_dir, platform, package)
    try:
        meta = read_metadata(paths.metadata)
    except EngineError as e:
        return paths, None, [str(e)]
    reasons = stale_reasons(meta, platform, package, file_sha256(package.onnx_path))
    if not reasons:
        try:
            read_plan(paths, meta)
        except EngineError as e:
            reasons.append(str(e))
    return paths, meta, reasons


def engine_state(package: ModelPackage, engines_dir: Path, platform: Platform) -> tuple[EnginePaths, list[str]]:
    """Where ``package``'s engine is, and why it must be (re)built (empty: it is current)."""
    paths, _, reasons = _check_engine(package, engines_dir, platform)
    return paths, reasons


def ensure_engine(package: ModelPackage, engines_dir: Path, platform: Platform, build: bool,
                  options: BuildOptions | None = None) -> tuple[EnginePaths, EngineMetadata]:
    """A current engine for ``package``: the one on disk, or a new build when ``build`` allows;
    otherwise :class:`EngineError` saying why the engine on disk is not used.

    The metadata returned is the very copy that was judged current (read once): the node reads
    without the build lock, and a second read could return metadata written meanwhile by a
    build from another manifest (another batch range, precision or ONNX), which nothing checked.
    The plan is then hashed against this copy when it is loaded (:func:`read_plan`).
    """
    paths = engine_paths(engines_dir, platform, package)
    with build_lock(paths.lock) if build else contextlib.nullcontext():
        _, meta, reasons = _check_engine(package, engines_dir, platform)
        if reasons:
            if not build:
                raise EngineError(f"{package.name}: no usable TensorRT engine at {paths.plan}: {'; '.join(reasons)}; "
                                  "run `appliance build-engine " + package.name + "` on this host")
            log.info("%s: building its engine: %s", package.name, "; ".join(reasons),
                     extra={"event": "engine.stale", "model": package.name})
            build_engine(package, engines_dir, platform, options)
            _, meta, reasons = _check_engine(package, engines_dir, platform)
            if reasons:  # never load a plan nothing vouches for
                raise EngineError(f"{package.name}: the engine just built at {paths.plan} is not usable: "
                                  f"{'; '.join(reasons)}; run `appliance build-engine {package.name}`")
        assert meta is not None
        return paths, meta


# ---- the GPU thread -----------------------------------------------------------------------------------

class GpuThread:
    """One thread that owns the CUDA context; every TensorRT object is made and used on it.

    CUDA contexts are current per thread, and a TensorRT execution context is not safe to use from
    two threads at once.  The node calls a runtime from the main thread (warm-up) and then from
    the worker, so rather than trusting callers, every call is handed to this thread and waited
    for: engines, execution contexts, streams and device buffers are created, used and freed on
    it, with the device's primary context (the one TensorRT's CUDA runtime uses, and the one
    ``appliance.kernels`` pushes for preprocessing) current on it for its whole life.
    """

    def __init__(self, setup: Callable[[], Callable[[], None] | None] | None = None, name: str = "gpu"):
        self._setup = setup if setup is not None else _push_primary_context
        self._calls: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stopped = False
        self._ready = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._ready.result()  # the setup's exception, raised in the caller

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _loop(self) -> None:
        try:
            teardown = self._setup()
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        while True:
            item = self._calls.get()
            if item is None:
                break
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)
        if teardown is not None:
            teardown()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the GPU thread and return its result (or raise its exception)."""
        if threading.get_ident() == self._thread.ident:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # nothing is queued behind the stop marker, where it would wait for ever
            if self._stopped or not self._thread.is_alive():
                raise EngineError("the GPU thread has stopped; restart the node")
            self._calls.put((fn, future))
        return future.result()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._calls.put(None)
        self._thread.join()


def _push_primary_context() -> Callable[[], None]:
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()

    def teardown() -> None:
        cuda.Context.pop()
        context.detach()

    return teardown


_gpu_thread: GpuThread | None = None
_gpu_thread_lock = threading.Lock()


def gpu_thread() -> GpuThread:
    """The process's GPU thread, started at first use."""
    global _gpu_thread
    with _gpu_thread_lock:
        if _gpu_thread is None:
            _gpu_thread = GpuThread(name="gpu")
        return _gpu_thread


# ---- running an engine --------------------------------------------------------------------------------

def pad_batch(batch: np.ndarray, min_batch: int) -> np.ndarray:
    """A batch smaller than the engine's minimum, padded with zero images (results are cut back)."""
    if len(batch) >= min_batch:
        return batch
    pad = np.zeros((min_batch - len(batch), *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, pad])


def to_model_layout(batch: np.ndarray, layout: str) -> np.ndarray:
    """The kernels' NCHW batch in the layout the graph takes."""
    return batch.transpose(0, 2, 3, 1) if layout == "NHWC" else batch


class TensorRTRuntime:
    """A model package's engine on GPU 0, behind :class:`appliance.runtime.Runtime`.

    ``run`` takes NCHW float32 as the preprocessing kernels produce it, at most the manifest's
    ``max_batch`` images (``Pipeline._infer`` splits larger batches), and returns every output
    tensor by name, as :class:`~appliance.runtime.OnnxRuntime` does.  All CUDA and TensorRT work
    happens on :func:`gpu_thread`.
    """

    kind = "tensorrt"
    device = "gpu"

    def __init__(self, package: ModelPackage, engines_dir: Path, platform: Platform | None = None,
                 build: bool = False, options: BuildOptions | None = None, thread: GpuThread | None = None):
        self.package = package
        self.platform = platform or probe_platform()
        self.paths, self.metadata = ensure_engine(package, engines_dir, self.platform, build, options)
        self._gpu = thread or gpu_thread()
        self._closed = False
        self._trt_runtime = self.engine = self.context = self.stream = None
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        self._gpu.call(self._load)

    def _load(self) -> None:
        try:
            self._load_on_gpu_thread()
        except BaseException:
            # What was made so far is released here, on the thread whose context made it: pycuda
            # refuses to free a stream, device or page-locked buffer from another thread
            # ("cannot activate out-of-thread context") and would leak it when "auto" falls back.
            self._release()
            raise

    def _load_on_gpu_thread(self) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        pkg = self.package
        plan = read_plan(self.paths, self.metadata)
        self._logger = _trt_logger(trt)
        # The runtime must outlive every engine it deserialised; it is kept, and released last.
        self._trt_runtime = trt.Runtime(self._logger)
        self.engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"{self.paths.plan}: TensorRT could not deserialise the plan (see its errors above); "
                              "run `appliance build-engine " + pkg.name + "` to rebuild it")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [pkg.input_name]:
            raise EngineError(f"{self.paths.plan}: engine inputs {inputs}, the manifest's input.name is "
                              f"{pkg.input_name!r}; rebuild the engine")
        for out in pkg.outputs:
            if out.tensor not in self.output_names:
                raise EngineError(f"{self.paths.plan}: no output named {out.tensor!r} (outputs.tensor of {out.name}); "
                                  f"the engine has {self.output_names}")
        self.dtypes = {}
        for n in names:
            trt_dtype = self.engine.get_tensor_dtype(n)
            try:  # trt.nptype raises TypeError for types numpy lacks (BF16, FP8, FP4, INT4)
                self.dtypes[n] = np.dtype(trt.nptype(trt_dtype))
            except TypeError:
                raise EngineError(f"{self.paths.plan}: tensor {n!r} is {trt_dtype}, which numpy cannot hold; "
                                  "export the model with float32 or float16 inputs and outputs") from None
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.paths.plan}: TensorRT could not create an execution context (GPU memory "
                              "exhausted?); see its errors above")
        self.stream = cuda.Stream()
        # Buffers for the largest batch, allocated once: output shapes come from the context once
        # the input shape is set (a shape with -1 left in it would be data-dependent: refused).
        max_shape = input_shape(pkg, pkg.max_batch)
        if not self.context.set_input_shape(pkg.input_name, max_shape):
            raise EngineError(f"{self.paths.plan}: the engine refuses input shape {list(max_shape)}; rebuild it")
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.paths.plan}: output {name!r} has a data-dependent shape {list(shape)}; "
                                  "the appliance's TensorRT runtime needs shapes known from the input")
            self.host[name] = cuda.pagelocked_empty(shape, self.dtypes[name])
            self.device[name] = cuda.mem_alloc(max(self.host[name].nbytes, 1))
            if self.context.set_tensor_address(name, int(self.device[name])) is False:
                raise EngineError(f"{self.paths.plan}: TensorRT refused the buffer of {name!r}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``batch`` is NCHW float32, as the preprocessing kernels produce it."""
        n = len(batch)
        if not 1 <= n <= self.package.max_batch:
            raise ValueError(f"{self.package.name}: a batch of {n} images; the engine takes 1 to "
                             f"{self.package.max_batch} (input.max_batch); split it")
        return self._gpu.call(lambda: self._run(batch))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        if self._closed:
            raise EngineError(f"{self.package.name}: the TensorRT runtime has been closed")
        pkg = self.package
        n = len(batch)
        x = pad_batch(to_model_layout(batch, pkg.input_layout), pkg.min_batch)
        name = pkg.input_name
        staged = self.host[name][:len(x)]
        staged[...] = x  # casts to the engine's input dtype (float16 for an FP16 package)
        if not self.context.set_input_shape(name, staged.shape):
            raise EngineError(f"{pkg.name}: the engine refuses input shape {list(staged.shape)}")
        cuda.memcpy_htod_async(self.device[name], staged, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            self.stream.synchronize()  # the input copy may still read the staging buffer
            raise EngineError(f"{pkg.name}: TensorRT failed to enqueue the batch (see its errors above)")
        results = {}
        for out in self.output_names:
            shape = tuple(self.context.get_tensor_shape(out))
            view = self.host[out].reshape(-1)[:int(np.prod(shape))].reshape(shape)
            cuda.memcpy_dtoh_async(view, self.device[out], self.stream)
            results[out] = view
        self.stream.synchronize()
        # Copies: the page-locked buffers are reused by the next batch.
        return {k: (v[:n].astype(np.float32) if v.dtype == np.float16 else v[:n].copy()) for k, v in results.items()}

    def _release(self) -> None:
        """Drop every CUDA and TensorRT object, on the GPU thread: the execution context before
        the engine, the engine before the runtime that deserialised it; device buffers, the
        stream and the page-locked buffers while the context that made them is current here."""
        self.context = None
        for allocation in self.device.values():
            allocation.free()
        self.device.clear()
        self.host.clear()
        self.stream = None
        self.engine = None
        self._trt_runtime = None

    def close(self) -> None:
        """Free the device buffers, context and engine on the GPU thread (where they were made)."""
        def free() -> None:
            if not self._closed:
                self._closed = True
                self._release()

        self._gpu.call(free)


# ---- which runtime the node uses ----------------------------------------------------------------------

def select_runtime(package: ModelPackage, wanted: str, engines_dir: Path, threads: int = 0):
    """The runtime for ``package``: ``[inference] runtime`` says which.

    ``onnxruntime``: ONNX Runtime on the CPU, as always.  ``tensorrt``: the package's engine, or
    start-up fails saying why.  ``auto``: the engine when this host has a GPU, TensorRT and a
    current engine, else ONNX Runtime, logged with the reason.  The node never builds an engine
    (that takes minutes; ``appliance-engines.service`` does it before the node starts).
    """
    from .config import ConfigError
    from .runtime import OnnxRuntime

    if wanted not in RUNTIMES:
        raise ValueError(f"runtime {wanted!r}: expected one of {', '.join(RUNTIMES)}")
    if wanted == "onnxruntime":
        return OnnxRuntime(package, threads)
    try:
        runtime = TensorRTRuntime(package, engines_dir)
    except Exception as e:  # auto: whatever keeps TensorRT from running, ONNX Runtime serves
        if wanted == "tensorrt":  # a setting the node cannot honour: start-up stops, as for any bad key
            raise ConfigError(f"[inference] runtime = \"tensorrt\" but {package.name} cannot run on TensorRT: {e}; "
                              "build its engine, or set runtime = \"auto\" or \"onnxruntime\"") from e
        log.warning("%s runs on ONNX Runtime (CPU): %s", package.name, e,
                    extra={"event": "runtime.fallback", "model": package.name})
        return OnnxRuntime(package, threads)
    log.info("%s runs on TensorRT %s on %s (%s)", package.name, runtime.platform.tensorrt,
             runtime.platform.gpu_name, runtime.platform.sm, extra={"event": "runtime.tensorrt", "model": package.name})
    return runtime


# ---- the command --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("packages", nargs="*", metavar="PACKAGE",
                        help="package names (on the model search path) or package folders")
    parser.add_argument("--all", action="store_true", help="every package the configuration's routes name")
    parser.add_argument("--missing-only", action="store_true",
                        help="build only engines that are missing or stale (other TensorRT, GPU, ONNX, batch range)")
    parser.add_argument("--config", default=os.environ.get("APPLIANCE_CONFIG"),
                        help="the node's TOML configuration: its routes and data_dir (default: $APPLIANCE_CONFIG, "
                             "else the built-in defaults)")
    parser.add_argument("--engines-dir", type=Path,
                        help="where engines are kept (default: <data_dir>/engines, where the node looks)")
    parser.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                        help=f"TensorRT builder workspace limit in MiB (default {DEFAULT_WORKSPACE_MB})")
    parser.add_argument("--optimization-level", type=int, default=DEFAULT_OPTIMIZATION_LEVEL, choices=range(6),
                        help=f"TensorRT builder optimisation level 0-5 (default {DEFAULT_OPTIMIZATION_LEVEL})")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false",
                        help="no TF32 maths in FP32 layers (closer to ONNX Runtime's numbers, slower)")


def _resolve_packages(args, cfg) -> list[ModelPackage]:
    from .manifest import find_package, load_package

    names = list(args.packages)
    if args.all:
        names += sorted({m for route in cfg.routes for m in route.models} - set(names))
    found = []
    for name in names:
        path = Path(name)
        found.append(load_package(path) if (path / "manifest.toml").is_file() else
                     find_package(name, cfg.model_search_path))
    return found


def run(args) -> int:
    from .config import load

    if not args.packages and not args.all:
        print("appliance build-engine: name the packages to build, or give --all for every routed package",
              file=sys.stderr)
        return 2
    if args.workspace_mb < 64:
        print(f"appliance build-engine: --workspace-mb {args.workspace_mb} is too small; give at least 64 (MiB)",
              file=sys.stderr)
        return 2
    cfg = load(args.config)
    engines_dir = args.engines_dir or Path(cfg.data_dir) / "engines"
    try:
        platform = probe_platform()
    except NoGpuError as e:
        print(f"appliance build-engine: {e}\nModels keep running on ONNX Runtime (CPU).", file=sys.stderr)
        return EXIT_NO_GPU
    packages = _resolve_packages(args, cfg)
    options = BuildOptions(workspace_mb=args.workspace_mb, optimization_level=args.optimization_level, tf32=args.tf32)
    print(f"TensorRT {platform.tensorrt}, {platform.gpu_name} ({platform.sm}), CUDA driver {platform.cuda_driver}; "
          f"engines in {engines_dir}")
    failed = 0
    for pkg in packages:
        try:
            pkg.verify_hashes()
            paths = engine_paths(engines_dir, platform, pkg)
            with build_lock(paths.lock):
                _, reasons = engine_state(pkg, engines_dir, platform)
                if args.missing_only and not reasons:
                    print(f"{pkg.name}: current ({paths.plan})")
                    continue
                why = "; ".join(reasons) if reasons else "rebuild asked for"
                print(f"{pkg.name}: building ({why})", flush=True)
                meta = build_engine(pkg, engines_dir, platform, options)
            print(f"{pkg.name}: built in {meta.build_seconds:.0f} s -> {paths.plan}")
        except (EngineError, ManifestError, OSError) as e:
            failed += 1
            print(f"{pkg.name}: FAILED: {e}", file=sys.stderr)
    return EXIT_BUILD_FAILED if failed else 0
