"""The phantom's body wall, scanner table and skeleton, painted on a `Canvas` in tissue codes.

All numbers are adult-sized millimetres in body coordinates (see `shapes`): X to the
patient's left, Y posterior, Z up from mid-thigh; a case multiplies them by its `scale`. The body is
nested ellipses per slice (skin/fat, muscle, cavity), the legs two such ellipses below the crotch.
The table lies posterior of the body (larger Y) behind a gap of air or mattress, so at HU > 50 it is
never connected to the body.
"""

from __future__ import annotations

import numpy as np

from panseg.phantom.shapes import Canvas, Tissue, ellipsoid, ring_band, smooth_noise, tube

CROTCH_Z = 110.0  # below: two legs; above: the torso
PELVIC_FLOOR_Z = 135.0  # between crotch and this, the torso's core is muscle, not fat
NECK_Z = 668.0  # above: the neck, whose core is muscle
BODY_TOP_Z = 730.0
BACK_FLATTENING = 0.92  # the back lies flat on the table: ellipses are cut at this fraction of ay

# Muscle-ellipse semi-axes of the torso (Z, ax, ay): pelvis, waist, chest, shoulders, neck.
TORSO_PROFILE = np.array([
    (110, 150, 100), (150, 152, 100), (200, 148, 98), (260, 138, 95), (330, 128, 95), (420, 130, 100),
    (500, 140, 108), (560, 148, 112), (620, 155, 110), (650, 165, 100), (664, 160, 85), (672, 58, 52),
    (730, 52, 50),
], np.float32)
LEG_X = 82.0  # leg centres at X = +-LEG_X
LEG_PROFILE = np.array([(-100, 58, 60), (0, 62, 64), (110, 72, 74)], np.float32)  # (Z, ax, ay)

# Vertebral column (Z, centre Y, vertebral-body radius): sacrum, lumbar, thoracic, cervical.
SPINE_PROFILE = np.array([
    (150, 38, 24), (260, 37, 21), (420, 42, 20), (500, 49, 17), (600, 52, 16), (640, 48, 15),
    (672, 22, 12), (730, 15, 11),
], np.float32)
SPINE_BOTTOM_Z = 150.0
VERTEBRA_PERIOD_Z = 28.0  # vertebra + disc height
DISC_HEIGHT_Z = 6.0

RIB_PAIRS = 12
RIB_TOP_Z = 648.0  # posterior end of the first rib
RIB_STEP_Z = 19.0
RIB_THETA_START = 0.45  # radians from the posterior midline: ribs stop short of the spine


def interp_profile(profile: np.ndarray, z_adult: np.ndarray) -> list[np.ndarray]:
    """Columns 1.. of a (Z, ...) profile table, linearly interpolated at adult Z."""
    return [np.interp(z_adult, profile[:, 0], profile[:, c]).astype(np.float32) for c in range(1, profile.shape[1])]


