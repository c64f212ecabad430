"""What one phantom case will be, drawn before anything is painted: size, spacing, patient size and
position, contrast phase, noise, orientation on disk, and the mean HU of every tissue.

Two kinds of case (DESIGN.md, "The crop must never lose what matters"):
- `connected`: muscle at 55-62 HU (and at least 50 + 0.4 sigma), so with noise most muscle voxels are
  above 50 HU and the muscle wall, bones and enhanced organs form one body-sized component of
  HU > 50, as in most real CTs;
- `weak`: a thin patient scanned without contrast, with low-density muscle (below 40 HU and at most
  50 - sigma) and a fatty liver (38-46 HU), so voxels above 50 HU in soft tissue are isolated specks;
  the largest component of HU > 50 is then one structure outside the soft tissue: usually the table,
  otherwise the vertebral column (joined by its discs), far smaller than the body, its box holding
  almost none of it, so the crop guard must fall back to the body box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from panseg.phantom.body import TORSO_PROFILE, back_y
from panseg.phantom.shapes import Tissue

ORIENTATIONS = ("LPS", "RAS", "tilted")  # identity; x and y flipped (a RAS-stored file); small rotation
KINDS = ("connected", "weak")
PHASES = ("portal", "arterial", "non_contrast")
SLICE_MM_CHOICES = (1.5, 2.5, 3.0, 4.0, 5.0, 5.0, 5.0)  # whole-body CTs are mostly 5 mm
MAX_SLICES = 170  # keeps a realistic case near 512x512x150 voxels (thin slices cover the trunk only)

# Mean HU ranges per tissue; each case draws one value per range.
COMMON_HU = {
    Tissue.AIR: (-1000, -1000), Tissue.OUTSIDE_FOV: (-3000, -3000), Tissue.TABLE_SHELL: (250, 450),
    Tissue.TABLE_CORE: (-900, -800), Tissue.PAD: (-900, -820), Tissue.FAT: (-115, -90),
    Tissue.VISCERAL_FAT: (-105, -80), Tissue.LUNG: (-870, -820), Tissue.GAS: (-1000, -980),
    Tissue.CORTICAL_BONE: (700, 1000), Tissue.CANCELLOUS_BONE: (330, 450), Tissue.MARROW: (-40, 30),
    Tissue.DISC: (75, 95), Tissue.CSF: (5, 15), Tissue.FLAT_BONE: (450, 700), Tissue.BOWEL: (20, 45),
    Tissue.BLADDER: (5, 15), Tissue.CYST: (0, 12), Tissue.GALLBLADDER: (5, 20), Tissue.ESOPHAGUS: (35, 48),
    Tissue.STOMACH: (25, 40), Tissue.DUODENUM: (30, 45), Tissue.LESION_CORE: (10, 25),
}
PHASE_HU = {
    "portal": {Tissue.LIVER: (95, 115), Tissue.SPLEEN: (105, 125), Tissue.KIDNEY_CORTEX: (160, 190),
               Tissue.KIDNEY_MEDULLA: (130, 160), Tissue.PANCREAS: (85, 105), Tissue.ADRENAL: (45, 60),
               Tissue.ARTERY: (150, 190), Tissue.VEIN: (115, 135), Tissue.HEART: (140, 170)},
    "arterial": {Tissue.LIVER: (65, 80), Tissue.SPLEEN: (100, 130), Tissue.KIDNEY_CORTEX: (180, 220),
                 Tissue.KIDNEY_MEDULLA: (80, 100), Tissue.PANCREAS: (100, 120), Tissue.ADRENAL: (50, 70),
                 Tissue.ARTERY: (230, 300), Tissue.VEIN: (60, 90), Tissue.HEART: (200, 260)},
    "non_contrast": {Tissue.LIVER: (55, 62), Tissue.SPLEEN: (44, 50), Tissue.KIDNEY_CORTEX: (30, 38),
                     Tissue.KIDNEY_MEDULLA: (28, 34), Tissue.PANCREAS: (38, 45), Tissue.ADRENAL: (28, 36),
                     Tissue.ARTERY: (38, 45), Tissue.VEIN: (38, 44), Tissue.HEART: (38, 45)},
}


@dataclass(frozen=True)
class CasePlan:
    """Everything drawn for a case before painting (canonical frame: z feet->head, y front->back, x right->left).

    Attributes:
        shape_zyx, spacing_zyx_mm: the voxel grid.
        scale: patient size relative to the adult anatomy tables (small mode: ~0.5-0.7).
        z0_mm: body Z (mm above mid-thigh) of slice 0.
        centre_yx_vox: row and column of the body's centre line.
        fat_mm, muscle_mm: subcutaneous fat and muscle wall thickness.
        table_gap_mm: air or mattress between body and table; with_pad: a mattress fills it.
        kind, phase, orientation: see module docstring and ORIENTATIONS.
        noise_sigma_hu: standard deviation of the white noise.
        hu: mean HU per tissue code.
        origin_xyz_mm, direction_xyz: the geometry written to disk (for the oriented array).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    scale: float
    z0_mm: float
    centre_yx_vox: tuple[float, float]
    fat_mm: float
    muscle_mm: float
    table_gap_mm: float
    with_pad: bool
    kind: str
    phase: str
    orientation: str
    noise_sigma_hu: float
    hu: dict
    origin_xyz_mm: tuple[float, float, float]
    direction_xyz: tuple[float, ...]


