"""The Zarr v3 store of preprocessed cases and its Parquet manifest (no Ray).

Layout (DESIGN.md, "The preprocessed store"):

    STORE.zarr/                          group attrs: format, panseg version, preprocessing config, label names, task
    STORE.zarr/cases/<case_id>/image     int16 HU (z, y, x), chunks cfg.chunk_zyx, one shard (= one file)
    STORE.zarr/cases/<case_id>/label     uint8 fused labels (absent for an unlabelled case)
    STORE.zarr/cases/<case_id>/locations/<class_id>   int32 (n, 3) voxel coordinates
                                         case attrs: `preprocessing.case.PreprocessedCase.attrs`
    STORE.zarr/manifest.parquet          one row per input case (MANIFEST_SCHEMA)
    STORE.zarr/.staging/                 cases being written; never read

Atomic writes: a case is written whole into .staging/<case_id>+<uuid>, then renamed to
cases/<case_id>, so a reader sees a case completely or not at all, and a killed writer leaves only a
staging folder, which the next writer of that case (or `clean_staging`) removes. An existing case is
replaced by two renames (old aside, new in), so for a moment the case is absent, never half-written.
rename(2) is atomic on a local or shared POSIX file system (ext4, xfs, NFS, Lustre), which writing
needs; reading works from any path or fsspec URL that zarr opens (e.g. s3://, gs://, memory://).
Two concurrent writers of the same case are not supported (the pipeline writes each case once).

This module sits at the bottom of the import graph with `config` and `io`: it takes a preprocessed
case by duck typing (case_id, status, image, label, locations, attrs).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.errors
import zarr.storage
from zarr.codecs import BloscCodec

from panseg import __version__
from panseg.config import PreprocessConfig, from_dict, label_names, to_dict
from panseg.io import validate_case_id
from panseg.store.shard_reader import box_reader

STORE_FORMAT = "panseg-store"
STORE_FORMAT_VERSION = 1
STATUSES = ("ok", "unlabelled", "failed")
CASES = "cases"
STAGING = ".staging"
MANIFEST = "manifest.parquet"
# zstd level 1 with byte shuffle: on a 469x279x279 int16 CT, 0.34 s to write vs 0.87 s at level 3, 2% larger
_COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")

MANIFEST_SCHEMA = pa.schema([
    pa.field("case_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | unlabelled | failed
    pa.field("error", pa.string()),
    pa.field("image_path", pa.string()),
    pa.field("label_path", pa.string()),
    pa.field("organs_path", pa.string()),
    pa.field("original_shape", pa.list_(pa.int64())),  # (z, y, x)
    pa.field("original_spacing", pa.list_(pa.float64())),  # mm, (z, y, x)
    pa.field("crop_box", pa.list_(pa.int64())),  # [z0, y0, x0, z1, y1, x1] in original voxels, half-open
    pa.field("crop_reason", pa.string()),
    pa.field("crop_body_lost_fraction", pa.float64()),  # share of the body outside the image's crop box
    pa.field("resampled_shape", pa.list_(pa.int64())),
    pa.field("class_counts", pa.string()),  # JSON: {"class id": voxels} on the resampled grid
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("node", pa.string()),  # Ray node id or host name
])

StoreLike = str | os.PathLike | zarr.Group


class StoreError(ValueError):
    """The store is missing, not a panseg store, made with another config, or misused."""


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


def local_path(store_path: str | os.PathLike) -> Path | None:
    """The local file-system path of a store, or None when it is a non-file URL (s3://, memory://...)."""
    text = os.fspath(store_path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def _require_local(store_path: str | os.PathLike, what: str) -> Path:
    path = local_path(store_path)
    if path is None:
        raise StoreError(f"{what} needs a local or shared POSIX path (it relies on an atomic rename), "
                         f"but the store is {os.fspath(store_path)}")
    return path


def _expected_attrs(cfg: PreprocessConfig) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, "panseg_version": __version__,
        "task": cfg.task, "label_names": {str(k): v for k, v in label_names(cfg.task).items()},
        "preprocess": json.loads(json.dumps(to_dict(cfg))),
    }


def create_store(store_path: str | os.PathLike, cfg: PreprocessConfig) -> zarr.Group:
    """Create a store for `cfg`, or open it when it exists with the same config (idempotent).

    Raises:
        StoreError: the path holds a store made with another preprocessing config (the message lists
            the differing keys), or something that is not a panseg store.
    """
    root = _require_local(store_path, "create_store")
    expected = _expected_attrs(cfg)
    if (root / "zarr.json").exists():
        group = open_store(root, mode="r+")
        stored = group.attrs.get("preprocess", {})
        if stored != expected["preprocess"]:
            keys = sorted(k for k in set(stored) | set(expected["preprocess"])
                          if stored.get(k) != expected["preprocess"].get(k))
            diffs = "; ".join(f"{k}: store {stored.get(k)!r}, config {expected['preprocess'].get(k)!r}" for k in keys)
            raise StoreError(f"store {root} was made with another preprocessing config ({diffs}); "
                             "use a new store path, or the store's config")
        return group
    try:
        group = zarr.open_group(str(root), mode="w-", attributes=expected)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        if (root / "zarr.json").exists():  # another process created it just now: check its config
            return create_store(store_path, cfg)
        raise StoreError(f"{root} exists and is not a panseg store; choose another path") from None
    group.create_group(CASES)
    (root / STAGING).mkdir(exist_ok=True)
    return group


def open_store(store: StoreLike, mode: str = "r") -> zarr.Group:
    """Open a store's root group (a path, an fsspec URL, or an open group, returned as is).

    Raises:
        StoreError: there is no panseg store there.
    """
    if isinstance(store, zarr.Group):
        return store
    text = os.fspath(store)
    try:
        group = zarr.open_group(text, mode=mode)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError,
            zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError) as err:
        raise StoreError(f"{text} is not a panseg store (no Zarr group there: {err}); "
                         "create it with create_store or the preprocess command") from None
    if group.attrs.get("format") != STORE_FORMAT:
        raise StoreError(f"{text} is a Zarr group but not a panseg store (attrs format is "
                         f"{group.attrs.get('format')!r}, expected {STORE_FORMAT!r})")
    return group


