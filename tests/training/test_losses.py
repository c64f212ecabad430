"""Tests of panseg.training.losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from panseg.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    class_weights,
    deep_supervision_scales,
    deep_supervision_weights,
    downsample_targets,
    resize_labels,
    soft_dice_per_class,
    weighted_cross_entropy,
    weighted_dice_loss,
)

SMOOTH = 1e-5


# ----------------------------------------------------------------------------------------------
# The hand-computed case: 2 classes, 4 voxels in a row, p(class 1) = 0.8, 0.6, 0.3, 0.1, target 1, 1, 0, 0.
# ----------------------------------------------------------------------------------------------

P1 = (0.8, 0.6, 0.3, 0.1)
TARGET = (1, 1, 0, 0)


def _four_voxel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, 2, 4, 1, 1) whose softmax is P1 for class 1, and the target (1, 1, 4, 1, 1)."""
    p = torch.tensor(P1, dtype=torch.float64)
    logit1 = torch.log(p / (1 - p))  # class 0 has logit 0, so softmax gives p for class 1
    logits = torch.stack([torch.zeros(4, dtype=torch.float64), logit1])  # (C, D)
    logits = logits.reshape(1, 2, 4, 1, 1).float()  # (B, C, D, H, W)
    target = torch.tensor(TARGET).reshape(1, 1, 4, 1, 1)  # (B, 1, D, H, W)
    return logits, target


# By hand:
#   class 1: intersection 0.8 + 0.6 = 1.4, sum p = 1.8, |y| = 2 -> Dice = 2.8 / 3.8
#   class 0: p = 0.2, 0.4, 0.7, 0.9; intersection 0.7 + 0.9 = 1.6, sum p = 2.2, |y| = 2 -> Dice = 3.2 / 4.2
DICE_1 = (2 * 1.4 + SMOOTH) / (3.8 + SMOOTH)
DICE_0 = (2 * 1.6 + SMOOTH) / (4.2 + SMOOTH)
#   CE: -ln p(true class) per voxel = -ln 0.8, -ln 0.6, -ln 0.7, -ln 0.9
NLL = (-math.log(0.8), -math.log(0.6), -math.log(0.7), -math.log(0.9))


def test_four_voxel_dice_by_hand():
    logits, target = _four_voxel_case()
    assert DICE_1 == pytest.approx(0.7368421, abs=1e-6)
    assert weighted_dice_loss(logits, target).item() == pytest.approx(1 - DICE_1, rel=1e-6)
    assert weighted_dice_loss(logits, target).item() == pytest.approx(0.2631579, abs=1e-6)
    # background included, uniform weights: the usual 1 - mean Dice
    both = weighted_dice_loss(logits, target, include_background=True).item()
    assert both == pytest.approx(1 - (DICE_0 + DICE_1) / 2, rel=1e-6)
    # weights (1, 3): (1 * (1 - Dice_0) + 3 * (1 - Dice_1)) / (1 + 3)
    weighted = weighted_dice_loss(logits, target, torch.tensor([1.0, 3.0]), include_background=True).item()
    assert weighted == pytest.approx((1 - DICE_0 + 3 * (1 - DICE_1)) / 4, rel=1e-6)
    assert weighted == pytest.approx(0.2568922, abs=1e-6)


def test_four_voxel_cross_entropy_by_hand():
    logits, target = _four_voxel_case()
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(sum(NLL) / 4, rel=1e-6)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(0.2990012, abs=1e-6)
    # weights (1, 3): tumor-like class 1 voxels count 3x, normalised by the voxels' weights (3 + 3 + 1 + 1)
    weighted = weighted_cross_entropy(logits, target, torch.tensor([1.0, 3.0])).item()
    assert weighted == pytest.approx((3 * NLL[0] + 3 * NLL[1] + NLL[2] + NLL[3]) / 8, rel=1e-6)
    assert weighted == pytest.approx(0.3329929, abs=1e-6)


