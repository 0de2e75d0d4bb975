"""The preprocessing and postprocessing kernels, from Python: load them, pick one, run a batch.

Three builds of the same maths (kernels/pixel_math.h), fastest first:

* ``gpu``: the CUDA kernels (kernels/preprocess.cu) through pycuda, extra ``gpu``.  The fatbin
  built at install is loaded when it has code for the device; otherwise the source is compiled
  with nvcc at first use (pycuda's SourceModule).
* ``host``: the C++/OpenMP build (kernels/host.cpp) compiled at install, loaded with ctypes.
* ``numpy``: the reference (appliance/kernels_reference.py), when neither is there.

``APPLIANCE_KERNELS=gpu|host|numpy`` forces one (``auto``, the default, takes the fastest that
loads).  Whatever runs, the caller gets numpy arrays back.

Why ctypes over a plain C ABI rather than a CPython extension: the descriptors the host build
takes (AkImage, AkBatch) are the structs the CUDA kernels take, laid out once in pixel_math.h and
mirrored here as numpy structured dtypes, so both builds receive the very same bytes; there is no
Python C-API code to get wrong (reference counts, the GIL: ctypes releases the GIL for the call, so
the SCP keeps answering while OpenMP runs); and one .so serves every Python version.  The price,
a few microseconds per call and argument checks written in Python, is paid once per batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from . import kernels_reference as reference
from .kernels_reference import Gaussian, Median, ModelInput, SourceImage
from .manifest import ModelPackage
from .preprocessing import InputRejected, check_applicable, instance_window, rescale, stored_pixels

__all__ = [
    "Gaussian", "Median", "ModelInput", "SourceImage", "backend", "preprocess", "sigmoid", "softmax",
    "argmax", "resample", "labels_to_source", "source_image", "model_input", "host_library", "gpu_kernels",
]

log = logging.getLogger("appliance.kernels")

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIRS = (PACKAGE_DIR / "_kernels_src", PACKAGE_DIR.parent / "kernels")
FATBIN = PACKAGE_DIR / "_kernels.fatbin"

#: nvcc options that decide the arithmetic (kernels/nvcc_flags.py ARITHMETIC): the first-use
#: compile must round as the fatbin and the host build do.
NVCC_OPTIONS = ("-std=c++17", "-fmad=false")

ABI_VERSION = 1
MAX_CHANNELS = 4

# pixel_math.h enumerations
_DTYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3,
           np.dtype(np.uint32): 4, np.dtype(np.int32): 5, np.dtype(np.float32): 6}
_VOI = {"LINEAR": 0, "LINEAR_EXACT": 1, "SIGMOID": 2, "RANGE": 4, "IDENTITY": 6}
_RESIZE = {"area": 0, "bilinear": 1}
_FILTER_NONE, _FILTER_GAUSSIAN, _FILTER_MEDIAN = 0, 1, 2

#: AkImage of pixel_math.h, field for field (aligned as the C compiler aligns it).
IMAGE_DTYPE = np.dtype([
    ("pixels", np.uint64), ("center", np.float64), ("width", np.float64),
    ("rows", np.int32), ("columns", np.int32), ("row_stride", np.int32), ("dtype", np.int32),
    ("bits_stored", np.int32), ("voi", np.int32), ("invert", np.int32),
    ("slope", np.float32), ("intercept", np.float32), ("c0", np.float32), ("c1", np.float32),
    ("ty_first", np.int32), ("ty_weight", np.int32), ("ty_taps", np.int32),
    ("tx_first", np.int32), ("tx_weight", np.int32), ("tx_taps", np.int32), ("reserved", np.int32),
], align=True)

#: AkBatch of pixel_math.h.
BATCH_DTYPE = np.dtype([
    ("rows", np.int32), ("columns", np.int32), ("channels", np.int32), ("out_dtype", np.int32),
    ("filter", np.int32), ("filter_radius", np.int32), ("reserved0", np.int32), ("reserved1", np.int32),
    ("mean", np.float32, (MAX_CHANNELS,)), ("std", np.float32, (MAX_CHANNELS,)),
], align=True)


class KernelError(RuntimeError):
    """A kernel build that cannot be loaded or run; the message says which and what to do."""


# ---- the host build ---------------------------------------------------------------------------------

def _host_library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = PACKAGE_DIR / f"_kernels_host{suffix}"
        if candidate.exists():
            return candidate
    return None


class HostLibrary:
    """kernels/host.cpp, loaded with ctypes."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i32, i64, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
        for name, args, result in (
            ("akh_abi_version", [], i32), ("akh_sizeof_image", [], i32), ("akh_sizeof_batch", [], i32),
            ("akh_isa", [], ctypes.c_char_p), ("akh_max_threads", [], i32),
            ("akh_taps_width", [i32, i32, i32], i32), ("akh_taps", [i32, i32, i32, i32, p, p], None),
            ("akh_gaussian_weights", [f64, i32, p], None), ("akh_prepare", [p, i32, i32], None),
            ("akh_preprocess", [p, i32, p, p, p, p, p, i32], None),
            ("akh_sigmoid", [p, p, i64, i32], None), ("akh_softmax", [p, p, i64, i32, i64, i32], None),
            ("akh_argmax", [p, p, i64, i32, i64, i32], None),
            ("akh_labels_nearest", [p, p, i64, i32, i32, i32, i32, i32], None),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        if lib.akh_abi_version() != ABI_VERSION:
            raise KernelError(f"{path}: kernels ABI {lib.akh_abi_version()}, this module expects {ABI_VERSION}; "
                              f"rebuild with `pip install -e .`")
        if lib.akh_sizeof_image() != IMAGE_DTYPE.itemsize or lib.akh_sizeof_batch() != BATCH_DTYPE.itemsize:
            raise KernelError(f"{path}: AkImage/AkBatch are {lib.akh_sizeof_image()}/{lib.akh_sizeof_batch()} bytes, "
                              f"appliance.kernels mirrors {IMAGE_DTYPE.itemsize}/{BATCH_DTYPE.itemsize}; rebuild")
        self.lib = lib
        self.path = path
        self.isa = lib.akh_isa().decode()
        self.threads = lib.akh_max_threads()

    def taps(self, n_in: int, n_out: int, mode: int) -> tuple[np.ndarray, np.ndarray]:
        width = self.lib.akh_taps_width(n_in, n_out, mode)
        first = np.empty(n_out, np.int32)
        weight = np.empty(n_out * width, np.float32)
        self.lib.akh_taps(n_in, n_out, mode, width, first.ctypes.data, weight.ctypes.data)
        return first, weight

    def gaussian_weights(self, sigma: float, radius: int) -> np.ndarray:
        weight = np.empty(2 * radius + 1, np.float32)
        self.lib.akh_gaussian_weights(float(sigma), int(radius), weight.ctypes.data)
        return weight


@functools.cache
def host_library() -> HostLibrary | None:
    """The host build, or None when the package was installed without it."""
    path = _host_library_path()
    if path is None:
        return None
    try:
        return HostLibrary(path)
    except (OSError, KernelError) as e:
        log.warning("host kernels at %s cannot be loaded (%s); preprocessing runs in numpy", path, e)
        return None


# ---- a batch, described once for either build -------------------------------------------------------

@dataclass
class Plan:
    """A batch as the kernels take it: descriptors, tap tables, filter taps, and the arrays whose
    memory the descriptors point at (kept alive here)."""

    images: np.ndarray           # IMAGE_DTYPE, pixels = host addresses
    batch: np.ndarray            # BATCH_DTYPE, shape (1,)
    tap_first: np.ndarray        # int32
    tap_weight: np.ndarray       # float32
    filter_weight: np.ndarray    # float32
    arrays: list[np.ndarray]     # the pixel arrays, C-ordered rows, native byte order
    out_shape: tuple[int, int, int, int]
    out_dtype: np.dtype


def _check_target(target: ModelInput) -> None:
    if target.height < 1 or target.width < 1 or target.channels < 1:
        raise ValueError(f"model input {target.channels}x{target.height}x{target.width} must be at least 1x1x1")
    if target.channels > MAX_CHANNELS:
        raise ValueError(f"model input has {target.channels} channels; the kernels replicate to at most {MAX_CHANNELS}")
    if target.resize not in _RESIZE:
        raise ValueError(f"resize {target.resize!r} is not one of {', '.join(_RESIZE)}")
    if len(target.mean) not in (1, target.channels) or len(target.std) not in (1, target.channels):
        raise ValueError(f"mean and std need 1 or {target.channels} values, got {len(target.mean)} and {len(target.std)}")
    if not all(s > 0 for s in target.std):
        raise ValueError(f"std {target.std} must be positive")
    if np.dtype(target.dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"output dtype {np.dtype(target.dtype)} is not float32 or float16")
    noise = target.noise
    if isinstance(noise, Gaussian) and not (noise.sigma > 0 and 0 <= noise.taps_radius <= 64):
        raise ValueError(f"Gaussian sigma {noise.sigma} must be positive and its radius at most 64")
    if isinstance(noise, Median) and noise.radius not in (1, 2):
        raise ValueError(f"median radius {noise.radius} is not 1 (3x3) or 2 (5x5)")


def _pixel_array(image: SourceImage) -> np.ndarray:
    pixels = np.asarray(image.pixels)
    if pixels.ndim != 2 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must be a non-empty 2-D array, got shape {pixels.shape}")
    if pixels.dtype == np.float64:
        pixels = pixels.astype(np.float32)  # the reference works in float32 too
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
    if pixels.dtype not in _DTYPES:
        raise ValueError(f"pixel dtype {pixels.dtype} is not one of {', '.join(str(d) for d in _DTYPES)}")
    if pixels.strides[1] != pixels.itemsize or pixels.strides[0] < 0 or pixels.strides[0] % pixels.itemsize:
        pixels = np.ascontiguousarray(pixels)
    if image.bits_stored is not None and pixels.dtype.kind != "f" and not 1 <= image.bits_stored <= pixels.itemsize * 8:
        raise ValueError(f"Bits Stored {image.bits_stored} does not fit {pixels.dtype} samples")
    return pixels


def plan(images: Sequence[SourceImage], target: ModelInput, lib: HostLibrary, identity: bool = False) -> Plan:
    """Describe a batch for the kernels: validate, derive the VOI constants, build the tap tables.

    ``identity``: values pass through without a VOI (resampling model outputs)."""
    _check_target(target)
    descs = np.zeros(len(images), IMAGE_DTYPE)
    arrays = []
    firsts, weights = [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
    n_first = n_weight = 0
    tables: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    mode = _RESIZE[target.resize]

    def table(n_in: int, n_out: int) -> tuple[int, int, int]:
        nonlocal n_first, n_weight
        key = (n_in, n_out, mode)
        if key not in tables:
            first, weight = lib.taps(n_in, n_out, mode)
            tables[key] = (n_first, n_weight, len(weight) // n_out)
            firsts.append(first)
            weights.append(weight)
            n_first += len(first)
            n_weight += len(weight)
        return tables[key]

    columns = {name: [] for name in IMAGE_DTYPE.names if name not in ("c0", "c1", "reserved")}
    for image in images:
        reference.check_voi(image)
        pixels = _pixel_array(image)
        arrays.append(pixels)
        columns["pixels"].append(pixels.ctypes.data)
        columns["rows"].append(pixels.shape[0])
        columns["columns"].append(pixels.shape[1])
        columns["row_stride"].append(pixels.strides[0] // pixels.itemsize)
        columns["dtype"].append(_DTYPES[pixels.dtype])
        columns["bits_stored"].append(image.bits_stored if image.bits_stored is not None else pixels.itemsize * 8)
        columns["slope"].append(image.slope)
        columns["intercept"].append(image.intercept)
        columns["invert"].append(int(bool(image.invert)))
        if identity:
            voi, window = _VOI["IDENTITY"], (0.0, 0.0)
        elif image.window is None:
            voi, window = _VOI["RANGE"], (0.0, 0.0)  # akh_prepare finds the range
        else:
            voi, window = _VOI[(image.voi_function or "LINEAR").upper()], image.window
        columns["voi"].append(voi)
        columns["center"].append(window[0])
        columns["width"].append(window[1])
        for axis, n_in, n_out in (("ty", pixels.shape[0], target.height), ("tx", pixels.shape[1], target.width)):
            first, weight, taps = table(n_in, n_out)
            columns[f"{axis}_first"].append(first)
            columns[f"{axis}_weight"].append(weight)
            columns[f"{axis}_taps"].append(taps)
    for name, values in columns.items():  # a column at a time: fast for a series of hundreds
        descs[name] = values
    if len(descs):
        lib.lib.akh_prepare(descs.ctypes.data, len(descs), 0)

    batch = np.zeros(1, BATCH_DTYPE)
    batch["rows"], batch["columns"], batch["channels"] = target.height, target.width, target.channels
    batch["out_dtype"] = 1 if np.dtype(target.dtype) == np.float16 else 0
    batch["mean"][0, :target.channels] = target.channel_mean()
    batch["std"][0, :target.channels] = target.channel_std()
    filter_weight = np.ones(1, np.float32)
    if isinstance(target.noise, Gaussian):
        batch["filter"], batch["filter_radius"] = _FILTER_GAUSSIAN, target.noise.taps_radius
        filter_weight = lib.gaussian_weights(target.noise.sigma, target.noise.taps_radius)
    elif isinstance(target.noise, Median):
        batch["filter"], batch["filter_radius"] = _FILTER_MEDIAN, target.noise.radius
    return Plan(descs, batch, np.concatenate(firsts), np.concatenate(weights), filter_weight, arrays,
                (len(images), target.channels, target.height, target.width), np.dtype(target.dtype))


def _output(p: Plan, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty(p.out_shape, p.out_dtype)
    if out.shape != p.out_shape or out.dtype != p.out_dtype or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {p.out_dtype} array of shape {p.out_shape}, "
                         f"got {out.dtype} {out.shape}")
    return out


def _host_preprocess(p: Plan, lib: HostLibrary, threads: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    out = _output(p, out)
    if p.out_shape[0]:
        lib.lib.akh_preprocess(p.images.ctypes.data, len(p.images), p.batch.ctypes.data, p.tap_first.ctypes.data,
                               p.tap_weight.ctypes.data, p.filter_weight.ctypes.data, out.ctypes.data, threads)
    return out


# ---- the GPU build ------------------------------------------------------------------------------------

def kernel_source_dir() -> Path:
    for folder in SOURCE_DIRS:
        if (folder / "preprocess.cu").exists():
            return folder
    raise KernelError("the CUDA sources (preprocess.cu, pixel_math.h) are not installed with the package")


_PREPROCESS_KERNELS = {_FILTER_NONE: "ak_preprocess_kernel", _FILTER_GAUSSIAN: "ak_preprocess_gaussian_kernel",
                       _FILTER_MEDIAN: "ak_preprocess_median_kernel"}
_KERNELS = (*_PREPROCESS_KERNELS.values(), "ak_sigmoid_kernel", "ak_softmax_kernel", "ak_argmax_kernel",
            "ak_labels_nearest_kernel")
_BLOCK_2D = (32, 8, 1)
_BLOCK_1D = 256


@dataclass
class DeviceBatch:
    """A batch uploaded to the device, ready to launch: the kernel, its arguments and output."""

    kernel: object
    args: list
    out: object                  # device allocation of the NCHW output
    grid: tuple[int, int, int]
    pixel_bytes: int
    out_shape: tuple[int, int, int, int]
    out_dtype: np.dtype


class GpuKernels:
    """The CUDA kernels on one device, through pycuda.

    Uses the device's primary context (the one the CUDA runtime, and so TensorRT, uses), pushed
    for each call and popped after; calls are serialised by a lock, so any thread may call, and a
    single GPU worker thread, as the design has it, never waits.
    """

    def __init__(self, device: int = 0, source: str | None = None):
        import pycuda.driver as cuda  # the `gpu` extra; imported only when a GPU is wanted

        cuda.init()
        self.cuda = cuda
        self.device = cuda.Device(device)
        self.name = self.device.name()
        self.compute_capability = self.device.compute_capability()
        self.context = self.device.retain_primary_context()
        self._lock = threading.Lock()
        self.context.push()
        try:
            self.module, self.origin = self._load(source)
            self.functions = {name: self.module.get_function(name) for name in _KERNELS}
            self.stream = cuda.Stream()
        finally:
            cuda.Context.pop()

    def _load(self, source: str | None):
        if source is None and FATBIN.exists():
            try:
                return self.cuda.module_from_file(str(FATBIN)), f"fatbin {FATBIN}"
            except self.cuda.Error as e:  # no code for this device in the fatbin: compile below
                log.info("the kernels fatbin has no code for %s (sm_%d%d): %s; compiling the source",
                         self.name, *self.compute_capability, e)
        from pycuda.compiler import SourceModule

        folder = kernel_source_dir()
        text = source if source is not None else (folder / "preprocess.cu").read_text()
        module = SourceModule(text, options=list(NVCC_OPTIONS), no_extern_c=True, include_dirs=[str(folder)])
        return module, f"compiled from {folder} for sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    @contextlib.contextmanager
    def current(self):
        """This object's context, current in the calling thread, for one caller at a time."""
        with self._lock:
            self.context.push()
            try:
                yield self.cuda
            finally:
                self.cuda.Context.pop()

    def _upload(self, cuda, array: np.ndarray):
        allocation = cuda.mem_alloc(max(array.nbytes, 1))
        if array.nbytes:
            cuda.memcpy_htod_async(allocation, np.ascontiguousarray(array), self.stream)
        return allocation

    def upload(self, p: Plan) -> DeviceBatch:
        """A planned batch on the device: pixels packed into one buffer, descriptors pointing at
        their offsets, tables, and room for the output.  Call inside :meth:`current`."""
        cuda = self.cuda
        n, _, rows, columns = p.out_shape
        if n > 65535:
            raise ValueError(f"a batch of {n} images is more than one launch takes (65535); split it")
        arrays = [np.ascontiguousarray(a) for a in p.arrays]
        offsets, total = [], 0
        for a in arrays:
            total = (total + 15) // 16 * 16  # every image starts aligned for its widest sample
            offsets.append(total)
            total += a.nbytes
        packed = np.zeros(max(total, 1), np.uint8)
        for a, offset in zip(arrays, offsets):
            packed[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
        images = p.images.copy()
        images["pixels"] = offsets
        images["row_stride"] = [a.shape[1] for a in arrays]
        args = [self._upload(cuda, x) for x in (images, p.batch, packed, p.tap_first, p.tap_weight, p.filter_weight)]
        out = cuda.mem_alloc(max(int(np.prod(p.out_shape)) * p.out_dtype.itemsize, 1))
        grid = ((columns + _BLOCK_2D[0] - 1) // _BLOCK_2D[0], (rows + _BLOCK_2D[1] - 1) // _BLOCK_2D[1], n)
        return DeviceBatch(self.functions[_PREPROCESS_KERNELS[int(p.batch["filter"][0])]], args, out, grid,
                           packed.nbytes, p.out_shape, p.out_dtype)

    def launch(self, batch: DeviceBatch) -> None:
        """Run the kernel of an uploaded batch on this object's stream (asynchronously)."""
        if batch.out_shape[0]:
            batch.kernel(*batch.args, batch.out, block=_BLOCK_2D, grid=batch.grid, stream=self.stream)

    def preprocess(self, p: Plan, out: np.ndarray | None = None) -> np.ndarray:
        """Run a planned batch; the result comes back to the host (into ``out`` if given)."""
        out = _output(p, out)
        if not p.out_shape[0]:
            return out
        with self.current() as cuda:
            batch = self.upload(p)
            self.launch(batch)
            cuda.memcpy_dtoh_async(out, batch.out, self.stream)
            self.stream.synchronize()
        return out

    def _elementwise(self, name: str, x: np.ndarray, out: np.ndarray, count: int, *scalars: int) -> np.ndarray:
        if not count:
            return out
        with self.current() as cuda:
            src = self._upload(cuda, x)
            dst = cuda.mem_alloc(max(out.nbytes, 1))
            grid = (max(1, (count + _BLOCK_1D - 1) // _BLOCK_1D), 1)
            self.functions[name](src, dst, *[np.int64(s) for s in scalars], block=(_BLOCK_1D, 1, 1), grid=grid,
                                 stream=self.stream)
            cuda.memcpy_dtoh_async(out, dst, self.stream)
            self.stream.synchronize()
        return out

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        return self._elementwise("ak_sigmoid_kernel", x, np.empty_like(x), x.size, x.size)

    def softmax(self, x: np.ndarray, outer: int, channels: int, inner: int) -> np.ndarray:
        return self._elementwise("ak_softmax_kernel", x, np.empty_like(x), outer * inner, outer, channels, inner)

    def argmax(self, x: np.ndarray, outer: int, channels: int, inner: int) -> np.ndarray:
        out = np.empty(outer * inner, np.int32)
        return self._elementwise("ak_argmax_kernel", x, out, outer * inner, outer, channels, inner)

    def labels_nearest(self, labels: np.ndarray, height: int, width: int) -> np.ndarray:
        count = labels.size // (labels.shape[-2] * labels.shape[-1])
        out = np.empty((count, height, width), np.int32)
        return self._elementwise("ak_labels_nearest_kernel", labels, out, count * height * width, count,
                                 labels.shape[-2], labels.shape[-1], height, width)

    def peak_bandwidth(self) -> float:
        """Theoretical device memory bandwidth in bytes/s: double data rate x bus width."""
        attr = self.cuda.device_attribute
        clock_hz = self.device.get_attribute(attr.MEMORY_CLOCK_RATE) * 1e3
        bus_bytes = self.device.get_attribute(attr.GLOBAL_MEMORY_BUS_WIDTH) / 8
        return 2.0 * clock_hz * bus_bytes


_gpu_lock = threading.Lock()
_gpu: GpuKernels | None = None
_gpu_failed: str | None = None


def gpu_kernels() -> GpuKernels | None:
    """The GPU kernels on device 0, loaded at first call; None (once, logged) when pycuda, a GPU,
    or a loadable module is missing."""
    global _gpu, _gpu_failed
    with _gpu_lock:
        if _gpu is None and _gpu_failed is None:
            try:
                _gpu = GpuKernels()
                log.info("preprocessing on %s (%s)", _gpu.name, _gpu.origin)
            except ImportError:
                _gpu_failed = "pycuda is not installed (extra `gpu`)"
            except Exception as e:  # no driver, no device, no compiler: the host build serves
                _gpu_failed = f"{type(e).__name__}: {e}"
                log.info("no GPU kernels: %s", _gpu_failed)
        return _gpu


# ---- choosing a build ---------------------------------------------------------------------------------

BACKENDS = ("gpu", "host", "numpy")


def backend(wanted: str | None = None) -> str:
    """The build that runs: ``wanted``, else $APPLIANCE_KERNELS, else the fastest that loads."""
    wanted = (wanted or os.environ.get("APPLIANCE_KERNELS", "auto")).lower()
    if wanted not in (*BACKENDS, "auto"):
        raise ValueError(f"APPLIANCE_KERNELS={wanted!r}: expected one of auto, {', '.join(BACKENDS)}")
    if wanted == "numpy":
        return "numpy"
    if wanted in ("gpu", "auto") and host_library() is not None and gpu_kernels() is not None:
        return "gpu"
    if wanted == "gpu":
        raise KernelError(f"APPLIANCE_KERNELS=gpu but the GPU kernels cannot run: {_gpu_failed or 'no host build'}")
    if host_library() is not None:
        return "host"
    if wanted == "host":
        raise KernelError("APPLIANCE_KERNELS=host but the host build is not installed; run `pip install -e .` "
                          "with a C++17 compiler")
    return "numpy"


def preprocess(images: Sequence[SourceImage], target: ModelInput, using: str | None = None,
               threads: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """A batch of images (any mix of sizes, dtypes and windows) to the model's NCHW input.

    ``threads``: host build threads (0: every core).  ``out``: an array of the result's shape and
    dtype to write into, so that a caller preprocessing series after series reuses its memory.
    """
    chosen = backend(using)
    if chosen == "numpy":
        _check_target(target)
        result = reference.preprocess(images, target)
        if out is None:
            return result
        out[...] = result
        return out
    lib = host_library()
    p = plan(images, target, lib)
    if chosen == "gpu":
        return gpu_kernels().preprocess(p, out)
    return _host_preprocess(p, lib, threads, out)


# ---- postprocessing -------------------------------------------------------------------------------------

def _as_channels(x: np.ndarray, axis: int) -> tuple[np.ndarray, int, int, int]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    axis = axis % x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return x, outer, x.shape[axis], inner


def sigmoid(x: np.ndarray, using: str | None = None) -> np.ndarray:
    """Logistic sigmoid of model outputs, float32."""
    chosen = backend(using)
    if chosen == "numpy":
        return reference.sigmoid(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if chosen == "gpu":
        return gpu_kernels().sigmoid(x)
    out = np.empty_like(x)
    host_library().lib.akh_sigmoid(x.ctypes.data, out.ctypes.data, x.size, 0)
    return out


def softmax(x: np.ndarray, axis: int = 1, using: str | None = None) -> np.ndarray:
    """Softmax along ``axis`` (classes of (N, C), or the channel axis of NCHW maps), float32."""
    chosen = backend(using)
    if chosen == "numpy":
        return reference.softmax(x, axis)
    x, outer, channels, inner = _as_channels(x, axis)
    if chosen == "gpu":
        return gpu_kernels().softmax(x, outer, channels, inner)
    out = np.empty_like(x)
    if x.size:
        host_library().lib.akh_softmax(x.ctypes.data, out.ctypes.data, outer, channels, inner, 0)
    return out


def argmax(x: np.ndarray, axis: int = 1, using: str | None = None) -> np.ndarray:
    """Index of the largest value along ``axis``, the first on ties, int32 (segmentation labels)."""
    chosen = backend(using)
    if chosen == "numpy":
        return reference.argmax(x, axis)
    x, outer, channels, inner = _as_channels(x, axis)
    shape = x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:]
    if chosen == "gpu":
        return gpu_kernels().argmax(x, outer, channels, inner).reshape(shape)
    out = np.empty(shape, np.int32)
    if out.size:
        host_library().lib.akh_argmax(x.ctypes.data, out.ctypes.data, outer, channels, inner, 0)
    return out


def resample(maps: np.ndarray, height: int, width: int, mode: str = "bilinear",
             using: str | None = None) -> np.ndarray:
    """Heatmaps or probability maps (..., h, w) back onto the source grid (..., height, width),
    with the preprocessing resize (bilinear, half-pixel centres; area when shrinking in ``area``)."""
    chosen = backend(using)
    if chosen == "numpy":
        return reference.resample(maps, height, width, mode)
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    flat = maps.reshape(-1, *maps.shape[-2:])
    images = [SourceImage(m, window=None, voi_function="LINEAR") for m in flat]
    target = ModelInput(height, width, resize=mode)
    p = plan(images, target, host_library(), identity=True)  # the modality LUT is 1 * v + 0
    out = gpu_kernels().preprocess(p) if chosen == "gpu" else _host_preprocess(p, host_library())
    return out.reshape(*maps.shape[:-2], height, width)


def labels_to_source(labels: np.ndarray, height: int, width: int, using: str | None = None) -> np.ndarray:
    """Label maps (..., h, w) back onto the source grid (..., height, width) by nearest sample."""
    chosen = backend(using)
    if chosen == "numpy":
        return reference.labels_to_source(labels, height, width)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    shape = (*labels.shape[:-2], height, width)
    count = int(np.prod(labels.shape[:-2], dtype=np.int64))
    if chosen == "gpu":
        return gpu_kernels().labels_nearest(labels, height, width).reshape(shape)
    out = np.empty(shape, np.int32)
    if out.size:
        host_library().lib.akh_labels_nearest(labels.ctypes.data, out.ctypes.data, count, labels.shape[-2],
                                              labels.shape[-1], height, width, 0)
    return out


# ---- from DICOM instances and model packages ---------------------------------------------------------------

def model_input(pkg: ModelPackage) -> ModelInput:
    """The input a model package declares (manifest [input] and [preprocessing])."""
    pre = pkg.preprocessing
    return ModelInput(pkg.input_height, pkg.input_width, pkg.input_channels, tuple(pre.mean), tuple(pre.std),
                      pre.resize)


def source_image(ds: Dataset, pkg: ModelPackage) -> SourceImage:
    """Check and decode one instance for ``pkg``; its pixels and parameters for the kernels.

    The same choices as appliance.preprocessing.prepare_instance: the package's fixed window wins
    over the instance's (PS3.3 C.11.2.1.2), MONOCHROME1 is inverted unless the package keeps it.
    """
    check_applicable(ds, pkg)
    pixels = stored_pixels(ds)
    slope, intercept = rescale(ds)
    pre = pkg.preprocessing
    window, function = instance_window(ds)
    if pre.window is not None:
        window, function = pre.window, "LINEAR"
    invert = str(ds.PhotometricInterpretation) == "MONOCHROME1" and pre.monochrome1 == "invert"
    bits = ds.get("BitsStored")
    bits = int(bits) if bits and pixels.dtype.kind in "iu" and 1 <= int(bits) <= pixels.itemsize * 8 else None
    image = SourceImage(pixels, bits, slope, intercept, None if window is None else (window.center, window.width),
                        (function or "LINEAR").upper(), invert)
    reference.check_voi(image)
    return image


def prepare(datasets: Sequence[Dataset], pkg: ModelPackage) -> tuple[np.ndarray, list[Dataset], InputRejected | None]:
    """Preprocess the instances of a series that ``pkg`` can take, in one batch.

    Returns the model input of the accepted instances, those instances, and the first rejection
    (None if all were taken).  Raises the first rejection when none was taken.
    """
    images, accepted, rejection = [], [], None
    for ds in datasets:
        try:
            images.append(source_image(ds, pkg))
        except InputRejected as e:
            rejection = rejection or e
            continue
        accepted.append(ds)
    if not images:
        raise rejection or InputRejected("empty", "the series has no instances")
    return preprocess(images, model_input(pkg)), accepted, rejection


def describe() -> str:
    """Which build runs, for the log at start-up."""
    chosen = backend()
    if chosen == "gpu":
        g = gpu_kernels()
        return f"GPU kernels on {g.name} ({g.origin})"
    if chosen == "host":
        lib = host_library()
        return f"host kernels ({lib.isa}, {lib.threads} threads)"
    return "numpy reference (no kernel build installed)"

