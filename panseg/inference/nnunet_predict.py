"""Predicting a CT with an nnU-Net v2 model as nnU-Net's `nnUNetPredictor` does (no Ray).

With the model's own preprocessing and export (`nnunet_preprocess`), the windows follow nnU-Net's
predictor defaults: the plan's patch, tile step 0.5 (`infer.step_fraction`), nnU-Net's rule for window
starts (`nnunet_window_starts`) and its Gaussian importance map (`nnunet_gaussian`: a delta at
`patch // 2` blurred by scipy with sigma = patch / 8, so on even patches it peaks one voxel past the
middle, unlike panseg's own map), mirroring over the checkpoint's allowed axes when
`infer.mirror_tta` (panseg's default for these models, as nnU-Net's CLI), and zero padding up to the
patch. Folds are averaged as nnU-Net averages them: the mean of their (mirror-averaged, Gaussian-
weighted) logits, one network per fold.

Like nnU-Net, the weighted window logits are summed in float16, and the fold average too: where
only the far corners of windows reach a voxel (the volume's corners), nnU-Net's float16 Gaussian is
floored at its smallest value and the float16 sums round those voxels' logits coarsely; a float32 sum
gave other labels there (0.5% of the voxels of a small phantom). What differs without changing a
mask: panseg runs `infer.windows_per_batch` windows per pass where nnU-Net runs one (an
instance-normalised network computes each window on its own either way).
"""

from __future__ import annotations

import copy
import re
import time
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from panseg.config import InferConfig
from panseg.inference.nnunet_model import NnunetModel, NnunetModelError
from panseg.inference.nnunet_preprocess import NnunetPrepared, export_labels, preprocess
from panseg.inference.predictor import Prediction, autocast_dtype, compile_network
from panseg.inference.sliding_window import sliding_window_logits
from panseg.io import Volume
from panseg.preprocessing.crop import Box

LESION_NAME = re.compile(r"tumou?r|lesion|cancer|metasta", re.IGNORECASE)
NNUNET_INFER = InferConfig(step_fraction=0.5, gaussian_sigma_scale=0.125, mirror_tta=True)  # nnU-Net's defaults


@lru_cache(maxsize=4)
def _gaussian_numpy(patch: tuple[int, ...]) -> np.ndarray:
    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(delta, [p / 8 for p in patch], 0, mode="constant", cval=0)
    # nnU-Net scales the map to a maximum of 10 and stores it in float16, where its far corners underflow to 0
    # and are then raised to the smallest nonzero value. Those floors decide how windows that all cover a voxel
    # near their corners are mixed, so panseg keeps them: in float32 the corner weights differ by orders of
    # magnitude and masks at window edges would differ from nnU-Net's.
    weights = (weights / weights.max() * 10).astype(np.float16)
    weights[weights == 0] = weights[weights > 0].min()  # never 0: a voxel covered only there would divide by 0
    return weights.astype(np.float32)


def nnunet_gaussian(patch: Sequence[int]) -> torch.Tensor:
    """nnU-Net's importance map of a patch (`compute_gaussian`: sigma 1/8, max 10, float16 values), float32 (d, h, w)."""
    return torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch)))


def nnunet_window_starts(size: int, window: int, step_fraction: float = 0.5) -> list[int]:
    """nnU-Net's `compute_steps_for_sliding_window` on one axis (size >= window)."""
    steps = int(np.ceil((size - window) / (window * step_fraction))) + 1
    actual = (size - window) / (steps - 1) if steps > 1 else 0.0
    return [int(np.round(actual * i)) for i in range(steps)]


def lesion_labels(labels: dict[str, int]) -> tuple[int, ...]:
    """The label ids written as 1 without `--all-labels`: those named tumor/lesion/cancer/metastasis, or
    the only foreground label of a one-class model.

    Raises:
        NnunetModelError: no label is a lesion by name and there are several, naming them.
    """
    named = tuple(sorted(v for k, v in labels.items() if v != 0 and LESION_NAME.search(k)))
    if named:
        return named
    foreground = [v for v in labels.values() if v != 0]
    if len(foreground) == 1:
        return tuple(foreground)
    raise NnunetModelError(f"the model's labels are {labels}: none is named tumor or lesion, so panseg cannot tell "
                           "which to write as the lesion mask; pass --all-labels (infer.all_labels=true) to write "
                           "the model's whole label map")


