"""Tests of panseg.evaluation.metrics: hand-checkable DSC/NSD, the FLARE rules, agreement with DeepMind's package."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from panseg.evaluation import metrics
from panseg.evaluation.metrics import CaseScores, Summary

from tests.optional import import_optional

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ----------------------------------------------------------------------------------------------
# Surfel areas
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepmind():
    """DeepMind's surface-distance package, the oracle of the comparisons (only those tests need it).

    It calls scipy.ndimage.filters.* (deprecated namespace). It also uses np.Inf, removed in numpy 2,
    but only when a mask is empty, which these tests never hand it.
    """
    return import_optional("surface_distance", "pip install 'panseg[test]' (surface-distance)")


SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.8, 0.7), (0.7, 0.8, 2.5), (1.6, 1.2859, 1.2859), (0.3, 5.0, 1.7)]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_area_table_matches_deepmind_for_all_256_codes(spacing, deepmind):
    ours = metrics.neighbour_code_to_surface_area(spacing)
    theirs = deepmind.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_area_table_simple_codes_by_hand():
    sz, sy, sx = 2.5, 0.8, 0.7
    area = metrics.neighbour_code_to_surface_area((sz, sy, sx))
    assert area[0] == 0 and area[255] == 0
    assert area[0b00001111] == pytest.approx(sy * sx)  # voxels (1, *, *): a flat face normal to z
    assert area[0b00000011] == pytest.approx(sx * 0.5 * math.hypot(sz, sy))  # edge along x
    corner = math.sqrt((sy * sx) ** 2 + (sz * sx) ** 2 + (sz * sy) ** 2) / 8  # one triangle
    assert area[0b00000001] == pytest.approx(corner)


# ----------------------------------------------------------------------------------------------
# Hand-checkable DSC and NSD
# ----------------------------------------------------------------------------------------------


def _box(n: int, shift_axis: int | None = None, shape=(14, 14, 14), start: int = 3) -> np.ndarray:
    """An n^3 cube of ones at `start`, shifted by one voxel along `shift_axis`."""
    mask = np.zeros(shape, np.uint8)
    lo = [start] * 3
    if shift_axis is not None:
        lo[shift_axis] += 1
    mask[lo[0] : lo[0] + n, lo[1] : lo[1] + n, lo[2] : lo[2] + n] = 1
    return mask


def _box_areas(n: int, spacing, axis: int) -> tuple[float, float]:
    """(total surfel area of an n^3 cube, area of surfels lost when shifting it one voxel along `axis`).

    On the corner grid a cube of n voxels per side has, per face, (n-1)^2 flat points (area: the
    voxel face), per edge n-1 edge points (area: edge length x half the diagonal of the two other
    spacings) and 8 corner points (one marching-cubes triangle). Shifted one voxel along `axis`,
    the surfels that do not coincide with the shifted cube's surface are the whole trailing face
    (flat points, its 4 edges, its 4 corners) and the flat points of the leading face.
    """
    s = np.asarray(spacing, float)
    face = [s[(a + 1) % 3] * s[(a + 2) % 3] for a in range(3)]  # normal along a
    edge = [s[a] * 0.5 * math.hypot(s[(a + 1) % 3], s[(a + 2) % 3]) for a in range(3)]  # runs along a
    corner = math.sqrt(face[0] ** 2 + face[1] ** 2 + face[2] ** 2) / 8
    total = sum(2 * (n - 1) ** 2 * face[a] + 4 * (n - 1) * edge[a] for a in range(3)) + 8 * corner
    others = [a for a in range(3) if a != axis]
    trailing_face = (n - 1) ** 2 * face[axis] + sum(2 * (n - 1) * edge[a] for a in others) + 4 * corner
    return total, trailing_face + (n - 1) ** 2 * face[axis]


def test_dice_known_overlaps():
    gt = np.zeros((1, 1, 20), np.uint8)
    gt[..., :10] = 1
    half = np.zeros_like(gt)
    half[..., :5] = 1
    assert metrics.dice(half, gt) == pytest.approx(2 * 5 / 15)
    assert metrics.dice(gt, gt) == 1.0
    assert metrics.dice(1 - gt, gt) == 0.0
    assert metrics.dice(np.zeros_like(gt), np.zeros_like(gt)) == 1.0  # documented convention
    assert metrics.dice(_box(6, 2), _box(6)) == pytest.approx(5 / 6)  # one-voxel shift of a cube


def test_cube_shifted_within_tolerance_has_nsd_one():
    # Shift by one x voxel = 0.7 mm: every surfel is within 0.7 mm <= 2 mm of the other surface.
    gt, pred = _box(6), _box(6, shift_axis=2)
    spacing = (2.5, 0.8, 0.7)
    distances = metrics.surface_distances(pred, gt, spacing)
    assert distances.distances_gt_to_pred_mm.max() == pytest.approx(0.7)
    nsd = metrics.normalized_surface_dice(pred, gt, spacing, tolerance_mm=2.0)
    assert nsd == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "axis, spacing, tolerance_mm",
    [
        (0, (3.0, 2.5, 2.5), 2.0),  # 3 mm shift in z; every other spacing is also > 2 mm
        (2, (2.5, 0.8, 0.7), 0.5),  # 0.7 mm shift in x, tolerance below every spacing
        (1, (0.9, 1.1, 1.3), 0.8),
    ],
)
def test_cube_shifted_beyond_tolerance_counts_only_coincident_surfels(axis, spacing, tolerance_mm):
    # Every non-zero surfel distance is at least the smallest spacing, above the tolerance: only
    # surfels on both surfaces count, and the two cubes lose mirror-image surfels.
    n = 6
    gt, pred = _box(n), _box(n, shift_axis=axis)
    total, lost = _box_areas(n, spacing, axis)
    distances = metrics.surface_distances(pred, gt, spacing)
    assert distances.surfel_areas_gt_mm2.sum() == pytest.approx(total)
    assert distances.surfel_areas_pred_mm2.sum() == pytest.approx(total)
    nsd = metrics.normalized_surface_dice(pred, gt, spacing, tolerance_mm)
    assert nsd == pytest.approx(1 - lost / total, abs=1e-12)
    assert metrics.dice(pred, gt) == pytest.approx((n - 1) / n)


def test_identical_masks_have_zero_distances_and_nsd_one():
    gt = _box(5)
    distances = metrics.surface_distances(gt, gt, (2.5, 0.8, 0.7))
    assert distances.distances_gt_to_pred_mm.max() == 0 and distances.distances_pred_to_gt_mm.max() == 0
    assert metrics.normalized_surface_dice(gt, gt, (2.5, 0.8, 0.7), tolerance_mm=0.0) == 1.0


def test_surface_distances_of_empty_masks():
    empty, cube = np.zeros((8, 8, 8), bool), _box(3, shape=(8, 8, 8), start=2)
    both = metrics.surface_distances(empty, empty, (1, 1, 1))
    assert both.distances_gt_to_pred_mm.size == 0 and both.surfel_areas_pred_mm2.size == 0
    one = metrics.surface_distances(empty, cube, (1, 1, 1))
    assert one.distances_pred_to_gt_mm.size == 0 and np.isinf(one.distances_gt_to_pred_mm).all()
    assert metrics.normalized_surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert metrics.normalized_surface_dice(empty, cube, (1, 1, 1)) == 0.0


def test_mask_touching_the_volume_border_is_closed(deepmind):
    # A full volume still has a closed surface: the outside counts as background.
    full = np.ones((3, 4, 5), bool)
    spacing = (2.0, 1.0, 1.0)
    ours = metrics.surface_distances(full, full, spacing).surfel_areas_gt_mm2.sum()
    theirs = deepmind.compute_surface_distances(full, full, spacing)["surfel_areas_gt"].sum()
    assert ours == pytest.approx(theirs, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# FLARE rules
# ----------------------------------------------------------------------------------------------


def _segments(overlap: int, length: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-voxel-thick segments of `length` voxels sharing `overlap` voxels: DSC = overlap / length."""
    gt = np.zeros((3, 3, 2 * length + 2), np.uint8)
    pred = np.zeros_like(gt)
    gt[1, 1, 1 : 1 + length] = 1
    pred[1, 1, 1 + length - overlap : 1 + 2 * length - overlap] = 1
    return pred, gt


