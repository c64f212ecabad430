"""The pieces the training loop is assembled from: where it runs (a Session), what it trains (model,
loss, optimiser, augmentation), the learning-rate schedule, and validation by sliding window.

A `Session` hides whether the loop runs in one local process or as a Ray Train worker: rank, world
size, device, wrapping the model for DDP, a barrier, reporting, and the checkpoint Ray Train hands a
restarted worker. `Session` here is the local one; the Ray Train worker's (`RayTrainSession`) lives
in the Ray Train shell, `panseg.train_loop`, and a Tune trial's in `panseg.tune_search`. Nothing here
imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from panseg.config import TUMOR_ID, PansegConfig, TrainConfig, label_names
from panseg.evaluation.lesions import mean_organ_dice
from panseg.evaluation.metrics import flare_case_scores
from panseg.inference.sliding_window import sliding_window_logits
from panseg.store.zarr_store import read_case
from panseg.training.augment import augment_batch
from panseg.training.losses import DeepSupervisionLoss, DiceCELoss, class_weights, deep_supervision_weights
from panseg.training.model import build_model
from panseg.training.sampling import PatchSampler

# ----------------------------------------------------------------------------------------------
# Sessions
# ----------------------------------------------------------------------------------------------


class Session:
    """One local process: rank 0 of 1, CUDA if available."""

    rank = 0
    world_size = 1
    node_id: str | None = None  # the Ray node id under Ray Train
    placement_group_id: str | None = None  # the worker group's placement group (hex) under Ray Train

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Nothing to hand on in one process (rank 0's epoch line is printed by the loop)."""

    def restart_checkpoint(self) -> Path | None:
        return None


# ----------------------------------------------------------------------------------------------
# Model, loss, optimiser, augmentation
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainingParts:
    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    num_classes: int


def num_classes_of(cfg: PansegConfig) -> int:
    return len(label_names(cfg.preprocess.task))


def selection_metric(cfg: PansegConfig) -> str:
    """The validation metric that picks RUN/model_best: `tune.metric`, except that an organ model (which
    has no tumor metrics) is picked by `val_organ_dsc` when `tune.metric` names a tumor metric."""
    if cfg.preprocess.task == "organs" and cfg.tune.metric.startswith("val_tumor"):
        return "val_organ_dsc"
    return cfg.tune.metric


def make_model(cfg: PansegConfig) -> torch.nn.Module:
    return build_model(cfg.model, num_classes_of(cfg), cfg.train.patch_size_zyx, cfg.preprocess.target_spacing_zyx_mm)


def make_loss(cfg: PansegConfig, n_outputs: int, world_size: int = 1) -> torch.nn.Module:
    """The training loss; with `world_size` > 1 (DDP), the loss of all ranks' batches together."""
    tcfg = cfg.train
    weights = class_weights(num_classes_of(cfg), tcfg.tumor_weight, tcfg.background_weight, tumor_id=TUMOR_ID)
    base = DiceCELoss(weights, tcfg.alpha_dice, tcfg.alpha_ce, include_background=tcfg.dice_include_background,
                      batch_dice=tcfg.batch_dice, across_ranks=world_size > 1)
    return DeepSupervisionLoss(base, deep_supervision_weights(n_outputs)) if n_outputs > 1 else base


def make_sampler(cfg: PansegConfig, store: str, train_ids: list[str], rank: int = 0) -> PatchSampler:
    """The training patch sampler of one rank, with the config's sampling settings (what training uses)."""
    tcfg = cfg.train
    return PatchSampler(store, list(train_ids), tcfg.patch_size_zyx, tcfg.tumor_sampling_ratio,
                        tcfg.random_patch_fraction, cfg.preprocess.clip_hu, tumor_id=TUMOR_ID, seed=tcfg.seed,
                        rank=rank, class_voxel_offset=tcfg.class_voxel_offset)


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                           momentum=tcfg.momentum, nesterov=True)


