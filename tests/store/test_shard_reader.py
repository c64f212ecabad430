"""Direct shard reads: the same values as zarr for any box, and zarr for every other layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, ZstdCodec

from panseg.config import PreprocessConfig
from panseg.preprocessing.case import PreprocessedCase
from panseg.store import shard_reader
from panseg.store import zarr_store as store
from panseg.store.shard_reader import ShardBoxReader, box_reader

CFG = PreprocessConfig(chunk_zyx=(8, 8, 8), task="tumor")
SHAPE = (20, 18, 30)  # 2.5 x 2.25 x 3.75 chunks of 8^3: partial edge chunks on every axis


def sparse_case(case_id="case_a", seed=0) -> PreprocessedCase:
    """Random HU and a label that is empty in most chunks (those chunks are never written)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-160, 241, size=SHAPE, dtype=np.int16)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:7, 3:9, 20:27] = rng.integers(1, 15, size=(5, 6, 7), dtype=np.uint8)  # 4 of 36 chunks
    attrs = {"case_id": case_id, "task": "tumor", "status": "ok", "resampled_shape_zyx": list(SHAPE),
             "clip_hu": [-160.0, 240.0], "class_counts": {"0": 1, "14": 1}}
    return PreprocessedCase(case_id, "ok", image, label, {14: np.argwhere(label > 0)[:5].astype(np.int32)}, attrs)


@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "STORE.zarr"
    store.create_store(path, CFG)
    case = sparse_case()
    store.write_case(path, case)
    return path, case


def random_boxes(rng, shape, count):
    for _ in range(count):
        starts = [int(rng.integers(0, n)) for n in shape]
        yield tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, shape))


@pytest.mark.parametrize("name", ["image", "label"])
def test_boxes_equal_zarr(stored, name):
    path, case = stored
    array = store.open_store(path)[f"cases/case_a/{name}"]
    reader = ShardBoxReader.open(array)
    assert reader is not None  # the store's own layout is read directly
    if name == "label":
        with open(reader.path, "rb") as handle:
            index = reader._index_of(handle.fileno())
        assert (index[..., 0] == 2**64 - 1).sum() == 32  # chunks of zeros are never written: read as fill values
    rng = np.random.default_rng(1)
    for box in [tuple(slice(0, n) for n in SHAPE), *random_boxes(rng, SHAPE, 300)]:
        out = np.empty([s.stop - s.start for s in box], dtype=array.dtype)
        reader.read_into(box, out)
        expected = array[box]
        assert out.dtype == expected.dtype
        np.testing.assert_array_equal(out, expected, err_msg=str(box))
        np.testing.assert_array_equal(out, getattr(case, name)[box], err_msg=str(box))


def test_patches_over_the_borders_equal_zarr(stored):
    path, _ = stored
    direct = store.open_case(path, "case_a")
    through_zarr = store.open_case(path, "case_a", direct_reads=False)
    assert isinstance(direct._read_image.__self__, ShardBoxReader)
    assert isinstance(direct._read_label.__self__, ShardBoxReader)
    rng = np.random.default_rng(2)
    for _ in range(200):
        size = tuple(int(rng.integers(1, 2 * n)) for n in SHAPE)  # up to twice the volume
        start = tuple(int(rng.integers(-s, n + 2)) for s, n in zip(size, SHAPE))  # inside, across, outside
        image, label = direct.read_patch(start, size, pad_label=255)
        ref_image, ref_label = through_zarr.read_patch(start, size, pad_label=255)
        np.testing.assert_array_equal(image, ref_image, err_msg=f"start {start} size {size}")
        np.testing.assert_array_equal(label, ref_label, err_msg=f"start {start} size {size}")


def test_only_the_needed_chunks_are_read(stored, monkeypatch):
    path, case = stored
    reads = []
    pread = os.pread

    def counting_pread(fd, n, offset):
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(shard_reader.os, "pread", counting_pread)
    read_into = box_reader(store.open_store(path)["cases/case_a/image"])
    out = np.empty((8, 8, 8), dtype=np.int16)
    read_into((slice(8, 16), slice(8, 16), slice(8, 16)), out)  # exactly one chunk, after the index
    np.testing.assert_array_equal(out, case.image[8:16, 8:16, 8:16])
    assert len(reads) == 2 and reads[0] == 3 * 3 * 4 * 16 + 4  # index: 36 (offset, nbytes) pairs and a crc32c
    reads.clear()
    read_into((slice(4, 12), slice(4, 12), slice(4, 12)), out)  # 2 x 2 x 2 chunks; the index is kept
    np.testing.assert_array_equal(out, case.image[4:12, 4:12, 4:12])
    assert len(reads) == 8


