"""The Zarr store and the Parquet manifest: round trips, atomic writes, patch reads, schema."""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from panseg.config import PreprocessConfig
from panseg.io import CaseFiles
from panseg.preprocessing.case import CaseError, PreprocessedCase
from panseg.store import zarr_store as store

CFG = PreprocessConfig(chunk_zyx=(8, 8, 8), task="tumor")


def fake_case(case_id="case_a", shape=(20, 18, 30), seed=0, labelled=True) -> PreprocessedCase:
    """A preprocessed case made by hand (the store does not care how it was computed)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-160, 241, size=shape, dtype=np.int16)
    label = rng.integers(0, 15, size=shape, dtype=np.uint8) if labelled else None
    locations = {} if label is None else {c: np.argwhere(label == c)[:5].astype(np.int32) for c in (1, 14)}
    attrs = {"case_id": case_id, "task": "tumor", "status": "ok" if labelled else "unlabelled",
             "image_path": f"/raw/{case_id}_0000.nii.gz", "label_path": f"/raw/{case_id}.nii.gz" if labelled else None,
             "organs_path": None, "original_shape_zyx": [40, 60, 60], "original_spacing_zyx_mm": [2.5, 0.8, 0.8],
             "crop_box_zyx": [1, 2, 3, 30, 40, 50], "crop_reason": "largest_component",
             "resampled_shape_zyx": list(shape), "clip_hu": [-160.0, 240.0],
             "class_counts": {"0": 100, "14": 7} if labelled else {}}
    return PreprocessedCase(case_id, attrs["status"], image, label, locations, attrs)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "STORE.zarr"
    store.create_store(path, CFG)
    return path


def test_create_is_idempotent_and_refuses_another_config(store_path):
    group = store.create_store(store_path, CFG)
    assert group.attrs["format"] == store.STORE_FORMAT and group.attrs["task"] == "tumor"
    assert group.attrs["label_names"]["14"] == "tumor" and group.attrs["preprocess"]["chunk_zyx"] == [8, 8, 8]
    assert store.read_store_config(store_path) == CFG
    with pytest.raises(store.StoreError, match="another preprocessing config.*clip_hu.*store \\[-160.0, 240.0\\]"):
        store.create_store(store_path, PreprocessConfig(chunk_zyx=(8, 8, 8), clip_hu=(-100.0, 200.0)))


def test_open_store_rejects_what_is_not_a_store(tmp_path):
    with pytest.raises(store.StoreError, match="not a panseg store"):
        store.open_store(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(store.StoreError, match="not a panseg store"):
        store.open_store(tmp_path / "other.zarr")


def test_write_and_read_round_trip(store_path):
    case = fake_case()
    nbytes = store.write_case(store_path, case)
    assert nbytes > 0
    assert store.list_complete_cases(store_path) == ["case_a"]
    image, label, attrs = store.read_case(store_path, "case_a")
    np.testing.assert_array_equal(image, case.image)
    np.testing.assert_array_equal(label, case.label)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and attrs == case.attrs
    assert store.case_attrs(store_path, "case_a") == case.attrs
    locations = store.read_locations(store_path, "case_a")
    assert set(locations) == {1, 14}
    for class_id, coords in locations.items():
        np.testing.assert_array_equal(coords, case.locations[class_id])
        assert coords.dtype == np.int32


def test_arrays_are_chunked_and_one_shard_each(store_path):
    store.write_case(store_path, fake_case())
    array = store.open_store(store_path)["cases/case_a/image"]
    assert array.chunks == (8, 8, 8) and array.shards == (24, 24, 32)  # the whole array, rounded up to chunks
    files = [f for _, _, fs in os.walk(store_path / "cases" / "case_a" / "image") for f in fs]
    assert len(files) == 2  # zarr.json and the single shard


def test_unlabelled_case_round_trip(store_path):
    store.write_case(store_path, fake_case("unl", labelled=False))
    image, label, attrs = store.read_case(store_path, "unl")
    assert label is None and attrs["status"] == "unlabelled" and store.read_locations(store_path, "unl") == {}
    patch_image, patch_label = store.read_patch(store_path, "unl", (0, 0, 0), (4, 4, 4))
    assert patch_label is None and patch_image.shape == (4, 4, 4)


def test_leftover_staging_is_ignored_and_cleaned(store_path):
    killed = store_path / store.STAGING / "case_a+deadbeef"
    (killed / "image").mkdir(parents=True)  # what a writer killed mid-case leaves
    (killed / "zarr.json").write_text("{}")
    (store_path / "cases" / "half").mkdir()  # not a group: never listed
    assert store.list_complete_cases(store_path) == []
    with pytest.raises(store.StoreError, match="not in the store"):
        store.read_case(store_path, "case_a")
    store.write_case(store_path, fake_case())
    assert not killed.exists()
    assert store.list_complete_cases(store_path) == ["case_a"]
    assert os.listdir(store_path / store.STAGING) == []
    (store_path / store.STAGING / "other+123").mkdir()
    assert store.clean_staging(store_path) == ["other+123"]


def test_writing_a_case_twice_replaces_it(store_path):
    store.write_case(store_path, fake_case(seed=0))
    second = fake_case(seed=1, shape=(10, 12, 14))
    store.write_case(store_path, second)
    image, label, _ = store.read_case(store_path, "case_a")
    np.testing.assert_array_equal(image, second.image)
    np.testing.assert_array_equal(label, second.label)
    assert store.list_complete_cases(store_path) == ["case_a"]
    assert os.listdir(store_path / store.STAGING) == []


def test_write_rejects_a_case_of_another_task_or_dtype(store_path):
    case = fake_case()
    with pytest.raises(store.StoreError, match="task 'organs'.*store holds task 'tumor'"):
        store.write_case(store_path, PreprocessedCase("x", "ok", case.image, case.label, {},
                                                      {**case.attrs, "task": "organs"}))
    with pytest.raises(store.StoreError, match="int16"):
        store.write_case(store_path, PreprocessedCase("x", "ok", case.image.astype(np.float32), None, {}, case.attrs))


@pytest.mark.parametrize("start", [(-3, -4, -5), (15, 10, 25), (5, 3, 8), (-10, 0, 0), (30, 40, 50)])
def test_read_patch_pads_outside_and_matches_the_case_inside(store_path, start):
    case = fake_case()
    store.write_case(store_path, case)
    size = (8, 10, 12)
    image, label = store.read_patch(store_path, "case_a", start, size, pad_label=255)
    assert image.shape == label.shape == size and image.dtype == np.int16 and label.dtype == np.uint8
    padded_image = np.pad(case.image, 50, constant_values=-160)  # pad value: the lower clip, air
    padded_label = np.pad(case.label, 50, constant_values=255)
    window = tuple(slice(a + 50, a + 50 + s) for a, s in zip(start, size))
    np.testing.assert_array_equal(image, padded_image[window])
    np.testing.assert_array_equal(label, padded_label[window])


class CountingStore(WrapperStore):
    """Records every byte range read from the wrapped store."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reads = []

    async def get(self, key, prototype, byte_range=None):
        result = await self._store.get(key, prototype, byte_range)
        if result is not None:
            self.reads.append((key, len(result)))
        return result