def read_store_config(store: StoreLike) -> PreprocessConfig:
    """The preprocessing config a store was made with."""
    return from_dict(PreprocessConfig, dict(open_store(store).attrs["preprocess"]), where="store preprocess")


def list_complete_cases(store: StoreLike) -> list[str]:
    """The ids of the cases written completely, sorted (cases being written are not listed)."""
    group = open_store(store)
    if isinstance(group.store, zarr.storage.LocalStore):  # a directory listing: no group is opened
        cases = Path(group.store.root) / group.path / CASES
        if not cases.is_dir():
            return []
        return sorted(p.name for p in cases.iterdir() if (p / "zarr.json").is_file() and not p.name.startswith("."))
    return sorted(name for name in group[CASES].group_keys() if not name.startswith("."))


def _array_layout(shape: tuple[int, ...], chunk_zyx: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks (cfg.chunk_zyx, no larger than the array) and one shard covering the whole array."""
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunk_zyx, shape))
    shards = tuple(-(-s // c) * c for s, c in zip(shape, chunks))
    return chunks, shards


def write_case(store_path: str | os.PathLike, case: Any) -> int:
    """Write one preprocessed case atomically (see the module doc) and return its size in bytes.

    Args:
        store_path: a store made by `create_store` on a local or shared POSIX file system.
        case: a `preprocessing.case.PreprocessedCase` (case_id, status, image, label, locations, attrs).

    Returns:
        Bytes the case occupies on disk.

    Raises:
        StoreError: no store there, a URL store, the case's task differs from the store's, or the
            image is not int16 / the label not uint8 / their shapes differ.
    """
    root = _require_local(store_path, "write_case")
    group = open_store(root)
    validate_case_id(case.case_id)
    _check_case(case, group.attrs["task"])
    chunk_zyx = tuple(group.attrs["preprocess"]["chunk_zyx"])
    staging_root = root / STAGING
    staging_root.mkdir(exist_ok=True)
    _remove_staging(staging_root, case.case_id)  # what a killed writer of this case left
    staging = staging_root / f"{case.case_id}+{uuid.uuid4().hex}"
    try:
        _write_case_group(staging, case, chunk_zyx)
        nbytes = _folder_bytes(staging)
        _publish(staging, root / CASES / case.case_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return nbytes


def _check_case(case: Any, task: str) -> None:
    if case.attrs.get("task") != task:
        raise StoreError(f"case {case.case_id} was preprocessed for task {case.attrs.get('task')!r}, "
                         f"but the store holds task {task!r}")
    if case.image.dtype != np.int16 or case.image.ndim != 3:
        raise StoreError(f"case {case.case_id}: image must be 3D int16 HU, but it is "
                         f"{case.image.ndim}D {case.image.dtype}")
    if case.label is not None and (case.label.dtype != np.uint8 or case.label.shape != case.image.shape):
        raise StoreError(f"case {case.case_id}: label must be uint8 of the image's shape {case.image.shape}, "
                         f"but it is {case.label.dtype} {case.label.shape}")


def _write_case_group(path: Path, case: Any, chunk_zyx: tuple[int, ...]) -> None:
    group = zarr.open_group(str(path), mode="w-", attributes=json.loads(json.dumps(case.attrs)))
    arrays = {"image": case.image} if case.label is None else {"image": case.image, "label": case.label}
    for name, data in arrays.items():
        chunks, shards = _array_layout(data.shape, chunk_zyx)
        array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                                   compressors=_COMPRESSOR, fill_value=0, dimension_names=("z", "y", "x"))
        array[...] = data
    locations = group.create_group("locations")
    for class_id, coords in sorted(case.locations.items()):
        if len(coords):
            coords = np.asarray(coords, dtype=np.int32)
            locations.create_array(str(int(class_id)), shape=coords.shape, dtype=np.int32, chunks=coords.shape,
                                   compressors=_COMPRESSOR, fill_value=0)[...] = coords


def _publish(staging: Path, final: Path) -> None:
    """Move a complete case into place: one rename, or two when it replaces an existing case."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = staging.with_name(f"{staging.name}.old")
        os.rename(final, old)  # from here until the next rename the case is absent, never partial
        try:
            os.rename(staging, final)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def _remove_staging(staging_root: Path, case_id: str) -> None:
    for entry in staging_root.glob(f"{case_id}+*"):  # '+' never occurs in a case id: no prefix clashes
        shutil.rmtree(entry, ignore_errors=True)


def clean_staging(store_path: str | os.PathLike) -> list[str]:
    """Remove every staging folder (call when no writer runs, e.g. before a pipeline starts).

    Returns:
        The names removed.
    """
    staging_root = _require_local(store_path, "clean_staging") / STAGING
    removed = sorted(p.name for p in staging_root.iterdir()) if staging_root.is_dir() else []
    for name in removed:
        shutil.rmtree(staging_root / name, ignore_errors=True)
    return removed


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredCase:
    """The arrays of one stored case, opened once (keep it to read many patches cheaply).

    Patches are read through `shard_reader.box_reader`: the store's own layout (one local shard of
    Blosc chunks per array) is read directly, anything else through zarr; the values are the same.
    `direct_reads=False` reads through zarr only (for comparisons).
    """

    case_id: str
    image: zarr.Array
    label: zarr.Array | None
    attrs: dict[str, Any]
    direct_reads: bool = True
    _read_image: Callable[[tuple[slice, ...], np.ndarray], None] = field(init=False, repr=False, compare=False)
    _read_label: Callable[[tuple[slice, ...], np.ndarray], None] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        read_label = None if self.label is None else box_reader(self.label, self.direct_reads)
        object.__setattr__(self, "_read_image", box_reader(self.image, self.direct_reads))
        object.__setattr__(self, "_read_label", read_label)

    def read_patch(self, start_zyx: tuple[int, ...], size_zyx: tuple[int, ...], pad_image_hu: float | None = None,
                   pad_label: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """A patch that may reach outside the volume; see `read_patch`."""
        if pad_image_hu is None:
            pad_image_hu = self.attrs["clip_hu"][0]  # air after clipping
        source, target = _overlap(tuple(self.image.shape), start_zyx, size_zyx)
        image = np.full(tuple(size_zyx), pad_image_hu, dtype=np.int16)
        label = None if self.label is None else np.full(tuple(size_zyx), pad_label, dtype=np.uint8)
        if source is not None:  # only the overlapping chunks are read
            self._read_image(source, image[target])
            if label is not None:
                self._read_label(source, label[target])
        return image, label


def _overlap(shape: tuple[int, ...], start: tuple[int, ...],
             size: tuple[int, ...]) -> tuple[tuple[slice, ...] | None, tuple[slice, ...] | None]:
    """Slices of the array and of the patch where a patch at `start` overlaps the array."""
    if len(start) != 3 or len(size) != 3 or any(int(s) < 1 for s in size):
        raise ValueError(f"a patch needs 3 start indices and 3 sizes >= 1, but it is start {start}, size {size}")
    lo = [max(0, int(a)) for a in start]
    hi = [min(n, int(a) + int(s)) for n, a, s in zip(shape, start, size)]
    if any(a >= b for a, b in zip(lo, hi)):
        return None, None
    source = tuple(slice(a, b) for a, b in zip(lo, hi))
    target = tuple(slice(a - int(s0), b - int(s0)) for a, b, s0 in zip(lo, hi, start))
    return source, target


def open_case(store: StoreLike, case_id: str, direct_reads: bool = True) -> StoredCase:
    """Open one complete case (`direct_reads`: see `StoredCase`).

    Raises:
        StoreError: no such case.
    """
    validate_case_id(case_id)
    group = open_store(store)
    try:
        case = group[f"{CASES}/{case_id}"]
    except KeyError:
        raise StoreError(f"case {case_id} is not in the store {group.store} (not preprocessed, failed, "
                         "or still being written)") from None
    label = case["label"] if "label" in case else None
    return StoredCase(case_id, case["image"], label, dict(case.attrs), direct_reads)


def read_case(store: StoreLike, case_id: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """A whole case: (image int16 HU, label uint8 or None when unlabelled, attrs)."""
    case = open_case(store, case_id)
    return case.image[...], None if case.label is None else case.label[...], case.attrs


def read_patch(store: StoreLike, case_id: str, start_zyx: tuple[int, ...], size_zyx: tuple[int, ...],
               pad_image_hu: float | None = None, pad_label: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """A patch of a case; only the chunks it overlaps are read.

    Args:
        store: store path, URL or open group.
        case_id: the case.
        start_zyx: first voxel of the patch; may be negative or beyond the volume.
        size_zyx: patch size.
        pad_image_hu: image value outside the volume; default the store's lower clip (air after clipping).
        pad_label: label value outside the volume.

    Returns:
        (image int16 (size_zyx), label uint8 (size_zyx) or None when unlabelled).
    """
    return open_case(store, case_id).read_patch(start_zyx, size_zyx, pad_image_hu, pad_label)


def read_locations(store: StoreLike, case_id: str) -> dict[int, np.ndarray]:
    """class id -> int32 (n, 3) voxel coordinates sampled from that class (empty when unlabelled)."""
    validate_case_id(case_id)
    group = open_store(store)
    case = group[f"{CASES}/{case_id}"]
    if "locations" not in case:
        return {}
    return {int(name): array[...] for name, array in case["locations"].arrays()}


def case_attrs(store: StoreLike, case_id: str) -> dict[str, Any]:
    """The attrs of a stored case (provenance, geometry, crop, class counts)."""
    return open_case(store, case_id).attrs


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def manifest_row(case_id: str, status: str, *, attrs: dict[str, Any] | None = None, files: Any = None,
                 error: BaseException | str | None = None, nbytes: int = 0, seconds: float = 0.0,
                 node: str | None = None) -> dict[str, Any]:
    """One manifest row, from a case's attrs or from what is known about a failed case.

    Args:
        case_id: the case.
        status: 'ok', 'unlabelled' or 'failed'.
        attrs: a PreprocessedCase's (or a stored case's) attrs: paths, shapes, crop and counts.
        files: the `io.CaseFiles`, for the paths when there are no attrs.
        error: the exception or message of a failed case.
        nbytes: bytes written (`write_case`'s result).
        seconds: wall time spent on the case.
        node: Ray node id or host name.

    Returns:
        A dict with exactly the MANIFEST_SCHEMA columns.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, but it is {status!r}")
    attrs = attrs or {}
    counts = attrs.get("class_counts")
    return {
        "case_id": case_id, "status": status, "error": None if error is None else str(error),
        "image_path": attrs.get("image_path", getattr(files, "image", None)),
        "label_path": attrs.get("label_path", getattr(files, "label", None)),
        "organs_path": attrs.get("organs_path", getattr(files, "organs", None)),
        "original_shape": attrs.get("original_shape_zyx"), "original_spacing": attrs.get("original_spacing_zyx_mm"),
        "crop_box": attrs.get("crop_box_zyx"), "crop_reason": attrs.get("crop_reason"),
        "crop_body_lost_fraction": attrs.get("crop_body_lost_fraction"),
        "resampled_shape": attrs.get("resampled_shape_zyx"),
        "class_counts": None if counts is None else json.dumps(counts, sort_keys=True),
        "bytes": int(nbytes), "seconds": float(seconds), "node": node,
    }


def case_manifest_row(case: Any, *, nbytes: int = 0, seconds: float = 0.0, node: str | None = None) -> dict[str, Any]:
    """The row of a preprocessed case (a `PreprocessedCase`; its status is 'ok' or 'unlabelled')."""
    return manifest_row(case.case_id, case.status, attrs=case.attrs, nbytes=nbytes, seconds=seconds, node=node)


def failed_row(files: Any, error: BaseException | str | None, *, seconds: float = 0.0,
               node: str | None = None) -> dict[str, Any]:
    """The row of a case that failed (`files` is its `io.CaseFiles`)."""
    return manifest_row(files.case_id, "failed", files=files, error=error, seconds=seconds, node=node)


def read_case_manifest_row(store: StoreLike, case_id: str) -> dict[str, Any]:
    """The row of a case already complete in the store, rebuilt from its attrs (seconds 0, node None:
    a rerun that skips the case did not spend time on it)."""
    stored = open_case(store, case_id)
    group = open_store(store)
    nbytes = 0
    if isinstance(group.store, zarr.storage.LocalStore):
        nbytes = _folder_bytes(Path(group.store.root) / group.path / CASES / case_id)
    return manifest_row(case_id, stored.attrs["status"], attrs=stored.attrs, nbytes=nbytes)


def write_manifest(store_path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write the manifest atomically (temporary file, then rename), replacing any previous one.

    Raises:
        StoreError: a row has missing or unknown columns, or an unknown status.
    """
    root = _require_local(store_path, "write_manifest")
    names = set(MANIFEST_SCHEMA.names)
    for row in rows:
        if set(row) != names:
            raise StoreError(f"manifest row {row.get('case_id')!r} has columns {sorted(set(row) ^ names)} "
                             f"missing or unknown; build rows with manifest_row")
        if row["status"] not in STATUSES:
            raise StoreError(f"manifest row {row['case_id']!r} has status {row['status']!r}; valid: {STATUSES}")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = root / MANIFEST
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_manifest(store_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest's rows, or [] when the store has none yet (a path or an fsspec URL)."""
    path = local_path(store_path)
    if path is not None:
        if not (path / MANIFEST).is_file():
            return []
        return pq.read_table(path / MANIFEST, schema=MANIFEST_SCHEMA).to_pylist()
    import fsspec  # only for URL stores

    url = f"{os.fspath(store_path).rstrip('/')}/{MANIFEST}"
    fs, fs_path = fsspec.core.url_to_fs(url)
    if not fs.exists(fs_path):
        return []
    with fs.open(fs_path, "rb") as handle:
        return pq.read_table(handle, schema=MANIFEST_SCHEMA).to_pylist()
