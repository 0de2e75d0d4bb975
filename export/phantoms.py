"""Synthetic chest radiograph phantoms, written as Digital X-Ray (For Presentation) instances.

A phantom is drawn as a map of X-ray attenuation (line integrals, in units of mu * thickness):
soft tissue of the trunk, two lung fields with vascular markings, hila, mediastinum, spine and
trachea, heart, hemidiaphragms, posterior rib arcs and clavicles.  Photons through that map are
counted with quantum (Poisson, here Gaussian-approximated) and electronic noise, and the counts
are turned into a log-exposure "For Presentation" image of 12 stored bits, as a detector's image
processing would: bone and mediastinum bright, lungs dark, air black (MONOCHROME2).

Geometry lives in normalised coordinates (x and y in [-1, 1] across the image), so a seed makes
the same patient at 256, 512, 1024 or 2048 pixels; only the quantum noise is drawn per pixel, and
its level follows the pixel area (fewer photons per smaller pixel), so an image made large and
resized down looks like one made small.  With the same seed the anatomy and the noise are the
same whatever the finding, and a finding changes only the pixels it covers.

Findings:

* ``"nodule"``: a round (slightly lobulated) opacity of 1-2.6 cm inside a lung field, not behind
  the heart.
* ``"pneumothorax"``: the lung has collapsed by 2.5-16 % away from the apex and lateral chest
  wall; the gap has no lung markings and is more lucent, bounded by a thin visceral pleural line.
* ``"nodule+pneumothorax"``: both.

Every phantom is fictional: patient names and IDs are made up from the seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

#: The findings :func:`make_phantom` can draw (``None`` is a normal chest).
FINDINGS: tuple[str | None, ...] = (None, "nodule", "pneumothorax", "nodule+pneumothorax")

#: Digital X-Ray Image Storage - For Presentation (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

#: The detector is 43 cm wide; Imager Pixel Spacing follows from the matrix size.
FIELD_MM = 430.0

#: Type 2 attributes that ``write_dicom(..., omit_type2=True)`` leaves out, as some scanners do.
TYPE2_OMITTABLE = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                   "ReferringPhysicianName", "StudyID")

#: Bits of :attr:`Phantom.finding_mask`.
NODULE_BIT, PNEUMOTHORAX_BIT = 1, 2

_NOISE_GRID = 128          # lung-marking texture is drawn on this grid over the anatomy, then sampled
_REF_SIZE = 2048           # photon counts are given per pixel of a 2048 matrix
_BODY_MASK_LEVEL = 0.3


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic chest radiograph: stored pixel values and how to display them."""

    pixels: np.ndarray                #: (size, size) uint16 stored values
    window_center: float              #: VOI window for the stored values (PS3.3 C.11.2.1.2)
    window_width: float
    photometric: str                  #: "MONOCHROME2", or "MONOCHROME1" with inverted stored values
    finding: str | None               #: one of :data:`FINDINGS`
    seed: int
    bits_stored: int = 12
    #: Where the finding is, in pixels: (row0, col0, row1, col1), half-open; None for a normal chest.
    finding_box: tuple[int, int, int, int] | None = None
    #: (size, size) uint8, bit :data:`NODULE_BIT` on the nodule and :data:`PNEUMOTHORAX_BIT` on the
    #: pleural gap; None for a normal chest.
    finding_mask: np.ndarray | None = None
    view_position: str = "PA"

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def pixel_spacing_mm(self) -> float:
        return FIELD_MM / self.size

    @property
    def labels(self) -> tuple[bool, bool]:
        """(nodule, pneumothorax): the multi-label target of the cxr-triage model."""
        f = self.finding or ""
        return ("nodule" in f, "pneumothorax" in f)


# ----------------------------------------------------------------------------------------------
# Geometry

