"""Tests of the synthetic CT phantom: its physics, its labels and what it writes.

Most cases are small (coarse) ones; the physics checked here is what the pipeline relies on: a table
that is never connected to the body above 50 HU, both kinds of largest component, partial lesion
labels, imperfect organ pseudo-labels, geometry that survives the file round trip.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk

from panseg.config import ORGAN_IDS
from panseg.io import discover_cohort, read_volume
from panseg.phantom.cohort import cohort_jobs, make_case, write_cohort
from panseg.phantom.shapes import Tissue

SEED = 7
BODY_TISSUES = [t for t in Tissue if Tissue.FAT <= t < Tissue.LESION and t not in (Tissue.LUNG, Tissue.GAS)]


@lru_cache(maxsize=None)
def small_case(index: int, healthy: bool = False, seed: int = SEED):
    """Case `index` of a small cohort, with the kind and orientation the cohort would give it."""
    jobs = {job[0]: job for job in cohort_jobs(16, 4)}
    case_id = f"phantom_healthy_{index:03d}" if healthy else f"phantom_{index:03d}"
    _, healthy, weak, orientation = jobs[case_id]
    return make_case(case_id, seed, healthy, small=True, weak=weak, orientation=orientation)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels = cc3d.connected_components(mask, connectivity=6)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return tuple(slice(h[0], h[-1] + 1) for h in hits)


def physical_centroid(mask: np.ndarray, volume) -> np.ndarray:
    """Mean physical (x, y, z) position of a mask's voxels, through the volume's direction."""
    index_xyz = np.argwhere(mask).mean(axis=0)[::-1]
    direction = np.asarray(volume.direction_xyz).reshape(3, 3)
    return np.asarray(volume.origin_xyz_mm) + direction @ (index_xyz * np.asarray(volume.spacing_zyx_mm)[::-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_small_cases_are_fast_and_hold_every_structure():
    start = time.perf_counter()
    case = make_case("phantom_speed", SEED, False, small=True, weak=False, orientation="LPS")
    seconds = time.perf_counter() - start
    print(f"small case {case.ct.array.shape}: {seconds:.3f} s")
    assert seconds < 1.0  # about 0.1 s here; generous for loaded CI machines
    assert 48 <= case.ct.array.shape[0] <= 80 and all(96 <= n <= 128 for n in case.ct.array.shape[1:])
    assert set(np.unique(case.organs_true.array)) == {0, *ORGAN_IDS}
    present = set(np.unique(case.tissue.array).tolist())
    for tissue in (Tissue.TABLE_SHELL, Tissue.FAT, Tissue.MUSCLE, Tissue.LUNG, Tissue.CANCELLOUS_BONE,
                   Tissue.CORTICAL_BONE, Tissue.FLAT_BONE, Tissue.DISC, Tissue.BOWEL, Tissue.ARTERY):
        assert tissue in present, f"{tissue.name} missing from a small case"
    assert case.ct.array.dtype == np.int16 and case.organs_true.array.dtype == np.uint8


@pytest.mark.parametrize("index", [0, 1, 2, 3])  # LPS, RAS, tilted, and a weak case
def test_table_is_posterior_and_never_connected_to_the_body_above_50_hu(index):
    case = small_case(index)
    ct, tissue = case.ct.array, case.tissue.array
    table = tissue == Tissue.TABLE_SHELL
    body = np.isin(tissue, BODY_TISSUES)
    assert table.any() and (ct[table] > 50).mean() > 0.99
    for connectivity in (6, 26):  # the paper's crop uses 6; even 26 must not bridge the gap
        labels = cc3d.connected_components(ct > 50, connectivity=connectivity)
        table_labels = set(np.unique(labels[table & (ct > 50)])) - {0}
        body_labels = set(np.unique(labels[body & (ct > 50)])) - {0}
        assert table_labels and body_labels and not table_labels & body_labels
    assert not (largest_component(ct > -500) & table).any()  # the body guard's body excludes the table
    body_rows = np.flatnonzero(body.any(axis=(0, 2)))
    table_rows = np.flatnonzero((tissue == Tissue.TABLE_SHELL).any(axis=(0, 2)))
    assert table_rows.min() > body_rows.max() or table_rows.max() < body_rows.min()  # no body box holds table
    # posterior is +y in ITK's LPS physical space, whatever the array orientation
    assert physical_centroid(table, case.ct)[1] > physical_centroid(body, case.ct)[1] + 50


def test_connected_kind_has_a_body_sized_largest_component_above_50_hu():
    for index in (0, 1, 2):
        case = small_case(index)
        assert case.kind == "connected"
        body = largest_component(case.ct.array > -500)
        component = largest_component(case.ct.array > 50)
        held = body[bounding_box(component)].sum() / body.sum()
        assert held > 0.75, f"case {index}: the component's box holds only {held:.2f} of the body"


def test_weak_kind_has_a_small_largest_component_so_the_crop_guard_must_act():
    for index in (3, 7):
        case = small_case(index)
        assert case.kind == "weak" and case.phase == "non_contrast"
        assert case.hu[int(Tissue.MUSCLE)] < 45
        body = largest_component(case.ct.array > -500)
        component = largest_component(case.ct.array > 50)
        assert component.sum() < 0.1 * body.sum()
        held = body[bounding_box(component)].sum() / body.sum()
        assert held < 0.2, f"case {index}: the component's box holds {held:.2f} of the body"


def test_only_the_primary_lesion_is_labelled():
    case = next(small_case(i) for i in range(16) if len(small_case(i).lesions) > 1)
    every, labelled = case.lesions_true.array.astype(bool), case.lesions_labelled.array.astype(bool)
    assert (labelled <= every).all() and labelled.sum() < every.sum()  # a strict subset
    primary = case.lesions[case.primary]
    assert primary.primary and primary.voxels == max(lesion.voxels for lesion in case.lesions)
    assert labelled.sum() == primary.voxels and every.sum() == sum(lesion.voxels for lesion in case.lesions)
    np.testing.assert_allclose(np.argwhere(labelled).mean(axis=0), primary.centre_zyx_vox, atol=0.5)
    codes = case.tissue.array[labelled]
    assert np.isin(codes, [Tissue.LESION + primary.index, Tissue.LESION_CORE]).all()


def test_lesions_vary_in_site_size_and_contrast_and_match_their_hu():
    lesions = [(small_case(i), lesion) for i in range(16) for lesion in small_case(i).lesions]
    sites = {lesion.site for _, lesion in lesions}
    assert {"liver", "kidney"} & sites and {"lung", "lymph_node", "bone"} & sites
    assert {lesion.contrast for _, lesion in lesions} == {"hypo", "hyper"}
    counts = [len(small_case(i).lesions) for i in range(16)]
    assert min(counts) >= 1 and max(counts) <= 4
    for case, lesion in lesions:
        if lesion.necrotic_core:
            continue
        own = case.tissue.array == Tissue.LESION + lesion.index
        measured = case.ct.array[own].mean()
        assert abs(measured - lesion.hu_mean) < 4 * case.noise_sigma_hu / np.sqrt(own.sum()) + 1.0
        if lesion.contrast == "hypo":
            assert lesion.hu_mean < lesion.host_hu
        else:
            assert lesion.hu_mean > lesion.host_hu


def test_healthy_cases_have_no_lesion_anywhere_but_keep_distractors():
    for index in range(4):
        case = small_case(index, healthy=True)
        assert case.healthy and case.lesions == () and case.primary is None
        assert not case.lesions_true.array.any() and not case.lesions_labelled.array.any()
        assert (case.tissue.array < Tissue.LESION).all()
        assert (case.tissue.array == Tissue.BOWEL).any()


def test_pseudo_organs_are_close_to_but_not_the_true_organs():
    for index in (0, 3, 5):
        case = small_case(index)
        true, pseudo = case.organs_true.array, case.organs_pseudo.array
        assert not np.array_equal(true, pseudo)
        for organ in ORGAN_IDS:
            assert dice(true == organ, pseudo == organ) > 0.8, f"case {index}, organ {organ}"


def test_lesions_inside_organs_are_still_organ():
    kept = total = 0
    for index in range(16):  # summed over cases: a small lesion on an organ's edge may lose a voxel or two
        case = small_case(index)
        true, pseudo = case.organs_true.array, case.organs_pseudo.array
        inside = case.lesions_true.array.astype(bool) & (true > 0)
        kept, total = kept + int((pseudo[inside] == true[inside]).sum()), total + int(inside.sum())
        for lesion in case.lesions:
            if lesion.site == "liver":  # liver lesions are clipped to the liver, and are liver in organs_true
                assert (true[case.tissue.array == Tissue.LESION + lesion.index] == ORGAN_IDS[0]).all()
    assert total > 1000 and kept / total > 0.9


def test_hu_of_each_tissue_is_plausible():
    expected = {Tissue.FAT: (-130, -80), Tissue.LUNG: (-890, -800), Tissue.CORTICAL_BONE: (600, 1050),
                Tissue.CANCELLOUS_BONE: (300, 480), Tissue.TABLE_SHELL: (200, 500), Tissue.PAD: (-920, -800),
                Tissue.GALLBLADDER: (0, 25), Tissue.AIR: (-1024, -985)}
    by_phase = {"portal": {Tissue.LIVER: (90, 120), Tissue.ARTERY: (145, 200), Tissue.KIDNEY_CORTEX: (155, 195),
                           Tissue.SPLEEN: (100, 130), Tissue.VEIN: (110, 140), Tissue.MUSCLE: (50, 70)},
                "arterial": {Tissue.LIVER: (60, 85), Tissue.ARTERY: (225, 305), Tissue.MUSCLE: (50, 70)},
                "non_contrast": {Tissue.LIVER: (35, 50), Tissue.ARTERY: (35, 48), Tissue.MUSCLE: (25, 42)}}
    for index in (1, 3):
        case = small_case(index)
        ct, tissue = case.ct.array, case.tissue.array
        for code, (lo, hi) in {**expected, **by_phase[case.phase]}.items():
            values = ct[tissue == code]
            if values.size:
                assert lo <= values.mean() <= hi, f"{code.name}: mean {values.mean():.1f} not in [{lo}, {hi}]"
        outside = ct[tissue == Tissue.OUTSIDE_FOV]
        assert outside.size and (outside == -1024).all() and ct.min() >= -1024
        muscle = ct[tissue == Tissue.MUSCLE].astype(float)
        assert abs(muscle.std() - case.noise_sigma_hu) < 0.1 * case.noise_sigma_hu


def test_cases_are_deterministic_per_seed_and_case_id():
    first = make_case("phantom_001", 3, False, small=True, weak=False, orientation="RAS")
    second = make_case("phantom_001", 3, False, small=True, weak=False, orientation="RAS")
    for name in ("ct", "organs_true", "organs_pseudo", "lesions_true", "lesions_labelled", "tissue"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.array.tobytes() == b.array.tobytes() and a.geometry == b.geometry, name
    assert first.metadata() == second.metadata()
    for other in (make_case("phantom_001", 4, False, small=True, weak=False, orientation="RAS"),
                  make_case("phantom_002", 3, False, small=True, weak=False, orientation="RAS")):
        assert other.ct.array.shape != first.ct.array.shape or not np.array_equal(other.ct.array, first.ct.array)


def test_orientation_changes_storage_not_anatomy():
    lps = make_case("phantom_010", SEED, False, small=True, weak=False, orientation="LPS")
    ras = make_case("phantom_010", SEED, False, small=True, weak=False, orientation="RAS")
    assert np.array_equal(ras.ct.array, lps.ct.array[:, ::-1, ::-1])
    assert ras.ct.direction_xyz == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    for organ in (1, 3, 13):
        np.testing.assert_allclose(physical_centroid(ras.organs_true.array == organ, ras.ct),
                                   physical_centroid(lps.organs_true.array == organ, lps.ct), atol=1e-3)
    for a, b in zip(lps.lesions, ras.lesions):
        np.testing.assert_allclose(a.centre_xyz_mm, b.centre_xyz_mm, atol=0.02)
    tilted = make_case("phantom_010", SEED, False, small=True, weak=False, orientation="tilted")
    direction = np.asarray(tilted.ct.direction_xyz).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
    assert not np.allclose(direction, np.eye(3)) and abs(np.linalg.det(direction) - 1.0) < 1e-12


def test_written_cohort_round_trips_geometry_and_arrays(tmp_path):
    out, truth = tmp_path / "raw", tmp_path / "truth"
    summary = write_cohort(out, cases=3, healthy=1, seed=SEED, small=True, truth_dir=truth, workers=2)
    print(summary.describe())
    assert summary.case_ids == ("phantom_000", "phantom_001", "phantom_002", "phantom_healthy_000")
    assert summary.healthy_ids == ("phantom_healthy_000",) and "phantom_002" in summary.describe()
    cohort = discover_cohort(out)
    assert [c.case_id for c in cohort.valid] == list(summary.case_ids) and not cohort.invalid
    assert all(c.label and c.organs for c in cohort.valid)
    directions = set()
    for entry, files in zip(summary.cases, cohort.valid):
        case = small_case(int(entry.case_id[-3:]), healthy=entry.healthy)
        image = read_volume(files.image)
        assert image.array.dtype == np.int16 and np.array_equal(image.array, case.ct.array)
        assert image.geometry.matches(case.ct.geometry, tolerance=1e-6)
        assert image.spacing_zyx_mm == case.ct.spacing_zyx_mm and image.spacing_zyx_mm == entry.spacing_zyx_mm
        np.testing.assert_allclose(image.origin_xyz_mm, case.ct.origin_xyz_mm, atol=1e-4)
        np.testing.assert_allclose(image.direction_xyz, case.ct.direction_xyz, atol=1e-6)
        directions.add(tuple(np.round(image.direction_xyz, 3)))
        label, organs = read_volume(files.label), read_volume(files.organs)
        assert label.array.dtype == np.uint8 and np.array_equal(label.array, case.lesions_labelled.array)
        assert np.array_equal(organs.array, case.organs_pseudo.array) and organs.geometry.matches(image.geometry)
        assert np.array_equal(read_volume(truth / f"{entry.case_id}.nii.gz").array, case.lesions_true.array)
        assert np.array_equal(read_volume(truth / "organs" / f"{entry.case_id}.nii.gz").array, case.organs_true.array)
        if entry.healthy:
            assert not label.array.any()
        for lesion in case.lesions:  # metadata centres agree with SimpleITK's index-to-physical mapping
            point = sitk.ReadImage(files.image).TransformContinuousIndexToPhysicalPoint(lesion.centre_zyx_vox[::-1])
            assert np.linalg.norm(np.subtract(point, lesion.centre_xyz_mm)) < max(entry.spacing_zyx_mm)
    assert len(directions) == 3  # identity, RAS and tilted all went through the file format
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["parameters"]["seed"] == SEED and [c["case_id"] for c in meta["cases"]] == list(summary.case_ids)
    assert meta["cases"][0]["lesions"] and meta["cases"][0]["kind"] == "connected"


def test_organ_cohort_labels_are_the_true_organs_and_replace_an_older_cohort(tmp_path):
    write_cohort(tmp_path / "organs", cases=2, healthy=1, seed=SEED, small=True)
    summary = write_cohort(tmp_path / "organs", cases=1, healthy=0, seed=SEED, small=True, organ_cohort=True)
    assert [c.case_id for c in discover_cohort(tmp_path / "organs").cases] == ["phantom_000"]
    assert not list((tmp_path / "organs" / "organsTr").glob("*.nii.gz"))
    label = read_volume(tmp_path / "organs" / "labelsTr" / "phantom_000.nii.gz")
    case = small_case(0)
    assert np.array_equal(label.array, case.organs_true.array) and set(np.unique(label.array)) == {0, *ORGAN_IDS}
    assert case.lesions and "organ cohort" in summary.describe()


def test_invalid_arguments_are_rejected_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="at least one case"):
        write_cohort(tmp_path, cases=0, healthy=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        write_cohort(tmp_path, cases=1, healthy=0, seed=-1)
    with pytest.raises(ValueError, match="workers"):
        write_cohort(tmp_path, cases=1, healthy=0, seed=0, workers=0)
    with pytest.raises(ValueError, match="case id"):
        make_case("bad id/1", 0, False, small=True)
    with pytest.raises(ValueError, match="orientation"):
        make_case("phantom_000", 0, False, small=True, orientation="RAI")


def test_realistic_case_has_realistic_size_and_spacing():
    start = time.perf_counter()
    case = make_case("phantom_000", SEED, False, small=False, weak=False, orientation="LPS")
    seconds = time.perf_counter() - start
    shape, spacing = case.ct.array.shape, case.ct.spacing_zyx_mm
    print(f"realistic case {shape} at {spacing} mm: {seconds:.2f} s")
    assert 80 <= shape[0] <= 200 and shape[1] == shape[2] and 448 <= shape[1] <= 512
    assert 0.6 <= spacing[1] == spacing[2] <= 1.0 and 1.5 <= spacing[0] <= 5.0
    assert set(np.unique(case.organs_true.array)) == {0, *ORGAN_IDS}
    assert seconds < 10.0


def test_the_summary_is_one_line_and_the_table_keeps_it_first():
    from panseg.phantom.cohort import CaseSummary, CohortSummary

    def case(case_id, healthy, phase, shape, lesions):
        return CaseSummary(case_id, healthy, "weak" if phase == "non_contrast" else "connected", phase, "ras", shape,
                           (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), lesions, 10, 0.1)

    summary = CohortSummary("/raw", 0, True, False, "/truth", (
        case("phantom_000", False, "portal", (40, 60, 60), 2),
        case("phantom_001", False, "non_contrast", (44, 64, 60), 1),
        case("phantom_healthy_000", True, "arterial", (38, 60, 62), 0)), 1.25)
    line = summary.summary_line()
    assert "\n" not in line
    assert line == ("phantom cohort in /raw: 3 cases (2 with lesions, 1 healthy; 3 lesions; phases arterial 1, "
                    "non_contrast 1, portal 1; shapes 38x60x62 to 44x64x60), seed 0, small, tumor cohort, 1.2 s")
    table = summary.describe().splitlines()
    assert table[0] == line and len(table) == 2 + 3
