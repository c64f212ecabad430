"""The nnU-Net default 3D U-Net (a PlainConvUNet equivalent) and the planning of its strides.

The network is nnU-Net's "3d_fullres" U-Net, written from its description:

- encoder stage `i`: `n_conv_per_stage` blocks of Conv3d(bias) -> InstanceNorm3d(affine) -> LeakyReLU;
  the first conv of a stage has stride `strides[i]` (strided-conv downsampling, no pooling);
- decoder stage: ConvTranspose3d(kernel = stride = the encoder stride it undoes), concatenation with
  the encoder's skip, `n_conv_per_stage` blocks, and a 1x1x1 segmentation head;
- deep supervision: every decoder stage has a head (they exist even when deep supervision is off, so a
  checkpoint loads either way); with it on, `forward` returns every head's logits, highest
  resolution first, as nnU-Net does.

At the paper's plan (6 stages, 32-64-128-256-320-320 features, 1 input channel, 15 classes) it has
exactly nnU-Net's 30,796,459 parameters, and its parameters come in the same order and shapes as
`dynamic_network_architectures`' PlainConvUNet, so that network's weights can be copied over one by one.

This module is pure torch: no Ray, no data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from panseg.config import ModelConfig

Stride = tuple[int, int, int]
_AXIS_NAMES = ("z", "y", "x")

# nnU-Net's anisotropy rule: an axis is pooled only while its spacing is under this multiple of the
# finest spacing, so strongly anisotropic volumes first pool the fine axes until they catch up.
_ANISOTROPY_RATIO = 2.0


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def plan_strides(
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    n_stages: int,
    min_feature_map: int = 4,
) -> tuple[Stride, ...]:
    """The per-stage strides nnU-Net's planner would pick for a patch at a spacing.

    Stage 0 has stride (1, 1, 1). Each later stage halves an axis (stride 2) when both hold:
    - the axis's current feature map is at least `2 * min_feature_map` voxels (so it stays at least
      `min_feature_map` after pooling);
    - its current spacing is less than 2x the finest current spacing among the axes that are large
      enough to pool (nnU-Net's anisotropy rule, `spacing / finest < 2`).
    Otherwise the axis keeps stride 1. Unlike nnU-Net, the number of stages is given (it comes from
    `features_per_stage`), so a stage with nothing left to pool gets (1, 1, 1); nnU-Net's extra rule
    for a single remaining axis (`>= 3 * min_feature_map`) is not applied.

    Args:
        patch_size_zyx: patch size in voxels, (z, y, x).
        spacing_zyx_mm: voxel spacing in mm, (z, y, x).
        n_stages: number of resolution stages (encoder stages, bottleneck included).
        min_feature_map: smallest feature-map size an axis may be pooled down to.

    Returns:
        One (z, y, x) stride per stage.

    Raises:
        ValueError: on a non-positive size, spacing, stage count or minimum feature map.
    """
    _check_triplet("patch_size_zyx", patch_size_zyx)
    _check_triplet("spacing_zyx_mm", spacing_zyx_mm)
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, but it is {n_stages}")
    if min_feature_map < 1:
        raise ValueError(f"min_feature_map must be >= 1, but it is {min_feature_map}")
    size = [int(n) for n in patch_size_zyx]
    spacing = [float(s) for s in spacing_zyx_mm]
    strides: list[Stride] = [(1, 1, 1)]
    for _ in range(1, n_stages):
        stride = _next_stride(size, spacing, min_feature_map)
        strides.append(stride)
        size = [n // k for n, k in zip(size, stride)]
        spacing = [s * k for s, k in zip(spacing, stride)]
    return tuple(strides)


def _next_stride(size: list[int], spacing: list[float], min_feature_map: int) -> Stride:
    poolable = [n >= 2 * min_feature_map for n in size]
    if not any(poolable):
        return (1, 1, 1)
    finest = min(s for s, ok in zip(spacing, poolable) if ok)
    z, y, x = (2 if ok and s / finest < _ANISOTROPY_RATIO else 1 for s, ok in zip(spacing, poolable))
    return (z, y, x)


def required_divisor(strides: Sequence[Sequence[int]]) -> Stride:
    """How much the network downsamples each axis: the product of the strides, (z, y, x)."""
    z, y, x = (math.prod(int(s[axis]) for s in strides) for axis in range(3))
    return (z, y, x)


def check_patch_size(
    patch_size_zyx: Sequence[int],
    strides: Sequence[Sequence[int]],
    name: str = "patch_size_zyx",
) -> None:
    """Check that every axis of a patch divides by the network's total downsampling on that axis.

    Raises:
        ValueError: naming the first bad axis, its divisor and the nearest size that works, e.g.
            "patch_size_zyx[0]=90 must be divisible by 16 (the network downsamples z by 16); try 96".
    """
    if len(patch_size_zyx) != 3:
        raise ValueError(f"{name} must have 3 values (z, y, x), but it is {tuple(patch_size_zyx)}")
    for axis, (size, divisor) in enumerate(zip(patch_size_zyx, required_divisor(strides))):
        if size % divisor:
            nearest = max(divisor, math.floor(size / divisor + 0.5) * divisor)
            raise ValueError(
                f"{name}[{axis}]={size} must be divisible by {divisor} "
                f"(the network downsamples {_AXIS_NAMES[axis]} by {divisor}); try {nearest}"
            )


def _check_triplet(name: str, values: Sequence[float]) -> None:
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be 3 positive values (z, y, x), but it is {tuple(values)}")


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """Conv3d (with bias, as nnU-Net) -> InstanceNorm3d(affine) -> LeakyReLU.

    `kernel_size` is an odd int (cubic) or an odd (z, y, x) triple, e.g. (1, 3, 3) in nnU-Net's plans
    for the first stages of anisotropic data; padding keeps the size ("same").
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], stride: Sequence[int],
        negative_slope: float
    ) -> None:
        super().__init__()
        kernel = _kernel_triple(kernel_size)
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel, stride=tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True
        )
        self.norm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _kernel_triple(kernel_size: int | Sequence[int]) -> Stride:
    """An int kernel size as a cubic (z, y, x) triple; a triple as it is."""
    if isinstance(kernel_size, int):
        return (kernel_size, kernel_size, kernel_size)
    z, y, x = (int(k) for k in kernel_size)
    return (z, y, x)