@pytest.mark.parametrize(
    "bad_value, dtype", [(2, np.uint8), (14, np.uint8), (-1, np.int8), (300, np.int32)]
)
def test_invalid_labels_score_zero_even_when_overlapping(bad_value, dtype):
    gt = _box(4).astype(dtype)
    pred = gt.copy()
    pred[0, 0, 0] = bad_value
    assert metrics.flare_case_scores(pred, gt, (1, 1, 1)) == CaseScores(0.0, 0.0, "invalid_labels")


def test_empty_cases():
    empty, cube = np.zeros((8, 8, 8), np.uint8), _box(3, shape=(8, 8, 8), start=2)
    assert metrics.flare_case_scores(empty, empty, (1, 1, 1)) == CaseScores(1.0, 1.0, "both_empty")
    assert metrics.flare_case_scores(cube, empty, (1, 1, 1)) == CaseScores(0.0, 0.0, "one_empty")
    assert metrics.flare_case_scores(empty, cube, (1, 1, 1)) == CaseScores(0.0, 0.0, "one_empty")


def test_ground_truth_is_binarised_and_bool_predictions_work():
    cube = _box(4)
    scores = metrics.flare_case_scores(cube.astype(bool), cube * 7, (2.5, 0.8, 0.7))
    assert scores == CaseScores(1.0, 1.0, "scored")


