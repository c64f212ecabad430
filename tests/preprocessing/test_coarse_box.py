"""The coarse crop decision gives cc3d's full-resolution box exactly (phantom cohort, random shapes)."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from panseg.phantom.cohort import make_case
from panseg.preprocessing.coarse_box import largest_component_box
from panseg.preprocessing.crop import mask_bbox


def cc3d_box(mask: np.ndarray, connectivity: int):
    """The reference: cc3d's largest component at full resolution, and its box as (start, stop)."""
    largest = cc3d.largest_k(mask, k=1, connectivity=connectivity).astype(bool)
    box = mask_bbox(largest)
    return None if box is None else (box.start_zyx, box.stop_zyx)


def random_shapes(seed: int, shape=(40, 96, 112)) -> np.ndarray:
    """A body of unioned ellipsoids with holes (lungs), limbs, a separate table, specks and thin wires."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]

    def ellipsoid(center, radii):
        return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), center, radii)) <= 1.0

    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 5)):
        center = rng.uniform([10, 30, 35], [30, 60, 75])
        mask |= ellipsoid(center, rng.uniform([8, 12, 14], [30, 30, 40]))
    for _ in range(rng.integers(0, 3)):  # holes: lungs, bowel gas
        mask &= ~ellipsoid(rng.uniform([5, 30, 30], [35, 60, 80]), rng.uniform([3, 4, 4], [10, 10, 12]))
    if rng.random() < 0.7:  # a table below, sometimes touching the body
        gap = int(rng.integers(0, 4))
        rows = np.flatnonzero(mask.any(axis=(0, 2)))
        top = min(shape[1] - 3, rows[-1] + 1 + gap) if rows.size else shape[1] - 3
        mask[:, top:top + 3, 5:-5] = True
    for _ in range(rng.integers(0, 4)):  # one-voxel wires leaving the body: thinner than a coarse block
        zz, yy = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        if rng.random() < 0.5:
            mask[zz, yy, : rng.integers(1, shape[2])] = True
        else:
            mask[zz, : rng.integers(1, shape[1]), yy % shape[2]] = True
    mask |= rng.random(shape) < rng.choice([0.0, 0.001, 0.02])  # specks: noise above the threshold
    mask &= ~(rng.random(shape) < rng.choice([0.0, 0.01]))  # and holes of noise in the body
    return mask


@pytest.mark.parametrize("connectivity", [6, 26])
def test_random_shapes_give_cc3ds_box_exactly(connectivity):
    methods = []
    for seed in range(40):
        mask = random_shapes(seed)
        result = largest_component_box(mask, connectivity)
        assert (result.start_zyx, result.stop_zyx) == cc3d_box(mask, connectivity), f"seed {seed}"
        methods.append(result.method)
    assert methods.count("coarse") >= 30, methods  # decided coarsely (and proved), not by the fallback


def test_phantom_cohort_bodies_and_bright_components_give_cc3ds_box_exactly():
    methods = []
    for i in range(8):
        hu = make_case(f"case_{i:03d}", 7, healthy=i % 4 == 0, small=True).ct.array
        for threshold in (-500, 50):
            mask = hu > threshold
            result = largest_component_box(mask, 6)
            assert (result.start_zyx, result.stop_zyx) == cc3d_box(mask, 6), (i, threshold)
            methods.append((threshold, result.method))
    assert all(method == "coarse" for threshold, method in methods if threshold == -500), methods


def test_small_and_empty_masks():
    assert largest_component_box(np.zeros((40, 64, 64), dtype=bool), 6).method == "empty"
    tiny = np.zeros((4, 5, 6), dtype=bool)
    tiny[1:3, 1:4, 2:5] = True
    result = largest_component_box(tiny, 6)
    assert (result.start_zyx, result.stop_zyx, result.method) == ((1, 1, 2), (3, 4, 5), "full")
    with pytest.raises(ValueError, match="connectivity must be 6, 18 or 26"):
        largest_component_box(tiny, 4)
