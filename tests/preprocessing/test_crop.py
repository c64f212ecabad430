"""The crop: largest component of HU > 50, the body guard, growing to labels (tiny synthetic CTs)."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from panseg.config import PreprocessConfig
from panseg.preprocessing.crop import (Box, choose_crop, grow_to_labels, largest_component_bbox, mask_bbox,
                                       threshold_bbox)

SHAPE = (40, 60, 60)
TABLE_Y = (48, 51)  # the table lies below the body, across x, separated by air


def ellipsoid(center, radii, shape=SHAPE) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), center, radii)) <= 1.0


def phantom(tissue_hu: float, organ_hu: float, table_hu: float) -> np.ndarray:
    """Air, a body ellipsoid, a liver and a spleen inside it, and a table slab underneath."""
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[ellipsoid((20, 25, 30), (18, 17, 24))] = tissue_hu
    hu[ellipsoid((20, 22, 22), (8, 7, 9))] = organ_hu
    hu[ellipsoid((20, 24, 42), (5, 5, 5))] = organ_hu
    hu[:, TABLE_Y[0]:TABLE_Y[1], 4:56] = table_hu
    return hu


def cc3d_largest_bbox(hu: np.ndarray, threshold: float = 50, connectivity: int = 6) -> Box:
    """The reference: cc3d's own largest component and its bounding box."""
    return mask_bbox(cc3d.largest_k(hu > threshold, k=1, connectivity=connectivity).astype(bool))


BODY_BOX = mask_bbox(ellipsoid((20, 25, 30), (18, 17, 24)))


def test_box_operations():
    box = Box((2, 3, 4), (5, 7, 9))
    assert box.shape_zyx == (3, 4, 5) and box.num_voxels == 60
    assert box.grow(3, (6, 20, 20)) == Box((0, 0, 1), (6, 10, 12))
    assert box.union(Box((0, 5, 5), (3, 10, 6))) == Box((0, 3, 4), (5, 10, 9))
    assert box.contains(Box((2, 4, 5), (4, 7, 9))) and not box.contains(Box((1, 4, 5), (4, 7, 9)))
    assert box.intersection(Box((4, 0, 0), (9, 4, 5))) == Box((4, 3, 4), (5, 4, 5))
    assert box.intersection(Box((6, 0, 0), (9, 4, 5))) is None
    assert Box.from_list(box.to_list()) == box
    assert np.zeros((6, 8, 10))[box.slices].shape == box.shape_zyx
    with pytest.raises(ValueError, match="start < stop"):
        Box((0, 0, 0), (0, 1, 1))


def test_crop_is_the_largest_component_and_excludes_the_table():
    hu = phantom(tissue_hu=60, organ_hu=120, table_hu=100)  # the body itself is above 50 HU
    decision = choose_crop(hu, None, PreprocessConfig())
    assert decision.reason == "largest_component"
    assert decision.component_box == cc3d_largest_bbox(hu) == BODY_BOX
    assert decision.box == BODY_BOX
    assert decision.box.stop_zyx[1] <= TABLE_Y[0]
    assert decision.body_fraction == pytest.approx(1.0)
    assert largest_component_bbox(hu, 50, 6) == BODY_BOX


def test_body_fallback_when_the_largest_component_is_a_small_organ():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=40)  # soft tissue below 50 HU: the liver wins
    decision = choose_crop(hu, None, PreprocessConfig(min_body_fraction=0.5))
    liver_box = mask_bbox(ellipsoid((20, 22, 22), (8, 7, 9)))
    assert decision.component_box == cc3d_largest_bbox(hu) == liver_box
    assert decision.reason == "body_fallback"
    assert decision.body_fraction < 0.5
    assert decision.box == decision.body_box == BODY_BOX  # the table (> -500 HU, separate) stays out


def test_bright_table_as_largest_component_is_found_exactly_and_replaced_by_the_body():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=100)  # the table is the largest component > 50 HU
    decision = choose_crop(hu, None, PreprocessConfig())
    assert decision.component_box == cc3d_largest_bbox(hu)
    assert decision.component_box.start_zyx[1] == TABLE_Y[0]
    assert decision.body_fraction == 0.0
    assert (decision.reason, decision.box) == ("body_fallback", BODY_BOX)


def test_body_guard_off_keeps_the_paper_crop():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=40)
    decision = choose_crop(hu, None, PreprocessConfig(min_body_fraction=0.0))
    assert decision.reason == "largest_component"
    assert decision.box == cc3d_largest_bbox(hu)
    assert decision.body_fraction is None  # not checked ...
    assert decision.body_box == BODY_BOX  # ... but measured: the liver's box leaves out most of the body
    body = ellipsoid((20, 25, 30), (18, 17, 24))
    assert decision.body_lost_fraction == pytest.approx(1 - body[decision.box.slices].sum() / body.sum())
    assert decision.body_lost_fraction > 0.5