class NnunetPredictor:
    """An nnU-Net model with panseg's `Predictor` interface (`prepare`, `predict_prepared`, `device`).

    Args:
        model: see `nnunet_model.load_nnunet_model`.
        infer: step, mirroring, windows per pass, precision ('auto': fp16 autocast on CUDA as nnU-Net,
            fp32 on the CPU), compile, all_labels; the Gaussian is always nnU-Net's.
        device: where the networks run.
        threads: torch threads for resampling.
    """

    def __init__(self, model: NnunetModel, infer: InferConfig = NNUNET_INFER, device: torch.device | str = "cpu",
                 threads: int = 1) -> None:
        self.model, self.infer, self.device, self.threads = model, infer, torch.device(device), threads
        self.keep = None if infer.all_labels else lesion_labels(model.plan.labels)
        self.networks = []
        for weights in model.fold_weights:
            network = copy.deepcopy(model.network)
            network.load_state_dict(weights)
            network = network.to(self.device).eval()
            self.networks.append(compile_network(network, self.device) if infer.compile else network)
        if infer.precision == "auto":
            self.autocast = torch.float16 if self.device.type == "cuda" else None
        else:
            self.autocast = autocast_dtype(infer.precision, self.device)

    def prepare(self, volume: Volume) -> NnunetPrepared:
        """The host-side preprocessing (a separate Ray stage in folder prediction)."""
        return preprocess(volume.array, volume.geometry, self.model.plan, self.threads)

    def logits(self, data: np.ndarray) -> torch.Tensor:
        """Fold-averaged float16 logits (K, D, H, W) on the device of preprocessed (C, D, H, W) data, summed
        and averaged in float16 as nnU-Net does."""
        plan = self.model.plan
        image = torch.from_numpy(np.ascontiguousarray(data)).to(self.device)[None]  # (1, C, D, H, W)
        step = self.infer.step_fraction
        total = None
        for network in self.networks:
            out = sliding_window_logits(
                network, image, plan.patch_size, plan.num_classes, step, windows_per_batch=self.infer.windows_per_batch,
                autocast_dtype=self.autocast, mirror_axes=self.model.mirror_axes if self.infer.mirror_tta else (),
                fixed_batch=self.infer.compile, importance=nnunet_gaussian(plan.patch_size),
                starts_fn=lambda size, window: nnunet_window_starts(size, window, step),
                accumulate_dtype=torch.float16)
            total = out if total is None else total.add_(out)
        return total.div_(len(self.networks))

    def predict_prepared(self, prepared: NnunetPrepared) -> Prediction:
        """Windows, export and the mask in the CT's grid (class ids, or 0/1 lesion without all_labels)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.logits(prepared.data)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        t1 = time.perf_counter()
        labels = export_labels(logits, prepared, self.model.plan, self.threads)
        del logits
        if self.keep is not None:
            labels = np.isin(labels, self.keep).astype(np.uint8)
        t2 = time.perf_counter()
        o = prepared.original
        box = Box(*zip(*(prepared.bbox[self.model.plan.transpose_backward[a]] for a in range(3))))
        return Prediction(Volume(labels, o.spacing_zyx_mm, o.origin_xyz_mm, o.direction_xyz), box, "nonzero",
                          tuple(int(s) for s in prepared.data.shape[1:]),
                          {**prepared.seconds, "network": t1 - t0, "restore": t2 - t1})

    def predict_volume(self, volume: Volume) -> Prediction:
        return self.predict_prepared(self.prepare(volume))


__all__ = ["LESION_NAME", "NNUNET_INFER", "NnunetPredictor", "lesion_labels", "nnunet_gaussian",
           "nnunet_window_starts"]
