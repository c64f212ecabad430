"""The Ray Data preprocessing job on phantom cohorts: what the store holds, bad input, kill and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk

from panseg.config import ORGAN_IDS, TUMOR_ID, preset
from panseg.data_pipeline import format_summary, run_preprocessing
from panseg.io import read_volume
from panseg.phantom.cohort import make_case
from panseg.phantom.shapes import Tissue
from panseg.preprocessing.case import scale_to_unit
from panseg.store.zarr_store import list_complete_cases, read_case, read_manifest

pytestmark = pytest.mark.ray
TINY = preset("tiny").preprocess


def _largest_component_box(hu, threshold, connectivity=6):
    """The paper's crop computed independently: bbox of the largest component of HU > threshold."""
    labels = cc3d.connected_components(hu > threshold, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    where = np.argwhere(labels == sizes.argmax())
    return where.min(0).tolist() + (where.max(0) + 1).tolist()


def _table_voxels(cohort_root, case_id, hu):
    """The scanner table of a phantom case, from the phantom's own tissue map (regenerated)."""
    meta = json.loads((cohort_root / "raw" / "phantom.json").read_text())
    info = next(c for c in meta["cases"] if c["case_id"] == case_id)
    case = make_case(case_id, meta["parameters"]["seed"], info["healthy"], meta["parameters"]["small"],
                     weak=info["kind"] == "weak", orientation=info["orientation"])
    np.testing.assert_array_equal(case.ct.array, hu)  # the same case as on disk
    return np.isin(case.tissue.array, [Tissue.TABLE_SHELL, Tissue.TABLE_CORE]) & (hu > 50)


@pytest.fixture(scope="module")
def preprocessed(tiny_store):
    return tiny_store


def test_every_case_is_stored_and_the_summary_says_so(preprocessed):
    _, store, result = preprocessed
    assert (result.num_ok, result.num_failed) == (8, 0)
    assert sorted(list_complete_cases(store)) == sorted(r["case_id"] for r in result.rows)
    assert {r["case_id"] for r in read_manifest(store)} == {r["case_id"] for r in result.rows}
    assert "ok: 8" in format_summary(result)
    assert all(r["node"] for r in result.rows)  # the Ray node that did each case


def test_crop_is_the_largest_component_box_or_a_documented_guard(preprocessed):
    root, store, result = preprocessed
    reasons = set()
    for row in result.rows:
        hu = read_volume(row["image_path"]).array
        box = row["crop_box"]
        component = _largest_component_box(hu, TINY.crop_threshold_hu)
        reasons.add(row["crop_reason"])
        if row["crop_reason"] == "largest_component":
            assert box == component, row["case_id"]
        else:  # DESIGN.md's guard: the component box holds too little of the body (here: it is the table)
            assert row["crop_reason"] == "body_fallback", row["case_id"]
            body = _largest_component_box(hu, TINY.body_threshold_hu)
            assert box == body, row["case_id"]
            body_mask = cc3d.largest_k(hu > TINY.body_threshold_hu, k=1, connectivity=6) > 0
            held = body_mask[tuple(slice(a, b) for a, b in zip(component[:3], component[3:]))].sum()
            assert held < TINY.min_body_fraction * body_mask.sum(), row["case_id"]
        inside = tuple(slice(a, b) for a, b in zip(box[:3], box[3:]))
        table = _table_voxels(root, row["case_id"], hu)
        assert table.sum() > 100 and table[inside].sum() == 0, f"{row['case_id']}: the crop holds the table"
    assert "body_fallback" in reasons or "grown_to_labels" in reasons  # the phantom's weak cases
    assert "largest_component" in reasons


def test_store_holds_target_spacing_fused_labels_and_scalable_images(preprocessed):
    root, store, result = preprocessed
    for row in result.rows:
        image, label, attrs = read_case(store, row["case_id"])
        assert tuple(attrs["resampled_spacing_zyx_mm"]) == TINY.target_spacing_zyx_mm
        assert image.shape == label.shape == tuple(row["resampled_shape"])
        scaled = scale_to_unit(image, *TINY.clip_hu)
        assert scaled.min() >= 0.0 and scaled.max() <= 1.0 and scaled.max() > 0.9
        values = set(np.unique(label).tolist())
        assert values <= {0, *ORGAN_IDS, TUMOR_ID}
        tumor = read_volume(row["label_path"]).array > 0
        organs = read_volume(row["organs_path"]).array
        assert (TUMOR_ID in values) == bool(tumor.any()), row["case_id"]
        # Volumes survive crop + nearest resampling: a liver to 10%; a ~200-voxel lesion on the tiny
        # preset's 21 mm^3 voxels to 30% (nearest on a coarse grid moves whole boundary layers).
        original_ml = np.prod(read_volume(row["image_path"]).spacing_zyx_mm) / 1000
        stored_ml = np.prod(TINY.target_spacing_zyx_mm) / 1000
        if tumor.any():
            assert (label == TUMOR_ID).sum() * stored_ml == pytest.approx(tumor.sum() * original_ml, rel=0.3)
        liver_not_tumor = (organs == 1) & ~tumor
        assert (label == 1).sum() * stored_ml == pytest.approx(liver_not_tumor.sum() * original_ml, rel=0.1)


def _write(array, path, spacing=(2.0, 2.0, 2.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_bad_cases_become_failed_rows_and_good_cases_complete(ray_local, small_cohort, tmp_path):
    raw = tmp_path / "raw"
    for sub in ("imagesTr", "labelsTr", "organsTr"):
        (raw / sub).mkdir(parents=True)
    for case in ("phantom_000", "phantom_001"):
        for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz"), ("organsTr", ".nii.gz")):
            shutil.copy(small_cohort / "raw" / sub / f"{case}{suffix}", raw / sub / f"{case}{suffix}")
    body = np.full((20, 30, 30), -1000, np.int16)
    body[4:16, 5:25, 5:25] = 80
    empty = np.zeros_like(body, dtype=np.uint8)
    # truncated .nii.gz
    _write(body, raw / "imagesTr" / "truncated_0000.nii.gz")
    data = (raw / "imagesTr" / "truncated_0000.nii.gz").read_bytes()
    (raw / "imagesTr" / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    # image and label of different shape / geometry
    _write(body, raw / "imagesTr" / "shape_0000.nii.gz")
    _write(empty[:10], raw / "labelsTr" / "shape.nii.gz")
    _write(body, raw / "imagesTr" / "geometry_0000.nii.gz")
    _write(empty, raw / "labelsTr" / "geometry.nii.gz", spacing=(1.0, 2.0, 2.0))
    # 2D and 4D images
    _write(body[0], raw / "imagesTr" / "flat_0000.nii.gz")
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(body)] * 2), str(raw / "imagesTr" / "four_0000.nii.gz"))
    # nothing above the crop threshold
    _write(np.full_like(body, -100), raw / "imagesTr" / "dark_0000.nii.gz")
    # NaN in a float image
    nan = body.astype(np.float32)
    nan[10, 10, 10] = np.nan
    _write(nan, raw / "imagesTr" / "nan_0000.nii.gz")
    # organ labels outside 0-13
    _write(body, raw / "imagesTr" / "badorgans_0000.nii.gz")
    _write(empty, raw / "labelsTr" / "badorgans.nii.gz")
    _write(np.full_like(empty, 20), raw / "organsTr" / "badorgans.nii.gz")
    # an organ file without an image, and a case id with a space
    _write(empty, raw / "organsTr" / "orphan.nii.gz")
    _write(body, raw / "imagesTr" / "bad id_0000.nii.gz")

    result = run_preprocessing(raw, tmp_path / "store.zarr", TINY, progress=False)
    rows = {r["case_id"]: r for r in result.rows}
    assert rows["phantom_000"]["status"] == rows["phantom_001"]["status"] == "ok"
    expected = {
        "truncated": "truncated", "shape": "shape", "geometry": "spacing", "flat": "3D", "four": "3D",
        "dark": "no voxel above", "nan": "NaN", "badorgans": "20", "orphan": "no orphan_0000 image",
        "bad id": "invalid",
    }
    for case_id, fragment in expected.items():
        row = rows[case_id]
        assert row["status"] == "failed", case_id
        assert case_id in row["error"] and fragment in row["error"], (case_id, row["error"])
    assert sorted(list_complete_cases(tmp_path / "store.zarr")) == ["phantom_000", "phantom_001"]
    assert result.num_failed == len(expected)


@pytest.mark.slow
def test_killed_job_resumes_and_every_case_reads_back_whole(small_cohort, tmp_path):
    """SIGKILL `panseg preprocess` part-way; the rerun completes only what is missing."""
    store = tmp_path / "store.zarr"
    cmd = [sys.executable, "-m", "panseg.cli", "preprocess", "--raw", str(small_cohort / "raw"), "--out", str(store),
           "--preset", "tiny", "--num-cpus", "1", "--quiet"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list_complete_cases(store) if store.exists() else []) < 2:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    # A Ray worker of the killed job can finish the case it is writing before it notices its raylet is
    # gone; that case is published whole (atomic rename) and counts as done. Wait until nothing changes.
    done_before, stable_since = set(list_complete_cases(store)), time.monotonic()
    while time.monotonic() - stable_since < 5:
        time.sleep(0.5)
        now = set(list_complete_cases(store))
        if now != done_before:
            done_before, stable_since = now, time.monotonic()
    assert 2 <= len(done_before) < 8, "the job finished before it could be killed: use a bigger cohort"
    assert not (store / "manifest.parquet").exists() or len(read_manifest(store)) < 8

    rerun = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"already complete before this run: {len(done_before)};" in rerun.stdout
    rows = read_manifest(store)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        image, label, attrs = read_case(store, row["case_id"])
        assert image.shape == label.shape == tuple(attrs["resampled_shape_zyx"])
        assert image.min() >= TINY.clip_hu[0] and image.max() <= TINY.clip_hu[1]
    assert not any((store / ".staging").glob("*")) if (store / ".staging").exists() else True
    assert json.loads(json.dumps(rows[0]["crop_box"])) == rows[0]["crop_box"]


def test_summary_names_the_cases_whose_crop_cuts_the_body():
    from panseg.data_pipeline import PreprocessResult

    rows = ({"case_id": "a", "status": "ok", "crop_body_lost_fraction": 0.23},
            {"case_id": "b", "status": "ok", "crop_body_lost_fraction": 0.04},
            {"case_id": "c", "status": "ok", "crop_body_lost_fraction": None})
    text = format_summary(PreprocessResult("s.zarr", rows, skipped=0, seconds=1.0, body_lost_warn_fraction=0.05))
    assert "more than 5% of the body in 1 case(s)" in text and "a (23.0%)" in text and "b (" not in text
    assert "of the body" not in format_summary(PreprocessResult("s.zarr", rows, 0, 1.0, body_lost_warn_fraction=0.3))
