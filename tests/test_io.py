"""io: every format keeps spacing, origin and direction; cohort discovery records per-case problems."""

import locale

import numpy as np
import pytest
import SimpleITK as sitk

from panseg.io import (
    ImageReadError,
    Volume,
    discover_cohort,
    read_geometry,
    read_volume,
    validate_case_id,
    write_volume,
)

# A rotation about z by 30 degrees combined with a flipped y axis: orthonormal, not the identity.
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = (float(_C), float(_S), 0.0, float(_S), float(-_C), 0.0, 0.0, 0.0, 1.0)


def _volume(seed=0, dtype=np.int16):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=(7, 11, 13)).astype(dtype)
    return Volume(array, spacing_zyx_mm=(2.5, 0.7, 0.8), origin_xyz_mm=(-120.5, 33.25, 410.0),
                  direction_xyz=DIRECTION)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_read_keeps_voxels_and_geometry(tmp_path, suffix):
    volume = _volume()
    path = write_volume(volume, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == np.int16
    np.testing.assert_allclose(back.spacing_zyx_mm, volume.spacing_zyx_mm, rtol=1e-6)
    np.testing.assert_allclose(back.origin_xyz_mm, volume.origin_xyz_mm, atol=1e-4)
    np.testing.assert_allclose(back.direction_xyz, volume.direction_xyz, atol=1e-5)
    assert read_geometry(path).matches(volume.geometry)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left behind


def test_dicom_series_folder_reads_as_one_volume(tmp_path):
    volume = _volume(dtype=np.int16)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin(volume.origin_xyz_mm)
    series = tmp_path / "series"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer sets the process locale to "C"
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in [("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0013", str(z)),
                           ("0020|0032", "\\".join(f"{p:.4f}" for p in position)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", "2.5"),
                           ("0028|1053", "1"), ("0028|1052", "0")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved_locale)  # or every later test's text I/O is ASCII
    back = read_volume(series)
    assert locale.setlocale(locale.LC_ALL) == saved_locale  # reading DICOM leaves the locale alone
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing_zyx_mm, (2.5, 0.7, 0.8), rtol=1e-4)
    np.testing.assert_allclose(back.origin_xyz_mm, volume.origin_xyz_mm, atol=1e-3)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    # ITK alone fills a truncated NIfTI with zeros; io must refuse it like the other formats.
    path = write_volume(_volume(), tmp_path / f"ct{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="could not be read"):
        read_volume(path)


def test_2d_and_4d_images_are_rejected(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ImageReadError, match="3D single-channel"):
        read_volume(tmp_path / "flat.nii.gz")
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))] * 2)
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    with pytest.raises(ImageReadError, match="3D single-channel"):
        read_volume(tmp_path / "four.nii.gz")


@pytest.mark.parametrize("bad", ["a/b", "a b", "..", "", "x\\y", "tümor"])
def test_invalid_case_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="invalid"):
        validate_case_id(bad)


def test_discovery_pairs_files_and_records_problems(tmp_path):
    vol = _volume()
    write_volume(vol, tmp_path / "imagesTr" / "case_a_0000.nii.gz")
    write_volume(vol, tmp_path / "imagesTr" / "case.b_0000.mha")
    write_volume(vol, tmp_path / "imagesTr" / "bad id_0000.nii.gz")
    write_volume(vol, tmp_path / "labelsTr" / "case_a.nii.gz")
    write_volume(vol, tmp_path / "organsTr" / "case_a.nii.gz")
    write_volume(vol, tmp_path / "organsTr" / "orphan.nii.gz")
    (tmp_path / "imagesTr" / "notes.txt").write_text("not an image")
    (tmp_path / "imagesTr" / ".tmp-123-case_c_0000.nii.gz").write_text("half written")

    cohort = discover_cohort(tmp_path)
    by_id = {c.case_id: c for c in cohort.cases}
    assert sorted(by_id) == ["bad id", "case.b", "case_a", "orphan"]
    assert by_id["case_a"].label.endswith("labelsTr/case_a.nii.gz") and by_id["case_a"].organs is not None
    assert by_id["case.b"].label is None and by_id["case.b"].error is None
    assert "invalid" in by_id["bad id"].error
    assert "orphan" in by_id["orphan"].error and "no orphan_0000 image" in by_id["orphan"].error
    assert {c.case_id for c in cohort.valid} == {"case_a", "case.b"}


def test_discovery_without_images_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        discover_cohort(tmp_path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_voxels_are_refused(tmp_path, suffix):
    # ITK's NIfTI reader alone turns NaN into 0; io reads the file's bytes to catch it.
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    if suffix == ".nrrd":  # other formats keep NaN; the preprocessing check catches it there
        assert np.isnan(read_volume(path).array).sum() == 1
        return
    with pytest.raises(ImageReadError, match="1 voxel\\(s\\) are NaN"):
        read_volume(path)


def test_finite_float_nifti_reads(tmp_path):
    array = np.linspace(-1000, 1000, 120, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    np.testing.assert_array_equal(read_volume(path).array, array)
