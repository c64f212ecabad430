"""The per-epoch progress line (panseg.training.progress): its numbers, and the driver-side follower of
RUN/metrics.jsonl that prints it for a DDP run whose worker output Ray does not forward."""

import json

from panseg.config import build_config
from panseg.training.progress import MetricsFollower, epoch_line, seconds_left


def _tcfg(*overrides):
    return build_config("tiny", overrides=["train.epochs=32", *overrides]).train


def test_the_line_shows_epoch_loss_lr_validation_and_time_left():
    row = {"epoch": 8, "train_loss": 0.41234, "lr": 0.0071234, "elapsed_seconds": 120.0,
           "val_tumor_dsc": 0.0412, "val_organ_dsc": 0.523}
    # 24 epochs left at 15 s each = 6 min; a 9-minute limit leaves 7 min: the smaller wins
    assert epoch_line(row, _tcfg("train.time_limit_minutes=9")) == \
        "train: epoch 8/32  loss 0.4123  lr 0.00712  val tumor DSC 0.041 (organ Dice 0.52)  6.0 min left"
    assert seconds_left(row, _tcfg("train.time_limit_minutes=3")) == 60.0  # the limit is nearer
    assert seconds_left({**row, "elapsed_seconds": 500.0}, _tcfg("train.time_limit_minutes=3")) == 0.0
    no_val = {"epoch": 1, "train_loss": 0.9, "lr": 0.01, "elapsed_seconds": 15.0}
    assert epoch_line(no_val, _tcfg()) == "train: epoch 1/32  loss 0.9000  lr 0.01  7.8 min left"
    organs = {"epoch": 32, "train_loss": 0.2, "lr": 0.0, "elapsed_seconds": 480.0, "val_organ_dsc": 0.7}
    assert epoch_line(organs, _tcfg()) == "train: epoch 32/32  loss 0.2000  lr 0  val organ Dice 0.700  0.0 min left"
    assert epoch_line({"epoch": 2, "train_loss": 0.5, "lr": 0.01}, _tcfg()) == "train: epoch 2/32  loss 0.5000  lr 0.01"
    # A poly_time run ends on its clock: no epoch total, and the time left is the budget's.
    timed = _tcfg("train.time_limit_minutes=9", "train.lr_schedule=poly_time", "train.epochs=100000")
    assert epoch_line(row, timed) == \
        "train: epoch 8  loss 0.4123  lr 0.00712  val tumor DSC 0.041 (organ Dice 0.52)  7.0 min left"


def test_the_follower_prints_only_new_complete_rows(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    old = {"epoch": 1, "train_loss": 0.9, "lr": 0.01, "elapsed_seconds": 15.0}
    metrics.write_text(json.dumps(old) + "\n")  # a resumed run's earlier epoch: not printed again
    lines = []
    follower = MetricsFollower(tmp_path, _tcfg(), poll_seconds=60, emit=lines.append)
    with open(metrics, "a") as f:
        f.write(json.dumps({**old, "epoch": 2, "elapsed_seconds": 30.0}) + "\n" + '{"epoch": 3, "tra')
    follower.poll()
    assert lines == ["train: epoch 2/32  loss 0.9000  lr 0.01  7.5 min left"]
    with open(metrics, "a") as f:
        f.write('in_loss": 0.8, "lr": 0.01}\n')
    with follower:  # starts the thread; leaving it stops it and reads what is left
        pass
    assert lines[1] == "train: epoch 3/32  loss 0.8000  lr 0.01"
