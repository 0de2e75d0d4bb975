"""From stored DICOM pixels to model input, in numpy.

Per pixel: modality LUT (PS3.3 C.11.1), VOI window (PS3.3 C.11.2.1.2) to [0, 1], MONOCHROME1
inversion, then a resize (area averaging or bilinear with half-pixel centres, both as separable
weight matrices) and normalisation.  The training script uses :func:`preprocess_pixels` too, so
the model sees at training time exactly what it sees in the node.

The fused kernels of the kernels issue replace this module's arithmetic; its results remain the
reference they are tested against.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pydicom.dataset import Dataset

from .manifest import ModelPackage, Window


class InputRejected(Exception):
    """An instance the model cannot take.  ``reason`` is a short, bounded code for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def voi_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map modality values to [0, 1] through a VOI window (PS3.3 C.11.2.1.2.1-3)."""
    x = x.astype(np.float32, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:
        # LINEAR: width 1 is allowed and makes a threshold at centre - 0.5.
        if width < 1:
            raise InputRejected("voi", f"Window Width {width} is below 1, which LINEAR does not allow")
        if width == 1:
            return (x > center - 0.5).astype(np.float32)
        y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """An (n_out, n_in) matrix whose rows resample one axis.

    ``area``: each output sample averages the input interval it covers (exact box filter); used
    when downsampling.  ``bilinear``: linear interpolation with half-pixel centres
    (``src = (dst + 0.5) * n_in / n_out - 0.5``, clamped at the edges).  An area resize that
    upsamples falls back to bilinear, as box filtering a smaller grid only replicates pixels.
    """
    w = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if mode == "area" and n_out <= n_in:
        for o in range(n_out):
            lo, hi = o * scale, (o + 1) * scale
            i0, i1 = int(math.floor(lo)), min(int(math.ceil(hi)), n_in)
            for i in range(i0, i1):
                w[o, i] = min(hi, i + 1) - max(lo, i)
            w[o] /= scale
    else:
        for o in range(n_out):
            src = min(max((o + 0.5) * scale - 0.5, 0.0), n_in - 1)
            i0 = int(math.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            f = src - i0
            w[o, i0] += 1.0 - f
            w[o, i1] += f
    return w.astype(np.float32)


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resample a 2-D image to (height, width)."""
    if img.shape == (height, width):
        return img
    wh = resize_weights(img.shape[0], height, mode)
    ww = resize_weights(img.shape[1], width, mode)
    return (wh @ img @ ww.T).astype(np.float32, copy=False)


def preprocess_pixels(values: np.ndarray, window: Window | None, photometric: str,
                      pkg: ModelPackage, voi_function: str = "LINEAR") -> np.ndarray:
    """Modality values (H, W) -> model input (C, H', W') float32.

    ``window`` is the instance's VOI window; the package's fixed window, if it has one, wins.
    Without either, the image's own value range is stretched to [0, 1].
    """
    pre = pkg.preprocessing
    values = values.astype(np.float32, copy=False)
    chosen = pre.window or window
    if chosen is not None:
        x = voi_window(values, chosen.center, chosen.width, voi_function if pre.window is None else "LINEAR")
    else:
        lo, hi = float(values.min()), float(values.max())
        x = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1" and pre.monochrome1 == "invert":
        x = 1.0 - x
    x = resize(x, pkg.input_height, pkg.input_width, pre.resize)
    c = pkg.input_channels
    mean = np.asarray(pre.mean if len(pre.mean) == c else pre.mean * c, dtype=np.float32)
    std = np.asarray(pre.std if len(pre.std) == c else pre.std * c, dtype=np.float32)
    return ((x[None, :, :] - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def check_applicable(ds: Dataset, pkg: ModelPackage) -> None:
    """Raise :class:`InputRejected` if ``pkg`` cannot take this instance."""
    app = pkg.applicability
    modality = str(ds.get("Modality", "") or "")
    if app.modalities and modality not in app.modalities:
        raise InputRejected("modality", f"Modality {modality or '(absent)'} is not one of "
                                        f"{', '.join(app.modalities)} that {pkg.name} takes")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if app.sop_classes and sop_class not in app.sop_classes:
        raise InputRejected("sop_class", f"SOP Class {sop_class} is not one {pkg.name} takes")
    if "PixelData" not in ds:
        raise InputRejected("no_pixel_data", "the instance has no Pixel Data")
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric not in app.photometric_interpretations:
        raise InputRejected("photometric", f"Photometric Interpretation {photometric or '(absent)'} is not one of "
                                           f"{', '.join(app.photometric_interpretations)} that {pkg.name} takes")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputRejected("shape", "only single-frame, single-sample images are supported")


def _first(value) -> float:
    """First value of a possibly multi-valued DS (Window Center and Width may hold several)."""
    if value is None:
        raise ValueError
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def instance_window(ds: Dataset) -> tuple[Window | None, str]:
    """The instance's first VOI window (PS3.3 C.11.2.1.2) and VOI LUT Function, if it has one."""
    try:
        w = Window(_first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))
    except (ValueError, TypeError):
        return None, "LINEAR"
    return (w if w.width > 0 else None), str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The decoded 2-D pixel array.  pydicom masks the stored values to Bits Stored and
    sign-extends signed data."""
    try:
        pixels = ds.pixel_array
    except Exception as e:  # the decoder's message names the transfer syntax, not the patient
        raise InputRejected("decode", f"pixel data cannot be decoded: {type(e).__name__}: {e}") from None
    if pixels.ndim != 2:
        raise InputRejected("shape", f"expected a 2-D image, got pixel array of shape {pixels.shape}")
    return pixels


def rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale Slope and Intercept of the Modality LUT (PS3.3 C.11.1.1.2); 1 and 0 when absent."""
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def modality_values(ds: Dataset) -> np.ndarray:
    """Stored pixels with the Modality LUT's rescale applied (PS3.3 C.11.1), as float32."""
    pixels = stored_pixels(ds)
    slope, intercept = rescale(ds)
    values = pixels.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def prepare_instance(ds: Dataset, pkg: ModelPackage) -> np.ndarray:
    """Check, decode and preprocess one instance for ``pkg``: (C, H, W) float32."""
    check_applicable(ds, pkg)
    window, function = instance_window(ds)
    return preprocess_pixels(modality_values(ds), window, str(ds.PhotometricInterpretation), pkg, function)
