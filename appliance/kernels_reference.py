"""The numpy reference of every operation of the preprocessing and postprocessing kernels.

Written for clarity, one step at a time, in the float32 arithmetic the model sees.  Where the
node's numpy pipeline already defines a step, it is used as is (:func:`~appliance.preprocessing.voi_window`,
:func:`~appliance.preprocessing.resize`, :func:`~appliance.postprocessing.activate`), so the
kernels are tested against what trained the models.  The kernels (kernels/pixel_math.h) must
agree with this module to within a few float32 ulp (the resize sums in another order than BLAS),
and exactly where no sum is involved.

The steps, for one image:

1. stored values: the low Bits Stored bits of each sample, sign-extended when signed (PS3.5 8.1.1)
2. modality LUT: ``stored * slope + intercept`` in float32 (PS3.3 C.11.1.1.2)
3. VOI LUT to [0, 1]: the window's LINEAR / LINEAR_EXACT / SIGMOID function (PS3.3 C.11.2.1.2-3),
   or without a window the image's own value range stretched to [0, 1]
4. MONOCHROME1 inversion: ``1 - v`` (PS3.3 C.7.6.3.1.2)
5. an optional noise filter on the [0, 1] image: separable Gaussian, or median, edges replicated
6. resize to the model's grid: area averaging when downsampling, else bilinear (half-pixel centres)
7. normalisation ``(v - mean[c]) / std[c]`` for each channel, then float32 or float16
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .postprocessing import activate
from .preprocessing import InputRejected, resize, voi_window

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Gaussian:
    """Gaussian smoothing: taps ``exp(-k^2 / (2 sigma^2))`` for ``|k| <= radius`` (default
    ``ceil(3 sigma)``), normalised to sum 1, applied along rows, then along columns."""

    sigma: float
    radius: int | None = None

    @property
    def taps_radius(self) -> int:
        return self.radius if self.radius is not None else max(1, math.ceil(3.0 * self.sigma))


@dataclass(frozen=True)
class Median:
    """Median over a (2 radius + 1)^2 square: radius 1 (3x3) or 2 (5x5)."""

    radius: int = 1


@dataclass(frozen=True)
class SourceImage:
    """One image of a batch: its stored pixels and how they become [0, 1] intensities.

    ``window`` is (centre, width) in modality units; ``None`` stretches the image's own range of
    modality values to [0, 1].  ``bits_stored`` ``None`` means every bit of the dtype.
    """

    pixels: np.ndarray
    bits_stored: int | None = None
    slope: float = 1.0
    intercept: float = 0.0
    window: tuple[float, float] | None = None
    voi_function: str = "LINEAR"
    invert: bool = False


@dataclass(frozen=True)
class ModelInput:
    """The tensor a model takes: NCHW of (height, width, channels), normalised per channel."""

    height: int
    width: int
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "area"
    dtype: type = np.float32
    noise: Gaussian | Median | None = field(default=None)

    def channel_mean(self) -> np.ndarray:
        return np.asarray(self.mean if len(self.mean) == self.channels else self.mean * self.channels, np.float32)

    def channel_std(self) -> np.ndarray:
        return np.asarray(self.std if len(self.std) == self.channels else self.std * self.channels, np.float32)


def stored_values(pixels: np.ndarray, bits_stored: int | None) -> np.ndarray:
    """The stored values of ``pixels`` (PS3.5 8.1.1): the low ``bits_stored`` bits, sign-extended
    when the dtype is signed, as float32.  Float pixel data has no Bits Stored."""
    if pixels.dtype.kind == "f":
        return pixels.astype(np.float32)
    bits = pixels.dtype.itemsize * 8 if bits_stored is None else int(bits_stored)
    values = pixels.astype(np.int64) & ((1 << bits) - 1)
    if pixels.dtype.kind == "i":
        sign = 1 << (bits - 1)
        values = np.where(values & sign, values - (1 << bits), values)
    return values.astype(np.float32)


def modality(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The modality LUT by rescale (PS3.3 C.11.1.1.2), as appliance.preprocessing.modality_values."""
    values = stored.astype(np.float32, copy=False)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def intensities(values: np.ndarray, window: tuple[float, float] | None, function: str = "LINEAR",
                invert: bool = False) -> np.ndarray:
    """Modality values to [0, 1] intensities: the VOI window, or the value range; then MONOCHROME1
    inversion.  The same arithmetic as appliance.preprocessing.preprocess_pixels."""
    if window is not None:
        x = voi_window(values, float(window[0]), float(window[1]), function)
    else:
        lo, hi = float(values.min()), float(values.max())
        x = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if invert:
        x = 1.0 - x
    return x.astype(np.float32, copy=False)


