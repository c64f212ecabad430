"""A small synthetic CT whose every geometry step is checkable: a body (60 HU) with a separate table
slab (200 HU) under it, a liver and a tumor, an anisotropic spacing, and a direction rotated 30
degrees and flipped. Shared by the whole-case predictor's tests and the folder prediction's.
"""

import math

import numpy as np

from panseg.config import TUMOR_ID
from panseg.io import Volume

SPACING = (4.5, 2.9, 3.1)  # (z, y, x) mm
SHAPE = (40, 64, 72)
ORIGIN = (-101.5, 37.25, 310.0)
_C, _S = math.cos(math.radians(30)), math.sin(math.radians(30))
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, -1.0)  # 30 degrees about z, z flipped


def _grid_mm(shape=SHAPE, spacing=SPACING):
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return z, y, x


def make_case(seed=0, shape=SHAPE, spacing=SPACING):
    """CT (int16 HU) and fused labels (1 liver, 14 tumor), and the body mask."""
    rng = np.random.default_rng(seed)
    z, y, x = _grid_mm(shape, spacing)
    cz, cx = shape[0] * spacing[0] / 2, shape[2] * spacing[2] / 2
    body = (((y - 75.0) / 50.0) ** 2 + ((x - cx) / 80.0) ** 2 <= 1.0) & (np.abs(z - cz) < 75.0)
    table = (y > 140.0) & (y < 152.0) & (np.abs(x - cx) < 100.0)  # below the body, an air gap between
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[body] = (60 + rng.integers(-5, 6, size=int(body.sum()))).astype(np.int16)
    ct[table] = 200
    liver = (((z - cz) / 40.0) ** 2 + ((y - 70.0) / 25.0) ** 2 + ((x - cx + 35.0) / 30.0) ** 2) <= 1.0
    tumor = ((z - cz) ** 2 + (y - 75.0) ** 2 + (x - cx - 25.0) ** 2) <= 32.0 ** 2
    labels = np.zeros(shape, dtype=np.uint8)
    labels[liver & body] = 1
    labels[tumor & body] = TUMOR_ID
    ct[tumor & body] = 110
    return Volume(ct, spacing, ORIGIN, DIRECTION), labels, body
