"""preprocess_case end to end on tiny synthetic CTs written to disk, and its pure helpers."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from panseg.config import TUMOR_ID, PreprocessConfig
from panseg.io import CaseFiles, Volume, to_sitk, write_volume
from panseg.preprocessing.case import (Box, CaseError, class_locations, clip_hu, crop_volume, fuse_labels,
                                       geometry_from_attrs, preprocess_case, scale_to_unit)

SHAPE = (40, 60, 60)
SPACING = (2.5, 0.8, 0.8)
ORIGIN = (-20.0, 35.0, 110.0)
_a, _b = np.deg2rad(30.0), np.deg2rad(10.0)
DIRECTION = tuple((np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]])
                   @ np.array([[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]])).ravel())
CFG = PreprocessConfig(target_spacing_zyx_mm=(3.2, 1.6, 1.6), chunk_zyx=(16, 16, 16), max_locations_per_class=50)


def ellipsoid(center, radii) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), center, radii)) <= 1.0


def volume(array: np.ndarray) -> Volume:
    return Volume(array, SPACING, ORIGIN, DIRECTION)


def synthetic_case(tmp_path, case_id="case_001", label=True, organs=True, tissue_hu=60, table_hu=100) -> CaseFiles:
    """A body with a liver (1) and a spleen (3), a tumor in the liver, a table underneath."""
    rng = np.random.default_rng(0)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[ellipsoid((20, 25, 30), (18, 17, 24))] = tissue_hu
    liver, spleen = ellipsoid((20, 22, 22), (8, 7, 9)), ellipsoid((20, 24, 42), (5, 5, 5))
    hu[liver | spleen] = 120
    hu[:, 48:51, 4:56] = table_hu
    hu += rng.integers(-5, 6, size=SHAPE, dtype=np.int16)
    organ_map = np.zeros(SHAPE, dtype=np.uint8)
    organ_map[liver], organ_map[spleen] = 1, 3
    tumor = ellipsoid((20, 22, 22), (3, 3, 3)).astype(np.uint8)
    files = {"image": write_volume(volume(hu), tmp_path / "imagesTr" / f"{case_id}_0000.nii.gz")}
    if label:
        files["label"] = write_volume(volume(tumor), tmp_path / "labelsTr" / f"{case_id}.nii.gz")
    if organs:
        files["organs"] = write_volume(volume(organ_map), tmp_path / "organsTr" / f"{case_id}.nii.gz")
    return CaseFiles(case_id, **{k: str(v) for k, v in files.items()})


def test_preprocess_case_end_to_end(tmp_path):
    case = synthetic_case(tmp_path)
    out = preprocess_case(case, CFG)
    assert out.status == "ok" and out.case_id == "case_001"
    assert out.image.dtype == np.int16 and out.label.dtype == np.uint8 and out.image.shape == out.label.shape
    assert out.image.min() >= -160 and out.image.max() <= 240
    assert set(np.unique(out.label)) == {0, 1, 3, TUMOR_ID}
    attrs = json.loads(json.dumps(out.attrs))  # JSON-safe
    assert attrs["resampled_spacing_zyx_mm"] == list(CFG.target_spacing_zyx_mm)
    assert attrs["resampled_shape_zyx"] == list(out.image.shape)
    assert attrs["original_shape_zyx"] == list(SHAPE) and attrs["crop_reason"] == "largest_component"
    assert attrs["crop_box_zyx"] == [2, 8, 6, 39, 43, 55]  # the body, without the table at y 48-50
    assert attrs["class_counts"] == {str(c): int(np.sum(out.label == c)) for c in (0, 1, 3, TUMOR_ID)}
    assert attrs["image_path"] == case.image and attrs["organs_path"] == case.organs
    assert geometry_from_attrs(attrs, "resampled").shape_zyx == out.image.shape
    for class_id, coords in out.locations.items():
        assert len(coords) <= CFG.max_locations_per_class
        assert np.all(out.label[tuple(coords.T)] == class_id)


def test_tumor_stays_where_it_was_in_physical_space(tmp_path):
    out = preprocess_case(synthetic_case(tmp_path), CFG)
    image = sitk.Image([int(s) for s in reversed(out.image.shape)], sitk.sitkUInt8)
    image.SetSpacing(out.attrs["resampled_spacing_zyx_mm"][::-1])
    image.SetOrigin(out.attrs["resampled_origin_xyz_mm"])
    image.SetDirection(out.attrs["resampled_direction_xyz"])
    centre_zyx = np.argwhere(out.label == TUMOR_ID).mean(axis=0)
    original = to_sitk(volume(np.zeros(SHAPE, np.uint8)))
    found = original.TransformPhysicalPointToContinuousIndex(
        image.TransformContinuousIndexToPhysicalPoint(centre_zyx[::-1].tolist()))
    np.testing.assert_allclose(found[::-1], (20, 22, 22), atol=1.0)


def test_unlabelled_and_healthy_cases(tmp_path):
    unlabelled = preprocess_case(synthetic_case(tmp_path, "nolabel", label=False), CFG)
    assert unlabelled.status == "unlabelled" and unlabelled.label is None and unlabelled.locations == {}
    assert unlabelled.attrs["class_counts"] == {} and unlabelled.attrs["organs_path"] == str(
        tmp_path / "organsTr" / "nolabel.nii.gz")
    healthy = synthetic_case(tmp_path, "healthy")
    write_volume(volume(np.zeros(SHAPE, np.uint8)), healthy.label)
    out = preprocess_case(healthy, CFG)
    assert out.status == "ok" and TUMOR_ID not in out.locations and set(out.locations) == {1, 3}


def test_crop_volume_origin_is_the_physical_point_of_its_first_voxel():
    vol = volume(np.zeros(SHAPE, np.int16))
    box = Box((3, 7, 11), (20, 30, 40))
    cropped = crop_volume(vol, box)
    expected = to_sitk(vol).TransformIndexToPhysicalPoint([11, 7, 3])
    np.testing.assert_allclose(cropped.origin_xyz_mm, expected, atol=1e-9)
    assert cropped.array.shape == box.shape_zyx and cropped.direction_xyz == DIRECTION


def test_fuse_labels():
    organs = np.zeros((4, 5, 6), np.uint8)
    organs[1:3, 1:4, 1:5] = 2
    organs[0, 0, 0] = 13
    tumor = np.zeros((4, 5, 6), np.int16)
    tumor[2, 2, 2:4] = 1
    tumor[0, 0, 0] = 7  # any value > 0 is tumor, written over the organs
    fused = fuse_labels(tumor, organs, "tumor")
    assert fused.dtype == np.uint8
    np.testing.assert_array_equal(fused == TUMOR_ID, tumor > 0)
    np.testing.assert_array_equal(fused[tumor == 0], organs[tumor == 0])
    assert set(np.unique(fuse_labels(tumor, None, "tumor"))) == {0, TUMOR_ID}
    np.testing.assert_array_equal(fuse_labels(organs, None, "organs"), organs)
    with pytest.raises(ValueError, match="organ label values must be integers in 0-13, but it holds 20, 255"):
        fuse_labels(tumor, np.where(organs == 2, 20, organs).astype(np.int16) + (organs == 13) * 242, "tumor")
    with pytest.raises(ValueError, match="tumor label .* holds -1"):
        fuse_labels(tumor - 8 * (tumor > 5), organs, "tumor")
    with pytest.raises(ValueError, match="tumor label .* holds 0.5"):
        fuse_labels(tumor.astype(np.float32) * 0.5, organs, "tumor")
    with pytest.raises(ValueError, match="organ label values"):
        fuse_labels(tumor * 3, None, "organs")


def test_clip_and_scale():
    hu = np.array([[[-1000.0, -160.4, 0.6, 239.6, 3000.0]]], dtype=np.float32)
    clipped = clip_hu(hu, -160.0, 240.0)
    assert clipped.dtype == np.int16 and clipped.tolist() == [[[-160, -160, 1, 240, 240]]]
    scaled = scale_to_unit(clipped, -160.0, 240.0)
    assert scaled.dtype == np.float32 and scaled.min() == 0.0 and scaled.max() == 1.0
    np.testing.assert_allclose(scaled, (clipped + 160) / 400.0, atol=1e-7)


def test_class_locations_are_inside_their_class_and_seeded():
    labels = np.zeros((30, 40, 50), np.uint8)
    labels[2:20, 5:30, 10:40] = 1
    labels[10:12, 10:12, 10:12] = 14  # 8 voxels: all kept
    first = class_locations(labels, 100, seed=3)
    assert set(first) == {1, 14} and first[1].shape == (100, 3) and first[14].shape == (8, 3)
    assert first[1].dtype == np.int32 and len(np.unique(first[1], axis=0)) == 100
    assert np.all(labels[tuple(first[1].T)] == 1) and np.all(labels[tuple(first[14].T)] == 14)
    np.testing.assert_array_equal(first[1], class_locations(labels, 100, seed=3)[1])
    assert not np.array_equal(first[1], class_locations(labels, 100, seed=4)[1])
    assert class_locations(np.zeros((3, 3, 3), np.uint8), 10, 0) == {}


def test_case_error_is_picklable_and_named():
    err = pickle.loads(pickle.dumps(CaseError("c7", "broken")))
    assert isinstance(err, ValueError) and err.case_id == "c7" and str(err) == "case c7: broken"


# ----------------------------------------------------------------------------------------------
# Bad inputs: each raises CaseError naming the case
# ----------------------------------------------------------------------------------------------


def _truncate(case: CaseFiles, tmp_path) -> CaseFiles:
    data = open(case.image, "rb").read()
    open(case.image, "wb").write(data[: len(data) // 2])
    return case


def _write_raw(array: np.ndarray, path: str) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), path)


def _overwrite(field: str, array: np.ndarray, spacing=SPACING, origin=ORIGIN):
    def spoil(case: CaseFiles, tmp_path) -> CaseFiles:
        write_volume(Volume(array, spacing, origin, DIRECTION), getattr(case, field))
        return case
    return spoil


def _raw_image(array: np.ndarray):
    def spoil(case: CaseFiles, tmp_path) -> CaseFiles:
        _write_raw(array, case.image)
        return case
    return spoil


def _nan_image(case: CaseFiles, tmp_path) -> CaseFiles:
    # NIfTI read through ITK turns NaN into 0, MetaImage keeps it
    hu = np.where(ellipsoid((5, 5, 5), (2, 2, 2)), np.nan, 60.0).astype(np.float32)
    return replace(case, image=str(write_volume(volume(hu), tmp_path / "nan_0000.mha")))


BAD_INPUTS = {  # problem: (spoil the case's files, expected message)
    "truncated image": (_truncate, "image: .* could not be read"),
    "label shape": (_overwrite("label", np.zeros((40, 50, 60), np.uint8)), r"label .* shape \(40, 50, 60\).*image"),
    "label geometry": (_overwrite("label", np.zeros(SHAPE, np.uint8), origin=(0.0, 0.0, 0.0)),
                       "label .* origin .*share one voxel grid"),
    "organ spacing": (_overwrite("organs", np.zeros(SHAPE, np.uint8), spacing=(2.0, 0.8, 0.8)),
                      "organs .* spacing .*share one voxel grid"),
    "organ values": (_overwrite("organs", np.full(SHAPE, 20, np.uint8)),
                     "organ label values must be integers in 0-13, but it holds 20"),
    "tumor values": (_overwrite("label", np.full(SHAPE, -3, np.int16)),
                     "tumor label values must be integers >= 0, but it holds -3"),
    "2D image": (_raw_image(np.zeros((60, 60), np.int16)), "image: .* 3D .* 2 dimensions"),
    "4D image": (_raw_image(np.zeros((2, 4, 5, 6), np.int16)), "image: .* 3D .* 4 dimensions"),
    "no bright voxel": (_overwrite("image", np.full(SHAPE, 20, np.int16)), "no voxel above 50 HU"),
    "NaN": (_nan_image, "holds 33 NaN or infinite voxels"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_inputs_raise_case_error_naming_the_case(tmp_path, problem):
    spoil, message = BAD_INPUTS[problem]
    case = spoil(synthetic_case(tmp_path, case_id="bad_case"), tmp_path)
    with pytest.raises(CaseError, match=message) as info:
        preprocess_case(case, CFG)
    assert info.value.case_id == "bad_case" and str(info.value).startswith("case bad_case: ")


def test_invalid_ids_and_discovery_errors_raise_case_error(tmp_path):
    with pytest.raises(CaseError, match="invalid"):
        preprocess_case(CaseFiles("bad/id", str(tmp_path / "x.nii.gz")), CFG)
    with pytest.raises(CaseError, match="has no image"):
        preprocess_case(CaseFiles("orphan", None, label=str(tmp_path / "x.nii.gz")), CFG)


def test_a_crop_that_cuts_the_body_is_recorded_and_warned_about(tmp_path):
    from panseg.preprocessing.case import BodyLossWarning
    from panseg.store.zarr_store import case_manifest_row

    case = synthetic_case(tmp_path, tissue_hu=40, table_hu=40)  # below 50 HU: the paper's box is the liver's
    paper = replace(CFG, min_body_fraction=0.01)  # a guard the liver's box passes
    with pytest.warns(BodyLossWarning, match=r"case case_001: the crop leaves out \d+\.\d% of the body"):
        out = preprocess_case(case, paper)
    assert out.attrs["crop_reason"] == "grown_to_labels"  # grown to the spleen; the body is still cut
    lost = out.attrs["crop_body_lost_fraction"]
    assert 0.5 < lost < 1.0
    assert case_manifest_row(out)["crop_body_lost_fraction"] == lost
    quiet = replace(paper, body_lost_warn_fraction=0.99)
    body = replace(CFG, crop_method="body")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", BodyLossWarning)
        preprocess_case(case, quiet)
        whole = preprocess_case(case, body)
    assert whole.attrs["crop_reason"] == "body" and whole.attrs["crop_body_lost_fraction"] == 0.0
    assert whole.attrs["crop_box_zyx"] == [2, 8, 6, 39, 43, 55]  # the body, without the table at y 48-50
