"""Geometry for the synthetic CT phantom: a canvas addressed in body millimetres, and the shapes painted on it.

The phantom is painted in a *canonical frame*: array axes (z, y, x) with z from feet to head, y from
anterior to posterior and x from the patient's right to left (so identity direction means ITK's LPS).
Body millimetres (X, Y, Z) are measured from the body's centre line (X, Y) and from the mid-thigh
level (Z). Every shape is computed only inside its own bounding box, so painting a 3 mm lesion into a
512x512x200 volume costs what the lesion costs. Pure numpy: no scipy at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

Box = tuple[slice, slice, slice]
Shape = tuple[Box, np.ndarray]  # a bounding box and a boolean mask of the box's shape


class Tissue(IntEnum):
    """Tissue codes of the phantom's `tissue` map; each case gives every code a mean HU."""

    AIR = 0
    OUTSIDE_FOV = 1  # outside the reconstruction circle: exactly -1024, as scanners write it
    TABLE_SHELL = 2  # carbon-fibre skin of the scanner table, well above 50 HU
    TABLE_CORE = 3  # foam core of the table
    PAD = 4  # mattress between table and patient, far below -500 HU
    FAT = 5  # subcutaneous fat
    VISCERAL_FAT = 6  # fat filling the abdominal and mediastinal cavities
    MUSCLE = 7
    LUNG = 8
    GAS = 9  # air inside the body: trachea, stomach, bowel
    CORTICAL_BONE = 10
    CANCELLOUS_BONE = 11
    MARROW = 12  # fatty marrow of the femoral shafts
    DISC = 13  # intervertebral discs
    CSF = 14  # spinal canal
    FLAT_BONE = 15  # ribs and iliac wings
    HEART = 16
    ARTERY = 17  # aorta, iliac, mesenteric and pulmonary arteries
    VEIN = 18  # inferior vena cava
    BOWEL = 19  # bowel loops: lesion-like soft tissue that is not a lesion
    BLADDER = 20
    CYST = 21  # simple cysts in liver or kidney: hypodense, not lesions
    LIVER = 22
    KIDNEY_CORTEX = 23
    KIDNEY_MEDULLA = 24
    SPLEEN = 25
    PANCREAS = 26
    ADRENAL = 27
    GALLBLADDER = 28
    ESOPHAGUS = 29
    STOMACH = 30
    DUODENUM = 31
    LESION = 100  # lesion k (0-based) is painted with code LESION + k
    LESION_CORE = 120  # necrotic core of a large lesion


MAX_LESIONS = 8  # lesion codes LESION .. LESION + 7


