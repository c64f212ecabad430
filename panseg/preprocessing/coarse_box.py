"""The box of a mask's largest connected component, decided on a coarse grid and settled at full resolution.

cc3d labelling a whole 300x512x512 body mask costs ~0.5-0.9 s on one core, more than a GPU needs to
predict the case. The box of a big blob (the body) needs far less:

1. Coarse grid: blocks of `steps` voxels (2 x 4 x 4: 1/32 of the voxels). A block counts when all of
   its voxels are in the mask; two such blocks that share a face are joined at full resolution for
   sure, so each component of the block grid (cc3d, 6-connected) lies inside one full-resolution
   component.
2. The largest block component C seeds the answer: its blocks' first voxels are in the true
   component, so their box is inside the true component's box.
3. Settling: each face of the box is pushed out at full resolution. A band of voxels around the face
   is labelled with cc3d; the band's components holding a sample of C belong to the true component,
   and the face moves to their farthest voxel (the band widens while they reach its edge). A pass
   settles the six faces; another pass follows only while the proof (4) fails and a face moved.
4. Proof of the box: no mask voxel just outside the box that touches (in the given connectivity) a
   mask voxel inside it may belong to C's component. That component then cannot leave the box, so
   it lies inside it, and every face holds one of its voxels: the box is exactly its box. A touching
   voxel is cleared when its block lies outside C's component of the coarse grid where a block
   counts if it holds any mask voxel (full-resolution paths step only between neighbouring blocks,
   so that component holds all of C's): a table reaching into the box or noise specks are cleared.

When the proof fails (something touches the box from outside that settling cannot reach), when the
mask sampled every `steps` voxels has a second 6-component of more than half the samples of its
first (so the sampled sizes could rank the components wrongly), or when the volume is too small to
gain anything, the box comes from cc3d at full resolution. The result is therefore always the exact
box of the component that C lies in; that this is the largest component rests on the sampled sizes
(a component that sampling ranks below half of the largest is taken to be smaller).
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np

STEPS = (2, 4, 4)  # coarse steps (z, y, x): 1/32 of the voxels are labelled
_MIN_CELLS = 8  # fewer coarse cells than this along y or x (2 along z): label at full resolution
_RUNNER_UP_RATIO = 0.5  # a second coarse component above this share of the first: label at full resolution
_BAND_OUT = 4  # voxels a band first reaches beyond a face (doubled while components reach its edge)
_MAX_PASSES = 8

# cc3d's 6-connected voxel connectivity graph bits for a C-ordered (z, y, x) array: cc3d's x is axis 0.
_PLUS = (1, 4, 16)
_MINUS = (2, 8, 32)


@dataclass(frozen=True)
class CoarseResult:
    """The box (start, stop per axis, half-open; None for an empty mask) and how it was found."""

    start_zyx: tuple[int, int, int] | None
    stop_zyx: tuple[int, int, int] | None
    method: str  # 'coarse' (settled and proved), 'full' (cc3d at full resolution), 'empty'


def largest_component_box(mask: np.ndarray, connectivity: int, steps: tuple[int, int, int] = STEPS) -> CoarseResult:
    """The box of the largest `connectivity`-connected component of a 3D bool mask (module docstring).

    Args:
        mask: bool (z, y, x).
        connectivity: 6, 18 or 26.
        steps: coarse steps along (z, y, x), each >= 1.

    Returns:
        The CoarseResult.
    """
    if connectivity not in (6, 18, 26) or len(steps) != 3 or min(steps) < 1:
        raise ValueError(f"connectivity must be 6, 18 or 26 and steps three integers >= 1, but they are "
                         f"{connectivity}, {steps}")
    if mask.shape[0] < 2 * steps[0] or any(n < _MIN_CELLS * s for n, s in zip(mask.shape[1:], steps[1:])):
        return _full_resolution(mask, connectivity)
    seeds = _largest_block_component(mask, steps)
    if seeds is None:
        return _full_resolution(mask, connectivity) if mask.any() else CoarseResult(None, None, "empty")
    box = seed_box = _seed_box(seeds, steps)
    for _ in range(_MAX_PASSES):
        settled = tuple(tuple(v) for v in _settle_pass(mask, connectivity, seeds, steps, seed_box, box))
        grown = _grown_by_outside(mask, connectivity, steps, seeds, settled)
        if grown is None:
            break  # proved: the box of the seeds' component
        if grown == settled:
            return _full_resolution(mask, connectivity)  # something touches the box that neither step can settle
        box = grown
    else:
        return _full_resolution(mask, connectivity)
    box = settled
    return CoarseResult(box[0], box[1], "coarse")


def _full_resolution(mask: np.ndarray, connectivity: int) -> CoarseResult:
    """cc3d's largest component at full resolution (ties: the lowest cc3d label)."""
    if not mask.any():
        return CoarseResult(None, None, "empty")
    labels, n = cc3d.connected_components(mask, connectivity=connectivity, binary_image=True, return_N=True)
    counts = np.bincount(labels[mask], minlength=n + 1)
    counts[0] = 0
    where = np.nonzero(labels == int(np.argmax(counts)))
    start = tuple(int(w.min()) for w in where)
    stop = tuple(int(w.max()) + 1 for w in where)
    return CoarseResult(start, stop, "full")