def test_four_voxel_dice_ce_by_hand():
    logits, target = _four_voxel_case()
    loss = DiceCELoss(torch.tensor([1.0, 3.0]), alpha_dice=0.5, alpha_ce=0.5)(logits, target).item()
    # Dice without background: class 1 alone, so its weight cancels
    expected = 0.5 * (1 - DICE_1) + 0.5 * (3 * NLL[0] + 3 * NLL[1] + NLL[2] + NLL[3]) / 8
    assert loss == pytest.approx(expected, rel=1e-6)
    only_ce = DiceCELoss(None, alpha_dice=0.0, alpha_ce=1.0)(logits, target).item()
    assert only_ce == pytest.approx(sum(NLL) / 4, rel=1e-6)


def test_target_with_or_without_channel_axis():
    logits, target = _four_voxel_case()
    loss = DiceCELoss(None, 1.0, 1.0)
    assert loss(logits, target).item() == pytest.approx(loss(logits, target[:, 0]).item(), rel=1e-7)
    assert loss(logits, target.to(torch.uint8)).item() == pytest.approx(loss(logits, target).item(), rel=1e-7)


# ----------------------------------------------------------------------------------------------
# Batch Dice versus per-sample Dice
# ----------------------------------------------------------------------------------------------


def test_batch_dice_and_per_sample_dice_by_hand():
    # Sample 0: class 1 on 2 of 4 voxels, predicted exactly. Sample 1: no class 1, one voxel predicted as 1.
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).reshape(2, 1, 4, 1, 1)
    predicted = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    logits = 40.0 * torch.nn.functional.one_hot(predicted, 2).permute(0, 2, 1).reshape(2, 2, 4, 1, 1).float()
    # per sample: Dice 1 and ~0 (smooth / (1 + smooth)) -> loss mean(0, 1) = 0.5
    per_sample = weighted_dice_loss(logits, target, batch_dice=False).item()
    assert per_sample == pytest.approx(0.5, abs=1e-5)
    # batch: intersection 2, predicted 3, true 2 -> Dice 4 / 5 -> loss 0.2
    batch = weighted_dice_loss(logits, target, batch_dice=True).item()
    assert batch == pytest.approx(0.2, abs=1e-5)


def test_soft_dice_per_class_shapes():
    probs = torch.rand(2, 3, 4, 4, 4)
    onehot = torch.rand(2, 3, 4, 4, 4)
    assert soft_dice_per_class(probs, onehot, batch_dice=True).shape == (3,)
    assert soft_dice_per_class(probs, onehot, batch_dice=False).shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# Weights do what they should
# ----------------------------------------------------------------------------------------------


