"""Checkpoints (panseg.training.checkpoint): the training clock travels with them, so a resumed run
continues the time budget (`poly_time`, the time limit, snapshots) where it stopped."""

import torch

from panseg.config import build_config
from panseg.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from panseg.training.parts import lr_at_epoch, make_model


def test_elapsed_seconds_round_trip_and_continue_the_poly_time_clock(tmp_path):
    cfg = build_config("tiny", overrides=["train.time_limit_minutes=10", "train.lr_schedule=poly_time"])
    torch.manual_seed(0)
    model = make_model(cfg)
    state = TrainingState(cfg, 3, model.state_dict(), None, 0.25, torch.get_rng_state(), elapsed_seconds=412.5)
    loaded = load_checkpoint(save_checkpoint(state, tmp_path / "epoch_0003"))
    assert loaded.elapsed_seconds == 412.5 and loaded.epoch == 3 and loaded.best_metric == 0.25
    assert loaded.cfg == cfg
    # The resumed run's first epoch starts at the checkpoint's clock, not at 0.
    assert lr_at_epoch(loaded.cfg.train, loaded.epoch, loaded.elapsed_seconds) == \
        lr_at_epoch(cfg.train, 3, 412.5) < lr_at_epoch(cfg.train, 3, 0.0)


def test_a_checkpoint_without_a_clock_reads_as_zero_seconds(tmp_path):
    """Checkpoints written before elapsed_seconds was kept still load (their clock starts at 0)."""
    cfg = build_config("tiny")
    directory = save_checkpoint(TrainingState(cfg, 1, make_model(cfg).state_dict(), None, None), tmp_path / "old")
    payload = torch.load(directory / "checkpoint.pt", weights_only=True)
    del payload["elapsed_seconds"]
    torch.save(payload, directory / "checkpoint.pt")
    assert load_checkpoint(directory).elapsed_seconds == 0.0