def lr_at_epoch(tcfg: TrainConfig, epoch: int, elapsed_seconds: float = 0.0) -> float:
    """The learning rate of an epoch (0-based) that starts `elapsed_seconds` into training: a pure
    function, so a resumed run continues exactly (`poly_time` uses only the time, the others the epoch)."""
    if tcfg.lr_schedule == "poly_time":
        used = min(1.0, elapsed_seconds / (60.0 * tcfg.time_limit_minutes))
        return tcfg.lr * (1 - used) ** tcfg.poly_exponent
    if tcfg.lr_schedule == "step":
        return tcfg.lr * tcfg.lr_step_factor ** (epoch // tcfg.lr_step_epochs)
    if tcfg.lr_schedule == "poly":
        return tcfg.lr * (1 - epoch / tcfg.epochs) ** tcfg.poly_exponent
    return tcfg.lr


def training_memory_format(tcfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The layout the network trains in: `train.memory_format`, where 'auto' is channels-last on the CPU
    (oneDNN's 3D convolutions, backward above all, run faster on it) and contiguous on GPU."""
    choice = tcfg.memory_format
    if choice == "auto":
        choice = "channels_last" if device.type == "cpu" else "contiguous"
    return torch.channels_last_3d if choice == "channels_last" else torch.contiguous_format


def to_memory_format(model: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """`model` with its convolution kernels larger than 1x1x1 in `memory_format` (in place).

    A 1x1x1 kernel has the same bytes in either layout but ambiguous strides, and DDP warns when its
    gradient's strides differ from the parameter's; those stay contiguous.
    """
    for param in model.parameters():
        if param.dim() == 5 and any(size > 1 for size in param.shape[2:]):
            param.data = param.data.contiguous(memory_format=memory_format)
    return model


def build_training_parts(cfg: PansegConfig, device: torch.device, world_size: int = 1) -> TrainingParts:
    model = to_memory_format(make_model(cfg).to(device), training_memory_format(cfg.train, device))
    n_outputs = len(model.strides) - 1 if cfg.model.deep_supervision else 1
    loss = make_loss(cfg, n_outputs, world_size).to(device)
    optimizer = make_optimizer(model, cfg.train)
    augment_cfg = cfg.train.augment

    def augment(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator):
        return augment_batch(image, label, augment_cfg, generator)

    return TrainingParts(model, loss, optimizer, augment, num_classes_of(cfg))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def predict_store_case(model: torch.nn.Module, cfg: PansegConfig, image_hu: np.ndarray,
                       device: torch.device) -> np.ndarray:
    """Class map of one preprocessed case (store grid) by sliding window."""
    low, high = cfg.preprocess.clip_hu
    image = torch.from_numpy((image_hu.astype(np.float32) - low) / (high - low))[None, None].to(device)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else None
    logits = sliding_window_logits(model, image, cfg.train.patch_size_zyx, num_classes_of(cfg),
                                   cfg.infer.step_fraction, cfg.infer.gaussian_sigma_scale,
                                   cfg.infer.windows_per_batch, autocast_dtype=dtype)
    return logits.argmax(0).to(torch.uint8).cpu().numpy()


def validate(model: torch.nn.Module, cfg: PansegConfig, store: str, val_ids: list[str], session: Session) -> dict:
    """Scores of held-out cases predicted whole by sliding window in the store's grid.

    Tumor task: tumor DSC/NSD with the FLARE rules (`val_tumor_dsc`, `val_tumor_nsd`) and the mean
    Dice of the organs present (`val_organ_dsc`); organ task: `val_organ_dsc`. Each rank predicts
    its share of the cases; the sums are all-reduced, so every rank reports the same means.
    """
    model.eval()
    cases = val_ids[: cfg.train.val_max_cases][session.rank::session.world_size]
    spacing = cfg.preprocess.target_spacing_zyx_mm
    sums = [0.0, 0.0, 0.0, 0.0]  # tumor dsc, tumor nsd, organ dsc, cases
    for case_id in cases:
        image_hu, label, _ = read_case(store, case_id)
        prediction = predict_store_case(model, cfg, image_hu, session.device)
        organ_dsc = mean_organ_dice(prediction, label)
        organ_dsc = 1.0 if organ_dsc is None else organ_dsc  # no organ in the label: nothing to miss
        if cfg.preprocess.task == "tumor":
            scores = flare_case_scores(prediction == TUMOR_ID, label == TUMOR_ID, spacing)
            sums = [sums[0] + scores.dsc, sums[1] + scores.nsd, sums[2] + organ_dsc, sums[3] + 1]
        else:
            sums = [sums[0], sums[1], sums[2] + organ_dsc, sums[3] + 1]
    tumor_dsc, tumor_nsd, organ_dsc, count = session.all_reduce_sum(sums)
    model.train()
    if count == 0:
        return {}
    metrics = {"val_organ_dsc": organ_dsc / count, "val_cases": int(count)}
    if cfg.preprocess.task == "tumor":
        metrics.update(val_tumor_dsc=tumor_dsc / count, val_tumor_nsd=tumor_nsd / count)
    return metrics
