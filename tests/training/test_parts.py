"""The training parts (panseg.training.parts): the presets' learning-rate schedules, the schedule by elapsed
time, and channels-last
on the CPU giving the same loss and gradients as contiguous tensors."""

import numpy as np
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


# ----------------------------------------------------------------------------------------------
# Settings that reach training: the loss's class weights and the sampler's class shares
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tumor_weight", [1.0, 3.5, 7.0])
@pytest.mark.parametrize("n_outputs", [1, 4])
def test_the_tumor_tasks_loss_weights_are_ones_and_the_tumor_weight(tumor_weight, n_outputs):
    from panseg.training.losses import DeepSupervisionLoss, DiceCELoss
    from panseg.training.parts import make_loss

    loss = make_loss(build_config("paper", overrides=[f"train.tumor_weight={tumor_weight}"]), n_outputs)
    base = loss.loss if n_outputs > 1 else loss
    assert isinstance(base, DiceCELoss) and isinstance(loss, DeepSupervisionLoss) == (n_outputs > 1)
    assert base.class_weights.tolist() == [1.0] * 14 + [tumor_weight]


def test_the_tumor_weight_changes_the_loss_of_a_tumor_error():
    """The weights are not only stored: a batch whose one error is on tumor voxels costs more with a larger weight."""
    from panseg.training.parts import make_loss

    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 14  # half tumor, half background
    logits = torch.full((1, 15, 4, 4, 4), -4.0)
    logits[:, 0] = 4.0  # background everywhere: the tumor is missed
    values = [float(make_loss(build_config("paper", overrides=["train.alpha_dice=0", f"train.tumor_weight={w}"]), 1)
                    (logits, target)) for w in (1.0, 5.0)]
    assert values[1] > values[0] * 1.5


def _store_with_every_class(path):
    """A store (written with the real writer) whose two cases hold every class 1-14."""
    from panseg.config import PreprocessConfig
    from panseg.preprocessing.case import PreprocessedCase
    from panseg.store import zarr_store as store

    clip = (-160.0, 240.0)
    store.create_store(path, PreprocessConfig(chunk_zyx=(8, 8, 8), task="tumor", clip_hu=clip))
    cases = []
    for seed, case_id in enumerate(("case_a", "case_b")):
        shape = (16, 16, 30)
        label = np.zeros(shape, dtype=np.uint8)
        for c in range(1, 15):  # one 2x4x2 block per class
            label[4:6, 4:8, 2 * c - 1:2 * c + 1] = c
        image = np.random.default_rng(seed).integers(-160, 241, size=shape, dtype=np.int16)
        locations = {c: np.argwhere(label == c).astype(np.int32) for c in range(1, 15)}
        counts = {str(c): int((label == c).sum()) for c in range(15)}
        attrs = {"case_id": case_id, "task": "tumor", "status": "ok", "resampled_shape_zyx": list(shape),
                 "clip_hu": list(clip), "class_counts": counts}
        cases.append(PreprocessedCase(case_id, "ok", image, label, locations, attrs))
    for case in cases:
        store.write_case(path, case)
    store.write_manifest(path, [store.case_manifest_row(c) for c in cases])
    return str(path), [c.case_id for c in cases]


@pytest.mark.parametrize("ratio, random_fraction", [(5.0, 0.0), (5.0, 0.3), (1.0, 0.1), (10.0, 0.5)])
def test_the_sampler_draws_tumor_and_random_patches_in_the_configured_shares(tmp_path, ratio, random_fraction):
    """~20k draws of the sampler training builds (parts.make_sampler): tumor-centred patches are within 1.5
    points of ratio / (13 + ratio) of the class-centred ones, random patches random_patch_fraction of all."""
    from panseg.training.parts import make_sampler

    store_path, case_ids = _store_with_every_class(tmp_path / "store.zarr")
    cfg = build_config("tiny", overrides=[f"train.tumor_sampling_ratio={ratio}",
                                          f"train.random_patch_fraction={random_fraction}"])
    sampler = make_sampler(cfg, store_path, case_ids)
    draws = [r.class_id for it in range(100) for r in sampler.requests(epoch=0, iteration=it, batch_size=200)]
    classes = np.asarray(draws)
    centred = classes[classes >= 0]
    assert len(classes) == 20_000 and set(np.unique(centred)) == set(range(1, 15))
    assert abs(np.mean(classes == -1) - random_fraction) < 0.015
    assert abs(np.mean(centred == 14) - ratio / (13 + ratio)) < 0.015
    organ_shares = np.bincount(centred, minlength=15)[1:14] / len(centred)
    assert np.all(np.abs(organ_shares - 1 / (13 + ratio)) < 0.015)  # each organ weight 1
