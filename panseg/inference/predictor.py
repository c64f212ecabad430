"""Whole-case prediction: a CT in its own grid in, a tumor mask in the same grid out.

The steps follow the paper and its released code, with the training preprocessing of the checkpoint's
config (`cfg.preprocess`):

1. `prepare_volume`: decide the crop on the original grid (largest component of HU > threshold, with
   the body-fallback guard; labels are never used at inference, so the box is not grown), crop,
   resample to the target spacing with the training image interpolation, clip to int16 HU.
2. `predict_array`: scale to [0, 1] on the device, Gaussian-weighted sliding windows (or any other
   `LogitsFn`, e.g. an oracle in tests), argmax into uint8 slab by slab, keep the tumor (class 14) as 1
   or, with `infer.all_labels`, every class.
3. `restore_labels`: resample the label map back onto the cropped original grid (nearest neighbour)
   and paste it into a zero volume of the original shape at the crop box, with the CT's spacing,
   origin and direction.

`Predictor` ties them together around a model loaded once (`load_predictor`); `predict_case` adds
file I/O and per-case costs. Folder prediction with Ray lives in `panseg.infer`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from panseg.config import TUMOR_ID, InferConfig, PansegConfig, PreprocessConfig
from panseg.inference.resource_monitor import CaseUsage
from panseg.inference.sliding_window import sliding_window_logits
from panseg.io import Geometry, ImageReadError, Volume, read_volume, strip_image_suffix, write_volume
from panseg.preprocessing.case import (CaseError, clip_hu, crop_volume, resample_to_geometry, resample_volume,
                                       warn_body_loss)
from panseg.preprocessing.crop import Box, CropDecision, choose_crop
from panseg.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_file
from panseg.training.parts import make_model, num_classes_of

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (1, 1, D, H, W) in [0, 1] -> (K, D, H, W) logits
_ARGMAX_SLAB = 16  # z-slices per argmax: bounds the int64 temporary to a few MB

# ----------------------------------------------------------------------------------------------
# Data passed between the steps
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCase:
    """A CT cropped and resampled for the network, and the geometry to undo it.

    Attributes:
        image_hu: int16 HU clipped to cfg.clip_hu on the resampled grid, (z, y, x).
        box: the crop in original voxels.
        crop_reason: 'largest_component', 'threshold_bbox', 'body_fallback', 'none', or
            'no_component' (nothing above the threshold: the whole image is used).
        original: the CT's grid.
        cropped: the grid of the crop (a sub-grid of `original`).
        resampled: the grid of `image_hu`.
        seconds: time per phase ('crop', 'resample', 'clip').
        body_lost_fraction: share of the body's voxels outside `box` (`CropDecision.body_lost_fraction`).
    """

    image_hu: np.ndarray
    box: Box
    crop_reason: str
    original: Geometry
    cropped: Geometry
    resampled: Geometry
    seconds: dict[str, float] = field(default_factory=dict)
    body_lost_fraction: float | None = None

    def metadata(self) -> dict:
        """Everything but the image, as plain JSON-safe values (for Ray and the CSV)."""
        return {"box": self.box.to_list(), "crop_reason": self.crop_reason,
                "original": _geometry_to_dict(self.original), "cropped": _geometry_to_dict(self.cropped),
                "resampled": _geometry_to_dict(self.resampled), "seconds": dict(self.seconds),
                "body_lost_fraction": self.body_lost_fraction}

    @classmethod
    def from_metadata(cls, image_hu: np.ndarray, meta: dict) -> PreparedCase:
        """The inverse of `metadata`, around the image."""
        return cls(image_hu, Box.from_list(meta["box"]), meta["crop_reason"], _geometry_from_dict(meta["original"]),
                   _geometry_from_dict(meta["cropped"]), _geometry_from_dict(meta["resampled"]),
                   dict(meta["seconds"]), meta.get("body_lost_fraction"))


@dataclass(frozen=True)
class Prediction:
    """A predicted mask in the CT's grid, with where it came from.

    Attributes:
        volume: uint8 mask (0/1 tumor, or class ids with all_labels) with the CT's geometry.
        box: the crop in original voxels; the mask is 0 outside it.
        crop_reason: see `PreparedCase.crop_reason`.
        resampled_shape_zyx: the network's grid.
        seconds: time per phase ('crop', 'resample', 'clip', 'network', 'restore').
        body_lost_fraction: see `PreparedCase.body_lost_fraction`.
    """

    volume: Volume
    box: Box
    crop_reason: str
    resampled_shape_zyx: tuple[int, int, int]
    seconds: dict[str, float]
    body_lost_fraction: float | None = None


def _geometry_to_dict(g: Geometry) -> dict:
    return {"shape_zyx": [int(v) for v in g.shape_zyx], "spacing_zyx_mm": [float(v) for v in g.spacing_zyx_mm],
            "origin_xyz_mm": [float(v) for v in g.origin_xyz_mm], "direction_xyz": [float(v) for v in g.direction_xyz]}


def _geometry_from_dict(d: dict) -> Geometry:
    return Geometry(tuple(d["shape_zyx"]), tuple(d["spacing_zyx_mm"]), tuple(d["origin_xyz_mm"]),
                    tuple(d["direction_xyz"]))


# ----------------------------------------------------------------------------------------------
# The three steps (pure)
# ----------------------------------------------------------------------------------------------


def inference_crop(hu: np.ndarray, cfg: PreprocessConfig) -> CropDecision:
    """The crop of a CT at inference (never grown to labels).

    A CT with no voxel above the crop threshold is predicted whole (reason 'no_component') rather than refused.
    """
    try:
        return choose_crop(hu, None, cfg)
    except ValueError:
        return CropDecision(Box.full(hu.shape), "no_component", body_lost_fraction=0.0)


def prepare_volume(volume: Volume, cfg: PreprocessConfig, threads: int = 1) -> PreparedCase:
    """Crop, resample and clip a CT as training preprocessing did (see the module docstring).

    Raises:
        ValueError: the array is not 3D or holds NaN/inf.
    """
    if volume.array.ndim != 3:
        raise ValueError(f"a CT must be a 3D array, but it has shape {volume.array.shape}")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        raise ValueError("the CT holds NaN or infinite voxels; a CT must be finite HU everywhere")
    t0 = time.perf_counter()
    decision = inference_crop(volume.array, cfg)
    box = decision.box
    cropped = crop_volume(volume, box)
    t1 = time.perf_counter()
    resampled = resample_volume(cropped, cfg.target_spacing_zyx_mm, cfg.image_interpolation, threads)
    t2 = time.perf_counter()
    image_hu = clip_hu(resampled.array, *cfg.clip_hu)
    t3 = time.perf_counter()
    return PreparedCase(image_hu, box, decision.reason, volume.geometry, cropped.geometry, resampled.geometry,
                        {"crop": t1 - t0, "resample": t2 - t1, "clip": t3 - t2}, decision.body_lost_fraction)


def predict_array(image_hu: np.ndarray, logits_fn: LogitsFn, clip_hu_range: tuple[float, float],
                  device: torch.device | str = "cpu", keep_all_labels: bool = False) -> np.ndarray:
    """The label map of a preprocessed image: scale, logits, argmax, class selection.

    Args:
        image_hu: int16 (or any real) HU clipped to `clip_hu_range`, (z, y, x).
        logits_fn: (1, 1, D, H, W) float32 in [0, 1] on `device` -> (K, D, H, W) logits on `device`.
        clip_hu_range: (low, high) HU mapped to 0 and 1, as training's `scale_to_unit`.
        device: where the image goes and the argmax runs.
        keep_all_labels: keep every class id; else tumor (class 14) -> 1 and everything else -> 0.

    Returns:
        uint8 (z, y, x) on the host.
    """
    low, high = clip_hu_range
    if not image_hu.flags.writeable:  # e.g. zero-copy from Ray's object store; torch wants writable memory
        image_hu = image_hu.copy()
    image = torch.from_numpy(np.ascontiguousarray(image_hu)).to(device).float()  # (D, H, W)
    image.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)
    logits = logits_fn(image[None, None])  # (K, D, H, W)
    del image
    labels = argmax_uint8(logits)
    del logits
    if not keep_all_labels:
        labels = labels.eq_(TUMOR_ID)  # in place: uint8 0/1
    return labels.cpu().numpy()


def argmax_uint8(logits: torch.Tensor, slab: int = _ARGMAX_SLAB) -> torch.Tensor:
    """argmax over classes of (K, D, H, W) logits as uint8 (D, H, W), a z-slab at a time."""
    if logits.shape[0] > 256:
        raise ValueError(f"uint8 labels hold at most 256 classes, but the logits have {logits.shape[0]}")
    out = torch.empty(logits.shape[1:], dtype=torch.uint8, device=logits.device)
    for z0 in range(0, logits.shape[1], slab):
        out[z0:z0 + slab] = logits[:, z0:z0 + slab].argmax(0)
    return out


def restore_labels(labels: np.ndarray, prepared: PreparedCase, threads: int = 1) -> Volume:
    """A label map on the resampled grid put back into the CT's grid (zeros outside the crop box).

    Raises:
        ValueError: `labels` is not on `prepared.resampled`'s shape.
    """
    if tuple(labels.shape) != tuple(prepared.resampled.shape_zyx):
        raise ValueError(f"labels must have the resampled shape {tuple(prepared.resampled.shape_zyx)}, "
                         f"but they have {labels.shape}")
    r = prepared.resampled
    small = Volume(labels, r.spacing_zyx_mm, r.origin_xyz_mm, r.direction_xyz)
    back = resample_to_geometry(small, prepared.cropped, "nearest", threads).array
    o = prepared.original
    full = np.zeros(o.shape_zyx, dtype=np.uint8)
    full[prepared.box.slices] = back
    return Volume(full, o.spacing_zyx_mm, o.origin_xyz_mm, o.direction_xyz)


# ----------------------------------------------------------------------------------------------
# The network as a LogitsFn
# ----------------------------------------------------------------------------------------------


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an `infer.precision` on a device; None runs fp32.

    'auto' is bf16 on CUDA and fp32 elsewhere (CPUs without bf16 units run bf16 slower than fp32).
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def compile_network(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` through torch.compile (Inductor) for inference; it compiles at its first call.

    On the CPU, a channels-last copy with Inductor's freezing (the weights become constants that oneDNN
    prepacks): a window of the paper network took 0.71x of eager's time on this project's 2-core VM,
    where either alone gave 0.91x or less. On GPU as measured there, without either: bf16 windows 2.2x
    faster than eager on an H200 (bench/gpu.py). Frozen weights are those of now: `model` must not be
    trained further through the compiled network.
    """
    if device.type == "cpu":
        channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
        return torch.compile(channels_last, dynamic=False, options={"freezing": True})
    return torch.compile(model, dynamic=False)