def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, a C1 ramp between: soft edges that are exactly 0 outside a shape."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True)
class _Lung:
    apex_y: float
    apex_x: float     # |x| of the apex
    base_y: float     # y of the costophrenic angle
    lateral: float    # |x| of the lateral border at the base
    medial: float     # |x| of the medial border at the base
    dome_x: float     # |x| of the top of the hemidiaphragm
    dome_y: float

    def dome(self, ax: np.ndarray) -> np.ndarray:
        k = (self.base_y + 0.03 - self.dome_y) / (self.lateral - self.dome_x) ** 2
        # Steep down to the costophrenic angle laterally, flatter medially to the heart.
        k = np.where(ax > self.dome_x, np.float32(k), np.float32(0.3 * k))
        return self.dome_y + k * (ax - self.dome_x) ** 2

    def borders(self, ax: np.ndarray, y: np.ndarray, scale: float = 1.0,
                anchor: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Signed distance-like value (normalised units) to the apex, lateral and medial borders.

        With ``scale`` < 1 the lung is shrunk by that factor towards ``anchor`` (|x|, y): a lung
        collapsed away from the chest wall.
        """
        ax = anchor[0] + (ax - anchor[0]) / scale
        y = anchor[1] + (y - anchor[1]) / scale
        b = np.clip((y - self.apex_y) / (self.base_y - self.apex_y), 0.0, 1.0)
        lateral = self.apex_x + (self.lateral - self.apex_x) * (1.0 - (1.0 - b) ** 3) ** 0.6
        medial = self.apex_x - (self.apex_x - self.medial) * (1.0 - (1.0 - b) ** 2) ** 0.5
        d = np.minimum(lateral - ax, ax - medial)
        d = np.minimum(d, (y - self.apex_y) * 0.6)
        return d * scale

    def inside(self, ax: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.minimum(self.borders(ax, y), self.dome(ax) - y)


@dataclass(frozen=True)
class _Anatomy:
    """Everything about one patient that does not depend on the matrix size or the finding."""

    angle: float
    shift: tuple[float, float]
    scale: float
    mu_scale: float
    soft: float
    body_hw: float
    neck_hw: float
    shoulder_y: float
    lung_air: float
    lungs: tuple[_Lung, _Lung]        # image left (patient right), image right (patient left)
    heart: tuple[float, float, float, float, float, float]   # cx, cy, ax, ay, angle, density
    hila: tuple[float, float, float]  # |x|, y, density
    carina_y: float
    rib_y0: np.ndarray                # (2, n) medial end of each posterior rib
    rib_h: np.ndarray                 # (2, n) half-thickness
    rib_mu: np.ndarray                # (2, n) density
    rib_spacing: float
    rib_curve: float
    clavicle: tuple[float, float, float]   # y at the sternal end, rise to the lateral end, density
    marking_mu: float
    marking_field: np.ndarray         # band-limited periodic noise, unit std, for _bilinear
    photons: float                    # expected unattenuated photons per pixel of a 2048 matrix
    electronic: float                 # electronic noise, photons per 2048 pixel (std)
    offset: float
    top: float
    gamma: float
    window_scale: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    apex_y = u(-0.80, -0.70)
    base_y = u(0.55, 0.70)
    lungs = []
    for side in (0, 1):
        lateral = u(0.76, 0.84)
        dome_x = u(0.38, 0.50)
        # The right hemidiaphragm (image left) sits higher, under the liver.
        dome_y = u(0.28, 0.42) + (0.0 if side == 0 else u(0.02, 0.08))
        lungs.append(_Lung(apex_y=apex_y + u(-0.02, 0.02), apex_x=u(0.28, 0.36),
                           base_y=max(base_y + u(-0.03, 0.03), dome_y + 0.12), lateral=lateral,
                           medial=u(0.08, 0.12) if side == 0 else u(0.10, 0.16),
                           dome_x=dome_x, dome_y=dome_y))
    n_ribs = 11
    spacing = (base_y - apex_y) / u(8.0, 9.0)
    y0 = apex_y - 0.02 + spacing * np.arange(n_ribs)
    rib_y0 = np.stack([y0 + rng.uniform(-0.012, 0.012, n_ribs) for _ in range(2)])
    field = rng.standard_normal((_NOISE_GRID, _NOISE_GRID))
    f = np.fft.fftfreq(_NOISE_GRID)[:, None] ** 2 + np.fft.fftfreq(_NOISE_GRID)[None, :] ** 2
    f = np.sqrt(f) * _NOISE_GRID / 2.2          # cycles per normalised unit
    band = np.exp(-((f - u(3.5, 5.0)) / 2.0) ** 2)
    field = np.real(np.fft.ifft2(np.fft.fft2(field) * band))
    field = (field - field.mean()) / field.std()
    field = np.pad(field, ((0, 1), (0, 1)), mode="wrap")
    return _Anatomy(
        angle=math.radians(u(-4.0, 4.0)), shift=(u(-0.04, 0.04), u(-0.04, 0.04)), scale=u(0.92, 1.05),
        mu_scale=u(0.9, 1.1), soft=u(2.0, 2.6), body_hw=u(0.84, 0.93), neck_hw=u(0.22, 0.30),
        shoulder_y=u(-0.98, -0.86), lung_air=u(1.0, 1.35), lungs=(lungs[0], lungs[1]),
        heart=(u(0.08, 0.16), u(0.30, 0.40), u(0.30, 0.38), u(0.20, 0.26), u(-0.45, -0.2), u(0.35, 0.55)),
        hila=(u(0.15, 0.20), u(-0.20, -0.08), u(0.15, 0.30)), carina_y=u(-0.42, -0.32),
        rib_y0=rib_y0, rib_h=rng.uniform(0.018, 0.024, (2, n_ribs)),
        rib_mu=rng.uniform(0.25, 0.45, (2, n_ribs)), rib_spacing=spacing, rib_curve=u(0.36, 0.46),
        clavicle=(u(-0.68, -0.58), u(0.06, 0.12), u(0.5, 0.7)),
        marking_mu=u(0.09, 0.15), marking_field=field.astype(np.float32),
        photons=float(np.exp(u(math.log(800.0), math.log(4000.0)))), electronic=u(1.0, 3.0),
        offset=u(60.0, 300.0), top=u(3300.0, 3950.0), gamma=u(0.85, 1.15), window_scale=u(0.95, 1.12),
    )


@dataclass(frozen=True)
class _Nodule:
    side: int
    x: float   # signed anatomy x
    y: float
    radius: float
    mu: float
    lobes: tuple[float, float]   # amplitude and phase of a 3-lobed outline


@dataclass(frozen=True)
class _Pneumothorax:
    side: int
    scale: float        # the collapsed lung is this fraction of the lung's size
    anchor: tuple[float, float]
    lucency: float
    line_mu: float
    line_w: float


def _draw_nodule(rng: np.random.Generator, a: _Anatomy) -> _Nodule:
    cx, cy, hx, hy, hang, _ = a.heart
    for _ in range(1000):
        side = int(rng.integers(0, 2))
        lung = a.lungs[side]
        radius = rng.uniform(0.022, 0.06)
        ax = rng.uniform(lung.medial, lung.lateral)
        y = rng.uniform(lung.apex_y, lung.base_y)
        x = ax if side == 1 else -ax
        c, s = math.cos(hang), math.sin(hang)
        hr = ((c * (x - cx) + s * (y - cy)) / hx) ** 2 + ((-s * (x - cx) + c * (y - cy)) / hy) ** 2
        # Inside the lung with its whole outline, and not hidden behind the heart.
        if lung.inside(np.float64(ax), np.float64(y)) > radius + 0.03 and hr > 1.1:
            # A solid nodule: 0.2 to 0.4 per cm through its diameter, soft tissue to partly
            # calcified (radius is in half-widths of the 43 cm field, so 1 cm is 0.023).
            return _Nodule(side, x, y, radius, radius * 43.0 * 0.2 * rng.uniform(1.0, 2.0),
                           (rng.uniform(0.0, 0.12), rng.uniform(0.0, 2 * math.pi)))
    raise RuntimeError("no place for a nodule in this phantom's lungs")  # pragma: no cover


def _draw_pneumothorax(rng: np.random.Generator, a: _Anatomy) -> _Pneumothorax:
    side = int(rng.integers(0, 2))
    lung = a.lungs[side]
    return _Pneumothorax(side=side, scale=rng.uniform(0.84, 0.975),
                         anchor=(lung.medial + rng.uniform(0.0, 0.06), lung.base_y),
                         lucency=rng.uniform(0.04, 0.12), line_mu=rng.uniform(0.10, 0.25),
                         line_w=rng.uniform(0.003, 0.005))


def _bilinear(grid: np.ndarray, x: np.ndarray, y: np.ndarray, extent: float = 1.1) -> np.ndarray:
    """Sample a periodic ``grid`` (n + 1 wide with its first row and column repeated at the end,
    n a power of two, covering [-extent, extent]^2 per period) at normalised (x, y)."""
    n = grid.shape[0] - 1
    k = np.float32(n / (2 * extent))
    gx = (x + np.float32(extent)) * k
    gy = (y + np.float32(extent)) * k
    x0, y0 = np.floor(gx), np.floor(gy)
    fx, fy = gx - x0, gy - y0
    i00 = (y0.astype(np.int32) & (n - 1)) * (n + 1) + (x0.astype(np.int32) & (n - 1))
    flat = grid.ravel()
    top = flat.take(i00)
    top += (flat.take(i00 + 1) - top) * fx
    i00 += n + 1
    bottom = flat.take(i00)
    bottom += (flat.take(i00 + 1) - bottom) * fx
    top += (bottom - top) * fy
    return top


class _Grid:
    """Anatomy coordinates of every pixel, and the pixel rectangle that covers an anatomy box."""

    def __init__(self, a: _Anatomy, size: int):
        self.size = size
        self.c, self.s = math.cos(a.angle), math.sin(a.angle)
        self.a = a
        u = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
        du = (u - np.float32(a.shift[0]))[None, :]
        dv = (u - np.float32(a.shift[1]))[:, None]
        k = np.float32(1.0 / a.scale)
        self.X = (np.float32(self.c) * k * du + np.float32(self.s) * k * dv).astype(np.float32)
        self.Y = (np.float32(-self.s) * k * du + np.float32(self.c) * k * dv).astype(np.float32)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Anatomy (x, y) -> image (u, v), both normalised."""
        a = self.a
        return (a.scale * (self.c * x - self.s * y) + a.shift[0], a.scale * (self.s * x + self.c * y) + a.shift[1])

    def region(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels whose anatomy coordinates may fall in [x0, x1] x [y0, y1]."""
        corners = [self.to_image(x, y) for x in (x0, x1) for y in (y0, y1)]
        us, vs = [c[0] for c in corners], [c[1] for c in corners]

        def span(lo: float, hi: float) -> slice:
            a = int(math.floor((lo + 1.0) / 2.0 * self.size)) - 2
            b = int(math.ceil((hi + 1.0) / 2.0 * self.size)) + 2
            return slice(min(max(a, 0), self.size), min(max(b, 0), self.size))
        return span(min(vs), max(vs)), span(min(us), max(us))

    def coords(self, region: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.X[region], self.Y[region]


def _attenuation(a: _Anatomy, size: int, nodule: _Nodule | None, ptx: _Pneumothorax | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Line integrals of attenuation over the (size, size) image.

    Returns them with the trunk's thickness profile (the body mask), the pneumothorax gap and the
    nodule's outline (both None when absent).  Each structure is drawn only over the pixels that
    can hold it.
    """
    f32 = np.float32
    g = _Grid(a, size)
    X, Y = g.X, g.Y
    pixel = 2.0 / size          # one pixel, in normalised units

    # Trunk: an elliptical cross-section; above the shoulders only the neck.
    AX = np.abs(X)
    trunk = np.sqrt(np.clip(1.0 - (X / (a.body_hw * (1.0 + 0.05 * Y))) ** 2, 0.0, 1.0))
    shoulder = _smoothstep((Y - f32(a.shoulder_y) - f32(0.7) * np.maximum(AX - f32(a.neck_hw), 0.0) ** 2)
                           / f32(0.03))
    neck = f32(0.8) * np.sqrt(np.clip(1.0 - (X / a.neck_hw) ** 2, 0.0, 1.0))
    thick = np.maximum(trunk * shoulder, neck)
    del trunk, shoulder, neck, AX
    mu = f32(a.soft) * thick

    # Hemidiaphragms, each on its side, blended across the midline under the heart; the abdomen
    # below them.
    top = min(lung.dome_y for lung in a.lungs) - 0.05
    dome = np.full((size, size), np.float32(np.inf), dtype=np.float32)
    r = g.region(-1.6, 1.6, top, 1.6)
    x, y = g.coords(r)
    ax = np.abs(x)
    blend = _smoothstep((x + f32(0.12)) / f32(0.24))
    dome[r] = a.lungs[0].dome(ax) * (1.0 - blend) + a.lungs[1].dome(ax) * blend
    mu[r] += f32(0.6) * _smoothstep((y - dome[r]) / f32(0.015)) * thick[r]
    del x, y, ax, blend

    # Heart, resting on the diaphragm.
    cx, cy, hx, hy, hang, hmu = a.heart
    reach = max(hx, hy)
    heart_mask = np.zeros((size, size), dtype=np.float32)
    r = g.region(cx - reach, cx + reach, cy - reach, cy + reach)
    x, y = g.coords(r)
    hc, hs = f32(math.cos(hang)), f32(math.sin(hang))
    hr2 = ((hc * (x - f32(cx)) + hs * (y - f32(cy))) / f32(hx)) ** 2 + \
          ((-hs * (x - f32(cx)) + hc * (y - f32(cy))) / f32(hy)) ** 2
    above = _smoothstep((dome[r] - y) / f32(0.02))
    mu[r] += f32(hmu) * np.sqrt(np.clip(1.0 - hr2, 0.0, 1.0)) * above
    heart_mask[r] = _smoothstep((1.0 - hr2) / f32(0.06))
    del x, y, hr2, above

    # Lungs: air replaces tissue, most in the middle of each lung.  Vessels fan out from the hila:
    # the zero crossings of band-limited noise sampled in polar coordinates around each hilum,
    # thick near the hilum, thin and faint towards the periphery.
    hx_, hy_, hmu_ = a.hila
    ptx_mask = None
    for side, lung in enumerate(a.lungs):
        sign = -1.0 if side == 0 else 1.0
        xs = sorted((sign * (lung.medial - 0.01), sign * (lung.lateral + 0.01)))
        r = g.region(xs[0], xs[1], lung.apex_y - 0.01, lung.base_y + 0.04)
        x, y = g.coords(r)
        ax = np.maximum(x * f32(sign), f32(0.0))
        inside = lung.inside(ax, y)
        lung_mask = _smoothstep(inside / f32(0.012))
        depth = np.clip(inside / f32(0.22), 0.0, 1.0) ** f32(0.6)
        hm = heart_mask[r]
        air = f32(a.lung_air) * (f32(0.35) * lung_mask + f32(0.65) * depth) * (1.0 - f32(0.6) * hm)
        del inside, depth

        rx, ry = ax - f32(hx_), y - f32(hy_)
        radius = np.sqrt(rx * rx + ry * ry)
        near = np.exp(-(radius * radius) / f32(0.35 ** 2))
        phi = np.arctan2(ry, rx) * f32(2.2 / math.pi) + f32(0.55 * side)
        field = _bilinear(a.marking_field, phi, radius * f32(0.6))
        # Vessel calibre in normalised units; the field's gradient grows as 1/radius.
        calibre = f32(0.005) + f32(0.012) * near
        drawn = np.maximum(calibre, f32(1.6 * pixel))
        width = f32(8.5) * drawn / (radius + f32(0.05))
        markings = np.exp(-(field / width) ** 2) * (calibre / drawn) * (f32(0.3) + f32(0.7) * near)
        markings *= f32(a.marking_mu) * lung_mask * (1.0 - f32(0.7) * hm)
        del rx, ry, radius, near, phi, field, calibre, drawn, width

        if ptx is not None and ptx.side == side:
            collapsed = lung.borders(ax, y, ptx.scale, ptx.anchor)
            gap = lung_mask * (1.0 - _smoothstep(collapsed / f32(0.006)))
            markings *= 1.0 - gap
            air += f32(ptx.lucency) * gap
            # A line thinner than a pixel is drawn a pixel wide with the same integral, as an
            # area-averaging detector would record it.
            w = max(ptx.line_w, 0.6 * pixel)
            line = np.where(np.abs(collapsed) < 4 * w, np.exp(-(collapsed / f32(w)) ** 2), f32(0.0))
            mu[r] += f32(ptx.line_mu * ptx.line_w / w) * line * lung_mask
            ptx_mask = np.zeros((size, size), dtype=np.float32)
            ptx_mask[r] = gap
            del collapsed, gap, line
        mu[r] += markings - air
        del x, y, ax, lung_mask, hm, air, markings

        # The hilum: pulmonary arteries and bronchi, a compact density.
        hxs = sign * hx_
        r = g.region(hxs - 0.16, hxs + 0.16, hy_ - 0.16, hy_ + 0.16)
        x, y = g.coords(r)
        d2 = ((x - f32(hxs)) ** 2 + (y - f32(hy_)) ** 2) / f32(0.15 ** 2)
        mu[r] += f32(hmu_) * np.clip(1.0 - d2, 0.0, 1.0) ** 2
        del x, y, d2

    # Mediastinum: spine (vertebral bodies and discs) and the air column of the trachea.
    r = g.region(-0.09, 0.09, -1.6, 1.6)
    x, y = g.coords(r)
    ax = np.abs(x)
    spine = _smoothstep((f32(0.065) - ax) / f32(0.01))
    vertebra = f32(0.75) + f32(0.25) * np.cos(y * f32(2 * math.pi / 0.085))
    trachea = _smoothstep((f32(0.028) - ax) / f32(0.008)) * _smoothstep((f32(a.carina_y) - y) / f32(0.03))
    mu[r] += f32(0.25) * spine * vertebra * thick[r] - f32(0.22) * trachea
    del x, y, ax, spine, vertebra, trachea

    # Posterior ribs: arcs from the spine, up and out, then down along the lateral chest wall.
    n_ribs = a.rib_y0.shape[1]
    for side, lung in enumerate(a.lungs):
        sign = -1.0 if side == 0 else 1.0
        reach = lung.lateral + 0.08
        xs = sorted((sign * 0.05, sign * (reach + 0.01)))
        r = g.region(xs[0], xs[1], float(a.rib_y0[side].min()) - 0.1, float(a.rib_y0[side].max()) + 0.2)
        x, y = g.coords(r)
        t = (np.maximum(x * f32(sign), f32(0.0)) - f32(0.06)) / f32(reach - 0.06)
        z = y - f32(a.rib_curve) * t * t + f32(a.rib_curve - 0.12) * t
        k = np.clip(np.rint((z - f32(a.rib_y0[side, 0])) / f32(a.rib_spacing)), 0, n_ribs - 1).astype(np.intp)
        q = (z - a.rib_y0[side].astype(np.float32)[k]) / a.rib_h[side].astype(np.float32)[k]
        aq = np.abs(q)
        body = np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
        cortex = np.where(aq < 1.0, np.exp(-((aq - f32(0.85)) / f32(0.12)) ** 2), f32(0.0))
        ends = _smoothstep(t / f32(0.05)) * _smoothstep((1.0 - t) / f32(0.12))
        mu[r] += a.rib_mu[side].astype(np.float32)[k] * (f32(0.6) * body + f32(0.4) * cortex) * ends
        del x, y, t, z, k, q, aq, body, cortex, ends

    # Clavicles: from the sternal notch out and up to the shoulders.
    cy0, rise, cmu = a.clavicle
    for sign in (-1.0, 1.0):
        xs = sorted((sign * 0.04, sign * 0.61))
        r = g.region(xs[0], xs[1], cy0 - rise - 0.06, cy0 + 0.06)
        x, y = g.coords(r)
        t = (np.maximum(x * f32(sign), f32(0.0)) - f32(0.05)) / f32(0.55)
        yc = f32(cy0) - f32(rise) * t + f32(0.02) * np.sin(t * f32(2 * math.pi))
        q = (y - yc) / f32(0.022)
        clav = np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0)) * _smoothstep(t / f32(0.05)) * _smoothstep((1 - t) / f32(0.08))
        mu[r] += f32(cmu) * clav
        del x, y, t, yc, q, clav

    nodule_mask = None
    if nodule is not None:
        amp, phase = nodule.lobes
        reach = nodule.radius * (1.0 + amp) + 0.01
        r = g.region(nodule.x - reach, nodule.x + reach, nodule.y - reach, nodule.y + reach)
        x, y = g.coords(r)
        dx, dy = x - f32(nodule.x), y - f32(nodule.y)
        theta = np.arctan2(dy, dx)
        rr = np.sqrt(dx * dx + dy * dy) / (f32(nodule.radius) * (1.0 + f32(amp) * np.sin(3 * theta + f32(phase))))
        mu[r] += f32(nodule.mu) * np.clip(1.0 - rr * rr, 0.0, 1.0) ** f32(0.6)
        nodule_mask = np.zeros((size, size), dtype=bool)
        nodule_mask[r] = rr < 1.0

    mu *= f32(a.mu_scale)
    np.maximum(mu, 0.0, out=mu)
    return mu, thick, ptx_mask, nodule_mask


