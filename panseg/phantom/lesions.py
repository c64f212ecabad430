"""Lesions and organ pseudo-labels for the phantom.

Lesions grow in organs (liver, kidneys, pancreas, spleen) and elsewhere (lung nodules, para-aortic
lymph nodes, vertebral metastases): an ellipsoid bent by smooth noise, clipped to the tissue its site
allows, some darker and some brighter than their host. Pseudo-labels imitate an organ model's output:
the true organs with boundaries grown or shrunk by a voxel in patches and, now and then, a small
piece missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from panseg.phantom.body import SPINE_BOTTOM_Z, spine_at
from panseg.phantom.organs import ORGAN_ID, Layout
from panseg.phantom.shapes import (Box, Canvas, Tissue, dilate6, ellipsoid, erode6, grow_box, smooth_noise)

MIN_LESION_VOXELS = 8


@dataclass(frozen=True)
class Site:
    """Where a lesion may grow: the tissues it may occupy, its size range and how often it is hypodense."""

    name: str
    weight: float
    radius_mm: tuple[float, float]
    tissues: tuple[int, ...]
    hypo_probability: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "tissues", tuple(int(t) for t in self.tissues))


SITES = (
    Site("liver", 0.30, (6, 30), (Tissue.LIVER,), 0.75),
    Site("kidney", 0.15, (6, 22), (Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA, Tissue.VISCERAL_FAT), 0.7),
    Site("pancreas", 0.10, (6, 15), (Tissue.PANCREAS, Tissue.VISCERAL_FAT), 0.85),
    Site("spleen", 0.10, (6, 20), (Tissue.SPLEEN,), 0.8),
    Site("lung", 0.15, (4, 15), (Tissue.LUNG,), 0.0),  # a nodule is always brighter than air
    Site("lymph_node", 0.10, (6, 15), (Tissue.VISCERAL_FAT,), 0.0),  # brighter than the fat around it
    Site("bone", 0.10, (6, 15), (Tissue.CANCELLOUS_BONE, Tissue.CORTICAL_BONE), 0.8),  # lytic or sclerotic
)


@dataclass(frozen=True)
class PaintedLesion:
    """A lesion painted on the canvas (canonical frame). `mask` covers `box`; codes say its tissue."""

    index: int
    site: str
    host: str
    contrast: str  # "hypo" or "hyper" relative to the host tissue
    strength: float  # 0..1: how far from the host HU, within the site's range
    centre_body_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    necrotic_core: bool
    box: Box
    mask: np.ndarray

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def place_lesions(canvas: Canvas, layout: Layout, count: int, scale: float,
                  rng: np.random.Generator) -> list[PaintedLesion]:
    """Paint up to `count` non-overlapping lesions at random sites; returns those that fit.

    A lesion keeps to its site's tissues, so a liver lesion never spills into the gallbladder and a
    lymph node never enters a vessel; a try that would leave fewer than MIN_LESION_VOXELS is redrawn.
    """
    lesions: list[PaintedLesion] = []
    weights = np.array([s.weight for s in SITES])
    weights /= weights.sum()
    for _ in range(count * 12):
        if len(lesions) == count:
            break
        site = SITES[int(rng.choice(len(SITES), p=weights))]
        lesion = _try_lesion(canvas, layout, site, len(lesions), scale, rng)
        if lesion is not None:
            lesions.append(lesion)
    return lesions


def _try_lesion(canvas: Canvas, layout: Layout, site: Site, index: int, scale: float,
                rng: np.random.Generator) -> PaintedLesion | None:
    host, centre = _sample_centre(canvas, layout, site.name, scale, rng)
    if centre is None or _tissue_at(canvas, centre) not in site.tissues:
        return None
    spacing = canvas.spacing_zyx_mm
    radius = max(rng.uniform(*site.radius_mm) * scale, 1.6 * max(spacing[1:]), 0.8 * spacing[0])
    semi = radius * rng.uniform(0.75, 1.25, 3)
    shape = ellipsoid(canvas, centre, semi, rng, roughness=float(rng.uniform(0.12, 0.3)))
    if shape is None:
        return None
    box, mask = shape
    mask &= np.isin(canvas.tissue[box], site.tissues)
    if int(mask.sum()) < MIN_LESION_VOXELS:
        return None
    canvas.tissue[box][mask] = Tissue.LESION + index
    core = radius >= 18.0 * scale and rng.random() < 0.5
    if core:  # large tumours often have a necrotic centre
        inner = ellipsoid(canvas, centre, 0.45 * semi)
        if inner is not None:
            local = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner[0], box))
            core_mask = np.zeros_like(mask)
            core_mask[local] = inner[1]
            canvas.tissue[box][core_mask & mask] = Tissue.LESION_CORE
    hypo = rng.random() < site.hypo_probability
    return PaintedLesion(index=index, site=site.name, host=host, contrast="hypo" if hypo else "hyper",
                         strength=float(rng.uniform(0.0, 1.0)), centre_body_mm=tuple(float(c) for c in centre),
                         semi_axes_mm=tuple(float(a) for a in semi), necrotic_core=bool(core), box=box, mask=mask)


def _sample_centre(canvas: Canvas, layout: Layout, site: str, scale: float,
                   rng: np.random.Generator) -> tuple[str, np.ndarray | None]:
    """A candidate centre (body mm) for a lesion at `site`, and the name of its host."""
    if site == "lymph_node":
        a, b = layout.aorta_points[int(rng.integers(len(layout.aorta_points) - 1)) + np.arange(2)]
        side = rng.choice([-1.0, 1.0])
        offset = np.array([side * rng.uniform(20, 35), rng.uniform(-25, 5), 0.0]) * scale
        return "retroperitoneum", a + rng.uniform() * (b - a) + offset
    if site == "bone":
        z_lo = max(SPINE_BOTTOM_Z * scale, canvas.z0_mm)
        z_hi = min(640.0 * scale, canvas.z0_mm + canvas.spacing_zyx_mm[0] * (canvas.shape[0] - 1))
        if z_hi <= z_lo:
            return "spine", None
        z = rng.uniform(z_lo, z_hi)
        y, r = spine_at(np.array([z]), scale)
        return "spine", np.array([rng.uniform(-0.3, 0.3) * r[0], y[0], z])
    host = str(rng.choice(["right_kidney", "left_kidney"])) if site == "kidney" else site
    parts = layout.ellipsoids[host]  # liver lobes, both lungs, spheres along the pancreas
    centre, semi = parts[int(rng.integers(len(parts)))]
    direction = rng.normal(size=3)
    reach = 0.6 * rng.uniform() ** (1.0 / 3.0)  # uniform inside the inner 60% of the organ
    return host, centre + semi * reach * direction / np.linalg.norm(direction)


def _tissue_at(canvas: Canvas, centre_xyz: np.ndarray) -> int:
    index = [int(round(canvas.to_index(axis, centre_xyz[2 - axis]))) for axis in range(3)]
    if not all(0 <= i < n for i, n in zip(index, canvas.shape)):
        return -1
    return int(canvas.tissue[tuple(index)])


def lesion_volumes(shape: tuple[int, int, int], lesions: list[PaintedLesion], primary: int | None,
                   flip_yx: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(all lesions, primary lesion only) as uint8 0/1 volumes.

    With `flip_yx` the volumes are laid out with y and x reversed (a RAS-stored case): the lesions are
    written through reversed views, so only their own voxels are touched.
    """
    every = np.zeros(shape, np.uint8)
    labelled = np.zeros(shape, np.uint8)
    view = (slice(None), slice(None, None, -1), slice(None, None, -1)) if flip_yx else (slice(None),) * 3
    for lesion in lesions:
        every[view][lesion.box][lesion.mask] = 1
        if lesion.index == primary:
            labelled[view][lesion.box][lesion.mask] = 1
    return every, labelled


