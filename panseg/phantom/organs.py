"""The phantom's thoracic and abdominal contents: lungs, heart, the 13 FLARE22 organs, vessels, and
lesion-like distractors (bowel loops, bladder, small vessels, cysts) that are not lesions.

Coordinates are adult body millimetres (see `body`), multiplied by the case's scale. Each
organ is painted only where the cavity's contents are (never into the body wall or bone), in an order
that lets later organs press into earlier ones, as neighbouring organs do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from panseg.config import ORGAN_IDS, ORGAN_NAMES
from panseg.phantom.shapes import Canvas, Tissue, ellipsoid, tube

ORGAN_ID = dict(zip(ORGAN_NAMES, ORGAN_IDS))

# (centre XYZ, semi-axes XYZ) of ellipsoidal organs, adult mm.
LIVER = (((-70, -5, 460), (80, 85, 85)), ((15, -45, 480), (60, 35, 40)))  # right lobe, left lobe
GALLBLADDER = ((-45, -58, 400), (17, 15, 32))
SPLEEN = ((108, 40, 455), (28, 45, 55))
STOMACH = ((55, -35, 470), (45, 40, 60))
KIDNEYS = {"right_kidney": ((-70, 35, 340), (30, 25, 55)), "left_kidney": ((70, 35, 360), (30, 25, 55))}
ADRENALS = {"right_adrenal_gland": ((-45, 20, 418), (6, 14, 18)), "left_adrenal_gland": ((45, 20, 428), (6, 14, 18))}
HEART = ((18, -32, 585), (62, 50, 55))
LUNGS = (((-72, 8, 605), (62, 92, 125)), ((72, 8, 605), (58, 92, 120)))
BLADDER = ((0, -38, 175), (42, 32, 38))
# Tubes: (points XYZ, radii), adult mm.
PANCREAS = (((-20, -15, 395), (5, -22, 405), (40, -20, 415), (85, 5, 430)), (16, 12, 12, 10))
DUODENUM = (((10, -45, 445), (-35, -40, 425), (-45, -20, 395), (-42, -10, 365), (-10, -10, 355), (10, -25, 365)), (11,))
ESOPHAGUS = (((0, -12, 735), (-6, 6, 640), (-8, 10, 560), (-3, 0, 510), (30, -12, 480), (45, -25, 470)), (8,))
AORTA = (((15, 5, 270), (16, 8, 420), (18, 14, 520), (16, 20, 600), (22, 0, 645), (25, -25, 650), (15, -38, 640),
          (-5, -45, 590)), (11, 11, 12, 13, 13, 14, 14, 14))
IVC = (((-25, 12, 270), (-25, 10, 400), (-28, 0, 470), (-20, -15, 530)), (11,))
TRACHEA = (((0, -30, 740), (0, -8, 600)), (9,))
PSOAS_POINTS = ((40, 30, 420), (50, 32, 300), (65, 25, 200))
PSOAS_RADII = (8, 18, 22)
HILUM = (35.0, 5.0, 575.0)  # pulmonary vessels start here (X mirrored for the right lung)
MESENTERY_ROOT = (15.0, -8.0, 385.0)

INTERIOR = tuple(int(t) for t in (Tissue.VISCERAL_FAT, Tissue.BOWEL, Tissue.BLADDER, Tissue.LUNG, Tissue.HEART,
                                  Tissue.GAS, Tissue.ARTERY, Tissue.VEIN))
ORGAN_TISSUES = tuple(int(t) for t in (Tissue.LIVER, Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA, Tissue.SPLEEN,
                                       Tissue.PANCREAS, Tissue.ADRENAL, Tissue.GALLBLADDER, Tissue.ESOPHAGUS,
                                       Tissue.STOMACH, Tissue.DUODENUM))
INSIDE = INTERIOR + ORGAN_TISSUES  # what an organ may be painted over


@dataclass(frozen=True)
class Layout:
    """Where this case's organs ended up (body mm, scaled and jittered), for placing lesions and cysts.

    Attributes:
        ellipsoids: organ or structure name -> ((centre XYZ, semi-axes XYZ), ...) of its parts;
            also 'lung' (both lungs) and 'pancreas' (spheres along the gland).
        aorta_points: centre line of the abdominal aorta, for para-aortic lymph nodes.
    """

    ellipsoids: dict
    aorta_points: np.ndarray


class _Placer:
    """Scales adult coordinates and moves each organ a little, so no two cases look alike."""

    def __init__(self, scale: float, rng: np.random.Generator, min_radius_mm: float):
        self.scale, self.rng, self.min_radius_mm = scale, rng, min_radius_mm

    def jitter(self, spread_mm: float = 4.0) -> tuple[np.ndarray, float]:
        return self.rng.normal(0.0, spread_mm * self.scale, 3).astype(np.float32), float(self.rng.uniform(0.9, 1.1))

    def ellipsoid(self, spec, shift=(0.0, 0.0, 0.0), size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        centre = np.asarray(spec[0], np.float32) * self.scale + np.asarray(shift, np.float32)
        semi = np.maximum(np.asarray(spec[1], np.float32) * self.scale * size, self.min_radius_mm)
        return centre, semi

    def tube(self, spec, shift=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(spec[0], np.float32) * self.scale + np.asarray(shift, np.float32)
        radii = np.broadcast_to(np.asarray(spec[1], np.float32), (len(points),)) * self.scale
        return points, np.maximum(radii, 0.8 * self.min_radius_mm)


def paint_organs(canvas: Canvas, scale: float, rng: np.random.Generator) -> Layout:
    """Paint chest contents, distractors, the 13 organs and the great vessels; returns their layout."""
    min_radius = 1.5 * max(canvas.spacing_zyx_mm[1:])  # thin organs stay a few voxels thick in coarse mode
    place = _Placer(scale, rng, min_radius)
    parts = {"lung": tuple(place.ellipsoid(spec) for spec in LUNGS)}
    _paint_chest(canvas, place, parts["lung"])
    _paint_distractors(canvas, place)
    parts.update(_paint_solid_organs(canvas, place))
    parts["pancreas"] = _paint_hollow_organs(canvas, place)
    aorta = place.tube(AORTA)
    canvas.paint(tube(canvas, *aorta), Tissue.ARTERY, ORGAN_ID["aorta"], only=INSIDE)
    canvas.paint(tube(canvas, *place.tube(IVC)), Tissue.VEIN, ORGAN_ID["inferior_vena_cava"], only=INSIDE)
    for side in (-1.0, 1.0):
        iliac = ((15, 5, 270), (side * 60, 12, 215), (side * 78, 18, 160), (side * 82, 22, 60)), (7,)
        canvas.paint(tube(canvas, *place.tube(iliac)), Tissue.ARTERY, 0, only=INSIDE + (Tissue.MUSCLE,))
        psoas = tuple((side * x, y, z) for x, y, z in PSOAS_POINTS), PSOAS_RADII
        canvas.paint(tube(canvas, *place.tube(psoas)), Tissue.MUSCLE, 0, only=(Tissue.VISCERAL_FAT,))
    return Layout(ellipsoids=parts, aorta_points=aorta[0][:3])


def _paint_chest(canvas: Canvas, place: _Placer, lungs) -> None:
    """Lungs (only in the torso's cavity), heart, trachea and main bronchi, pulmonary vessels."""
    for centre, semi in lungs:
        canvas.paint(ellipsoid(canvas, centre, semi, place.rng, 0.05), Tissue.LUNG, 0, only=(Tissue.VISCERAL_FAT,))
    canvas.paint(ellipsoid(canvas, *place.ellipsoid(HEART), place.rng, 0.04), Tissue.HEART, 0, only=INTERIOR)
    carina = np.array(TRACHEA[0][1], np.float32)
    canvas.paint(tube(canvas, *place.tube(TRACHEA)), Tissue.GAS, 0)
    for side in (-1.0, 1.0):
        bronchus = (tuple(carina), (side * 40.0, 5.0, 570.0)), (6,)
        canvas.paint(tube(canvas, *place.tube(bronchus)), Tissue.GAS, 0, only=INTERIOR)
    # Pulmonary vessels: bright round cross-sections in the lung, as a nodule would look.
    for (centre, semi), side in zip(lungs, (-1.0, 1.0)):
        hilum = np.array([side * HILUM[0], HILUM[1], HILUM[2]], np.float32) * place.scale
        for _ in range(int(place.rng.integers(6, 11))):
            direction = place.rng.normal(size=3)
            tip = centre + semi * place.rng.uniform(0.5, 0.85) * direction / np.linalg.norm(direction)
            radius = np.array([4.0, 1.5], np.float32) * place.scale
            if radius[0] >= 0.5 * place.min_radius_mm:
                canvas.paint(tube(canvas, np.stack([hilum, tip]), radius), Tissue.ARTERY, 0, only=(Tissue.LUNG,))


def _paint_distractors(canvas: Canvas, place: _Placer) -> None:
    """Bladder, bowel loops with gas and mesenteric vessels: lesion-like, unlabelled, not lesions."""
    rng, s = place.rng, place.scale
    canvas.paint(ellipsoid(canvas, *place.ellipsoid(BLADDER, *place.jitter()), rng, 0.05), Tissue.BLADDER, 0,
                 only=(Tissue.VISCERAL_FAT,))
    for _ in range(int(rng.integers(5, 10))):
        start = np.array([rng.uniform(-90, 90), rng.uniform(-75, -5), rng.uniform(200, 380)])
        steps = rng.normal(0.0, 22.0, (int(rng.integers(2, 5)), 3))
        points = (start + np.vstack([np.zeros(3), np.cumsum(steps, axis=0)])) * s
        radius = max(rng.uniform(9, 15) * s, place.min_radius_mm)
        canvas.paint(tube(canvas, points, radius), Tissue.BOWEL, 0, only=(Tissue.VISCERAL_FAT,))
        bubble = points[int(rng.integers(len(points)))] + np.array([0.0, -0.4 * radius, 0.0])
        canvas.paint(ellipsoid(canvas, bubble, (0.5 * radius,) * 3), Tissue.GAS, 0, only=(Tissue.BOWEL,))
    root = np.array(MESENTERY_ROOT) * s
    for _ in range(int(rng.integers(3, 7))):
        tip = np.array([rng.uniform(-60, 60), rng.uniform(-70, -30), rng.uniform(260, 360)]) * s
        radius = np.maximum(np.array([3.5, 2.0]) * s, 0.5 * place.min_radius_mm)
        canvas.paint(tube(canvas, np.stack([root, tip]), radius), Tissue.ARTERY, 0, only=(Tissue.VISCERAL_FAT,))


def _paint_solid_organs(canvas: Canvas, place: _Placer) -> dict:
    """Liver, gallbladder, spleen, kidneys (cortex and medulla) and adrenals; returns their ellipsoids."""
    rng, parts = place.rng, {}
    shift, size = place.jitter()
    parts["liver"] = tuple(place.ellipsoid(spec, shift, size) for spec in LIVER)
    for centre, semi in parts["liver"]:
        canvas.paint(ellipsoid(canvas, centre, semi, rng, 0.06), Tissue.LIVER, ORGAN_ID["liver"], only=INSIDE)
    gallbladder = place.ellipsoid(GALLBLADDER, shift + place.jitter(2.0)[0], size)
    canvas.paint(ellipsoid(canvas, *gallbladder, rng, 0.05), Tissue.GALLBLADDER, ORGAN_ID["gallbladder"], only=INSIDE)
    parts["spleen"] = (place.ellipsoid(SPLEEN, *place.jitter()),)
    canvas.paint(ellipsoid(canvas, *parts["spleen"][0], rng, 0.08), Tissue.SPLEEN, ORGAN_ID["spleen"], only=INSIDE)
    stomach = place.ellipsoid(STOMACH, *place.jitter())
    shape = ellipsoid(canvas, *stomach, rng, 0.08)
    canvas.paint(shape, Tissue.STOMACH, ORGAN_ID["stomach"], only=INSIDE)
    if shape is not None:  # gas rises to the front (small Y) of the stomach of a patient lying supine
        y = canvas.grid(shape[0])[1]
        gas = shape[1] & (y < stomach[0][1] - 0.5 * stomach[1][1])
        canvas.paint((shape[0], gas), Tissue.GAS, ORGAN_ID["stomach"], only=(Tissue.STOMACH,))
    for (name, spec), (adrenal_name, adrenal_spec) in zip(KIDNEYS.items(), ADRENALS.items()):
        shift, size = place.jitter()
        parts[name] = (place.ellipsoid(spec, shift, size),)
        centre, semi = parts[name][0]
        canvas.paint(ellipsoid(canvas, centre, semi, rng, 0.04), Tissue.KIDNEY_CORTEX, ORGAN_ID[name], only=INSIDE)
        canvas.paint(ellipsoid(canvas, centre, 0.6 * semi), Tissue.KIDNEY_MEDULLA, ORGAN_ID[name],
                     only=(Tissue.KIDNEY_CORTEX,))
        adrenal = place.ellipsoid(adrenal_spec, shift)  # the adrenal moves with its kidney
        canvas.paint(ellipsoid(canvas, *adrenal), Tissue.ADRENAL, ORGAN_ID[adrenal_name], only=INSIDE)
    return parts


def _paint_hollow_organs(canvas: Canvas, place: _Placer) -> tuple:
    """Duodenum (with a gas bubble), pancreas and esophagus; returns the pancreas as spheres."""
    rng = place.rng
    shift = place.jitter(3.0)[0]
    points, radii = place.tube(DUODENUM, shift)
    canvas.paint(tube(canvas, points, radii), Tissue.DUODENUM, ORGAN_ID["duodenum"], only=INSIDE)
    bubble = points[int(rng.integers(1, len(points) - 1))] + np.array([0.0, -0.4 * radii[0], 0.0], np.float32)
    canvas.paint(ellipsoid(canvas, bubble, (0.5 * radii[0],) * 3), Tissue.GAS, ORGAN_ID["duodenum"],
                 only=(Tissue.DUODENUM,))
    points, radii = place.tube(PANCREAS, shift)
    canvas.paint(tube(canvas, points, radii), Tissue.PANCREAS, ORGAN_ID["pancreas"], only=INSIDE)
    canvas.paint(tube(canvas, *place.tube(ESOPHAGUS)), Tissue.ESOPHAGUS, ORGAN_ID["esophagus"],
                 only=INSIDE + (Tissue.MUSCLE,))
    return tuple((p, np.full(3, r, np.float32)) for p, r in zip(points, radii))


def paint_cysts(canvas: Canvas, layout: Layout, scale: float, rng: np.random.Generator) -> list[dict]:
    """0-2 simple cysts (~0-15 HU) in liver or kidneys: hypodense like many lesions, but organ, not lesion."""
    cysts = []
    for _ in range(int(rng.integers(0, 3))):
        host = str(rng.choice(["liver", "right_kidney", "left_kidney"], p=[0.6, 0.2, 0.2]))
        centre, semi = layout.ellipsoids[host][0]
        offset = rng.uniform(-0.5, 0.5, 3) * semi
        radius = max(rng.uniform(5, 12) * scale, 1.2 * max(canvas.spacing_zyx_mm[1:]))
        hosts = (Tissue.LIVER,) if host == "liver" else (Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA)
        mask = canvas.paint(ellipsoid(canvas, centre + offset, (radius,) * 3), Tissue.CYST, None, only=hosts)
        if mask is not None and mask.any():
            cysts.append({"host": host, "centre_body_mm": [round(float(v), 1) for v in centre + offset],
                          "radius_mm": round(float(radius), 1)})
    return cysts
