"""panseg checkpoints: plain tensors and numbers only, always loaded with `weights_only=True`.

A checkpoint is one file, `checkpoint.pt`, holding the config (as JSON text), the epochs completed,
the unwrapped model's state, the optimiser's state, the best validation metric and the torch RNG
state. Nothing is pickled as an object, so loading a checkpoint never runs code, and a file that is
not a panseg checkpoint is refused with a message that says so.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from panseg.config import PansegConfig, config_from_json, config_to_json

FORMAT = "panseg-checkpoint"
FORMAT_VERSION = 1
FILE_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A file is not a readable panseg checkpoint."""


@dataclass(frozen=True)
class TrainingState:
    cfg: PansegConfig
    epoch: int  # epochs completed
    model: dict
    optimizer: dict | None
    best_metric: float | None
    torch_rng: torch.Tensor | None = None
    elapsed_seconds: float = 0.0  # training time (wall clock) before this checkpoint, over every resume
    run_id: str | None = None  # the training run that wrote it (TrainJob.run_id); None in older checkpoints


def save_checkpoint(state: TrainingState, directory: str | Path) -> Path:
    """Write `directory/checkpoint.pt` atomically (the directory appears only when complete)."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_json": config_to_json(state.cfg),
        "epoch": state.epoch,
        "model": state.model,
        "optimizer": state.optimizer,
        "best_metric": state.best_metric,
        "torch_rng": state.torch_rng,
        "elapsed_seconds": float(state.elapsed_seconds),
        "run_id": state.run_id,
    }
    torch.save(payload, tmp / FILE_NAME)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def resolve_checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file from a file, a checkpoint directory, or a run directory (its best, else final model)."""
    path = Path(path)
    candidates = [path, path / FILE_NAME, path / "model_best" / FILE_NAME, path / "model_final" / FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path} is not a panseg checkpoint, checkpoint directory or run directory "
                          f"(looked for {', '.join(str(c) for c in candidates[1:])})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    """Load a checkpoint with `weights_only=True`.

    Raises:
        CheckpointError: the file is missing, not a torch file, holds objects, or is not panseg's.
    """
    file = resolve_checkpoint_file(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or unsafe files
        raise CheckpointError(f"{file} is not a loadable panseg checkpoint: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is a torch file but not a panseg checkpoint (no format={FORMAT!r} entry)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has checkpoint format version {payload.get('format_version')}, "
                              f"this panseg reads version {FORMAT_VERSION}")
    return TrainingState(
        cfg=config_from_json(payload["config_json"]),
        epoch=int(payload["epoch"]),
        model=payload["model"],
        optimizer=payload["optimizer"],
        best_metric=payload["best_metric"],
        torch_rng=payload["torch_rng"],
        elapsed_seconds=float(payload.get("elapsed_seconds", 0.0)),  # absent in checkpoints before it was kept
        run_id=payload.get("run_id"),
    )


def latest_checkpoint(checkpoints_dir: str | Path, run_id: str | None = None) -> Path | None:
    """The checkpoint directory with the most epochs under `checkpoints_dir` (named epoch_NNNN), of the
    run `run_id` only when it is given. Directories appear only complete (`save_checkpoint`)."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    complete = sorted(d for d in folder.glob("epoch_*") if (d / FILE_NAME).is_file())
    if run_id is not None:
        complete = [d for d in complete if checkpoint_run_id(d) == run_id]
    return complete[-1] if complete else None


def checkpoint_run_id(path: str | Path) -> str | None:
    """The run id a checkpoint records (None for older checkpoints), read without loading its tensors."""
    try:
        payload = torch.load(resolve_checkpoint_file(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a foreign file: not this run's
        raise CheckpointError(f"{path} is not a loadable panseg checkpoint: {type(err).__name__}") from None
    return payload.get("run_id") if isinstance(payload, dict) else None