def torso_semi_axes(z_mm: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Muscle-ellipse semi-axes (ax, ay) in mm of the torso at body Z (mm, already scaled)."""
    ax, ay = interp_profile(TORSO_PROFILE, np.asarray(z_mm, np.float32) / scale)
    return ax * scale, ay * scale


def spine_at(z_mm: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertebral-body centre Y and radius (mm) at body Z (mm)."""
    y, r = interp_profile(SPINE_PROFILE, np.asarray(z_mm, np.float32) / scale)
    return y * scale, r * scale


def paint_body(canvas: Canvas, scale: float, fat_mm: float, muscle_mm: float, rng: np.random.Generator) -> int:
    """Paint skin fat, muscle wall and cavity fat of torso, neck and legs; returns the lowest body row.

    The fat thickness varies smoothly over the surface and is thicker in front, as in real patients;
    the back is flattened where it lies on the table. The layer counts are built in the tissue array
    itself and mapped to tissue codes in place: a whole-volume temporary costs more than its
    arithmetic here (fresh pages are slow to fault in).
    """
    nz, ny, nx = canvas.shape
    z = canvas.axis_mm(0)
    fat = fat_mm * np.clip(1.0 + 0.3 * smooth_noise(rng, (nz, ny, 1), (4, 3, 0))[..., 0], 0.3, None)  # (nz, ny)
    layers = canvas.tissue  # uint8 counts: 0 outside, 1 fat, 2 muscle, 3 core
    layers[...] = 0
    first_torso = int(np.searchsorted(z, CROTCH_Z * scale))  # z grows with the slice index
    if first_torso < nz:
        _torso_layers(canvas, z[first_torso:], fat[first_torso:], scale, muscle_mm, layers[first_torso:])
    if first_torso > 0:
        _leg_layers(canvas, z[:first_torso], fat[:first_torso], scale, layers[:first_torso])
    rows = np.flatnonzero(layers.any(axis=(0, 2)))
    fat_core = (z >= PELVIC_FLOOR_Z * scale) & (z < NECK_Z * scale)  # abdomen and chest; else a muscle core
    lut = np.array([Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.MUSCLE,
                    Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.VISCERAL_FAT], np.uint8)
    for k in range(nz):
        layers[k] = lut[layers[k] + 4 * int(fat_core[k])]
    return int(rows[-1]) if rows.size else ny - 1


def _torso_layers(canvas: Canvas, z: np.ndarray, fat: np.ndarray, scale: float, muscle_mm: float,
                  out: np.ndarray) -> None:
    """Layer counts of torso slices at body Z `z` into `out` (n, ny, nx): skin/fat, muscle wall, core."""
    y = canvas.axis_mm(1)[None, :]  # (1, ny)
    ax, ay = (v[:, None] for v in torso_semi_axes(z, scale))  # (n, 1)
    back = back_y(ay)
    fat = fat * (1.0 + 0.5 * np.clip(-y / ay, 0.0, 1.0))  # more fat in front than behind
    levels = [(ax + fat, ay + fat, 0.0, back + 0.6 * fat), (ax, ay, 0.0, back),
              (ax - muscle_mm, ay - muscle_mm, 0.0, back - muscle_mm)]
    _nested_ellipses(canvas, 0.0, levels, out)


def _leg_layers(canvas: Canvas, z: np.ndarray, fat: np.ndarray, scale: float, out: np.ndarray) -> None:
    """Layer counts of thigh slices into `out`: two fat-wrapped muscle ellipses, merged where they touch."""
    ax, ay = (v[:, None] * scale for v in interp_profile(LEG_PROFILE, z / scale))
    cy = back_y(TORSO_PROFILE[0, 2] * scale) - back_y(ay)  # thighs rest on the table like the back
    fat = 0.8 * fat
    levels = [(ax + fat, ay + fat, cy, cy + back_y(ay) + 0.6 * fat), (ax, ay, cy, cy + back_y(ay))]
    _nested_ellipses(canvas, -LEG_X * scale, levels, out)  # the patient's right thigh
    left = np.zeros_like(out)
    _nested_ellipses(canvas, LEG_X * scale, levels, left)
    np.maximum(out, left, out=out)


def back_y(ay):
    """Y of the flattened back for an ellipse of posterior semi-axis ay."""
    return BACK_FLATTENING * ay


def _nested_ellipses(canvas: Canvas, cx_mm: float, levels, out: np.ndarray) -> None:
    """Count into `out` (n, ny, nx, zeroed uint8) how many of the nested ellipses `levels` hold each voxel.

    Each level is (ax, ay, cy, back) as arrays broadcastable to (n, ny): an ellipse centred at
    (cx_mm, cy) cut off behind Y = back. Computed per image row as an interval of columns, written as
    +1/-1 steps (255 in uint8: sums wrap back) and summed along x in place: one pass over the voxels.
    """
    n, ny, nx = out.shape
    y = canvas.axis_mm(1)[None, :]
    k, j = np.indices((n, ny))
    for ax, ay, cy, back in levels:
        u = (y - cy) / ay
        half = ax * np.sqrt(np.clip(1.0 - u * u, 0.0, None))
        lo = np.ceil(canvas.to_index(2, cx_mm - half)).astype(np.int64)
        hi = np.floor(canvas.to_index(2, cx_mm + half)).astype(np.int64)
        lo, hi = np.broadcast_arrays(np.clip(lo, 0, nx), np.clip(hi, -1, nx - 1))
        inside = np.broadcast_to((np.abs(u) < 1.0) & (y < back), (n, ny)) & (lo <= hi)
        out[k[inside], j[inside], lo[inside]] += 1
        ends = inside & (hi < nx - 1)
        out[k[ends], j[ends], hi[ends] + 1] -= 1
    np.cumsum(out, axis=2, dtype=out.dtype, out=out)


def paint_table(canvas: Canvas, lowest_body_row: int, scale: float, gap_mm: float, with_pad: bool) -> None:
    """Paint the scanner table behind the body: a curved carbon shell around a foam core.

    Every part of the table, the raised sides of its cradle included, lies at least `gap_mm` (and two
    voxels) posterior of the lowest body row, so air or a mattress of about -850 HU always separates
    it from the body, and no box around the body's rows holds any of it. The mattress fills the gap
    when `with_pad`. The cross-section is the same in every slice: the table is longer than any scan.
    """
    sy = canvas.spacing_zyx_mm[1]
    gap_rows = max(2, int(np.ceil(gap_mm / sy)))
    y = canvas.axis_mm(1)[:, None]
    x = canvas.axis_mm(2)[None, :]
    half_width, height = 240.0 * scale, 45.0 * scale
    rise = x * x / (2.0 * 3000.0 * scale)  # the cradle curves up towards the sides
    lowest_top = canvas.axis_mm(1, lowest_body_row + gap_rows, lowest_body_row + gap_rows + 1)[0]
    top = lowest_top + half_width ** 2 / (2.0 * 3000.0 * scale) - rise  # its edges at lowest_top
    skin = max(4.0 * scale, 1.5 * sy)
    depth = y - top
    within = (np.abs(x) <= half_width) & (depth >= 0) & (depth < height)
    shell = within & ((depth < skin) | (depth >= height - skin) | (np.abs(x) > half_width - skin))
    canvas.tissue[:, within & ~shell] = Tissue.TABLE_CORE
    canvas.tissue[:, shell] = Tissue.TABLE_SHELL
    if with_pad:  # from just behind the body down to the table
        below_body = y > canvas.axis_mm(1, lowest_body_row, lowest_body_row + 1)[0]
        pad = (np.abs(x) <= 0.8 * half_width) & (depth < 0) & below_body
        band = canvas.tissue[:, pad]
        band[band == Tissue.AIR] = Tissue.PAD
        canvas.tissue[:, pad] = band


def paint_outside_fov(canvas: Canvas) -> None:
    """Mark voxels outside the reconstruction circle, which scanners fill with -1024 HU."""
    ny, nx = canvas.shape[1:]
    sy, sx = canvas.spacing_zyx_mm[1:]
    j = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0)[:, None] * sy
    i = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2.0)[None, :] * sx
    radius = min(ny * sy, nx * sx) / 2.0
    canvas.tissue[:, j * j + i * i > radius * radius] = Tissue.OUTSIDE_FOV