def test_a_rewritten_case_is_read_afresh(stored):
    path, _ = stored
    opened = store.open_case(path, "case_a")
    opened.read_patch((0, 0, 0), (4, 4, 4))  # the index of the first version is cached
    second = sparse_case(seed=5)
    store.write_case(path, second)
    image, label = opened.read_patch((0, 0, 0), SHAPE)
    np.testing.assert_array_equal(image, second.image)
    np.testing.assert_array_equal(label, second.label)


def test_a_damaged_index_is_an_error(stored):
    path, _ = stored
    shard = path / "cases" / "case_a" / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a byte of the last index entry
    shard.write_bytes(bytes(data))
    read_into = box_reader(store.open_store(path)["cases/case_a/image"])
    with pytest.raises(ValueError, match="crc32c"):
        read_into((slice(0, 2),) * 3, np.empty((2, 2, 2), dtype=np.int16))


def test_index_at_the_start_without_crc_and_fill_values(tmp_path):
    codec = ShardingCodec(chunk_shape=(4, 4, 4), codecs=[BytesCodec(), BloscCodec(cname="lz4")],
                          index_codecs=[BytesCodec()], index_location="start")
    array = zarr.create(shape=(10, 12, 14), chunks=(12, 12, 16), dtype="int16", fill_value=7, zarr_format=3,
                        store=str(tmp_path / "a.zarr"), codecs=[codec])
    read_into = box_reader(array)
    full = (slice(0, 10), slice(0, 12), slice(0, 14))
    out = np.zeros((10, 12, 14), dtype=np.int16)
    read_into(full, out)  # no shard written yet: zarr's fill value
    assert (out == 7).all()
    array[1:6, 2:9, 3:5] = np.arange(5 * 7 * 2, dtype=np.int16).reshape(5, 7, 2)  # chunks left unwritten
    assert isinstance(read_into.__self__, ShardBoxReader)
    for box in [full, *random_boxes(np.random.default_rng(3), (10, 12, 14), 100)]:
        out = np.empty([s.stop - s.start for s in box], dtype=np.int16)
        read_into(box, out)
        np.testing.assert_array_equal(out, array[box], err_msg=str(box))


def _other_layout(kind: str, root):
    data = np.arange(10 * 12 * 14, dtype=np.int16).reshape(10, 12, 14)
    common = {"shape": data.shape, "dtype": data.dtype, "fill_value": 0}
    if kind == "memory store":
        array = zarr.create_array(zarr.storage.MemoryStore(), chunks=(4, 4, 4), shards=(12, 12, 16), **common)
    elif kind == "no sharding":
        array = zarr.create_array(str(root), chunks=(4, 4, 4), **common)
    elif kind == "several shards":
        array = zarr.create_array(str(root), chunks=(4, 4, 4), shards=(8, 8, 8), **common)
    elif kind == "zstd codec":
        array = zarr.create_array(str(root), chunks=(4, 4, 4), shards=(12, 12, 16), compressors=ZstdCodec(), **common)
    else:  # big-endian bytes
        codec = ShardingCodec(chunk_shape=(4, 4, 4), codecs=[BytesCodec(endian="big"), BloscCodec()])
        array = zarr.create(chunks=(12, 12, 16), zarr_format=3, store=str(root), codecs=[codec], **common)
    array[...] = data
    return array, data


@pytest.mark.parametrize("kind", ["memory store", "no sharding", "several shards", "zstd codec", "big endian"])
def test_other_layouts_are_read_by_zarr(tmp_path, kind):
    array, data = _other_layout(kind, tmp_path / "a.zarr")
    assert ShardBoxReader.open(array) is None
    out = np.empty((5, 6, 7), dtype=np.int16)
    box_reader(array)((slice(3, 8), slice(2, 8), slice(7, 14)), out)
    np.testing.assert_array_equal(out, data[3:8, 2:8, 7:14])