@pytest.mark.parametrize("overlap, rule", [(19, "low_dsc"), (20, "scored"), (21, "scored")])
def test_nsd_is_computed_only_when_dsc_is_at_least_0_2(overlap, rule):
    pred, gt = _segments(overlap)
    scores = metrics.flare_case_scores(pred, gt, (2.5, 0.8, 0.7))
    assert scores.dsc == overlap / 100 and scores.rule == rule
    nsd = metrics.normalized_surface_dice(pred, gt, (2.5, 0.8, 0.7))
    assert nsd > 0.2  # so the rule, not the geometry, zeroes it below 0.2
    assert scores.nsd == (0.0 if rule == "low_dsc" else nsd)


def test_dsc_exactly_0_2_is_scored():
    pred, gt = _segments(20)
    assert metrics.dice(pred, gt) == 0.2
    assert metrics.flare_case_scores(pred, gt, (1, 1, 1)).rule == "scored"


def test_float_predictions_and_bad_arguments_are_rejected():
    cube = _box(3)
    with pytest.raises(TypeError, match="bool or integer"):
        metrics.flare_case_scores(cube.astype(np.float32), cube, (1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        metrics.flare_case_scores(cube, cube[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="3D"):
        metrics.normalized_surface_dice(cube[0], cube[0], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing_zyx_mm"):
        metrics.flare_case_scores(cube, cube, (1, 1))
    with pytest.raises(ValueError, match="spacing_zyx_mm"):
        metrics.normalized_surface_dice(cube, cube, (1, 0, 1))


def test_evaluate_arrays_rows_and_errors_name_the_case():
    cube = _box(3)
    rows = metrics.evaluate_arrays({"a": (cube, cube, (1, 1, 1)), "b": (cube * 0, cube * 0, (1, 1, 1))})
    assert rows == [
        {"case_id": "a", "dsc": 1.0, "nsd": 1.0, "rule": "scored"},
        {"case_id": "b", "dsc": 1.0, "nsd": 1.0, "rule": "both_empty"},
    ]
    with pytest.raises(ValueError, match="case 'bad'"):
        metrics.evaluate_arrays({"bad": (cube, cube[:-1], (1, 1, 1))})


# ----------------------------------------------------------------------------------------------
# Agreement with DeepMind's surface-distance package
# ----------------------------------------------------------------------------------------------


def _random_blobs(seed: int, shape=(40, 50, 60)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random blob field as ground truth and a perturbed copy as prediction."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.5, 4))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1, 3))
    threshold = rng.uniform(0.0, 0.1) * field.std() / 0.1
    gt = field > threshold
    pred = field + 0.5 * field.std() / noise.std() * noise > threshold
    return pred, gt


def _flare_oracle(deepmind, pred, gt, spacing):
    """The organisers' rule written directly on top of DeepMind's functions (binary inputs)."""
    dsc = deepmind.compute_dice_coefficient(gt, pred)
    if dsc < 0.2:
        return dsc, 0.0
    distances = deepmind.compute_surface_distances(gt, pred, spacing)
    return dsc, deepmind.compute_surface_dice_at_tolerance(distances, 2.0)


@pytest.mark.parametrize(
    "seed, spacing",
    [
        (0, (2.5, 0.8, 0.7)),
        (1, (2.5, 0.8, 0.7)),
        (2, (1.6, 1.2859, 1.2859)),
        (3, (0.7, 0.8, 2.5)),
        (4, (5.0, 0.6, 0.9)),
    ],
)
def test_agrees_with_deepmind_on_random_blobs(seed, spacing, deepmind):
    pred, gt = _random_blobs(seed)
    assert 0.1 < gt.mean() < 0.5 and 0.1 < pred.mean() < 0.5  # several blobs, neither mask trivial
    ours = metrics.surface_distances(pred, gt, spacing)
    theirs = deepmind.compute_surface_distances(gt, pred, spacing)
    for which in ("gt_to_pred", "pred_to_gt"):
        side = "gt" if which == "gt_to_pred" else "pred"
        distances = getattr(ours, f"distances_{which}_mm")
        areas = getattr(ours, f"surfel_areas_{side}_mm2")
        order = np.lexsort((areas, distances))  # DeepMind sorts by (distance, area)
        np.testing.assert_allclose(distances[order], theirs[f"distances_{which}"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(areas[order], theirs[f"surfel_areas_{side}"], rtol=0, atol=1e-9)
    for tolerance_mm in (1.0, 2.0, 5.0):
        expected = deepmind.compute_surface_dice_at_tolerance(theirs, tolerance_mm)
        assert metrics.surface_dice_at_tolerance(ours, tolerance_mm) == pytest.approx(expected, abs=1e-6)
    scores = metrics.flare_case_scores(pred.astype(np.uint8), gt.astype(np.uint8), spacing)
    expected_dsc, expected_nsd = _flare_oracle(deepmind, pred, gt, spacing)
    assert scores.dsc == pytest.approx(expected_dsc, abs=1e-12)
    assert scores.nsd == pytest.approx(expected_nsd, abs=1e-6)


def test_agrees_with_deepmind_when_blobs_touch_the_border(deepmind):
    pred, gt = _random_blobs(5, shape=(20, 30, 30))
    gt[0], pred[:, -1] = True, True  # surfaces on the volume's outer faces
    spacing = (2.5, 0.8, 0.7)
    distances = deepmind.compute_surface_distances(gt, pred, spacing)
    expected = deepmind.compute_surface_dice_at_tolerance(distances, 2.0)
    assert metrics.normalized_surface_dice(pred, gt, spacing) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------


def test_summarize_by_hand():
    summary = metrics.summarize([1.0, 0.0, 0.5, 0.25])
    assert summary.n == 4
    assert summary.mean == pytest.approx(0.4375)
    assert summary.std == pytest.approx(math.sqrt(0.546875 / 4))  # population std (ddof=0)
    assert (summary.median, summary.q1, summary.q3) == pytest.approx((0.375, 0.1875, 0.625))
    assert summary.mean_std() == "43.75 ± 36.98"
    assert summary.median_quartiles() == "37.50 (18.75, 62.50)"
    assert summary.mean_std(percent=False, digits=3) == "0.438 ± 0.370"


def test_summary_formats_like_the_papers_table_7():
    summary = Summary(n=100, mean=0.3273, std=0.3182, median=0.2278, q1=0.0, q3=0.6025)
    assert summary.mean_std() == "32.73 ± 31.82"
    assert summary.median_quartiles() == "22.78 (0.00, 60.25)"


def test_summarize_empty_and_non_finite():
    empty = metrics.summarize([])
    assert empty.n == 0 and math.isnan(empty.mean)
    assert empty.mean_std() == "n/a" and empty.median_quartiles() == "n/a"
    with pytest.raises(ValueError, match="finite"):
        metrics.summarize([0.5, float("nan")])


def test_false_positive_rate():
    clean = np.zeros((4, 4, 4), np.uint8)
    speck = clean.copy()
    speck[1, 2, 3] = 1
    assert metrics.false_positive_rate([clean, speck, clean, clean]) == 0.25
    assert metrics.false_positive_rate(iter([speck])) == 1.0
    assert math.isnan(metrics.false_positive_rate([]))
