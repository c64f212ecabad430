"""Fast box reads from panseg's own array layout: one local Zarr v3 shard of Blosc chunks (no Ray).

The store writes every array as one shard file (`c/0/0/0`) of about 64^3 inner chunks, each
compressed with Blosc, followed by the shard index: (offset, nbytes) little-endian uint64 pairs
per inner chunk in C order, (2^64 - 1, 2^64 - 1) for a chunk never written, then a crc32c of those
bytes (the Zarr v3 sharding codec's defaults). zarr-python 3 spends more per inner chunk on its
asyncio and codec-pipeline machinery than Blosc spends decompressing it (BENCHMARKS.md, "Training
step and data loading"), and a training patch overlaps ~25 chunks of each array. So for this one
layout the reader here reads the index once, then preads and decompresses only the chunks a box
overlaps. Any other layout (a URL store, other codecs, several shards) is left to zarr:
`box_reader` returns the array's own indexing then. The on-disk format is unchanged; zarr reads
everything this module reads.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zarr.storage
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

Box = tuple[slice, ...]
_MISSING = 2**64 - 1  # offset and nbytes of a chunk that holds only the fill value (never written)


class ShardBoxReader:
    """Reads boxes of one zarr array stored as a single local shard of Blosc chunks.

    Build it with `ShardBoxReader.open`, which returns None for any other layout. The index is
    read on first use and again whenever the shard file changes (a rewritten case), so a reader
    returns what zarr would return at that moment.
    """

    def __init__(self, array: zarr.Array, path: Path, chunk_shape: tuple[int, ...], chunks_per_shard: tuple[int, ...],
                 index_at_end: bool, index_has_crc: bool):
        self.array = array
        self.path = path
        self.chunk_shape = chunk_shape
        self.chunks_per_shard = chunks_per_shard
        self.index_at_end = index_at_end
        self.index_has_crc = index_has_crc
        self.dtype = np.dtype(array.dtype)
        self.fill_value = array.metadata.fill_value
        self.chunk_nbytes = int(np.prod(chunk_shape)) * self.dtype.itemsize
        self._index: tuple[tuple[int, int, int], np.ndarray] | None = None  # (file identity, index)

    @classmethod
    def open(cls, array: zarr.Array) -> ShardBoxReader | None:
        """A reader for `array`, or None when its layout is not the one this module reads."""
        metadata = array.metadata
        if metadata.zarr_format != 3 or not isinstance(array.store, zarr.storage.LocalStore):
            return None
        if len(metadata.codecs) != 1 or not isinstance(metadata.codecs[0], ShardingCodec):
            return None
        sharding = metadata.codecs[0]
        shard_shape = tuple(getattr(metadata.chunk_grid, "chunk_shape", ()))
        if len(shard_shape) != array.ndim or any(n > s for n, s in zip(array.shape, shard_shape)):
            return None  # not one shard covering the whole array
        dtype = np.dtype(array.dtype)
        inner, index_codecs = sharding.codecs, sharding.index_codecs
        if (dtype.kind not in "biuf" or len(inner) != 2 or not _is_native_bytes(inner[0], dtype)
                or not isinstance(inner[1], BloscCodec) or len(index_codecs) not in (1, 2)
                or not _is_native_bytes(index_codecs[0], np.dtype("<u8"))
                or not all(isinstance(c, Crc32cCodec) for c in index_codecs[1:])):
            return None  # chunks not bytes + Blosc, or an index not bytes (+ crc32c)
        chunk_shape = tuple(int(c) for c in sharding.chunk_shape)
        if any(s % c for s, c in zip(shard_shape, chunk_shape)):
            return None
        path = Path(array.store.root) / array.path / metadata.encode_chunk_key((0,) * array.ndim)
        return cls(array, path, chunk_shape, tuple(s // c for s, c in zip(shard_shape, chunk_shape)),
                   sharding.index_location == ShardingCodecIndexLocation.end, len(index_codecs) == 2)

    def read_into(self, box: Box, out: np.ndarray) -> None:
        """Write the array's values in `box` (slices of step 1 within the array) into `out`, exactly
        what `out[...] = array[box]` writes."""
        starts = [s.start for s in box]
        stops = [s.stop for s in box]
        try:
            with open(self.path, "rb") as handle:
                index = self._index_of(handle.fileno())
                self._read_chunks(handle.fileno(), index, starts, stops, out)
        except FileNotFoundError:  # no shard: every value is the fill value; zarr says which
            out[...] = self.array[box]

    def _read_chunks(self, fd: int, index: np.ndarray, starts: list[int], stops: list[int], out: np.ndarray) -> None:
        chunk = np.empty(self.chunk_shape, dtype=self.dtype)
        ranges = [range(a // c, -(-b // c)) for a, b, c in zip(starts, stops, self.chunk_shape)]
        for coords in itertools.product(*ranges):
            origin = [i * c for i, c in zip(coords, self.chunk_shape)]
            lo = [max(a, o) for a, o in zip(starts, origin)]
            hi = [min(b, o + c) for b, o, c in zip(stops, origin, self.chunk_shape)]
            target = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, starts))
            offset, nbytes = (int(v) for v in index[coords])
            if offset == _MISSING:
                out[target] = self.fill_value
                continue
            data = os.pread(fd, nbytes, offset)
            if len(data) != nbytes or int.from_bytes(data[4:8], "little") != self.chunk_nbytes:
                raise ValueError(f"{self.path}: chunk {coords} is not a Blosc frame of {self.chunk_nbytes} bytes "
                                 f"at offset {offset} (the shard is damaged or was changed while read)")
            blosc.decompress(data, chunk)
            out[target] = chunk[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, origin))]

    def _index_of(self, fd: int) -> np.ndarray:
        """The shard index, read again when the file is not the one it was read from."""
        stat = os.fstat(fd)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._index
        if cached is not None and cached[0] == identity:
            return cached[1]
        index = self._read_index(fd, stat.st_size)
        self._index = (identity, index)
        return index

    def _read_index(self, fd: int, file_size: int) -> np.ndarray:
        entries = int(np.prod(self.chunks_per_shard))
        size = entries * 16 + (4 if self.index_has_crc else 0)
        raw = os.pread(fd, size, file_size - size if self.index_at_end else 0)
        if len(raw) != size:
            raise ValueError(f"{self.path}: the shard is {file_size} bytes, too small for its {size}-byte index")
        if self.index_has_crc and google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ValueError(f"{self.path}: the shard index fails its crc32c check (the shard is damaged)")
        return np.frombuffer(raw, dtype="<u8", count=entries * 2).reshape(*self.chunks_per_shard, 2)


def _is_native_bytes(codec, dtype: np.dtype) -> bool:
    """Whether `codec` is the bytes codec storing `dtype` in this machine's byte order (as numpy reads it)."""
    if not isinstance(codec, BytesCodec):
        return False
    return dtype.itemsize == 1 or (codec.endian is not None and codec.endian.value == sys.byteorder)


def box_reader(array: zarr.Array, direct: bool = True) -> Callable[[Box, np.ndarray], None]:
    """`(box, out) -> None`, writing the array's values in `box` into `out`: the shard reader where
    `direct` is set and the layout allows, else zarr's own indexing."""
    reader = ShardBoxReader.open(array) if direct else None
    if reader is not None:
        return reader.read_into

    def read_into(box: Box, out: np.ndarray) -> None:
        out[...] = array[box]

    return read_into