MISSABLE = tuple(ORGAN_ID[n] for n in ("liver", "spleen", "right_kidney", "left_kidney", "stomach"))
PSEUDO_MIN_DICE = 0.85  # an organ model's output: visibly imperfect, never wrong about the organ
PATCH_MM = 12.0  # size of the boundary patches that grow or shrink together


def pseudo_organs(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Organ labels as an organ model would give them: close to the truth, not equal to it.

    Per organ, smooth random patches of its boundary grow by one voxel into background or shrink by
    one voxel; in about half the large organs a small piece (~8-12 mm) at the edge is missed. Thin
    organs in coarse grids are mostly boundary, so the patches are thinned out until the organ keeps
    a Dice of at least PSEUDO_MIN_DICE. Lesions inside an organ stay that organ, as they would in an
    organ model's output.
    """
    pseudo = canvas.organs.copy()
    spacing = np.asarray(canvas.spacing_zyx_mm)
    for organ_id in sorted(canvas.organ_boxes):
        box = grow_box(canvas.organ_boxes[organ_id], 2, canvas.shape)
        true = canvas.organs[box] == organ_id
        if not true.any():
            continue
        cells = tuple(int(max(2, n * s // PATCH_MM)) for n, s in zip(true.shape, spacing))
        field = smooth_noise(rng, true.shape, cells)
        view = pseudo[box]
        before = view.copy()
        edge = true & ~erode6(true)
        grow = dilate6(true) & ~true & (view == 0)
        missed = organ_id in MISSABLE and rng.random() < 0.5
        piece_seed = int(rng.integers(2**31))
        for threshold in (0.7, 1.1, 1.5, 2.0, np.inf):
            view[...] = before
            view[edge & (field < -threshold)] = 0
            view[grow & (field > threshold)] = organ_id
            if missed and threshold < 1.0:
                _miss_piece(view, edge, organ_id, spacing, np.random.default_rng(piece_seed))
            if _dice(view == organ_id, true) >= PSEUDO_MIN_DICE:
                break
    return pseudo


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def _miss_piece(view: np.ndarray, edge: np.ndarray, organ_id: int, spacing: np.ndarray,
                rng: np.random.Generator) -> None:
    """Remove a small ball of the organ centred on one of its edge voxels (in place)."""
    candidates = np.argwhere(edge)
    centre = candidates[int(rng.integers(len(candidates)))]
    radius_mm = rng.uniform(8.0, 12.0)
    reach = np.ceil(radius_mm / spacing).astype(int)
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, view.shape)
    grids = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    ball = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius_mm ** 2
    local = view[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    local[ball & (local == organ_id)] = 0