def _fifteen_class_case(bad_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class 0-14 on 3 voxels; logits 20 on the true class, except `bad_class`'s voxels, predicted background."""
    labels = torch.arange(15).repeat(3).reshape(1, 1, 3, 15)  # (B, D, H, W)
    predicted = torch.where(labels == bad_class, torch.zeros_like(labels), labels)
    logits = 20.0 * torch.nn.functional.one_hot(predicted, 15).permute(0, 4, 1, 2, 3).float()  # (B, C, D, H, W)
    return logits, labels


def test_class_weights():
    w = class_weights(15, tumor_weight=5.0)
    assert w.tolist() == [1.0] * 14 + [5.0]
    assert class_weights(15, 5.0, background_weight=0.5).tolist() == [0.5] + [1.0] * 13 + [5.0]
    assert class_weights(14, 5.0).tolist() == [1.0] * 14  # organ model: no tumor class
    with pytest.raises(ValueError, match="tumor_weight and background_weight must be > 0"):
        class_weights(15, 0.0)


@pytest.mark.parametrize("tumor_weight", [5.0, 10.0])
def test_tumor_weight_scales_a_missed_tumor(tumor_weight):
    # Organs perfect, tumor (3 voxels) missed entirely: only the tumor term is non-zero.
    logits, labels = _fifteen_class_case(bad_class=14)
    w = class_weights(15, tumor_weight)
    # Dice: w_t * (1 - 0) / (13 organs * 1 + w_t)   -> 5/18 = 0.2778, 10/23 = 0.4348
    dice = weighted_dice_loss(logits, labels, w).item()
    assert dice == pytest.approx(tumor_weight / (13 + tumor_weight), abs=1e-5)
    # CE: each missed tumor voxel costs -ln softmax = 20; voxel weights are 14 * 3 * 1 + 3 * w_t
    ce = weighted_cross_entropy(logits, labels, w).item()
    assert ce == pytest.approx(3 * tumor_weight * 20 / (42 + 3 * tumor_weight), rel=1e-5)


def test_doubling_tumor_weight_moves_the_loss_towards_the_tumor_term():
    loss_at = {}
    for bad in (14, 1):  # a missed tumor, then a missed organ (liver)
        logits, labels = _fifteen_class_case(bad_class=bad)
        loss_at[bad] = [DiceCELoss(class_weights(15, t), 0.5, 0.5)(logits, labels).item() for t in (5.0, 10.0)]
    # missed tumor: Dice 5/18 -> 10/23, CE 100/19 -> 200/24
    assert loss_at[14][0] == pytest.approx(0.5 * 5 / 18 + 0.5 * 100 / 19, rel=1e-4)
    assert loss_at[14][1] == pytest.approx(0.5 * 10 / 23 + 0.5 * 200 / 24, rel=1e-4)
    # missed liver: the tumor weight only grows the normaliser, so the loss falls (Dice 1/18 -> 1/23)
    assert loss_at[1][1] < loss_at[1][0]
    assert loss_at[1][0] == pytest.approx(0.5 * 1 / 18 + 0.5 * 3 * 20 / (42 + 15), rel=1e-4)


def test_bad_weights_are_rejected():
    logits, target = _four_voxel_case()
    with pytest.raises(ValueError, match=r"class weights must have shape \(2,\)"):
        weighted_dice_loss(logits, target, torch.ones(3))
    with pytest.raises(ValueError, match="at least one used class above 0"):
        DiceCELoss(torch.tensor([1.0, 0.0]), 1.0, 1.0)  # background excluded: nothing left to weigh
    with pytest.raises(ValueError, match="the loss has 3 class weights but the logits have 2 classes"):
        DiceCELoss(torch.ones(3), 1.0, 1.0)(logits, target)
    with pytest.raises(ValueError, match="alpha_dice and alpha_ce"):
        DiceCELoss(None, 0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Perfect predictions and edge cases
# ----------------------------------------------------------------------------------------------


def test_perfect_prediction_has_zero_loss():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 4, 4, 4))
    labels[..., 0, 0, 0] = 5  # classes 4 and 6 absent: smoothing makes their Dice ~1, not 0/0
    logits = 30.0 * torch.nn.functional.one_hot(labels, 7).permute(0, 4, 1, 2, 3).float()
    for batch_dice in (True, False):
        for include_background in (True, False):
            dice = weighted_dice_loss(logits, labels, include_background=include_background, batch_dice=batch_dice)
            assert dice.item() == pytest.approx(0.0, abs=1e-5)
    assert weighted_cross_entropy(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    weighted = DiceCELoss(class_weights(7, 5.0, tumor_id=6), 0.5, 0.5)
    assert weighted(logits, labels).item() == pytest.approx(0.0, abs=1e-5)


def test_low_precision_logits_give_float32_loss_and_gradients():
    logits, target = _four_voxel_case()
    logits = logits.bfloat16().requires_grad_()
    loss = DiceCELoss(None, 1.0, 1.0)(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.zeros(1, 4, 1, 1, dtype=torch.long) + 2, r"target labels must be in \[0, 1\], but they span \[2, 2\]"),
        (torch.zeros(1, 3, 1, 1, dtype=torch.long), "does not match logits"),
        (torch.zeros(1, 2, 4, 1, 1, dtype=torch.long), "a 5-D target must have 1 channel"),
        (torch.zeros(4, 1, 1, dtype=torch.long), r"target must be \(B, 1, D, H, W\) or \(B, D, H, W\)"),
        (torch.full((1, 4, 1, 1), 0.5), "integer class ids"),
    ],
)
def test_bad_targets_are_rejected(target, message):
    logits, _ = _four_voxel_case()
    with pytest.raises(ValueError, match=message):
        DiceCELoss(None, 1.0, 1.0)(logits, target)