def test_patch_reads_only_the_chunks_it_needs(store_path):
    case = fake_case(shape=(32, 32, 32))
    store.write_case(store_path, case)
    counting = CountingStore(LocalStore(str(store_path), read_only=True))
    stored = store.open_case(zarr.open_group(store=counting, mode="r"), "case_a")
    counting.reads.clear()
    image, _ = stored.read_patch((8, 8, 8), (8, 8, 8))  # exactly one 8^3 chunk
    np.testing.assert_array_equal(image, case.image[8:16, 8:16, 8:16])
    shard_bytes = os.path.getsize(store_path / "cases" / "case_a" / "image" / "c" / "0" / "0" / "0")
    read = sum(n for key, n in counting.reads if key.endswith("image/c/0/0/0"))
    assert 0 < read < shard_bytes / 10  # the index and one of 64 chunks, not the shard


def test_stores_are_readable_through_fsspec_urls(store_path):
    store.write_case(store_path, fake_case())
    store.write_manifest(store_path, [store.case_manifest_row(fake_case())])
    memory = fsspec.filesystem("memory")
    memory.put(str(store_path), "/copy.zarr", recursive=True)
    url = "memory://copy.zarr"
    assert store.list_complete_cases(url) == ["case_a"]
    np.testing.assert_array_equal(store.read_case(url, "case_a")[0], fake_case().image)
    assert [row["case_id"] for row in store.read_manifest(url)] == ["case_a"]
    with pytest.raises(store.StoreError, match="needs a local or shared POSIX path"):
        store.write_case(url, fake_case())


def test_manifest_round_trip_with_its_schema(store_path):
    assert store.read_manifest(store_path) == []
    case = fake_case()
    rows = [
        store.case_manifest_row(case, nbytes=1234, seconds=2.5, node="node-1"),
        store.failed_row(CaseFiles("case_b", "/raw/case_b_0000.nii.gz"), CaseError("case_b", "no voxel above 50 HU"),
                         seconds=0.1),
    ]
    assert rows[0] == store.manifest_row("case_a", "ok", attrs=case.attrs, nbytes=1234, seconds=2.5, node="node-1")
    path = store.write_manifest(store_path, rows)
    assert pq.read_schema(path).remove_metadata() == store.MANIFEST_SCHEMA
    back = store.read_manifest(store_path)
    assert back == rows
    assert back[0]["crop_box"] == [1, 2, 3, 30, 40, 50] and back[0]["class_counts"] == '{"0": 100, "14": 7}'
    assert back[1]["error"] == "case case_b: no voxel above 50 HU" and back[1]["original_shape"] is None
    assert back[1]["image_path"] == "/raw/case_b_0000.nii.gz"
    assert [f for f in os.listdir(store_path) if f.endswith(".tmp")] == []
    with pytest.raises(store.StoreError, match="columns"):
        store.write_manifest(store_path, [{**rows[0], "extra": 1}])
    with pytest.raises(ValueError, match="status must be one of"):
        store.manifest_row("c", "done")


def test_manifest_row_of_a_complete_case_is_rebuilt_from_the_store(store_path):
    case = fake_case()
    nbytes = store.write_case(store_path, case)
    row = store.read_case_manifest_row(store_path, "case_a")
    assert row == store.case_manifest_row(case, nbytes=nbytes)
