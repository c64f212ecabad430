"""Class-weighted soft Dice + cross-entropy (paper eq. 1-3) and nnU-Net's deep supervision.

Conventions, written down once:

- Logits are (B, C, D, H, W); targets are integer label maps (B, 1, D, H, W) or (B, D, H, W).
  Losses are computed in float32 whatever the logits' dtype (autocast-safe).
- Dice (`weighted_dice_loss`): soft Dice on softmax probabilities with nnU-Net's smoothing,
  `dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth)`, smooth = 1e-5, so a
  class absent from both target and prediction scores ~1, not 0/0.
  The loss is paper eq. (1) normalised by the weights used:
  `sum_c w_c * (1 - dice_c) / sum_c w_c` over the classes used (background excluded by default).
  A uniform weight vector gives the usual `1 - mean Dice`; weights change the balance between classes,
  not the scale. nnU-Net returns `-mean Dice` instead; the two differ by a constant (same gradient).
- Batch Dice (`batch_dice=True`, the default): the sums run over the batch and the voxels, one Dice
  per class. This is what nnU-Net v1 and v2 use for 3d_fullres when the dataset also gets a 3d_lowres
  configuration (large images such as whole-body CT, and so the released FLARE24 code, which trained
  nnU-Net v1 3d_fullres); with small patches centred on one class, it keeps classes absent from one
  patch from dominating the loss. `batch_dice=False` computes Dice per sample (nnU-Net's choice for
  datasets of small images) and averages the per-sample weighted losses.
- Under DDP (`DiceCELoss(across_ranks=True)`, what training builds with more than one worker) the
  batch is the global batch, as nnU-Net does it (it all-gathers tp/fp/fn when DDP is on): batch
  Dice's sums, CE's weight normaliser and the per-sample mean run over every rank's samples
  (`all_reduce` of the sums, gloo or NCCL), and each rank's gradient is scaled by the world size,
  so DDP's gradient average is exactly the gradient of the loss on all ranks' batches together
  (tests/training/test_ddp.py). Without it every term would be normalised per worker.
- Cross-entropy (`weighted_cross_entropy`): torch's weighted CE with mean reduction, i.e.
  `sum_v w[y_v] * nll_v / sum_v w[y_v]`: normalised by the voxels' weights, so a uniform weight
  vector gives plain mean CE and weights shift importance between voxels. This is multi-class CE,
  as in the released code, not eq. (2)'s per-class binary form. CE always includes background.
- Deep supervision: output i (highest resolution first) gets nnU-Net's weight 1/2^i, the
  lowest-resolution output 0, normalised to sum 1. Its target is the label map resized to the
  output's shape with `F.interpolate(mode='nearest-exact')` (what nnU-Net v2's
  DownsampleSegForDSTransform does): at a factor-2 downsampling it keeps the odd voxels
  `1, 3, 5, ...` of each axis; no pooling, no label mixing.

Pure torch: no Ray, nothing from the rest of panseg.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DICE_SMOOTH = 1e-5  # nnU-Net's smoothing for its Dice loss


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def class_weights(
    num_classes: int, tumor_weight: float, background_weight: float = 1.0, tumor_id: int = 14
) -> torch.Tensor:
    """Per-class loss weights: background `background_weight`, tumor `tumor_weight`, every other class 1.

    The tumor weight applies only when `tumor_id < num_classes` (an organ-only model has no tumor).

    Returns:
        float32 tensor of shape (num_classes,).

    Raises:
        ValueError: on fewer than 2 classes or a weight that is not > 0.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, but it is {num_classes}")
    if tumor_weight <= 0 or background_weight <= 0:
        raise ValueError(
            f"tumor_weight and background_weight must be > 0, but they are {tumor_weight} and {background_weight}"
        )
    weights = torch.ones(num_classes, dtype=torch.float32)
    weights[0] = background_weight
    if 0 < tumor_id < num_classes:
        weights[tumor_id] = tumor_weight
    return weights