def conv_stack(
    in_channels: int,
    out_channels: int,
    n_conv: int,
    kernel_size: int | Sequence[int],
    first_stride: Sequence[int],
    negative_slope: float,
) -> nn.Sequential:
    """`n_conv` ConvNormAct blocks; only the first one strides (and changes the channel count)."""
    blocks = [ConvNormAct(in_channels, out_channels, kernel_size, first_stride, negative_slope)]
    blocks += [
        ConvNormAct(out_channels, out_channels, kernel_size, (1, 1, 1), negative_slope) for _ in range(n_conv - 1)
    ]
    return nn.Sequential(*blocks)


class UNet3D(nn.Module):
    """nnU-Net's plain-convolution 3D U-Net.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output classes, background included (15 for organs + tumor).
        features_per_stage: channels of each encoder stage, the bottleneck last.
        strides: one (z, y, x) stride per stage (see `plan_strides`); stage 0 is usually (1, 1, 1).
        n_conv_per_stage: convolutions per encoder and per decoder stage.
        kernel_size: odd cubic kernel size of every convolution, or one odd (z, y, x) kernel per stage
            (nnU-Net's `kernel_sizes`; a decoder stage uses the kernel of the encoder stage it joins).
        deep_supervision: if True, `forward` returns a list of logits, one per decoder stage,
            highest resolution first; if False, only the full-resolution logits. Set the attribute
            to switch (nnU-Net's trainer turns it off for validation and inference); `eval()` alone
            does not change what `forward` returns.
        negative_slope: LeakyReLU slope, also used as the He-initialisation's `a`.

    Raises:
        ValueError: on mismatched or invalid stage settings.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features_per_stage: Sequence[int],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: int = 2,
        kernel_size: int | Sequence[Sequence[int]] = 3,
        deep_supervision: bool = True,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        _check_network_args(in_channels, num_classes, features_per_stage, strides, n_conv_per_stage, kernel_size)
        self.strides: tuple[Stride, ...] = tuple((int(z), int(y), int(x)) for z, y, x in strides)
        self.features_per_stage = tuple(int(f) for f in features_per_stage)
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        features = self.features_per_stage
        kernels = [kernel_size] * len(features) if isinstance(kernel_size, int) else list(kernel_size)

        self.encoder = nn.ModuleList()
        channels = in_channels
        for stage_features, stride, kernel in zip(features, self.strides, kernels):
            stage = conv_stack(channels, stage_features, n_conv_per_stage, kernel, stride, negative_slope)
            self.encoder.append(stage)
            channels = stage_features

        # Decoder modules are ordered from the bottleneck up. They are registered as blocks, then
        # upsamplers, then heads: the order of PlainConvUNet's parameters, so weights map one to one.
        levels = range(len(features) - 1, 0, -1)  # the encoder stage each decoder stage undoes
        self.decoder = nn.ModuleList(
            conv_stack(2 * features[s - 1], features[s - 1], n_conv_per_stage, kernels[s - 1], (1, 1, 1),
                       negative_slope)
            for s in levels
        )
        # bias=True like nnU-Net's conv_bias=True plans; it is part of the 30,796,459 parameters.
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(features[s], features[s - 1], self.strides[s], stride=self.strides[s], bias=True)
            for s in levels
        )
        self.heads = nn.ModuleList(nn.Conv3d(features[s - 1], num_classes, 1, bias=True) for s in levels)
        init_weights(self, negative_slope)

    @property
    def divisor_zyx(self) -> Stride:
        """What every input axis must divide by."""
        return required_divisor(self.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits for a batch of patches.

        Args:
            x: (B, in_channels, D, H, W), each spatial axis divisible by `divisor_zyx`.

        Returns:
            (B, num_classes, D, H, W) logits, or with deep supervision a list of
            (B, num_classes, D_i, H_i, W_i) logits, highest resolution first.
        """
        check_patch_size(tuple(x.shape[2:]), self.strides, name="input shape (D, H, W)")
        skips = []
        for stage in self.encoder:
            x = stage(x)  # (B, F_s, D_s, H_s, W_s)
            skips.append(x)
        x = skips.pop()  # the bottleneck is upsampled, not concatenated
        outputs = []
        last = len(self.decoder) - 1
        for i, (upsample, block, head) in enumerate(zip(self.upsamplers, self.decoder, self.heads)):
            x = upsample(x)  # (B, F_skip, D_skip, H_skip, W_skip)
            x = torch.cat((x, skips.pop()), dim=1)  # (B, 2 * F_skip, D_skip, H_skip, W_skip)
            x = block(x)  # (B, F_skip, D_skip, H_skip, W_skip)
            if self.deep_supervision or i == last:
                outputs.append(head(x))  # (B, num_classes, D_skip, H_skip, W_skip)
        if self.deep_supervision:
            return outputs[::-1]
        return outputs[-1]


