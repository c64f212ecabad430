"""The report's figures: where to cut a case, which way up to show it, and PNGs rendered with matplotlib.

Pure: numpy, cc3d and matplotlib's Agg canvas (no pyplot, so no global state and no display).
Arrays are (z, y, x) as `panseg.io` reads them; boxes are `panseg.preprocessing.crop.Box`es in the same voxels.

Views read the way radiologists read them: axial with the patient's front up and the patient's right
on the left of the image, coronal and sagittal with the head up. An array whose direction is an axis
permutation-free flip of LPS (e.g. RAS files) is flipped to LPS for display; other directions (axes
swapped) are shown in array order. Coronal and sagittal pixels are stretched by the spacing, so
anatomy has its true proportions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import cc3d
import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(f"the panseg report needs matplotlib ({err}): pip install 'panseg[viz]'") from err

from panseg.preprocessing.crop import Box, mask_bbox

WINDOW_HU = (-160.0, 240.0)  # the paper's clip range: soft tissue and lesions stay distinguishable
TRUTH_COLOR = "#22c55e"  # green fill
PREDICTION_COLOR = "#ff2d55"  # red contour: visible over the green fill and over bone
PREDICTION_FILL_ALPHA = 0.3  # the prediction is also filled faintly, so a lesion of a voxel or two shows
CONTOUR_PX = 2.0  # contour width in pixels, whatever the dpi
CROP_COLOR = "#facc15"  # yellow dashes
PANEL_HEIGHT_IN = 3.6

PointSource = Literal["truth_lesion", "false_positive", "prediction", "middle"]


@dataclass(frozen=True)
class SlicePoint:
    """The voxel the three planes go through, and why.

    Attributes:
        zyx: voxel index (z, y, x).
        source: 'truth_lesion' (largest lesion of the ground truth), 'false_positive' (largest
            predicted component on a case whose ground truth is empty), 'prediction' (largest predicted
            component, no ground truth given) or 'middle' (nothing to show: the middle of the volume).
        component_voxels: size of the component the point lies in (0 for 'middle').
    """

    zyx: tuple[int, int, int]
    source: PointSource
    component_voxels: int = 0


def largest_component_point(mask: np.ndarray) -> tuple[tuple[int, int, int], int] | None:
    """The voxel of the largest 26-connected component of `mask` nearest that component's centroid.

    The nearest voxel, not the centroid itself, so the point lies inside the component even when it is
    curved or hollow, and all three planes cut it.

    Returns:
        ((z, y, x), component voxel count), or None when the mask is empty.
    """
    box = mask_bbox(np.asarray(mask) != 0)
    if box is None:
        return None
    sub = np.ascontiguousarray(np.asarray(mask)[box.slices] != 0)
    labels, n = cc3d.connected_components(sub, connectivity=26, return_N=True)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = 0
    voxels = np.argwhere(labels == int(np.argmax(counts)))  # (n, 3)
    nearest = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(v + s) for v, s in zip(nearest, box.start_zyx)), int(voxels.shape[0])


def pick_slice_point(shape_zyx: tuple[int, ...], truth: np.ndarray | None,
                     prediction: np.ndarray | None) -> SlicePoint:
    """Where to cut a case: through its largest true lesion, else through its largest false positive.

    Args:
        shape_zyx: the CT's shape.
        truth: ground-truth lesion mask (nonzero = lesion), or None when there is no ground truth.
        prediction: predicted lesion mask, or None.

    Returns:
        The SlicePoint: the largest truth lesion; when the truth is empty (a healthy case) the largest
        predicted component ('false_positive', or 'prediction' without ground truth); else the middle.
    """
    for mask, source in ((truth, "truth_lesion"), (prediction, "prediction" if truth is None else "false_positive")):
        found = None if mask is None else largest_component_point(mask)
        if found is not None:
            return SlicePoint(found[0], source, found[1])
    return SlicePoint(tuple(int(n) // 2 for n in shape_zyx), "middle", 0)


def display_flips(direction_xyz: tuple[float, ...]) -> tuple[bool, bool, bool]:
    """Which array axes (z, y, x) to reverse so the array reads as LPS (see the module docstring).

    Args:
        direction_xyz: SimpleITK's direction, row-major 3x3 (column c is array index axis c in x, y, z order).

    Returns:
        Flags for the array axes (z, y, x); none when the direction swaps axes.
    """
    matrix = np.asarray(direction_xyz, dtype=float).reshape(3, 3)
    dominant = np.argmax(np.abs(matrix), axis=0)  # physical axis each index axis mostly runs along
    if tuple(dominant) != (0, 1, 2):
        return (False, False, False)
    flip_x, flip_y, flip_z = (bool(matrix[i, i] < 0) for i in range(3))
    return (flip_z, flip_y, flip_x)


@dataclass(frozen=True)
class CaseView:
    """What one case's PNG shows, in one voxel frame.

    Attributes:
        ct: CT in HU (z, y, x).
        spacing_zyx_mm: voxel size.
        point: where the planes cut.
        truth, prediction: lesion masks on the CT's grid, or None.
        crop_box: the crop in the CT's voxels, or None.
    """

    ct: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    point: SlicePoint
    truth: np.ndarray | None = None
    prediction: np.ndarray | None = None
    crop_box: Box | None = None

    def flipped(self, flips_zyx: tuple[bool, bool, bool]) -> CaseView:
        """The same view with the flagged axes reversed (arrays as views, no copies)."""
        if not any(flips_zyx):
            return self
        index = tuple(slice(None, None, -1) if f else slice(None) for f in flips_zyx)
        shape = self.ct.shape
        zyx = tuple(n - 1 - i if f else i for i, n, f in zip(self.point.zyx, shape, flips_zyx))
        box = None
        if self.crop_box is not None:
            ends = [(n - b, n - a) if f else (a, b)
                    for a, b, n, f in zip(self.crop_box.start_zyx, self.crop_box.stop_zyx, shape, flips_zyx)]
            box = Box(tuple(e[0] for e in ends), tuple(e[1] for e in ends))
        return CaseView(self.ct[index], self.spacing_zyx_mm, SlicePoint(zyx, self.point.source, self.point.component_voxels),
                        None if self.truth is None else self.truth[index],
                        None if self.prediction is None else self.prediction[index], box)


@dataclass(frozen=True)
class _Plane:
    """One panel: the 2D index into the volume, its axes and how to draw it."""

    name: str
    fixed_axis: int  # the array axis held at the point
    row_axis: int
    col_axis: int
    origin: str  # 'upper': row 0 at the top (axial, front up); 'lower': row 0 at the bottom (feet down)


_PLANES = (_Plane("axial", 0, 1, 2, "upper"), _Plane("coronal", 1, 0, 2, "lower"), _Plane("sagittal", 2, 0, 1, "lower"))


def _cut(volume: np.ndarray, plane: _Plane, index: int) -> np.ndarray:
    """The 2D slice (rows = plane.row_axis, columns = plane.col_axis)."""
    return np.take(volume, index, axis=plane.fixed_axis)


def render_case_png(view: CaseView, title: str = "", dpi: int = 100) -> bytes:
    """Axial, coronal and sagittal planes through `view.point` with truth, prediction and crop box.

    The CT is windowed to WINDOW_HU; the ground truth is a translucent green fill, the prediction a faint
    red fill inside a 2-pixel red contour (so a one-voxel lesion shows), the crop box yellow dashes where
    the plane passes through it. Every case's panels are PANEL_HEIGHT_IN tall at one scale (mm per pixel)
    for the three planes; the figure is as wide as they need.

    Returns:
        PNG bytes.
    """
    spacing = view.spacing_zyx_mm
    widths = [view.ct.shape[p.col_axis] * spacing[p.col_axis] / (view.ct.shape[p.row_axis] * spacing[p.row_axis])
              for p in _PLANES]
    # No upper bound on the width: a cap would shrink this case's panels below the others'.
    fig = Figure(figsize=(max(7.0, PANEL_HEIGHT_IN * sum(widths) + 0.6), PANEL_HEIGHT_IN + 0.9), dpi=dpi)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    for ax, plane in zip(axes, _PLANES):
        _draw_plane(ax, view, plane, contour_pt=CONTOUR_PX * 72.0 / dpi)
    handles = [Line2D([], [], color=CROP_COLOR, linestyle="--", label="crop box")]
    if view.truth is not None:
        handles.insert(0, Patch(facecolor=TRUTH_COLOR, alpha=0.5, label="ground truth"))
    if view.prediction is not None:
        handles.insert(1 if view.truth is not None else 0,
                       Patch(facecolor=(*_rgb(PREDICTION_COLOR), PREDICTION_FILL_ALPHA), edgecolor=PREDICTION_COLOR,
                             linewidth=1.5, label="prediction"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86 if title else 0.92, bottom=0.12, wspace=0.06)
    return _png_bytes(fig)


def _rgb(hex_color: str) -> tuple[float, float, float]:
    return tuple(int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))


def _draw_plane(ax, view: CaseView, plane: _Plane, contour_pt: float) -> None:
    index = view.point.zyx[plane.fixed_axis]
    aspect = view.spacing_zyx_mm[plane.row_axis] / view.spacing_zyx_mm[plane.col_axis]
    ax.imshow(_cut(view.ct, plane, index), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], origin=plane.origin,
              aspect=aspect, interpolation="nearest")
    if view.truth is not None:
        truth = _cut(view.truth, plane, index) != 0
        if truth.any():
            ax.imshow(np.ma.masked_where(~truth, truth), cmap=ListedColormap([TRUTH_COLOR]), alpha=0.5,
                      origin=plane.origin, aspect=aspect, interpolation="nearest")
    if view.prediction is not None:
        pred = (_cut(view.prediction, plane, index) != 0).astype(np.float32)
        if pred.any():
            ax.imshow(np.ma.masked_where(pred == 0, pred), cmap=ListedColormap([PREDICTION_COLOR]),
                      alpha=PREDICTION_FILL_ALPHA, origin=plane.origin, aspect=aspect, interpolation="nearest")
            ax.contour(pred, levels=[0.5], colors=[PREDICTION_COLOR], linewidths=contour_pt)
    note = ""
    if view.crop_box is not None:
        box = view.crop_box
        if box.start_zyx[plane.fixed_axis] <= index < box.stop_zyx[plane.fixed_axis]:
            r0, c0 = box.start_zyx[plane.row_axis], box.start_zyx[plane.col_axis]
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), box.shape_zyx[plane.col_axis], box.shape_zyx[plane.row_axis],
                                   fill=False, edgecolor=CROP_COLOR, linestyle="--", linewidth=1.3))
        else:
            note = " (outside the crop)"
    axis_name = "zyx"[plane.fixed_axis]
    ax.set_title(f"{plane.name} {axis_name}={index}{note}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def render_curves_png(rows: list[dict], dpi: int = 80) -> bytes:
    """Training curves by epoch: train loss; the organ scores (`val_*` but tumor); the tumor scores
    (`val_tumor_*`) on an axis of their own, since they are often a tenth of the organ Dice. Floats
    only: counts such as val_cases are left out.

    Args:
        rows: one dict per epoch with 'epoch' and 'train_loss' (RUN/metrics.jsonl, deduplicated).

    Returns:
        PNG bytes.

    Raises:
        ValueError: no row has an epoch and a train loss.
    """
    loss = [(r["epoch"], r["train_loss"]) for r in rows if _is_number(r.get("epoch")) and _is_number(r.get("train_loss"))]
    if not loss:
        raise ValueError("the training log has no epoch with a train_loss")
    # Scores are floats; integer val_* entries are counts (val_cases) and would flatten the score axis.
    val_keys = sorted({k for r in rows for k, v in r.items() if k.startswith("val_") and isinstance(v, float)
                       and _is_number(v)})
    groups = [(title, keys) for title, keys in
              (("validation: organs", [k for k in val_keys if not k.startswith("val_tumor")]),
               ("validation: tumor", [k for k in val_keys if k.startswith("val_tumor")])) if keys]
    fig = Figure(figsize=(5.5 + 4.5 * len(groups), 3.4), dpi=dpi)
    axes = fig.subplots(1, 1 + len(groups), squeeze=False, sharex=True)[0]  # one epoch axis
    axes[0].plot(*zip(*loss), marker=".", color="#2563eb")
    axes[0].set(title="train loss", xlabel="epoch")
    for ax, (title, keys) in zip(axes[1:], groups):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if _is_number(r.get(key)) and _is_number(r.get("epoch"))]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png_bytes(fig)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _png_bytes(fig) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


__all__ = ["CaseView", "SlicePoint", "WINDOW_HU", "display_flips", "largest_component_point", "pick_slice_point",
           "render_case_png", "render_curves_png"]