# ----------------------------------------------------------------------------------------------
# Deep supervision
# ----------------------------------------------------------------------------------------------


def test_deep_supervision_weights():
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert deep_supervision_weights(2) == pytest.approx([1.0, 0.0])
    assert deep_supervision_weights(1) == (1.0,)
    assert sum(deep_supervision_weights(7)) == pytest.approx(1.0)


def test_deep_supervision_scales_match_the_network_outputs():
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    scales = deep_supervision_scales(strides)
    assert scales == ((1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.125, 0.125, 0.125), (0.0625,) * 3)
    target = torch.zeros(2, 1, 32, 64, 64, dtype=torch.uint8)
    shapes = [tuple(t.shape) for t in downsample_targets(target, scales)]
    # the shapes UNet3D returns for a (32, 64, 64) patch at the paper's plan
    assert shapes == [(2, 1, 32, 64, 64), (2, 1, 16, 32, 32), (2, 1, 8, 16, 16), (2, 1, 4, 8, 8), (2, 1, 2, 4, 4)]
    anisotropic = deep_supervision_scales(((1, 1, 1), (1, 2, 2), (2, 2, 2)))
    assert anisotropic == ((1, 1, 1), (1.0, 0.5, 0.5))


def test_resize_labels_is_nearest_exact():
    labels = torch.randint(0, 15, (1, 1, 8, 8, 8))
    half = resize_labels(labels, (4, 4, 4))
    # nearest-exact at factor 2 keeps voxels 1, 3, 5, 7 of each axis: no new values, no mixing
    assert torch.equal(half, labels[:, :, 1::2, 1::2, 1::2])
    assert half.dtype == torch.int64
    assert torch.equal(resize_labels(labels[:, 0], (8, 8, 8)), labels)  # same shape: unchanged (with channel axis)
    mixed = resize_labels(labels, (8, 4, 2))  # per-axis factors 1, 2, 4
    assert torch.equal(mixed, labels[:, :, :, 1::2, 2::4])


def _three_outputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    return outputs, target


def test_deep_supervision_loss_is_the_weighted_sum():
    outputs, target = _three_outputs()
    base = DiceCELoss(class_weights(3, 5.0, tumor_id=2), 0.5, 0.5)
    loss = DeepSupervisionLoss(base, deep_supervision_weights(3))  # (2/3, 1/3, 0)
    expected = 2 / 3 * base(outputs[0], target) + 1 / 3 * base(outputs[1], target[:, :, 1::2, 1::2, 1::2])
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # the lowest resolution has weight 0: changing it changes nothing
    outputs[2] = outputs[2] * 100
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # precomputed targets give the same
    targets = downsample_targets(target, ((1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert loss(outputs, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # without deep supervision the network returns one tensor: the plain loss
    assert loss(outputs[0], target).item() == pytest.approx(base(outputs[0], target).item(), rel=1e-6)


def test_deep_supervision_loss_rejects_mismatched_outputs():
    outputs, target = _three_outputs()
    loss = DeepSupervisionLoss(DiceCELoss(None, 1.0, 1.0), deep_supervision_weights(5))
    with pytest.raises(ValueError, match="the network gave 3 outputs but there are 5 deep-supervision weights"):
        loss(outputs, target)
    with pytest.raises(ValueError, match="weights must be >= 0 with a positive sum"):
        DeepSupervisionLoss(DiceCELoss(None, 1.0, 1.0), (0.0, 0.0))