OUTSIDE_BODY = (Tissue.AIR, Tissue.OUTSIDE_FOV, Tissue.TABLE_SHELL, Tissue.TABLE_CORE, Tissue.PAD)
BONE_MAY_REPLACE = tuple(int(t) for t in Tissue if t not in OUTSIDE_BODY and t < Tissue.LESION)  # bone wins inside


ORGAN_PARENCHYMA = tuple(int(t) for t in (Tissue.LIVER, Tissue.SPLEEN, Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA,
                                           Tissue.PANCREAS, Tissue.ADRENAL, Tissue.GALLBLADDER, Tissue.STOMACH,
                                           Tissue.DUODENUM, Tissue.HEART))


def paint_spine(canvas: Canvas, scale: float) -> None:
    """Vertebral bodies (cancellous core, cortical rim), discs, spinal canal and posterior arches.

    Discs (~80 HU) join the vertebrae into one column above 50 HU, as in real CT; the arches are
    closed rings around the canal with a spinous process behind.
    """
    z = canvas.axis_mm(0)
    present = np.flatnonzero((z >= SPINE_BOTTOM_Z * scale) & (z <= BODY_TOP_Z * scale))
    if present.size == 0:
        return
    y_c, radius = spine_at(z, scale)
    r_max = float(radius[present].max())
    lo = np.array([-1.0 * r_max, float(y_c[present].min() - r_max), z[present[0]]], np.float32)
    hi = np.array([1.0 * r_max, float(y_c[present].max() + 2.3 * r_max), z[present[-1]]], np.float32)
    box = canvas.box(lo, hi)
    if box is None:
        return
    zz, yy, xx = canvas.grid(box)
    yc, r = y_c[box[0], None, None], radius[box[0], None, None]
    rho = np.sqrt(xx * xx + (yy - yc) ** 2)
    in_z = (zz >= SPINE_BOTTOM_Z * scale) & (zz <= BODY_TOP_Z * scale)
    body = (rho <= r) & in_z
    rim = body & (rho > r - max(2.0 * scale, 0.6 * float(canvas.spacing_zyx_mm[2])))
    disc = ((zz / scale - SPINE_BOTTOM_Z) % VERTEBRA_PERIOD_Z) < DISC_HEIGHT_Z
    canal_y = yc + 1.4 * r
    canal_rho = np.sqrt(xx * xx + (yy - canal_y) ** 2)
    canal = (canal_rho <= 0.45 * r) & in_z
    arch = (canal_rho <= 0.8 * r) & ~canal & ~body & in_z
    spinous = (np.abs(xx) <= 0.22 * r) & (yy > canal_y) & (yy <= canal_y + 0.9 * r) & in_z
    # Crura and prevertebral fat keep organs off the vertebrae (the liver would otherwise wrap one).
    sleeve = (rho > r) & (rho <= r + max(3.0 * scale, float(canvas.spacing_zyx_mm[2]))) & in_z
    canvas.paint((box, sleeve), Tissue.VISCERAL_FAT, only=ORGAN_PARENCHYMA)
    only = BONE_MAY_REPLACE
    canvas.paint((box, arch | spinous), Tissue.CORTICAL_BONE, only=only)
    canvas.paint((box, body & ~disc), Tissue.CANCELLOUS_BONE, only=only)
    canvas.paint((box, rim & ~disc), Tissue.CORTICAL_BONE, only=only)
    canvas.paint((box, body & disc), Tissue.DISC, only=only)
    canvas.paint((box, canal), Tissue.CSF, only=only)


