"""One progress line per training epoch, the same wherever the loop runs.

Rank 0 prints `epoch_line` after every epoch, locally and under Ray Train. A Ray Train worker's print
reaches the driver only when Ray forwards worker output (`log_to_driver`); a driver that keeps worker
output off (the demo, for a quiet run) follows RUN/metrics.jsonl instead (`MetricsFollower`) and prints
the same lines from the rows rank 0 writes there. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from panseg.config import TrainConfig


def seconds_left(metrics: dict, tcfg: TrainConfig) -> float | None:
    """Training seconds still to come after this epoch: the epochs left at the mean epoch time so far,
    capped by what is left of `train.time_limit_minutes`; None without `elapsed_seconds`."""
    elapsed = metrics.get("elapsed_seconds")
    if elapsed is None or metrics["epoch"] < 1:
        return None
    left = (tcfg.epochs - metrics["epoch"]) * elapsed / metrics["epoch"]
    if tcfg.time_limit_minutes is not None:
        left = min(left, 60.0 * tcfg.time_limit_minutes - elapsed)
    return max(0.0, left)


def epoch_line(metrics: dict, tcfg: TrainConfig) -> str:
    """`train: epoch 12/32  loss 0.4123  lr 0.00712  val tumor DSC 0.041 (organ Dice 0.52)  3.1 min left`.

    The validation part appears on epochs that validated; a tumor model shows its tumor DSC with the
    organ Dice beside it, an organ model its organ Dice. A `poly_time` run is ended by its clock, not
    its epoch count, so its line shows no epoch total (`train: epoch 12  loss ...  3.1 min left`).
    """
    total = "" if tcfg.lr_schedule == "poly_time" else f"/{tcfg.epochs}"
    parts = [f"train: epoch {metrics['epoch']}{total}", f"loss {metrics['train_loss']:.4f}",
             f"lr {metrics['lr']:.3g}"]
    if "val_tumor_dsc" in metrics:
        parts.append(f"val tumor DSC {metrics['val_tumor_dsc']:.3f} (organ Dice {metrics['val_organ_dsc']:.2f})")
    elif "val_organ_dsc" in metrics:
        parts.append(f"val organ Dice {metrics['val_organ_dsc']:.3f}")
    left = seconds_left(metrics, tcfg)
    if left is not None:
        parts.append(f"{left / 60:.1f} min left")
    return "  ".join(parts)


class MetricsFollower:
    """Print `epoch_line` for every row appended to RUN/metrics.jsonl while a run trains (a thread that
    polls the file; rows already there when it starts are not printed). Use as a context manager."""

    def __init__(self, run_dir: str | Path, tcfg: TrainConfig, poll_seconds: float = 1.0,
                 emit: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tcfg, self.poll_seconds = tcfg, poll_seconds
        self.emit = emit or (lambda line: print(line, flush=True))
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="panseg-metrics-follower", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the rows written after the last poll

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def poll(self) -> None:
        """Print the complete rows appended since the last poll (a half-written last line waits)."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.emit(epoch_line(json.loads(line), self.tcfg))


__all__ = ["MetricsFollower", "epoch_line", "seconds_left"]
