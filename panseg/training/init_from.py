"""`train.init_from`: a new run starts from the weights of another panseg model (e.g. the stage-one organ
model), as the method's two stages suggest.

Every tensor is copied except the output heads (the final one and the deep-supervision ones) when the
class count differs: their rows for the classes both models have are copied (class ids mean the same
in either task: 0 background, 1-13 the organs, 14 the tumor) and the rest keep this run's fresh
initialisation. A network of another shape (features, strides, convolutions, kernel) is refused with
the first parameter that differs. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from panseg.config import PansegConfig
from panseg.training.checkpoint import TrainingState, load_checkpoint, resolve_checkpoint_file
from panseg.training.model import plan_strides

HEAD_PREFIX = "heads."


class InitFromError(ValueError):
    """The model of `train.init_from` cannot start this run's network."""


@dataclass(frozen=True)
class InitResult:
    source: Path  # the checkpoint file the weights came from
    copied: int  # tensors copied whole
    resized_heads: tuple[str, ...]  # head tensors whose shared class rows were copied
    source_classes: int
    classes: int

    def describe(self) -> str:
        line = f"train: weights from {self.source} ({self.copied} tensors copied"
        if self.resized_heads:
            line += (f"; {len(self.resized_heads)} head tensors resized from {self.source_classes} to "
                     f"{self.classes} classes, the {self.source_classes} shared ones copied")
        return line + ")"


def resolved_strides(cfg: PansegConfig) -> tuple[tuple[int, ...], ...]:
    """The network's strides as `build_model` resolves them (given, or planned from patch and spacing)."""
    model = cfg.model
    if model.strides is not None:
        return tuple(tuple(s) for s in model.strides)
    planned = plan_strides(cfg.train.patch_size_zyx, cfg.preprocess.target_spacing_zyx_mm,
                           len(model.features_per_stage), model.min_feature_map)
    return tuple(tuple(s) for s in planned)


def check_architecture(source: PansegConfig, target: PansegConfig, where: str) -> None:
    """Raise InitFromError naming the first network setting in which `source` and `target` differ."""
    for name in ("features_per_stage", "n_conv_per_stage", "kernel_size"):
        theirs, ours = getattr(source.model, name), getattr(target.model, name)
        if theirs != ours:  # frozen config values: ints and tuples of ints
            raise InitFromError(_mismatch(where, f"model.{name}", theirs, ours))
    theirs, ours = resolved_strides(source), resolved_strides(target)
    if theirs != ours:
        raise InitFromError(_mismatch(where, "model.strides (as resolved from the patch and spacing)",
                                      [list(s) for s in theirs], [list(s) for s in ours]))


def _mismatch(where: str, name: str, theirs, ours) -> str:
    return (f"train.init_from={where}: its network has {name}={theirs}, but this run's has {ours}; "
            f"init_from needs the same network (only the class count may differ); set {name.split(' ')[0]} "
            f"to match it, or leave train.init_from null")


def load_init_source(path: str | Path, target: PansegConfig) -> TrainingState:
    """The checkpoint of `train.init_from` (a checkpoint file or folder, or a run: its best, else final
    model), checked against this run's network.

    Raises:
        CheckpointError: not a panseg checkpoint; InitFromError: another network.
    """
    state = load_checkpoint(path, map_location="cpu")
    check_architecture(state.cfg, target, str(path))
    return state


def initialise_from(model: torch.nn.Module, source: TrainingState, path: str | Path) -> InitResult:
    """Copy `source`'s weights into `model` (in place), resizing the heads to `model`'s class count.

    Raises:
        InitFromError: a tensor outside the heads that is missing or of another shape (named).
    """
    ours = model.state_dict()
    theirs = source.model
    merged, resized = {}, []
    for key, tensor in ours.items():
        if key not in theirs:
            raise InitFromError(f"train.init_from={path}: its weights lack {key} {tuple(tensor.shape)}; "
                                f"it was trained with another network")
        other = theirs[key]
        if other.shape == tensor.shape:
            merged[key] = other.to(tensor.dtype)
        elif key.startswith(HEAD_PREFIX) and other.shape[1:] == tensor.shape[1:]:
            shared = min(other.shape[0], tensor.shape[0])
            fresh = tensor.clone()  # (classes, C_in, 1, 1, 1) or (classes,): rows are classes
            fresh[:shared] = other[:shared].to(tensor.dtype)
            merged[key] = fresh
            resized.append(key)
        else:
            raise InitFromError(f"train.init_from={path}: {key} has shape {tuple(other.shape)} there but "
                                f"{tuple(tensor.shape)} here; init_from needs the same network")
    model.load_state_dict(merged)
    copied = len(merged) - len(resized)
    head = next((k for k in ours if k.startswith(HEAD_PREFIX) and k.endswith("weight")), None)
    classes = int(ours[head].shape[0]) if head else 0
    source_classes = int(theirs[head].shape[0]) if head and head in theirs else classes
    return InitResult(resolve_checkpoint_file(path), copied, tuple(resized), source_classes, classes)


__all__ = ["InitFromError", "InitResult", "check_architecture", "initialise_from", "load_init_source",
           "resolved_strides"]
