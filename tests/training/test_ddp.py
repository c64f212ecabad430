"""DDP is provably DDP: one optimiser step of 2 gloo workers on fixed batches equals one step of a single
process on the two batches together, for the paper's loss (DiceCE, deep supervision, batch Dice, tumor
weight 5), through the code training uses (`build_training_parts`, `train_loop._step`).

No Ray: torch.multiprocessing spawns the two workers, which join a gloo group through a file.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from panseg.config import build_config
from panseg.train_loop import _step
from panseg.training.parts import Session, build_training_parts

WORLD = 2
# The paper's loss (its defaults: alpha 0.5/0.5, tumor weight 5, batch Dice, no background in Dice,
# deep supervision) on the tiny network and a small patch; SGD, whose step is linear in the gradient
# (AdamW's first step is ~lr * sign(gradient) and would hide a wrong gradient).
OVERRIDES = ["train.patch_size_zyx=[16,32,32]", "train.optimizer=sgd", "train.lr=0.1", "train.alpha_dice=0.5",
             "train.alpha_ce=0.5", "train.tumor_weight=5", "train.batch_dice=true",
             "train.dice_include_background=false", "model.deep_supervision=true"]


def _config():
    return build_config("tiny", overrides=OVERRIDES)


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """4 samples, (4, 1, 16, 32, 32): rank 0 gets the first two (much tumor), rank 1 the last two (little),
    so every per-worker normaliser (batch Dice sums, CE's weight sum) differs from the global one."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(4, 1, 16, 32, 32, generator=generator)
    label = torch.randint(0, 14, (4, 1, 16, 32, 32), generator=generator)
    label[0:2, :, 4:12, 8:24, 8:24] = 14
    label[2:4, :, 7:9, 14:18, 14:18] = 14
    return image, label


def _one_step(world_size: int, image: torch.Tensor, label: torch.Tensor, wrap=lambda m: m) -> dict:
    cfg = _config()
    torch.manual_seed(cfg.train.seed)  # what training does: identical initial weights on every rank
    parts = build_training_parts(cfg, torch.device("cpu"), world_size)
    _step(wrap(parts.model), parts, image, label, cfg.train, Session())
    return {k: v.detach().clone() for k, v in parts.model.state_dict().items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, label = _batches()
        mine = slice(2 * rank, 2 * rank + 2)

        def ddp(model):
            return torch.nn.parallel.DistributedDataParallel(model)

        states = {"global": _one_step(WORLD, image[mine], label[mine], ddp),  # what training builds under DDP
                  "per_worker": _one_step(1, image[mine], label[mine], ddp)}  # each worker's own normalisers
        if rank == 0:
            torch.save(states, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_ddp_step_of_two_gloo_workers_equals_one_step_on_both_batches(tmp_path):
    torch.set_num_threads(1)
    image, label = _batches()
    single = _one_step(1, image, label)
    torch.manual_seed(_config().train.seed)
    initial = build_training_parts(_config(), torch.device("cpu")).model.state_dict()
    moved = max(float((single[k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # the step moves the weights far more than the tolerance
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    states = torch.load(tmp_path / "ddp.pt")

    global_diff = max(float((states["global"][k] - v).abs().max()) for k, v in single.items())
    assert global_diff <= 1e-6, f"DDP's step differs from the single process's by {global_diff:.2e}"
    # Normalised per worker, as before the loss summed over ranks, the step is another one: this is the
    # difference the cross-rank sums remove (docs/training.md).
    per_worker_diff = max(float((states["per_worker"][k] - v).abs().max()) for k, v in single.items())
    assert per_worker_diff > 100 * max(global_diff, 1e-8), (per_worker_diff, global_diff)
