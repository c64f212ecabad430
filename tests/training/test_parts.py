"""The training parts (panseg.training.parts): the presets' learning-rate schedules, the schedule by elapsed
time, and channels-last
on the CPU giving the same loss and gradients as contiguous tensors."""

import pytest
import torch

from panseg.config import build_config
from panseg.training.parts import build_training_parts, lr_at_epoch, training_memory_format


def _cfg(*overrides):
    return build_config("tiny", overrides=["train.iterations_per_epoch=3", "train.val_every_epochs=2",
                                           "train.checkpoint_every_epochs=1", "train.val_max_cases=1", *overrides])


def test_lr_schedules_follow_the_presets():
    paper = build_config("paper").train
    assert lr_at_epoch(paper, 0) == lr_at_epoch(paper, 199) == 1e-2
    assert lr_at_epoch(paper, 200) == 5e-3 and lr_at_epoch(paper, 499) == 2.5e-3
    seed = build_config("seed-code").train
    assert lr_at_epoch(seed, 0) == 1e-2
    assert lr_at_epoch(seed, 250) == pytest.approx(1e-2 * 0.5 ** 0.9)


def test_poly_time_decays_over_the_share_of_the_time_budget_used():
    """Under poly_time the rate depends on the training seconds alone: (1 - used)^0.9 of train.lr."""
    tcfg = build_config("tiny", overrides=["train.lr=0.01", "train.time_limit_minutes=10",
                                           "train.lr_schedule=poly_time"]).train
    assert lr_at_epoch(tcfg, 0, 0.0) == 0.01
    assert lr_at_epoch(tcfg, 7, 300.0) == pytest.approx(0.01 * 0.5 ** 0.9)  # half of 600 s, whatever the epoch
    assert lr_at_epoch(tcfg, 0, 300.0) == lr_at_epoch(tcfg, 99, 300.0)
    assert lr_at_epoch(tcfg, 3, 600.0) == 0.0
    assert lr_at_epoch(tcfg, 3, 900.0) == 0.0  # past the budget (the last epoch ends late): 0, never negative


def test_channels_last_on_cpu_trains_the_same_numbers():
    cpu = torch.device("cpu")
    assert training_memory_format(build_config("tiny").train, cpu) == torch.channels_last_3d
    assert training_memory_format(build_config("tiny").train, torch.device("cuda")) == torch.contiguous_format
    losses, grads = {}, {}
    for layout in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        parts = build_training_parts(_cfg(f"train.memory_format={layout}"), cpu)
        kernels = [p for p in parts.model.parameters() if p.dim() == 5]
        big = [p for p in kernels if max(p.shape[2:]) > 1]
        assert big and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in big) == (layout == "channels_last")
        assert all(p.is_contiguous() for p in big if p.shape[1] > 1) == (layout == "contiguous")
        # 1x1x1 heads keep plain strides: DDP compares gradient and parameter strides
        assert all(p.stride() == torch.empty(p.shape).stride() for p in kernels if max(p.shape[2:]) == 1)
        generator = torch.Generator().manual_seed(1)
        image = torch.rand(2, 1, 32, 64, 64, generator=generator)
        label = torch.randint(0, 15, (2, 1, 32, 64, 64), generator=generator)
        loss = parts.loss(parts.model(image), label)
        loss.backward()
        losses[layout] = float(loss)
        grads[layout] = torch.cat([p.grad.flatten() for p in parts.model.parameters()])
    assert losses["channels_last"] == pytest.approx(losses["contiguous"], rel=1e-5)
    torch.testing.assert_close(grads["channels_last"], grads["contiguous"], rtol=1e-3, atol=1e-5)
