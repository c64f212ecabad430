"""An nnU-Net v2 model's own preprocessing and export, for one CT (no Ray).

Preprocessing, in nnU-Net's order (DefaultPreprocessor.run_case_npy):
1. the (z, y, x) array as float32, axes permuted by the plan's `transpose_forward`;
2. crop to the bounding box of the nonzero voxels;
3. normalise with the plan's scheme: CTNormalization (clip to the foreground's 0.5 and 99.5
   percentiles, minus its mean, over its std), ZScoreNormalization (the crop's mean and std, or only
   inside the nonzero mask with `use_mask_for_norm`, leaving the outside at 0), NoNormalization or
   RescaleTo01Normalization;
4. resample to the plan's spacing with the plan's data orders (`nnunet_resample.resample`).

Export, in nnU-Net's order (export_prediction.py): the network's logits are resampled back to the
cropped shape with the plan's probability orders, argmax, pasted into zeros of the transposed original
shape at the crop box, and permuted back with `transpose_backward`. nnU-Net resamples logits, not
softmax probabilities, before the argmax, and so does panseg: the masks are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

from panseg.inference.nnunet_model import NnunetModelError, NnunetPlan
from panseg.inference.nnunet_resample import new_shape_for, resample
from panseg.io import Geometry

_EPS = 1e-8  # nnU-Net's eps for float32 targets


@dataclass(frozen=True)
class NnunetPrepared:
    """A CT preprocessed for an nnU-Net model, and what export needs to undo it.

    Attributes:
        data: float32 (C, D, H, W) on the plan's spacing, transposed axes.
        bbox: the nonzero crop, [[start, stop]] per transposed axis.
        shape_before_cropping: the transposed original shape.
        shape_after_cropping: the transposed shape of the crop.
        spacing: the transposed original spacing, mm.
        original: the CT's grid (its mask is written on it).
        seconds: time per phase ('crop', 'normalize', 'resample').
    """

    data: np.ndarray
    bbox: tuple[tuple[int, int], ...]
    shape_before_cropping: tuple[int, ...]
    shape_after_cropping: tuple[int, ...]
    spacing: tuple[float, ...]
    original: Geometry
    seconds: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict:
        """Everything but the data, JSON-safe (for Ray and the CSV)."""
        o = self.original
        return {"bbox": [list(b) for b in self.bbox], "shape_before_cropping": list(self.shape_before_cropping),
                "shape_after_cropping": list(self.shape_after_cropping), "spacing": list(self.spacing),
                "original": {"shape_zyx": list(o.shape_zyx), "spacing_zyx_mm": list(o.spacing_zyx_mm),
                             "origin_xyz_mm": list(o.origin_xyz_mm), "direction_xyz": list(o.direction_xyz)},
                "seconds": dict(self.seconds)}

    @classmethod
    def from_metadata(cls, data: np.ndarray, meta: dict) -> NnunetPrepared:
        o = meta["original"]
        geometry = Geometry(tuple(o["shape_zyx"]), tuple(o["spacing_zyx_mm"]), tuple(o["origin_xyz_mm"]),
                            tuple(o["direction_xyz"]))
        return cls(data, tuple(tuple(b) for b in meta["bbox"]), tuple(meta["shape_before_cropping"]),
                   tuple(meta["shape_after_cropping"]), tuple(meta["spacing"]), geometry, dict(meta["seconds"]))


def nonzero_bbox(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """The half-open box of voxels nonzero in any channel of (C, D, H, W); the whole array when none is."""
    mask = (data != 0).any(axis=0)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[axis]))
    return tuple(box)


def normalize(data: np.ndarray, plan: NnunetPlan) -> np.ndarray:
    """Each channel of (C, D, H, W) float32 normalised in place by the plan's scheme (see the module docstring).

    Raises:
        NnunetModelError: a scheme panseg does not implement, or CT normalisation without intensity properties.
    """
    for c, scheme in enumerate(plan.normalization_schemes):
        channel = data[c]
        if scheme == "CTNormalization":
            props = plan.intensity_properties[c]
            if not {"mean", "std", "percentile_00_5", "percentile_99_5"} <= set(props):
                raise NnunetModelError(f"plans.json has no foreground intensity properties for channel {c}, which "
                                       "CTNormalization needs")
            np.clip(channel, props["percentile_00_5"], props["percentile_99_5"], out=channel)
            channel -= props["mean"]
            channel /= max(props["std"], _EPS)
        elif scheme == "ZScoreNormalization":
            _zscore(channel, data if plan.use_mask_for_norm[c] else None)
        elif scheme == "RescaleTo01Normalization":
            channel -= channel.min()
            channel /= max(channel.max(), _EPS)
        elif scheme != "NoNormalization":
            raise NnunetModelError(f"normalisation {scheme} (channel {c}) is not implemented in panseg; it runs "
                                   "CTNormalization, ZScoreNormalization, RescaleTo01Normalization, NoNormalization")
    return data


def _zscore(channel: np.ndarray, all_channels: np.ndarray | None) -> None:
    if all_channels is None:
        mean, std = channel.mean(), channel.std()
        channel -= mean
        channel /= max(std, _EPS)
        return
    mask = binary_fill_holes((all_channels != 0).any(axis=0))  # nnU-Net's nonzero mask (seg >= 0)
    values = channel[mask]
    channel[mask] = (values - values.mean()) / max(values.std(), _EPS)


def preprocess(array_zyx: np.ndarray, geometry: Geometry, plan: NnunetPlan, threads: int = 1) -> NnunetPrepared:
    """A CT (one channel, (z, y, x)) preprocessed as nnU-Net preprocesses it for this plan.

    Raises:
        NnunetModelError: the model needs more than one input channel.
        ValueError: the array is not 3D or holds NaN/inf.
    """
    if plan.num_channels != 1:
        raise NnunetModelError(f"the model takes {plan.num_channels} input channels; panseg predicts one CT per case")
    if array_zyx.ndim != 3:
        raise ValueError(f"a CT must be a 3D array, but it has shape {array_zyx.shape}")
    t0 = time.perf_counter()
    data = array_zyx.astype(np.float32)[None].transpose(0, *(1 + a for a in plan.transpose_forward))
    if not np.isfinite(data).all():
        raise ValueError("the CT holds NaN or infinite voxels; a CT must be finite everywhere")
    spacing = tuple(float(geometry.spacing_zyx_mm[a]) for a in plan.transpose_forward)
    shape_before = tuple(data.shape[1:])
    bbox = nonzero_bbox(data)
    data = np.ascontiguousarray(data[(slice(None),) + tuple(slice(a, b) for a, b in bbox)])
    t1 = time.perf_counter()
    normalize(data, plan)
    t2 = time.perf_counter()
    new_shape = new_shape_for(data.shape[1:], spacing, plan.spacing)
    r = plan.data_resampling
    data = resample(data, new_shape, spacing, plan.spacing, r.order, r.order_z, r.force_separate_z, threads).numpy()
    t3 = time.perf_counter()
    return NnunetPrepared(data, bbox, shape_before, tuple(b - a for a, b in bbox), spacing, geometry,
                          {"crop": t1 - t0, "normalize": t2 - t1, "resample": t3 - t2})


def export_labels(logits: torch.Tensor, prepared: NnunetPrepared, plan: NnunetPlan, threads: int = 1) -> np.ndarray:
    """The label map in the CT's own (z, y, x) array order from (K, D, H, W) logits on the plan's grid.

    Returns:
        uint8 (z, y, x): class ids 0..K-1 inside the crop box, 0 outside (the argmax is kept class by class,
        ties to the lower class as argmax, so only one resampled class and the running maximum are in memory).
    """
    r = plan.probabilities_resampling
    best, labels = None, None
    for k in range(logits.shape[0]):  # one class at a time: two full-size arrays, never K of them
        back = resample(logits[k:k + 1].float().cpu(), prepared.shape_after_cropping, plan.spacing, prepared.spacing,
                        r.order, r.order_z, r.force_separate_z, threads)[0]  # (*shape_after_cropping)
        back = back.to(logits.dtype)  # nnU-Net stores the resampled logits in their own dtype before the argmax
        if best is None:
            best, labels = back, torch.zeros(back.shape, dtype=torch.uint8)
        else:
            higher = back > best  # strictly: ties keep the lower class, as argmax does
            best = torch.where(higher, back, best)
            labels.masked_fill_(higher, k)
        del back
    labels = labels.numpy()
    del best
    full = np.zeros(prepared.shape_before_cropping, dtype=np.uint8)
    full[tuple(slice(a, b) for a, b in prepared.bbox)] = labels
    return np.ascontiguousarray(full.transpose(plan.transpose_backward))


__all__ = ["NnunetPrepared", "export_labels", "nonzero_bbox", "normalize", "preprocess"]
