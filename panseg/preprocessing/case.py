"""Preprocessing of one case: read, validate, crop, resample, clip, fuse labels, sample class locations.

Pure functions (no Ray). The order follows the paper and its released code: the crop is decided on
the original grid (raw HU), the crop is resampled to the target spacing (image cubic, label nearest),
then clipped to cfg.clip_hu and stored as int16 HU; scaling to [0, 1] happens on read
(`scale_to_unit`). The crop lives in `panseg.preprocessing.crop`, the resamplers in
`panseg.preprocessing.resample`; both are re-exported here.

Every problem with a case raises `CaseError`, which names the case, so a pipeline can record it and go on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from panseg import __version__
from panseg.config import ORGAN_IDS, TUMOR_ID, PreprocessConfig
from panseg.io import CaseFiles, Geometry, ImageReadError, Volume, read_volume, validate_case_id
from panseg.preprocessing.crop import (Box, CropDecision, above_threshold, body_bbox, body_loss_warning, choose_crop,
                                       grow_to_labels, largest_component_bbox, mask_bbox, threshold_bbox)
from panseg.preprocessing.resample import resample_to_geometry, resample_volume, resampled_geometry

_SLAB = 16  # z-slices per chunk of element-wise work: bounds temporaries to a few MB

__all__ = [
    "BodyLossWarning", "Box", "CaseError", "CropDecision", "PreprocessedCase", "above_threshold", "body_bbox",
    "body_loss_warning", "choose_crop", "class_locations",
    "clip_hu", "crop_volume", "fuse_labels", "geometry_from_attrs", "grow_to_labels", "largest_component_bbox",
    "mask_bbox", "preprocess_case", "resample_to_geometry", "resample_volume", "resampled_geometry", "scale_to_unit",
    "threshold_bbox", "warn_body_loss",
]


class CaseError(ValueError):
    """One case cannot be preprocessed; `case_id` names it and the message says why."""

    def __init__(self, case_id: str, problem: str) -> None:
        super().__init__(f"case {case_id}: {problem}")
        self.case_id = case_id
        self.problem = problem

    def __reduce__(self):  # picklable through Ray with both fields
        return (type(self), (self.case_id, self.problem))


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case, ready for `store.write_case`.

    Attributes:
        case_id: the case id.
        status: 'ok' (labelled; an all-zero label is a healthy labelled case) or 'unlabelled' (no
            label file: the image is stored, the case is not trained on).
        image: int16 HU after resampling and clipping, (z, y, x).
        label: uint8 fused labels on the image's grid, or None when unlabelled.
        locations: class id -> int32 (n, 3) voxel coordinates sampled from that class.
        attrs: JSON-safe provenance (see `_case_attrs`).
    """

    case_id: str
    status: str
    image: np.ndarray
    label: np.ndarray | None
    locations: dict[int, np.ndarray]
    attrs: dict[str, Any]


def crop_volume(volume: Volume, box: Box) -> Volume:
    """The part of a volume inside `box` (a view), with the origin at the physical point of its first voxel."""
    direction = np.asarray(volume.direction_xyz, dtype=np.float64).reshape(3, 3)
    offset_xyz_mm = (np.asarray(box.start_zyx, dtype=np.float64) * np.asarray(volume.spacing_zyx_mm))[::-1]
    origin = np.asarray(volume.origin_xyz_mm, dtype=np.float64) + direction @ offset_xyz_mm
    return Volume(volume.array[box.slices], volume.spacing_zyx_mm, tuple(float(o) for o in origin),
                  volume.direction_xyz)