def paint_ribs(canvas: Canvas, scale: float) -> None:
    """Twelve rib pairs in the chest wall, sloping down towards the front, not touching the spine.

    Real ribs meet the vertebrae at joints; here a gap keeps them apart so that, when the muscle
    around them is below 50 HU, the spine and each rib are separate components.
    """
    sz, sx = canvas.spacing_zyx_mm[0], canvas.spacing_zyx_mm[2]
    half_width = max(4.0 * scale, 0.6 * sx)
    half_height = max(5.0 * scale, 0.55 * sz)
    for index in range(RIB_PAIRS):
        z_post = (RIB_TOP_Z - RIB_STEP_Z * index) * scale
        ax, ay = (float(v[0]) for v in torso_semi_axes(np.array([z_post]), scale))
        wall = 7.0 * scale  # middle of the muscle wall
        theta_end = 2.55 if index < 7 else (2.1 if index < 10 else 1.5)  # lower ribs are shorter
        drop = (45.0 + 2.0 * index) * scale

        def z_centre(theta, z_post=z_post, theta_end=theta_end, drop=drop):
            return z_post - drop * (theta - RIB_THETA_START) / (theta_end - RIB_THETA_START)

        voxels = ring_band(canvas, (ax - wall, ay - wall), 0.0, (RIB_THETA_START, theta_end), half_width,
                           z_centre, half_height)
        canvas.paint_voxels(voxels, Tissue.FLAT_BONE, only=(Tissue.MUSCLE, Tissue.FAT, Tissue.VISCERAL_FAT))


def paint_pelvis_and_femurs(canvas: Canvas, scale: float) -> None:
    """Iliac wings (curved plates), femoral heads and femoral shafts with fatty marrow."""
    sx = canvas.spacing_zyx_mm[2]
    z_mid = 235.0 * scale
    ax, ay = (float(v[0]) for v in torso_semi_axes(np.array([z_mid]), scale))
    wings = ring_band(canvas, (0.8 * ax, 0.72 * ay), 5.0 * scale, (0.55, 1.75), max(5.0 * scale, 0.6 * sx),
                      lambda theta: np.full_like(theta, z_mid), 38.0 * scale)
    canvas.paint_voxels(wings, Tissue.FLAT_BONE, only=(Tissue.MUSCLE, Tissue.VISCERAL_FAT, Tissue.FAT))
    only = BONE_MAY_REPLACE
    for side in (-1.0, 1.0):
        head = np.array([side * LEG_X, 22.0, 150.0]) * scale
        shaft = np.array([[side * LEG_X, 22, 150], [side * (LEG_X + 2), 24, 105], [side * (LEG_X - 2), 26, -120]],
                         np.float32) * scale
        canvas.paint(ellipsoid(canvas, head, (24.0 * scale,) * 3), Tissue.CORTICAL_BONE, only=only)
        canvas.paint(ellipsoid(canvas, head, (20.0 * scale,) * 3), Tissue.CANCELLOUS_BONE, only=only)
        canvas.paint(tube(canvas, shaft, 14.0 * scale), Tissue.CORTICAL_BONE, only=only)
        canvas.paint(tube(canvas, shaft[1:], max(8.0 * scale, 0.6 * sx)), Tissue.MARROW, only=(Tissue.CORTICAL_BONE,))