def _check_network_args(
    in_channels: int,
    num_classes: int,
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    n_conv_per_stage: int,
    kernel_size: int | Sequence[Sequence[int]],
) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, but it is {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and at least one class), but it is {num_classes}")
    if len(features_per_stage) < 2:
        raise ValueError(f"features_per_stage needs at least 2 stages, but it is {tuple(features_per_stage)}")
    if any(f < 1 for f in features_per_stage):
        raise ValueError(f"features_per_stage must be all >= 1, but it is {tuple(features_per_stage)}")
    if len(strides) != len(features_per_stage):
        raise ValueError(
            f"strides has {len(strides)} entries but features_per_stage has {len(features_per_stage)}; "
            "give one (z, y, x) stride per stage"
        )
    for i, stride in enumerate(strides):
        if len(stride) != 3 or any(int(s) < 1 for s in stride):
            raise ValueError(f"strides[{i}] must be 3 positive integers (z, y, x), but it is {tuple(stride)}")
    if n_conv_per_stage < 1:
        raise ValueError(f"n_conv_per_stage must be >= 1, but it is {n_conv_per_stage}")
    if isinstance(kernel_size, int):
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be a positive odd number, but it is {kernel_size}")
        return
    if len(kernel_size) != len(features_per_stage):
        raise ValueError(f"kernel_size has {len(kernel_size)} per-stage kernels but there are "
                         f"{len(features_per_stage)} stages; give one (z, y, x) kernel per stage")
    for i, kernel in enumerate(kernel_size):
        if len(kernel) != 3 or any(int(k) < 1 or int(k) % 2 != 1 for k in kernel):
            raise ValueError(f"kernel_size[{i}] must be 3 positive odd numbers (z, y, x), but it is {tuple(kernel)}")


def init_weights(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """nnU-Net's He initialisation: kaiming-normal conv weights (a = LeakyReLU slope), zero biases.

    Applies to every Conv3d and ConvTranspose3d inside `module`; norms keep torch's defaults (1, 0).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=negative_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


def build_model(
    model_cfg: ModelConfig,
    num_classes: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    in_channels: int = 1,
) -> UNet3D:
    """The U-Net a config describes, its strides planned from the patch and spacing unless given.

    Args:
        model_cfg: features, convs per stage, kernel size, optional strides, deep supervision.
        num_classes: output classes, background included.
        patch_size_zyx: training patch (also the inference window), voxels (z, y, x).
        spacing_zyx_mm: the preprocessed spacing, mm (z, y, x); used only to plan strides.
        in_channels: image channels.

    Raises:
        ValueError: when the patch does not divide by the network's downsampling, naming the axis
            and a size that works.
    """
    n_stages = len(model_cfg.features_per_stage)
    if model_cfg.strides is None:
        strides = plan_strides(patch_size_zyx, spacing_zyx_mm, n_stages, model_cfg.min_feature_map)
    else:
        strides = model_cfg.strides
    check_patch_size(patch_size_zyx, strides)
    return UNet3D(
        in_channels=in_channels,
        num_classes=num_classes,
        features_per_stage=model_cfg.features_per_stage,
        strides=strides,
        n_conv_per_stage=model_cfg.n_conv_per_stage,
        kernel_size=model_cfg.kernel_size,
        deep_supervision=model_cfg.deep_supervision,
        negative_slope=model_cfg.negative_slope,
    )


__all__ = [
    "ConvNormAct", "UNet3D", "build_model", "check_patch_size", "conv_stack", "count_parameters",
    "init_weights", "plan_strides", "required_divisor",
]
