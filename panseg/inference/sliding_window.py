"""Sliding-window prediction of one preprocessed volume (pure torch, no Ray, no file I/O).

Windows of the training patch size are placed with a step of `step_fraction` of the window (paper:
7/8), the network's logits are weighted by a Gaussian importance map (sigma = window * 1/8, as
nnU-Net), accumulated in place on the device, and normalised by the summed weights. Several windows
go through the network in one forward pass.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, step_fraction: float) -> list[int]:
    """Start positions along one axis covering [0, size) with windows of `window` (size >= window).

    The windows are spread evenly so the first starts at 0 and the last ends at `size`, with a step of
    at most `step_fraction * window` (nnU-Net's rule).
    """
    if size <= window:
        return [0]
    max_step = max(1, int(window * step_fraction))
    steps = math.ceil((size - window) / max_step)
    actual = (size - window) / steps
    return [int(round(actual * i)) for i in range(steps + 1)]


def gaussian_importance(window_zyx: tuple[int, int, int], sigma_scale: float = 0.125,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """A separable Gaussian peaked at the window centre, max 1, never 0 (min clamped to the smallest
    positive value so border voxels still count).
    """
    axes = []
    for n in window_zyx:
        coords = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]  # (D, H, W)
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min())


def _pad_to_window(image: torch.Tensor, window_zyx: tuple[int, int, int]) -> tuple[torch.Tensor, list[slice]]:
    """Pad (B, C, D, H, W) symmetrically up to the window where smaller; return the crop back."""
    pads, crop = [], []
    for size, win in zip(image.shape[2:], window_zyx):
        total = max(0, win - size)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
    return (F.pad(image, flat) if any(flat) else image), crop


@torch.inference_mode()
def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, window_zyx: tuple[int, int, int],
                          num_classes: int, step_fraction: float = 0.875, sigma_scale: float = 0.125,
                          windows_per_batch: int = 2, autocast_dtype: torch.dtype | None = None,
                          mirror_axes: tuple[int, ...] = (), fixed_batch: bool = False,
                          importance: torch.Tensor | None = None,
                          starts_fn: Callable[[int, int], list[int]] | None = None,
                          accumulate_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of a whole volume.

    Args:
        model: maps (N, C_in, *window) to (N, num_classes, *window) logits (or a list whose first item is).
        image: (1, C_in, D, H, W) on the model's device.
        window_zyx: window size (the training patch).
        num_classes: output channels.
        step_fraction: step as a fraction of the window (0.875 = 7/8).
        sigma_scale: Gaussian sigma as a fraction of the window.
        windows_per_batch: windows per forward pass.
        autocast_dtype: e.g. torch.bfloat16 on GPU; None runs in the model's dtype.
        mirror_axes: spatial axes (0, 1, 2 = z, y, x) to mirror for test-time augmentation.
        fixed_batch: fill the last pass up to `windows_per_batch` by repeating its last window (whose
            extra outputs are dropped), so the network only ever sees one batch shape: a compiled
            network then compiles once.

    Returns:
        (num_classes, D, H, W) float32 logits averaged over windows, on the image's device.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, D, H, W), but it is {tuple(image.shape)}")
    padded, crop = _pad_to_window(image, window_zyx)
    shape = padded.shape[2:]
    device = padded.device
    if importance is None:
        weights = gaussian_importance(window_zyx, sigma_scale, device)  # (d, h, w)
    else:
        weights = importance.to(device=device, dtype=torch.float32)
    if starts_fn is None:
        def starts_fn(size: int, window: int) -> list[int]:
            return window_starts(size, window, step_fraction)
    logits = torch.zeros((num_classes, *shape), dtype=accumulate_dtype, device=device)  # (K, D, H, W)
    norm = torch.zeros(shape, dtype=accumulate_dtype, device=device)
    sum_weights = weights.to(accumulate_dtype)
    starts = list(itertools.product(*(starts_fn(s, w) for s, w in zip(shape, window_zyx))))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for i in range(0, len(starts), windows_per_batch):
        group = starts[i:i + windows_per_batch]
        slices = [tuple(slice(s, s + w) for s, w in zip(start, window_zyx)) for start in group]
        windows = [padded[(0, slice(None)) + sl][None] for sl in slices]
        if fixed_batch:
            windows += windows[-1:] * (windows_per_batch - len(windows))
        batch = torch.cat(windows)  # (N, C, d, h, w)
        with amp:
            out = _forward_with_mirroring(model, batch, mirror_axes)[:len(slices)]
        for sl, window_logits in zip(slices, out.float()):
            if accumulate_dtype == torch.float32:
                logits[(slice(None),) + sl].addcmul_(window_logits, weights)  # in place: no window-sized temporary
            else:  # the float32 product rounded once into the sum, as nnU-Net's `predicted_logits[sl] += prediction`
                logits[(slice(None),) + sl] += window_logits * weights
            norm[sl] += sum_weights
    logits /= norm
    return logits[(slice(None),) + tuple(crop)]


def _forward_with_mirroring(model: torch.nn.Module, batch: torch.Tensor, mirror_axes: tuple[int, ...]) -> torch.Tensor:
    out = _first(model(batch))
    if not mirror_axes:
        return out
    combos = [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        out = out + torch.flip(_first(model(torch.flip(batch, dims))), dims)
    return out / (len(combos) + 1)


def _first(output) -> torch.Tensor:
    """Deep-supervision models return a list, highest resolution first."""
    return output[0] if isinstance(output, (list, tuple)) else output