def _box(mask: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, col0, row1, col1), half-open, of a mask's non-zero pixels."""
    if mask is None or not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def make_phantom(seed: int, size: int = 1024, finding: str | None = None,
                 monochrome1: bool = False, bits_stored: int = 12) -> Phantom:
    """A synthetic PA chest radiograph, the same for the same arguments.

    ``finding`` is one of :data:`FINDINGS`.  ``monochrome1`` stores inverted values
    (PS3.3 C.7.6.3.1.2: the minimum stored value is displayed white) with the window moved to
    match, so both photometric interpretations show the same picture.
    """
    if finding not in FINDINGS:
        raise ValueError(f"finding {finding!r} is not one of {', '.join(map(repr, FINDINGS))}")
    if not 16 <= size <= 4096:
        raise ValueError(f"size {size} is outside 16..4096 pixels")
    if bits_stored not in (12, 14, 16):
        raise ValueError(f"bits_stored {bits_stored}: expected 12, 14 or 16")
    # Independent streams: anatomy, findings and noise do not disturb one another.
    anatomy_rng, finding_rng, noise_rng = (np.random.default_rng(s) for s in
                                           np.random.SeedSequence([seed, 0x43585221]).spawn(3))
    a = _draw_anatomy(anatomy_rng)
    nodule = _draw_nodule(finding_rng, a) if finding and "nodule" in finding else None
    ptx = _draw_pneumothorax(finding_rng, a) if finding and "pneumothorax" in finding else None
    mu, thick, ptx_mask, nodule_mask = _attenuation(a, size, nodule, ptx)

    # Quantum noise: counts per pixel shrink with the pixel's area.  The noise field is drawn
    # before it is scaled, so it is the same draw whatever the finding.
    z = noise_rng.standard_normal((size, size), dtype=np.float32)
    per_pixel = a.photons * (_REF_SIZE / size) ** 2
    expected = np.float32(per_pixel) * np.exp(-mu)
    # Quantum and electronic noise are independent: their variances add.
    counts = expected + np.sqrt(expected + np.float32((a.electronic * _REF_SIZE / size) ** 2)) * z
    del z, expected
    p = -np.log(np.maximum(counts, np.float32(0.5)) / np.float32(per_pixel))
    del counts

    # Detector processing to log-exposure values of bits_stored bits.
    top_value = (1 << bits_stored) - 1
    scale = top_value / 4095.0
    p_max = float(mu.max())
    gain = (a.top - a.offset) * scale / p_max ** a.gamma
    values = a.offset * scale + gain * np.maximum(p, 0.0) ** np.float32(a.gamma)
    pixels = np.clip(np.rint(values), 0, top_value).astype(np.uint16)
    del values, p

    # Window: the trunk's range of noiseless values, sampled on a grid that does not depend on size.
    step = max(size // 256, 1)
    clean = a.offset * scale + gain * mu[::step, ::step].astype(np.float64) ** a.gamma
    trunk = clean[thick[::step, ::step] > _BODY_MASK_LEVEL]
    lo, hi = np.percentile(trunk, [1.0, 99.5])
    center = round(float(lo + hi) / 2.0, 1)
    width = round(float(hi - lo) * a.window_scale, 1)

    photometric = "MONOCHROME2"
    if monochrome1:
        pixels = (top_value - pixels).astype(np.uint16)
        # The inverted LINEAR window that maps every value to the same output (PS3.3 C.11.2.1.2.1).
        center = top_value + 1 - center
        photometric = "MONOCHROME1"
    mask = None
    if finding:
        mask = np.zeros((size, size), dtype=np.uint8)
        if nodule_mask is not None:
            mask[nodule_mask] |= NODULE_BIT
        if ptx_mask is not None:
            mask[ptx_mask > 0.5] |= PNEUMOTHORAX_BIT
    return Phantom(pixels=pixels, window_center=center, window_width=width, photometric=photometric,
                   finding=finding, seed=seed, bits_stored=bits_stored, finding_box=_box(mask),
                   finding_mask=mask)

# ----------------------------------------------------------------------------------------------
# DICOM

def _uid(kind: str, phantom: Phantom) -> str:
    from appliance.uids import derived_uid
    return derived_uid("phantom", kind, str(phantom.seed), str(phantom.size), str(phantom.finding),
                       phantom.photometric)


def write_dicom(phantom: Phantom, path: str | Path | None = None, *, modality: str = "DX",
                body_part: str = "CHEST", patient_name: str | None = None, patient_id: str | None = None,
                study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
                omit_type2: bool = False, **overrides: object) -> Dataset:
    """The phantom as a Digital X-Ray Image - For Presentation instance (PS3.3 A.26), Explicit VR
    Little Endian, written to ``path`` when one is given and returned.

    UIDs default to ones derived from the phantom (seed, size, finding, photometric), so writing
    the same phantom twice gives the same instance.  ``omit_type2`` leaves out the Type 2
    attributes in :data:`TYPE2_OMITTABLE`, as some scanners do (the result is then not a valid
    DX instance, on purpose).  ``overrides`` set any further attribute by keyword (``None``
    deletes it), e.g. ``Modality="CR"`` or ``WindowCenter=None``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    sop_uid = sop_uid or _uid("sop", phantom)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    # Patient (PS3.3 C.7.1.1): fictional.
    ds.PatientName = patient_name or f"PHANTOM^CHEST{phantom.seed % 100000:05d}"
    ds.PatientID = patient_id or f"PHANTOM-{phantom.seed}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study (C.7.2.1).
    ds.StudyInstanceUID = study_uid or _uid("study", phantom)
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"P{phantom.seed % 10**15}"
    ds.AccessionNumber = f"PH{phantom.seed % 10**14}"
    ds.StudyDescription = "Synthetic chest phantom"
    # General Series (C.7.3.1) and DX Series (C.8.11.1).
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or _uid("series", phantom)
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Chest {phantom.view_position}"
    ds.BodyPartExamined = body_part
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment (C.7.5.1).
    ds.Manufacturer = "Appliance project phantom generator"
    ds.ManufacturerModelName = "export.phantoms"
    ds.SoftwareVersions = "1"
    ds.DeviceSerialNumber = "0"
    # General Image (C.7.6.1), DX Anatomy Imaged (C.8.11.2), DX Positioning (C.8.11.5).
    ds.InstanceNumber = 1
    # PA view, seen as if facing the patient: rows run to the patient's left, columns to the feet.
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AcquisitionDate = "20240101"
    ds.AcquisitionTime = "120000"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = "U"
    ds.ViewPosition = phantom.view_position
    view = Dataset()
    view.CodeValue = "399348003"
    view.CodingSchemeDesignator = "SCT"
    view.CodeMeaning = "postero-anterior"
    view.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [view]
    ds.PositionerType = "COLUMN"
    region = Dataset()
    region.CodeValue = "43799004"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    # Image Pixel (C.7.6.3) and DX Image (C.8.11.3).
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = phantom.photometric
    ds.Rows, ds.Columns = phantom.pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = phantom.bits_stored
    ds.HighBit = phantom.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # Higher stored values mean less X-ray intensity, unless stored inverted (C.8.11.3.1.2).
    ds.PixelIntensityRelationshipSign = -1 if phantom.photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if phantom.photometric == "MONOCHROME2" else "INVERSE"
    # VOI LUT (C.11.2).
    ds.WindowCenter = f"{phantom.window_center:.1f}"
    ds.WindowWidth = f"{phantom.window_width:.1f}"
    ds.WindowCenterWidthExplanation = "CHEST"
    # DX Detector (C.8.11.4).
    ds.DetectorType = "SCINTILLATOR"
    spacing = f"{phantom.pixel_spacing_mm:.6g}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    # Acquisition Context (C.7.6.14).
    ds.AcquisitionContextSequence = []
    ds.PixelData = np.ascontiguousarray(phantom.pixels, dtype="<u2").tobytes()

    if omit_type2:
        for keyword in TYPE2_OMITTABLE:
            delattr(ds, keyword)
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


#: Findings of a labelled set, cycled over the phantom index: half without a finding, 30 % with
#: each (a third of those with the other finding too), as the demo model was trained and evaluated.
LABELLED_CYCLE: tuple[str | None, ...] = (None, "nodule", None, "pneumothorax", None, "nodule+pneumothorax",
                                          "nodule", None, "pneumothorax", None)


def write_labelled_set(folder: str | Path, count: int, size: int = 1024, seed: int = 0) -> Path:
    """``count`` phantoms as DICOM files in ``folder`` and ``folder``/labels.csv naming each by
    ``path`` with its ``nodule`` and ``pneumothorax`` labels (1/0), the form ``appliance evaluate``
    and ``appliance quantize`` read.  Phantom ``i`` has seed ``seed + i``; one in seven is stored
    MONOCHROME1 (seven is prime to the finding cycle's ten, so every finding gets its share).
    Returns the labels file."""
    import csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        phantom = make_phantom(seed + i, size=size, finding=LABELLED_CYCLE[i % len(LABELLED_CYCLE)],
                               monochrome1=i % 7 == 3)
        name = f"phantom-{i:05d}.dcm"
        write_dicom(phantom, folder / name)
        rows.append([name, *(int(label) for label in phantom.labels)])
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "nodule", "pneumothorax"])
        writer.writerows(rows)
    return labels


# ----------------------------------------------------------------------------------------------
# Command line

def _finding_for(kind: str, index: int) -> str | None:
    if kind == "mixed":
        return (None, None, "nodule", "pneumothorax")[index % 4]
    return None if kind == "none" else kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.phantoms",
        description="Write synthetic chest radiograph phantoms as DX For Presentation DICOM files.")
    parser.add_argument("--out", required=True, type=Path, help="folder to write into (created)")
    parser.add_argument("--count", type=int, default=1, help="how many phantoms (default 1)")
    parser.add_argument("--finding", default="mixed",
                        choices=["nodule", "pneumothorax", "nodule+pneumothorax", "none", "mixed"],
                        help="finding to draw; 'mixed' cycles none, none, nodule, pneumothorax (default)")
    parser.add_argument("--size", type=int, default=1024, help="rows and columns (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom; the rest follow (default 0)")
    parser.add_argument("--monochrome1", action="store_true", help="store inverted values as MONOCHROME1")
    parser.add_argument("--omit-type2", action="store_true",
                        help="leave out Type 2 attributes (birth date, sex, study date/time, ...) as some scanners do")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        seed = args.seed + i
        finding = _finding_for(args.finding, i)
        phantom = make_phantom(seed, args.size, finding, monochrome1=args.monochrome1)
        name = f"phantom_{seed:06d}_{(finding or 'none').replace('+', '_')}.dcm"
        write_dicom(phantom, args.out / name, omit_type2=args.omit_type2)
        print(f"[{i + 1}/{args.count}] {args.out / name} ({finding or 'no finding'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
