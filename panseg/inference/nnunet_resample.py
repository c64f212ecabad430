"""nnU-Net v2's resampling rules (`resample_data_or_seg_to_shape`), computed faster.

The rules, as nnU-Net v2.8.1 applies them (preprocessing/resampling/default_resampling.py):

- new shape = round(old_spacing / new_spacing * old_shape) per axis (Python's round);
- "separate z" when the larger of the current or target spacing is anisotropic (max / min > 3) with a
  single coarsest axis (unless the plan forces it on or off): each slice across that axis is resized in
  2D with the plan's `order`, then the slices are resampled along the axis with `order_z` (0: nearest);
- otherwise the whole volume is resized in 3D with `order`;
- a resize is skimage's `resize(mode='edge', anti_aliasing=False)`: scipy's spline `zoom` with
  `grid_mode=True` and mode 'nearest', then clipped to the input's [min, max] (per 2D slice in
  separate-z resampling).

What panseg does differently is only how it computes them. A spline zoom is separable: it equals three
1D resamplings, each a fixed (new x old) matrix. panseg takes each matrix from scipy itself (the zoom
or `map_coordinates` of an identity) and applies it with torch matmuls in float32, where nnU-Net loops
over slices in float64. Order 1 (the default for probabilities) is torch's (bi/tri)linear interpolation
with `align_corners=False`, which is the same map. Pure numpy/scipy/torch; no Ray.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's `compute_new_shape`."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, new_spacing, shape))


def separate_axis(spacing: Sequence[float], new_spacing: Sequence[float],
                  force_separate_z: bool | None) -> int | None:
    """The axis resampled apart (nnU-Net's `determine_do_sep_z_and_axis`), None for a plain 3D resize."""
    if force_separate_z is not None:
        axes = _coarsest_axes(spacing) if force_separate_z else []
    elif max(spacing) / min(spacing) > ANISO_THRESHOLD:
        axes = _coarsest_axes(spacing)
    elif max(new_spacing) / min(new_spacing) > ANISO_THRESHOLD:
        axes = _coarsest_axes(new_spacing)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def _coarsest_axes(spacing: Sequence[float]) -> list[int]:
    top = max(spacing)
    return [i for i, s in enumerate(spacing) if top / s == 1]


def resample(data: np.ndarray | torch.Tensor, new_shape: Sequence[int], spacing: Sequence[float],
             new_spacing: Sequence[float], order: int, order_z: int, force_separate_z: bool | None,
             threads: int = 1) -> torch.Tensor:
    """Resample (C, D, H, W) data to `new_shape` by nnU-Net's rules (see the module docstring).

    Returns:
        float32 (C, *new_shape) tensor on the CPU.
    """
    x = torch.as_tensor(data).float()
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(x.shape[1:]) == new_shape:
        return x
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        axis = separate_axis(spacing, new_spacing, force_separate_z)
        if axis is None:
            return _resize(x, new_shape, order, clip_axes=(1, 2, 3))
        in_plane = tuple(n if a != axis else x.shape[1 + a] for a, n in enumerate(new_shape))
        x = _resize(x, in_plane, order, clip_axes=tuple(1 + a for a in range(3) if a != axis))
        if x.shape[1 + axis] != new_shape[axis]:
            x = _apply_matrix(x, 1 + axis, _coordinate_matrix(x.shape[1 + axis], new_shape[axis], order_z))
        return x
    finally:
        torch.set_num_threads(old)


def _resize(x: torch.Tensor, shape: tuple[int, ...], order: int, clip_axes: tuple[int, ...]) -> torch.Tensor:
    """skimage's resize of every slice spanned by `clip_axes` (all three: the whole volume) of (C, D, H, W)."""
    if tuple(x.shape[1:]) == shape:
        return x
    if order == 1:
        out = _linear(x, shape)
    else:
        out = x
        for axis in range(3):
            if out.shape[1 + axis] != shape[axis]:
                out = _apply_matrix(out, 1 + axis, _zoom_matrix(out.shape[1 + axis], shape[axis], order))
    if order > 1:  # skimage clips to the input's range; orders 0 and 1 never leave it
        low, high = x.amin(dim=clip_axes, keepdim=True), x.amax(dim=clip_axes, keepdim=True)
        out = torch.maximum(torch.minimum(out, high), low)
    return out


def _linear(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Order-1 zoom with grid_mode=True and edge extension: torch's linear interpolation, align_corners=False."""
    same = [a for a in range(3) if x.shape[1 + a] == shape[a]]
    if len(same) == 1:  # a 2D resize of every slice across that axis
        a = same[0]
        moved = x.movedim(1 + a, 1)  # (C, S, P, Q)
        c, s = moved.shape[:2]
        size = tuple(n for i, n in enumerate(shape) if i != a)
        out = F.interpolate(moved.reshape(c * s, 1, *moved.shape[2:]), size=size, mode="bilinear",
                            align_corners=False)
        return out.reshape(c, s, *size).movedim(1, 1 + a).contiguous()
    return F.interpolate(x[None], size=shape, mode="trilinear", align_corners=False)[0]


def _zoom_matrix(n: int, m: int, order: int) -> torch.Tensor:
    """(m, n) matrix of scipy's 1D `zoom(order, mode='nearest', grid_mode=True)` from n to m samples."""
    w = ndimage.zoom(np.eye(n), (m / n, 1.0), order=order, mode="nearest", grid_mode=True)
    if w.shape != (m, n):
        raise AssertionError(f"zoom of {n} to {m} samples gave shape {w.shape}")
    return torch.from_numpy(w).float()


def _coordinate_matrix(n: int, m: int, order: int) -> torch.Tensor:
    """(m, n) matrix of nnU-Net's resampling along the separate axis: `map_coordinates(order, mode='nearest')`
    at (i + 0.5) * n / m - 0.5."""
    coords = (np.arange(m) + 0.5) * (n / m) - 0.5
    grid = np.stack(np.broadcast_arrays(coords[:, None], np.arange(n, dtype=float)[None, :]))  # (2, m, n)
    w = ndimage.map_coordinates(np.eye(n), grid, order=order, mode="nearest")
    return torch.from_numpy(w).float()


def _apply_matrix(x: torch.Tensor, dim: int, w: torch.Tensor) -> torch.Tensor:
    """`w` (m, n) applied along `dim` of x (size n there); a one-hot `w` (order 0) is a gather."""
    if bool(((w == 0) | (w == 1)).all()) and bool((w.sum(1) == 1).all()):
        return x.index_select(dim, w.argmax(1)).contiguous()
    moved = x.movedim(dim, -1)  # (..., n)
    return torch.matmul(moved, w.T).movedim(-1, dim).contiguous()  # (..., m) -> back in place


__all__ = ["ANISO_THRESHOLD", "new_shape_for", "resample", "separate_axis"]