@pytest.mark.parametrize("connectivity", [6, 26])
def test_connectivity_matches_cc3d(connectivity):
    rng = np.random.default_rng(0)
    hu = (rng.normal(40, 20, size=(20, 30, 30))).astype(np.int16)  # many noisy components
    box = largest_component_bbox(hu, 50, connectivity)
    assert box == cc3d_largest_bbox(hu, 50, connectivity)


def test_grow_to_labels_contains_every_labelled_voxel():
    hu = phantom(tissue_hu=60, organ_hu=120, table_hu=100)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[20, 45, 10] = 14  # a labelled voxel in the air gap above the table, outside the body
    decision = choose_crop(hu, labels, PreprocessConfig())
    assert decision.reason == "grown_to_labels"
    assert decision.box == BODY_BOX.union(Box((20, 45, 10), (21, 46, 11)))
    assert decision.label_box == Box((20, 45, 10), (21, 46, 11))
    kept = choose_crop(hu, labels, PreprocessConfig(crop_grow_to_labels=False))
    assert kept.box == BODY_BOX and kept.reason == "largest_component"
    inside = np.zeros(SHAPE, dtype=np.uint8)
    inside[20, 25, 30] = 1
    assert grow_to_labels(kept, inside, PreprocessConfig()).reason == "largest_component"


def test_margin_threshold_bbox_and_none():
    hu = phantom(tissue_hu=60, organ_hu=120, table_hu=100)
    grown = choose_crop(hu, None, PreprocessConfig(crop_margin_vox=3))
    assert grown.box == BODY_BOX.grow(3, SHAPE)
    seed_code = choose_crop(hu, None, PreprocessConfig(crop_method="threshold_bbox", crop_threshold_hu=0.0))
    assert seed_code.reason == "threshold_bbox"
    assert seed_code.box == threshold_bbox(hu, 0.0) == BODY_BOX.union(Box((0, 48, 4), (40, 51, 56)))
    assert choose_crop(hu, None, PreprocessConfig(crop_method="none")).box == Box.full(SHAPE)


def test_no_voxel_above_threshold_is_a_clear_error():
    hu = np.full((8, 9, 10), -1000, dtype=np.int16)
    hu[2:6, 2:6, 2:6] = 10
    with pytest.raises(ValueError, match="no voxel above 50 HU.*Hounsfield"):
        choose_crop(hu, None, PreprocessConfig())


def test_float_and_integer_thresholds_agree():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=100)
    as_float = hu.astype(np.float32) + 0.5  # 50.5 > 50 for a float CT, 50 is not for an integer one
    assert largest_component_bbox(as_float, 50.0, 6) == largest_component_bbox(hu, 50.0, 6)
    assert largest_component_bbox(hu, 50.7, 6) == largest_component_bbox(hu, 50.0, 6)


def test_body_method_is_the_body_box_whatever_the_organs():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=40)  # the paper's crop would take the liver alone
    decision = choose_crop(hu, None, PreprocessConfig(crop_method="body"))
    assert (decision.reason, decision.box, decision.body_box) == ("body", BODY_BOX, BODY_BOX)  # table left out
    assert decision.body_lost_fraction == 0.0
    paper = choose_crop(hu, None, PreprocessConfig(min_body_fraction=0.0))
    assert paper.body_lost_fraction > 0.5
    grown = choose_crop(hu, None, PreprocessConfig(crop_method="body", crop_margin_vox=2))
    assert grown.box == BODY_BOX.grow(2, SHAPE)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[20, 45, 10] = 14
    assert choose_crop(hu, labels, PreprocessConfig(crop_method="body")).reason == "grown_to_labels"


def test_body_method_without_a_body_is_a_clear_error():
    with pytest.raises(ValueError, match="no voxel above the body threshold -500 HU"):
        choose_crop(np.full((4, 5, 6), -1000, dtype=np.int16), None, PreprocessConfig(crop_method="body"))


def test_body_lost_fraction_is_what_the_box_leaves_out():
    hu = phantom(tissue_hu=40, organ_hu=120, table_hu=40)
    body = ellipsoid((20, 25, 30), (18, 17, 24))
    cfg = PreprocessConfig(min_body_fraction=0.01)  # the liver's box passes this guard
    decision = choose_crop(hu, None, cfg)
    assert decision.reason == "largest_component"
    expected = 1 - body[decision.box.slices].sum() / body.sum()
    assert decision.body_lost_fraction == pytest.approx(expected) and expected > 0.5
    fallback = choose_crop(hu, None, PreprocessConfig(min_body_fraction=0.9))
    assert (fallback.reason, fallback.body_lost_fraction) == ("body_fallback", 0.0)
    assert choose_crop(hu, None, PreprocessConfig(crop_method="none")).body_lost_fraction == 0.0