def clip_hu(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] HU and round to int16 (z-slab by slab, so no full-size float temporary)."""
    out = np.empty(array.shape, dtype=np.int16)
    for z0 in range(0, array.shape[0], _SLAB):
        slab = np.clip(array[z0:z0 + _SLAB], low, high)
        out[z0:z0 + _SLAB] = np.rint(slab) if np.issubdtype(slab.dtype, np.floating) else slab
    return out


def scale_to_unit(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map stored int16 HU to float32 in [0, 1]: low -> 0, high -> 1 (values outside are clipped)."""
    out = array.astype(np.float32)
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def fuse_labels(tumor: np.ndarray, organs: np.ndarray | None, task: str) -> np.ndarray:
    """Fuse the label files of a case into one uint8 map.

    Args:
        tumor: labelsTr content. Task 'tumor': any value > 0 is tumor. Task 'organs': organ ids 0-13.
        organs: organ pseudo-labels 0-13 (task 'tumor' only), or None.
        task: 'tumor' (organs 1-13, tumor 14 written over them; without organs ids are 0/14) or
            'organs' (labels returned as they are).

    Returns:
        uint8 labels.

    Raises:
        ValueError: organ values outside 0-13 (named), tumor values negative or not integers, a task
            that is neither.
    """
    if task == "organs":
        _check_label_values(tumor, "organ label", max(ORGAN_IDS))
        return tumor.astype(np.uint8)
    if task != "tumor":
        raise ValueError(f"task must be 'tumor' or 'organs', but it is {task!r}")
    _check_label_values(tumor, "tumor label", None)
    if organs is None:
        fused = np.zeros(tumor.shape, dtype=np.uint8)
    else:
        _check_label_values(organs, "organ label", max(ORGAN_IDS))
        fused = organs.astype(np.uint8)
    for z0 in range(0, tumor.shape[0], _SLAB):
        fused[z0:z0 + _SLAB][tumor[z0:z0 + _SLAB] > 0] = TUMOR_ID
    return fused


def _check_label_values(array: np.ndarray, what: str, max_value: int | None) -> None:
    """Raise ValueError unless every value is an integer in [0, max_value] (None: no upper bound)."""
    if array.dtype == bool:
        return
    bad: set[float] = set()
    for z0 in range(0, array.shape[0], _SLAB):
        slab = array[z0:z0 + _SLAB]
        wrong = slab < 0
        if max_value is not None:
            wrong |= slab > max_value
        if np.issubdtype(slab.dtype, np.floating):
            wrong |= slab != np.floor(slab)  # also NaN
        if wrong.any():
            bad.update(np.unique(slab[wrong])[:10].tolist())
    if bad:
        expected = "integers >= 0" if max_value is None else f"integers in 0-{max_value}"
        shown = ", ".join(f"{v:g}" for v in sorted(bad, key=lambda v: (v != v, v))[:10])
        raise ValueError(f"{what} values must be {expected}, but it holds {shown}")