def plan_case(rng: np.random.Generator, small: bool, weak: bool, orientation: str) -> CasePlan:
    """Draw a case's plan. `weak` selects the weak-component kind; `orientation` one of ORIENTATIONS."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, but it is {orientation!r}")
    n_xy = int(rng.integers(96, 129)) if small else int(rng.choice([512, 512, 512, 512, 512, 480, 448]))
    spacing_xy = _binary_round(rng.uniform(2.5, 3.5) if small else rng.uniform(0.68, 0.98), 128)
    fat_adult = rng.uniform(4, 12) if weak else rng.uniform(8, 25 if small else 35)
    fov = n_xy * spacing_xy
    widest = float(TORSO_PROFILE[:, 1].max()) + 1.3 * fat_adult  # shoulders, with the thickest fat
    scale_fit = (fov / 1.08 - 30.0) / (2.0 * widest)  # body, plus an off-centre shift, inside the FOV circle
    scale = float(min(scale_fit, 1.0 if small else rng.uniform(0.88, 1.1)))
    fat_mm = fat_adult * scale
    muscle_mm = max(rng.uniform(12, 18) * scale, 3.5 * spacing_xy)  # a wall several voxels thick
    gap_mm = rng.uniform(10, 30) * scale
    spacing_z, n_z, z0 = _plan_z(rng, small, scale)
    centre = _plan_centre(rng, n_xy, spacing_xy, scale, fat_mm, gap_mm)
    phase = "non_contrast" if weak else str(rng.choice(["portal", "portal", "arterial"]))
    sigma = float(rng.uniform(10, 14) if weak else rng.uniform(10, 20))
    shape = (n_z, n_xy, n_xy)
    spacing = (spacing_z, spacing_xy, spacing_xy)
    origin, direction = _plan_geometry(rng, shape, spacing, centre, orientation)
    return CasePlan(shape_zyx=shape, spacing_zyx_mm=spacing, scale=scale, z0_mm=z0, centre_yx_vox=centre,
                    fat_mm=fat_mm, muscle_mm=muscle_mm, table_gap_mm=gap_mm, with_pad=bool(rng.random() < 0.6),
                    kind="weak" if weak else "connected", phase=phase, orientation=orientation,
                    noise_sigma_hu=round(sigma, 2), hu=_plan_hu(rng, phase, weak, sigma),
                    origin_xyz_mm=origin, direction_xyz=direction)


def _binary_round(value: float, steps_per_mm: int) -> float:
    """Round to a multiple of 1/steps_per_mm (a power of two), so the value survives float32 exactly."""
    return round(float(value) * steps_per_mm) / steps_per_mm


def _plan_z(rng: np.random.Generator, small: bool, scale: float) -> tuple[float, int, float]:
    """Slice spacing, slice count and the body Z of slice 0.

    A realistic case covers mid-thigh to neck when its slices are thick enough; thin-slice cases
    (and small mode) cover the trunk around the kidneys, liver and lung bases, as abdominal CTs do.
    """
    body_mm = 730.0 * scale
    if small:
        spacing_z = _binary_round(rng.uniform(4.0, 5.0), 4)
        n_z = int(rng.integers(48, 81))
    else:
        spacing_z = float(rng.choice(SLICE_MM_CHOICES))
        n_z = int(min(MAX_SLICES, np.ceil((body_mm + rng.uniform(0, 40) * scale) / spacing_z)))
    span = n_z * spacing_z
    if span >= body_mm:
        z0 = body_mm - span  # from the neck down, legs continuing below
    else:
        middle = rng.uniform(420, 460) * scale
        z0 = float(np.clip(middle - span / 2.0, -40.0 * scale, body_mm - span))
    return spacing_z, n_z, _binary_round(z0, 16)


def _plan_centre(rng: np.random.Generator, n_xy: int, spacing: float, scale: float, fat_mm: float,
                 gap_mm: float) -> tuple[float, float]:
    """Row and column of the body centre, so that body front to table top sits mid-FOV, a bit off-centre."""
    ay_max = float(TORSO_PROFILE[:, 2].max()) * scale
    front = ay_max + 2.0 * fat_mm
    table_top = float(back_y(ay_max)) + 0.8 * fat_mm + gap_mm + 20.0 * scale
    row = (n_xy - 1) / 2.0 - (table_top - front) / 2.0 / spacing + rng.uniform(-8, 8) / spacing
    column = (n_xy - 1) / 2.0 + rng.uniform(-15, 15) / spacing
    return float(row), float(column)


def _plan_geometry(rng: np.random.Generator, shape, spacing, centre, orientation: str):
    """Origin and direction of the array as written, for an anatomy painted in the canonical frame."""
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = spacing
    origin = np.array([-centre[1] * s_x + rng.uniform(-20, 20), -centre[0] * s_y + rng.uniform(-40, 40),
                       rng.uniform(-1400, -200)])
    origin = np.round(origin * 16) / 16
    direction = np.eye(3)
    if orientation == "RAS":  # the same voxels stored right->left and back->front, as a RAS file reads in ITK
        direction = np.diag([-1.0, -1.0, 1.0])
        origin = origin + np.array([(n_x - 1) * s_x, (n_y - 1) * s_y, 0.0])
    elif orientation == "tilted":  # patient rotated a few degrees in the scanner
        yaw = np.radians(rng.choice([-1, 1]) * rng.uniform(3, 12))
        pitch = np.radians(rng.uniform(-4, 4))
        rot_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        rot_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
        direction = rot_z @ rot_x
    return tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())


def _plan_hu(rng: np.random.Generator, phase: str, weak: bool, sigma: float) -> dict:
    """Mean HU per tissue for this case (int codes -> float)."""
    ranges = dict(COMMON_HU)
    ranges.update(PHASE_HU[phase])
    hu = {int(t): float(rng.uniform(lo, hi)) if hi > lo else float(lo) for t, (lo, hi) in ranges.items()}
    if weak:  # at most 50 - sigma: about one muscle voxel in six above 50 HU, far below percolation
        hu[int(Tissue.MUSCLE)] = min(40.0, 50.0 - sigma) - rng.uniform(0, 3)
        hu[int(Tissue.LIVER)] = rng.uniform(38, 46)  # steatosis: darker than the spleen without contrast
    else:  # at least 50 + 0.4 sigma: two muscle voxels in three above 50 HU, one connected wall
        hu[int(Tissue.MUSCLE)] = max(rng.uniform(55, 62), 50.0 + 0.4 * sigma)
    return {t: round(v, 1) for t, v in hu.items()}
