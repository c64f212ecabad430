"""The ISA-L read of .nii.gz gives exactly SimpleITK's volume, or hands the file to SimpleITK; the ISA-L write
gives exactly the NIfTI ITK writes."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from panseg.io import ImageReadError, Volume, _read_nifti_gz, from_sitk, read_notes, read_volume, to_sitk, write_volume

_a = np.deg2rad(25.0)
ROTATED = (np.cos(_a), -np.sin(_a), 0.0, np.sin(_a), np.cos(_a), 0.0, 0.0, 0.0, -1.0)


def assert_same_as_simpleitk(path, fast: Volume) -> None:
    reference = from_sitk(sitk.ReadImage(str(path)))
    assert fast.array.dtype == reference.array.dtype and fast.array.shape == reference.array.shape
    np.testing.assert_array_equal(fast.array, reference.array)
    assert fast.spacing_zyx_mm == reference.spacing_zyx_mm
    assert fast.origin_xyz_mm == reference.origin_xyz_mm
    assert fast.direction_xyz == reference.direction_xyz
    assert fast.array.flags.writeable and fast.array.dtype.isnative


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_fast_read_equals_simpleitk_for_every_pixel_type(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 100, size=(7, 9, 11)) if np.dtype(dtype).kind == "f"
             else rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(7, 9, 11), endpoint=True)).astype(dtype)
    path = write_volume(Volume(array, (2.5, 0.7, 0.9), (-10.5, 20.25, 300.0), ROTATED), tmp_path / "ct.nii.gz")
    fast = _read_nifti_gz(path)
    assert fast is not None  # the fast path took it
    assert_same_as_simpleitk(path, fast)
    assert_same_as_simpleitk(path, read_volume(path))


def _edit_header(path, out, **fields) -> None:
    """Rewrite NIfTI-1 header fields of a .nii.gz: name -> (offset, struct format, value)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    for offset, fmt, value in fields.values():
        struct.pack_into("<" + fmt, data, offset, *value)
    out.write_bytes(gzip.compress(bytes(data)))


def test_qform_and_sform_are_read_as_itk_reads_them(tmp_path):
    path = write_volume(Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), (3.0, 0.8, 0.8),
                               (1.0, 2.0, 3.0), ROTATED), tmp_path / "ct.nii.gz")
    sform = (0.0, 0.8, 0.0, 5.0, -0.8, 0.0, 0.0, 6.0, 0.0, 0.0, 3.0, 7.0)  # another rotation than the qform's
    cases = {
        "sform_only": dict(q=(252, "h", (0,)), s=(254, "h", (1,)), rows=(280, "12f", sform)),
        "both_differ": dict(q=(252, "h", (1,)), s=(254, "h", (2,)), rows=(280, "12f", sform)),
        "neither": dict(q=(252, "h", (0,)), s=(254, "h", (0,))),
    }
    for name, fields in cases.items():
        out = tmp_path / f"{name}.nii.gz"
        _edit_header(path, out, **fields)
        fast = read_volume(out)
        assert_same_as_simpleitk(out, fast)


def test_scaled_and_multi_member_files(tmp_path):
    path = write_volume(Volume(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), (2.0, 1.0, 1.0)),
                        tmp_path / "ct.nii.gz")
    scaled = tmp_path / "scaled.nii.gz"
    _edit_header(path, scaled, slope=(112, "2f", (2.0, -1024.0)))
    assert _read_nifti_gz(scaled) is None  # ITK rescales to float: SimpleITK reads it
    assert_same_as_simpleitk(scaled, read_volume(scaled))
    raw = gzip.decompress(path.read_bytes())
    two = tmp_path / "two_members.nii.gz"
    two.write_bytes(gzip.compress(raw[:400]) + gzip.compress(raw[400:]))
    assert _read_nifti_gz(two) is not None
    assert_same_as_simpleitk(two, read_volume(two))


def test_truncated_and_nan_files_are_clear_errors(tmp_path):
    path = write_volume(Volume(np.zeros((5, 6, 7), np.float32), (1.0, 1.0, 1.0)), tmp_path / "ct.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(bytes(raw[:-40])))
    with pytest.raises(ImageReadError, match=r"cut.nii.gz could not be read: truncated NIfTI: 1152 of 1192 bytes"):
        read_volume(cut)
    struct.pack_into("<f", raw, 352 + 4 * 17, float("nan"))
    nan = tmp_path / "nan.nii.gz"
    nan.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ImageReadError, match="nan.nii.gz could not be read: 1 voxel.s. are NaN"):
        read_volume(nan)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ImageReadError, match="broken.nii.gz could not be read"):
        read_volume(broken)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_written_nii_gz_inflates_to_the_nifti_itk_writes(tmp_path, dtype):
    rng = np.random.default_rng(1)
    volume = Volume((rng.normal(0, 50, size=(6, 10, 12))).astype(dtype), (2.5, 0.7, 0.9), (-10.5, 20.25, 300.0), ROTATED)
    path = write_volume(volume, tmp_path / "out" / "mask.nii.gz", notes="panseg model 0123abcd")
    image = to_sitk(volume)
    image.SetMetaData("ITK_FileNotes", "panseg model 0123abcd")
    sitk.WriteImage(image, str(tmp_path / "itk.nii"), False)
    assert gzip.decompress(path.read_bytes()) == (tmp_path / "itk.nii").read_bytes()  # header and voxels
    assert read_notes(path) == "panseg model 0123abcd"
    assert_same_as_simpleitk(path, read_volume(path))
    assert [p.name for p in path.parent.iterdir()] == ["mask.nii.gz"]  # no temporary left beside it