def class_locations(labels: np.ndarray, max_per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Up to `max_per_class` voxel coordinates per present non-background class, uniformly sampled.

    Args:
        labels: integer label map (z, y, x).
        max_per_class: most coordinates kept per class (all when the class is smaller).
        seed: sampling seed; class c draws from default_rng((seed, c)), so classes are independent.

    Returns:
        class id -> int32 (n, 3) (z, y, x) coordinates in raster order.
    """
    return _label_statistics(labels, max_per_class, seed)[0]


def _label_statistics(labels: np.ndarray, max_per_class: int,
                      seed: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Locations and voxel counts per class in one pass over the foreground.

    The foreground's flat indices are grouped by class with one stable radix argsort of their uint8
    values (raster order is kept within each class), then sampled without replacement.
    """
    flat = labels.reshape(-1)
    foreground = np.flatnonzero(flat)
    values = flat[foreground]
    counts = np.bincount(values, minlength=1) if values.size else np.zeros(1, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    locations: dict[int, np.ndarray] = {}
    for class_id in np.flatnonzero(counts):
        segment = order[starts[class_id]:starts[class_id + 1]]
        if segment.size > max_per_class:
            rng = np.random.default_rng((int(seed), int(class_id)))
            segment = segment[np.sort(rng.choice(segment.size, size=max_per_class, replace=False))]
        coords = np.unravel_index(foreground[segment], labels.shape)
        locations[int(class_id)] = np.stack(coords, axis=1).astype(np.int32)
    class_counts = {0: int(labels.size - foreground.size)}
    class_counts.update({int(c): int(counts[c]) for c in np.flatnonzero(counts) if c != 0})
    return locations, class_counts


def geometry_from_attrs(attrs: dict[str, Any], which: str = "original") -> Geometry:
    """The 'original' or 'resampled' grid of a stored case, rebuilt from its attrs."""
    return Geometry(tuple(attrs[f"{which}_shape_zyx"]), tuple(attrs[f"{which}_spacing_zyx_mm"]),
                    tuple(attrs[f"{which}_origin_xyz_mm"]), tuple(attrs[f"{which}_direction_xyz"]))


# ----------------------------------------------------------------------------------------------
# One case end to end
# ----------------------------------------------------------------------------------------------


def preprocess_case(case: CaseFiles, cfg: PreprocessConfig, threads: int = 1) -> PreprocessedCase:
    """Read, validate, crop, resample, clip and label one case.

    Args:
        case: the case's files (label None: unlabelled; organs used by task 'tumor' only).
        cfg: preprocessing config.
        threads: SimpleITK threads for reading and for SimpleITK resampling.

    Returns:
        The PreprocessedCase; status 'unlabelled' when the case has no label file.

    Raises:
        CaseError: an invalid id, an unreadable, non-3D or non-finite image, labels on another grid or
            with invalid values, no voxel above the crop threshold.
    """
    try:
        validate_case_id(case.case_id)
    except ValueError as err:
        raise CaseError(case.case_id, str(err)) from None
    if case.error is not None or case.image is None:
        raise CaseError(case.case_id, case.error or "it has no image file")
    image = _read_image(case, threads)
    try:
        decision = choose_crop(image.array, None, cfg)  # labels are read after: a lower peak memory
        warn_body_loss(case.case_id, decision.body_lost_fraction, cfg.body_lost_warn_fraction)
        labels = _read_labels(case, cfg.task, image.geometry, threads)
        decision = grow_to_labels(decision, labels, cfg)
    except CaseError:
        raise
    except ValueError as err:  # the crop found no voxel above the threshold
        raise CaseError(case.case_id, str(err)) from None
    image_hu, label, grid = _crop_and_resample(image, labels, decision.box, cfg, threads)
    locations, class_counts = ({}, {}) if label is None else _label_statistics(label, cfg.max_locations_per_class,
                                                                                cfg.seed)
    status = "ok" if label is not None else "unlabelled"
    attrs = _case_attrs(case, cfg, status, image.geometry, str(image.array.dtype), decision, grid, class_counts)
    return PreprocessedCase(case.case_id, status, image_hu, label, locations, attrs)


class BodyLossWarning(UserWarning):
    """A crop leaves out more of the body than preprocess.body_lost_warn_fraction (the message names the case)."""


def warn_body_loss(case_id: str, lost: float | None, limit: float) -> None:
    """Warn (BodyLossWarning) when the crop of `case_id` leaves out more than `limit` of the body."""
    message = body_loss_warning(case_id, lost, limit)
    if message is not None:
        warnings.warn(message, BodyLossWarning, stacklevel=2)


def _crop_and_resample(image: Volume, labels: np.ndarray | None, box: Box, cfg: PreprocessConfig,
                       threads: int) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Crop, resample and clip the image (int16 HU) and resample the labels (uint8) onto the same grid."""
    resampled = resample_volume(crop_volume(image, box), cfg.target_spacing_zyx_mm, cfg.image_interpolation,
                                threads)
    image_hu = clip_hu(resampled.array, *cfg.clip_hu)
    grid = resampled.geometry
    del resampled
    label = None
    if labels is not None:
        label_volume = crop_volume(image.with_array(labels), box)
        label = resample_volume(label_volume, cfg.target_spacing_zyx_mm, cfg.label_interpolation, threads).array
    return image_hu, label, grid


def _read_image(case: CaseFiles, threads: int) -> Volume:
    """Read the CT and check that it is finite."""
    image = _read(case.case_id, "image", case.image, threads)
    if np.issubdtype(image.array.dtype, np.floating):
        bad = sum(int(np.count_nonzero(~np.isfinite(image.array[z0:z0 + _SLAB])))
                  for z0 in range(0, image.array.shape[0], _SLAB))
        if bad:
            raise CaseError(case.case_id, f"image {case.image} holds {bad} NaN or infinite voxels; "
                                          "a CT must be finite HU everywhere")
    return image


def _read_labels(case: CaseFiles, task: str, grid: Geometry, threads: int) -> np.ndarray | None:
    """The fused uint8 labels of a case on the image's grid, or None when it has no label file.

    Organ pseudo-labels are read for task 'tumor' only, and only next to a label file.
    """
    if not case.label:
        return None
    tumor = _read(case.case_id, "label", case.label, threads)
    _check_grid(case, "label", case.label, tumor.geometry, grid)
    organs = None
    if case.organs and task == "tumor":
        organs = _read(case.case_id, "organs", case.organs, threads)
        _check_grid(case, "organs", case.organs, organs.geometry, grid)
    try:
        return fuse_labels(tumor.array, None if organs is None else organs.array, task)
    except ValueError as err:
        files = f"label {case.label}" + (f", organs {case.organs}" if organs is not None else "")
        raise CaseError(case.case_id, f"{err} ({files})") from None


def _check_grid(case: CaseFiles, name: str, path: str, found: Geometry, grid: Geometry) -> None:
    if not found.matches(grid):
        raise CaseError(case.case_id, f"{name} {path} has {found.describe()}, but image {case.image} has "
                                      f"{grid.describe()}; they must share one voxel grid")


def _read(case_id: str, what: str, path: str, threads: int) -> Volume:
    try:
        return read_volume(path, threads=threads)
    except ImageReadError as err:
        raise CaseError(case_id, f"{what}: {err}") from None


def _case_attrs(case: CaseFiles, cfg: PreprocessConfig, status: str, original: Geometry, original_dtype: str,
                decision: CropDecision, resampled: Geometry, class_counts: dict[int, int]) -> dict[str, Any]:
    """The JSON-safe provenance of a case (geometry key names match `geometry_from_attrs`)."""
    def box(b: Box | None) -> list[int] | None:
        return None if b is None else b.to_list()

    def floats(values) -> list[float]:
        return [float(v) for v in values]

    return {
        "case_id": case.case_id, "task": cfg.task, "status": status, "panseg_version": __version__,
        "image_path": case.image, "label_path": case.label,
        "organs_path": case.organs if cfg.task == "tumor" else None,
        "original_shape_zyx": [int(v) for v in original.shape_zyx],
        "original_spacing_zyx_mm": floats(original.spacing_zyx_mm),
        "original_origin_xyz_mm": floats(original.origin_xyz_mm),
        "original_direction_xyz": floats(original.direction_xyz), "original_dtype": original_dtype,
        "crop_box_zyx": box(decision.box), "crop_reason": decision.reason,
        "crop_component_box_zyx": box(decision.component_box), "crop_body_box_zyx": box(decision.body_box),
        "crop_label_box_zyx": box(decision.label_box), "crop_body_fraction": decision.body_fraction,
        "crop_body_lost_fraction": decision.body_lost_fraction,
        "resampled_shape_zyx": [int(v) for v in resampled.shape_zyx],
        "resampled_spacing_zyx_mm": floats(resampled.spacing_zyx_mm),
        "resampled_origin_xyz_mm": floats(resampled.origin_xyz_mm),
        "resampled_direction_xyz": floats(resampled.direction_xyz),
        "clip_hu": floats(cfg.clip_hu),
        "class_counts": {str(k): int(v) for k, v in sorted(class_counts.items())},
    }