def deep_supervision_weights(n_outputs: int) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights: 1/2^i per output, the last (lowest resolution) 0, sum 1.

    For 5 outputs: (8, 4, 2, 1, 0) / 15. A single output gets weight 1.
    """
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, but it is {n_outputs}")
    raw = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        raw[-1] = 0.0
    total = sum(raw)
    return tuple(w / total for w in raw)


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> tuple[tuple[float, float, float], ...]:
    """Each deep-supervision output's size relative to the input, per axis, highest resolution first.

    One entry per decoder stage (len(strides) - 1), e.g. strides (1,1,1),(2,2,2),(1,2,2) give
    ((1, 1, 1), (0.5, 0.5, 0.5)).
    """
    scales = []
    factor = [1, 1, 1]
    for stride in strides[:-1]:
        factor = [f * int(s) for f, s in zip(factor, stride)]
        scales.append((1.0 / factor[0], 1.0 / factor[1], 1.0 / factor[2]))
    return tuple(scales)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def as_label_map(target: torch.Tensor) -> torch.Tensor:
    """A label map as (B, D, H, W) int64, from (B, 1, D, H, W) or (B, D, H, W)."""
    if target.ndim == 5:
        if target.shape[1] != 1:
            raise ValueError(
                f"a 5-D target must have 1 channel (B, 1, D, H, W), but its shape is {tuple(target.shape)}"
            )
        target = target[:, 0]  # (B, D, H, W)
    elif target.ndim != 4:
        raise ValueError(f"target must be (B, 1, D, H, W) or (B, D, H, W), but its shape is {tuple(target.shape)}")
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise ValueError("target must hold integer class ids, but it holds non-integer values")
    return target.long()


def resize_labels(target: torch.Tensor, shape_zyx: Sequence[int]) -> torch.Tensor:
    """A label map resized to `shape_zyx` by nearest-exact sampling; labels are never mixed.

    Args:
        target: (B, 1, D, H, W) or (B, D, H, W) integer labels.
        shape_zyx: the new (D, H, W).

    Returns:
        (B, 1, *shape_zyx) int64 labels (the input itself, as int64, when the shape already matches).
    """
    labels = as_label_map(target)[:, None]  # (B, 1, D, H, W)
    if tuple(labels.shape[2:]) == tuple(shape_zyx):
        return labels
    # float32 holds label ids exactly; interpolate has no integer kernels.
    resized = F.interpolate(labels.float(), size=tuple(int(n) for n in shape_zyx), mode="nearest-exact")
    return resized.long()  # (B, 1, d, h, w)


def downsample_targets(target: torch.Tensor, scales: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """One label map per deep-supervision output, each `round(size * scale)` per axis.

    Args:
        target: (B, 1, D, H, W) or (B, D, H, W) integer labels at full resolution.
        scales: per output, its (z, y, x) size relative to the target (see `deep_supervision_scales`).

    Returns:
        A list of (B, 1, d_i, h_i, w_i) int64 label maps, in the order of `scales`.
    """
    shape = as_label_map(target).shape[1:]
    return [resize_labels(target, [round(n * s) for n, s in zip(shape, scale)]) for scale in scales]


# ----------------------------------------------------------------------------------------------
# Dice and cross-entropy
# ----------------------------------------------------------------------------------------------


def soft_dice_per_class(
    probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool = True, smooth: float = DICE_SMOOTH,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Soft Dice of each class, nnU-Net style.

    Args:
        probs: (B, C, D, H, W) class probabilities.
        onehot: (B, C, D, H, W) one-hot target, same classes as `probs`.
        batch_dice: sum over the batch as well (one Dice per class) or Dice per sample.
        smooth: added to numerator and denominator.
        total: with `batch_dice`, sums the batch's sums over the ranks (`sum_over_ranks`); None: local.

    Returns:
        (C,) with `batch_dice`, else (B, C).
    """
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    intersect = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    if batch_dice and total is not None:
        intersect, denominator = total(intersect), total(denominator)
    return (2 * intersect + smooth) / (denominator + smooth).clamp_min(1e-8)