def gaussian_weights(sigma: float, radius: int) -> np.ndarray:
    """Normalised Gaussian taps, computed in double (summed in order) and rounded once to float32."""
    taps = []
    for k in range(-radius, radius + 1):
        q = k / sigma
        taps.append(math.exp(-0.5 * (q * q)))
    total = 0.0
    for t in taps:
        total += t
    return np.array([t / total for t in taps], dtype=np.float32)


def gaussian_filter(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian, edges replicated: rows first, then columns, each tap added in order."""
    g = gaussian_weights(sigma, radius)
    rows, columns = image.shape
    padded = np.pad(image, radius, mode="edge")
    across = np.zeros((rows + 2 * radius, columns), np.float32)
    for k in range(2 * radius + 1):
        across = across + g[k] * padded[:, k:k + columns]
    out = np.zeros((rows, columns), np.float32)
    for k in range(2 * radius + 1):
        out = out + g[k] * across[k:k + rows, :]
    return out


def median_filter(image: np.ndarray, radius: int) -> np.ndarray:
    """Median over the (2 radius + 1)^2 neighbourhood of each pixel, edges replicated."""
    rows, columns = image.shape
    padded = np.pad(image, radius, mode="edge")
    size = 2 * radius + 1
    stack = np.stack([padded[dy:dy + rows, dx:dx + columns] for dy in range(size) for dx in range(size)])
    return np.sort(stack, axis=0)[size * size // 2]


def check_voi(image: SourceImage) -> None:
    """Reject a VOI window the kernels cannot apply, as the numpy pipeline does."""
    function = (image.voi_function or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        raise InputRejected("voi", f"VOI LUT Function {function!r} is not one of {', '.join(VOI_FUNCTIONS)}")
    if image.window is None:
        return
    center, width = image.window
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InputRejected("voi", f"Window Center {center} / Width {width} are not finite numbers")
    if function == "LINEAR" and width < 1:
        raise InputRejected("voi", f"Window Width {width} is below 1, which LINEAR does not allow")
    if width <= 0:
        raise InputRejected("voi", f"Window Width {width} is not positive, which {function} requires")


def preprocess_image(image: SourceImage, target: ModelInput) -> np.ndarray:
    """One image to the model's (C, H, W) input, step by step."""
    check_voi(image)
    values = modality(stored_values(image.pixels, image.bits_stored), image.slope, image.intercept)
    x = intensities(values, image.window, (image.voi_function or "LINEAR").upper(), image.invert)
    if isinstance(target.noise, Gaussian):
        x = gaussian_filter(x, target.noise.sigma, target.noise.taps_radius)
    elif isinstance(target.noise, Median):
        x = median_filter(x, target.noise.radius)
    x = resize(x, target.height, target.width, target.resize)
    mean, std = target.channel_mean(), target.channel_std()
    out = ((x[None, :, :] - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    return out.astype(target.dtype)


def preprocess(images: Sequence[SourceImage], target: ModelInput) -> np.ndarray:
    """A batch of images to the model's NCHW input."""
    out = np.empty((len(images), target.channels, target.height, target.width), target.dtype)
    for n, image in enumerate(images):
        out[n] = preprocess_image(image, target)
    return out


# ---- postprocessing -------------------------------------------------------------------------------

def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid, as appliance.postprocessing.activate, rounded to float32."""
    return activate(x, "sigmoid").astype(np.float32)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax along ``axis`` (the channel axis of NCHW), rounded to float32."""
    moved = np.moveaxis(x, axis, -1)
    return np.moveaxis(activate(moved, "softmax"), -1, axis).astype(np.float32)


def argmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Index of the largest value along ``axis``, the first one on ties, as int32."""
    return np.argmax(x, axis=axis).astype(np.int32)


def resample(maps: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """Heatmaps or probability maps (..., h, w) to (..., height, width) with the same resize as
    preprocessing: back onto the source image's grid."""
    flat = maps.reshape(-1, *maps.shape[-2:]).astype(np.float32)
    out = np.stack([resize(m, height, width, mode) for m in flat])
    return out.reshape(*maps.shape[:-2], height, width).astype(np.float32)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """For each output sample, the input sample whose interval holds its centre."""
    scale = n_in / n_out
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64), n_in - 1)


def labels_to_source(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label maps (..., h, w) to (..., height, width) by nearest sample: classes are never blended."""
    rows = nearest_indices(labels.shape[-2], height)
    columns = nearest_indices(labels.shape[-1], width)
    return labels[..., rows[:, None], columns[None, :]]