@dataclass
class Canvas:
    """Volumes being painted, and the mapping between voxels and body millimetres.

    Attributes:
        tissue: uint8 (z, y, x) tissue codes (`phantom_anatomy.Tissue`).
        organs: uint8 (z, y, x) FLARE22 organ ids 0-13, painted together with tissue.
        spacing_zyx_mm: voxel size.
        centre_yx_vox: the (row, column) position, fractional, of the body's centre line X = Y = 0.
        z0_mm: body Z of slice 0.
        organ_boxes: organ id -> a box holding every voxel ever painted with that id (a superset
            of the organ, so later steps need not scan the whole volume to find it).
    """

    tissue: np.ndarray
    organs: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    centre_yx_vox: tuple[float, float]
    z0_mm: float
    organ_boxes: dict[int, Box] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.tissue.shape

    def axis_mm(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Body millimetres of voxel indices start..stop-1 along array axis 0 (Z), 1 (Y) or 2 (X)."""
        stop = self.shape[axis] if stop is None else stop
        index = np.arange(start, stop, dtype=np.float32)
        if axis == 0:
            return np.float32(self.z0_mm) + index * np.float32(self.spacing_zyx_mm[0])
        return (index - np.float32(self.centre_yx_vox[axis - 1])) * np.float32(self.spacing_zyx_mm[axis])

    def to_index(self, axis: int, mm: float) -> float:
        """Fractional voxel index of body millimetres `mm` along array axis `axis`."""
        if axis == 0:
            return (mm - self.z0_mm) / self.spacing_zyx_mm[0]
        return mm / self.spacing_zyx_mm[axis] + self.centre_yx_vox[axis - 1]

    def box(self, lo_xyz: np.ndarray, hi_xyz: np.ndarray) -> Box | None:
        """Voxel box covering body millimetres lo..hi (X, Y, Z order), clipped; None when empty."""
        slices = []
        for axis in range(3):
            lo, hi = lo_xyz[2 - axis], hi_xyz[2 - axis]  # array axis 0 is Z, the third of (X, Y, Z)
            start = max(0, int(np.floor(self.to_index(axis, lo))))
            stop = min(self.shape[axis], int(np.ceil(self.to_index(axis, hi))) + 1)
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def grid(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable body-mm coordinates (Z (n,1,1), Y (1,n,1), X (1,1,n)) of a box."""
        z = self.axis_mm(0, box[0].start, box[0].stop)[:, None, None]
        y = self.axis_mm(1, box[1].start, box[1].stop)[None, :, None]
        x = self.axis_mm(2, box[2].start, box[2].stop)[None, None, :]
        return z, y, x

    def paint(self, shape: Shape | None, tissue: int, organ: int | None = 0,
              only: tuple[int, ...] | None = None) -> np.ndarray | None:
        """Set tissue (and organ id, unless `organ` is None) inside a shape; returns the painted mask.

        `only` restricts painting to voxels whose tissue is one of those codes, so a structure can be
        clipped to the space it lives in (an organ to the body's cavity, a rib to the chest wall).
        """
        if shape is None:
            return None
        box, mask = shape
        tissue_view = self.tissue[box]
        if only is not None:
            mask = mask & np.isin(tissue_view, _codes(only))
        tissue_view[mask] = tissue
        if organ is not None:
            self.organs[box][mask] = organ
            if organ > 0:
                self.organ_boxes[organ] = union_box(self.organ_boxes.get(organ), box)
        return mask

    def paint_voxels(self, index_zyx: tuple[np.ndarray, np.ndarray, np.ndarray], tissue: int,
                     only: tuple[int, ...] | None = None) -> None:
        """Set tissue (and clear the organ id) at scattered voxels, e.g. those of a ring band."""
        if only is not None:
            keep = np.isin(self.tissue[index_zyx], _codes(only))
            index_zyx = tuple(i[keep] for i in index_zyx)
        self.tissue[index_zyx] = tissue
        self.organs[index_zyx] = 0


def _codes(values) -> np.ndarray:
    return np.fromiter((int(v) for v in values), np.int64)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """A smooth random field of unit variance: a coarse Gaussian grid, linearly interpolated.

    `cells` is the number of coarse cells along each of the three axes (0 makes the field constant
    along that axis). Interpolation is separable (three small matrix products); each row of weights
    is divided by its norm so the variance is 1 everywhere, not only on the coarse grid nodes.
    """
    weights = [_interpolation_weights(n, c) for n, c in zip(shape, cells)]
    weights = [w / np.sqrt((w * w).sum(axis=1, keepdims=True)) for w in weights]
    coarse = rng.standard_normal(tuple(w.shape[1] for w in weights)).astype(np.float32)
    field = np.tensordot(weights[0], coarse, axes=(1, 0))  # (nz, cy, cx)
    field = np.tensordot(field, weights[1], axes=(1, 1))  # (nz, cx, ny)
    return np.tensordot(field, weights[2], axes=(1, 1))  # (nz, ny, nx)


def _interpolation_weights(n: int, cells: int) -> np.ndarray:
    """(n, cells+1) weights placing n samples evenly over `cells` coarse intervals, linear in between."""
    if cells <= 0 or n <= 1:
        return np.ones((n, 1), np.float32)
    position = np.linspace(0.0, cells, n, dtype=np.float32)
    left = np.minimum(position.astype(np.int64), cells - 1)
    frac = position - left
    weights = np.zeros((n, cells + 1), np.float32)
    weights[np.arange(n), left] = 1.0 - frac
    weights[np.arange(n), left + 1] = frac
    return weights


def ellipsoid(canvas: Canvas, centre_xyz, semi_xyz, rng: np.random.Generator | None = None,
              roughness: float = 0.0, cells: int = 3) -> Shape | None:
    """An axis-aligned ellipsoid in body mm, its surface optionally bent by smooth noise.

    `roughness` is the relative radial amplitude of the bending (0.2: the radius varies by about 20%),
    which turns a too-perfect ellipsoid into something organ- or tumor-like.
    """
    centre = np.asarray(centre_xyz, np.float32)
    semi = np.maximum(np.asarray(semi_xyz, np.float32), 1e-3)
    reach = semi * (1.0 + 2.0 * roughness)
    box = canvas.box(centre - reach, centre + reach)
    if box is None:
        return None
    z, y, x = canvas.grid(box)
    q = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    if roughness > 0.0 and rng is not None:
        shape = q.shape
        bend = 1.0 + roughness * np.clip(smooth_noise(rng, shape, (cells, cells, cells)), -2.0, 2.0)
        q /= bend * bend
    return box, q <= 1.0


def tube(canvas: Canvas, points_xyz, radii_mm) -> Shape | None:
    """A chain of cone-capped segments through `points_xyz` (n, 3) with radii `radii_mm` (n,)."""
    points = np.asarray(points_xyz, np.float32)
    radii = np.broadcast_to(np.asarray(radii_mm, np.float32), (len(points),))
    reach = float(radii.max())
    box = canvas.box(points.min(axis=0) - reach, points.max(axis=0) + reach)
    if box is None:
        return None
    mask = np.zeros(tuple(s.stop - s.start for s in box), bool)
    for p0, p1, r0, r1 in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        seg_reach = float(max(r0, r1))
        seg_box = canvas.box(np.minimum(p0, p1) - seg_reach, np.maximum(p0, p1) + seg_reach)
        if seg_box is None:
            continue
        z, y, x = canvas.grid(seg_box)
        d = p1 - p0
        length2 = max(float(d @ d), 1e-6)
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2, 0.0, 1.0)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        inside = dist2 <= (r0 + t * (r1 - r0)) ** 2
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(seg_box, box))
        mask[local] |= inside
    return box, mask