def weighted_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    include_background: bool = False,
    batch_dice: bool = True,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Paper eq. (1), normalised: `sum_c w_c (1 - dice_c) / sum_c w_c` over the classes used.

    Args:
        logits: (B, C, D, H, W) raw scores (softmax is applied here).
        target: (B, 1, D, H, W) or (B, D, H, W) integer labels in [0, C).
        weights: (C,) per-class weights for all C classes (background's is ignored unless
            `include_background`); None means uniform.
        include_background: include class 0 in the Dice.
        batch_dice: see the module docstring; per-sample losses are averaged over the batch.
        smooth: Dice smoothing.

    Returns:
        A scalar in [0, 1].
    """
    labels = _checked_labels(logits, target)
    w = _checked_weights(weights, logits.shape[1], include_background)
    return _dice_loss(logits, labels, w, include_background, batch_dice, smooth)


def _dice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    include_background: bool,
    batch_dice: bool,
    smooth: float,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`weighted_dice_loss` on checked (B, D, H, W) labels and weights; `total` as in `soft_dice_per_class`
    (and the per-sample mean then runs over every rank's samples)."""
    probs = torch.softmax(logits.float(), dim=1)  # (B, C, D, H, W)
    onehot = _one_hot(labels, logits.shape[1])  # (B, C, D, H, W)
    first = 0 if include_background else 1
    dice = soft_dice_per_class(probs[:, first:], onehot[:, first:], batch_dice, smooth, total)  # (C',) or (B, C')
    w = _weights_on(weights, logits.shape[1], logits.device)[first:]
    per_item = ((1 - dice) * w).sum(-1) / w.sum()  # () with batch Dice, else (B,)
    if total is None or batch_dice:
        return per_item.mean()
    return total(per_item.sum()) / total(per_item.new_tensor(float(per_item.shape[0])))


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's class-weighted cross-entropy, mean over voxels weighted by their class weight.

    Args:
        logits: (B, C, D, H, W) raw scores.
        target: (B, 1, D, H, W) or (B, D, H, W) integer labels in [0, C).
        weights: (C,) per-class weights, or None for plain mean CE.

    Returns:
        `sum_v w[y_v] * -log p_v(y_v) / sum_v w[y_v]`, a scalar.
    """
    labels = _checked_labels(logits, target)
    w = _checked_weights(weights, logits.shape[1], include_background=True)
    return _cross_entropy(logits, labels, w)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                   total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted mean CE; with `total` (`sum_over_ranks`) the weighted sum and its normaliser span all ranks."""
    w = None if weights is None else _weights_on(weights, logits.shape[1], logits.device)
    if total is None:
        return F.cross_entropy(logits.float(), labels, weight=w)
    summed = F.cross_entropy(logits.float(), labels, weight=w, reduction="sum")
    normaliser = w[labels].sum() if w is not None else summed.new_tensor(float(labels.numel()))
    return total(summed) / total(normaliser)


def sum_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """`local` summed over the ranks of the default process group; the gradient flows into `local` only.

    The value is the global sum on every rank; autograd sees `local + constant`. (nnU-Net's
    AllGatherGrad sends the other ranks' gradients back instead; scaling the gradient by the world
    size, as `DiceCELoss` does, gives DDP's average the same result with one all_reduce per sum.)
    """
    others = local.detach().clone()
    torch.distributed.all_reduce(others)
    return local + (others - local.detach())


def _world_size() -> int:
    """The default process group's size, 1 when there is none (one process)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


class DiceCELoss(nn.Module):
    """`alpha_dice * weighted Dice + alpha_ce * weighted CE` (paper eq. 3) for one output.

    Args:
        class_weights: (C,) per-class weights used by both terms (see `class_weights`), or None.
        alpha_dice: weight of the Dice term (paper 0.5, released code 1).
        alpha_ce: weight of the CE term (paper 0.5, released code 1).
        include_background: include background in the Dice term (CE always includes it).
        batch_dice: Dice over the whole batch (default, nnU-Net 3d_fullres on large images) or per sample.
        smooth: Dice smoothing.
        across_ranks: under DDP, the loss of the global batch (see the module docstring); a no-op
            without a process group of more than one rank.
    """

    def __init__(
        self,
        class_weights: torch.Tensor | None,
        alpha_dice: float,
        alpha_ce: float,
        include_background: bool = False,
        batch_dice: bool = True,
        smooth: float = DICE_SMOOTH,
        across_ranks: bool = False,
    ) -> None:
        super().__init__()
        if alpha_dice < 0 or alpha_ce < 0 or alpha_dice + alpha_ce == 0:
            raise ValueError(
                f"alpha_dice and alpha_ce must be >= 0 and not both 0, but they are {alpha_dice}, {alpha_ce}"
            )
        # Checked once here, not per step (a check of GPU values would synchronise every step).
        if class_weights is not None:
            class_weights = _checked_weights(class_weights, class_weights.shape[0], include_background)
        # A buffer, so .to(device) moves the weights with the module.
        self.register_buffer("class_weights", class_weights)
        self.alpha_dice = alpha_dice
        self.alpha_ce = alpha_ce
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.across_ranks = across_ranks

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of (B, C, D, H, W) logits against (B, 1, D, H, W) or (B, D, H, W) labels."""
        labels = _checked_labels(logits, target)
        if self.class_weights is not None and self.class_weights.shape != (logits.shape[1],):
            raise ValueError(
                f"the loss has {self.class_weights.shape[0]} class weights "
                f"but the logits have {logits.shape[1]} classes"
            )
        world = _world_size() if self.across_ranks else 1
        total = sum_over_ranks if world > 1 else None
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.alpha_dice:
            dice = _dice_loss(logits, labels, self.class_weights, self.include_background, self.batch_dice,
                              self.smooth, total)
            loss = loss + self.alpha_dice * dice
        if self.alpha_ce:
            loss = loss + self.alpha_ce * _cross_entropy(logits, labels, self.class_weights, total)
        if world > 1:  # each rank's gradient reaches only its own sums: x world, so DDP's mean is the total
            loss = loss * world - loss.detach() * (world - 1)
        return loss


