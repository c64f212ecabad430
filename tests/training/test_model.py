"""Tests of panseg.training.model: stride planning, the patch-size check, nnU-Net parity, shapes, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from panseg.config import ModelConfig
from panseg.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from panseg.training.model import (
    UNet3D,
    build_model,
    check_patch_size,
    count_parameters,
    init_weights,
    plan_strides,
    required_divisor,
)
from tests.optional import import_optional

PAPER_PATCH = (96, 128, 160)
PAPER_SPACING = (1.6, 1.2859, 1.2859)
PAPER_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
PAPER_FEATURES = (32, 64, 128, 256, 320, 320)
NNUNET_PARAMETERS = 30_796_459  # nnU-Net's PlainConvUNet at this plan, 1 channel in, 15 classes


@pytest.fixture(scope="module")
def paper_model() -> UNet3D:
    torch.manual_seed(0)
    return build_model(ModelConfig(), num_classes=15, patch_size_zyx=PAPER_PATCH, spacing_zyx_mm=PAPER_SPACING)


def _tiny_model(deep_supervision: bool = True, num_classes: int = 3) -> UNet3D:
    return UNet3D(1, num_classes, (4, 8, 16), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), deep_supervision=deep_supervision)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def test_plan_strides_paper_plan():
    assert plan_strides(PAPER_PATCH, PAPER_SPACING, 6) == PAPER_STRIDES


@pytest.mark.parametrize(
    ("patch", "spacing", "n_stages", "expected"),
    [
        # isotropic: pool everything until an axis would drop below 4
        ((64, 64, 64), (1.0, 1.0, 1.0), 5, ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))),
        # then nothing is left to pool: stride 1
        ((32, 32, 32), (1.0, 1.0, 1.0), 5, ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))),
        # z 3x coarser: pool y, x first until their spacing catches up (1.5 / 0.5 -> 1.5 / 1 -> 1.5 / 2)
        ((40, 256, 256), (1.5, 0.5, 0.5), 5, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))),
        # exactly 2x coarser is not pooled (nnU-Net: spacing / finest < 2)
        ((64, 64, 64), (2.0, 1.0, 1.0), 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2))),
        # a small axis stops pooling while the others go on
        ((16, 64, 8), (1.0, 1.0, 1.0), 4, ((1, 1, 1), (2, 2, 2), (2, 2, 1), (1, 2, 1))),
        # the finest spacing is taken among the axes that can still pool: once y and x are too small,
        # a z 2.5x coarser than them is pooled
        ((32, 8, 8), (5.0, 1.0, 1.0), 3, ((1, 1, 1), (1, 2, 2), (2, 1, 1))),
        ((16, 64, 64), (1.0, 1.0, 1.0), 1, ((1, 1, 1),)),
    ],
)
def test_plan_strides_cases(patch, spacing, n_stages, expected):
    assert plan_strides(patch, spacing, n_stages) == expected


def test_plan_strides_min_feature_map():
    # min_feature_map 8: an axis pools only while it is >= 16
    assert plan_strides((32, 32, 16), (1.0, 1.0, 1.0), 3, min_feature_map=8) == ((1, 1, 1), (2, 2, 2), (2, 2, 1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((96, 128), PAPER_SPACING, 6), "patch_size_zyx must be 3 positive values"),
        ((PAPER_PATCH, (1.0, 0.0, 1.0), 6), "spacing_zyx_mm must be 3 positive values"),
        ((PAPER_PATCH, PAPER_SPACING, 0), "n_stages must be >= 1"),
    ],
)
def test_plan_strides_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        plan_strides(*args)


def test_required_divisor():
    assert required_divisor(PAPER_STRIDES) == (16, 32, 32)
    assert required_divisor(((1, 1, 1),)) == (1, 1, 1)


def test_check_patch_size_accepts_divisible_patch():
    check_patch_size(PAPER_PATCH, PAPER_STRIDES)
    check_patch_size((32, 64, 64), PAPER_STRIDES)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((90, 128, 160), r"patch_size_zyx\[0\]=90 must be divisible by 16 \(the network downsamples z by 16\); try 96"),
        ((96, 100, 160), r"patch_size_zyx\[1\]=100 must be divisible by 32 \(the network downsamples y by 32\); "
                         r"try 96"),
        ((96, 128, 10), r"patch_size_zyx\[2\]=10 must be divisible by 32 .*; try 32"),
    ],
)
def test_check_patch_size_names_axis_and_fix(patch, message):
    with pytest.raises(ValueError, match=message):
        check_patch_size(patch, PAPER_STRIDES)


def test_build_model_rejects_indivisible_patch():
    cfg = ModelConfig(strides=PAPER_STRIDES)
    with pytest.raises(ValueError, match=r"patch_size_zyx\[0\]=90 must be divisible by 16"):
        build_model(cfg, 15, (90, 128, 160), PAPER_SPACING)


def test_build_model_uses_given_strides():
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    model = build_model(ModelConfig(features_per_stage=(4, 8, 16), strides=strides), 3, (8, 16, 16), (1.0, 1.0, 1.0))
    assert model.strides == strides
    assert model.divisor_zyx == (2, 4, 4)


# ----------------------------------------------------------------------------------------------
# Architecture: nnU-Net parity
# ----------------------------------------------------------------------------------------------


def test_paper_model_has_nnunet_parameter_count(paper_model):
    assert paper_model.strides == PAPER_STRIDES
    assert count_parameters(paper_model) == NNUNET_PARAMETERS


def test_paper_model_matches_plain_conv_unet(paper_model):
    """Same parameter shapes in the same order as PlainConvUNet, and with its weights, the same outputs."""
    unet = import_optional("dynamic_network_architectures.architectures.unet",
                           "pip install --no-deps dynamic-network-architectures==0.4.4 (README)")
    torch.manual_seed(1)
    reference = unet.PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=list(PAPER_FEATURES), conv_op=nn.Conv3d, kernel_sizes=3,
        strides=PAPER_STRIDES, n_conv_per_stage=2, num_classes=15, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, deep_supervision=True,
    )
    assert count_parameters(reference) == count_parameters(paper_model) == NNUNET_PARAMETERS
    ours, theirs = list(paper_model.parameters()), list(reference.parameters())
    assert [p.shape for p in ours] == [p.shape for p in theirs]

    # Weights copied one to one (ours into theirs, so the shared fixture stays as built).
    paper_model.deep_supervision = True
    with torch.no_grad():
        for ref, mine in zip(theirs, ours):
            ref.copy_(mine)
        x = torch.randn(1, 1, 16, 64, 64)  # the smallest z the plan allows: (1, 2, 2) voxels at the bottleneck
        expected, got = reference(x), paper_model(x)
    assert len(got) == len(expected) == 5
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)


def test_layers_are_nnunet_layers(paper_model):
    convs = [m for m in paper_model.modules() if isinstance(m, nn.Conv3d)]
    assert all(c.bias is not None for c in convs)
    first = paper_model.encoder[1][0]  # first block of stage 1: the strided conv
    assert first.conv.stride == (2, 2, 2) and first.conv.kernel_size == (3, 3, 3) and first.conv.padding == (1, 1, 1)
    assert first.norm.affine and first.norm.eps == 1e-5 and not first.norm.track_running_stats
    assert first.act.negative_slope == 0.01
    ups = list(paper_model.upsamplers)
    assert [u.stride for u in ups] == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert all(u.kernel_size == u.stride for u in ups)
    assert [h.out_channels for h in paper_model.heads] == [15] * 5


def test_init_weights_is_he_normal_with_zero_bias():
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 64, 3)
    nn.init.constant_(conv.bias, 0.5)
    init_weights(conv, negative_slope=1e-2)
    assert torch.count_nonzero(conv.bias) == 0
    fan_in = 64 * 27
    expected_std = (2.0 / (1 + 1e-2**2)) ** 0.5 / fan_in**0.5  # kaiming normal, leaky_relu gain, fan_in
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=expected_std * 0.02)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def test_forward_deep_supervision_shapes(paper_model):
    x = torch.randn(1, 1, 32, 64, 64)
    paper_model.deep_supervision = True
    with torch.no_grad():
        outputs = paper_model(x)
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == [
        (1, 15, 32, 64, 64), (1, 15, 16, 32, 32), (1, 15, 8, 16, 16), (1, 15, 4, 8, 8), (1, 15, 2, 4, 4),
    ]


def test_forward_without_deep_supervision_returns_full_resolution_tensor():
    torch.manual_seed(0)
    model = _tiny_model(deep_supervision=True)
    x = torch.randn(2, 1, 8, 12, 16)
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
        model.deep_supervision = False
        only = model(x)
    assert isinstance(only, torch.Tensor)
    assert only.shape == (2, 3, 8, 12, 16)
    torch.testing.assert_close(only, full)  # the same head, just without the others


def test_forward_rejects_indivisible_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"input shape \(D, H, W\)\[1\]=10 must be divisible by 4"):
        model(torch.randn(1, 1, 8, 10, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strides": ((1, 1, 1), (2, 2, 2))}, "strides has 2 entries but features_per_stage has 3"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"kernel_size": 2}, "kernel_size must be a positive odd number"),
        ({"strides": ((1, 1, 1), (2, 0, 2), (2, 2, 2))}, r"strides\[1\] must be 3 positive integers"),
    ],
)
def test_unet_rejects_bad_settings(kwargs, message):
    args = {"in_channels": 1, "num_classes": 3, "features_per_stage": (4, 8, 16),
            "strides": ((1, 1, 1), (2, 2, 2), (2, 2, 2))}
    with pytest.raises(ValueError, match=message):
        UNet3D(**{**args, **kwargs})


def test_gradient_step_reduces_loss():
    torch.manual_seed(0)
    model = _tiny_model(deep_supervision=True)
    x = torch.randn(2, 1, 8, 16, 16)
    target = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()  # (B, D, H, W), learnable from the input
    loss_fn = DeepSupervisionLoss(DiceCELoss(None, 1.0, 1.0), deep_supervision_weights(2))

    before = loss_fn(model(x), target)
    before.backward()
    # heads run bottleneck-up: heads[-1] is full resolution and learns; heads[0] has deep-supervision
    # weight 0, so its gradient is zero (present, so DDP sees every parameter used)
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.heads[-1].parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.heads[0].parameters())
    with torch.no_grad():
        for p in model.parameters():  # one plain gradient-descent step (torch.optim costs ~1 s to import)
            p -= 1e-2 * p.grad
        after = loss_fn(model(x), target)
    assert after.item() < before.item()
