"""The separable resampler against SimpleITK, and the geometry of resampled grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from panseg.io import Geometry, Volume, to_sitk
from panseg.preprocessing.resample import _resample_sitk, resample_to_geometry, resample_volume, resampled_geometry


def rotation_xyz(angle_z_deg: float = 30.0, angle_x_deg: float = 10.0) -> tuple[float, ...]:
    a, b = np.deg2rad(angle_z_deg), np.deg2rad(angle_x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


DIRECTION = rotation_xyz()


def random_volume(shape=(17, 23, 29), dtype=np.float32, seed=0) -> Volume:
    array = np.random.default_rng(seed).normal(0, 300, size=shape).astype(dtype)
    return Volume(array, (2.5, 0.8, 0.9), (10.0, -20.0, 30.0), DIRECTION)


def physical_corners(geometry: Geometry) -> np.ndarray:
    """Physical positions of the first and the last voxel centre."""
    image = sitk.Image([int(s) for s in reversed(geometry.shape_zyx)], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in reversed(geometry.spacing_zyx_mm)])
    image.SetOrigin(geometry.origin_xyz_mm)
    image.SetDirection(geometry.direction_xyz)
    last = [int(s) - 1 for s in reversed(geometry.shape_zyx)]
    return np.array([image.TransformIndexToPhysicalPoint([0, 0, 0]), image.TransformIndexToPhysicalPoint(last)])


@pytest.mark.parametrize("interpolation", ["bspline", "linear", "nearest"])
# spacings with no output centre exactly half-way between two input voxels, where nearest has ties
@pytest.mark.parametrize("spacing", [(1.6, 1.2859, 1.2859), (1.7, 0.77, 1.13), (5.3, 0.37, 2.9)])
def test_separable_resampling_equals_simpleitk(interpolation, spacing):
    volume = random_volume()
    ours = resample_volume(volume, spacing, interpolation)
    reference = _resample_sitk(volume, resampled_geometry(volume.geometry, spacing), interpolation, 1, 0.0)
    assert ours.geometry.matches(reference.geometry)
    np.testing.assert_allclose(ours.array, reference.array, rtol=0, atol=1e-3)  # values up to ~1200


def test_integer_input_and_constant_image():
    volume = random_volume(dtype=np.int16)
    as_float = Volume(volume.array.astype(np.float32), volume.spacing_zyx_mm, volume.origin_xyz_mm, DIRECTION)
    np.testing.assert_allclose(resample_volume(volume, (1.6, 1.3, 1.3)).array,
                               resample_volume(as_float, (1.6, 1.3, 1.3)).array, atol=1e-3)
    constant = Volume(np.full((9, 11, 13), 42, dtype=np.int16), (2.5, 0.8, 0.8))
    for interpolation in ("bspline", "linear"):
        out = resample_volume(constant, (1.1, 1.7, 0.5), interpolation).array
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, 42.0, atol=1e-3)  # the weights sum to 1 up to the edges


def test_resampled_grid_has_the_target_spacing_and_the_same_extent():
    volume = random_volume(shape=(30, 41, 37))
    target = (1.6, 1.2859, 1.2859)
    grid = resampled_geometry(volume.geometry, target)
    assert grid.spacing_zyx_mm == target
    assert grid.shape_zyx == (47, 26, 26)  # round(n * spacing / target): 46.875, 25.5 -> 26, 25.9
    assert grid.direction_xyz == volume.direction_xyz
    n_mm = np.array(volume.geometry.shape_zyx) * np.array(volume.spacing_zyx_mm)
    m_mm = np.array(grid.shape_zyx) * np.array(target)
    assert np.all(np.abs(n_mm - m_mm) <= np.array(target) / 2 + 1e-9)  # extent kept within half a voxel
    old, new = physical_corners(volume.geometry), physical_corners(grid)
    np.testing.assert_allclose(old.mean(axis=0), new.mean(axis=0), atol=1e-6)  # same centre
    assert resample_volume(volume, target).geometry.matches(grid)


def test_tiny_axis_keeps_at_least_one_voxel():
    volume = Volume(np.ones((1, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0))
    out = resample_volume(volume, (5.0, 2.0, 2.0))
    assert out.array.shape == (1, 2, 2)
    np.testing.assert_allclose(out.array, 1.0, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
def test_resample_to_geometry_partly_outside_uses_the_default_value(interpolation):
    volume = random_volume(shape=(12, 14, 16))
    shifted = Geometry((15, 12, 20), (2.0, 1.13, 0.7),  # no centre exactly half-way: nearest has no ties
                       tuple(np.add(volume.origin_xyz_mm, np.array(DIRECTION).reshape(3, 3) @ [-3.0, 4.1, 6.3])),
                       DIRECTION)
    ours = resample_to_geometry(volume, shifted, interpolation, default_value=-7.0)
    reference = _resample_sitk(volume, shifted, interpolation, 1, -7.0)
    assert (ours.array == -7.0).any()
    np.testing.assert_allclose(ours.array, reference.array, atol=1e-3)


def test_resample_to_another_direction_goes_through_simpleitk():
    volume = random_volume(shape=(10, 12, 14))
    target = Geometry((10, 12, 14), (2.0, 1.0, 1.0), volume.origin_xyz_mm, rotation_xyz(50.0, 0.0))
    out = resample_to_geometry(volume, target, "linear")
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(to_sitk(Volume(np.zeros((10, 12, 14), np.float32), (2.0, 1.0, 1.0),
                                               volume.origin_xyz_mm, rotation_xyz(50.0, 0.0))))
    resampler.SetInterpolator(sitk.sitkLinear)
    expected = sitk.GetArrayFromImage(resampler.Execute(to_sitk(volume)))
    np.testing.assert_allclose(out.array, expected, atol=1e-3)


def test_label_round_trip_to_the_original_grid():
    labels = np.zeros((20, 30, 30), dtype=np.uint8)
    labels[5:15, 8:22, 10:20] = 3
    labels[8:12, 12:16, 12:16] = 14
    volume = Volume(labels, (2.5, 0.8, 0.8), (1.0, 2.0, 3.0), DIRECTION)
    coarse = resample_volume(volume, (1.6, 1.2859, 1.2859), "nearest")
    assert coarse.array.dtype == np.uint8 and set(np.unique(coarse.array)) == {0, 3, 14}
    back = resample_to_geometry(coarse, volume.geometry, "nearest")
    assert back.array.shape == labels.shape
    assert np.mean(back.array == labels) > 0.97
    smooth = resample_volume(volume, (1.6, 1.2859, 1.2859), "label_gaussian")
    assert smooth.array.dtype == np.uint8 and set(np.unique(smooth.array)) <= {0, 3, 14}


def test_unknown_interpolation_is_an_error():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resample_volume(random_volume(), (1.0, 1.0, 1.0), "cubic")