class DeepSupervisionLoss(nn.Module):
    """`sum_i weights[i] * loss(outputs[i], target resized to outputs[i])`.

    Args:
        loss: the per-output loss, called as `loss(logits, target)`.
        weights: one weight per output, highest resolution first (see `deep_supervision_weights`).

    `forward(outputs, target)` takes the network's list of logits (or a single tensor, then the
    plain loss is returned) and either the full-resolution label map, which is resized to each
    output's shape, or a list of targets already matching the outputs.

    An output with weight 0 is still computed and multiplied by 0 (nnU-Net skips it): its head then
    gets a zero gradient instead of none, so DDP needs no `find_unused_parameters` (nnU-Net works
    around the same DDP error with a weight of 1e-6). The gradients are the same; the cost is a loss
    on the smallest output.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, but they are {tuple(weights)}")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target if isinstance(target, torch.Tensor) else target[0])
        if len(outputs) != len(self.weights):
            raise ValueError(
                f"the network gave {len(outputs)} outputs but there are {len(self.weights)} deep-supervision "
                "weights; build the weights with deep_supervision_weights(len(outputs))"
            )
        if not isinstance(target, torch.Tensor) and len(target) != len(outputs):
            raise ValueError(f"got {len(target)} targets for {len(outputs)} outputs")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for i, (logits, weight) in enumerate(zip(outputs, self.weights)):
            t = resize_labels(target, logits.shape[2:]) if isinstance(target, torch.Tensor) else target[i]
            total = total + weight * self.loss(logits, t)
        return total


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _checked_labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) int64 labels matching `logits`, or a ValueError saying what does not match."""
    if logits.ndim != 5:
        raise ValueError(f"logits must be (B, C, D, H, W), but their shape is {tuple(logits.shape)}")
    labels = as_label_map(target)
    if labels.shape[0] != logits.shape[0] or labels.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            "expected (B, 1, D, H, W) or (B, D, H, W) with the logits' B, D, H, W"
        )
    # One small reduction: out-of-range labels otherwise end in an opaque CUDA device-side assert.
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"target labels must be in [0, {logits.shape[1] - 1}], but they span [{low}, {high}]")
    return labels


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, D, H, W) int64 -> (B, C, D, H, W) float32 one-hot."""
    onehot = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), dtype=torch.float32, device=labels.device)
    return onehot.scatter_(1, labels[:, None], 1.0)


def _checked_weights(weights: torch.Tensor | None, num_classes: int, include_background: bool) -> torch.Tensor | None:
    """Validated float32 per-class weights (or None): shape (C,), >= 0, some used weight > 0."""
    if weights is None:
        return None
    if weights.shape != (num_classes,):
        raise ValueError(f"class weights must have shape ({num_classes},), but theirs is {tuple(weights.shape)}")
    weights = weights.detach().float()
    used = weights if include_background else weights[1:]
    if bool((weights < 0).any()) or not bool((used > 0).any()):
        raise ValueError(
            f"class weights must be >= 0 with at least one used class above 0 "
            f"(include_background={include_background}), but they are {weights.tolist()}"
        )
    return weights.clone()


def _weights_on(weights: torch.Tensor | None, num_classes: int, device: torch.device) -> torch.Tensor:
    """The weights on `device` (uniform when None); values were checked by `_checked_weights`."""
    if weights is None:
        return torch.ones(num_classes, dtype=torch.float32, device=device)
    return weights.to(device=device, dtype=torch.float32)


__all__ = [
    "DICE_SMOOTH", "DeepSupervisionLoss", "DiceCELoss", "as_label_map", "class_weights", "deep_supervision_scales",
    "deep_supervision_weights", "downsample_targets", "resize_labels", "soft_dice_per_class", "sum_over_ranks",
    "weighted_cross_entropy", "weighted_dice_loss",
]
