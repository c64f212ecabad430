"""The patch sampler: its batches are the patches zarr reads, scaled, whichever read path serves them."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from panseg.config import PreprocessConfig
from panseg.preprocessing.case import PreprocessedCase
from panseg.store import zarr_store as store
from panseg.training.sampling import PatchSampler, voxel_position

CLIP_HU = (-160.0, 240.0)
PATCH = (12, 10, 16)


def labelled_case(case_id: str, shape: tuple[int, int, int], seed: int) -> PreprocessedCase:
    rng = np.random.default_rng(seed)
    image = rng.integers(-160, 241, size=shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[3:9, 4:10, 5:12] = rng.integers(1, 15, size=(6, 6, 7), dtype=np.uint8)
    locations = {c: np.argwhere(label == c).astype(np.int32) for c in (1, 14)}
    counts = {str(c): int((label == c).sum()) for c in (0, 1, 14)}
    attrs = {"case_id": case_id, "task": "tumor", "status": "ok", "resampled_shape_zyx": list(shape),
             "clip_hu": list(CLIP_HU), "class_counts": counts}
    return PreprocessedCase(case_id, "ok", image, label, locations, attrs)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "STORE.zarr"
    store.create_store(path, PreprocessConfig(chunk_zyx=(8, 8, 8), task="tumor", clip_hu=CLIP_HU))
    cases = [labelled_case("case_a", (20, 18, 30), 0), labelled_case("case_b", (13, 25, 17), 1)]
    for case in cases:
        store.write_case(path, case)
    store.write_manifest(path, [store.case_manifest_row(c) for c in cases])
    return path


def test_batches_are_the_patches_zarr_reads_scaled(store_path):
    sampler = PatchSampler(str(store_path), ["case_a", "case_b"], PATCH, tumor_sampling_ratio=5.0,
                           random_patch_fraction=0.5, clip_hu=CLIP_HU)  # random centres: patches over the borders
    group = store.open_store(store_path)
    outside = 0
    for iteration in range(12):
        images, labels = sampler.batch(epoch=0, iteration=iteration, batch_size=3)
        assert images.shape == (3, 1, *PATCH) and images.dtype == np.float32 and labels.dtype == np.uint8
        for slot, request in enumerate(sampler.requests(epoch=0, iteration=iteration, batch_size=3)):
            image = group[f"cases/{request.case_id}/image"]
            label = group[f"cases/{request.case_id}/label"]
            padded_image = np.pad(image[...], [(p, p) for p in PATCH], constant_values=CLIP_HU[0])  # plain zarr
            padded_label = np.pad(label[...], [(p, p) for p in PATCH], constant_values=0)
            window = tuple(slice(a + p, a + 2 * p) for a, p in zip(request.start_zyx, PATCH))
            expected = (padded_image[window].astype(np.float32) - np.float32(CLIP_HU[0])) / np.float32(400.0)
            np.testing.assert_array_equal(images[slot, 0], expected)
            np.testing.assert_array_equal(labels[slot, 0], padded_label[window])
            outside += any(a < 0 or a + p > n for a, p, n in zip(request.start_zyx, PATCH, image.shape))
            single_image, single_label = sampler.read(request)
            np.testing.assert_array_equal(single_image, images[slot, 0])
            np.testing.assert_array_equal(single_label, labels[slot, 0])
    assert outside > 5  # the borders were exercised
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_direct_and_zarr_only_reads_give_the_same_batches(store_path):
    class ZarrOnlySampler(PatchSampler):
        def _open_case(self, case_id):
            return store.open_case(self.store_path, case_id, direct_reads=False)

    args = (str(store_path), ["case_a", "case_b"], PATCH, 5.0, 0.3, CLIP_HU)
    direct, reference = PatchSampler(*args), ZarrOnlySampler(*args)
    assert isinstance(reference._case("case_a").image, zarr.Array)
    for iteration in range(10):
        for ours, theirs in zip(direct.batch(1, iteration, 2), reference.batch(1, iteration, 2)):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("patch", [(12, 10, 16), (7, 9, 1)])
def test_class_voxel_offset_spreads_the_voxel_over_the_patch_and_never_out(patch):
    rng = np.random.default_rng(0)
    patch = np.asarray(patch)
    centred = voxel_position(rng, patch, 0.0)
    np.testing.assert_array_equal(centred, patch // 2)
    anywhere = np.array([voxel_position(rng, patch, 1.0) for _ in range(4000)])
    np.testing.assert_array_equal(anywhere.min(axis=0), 0)
    np.testing.assert_array_equal(anywhere.max(axis=0), patch - 1)
    half = np.array([voxel_position(rng, patch, 0.5) for _ in range(4000)])
    np.testing.assert_array_equal(half.min(axis=0), patch // 2 - np.floor(0.5 * (patch // 2)))
    np.testing.assert_array_equal(half.max(axis=0), patch // 2 + np.floor(0.5 * (patch - 1 - patch // 2)))


def test_offset_patches_hold_their_class_voxel_off_centre(store_path):
    def middles_of_another_class(class_voxel_offset: float) -> int:
        sampler = PatchSampler(str(store_path), ["case_a", "case_b"], PATCH, tumor_sampling_ratio=5.0,
                               random_patch_fraction=0.0, clip_hu=CLIP_HU, class_voxel_offset=class_voxel_offset)
        count = 0
        for iteration in range(20):
            _, labels = sampler.batch(epoch=0, iteration=iteration, batch_size=2)
            for slot, request in enumerate(sampler.requests(epoch=0, iteration=iteration, batch_size=2)):
                assert (labels[slot, 0] == request.class_id).any()  # the drawn class is inside the patch
                count += labels[slot, 0][tuple(p // 2 for p in PATCH)] != request.class_id
        return count

    assert middles_of_another_class(0.0) == 0  # centred: the middle voxel is the drawn one
    assert middles_of_another_class(1.0) > 10