def ring_band(canvas: Canvas, semi_xy: tuple[float, float], centre_y_mm: float, theta_range: tuple[float, float],
              half_width_mm: float, z_centre_mm, half_height_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels of a band that follows an ellipse around the body axis, on both sides (ribs, iliac wings).

    In-plane, the band is the set of points within `half_width_mm` of the ellipse (semi-axes
    `semi_xy`, centred at X = 0, Y = `centre_y_mm`) whose angle from the posterior midline lies in
    `theta_range` (0 = posterior, pi = anterior, the same on the left and right). Along Z it covers
    `half_height_mm` either side of `z_centre_mm(theta)`, so a rib can run downwards as it goes
    forward. Computed on the in-plane box of the ellipse only, then extruded to the slices it needs.

    Returns:
        (k, j, i) index arrays of the band's voxels.
    """
    a, b = semi_xy
    reach = np.array([a + half_width_mm, centre_y_mm + b + half_width_mm, 1e9], np.float32)
    box = canvas.box(np.array([-reach[0], centre_y_mm - b - half_width_mm, -1e9], np.float32), reach)
    if box is None:
        return tuple(np.zeros(0, np.int64) for _ in range(3))
    y = canvas.axis_mm(1, box[1].start, box[1].stop)[:, None] - np.float32(centre_y_mm)
    x = canvas.axis_mm(2, box[2].start, box[2].stop)[None, :]
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)  # 1 on the ellipse
    radius = np.sqrt(x * x + y * y)
    distance = np.abs(radius - radius / np.maximum(rho, 1e-6))  # radial distance to the ellipse
    theta = np.arctan2(np.abs(x) / a, y / b)
    band = (distance <= half_width_mm) & (theta >= theta_range[0]) & (theta <= theta_range[1])
    rows, cols = np.nonzero(band)
    z_mid = np.asarray(z_centre_mm(theta[rows, cols]), np.float32)
    k_lo = np.ceil(canvas.to_index(0, z_mid - half_height_mm)).astype(np.int64)
    k_hi = np.floor(canvas.to_index(0, z_mid + half_height_mm)).astype(np.int64)
    parts = []
    for step in range(int((k_hi - k_lo).max(initial=-1)) + 1):
        k = k_lo + step
        ok = (k <= k_hi) & (k >= 0) & (k < canvas.shape[0])
        parts.append((k[ok], rows[ok] + box[1].start, cols[ok] + box[2].start))
    if not parts:
        return tuple(np.zeros(0, np.int64) for _ in range(3))
    return tuple(np.concatenate([p[axis] for p in parts]) for axis in range(3))


def dilate6(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 6-neighbourhood (one voxel across faces); voxels past the edge are off."""
    out = mask.copy()
    for axis in range(3):
        lead = [slice(None)] * 3
        trail = [slice(None)] * 3
        lead[axis], trail[axis] = slice(1, None), slice(None, -1)
        out[tuple(lead)] |= mask[tuple(trail)]
        out[tuple(trail)] |= mask[tuple(lead)]
    return out


def erode6(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 6-neighbourhood; voxels past the edge count as off."""
    return ~dilate6(~mask) & _interior(mask.shape)


def _interior(shape: tuple[int, ...]) -> np.ndarray:
    inner = np.zeros(shape, bool)
    inner[tuple(slice(1, -1) for _ in shape)] = True
    return inner


def union_box(a: Box | None, b: Box) -> Box:
    """The smallest box holding boxes a and b."""
    if a is None:
        return b
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def grow_box(box: Box, margin: int, shape: tuple[int, ...]) -> Box:
    """`box` grown by `margin` voxels on every side, clipped to `shape`."""
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, shape))


def bounding_box(mask: np.ndarray, margin: int = 0) -> Box | None:
    """Tightest box around the true voxels of `mask`, grown by `margin` and clipped; None if empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        slices.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + 1 + margin)))
    return tuple(slices)