class NetworkLogits:
    """A network applied by Gaussian-weighted sliding windows: a `LogitsFn`.

    With `infer.compile` the windows go through `compile_network(model)`, compiled at the first call,
    and every pass holds `infer.windows_per_batch` windows so that it compiles once.
    """

    def __init__(self, model: torch.nn.Module, window_zyx: tuple[int, int, int], num_classes: int,
                 infer: InferConfig, device: torch.device) -> None:
        self.model = model
        self.network = compile_network(model, device) if infer.compile else model
        self.window_zyx = tuple(window_zyx)
        self.num_classes = num_classes
        self.infer = infer
        self.autocast_dtype = autocast_dtype(infer.precision, device)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        icfg = self.infer
        return sliding_window_logits(self.network, image, self.window_zyx, self.num_classes, icfg.step_fraction,
                                     icfg.gaussian_sigma_scale, icfg.windows_per_batch,
                                     autocast_dtype=self.autocast_dtype,
                                     mirror_axes=(0, 1, 2) if icfg.mirror_tta else (), fixed_batch=icfg.compile)


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


class Predictor:
    """Predicts whole CTs with one config and one `LogitsFn` (a loaded network, or an oracle in tests).

    Args:
        cfg: the checkpoint's config; preprocess and infer sections are used.
        logits_fn: see `LogitsFn`.
        device: where scaling, the network and the argmax run.
        threads: threads for resampling.
    """

    def __init__(self, cfg: PansegConfig, logits_fn: LogitsFn, device: torch.device | str = "cpu",
                 threads: int = 1) -> None:
        self.cfg = cfg
        self.logits_fn = logits_fn
        self.device = torch.device(device)
        self.threads = threads

    @property
    def keep_all_labels(self) -> bool:
        """Every class is written with infer.all_labels, and always for the organ task (it has no tumor)."""
        return self.cfg.infer.all_labels or self.cfg.preprocess.task == "organs"

    def with_config(self, cfg: PansegConfig) -> Predictor:
        """The same network with other preprocess/infer settings (model and patch must not change)."""
        logits_fn = self.logits_fn
        if isinstance(logits_fn, NetworkLogits):
            logits_fn = NetworkLogits(logits_fn.model, logits_fn.window_zyx, logits_fn.num_classes, cfg.infer,
                                      self.device)
        return Predictor(cfg, logits_fn, self.device, self.threads)

    def prepare(self, volume: Volume) -> PreparedCase:
        """Step 1 (host only; runs in a separate Ray stage in folder prediction)."""
        return prepare_volume(volume, self.cfg.preprocess, self.threads)

    def predict_prepared(self, prepared: PreparedCase) -> Prediction:
        """Steps 2 and 3 on a prepared case."""
        t0 = time.perf_counter()
        labels = predict_array(prepared.image_hu, self.logits_fn, self.cfg.preprocess.clip_hu, self.device,
                               self.keep_all_labels)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the cached blocks back between cases (the FLARE area counts them)
        t1 = time.perf_counter()
        volume = restore_labels(labels, prepared, self.threads)
        t2 = time.perf_counter()
        seconds = {**prepared.seconds, "network": t1 - t0, "restore": t2 - t1}
        return Prediction(volume, prepared.box, prepared.crop_reason, tuple(prepared.resampled.shape_zyx), seconds,
                          prepared.body_lost_fraction)

    def predict_volume(self, volume: Volume) -> Prediction:
        """A CT in, its mask in the CT's grid out (see the module docstring)."""
        return self.predict_prepared(self.prepare(volume))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_predictor(path: str | Path, device: torch.device | str | None = None, infer: InferConfig | None = None,
                   threads: int = 1) -> Predictor:
    """Load a panseg checkpoint (file, checkpoint directory or run directory) into a Predictor.

    Args:
        path: checkpoint location (see `checkpoint.resolve_checkpoint_file`).
        device: None picks CUDA when available, else CPU.
        infer: inference settings replacing the checkpoint's (window step, TTA, precision, all_labels).
        threads: threads for resampling.

    Raises:
        CheckpointError: not a panseg checkpoint, or weights that do not fit the network its config describes.
    """
    device = torch.device(device) if device is not None else default_device()
    state = load_checkpoint(path, map_location="cpu")  # weights_only=True: never unpickles objects
    cfg = state.cfg if infer is None else replace(state.cfg, infer=infer)
    model = make_model(cfg)
    try:
        model.load_state_dict(state.model)
    except RuntimeError as err:
        raise CheckpointError(f"{resolve_checkpoint_file(path)}: its model weights do not fit the network its "
                              f"config describes: {str(err).splitlines()[0][:300]}") from None
    del state
    model.deep_supervision = False  # only the full-resolution head runs
    model.requires_grad_(False)
    model.to(device).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one window shape: pick the fastest kernels once
    logits_fn = NetworkLogits(model, cfg.train.patch_size_zyx, num_classes_of(cfg), cfg.infer, device)
    return Predictor(cfg, logits_fn, device, threads)