# ----------------------------------------------------------------------------------------------
# Steps 1-2: the coarse grid
# ----------------------------------------------------------------------------------------------


def _full_blocks(mask: np.ndarray, steps: tuple[int, int, int]) -> np.ndarray:
    """Whether each whole block of steps voxels is in the mask: bool (Z // sz, Y // sy, X // sx).

    The trailing voxels that fill no whole block are left out (they are never needed as seeds).
    """
    sz, sy, sx = steps
    nz, ny, nx = (n // s for n, s in zip(mask.shape, steps))
    inside = mask[:nz * sz, :ny * sy, :nx * sx]
    if sx == 4 and inside.strides[2] == 1:  # four bools as one uint32: all set <=> 0x01010101
        rows = inside.view(np.uint32) == 0x01010101
    else:
        rows = inside[..., 0::sx].copy()
        for k in range(1, sx):
            rows &= inside[..., k::sx]
    planes = rows[:, 0::sy].copy()
    for k in range(1, sy):
        planes &= rows[:, k::sy]
    blocks = planes[0::sz].copy()
    for k in range(1, sz):
        blocks &= planes[k::sz]
    return blocks


def _largest_block_component(mask: np.ndarray, steps: tuple[int, int, int]) -> np.ndarray | None:
    """The seeds (bool on the block grid) of step 1, or None when there are none or the ranking is doubtful.

    Whole blocks that share a face are joined at full resolution, so each component of the block grid
    lies inside one full-resolution component. None also when the plain sampled mask has a second
    component of more than _RUNNER_UP_RATIO of the first's samples (sampling may then rank the
    full-resolution components wrongly).
    """
    samples = np.ascontiguousarray(mask[tuple(slice(None, None, s) for s in steps)])
    if not samples.any() or _ambiguous(samples):
        return None
    blocks = _full_blocks(mask, steps)
    labels, n = cc3d.connected_components(blocks, connectivity=6, binary_image=True, return_N=True)
    if n == 0:
        return None
    counts = np.bincount(labels[blocks])
    return labels == int(np.argmax(counts[1:]) + 1)


def _ambiguous(samples: np.ndarray) -> bool:
    """Whether the plain sampled mask's second largest 6-component has over _RUNNER_UP_RATIO of the first's samples."""
    labels, n = cc3d.connected_components(samples, connectivity=6, binary_image=True, return_N=True)
    if n < 2:
        return False
    counts = np.sort(np.bincount(labels[samples]))
    return counts[-2] > _RUNNER_UP_RATIO * counts[-1]


def _seed_box(seeds: np.ndarray, steps: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The full-resolution box of the seed samples."""
    start, stop = [], []
    for axis, step in enumerate(steps):
        present = np.flatnonzero(seeds.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(int(present[0]) * step)
        stop.append(int(present[-1]) * step + 1)
    return tuple(start), tuple(stop)


# ----------------------------------------------------------------------------------------------
# Step 3: settling the faces
# ----------------------------------------------------------------------------------------------


def _settle_pass(mask: np.ndarray, connectivity: int, seeds: np.ndarray, steps: tuple[int, int, int],
                 seed_box, box) -> list[list[int]]:
    """One pass over the six faces; returns the new [start, stop]."""
    start, stop = list(box[0]), list(box[1])
    for axis in range(3):
        start[axis] = _settle_face(mask, connectivity, seeds, steps, seed_box, (start, stop), axis, low=True)
        stop[axis] = _settle_face(mask, connectivity, seeds, steps, seed_box, (start, stop), axis, low=False)
    return [start, stop]


def _settle_face(mask: np.ndarray, connectivity: int, seeds: np.ndarray, steps: tuple[int, int, int], seed_box,
                 box, axis: int, low: bool) -> int:
    """The face's new coordinate: the farthest voxel of the band components that hold a seed sample.

    The band runs from `reach` voxels beyond the face to `steps[axis]` voxels inside the seeds' own
    face, so it always holds the outermost plane of seed samples.
    """
    start, stop = box
    shape = mask.shape
    face = start[axis] if low else stop[axis]
    if face == (0 if low else shape[axis]):
        return face  # at the volume's edge already
    reach = _BAND_OUT
    while True:
        region = [slice(max(0, a - reach), min(n, b + reach)) for a, b, n in zip(start, stop, shape)]
        face = start[axis] if low else stop[axis]
        region[axis] = (slice(max(0, face - reach), min(shape[axis], seed_box[0][axis] + steps[axis])) if low else
                        slice(max(0, seed_box[1][axis] - steps[axis]), min(shape[axis], face + reach)))
        found = _farthest_seeded(mask, connectivity, seeds, steps, region, axis, low)
        if found is None:
            return face
        edge = region[axis].start if low else region[axis].stop
        at_volume_edge = edge == (0 if low else shape[axis])
        if found != edge or at_volume_edge:
            return min(found, face) if low else max(found, face)
        reach *= 2


def _farthest_seeded(mask: np.ndarray, connectivity: int, seeds: np.ndarray, steps: tuple[int, int, int],
                     region: list[slice], axis: int, low: bool) -> int | None:
    """Within `region`, the lowest start (low) or highest stop of components holding a seed sample."""
    band = np.ascontiguousarray(mask[tuple(region)])
    labels = cc3d.connected_components(band, connectivity=connectivity, binary_image=True)
    scale = steps
    first = [-(-r.start // s) for r, s in zip(region, scale)]  # first sample index inside the region
    last = [-(-r.stop // s) for r, s in zip(region, scale)]
    local = seeds[tuple(slice(a, b) for a, b in zip(first, last))]
    offsets = [f * s - r.start for f, s, r in zip(first, scale, region)]
    seed_labels = labels[tuple(slice(o, None, s) for o, s in zip(offsets, scale))][:local.shape[0], :local.shape[1],
                                                                                    :local.shape[2]]
    held = np.zeros(int(labels.max()) + 1, dtype=bool)
    held[seed_labels[local]] = True
    held[0] = False
    if not held.any():
        return None
    profile = held[labels].any(axis=tuple(a for a in range(3) if a != axis))
    present = np.flatnonzero(profile)
    return region[axis].start + (int(present[0]) if low else int(present[-1]) + 1)


# ----------------------------------------------------------------------------------------------
# Step 4: the proof
# ----------------------------------------------------------------------------------------------


def _any_blocks(mask: np.ndarray, steps: tuple[int, int, int]) -> np.ndarray:
    """Whether each block of steps voxels holds a mask voxel: bool (ceil(Z / sz), ceil(Y / sy), ceil(X / sx))."""
    sz, sy, sx = steps
    whole = mask.shape[2] // sx * sx
    if sx == 4 and mask.strides[2] == 1:  # four bools as one uint32: any set <=> nonzero
        rows = mask[..., :whole].view(np.uint32) != 0
    else:
        rows = np.logical_or.reduceat(mask[..., :whole], np.arange(0, whole, sx), axis=2)
    if whole < mask.shape[2]:
        rows = np.concatenate([rows, mask[..., whole:].any(axis=2, keepdims=True)], axis=2)
    for axis, step in ((1, sy), (0, sz)):
        index = [slice(None)] * 3
        index[axis] = slice(0, None, step)
        merged = rows[tuple(index)].copy()
        for k in range(1, step):
            index[axis] = slice(k, None, step)
            part = rows[tuple(index)]
            target = [slice(None)] * 3
            target[axis] = slice(0, part.shape[axis])
            merged[tuple(target)] |= part
        rows = merged
    return rows


def _grown_by_outside(mask: np.ndarray, connectivity: int, steps: tuple[int, int, int], seeds: np.ndarray,
                      box) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """None when no mask voxel just outside the box that touches one inside may belong to the seeds' component
    (the proof); else the box grown to what the seeds' component holds beyond the face where it leaves.

    A voxel of the seeds' component lies in a block of the seeds' component of the block grid where a
    block counts when it holds any mask voxel (full-resolution paths step only between neighbouring
    blocks). Touching voxels outside it belong to other components (a table reaching into the box,
    specks) and cannot make the box wrong; the others are judged at full resolution (`_slab_verdict`).
    """
    blocks = None
    start, stop = box
    for axis in range(3):
        for inside, outside in ((start[axis], start[axis] - 1), (stop[axis] - 1, stop[axis])):
            if outside < 0 or outside >= mask.shape[axis]:
                continue
            where = _touching_outside_voxels(mask, connectivity, box, axis, inside, outside)
            if where is None:
                continue
            if blocks is None:
                blocks = cc3d.connected_components(_any_blocks(mask, steps), connectivity=connectivity,
                                                   binary_image=True)
                seed_at = tuple(int(w[0]) for w in np.nonzero(seeds[tuple(slice(0, n) for n in blocks.shape)]))
                seed_label = blocks[seed_at]
            suspect = blocks[tuple(w // s for w, s in zip(where, steps))] == seed_label
            if not suspect.any():
                continue
            verdict, extent = _slab_verdict(mask, connectivity, steps, seeds, axis, inside < outside, inside,
                                            tuple(w[suspect] for w in where))
            if verdict == "unknown":
                return box
            if verdict == "grow":
                return (tuple(min(a, b) for a, b in zip(start, extent[0])),
                        tuple(max(a, b) for a, b in zip(stop, extent[1])))
    return None


def _slab_verdict(mask: np.ndarray, connectivity: int, steps: tuple[int, int, int], seeds: np.ndarray,
                  axis: int, high: bool, inside: int, where: tuple[np.ndarray, ...]):
    """('clear', None) when the touching outside voxels `where` all belong to whole components without a
    seed; ('grow', (start, stop)) with the box of the slab's seeded components when one of them is the
    seeds'; ('unknown', None) when the whole volume could not tell.

    The slab beyond the face (the whole volume across the other axes, reaching `depth` voxels inside
    the face) is labelled. A component that holds no seed sample and does not reach the slab's inner
    plane is a whole full-resolution component, so it is not the seeds'. The slab deepens while one
    reaches its inner plane.
    """
    n = mask.shape[axis]
    depth = 4 * steps[axis]
    while True:
        lo, hi = (max(0, inside - depth), n) if high else (0, min(n, inside + depth + 1))
        region = [slice(None)] * 3
        region[axis] = slice(lo, hi)
        labels = cc3d.connected_components(np.ascontiguousarray(mask[tuple(region)]), connectivity=connectivity,
                                           binary_image=True)
        local = list(where)
        local[axis] = where[axis] - lo
        touching = np.unique(labels[tuple(local)])
        seeded = _seeded_labels(labels, seeds, steps, lo, axis)
        if np.isin(touching, seeded).any():  # the seeds' component leaves the box: how far, in this slab
            box = _mask_box(np.isin(labels, seeded))
            return "grow", (tuple(a + (lo if k == axis else 0) for k, a in enumerate(box[0])),
                            tuple(b + (lo if k == axis else 0) for k, b in enumerate(box[1])))
        index = [slice(None)] * 3
        index[axis] = (lo if high else hi - 1) - lo
        at_edge = (lo == 0) if high else (hi == n)
        if at_edge or not np.isin(touching, labels[tuple(index)]).any():
            return "clear", None
        if depth >= n:
            return "unknown", None
        depth *= 2


def _seeded_labels(labels: np.ndarray, seeds: np.ndarray, steps: tuple[int, int, int], lo: int,
                   axis: int) -> np.ndarray:
    """The labels of a slab (starting at `lo` along `axis`, whole across the others) that hold a seed sample."""
    first = -(-lo // steps[axis])
    offset = first * steps[axis] - lo
    index = [slice(None)] * 3
    index[axis] = slice(first, None)
    local = seeds[tuple(index)]
    sampled = labels[tuple(slice(offset if k == axis else 0, None, s) for k, s in enumerate(steps))]
    local = local[tuple(slice(0, m) for m in sampled.shape)]
    sampled = sampled[tuple(slice(0, m) for m in local.shape)]
    found = np.unique(sampled[local])
    return found[found != 0]


def _mask_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) of the True voxels of a non-empty 3D mask."""
    start, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return tuple(start), tuple(stop)


def _touching_outside_voxels(mask: np.ndarray, connectivity: int, box, axis: int, inside: int,
                             outside: int) -> tuple[np.ndarray, ...] | None:
    """(z, y, x) of the mask voxels on plane `outside` that neighbour a mask voxel of the box's face plane
    `inside`, or None when there are none."""
    start, stop = box
    grown = [slice(max(0, a - 1), min(n, b + 1)) for a, b, n in zip(start, stop, mask.shape)]
    if connectivity == 6:
        grown = [slice(a, b) for a, b in zip(start, stop)]
    rect = [slice(a, b) for a, b in zip(start, stop)]
    rect[axis], grown[axis] = inside, outside
    inner, outer = mask[tuple(rect)], mask[tuple(grown)]
    if connectivity == 6:
        near = inner
    else:  # 18/26: an outside voxel may sit one step diagonally: the inside plane grown by one voxel
        offset = [a - g.start for a, g, k in zip(start, grown, range(3)) if k != axis]
        padded = np.zeros((outer.shape[0] + 2, outer.shape[1] + 2), dtype=bool)
        padded[1 + offset[0]:1 + offset[0] + inner.shape[0], 1 + offset[1]:1 + offset[1] + inner.shape[1]] = inner
        near = np.zeros(outer.shape, dtype=bool)
        for dr in range(3):
            for dc in range(3):
                near |= padded[dr:dr + outer.shape[0], dc:dc + outer.shape[1]]
    rows, cols = np.nonzero(near & outer)
    if rows.size == 0:
        return None
    others = [k for k in range(3) if k != axis]
    where = [None, None, None]
    where[axis] = np.full(rows.size, outside)
    where[others[0]] = rows + grown[others[0]].start
    where[others[1]] = cols + grown[others[1]].start
    return tuple(where)


__all__ = ["STEPS", "CoarseResult", "largest_component_box"]
