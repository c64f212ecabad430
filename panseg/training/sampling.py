"""Label-centred patch sampling from the preprocessed store (the paper's tumor-heavy sampling).

For each patch: with probability `random_patch_fraction` the centre is any voxel of a random case;
otherwise a class is drawn (each organ weight 1, tumor `tumor_sampling_ratio`, over the classes that
some training case holds), then a case that holds it, then one of that case's stored voxel locations
of that class, and the patch is placed around it (padded where it leaves the volume): centred on it,
or with `class_voxel_offset` > 0 shifted by a uniform offset of up to that fraction of half the patch
on each axis (1: the voxel may lie anywhere in the patch; without it a small lesion always sits in
the middle of its patches). Only the chunks under the patch are read from the store.

Every draw comes from a generator seeded by (seed, rank, epoch, iteration, slot), so a batch is a pure
function of its position in training: prefetching threads, restarts and resumes give the same
batches, which is what makes resumed training exact.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from panseg.store.zarr_store import StoredCase, open_case, read_locations, read_manifest


@dataclass(frozen=True)
class PatchRequest:
    """Which patch to read: `class_id` is the class it is centred on, or -1 for a random centre."""

    case_id: str
    start_zyx: tuple[int, int, int]
    class_id: int


@dataclass(frozen=True)
class CaseIndex:
    """What the sampler knows about the training cases, from the manifest alone."""

    case_ids: tuple[str, ...]
    shapes: dict[str, tuple[int, int, int]]
    cases_with_class: dict[int, tuple[str, ...]]

    @classmethod
    def from_manifest(cls, store_path: str, case_ids: list[str]) -> CaseIndex:
        rows = {r["case_id"]: r for r in read_manifest(store_path)}
        missing = [c for c in case_ids if c not in rows or rows[c]["status"] != "ok"]
        if missing:
            raise ValueError(f"cases {missing[:5]} are not complete labelled cases of store {store_path}; "
                             "rerun `panseg preprocess` or fix the split file")
        shapes, with_class = {}, {}
        for case_id in case_ids:
            row = rows[case_id]
            shapes[case_id] = tuple(int(s) for s in row["resampled_shape"])
            for class_id, count in json.loads(row["class_counts"]).items():
                if int(class_id) > 0 and count > 0:
                    with_class.setdefault(int(class_id), []).append(case_id)
        return cls(tuple(case_ids), shapes, {c: tuple(v) for c, v in sorted(with_class.items())})


def class_probabilities(class_ids: list[int], tumor_id: int, tumor_sampling_ratio: float) -> dict[int, float]:
    """Each class weight 1, the tumor `tumor_sampling_ratio`, normalised (paper: [1]*13 + [5] / 18)."""
    weights = {c: (tumor_sampling_ratio if c == tumor_id else 1.0) for c in class_ids}
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()}


def batch_rng(seed: int, rank: int, epoch: int, iteration: int) -> np.random.Generator:
    """The generator of one batch: a pure function of where the batch is in training."""
    return np.random.default_rng([seed, rank, epoch, iteration])


def draw_request(rng: np.random.Generator, index: CaseIndex, probabilities: dict[int, float],
                 random_patch_fraction: float, patch_size_zyx: tuple[int, int, int],
                 location_of, class_voxel_offset: float = 0.0) -> PatchRequest:
    """Draw one patch request.

    Args:
        location_of: `(case_id, class_id, rng) -> (z, y, x)` picks a stored voxel of that class.
        class_voxel_offset: how far the class voxel may lie from the patch centre, per axis, as a
            fraction of half the patch (0: at the centre, 1: anywhere in the patch).
    """
    patch = np.asarray(patch_size_zyx)
    random_centre = not probabilities or (random_patch_fraction > 0 and rng.random() < random_patch_fraction)
    if random_centre:
        case_id = index.case_ids[rng.integers(len(index.case_ids))]
        shape = np.asarray(index.shapes[case_id])
        centre = np.array([rng.integers(max(1, s)) for s in shape])
        return PatchRequest(case_id, tuple(int(s) for s in centre - patch // 2), -1)
    classes = list(probabilities)
    class_id = classes[rng.choice(len(classes), p=list(probabilities.values()))]
    holders = index.cases_with_class[class_id]
    case_id = holders[rng.integers(len(holders))]
    voxel = np.asarray(location_of(case_id, class_id, rng))
    start = voxel - voxel_position(rng, patch, class_voxel_offset)
    return PatchRequest(case_id, tuple(int(s) for s in start), class_id)


def voxel_position(rng: np.random.Generator, patch: np.ndarray, class_voxel_offset: float) -> np.ndarray:
    """Where in the patch the drawn class voxel lies, per axis: the middle (patch // 2), moved by a
    uniform offset of up to `class_voxel_offset` of the room on each side (1: any index in the patch)."""
    middle = patch // 2
    if class_voxel_offset <= 0:
        return middle
    low = middle - np.floor(class_voxel_offset * middle).astype(np.int64)
    high = middle + np.floor(class_voxel_offset * (patch - 1 - middle)).astype(np.int64)
    return rng.integers(low, high + 1)


class PatchSampler:
    """Reads training batches from a store: images scaled to [0, 1], labels as uint8.

    Args:
        store_path: the Zarr store written by `panseg preprocess`.
        case_ids: the training cases (status ok).
        patch_size_zyx: patch shape.
        tumor_id: the tumor class id (14), weighted by `tumor_sampling_ratio`.
        clip_hu: the store's clip range; scaling is (hu - low) / (high - low).
    """

    def __init__(self, store_path: str, case_ids: list[str], patch_size_zyx: tuple[int, int, int],
                 tumor_sampling_ratio: float, random_patch_fraction: float, clip_hu: tuple[float, float],
                 tumor_id: int = 14, seed: int = 0, rank: int = 0, location_cache: int = 256,
                 class_voxel_offset: float = 0.0):
        self.store_path = store_path
        self.patch_size_zyx = tuple(int(p) for p in patch_size_zyx)
        self.index = CaseIndex.from_manifest(store_path, list(case_ids))
        self.probabilities = class_probabilities(list(self.index.cases_with_class), tumor_id, tumor_sampling_ratio)
        self.random_patch_fraction = random_patch_fraction
        self.class_voxel_offset = class_voxel_offset
        self.clip_hu = clip_hu
        self.seed, self.rank = seed, rank
        # Opening a case reads its metadata; keep recently used cases open (and their locations).
        self._locations = functools.lru_cache(maxsize=location_cache)(self._read_locations)
        self._case = functools.lru_cache(maxsize=location_cache)(self._open_case)

    def _read_locations(self, case_id: str) -> dict[int, np.ndarray]:
        return read_locations(self.store_path, case_id)

    def _open_case(self, case_id: str) -> StoredCase:
        return open_case(self.store_path, case_id)

    def _location_of(self, case_id: str, class_id: int, rng: np.random.Generator) -> np.ndarray:
        locations = self._locations(case_id)[class_id]
        return locations[rng.integers(len(locations))]

    def requests(self, epoch: int, iteration: int, batch_size: int) -> list[PatchRequest]:
        """The patch requests of one batch (deterministic in epoch and iteration)."""
        rng = batch_rng(self.seed, self.rank, epoch, iteration)
        return [draw_request(rng, self.index, self.probabilities, self.random_patch_fraction,
                             self.patch_size_zyx, self._location_of, self.class_voxel_offset)
                for _ in range(batch_size)]

    def read(self, request: PatchRequest) -> tuple[np.ndarray, np.ndarray]:
        """One patch: image float32 in [0, 1] and label uint8, both (D, H, W)."""
        image = np.empty(self.patch_size_zyx, dtype=np.float32)
        label = np.empty(self.patch_size_zyx, dtype=np.uint8)
        self._read_into(request, image, label)
        return image, label

    def _read_into(self, request: PatchRequest, image: np.ndarray, label: np.ndarray) -> None:
        """Write one patch into `image` (float32, scaled) and `label` (uint8), both (D, H, W)."""
        low, high = self.clip_hu
        image_hu, label_patch = self._case(request.case_id).read_patch(request.start_zyx, self.patch_size_zyx)
        label[...] = label_patch
        # (hu - low) / (high - low) in float32, written in place: no temporaries of the patch's size
        np.subtract(image_hu, np.float32(low), out=image, dtype=np.float32)
        np.divide(image, np.float32(high - low), out=image)

    def batch(self, epoch: int, iteration: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: image (B, 1, D, H, W) float32 and label (B, 1, D, H, W) uint8."""
        images = np.empty((batch_size, 1, *self.patch_size_zyx), dtype=np.float32)  # (B, 1, D, H, W)
        labels = np.empty((batch_size, 1, *self.patch_size_zyx), dtype=np.uint8)  # (B, 1, D, H, W)
        for slot, request in enumerate(self.requests(epoch, iteration, batch_size)):
            self._read_into(request, images[slot, 0], labels[slot, 0])
        return images, labels
