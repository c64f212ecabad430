"""The training clock and the snapshots kept at training minutes (`train.snapshot_minutes`).

`TrainingClock` counts wall-clock seconds of training over every resume (the checkpoints carry them
as `elapsed_seconds`): `poly_time`, the time limit and the snapshots all read it. `Snapshots` writes
RUN/snapshots/minute_M at the first epoch end past each minute M (rank 0): a model-only checkpoint the
predictor loads, with snapshot.json (minutes, epoch, steps, elapsed_seconds) beside it. Nothing here
imports Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from panseg.config import PansegConfig
from panseg.training.checkpoint import TrainingState, save_checkpoint


class TrainingClock:
    """Wall-clock seconds of training, counting the runs this one resumes (`before`)."""

    def __init__(self, before: float):
        self.before, self.started = before, time.monotonic()

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.started


class Snapshots:
    """The snapshots of one run still to come (minutes already past when a resumed run starts are skipped)."""

    def __init__(self, run_dir: str | Path, cfg: PansegConfig, minutes: tuple[float, ...], elapsed_before: float):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.pending = sorted(m for m in minutes if 60.0 * m > elapsed_before)

    def save_due(self, model: torch.nn.Module, epochs_done: int, steps: int, elapsed: float) -> None:
        """Write a snapshot for every pending minute that `elapsed` seconds have passed."""
        while self.pending and elapsed >= 60.0 * self.pending[0]:
            minute = self.pending.pop(0)
            folder = self.run_dir / "snapshots" / f"minute_{minute:g}"
            save_checkpoint(TrainingState(self.cfg, epochs_done, model.state_dict(), None, None, None, elapsed), folder)
            info = {"minutes": minute, "epoch": epochs_done, "steps": steps, "elapsed_seconds": elapsed}
            tmp = folder / ".snapshot.json.tmp"
            tmp.write_text(json.dumps(info))
            os.replace(tmp, folder / "snapshot.json")


__all__ = ["Snapshots", "TrainingClock"]