# ----------------------------------------------------------------------------------------------
# One case on disk
# ----------------------------------------------------------------------------------------------


def case_id_of(image_path: str | Path) -> str:
    """'<case>_0000.nii.gz' -> '<case>' (the channel suffix is optional)."""
    name = Path(image_path).name
    stem = strip_image_suffix(name) or name
    return stem[:-5] if stem.endswith("_0000") else stem


def predict_case(predictor: Predictor, image_path: str | Path, output_path: str | Path,
                 case_id: str | None = None) -> dict:
    """Read a CT, predict it, write the mask atomically, and report what it cost.

    Returns:
        A row: case_id, status 'ok', output, seconds (wall, read to write), seconds per phase,
        peak_rss_mb, gpu_peak_mb and gpu_area_mb_s (None on CPU), crop box and reason, shapes.

    Raises:
        CaseError: naming the case, when the image cannot be read or predicted (not 3D, NaN, ...).
    """
    case_id = case_id or case_id_of(image_path)
    with CaseUsage(predictor.device) as usage:
        t0 = time.perf_counter()
        try:
            volume = read_volume(image_path, threads=predictor.threads)
            t1 = time.perf_counter()
            prediction = predictor.predict_volume(volume)
            warn_body_loss(case_id, prediction.body_lost_fraction, predictor.cfg.preprocess.body_lost_warn_fraction)
        except (ImageReadError, ValueError) as err:
            raise CaseError(case_id, str(err)) from None
        t2 = time.perf_counter()
        write_volume(prediction.volume, output_path)
        t3 = time.perf_counter()
    seconds = {"read": t1 - t0, **prediction.seconds, "write": t3 - t2}
    return prediction_row(case_id, str(output_path), prediction, seconds, usage.report.as_row())


def prediction_row(case_id: str, output: str, prediction: Prediction, seconds: dict[str, float],
                   usage: dict) -> dict:
    """The per-case row of predictions.csv."""
    row = {"case_id": case_id, "status": "ok", "error": None, "output": output, **usage}
    row.update({f"{phase}_s": round(value, 3) for phase, value in seconds.items()})
    lost = prediction.body_lost_fraction
    row.update({"crop_box_zyx": prediction.box.to_list(), "crop_reason": prediction.crop_reason,
                "crop_body_lost_fraction": None if lost is None else round(lost, 4),
                "original_shape_zyx": list(prediction.volume.array.shape),
                "resampled_shape_zyx": list(prediction.resampled_shape_zyx)})
    return row


__all__ = [
    "LogitsFn", "NetworkLogits", "PreparedCase", "Prediction", "Predictor", "argmax_uint8", "autocast_dtype",
    "case_id_of", "compile_network", "default_device", "inference_crop", "load_predictor", "predict_array",
    "predict_case", "prediction_row", "prepare_volume", "restore_labels",
]
