"""Reading and writing CT images and masks with SimpleITK, and finding cases in a raw cohort.

A `Volume` is a numpy array in (z, y, x) order with the geometry SimpleITK reports: spacing in array
order, origin and direction in ITK's physical (x, y, z) order. Everything panseg writes goes through
`write_volume`, which writes aside and renames, so a reader never sees a half-written file.

Raw cohort layout (FLARE / nnU-Net):
    RAW/imagesTr/<case>_0000.nii.gz   CT in HU
    RAW/labelsTr/<case>.nii.gz        tumor annotation (or organ ids 1-13 for the organ task)
    RAW/organsTr/<case>.nii.gz        optional organ pseudo-labels
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
CHANNEL_SUFFIX = "_0000"
NOTES_KEY = "ITK_FileNotes"  # NIfTI descrip (also what MetaImage and NRRD readers call a file's notes)
MAX_NOTES = 80  # the size of the NIfTI-1 descrip field


class ImageReadError(ValueError):
    """An image could not be read, or is not what the caller needs (named in the message)."""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in physical space.

    Attributes:
        shape_zyx: array shape (z, y, x).
        spacing_zyx_mm: voxel size along the array axes.
        origin_xyz_mm: physical position of voxel (0, 0, 0), ITK's (x, y, z) order.
        direction_xyz: 3x3 direction cosines, row-major, as SimpleITK's GetDirection().
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction_xyz: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def matches(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """Same shape, and spacing/origin/direction equal within a relative tolerance."""
        if tuple(self.shape_zyx) != tuple(other.shape_zyx):
            return False
        pairs = [
            (self.spacing_zyx_mm, other.spacing_zyx_mm),
            (self.origin_xyz_mm, other.origin_xyz_mm),
            (self.direction_xyz, other.direction_xyz),
        ]
        scale = max(1.0, max(abs(v) for v in self.spacing_zyx_mm))
        return all(np.allclose(a, b, rtol=tolerance, atol=tolerance * scale) for a, b in pairs)

    def describe(self) -> str:
        return (f"shape {tuple(self.shape_zyx)}, spacing {tuple(round(s, 4) for s in self.spacing_zyx_mm)} mm, "
                f"origin {tuple(round(o, 2) for o in self.origin_xyz_mm)}")


@dataclass(frozen=True)
class Volume:
    """A 3D array (z, y, x) with its geometry."""

    array: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction_xyz: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def geometry(self) -> Geometry:
        return Geometry(tuple(int(s) for s in self.array.shape), self.spacing_zyx_mm, self.origin_xyz_mm,
                        self.direction_xyz)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"with_array needs shape {self.array.shape}, but it is {array.shape}")
        return Volume(array, self.spacing_zyx_mm, self.origin_xyz_mm, self.direction_xyz)


def to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(tuple(float(s) for s in reversed(volume.spacing_zyx_mm)))
    image.SetOrigin(tuple(float(o) for o in volume.origin_xyz_mm))
    image.SetDirection(tuple(float(d) for d in volume.direction_xyz))
    return image


def from_sitk(image: sitk.Image) -> Volume:
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing_zyx_mm=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin_xyz_mm=tuple(float(o) for o in image.GetOrigin()),
        direction_xyz=tuple(float(d) for d in image.GetDirection()),
    )


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(
        shape_zyx=tuple(int(s) for s in reversed(image.GetSize())),
        spacing_zyx_mm=tuple(float(s) for s in reversed(image.GetSpacing())),
        origin_xyz_mm=tuple(float(o) for o in image.GetOrigin()),
        direction_xyz=tuple(float(d) for d in image.GetDirection()),
    )


def read_sitk(path: str | Path, threads: int | None = None) -> sitk.Image:
    """Read a 3D image file or a DICOM series folder as a SimpleITK image.

    Raises:
        ImageReadError: the file is missing, unreadable (corrupt, truncated) or not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path} does not exist")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            if threads:
                reader.SetNumberOfWorkUnits(threads)
            image = reader.Execute()
            _check_nifti_complete(path, image)
            _check_nifti_finite(path, image)
    except RuntimeError as err:
        raise ImageReadError(f"{path} could not be read: {_itk_reason(err)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"{path} must be a 3D single-channel image, but it has {image.GetDimension()} dimensions "
            f"and {image.GetNumberOfComponentsPerPixel()} components, size {image.GetSize()}"
        )
    return image


def _itk_reason(err: Exception) -> str:
    """ITK's multi-line exception text condensed to its informative tail."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text[-300:] if text else "unknown error"


def _nifti_offset_and_type(header: bytes) -> tuple[int, int]:
    """(vox_offset, datatype code) of a NIfTI-1 or NIfTI-2 header."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            return int(struct.unpack(endian + "f", header[108:112])[0]), struct.unpack(endian + "h", header[70:72])[0]
        if sizeof_hdr == 540:
            return struct.unpack(endian + "q", header[168:176])[0], struct.unpack(endian + "h", header[12:14])[0]
    raise RuntimeError("not a NIfTI header (sizeof_hdr is neither 348 nor 540)")


def _nifti_expected_bytes(header: bytes, image: sitk.Image) -> int:
    """Header offset plus voxel bytes of a complete NIfTI-1/2 file (bytes per value as stored, not as read)."""
    vox_offset, datatype = _nifti_offset_and_type(header)
    voxels = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    stored = _NIFTI_TYPES.get(datatype)
    size = np.dtype(stored[0]).itemsize if stored else image.GetSizeOfPixelComponent()
    return vox_offset + voxels * size


def _check_nifti_complete(path: Path, image: sitk.Image) -> None:
    """Raise RuntimeError when a NIfTI file holds fewer voxel bytes than its header promises.

    ITK's NIfTI reader fills a truncated file's missing voxels silently (seen with SimpleITK 2.5),
    so a cut-off download would otherwise pass as a CT whose lower half is zeros.
    """
    name = path.name
    if name.endswith(".nii"):
        with open(path, "rb") as f:
            expected = _nifti_expected_bytes(f.read(540), image)
        actual = path.stat().st_size
    elif name.endswith(".nii.gz"):
        with gzip.open(path, "rb") as f:
            expected = _nifti_expected_bytes(f.read(540), image)
        with open(path, "rb") as f:  # gzip's trailer holds the uncompressed size modulo 2**32
            f.seek(-4, os.SEEK_END)
            actual = struct.unpack("<I", f.read(4))[0]
        if actual == expected % 2**32:
            return
        actual = _gunzipped_size(path)  # a multi-member file: count for real
    else:
        return
    if actual < expected:
        raise RuntimeError(f"truncated NIfTI: {actual} of {expected} bytes present")


def _check_nifti_finite(path: Path, image: sitk.Image) -> None:
    """Raise RuntimeError when a floating-point NIfTI file stores NaN voxels.

    ITK's NIfTI reader turns NaN into 0 (seen with SimpleITK 2.5), which would pass a broken CT as
    one with patches of water; the file's own bytes are checked instead. Integer CTs (the usual
    case) cost nothing here.
    """
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) or not path.name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        vox_offset, datatype = _nifti_offset_and_type(f.read(540))
        dtype = {16: np.float32, 64: np.float64}.get(datatype)  # the file's values, before any rescaling
        if dtype is None:
            return
        f.seek(vox_offset)
        data = np.frombuffer(f.read(), dtype=dtype)
    bad = int(np.isnan(data).sum())
    if bad:
        raise RuntimeError(f"{bad} voxel(s) are NaN; a CT must hold finite Hounsfield units")


def _gunzipped_size(path: Path) -> int:
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                size += len(chunk)
    except (EOFError, OSError, gzip.BadGzipFile):
        pass  # a truncated stream: the bytes counted so far are all there is
    return size


def read_volume(path: str | Path, threads: int | None = None) -> Volume:
    """Read a 3D image as a `Volume` (array in (z, y, x) order, dtype as stored).

    A `.nii.gz` is decompressed by ISA-L (`_read_nifti_gz`) with the geometry ITK reads from its header:
    SimpleITK's volume; other formats, and NIfTI the fast path cannot read as ITK does, go to SimpleITK.
    """
    path = Path(path)
    if path.name.endswith(".nii.gz") and path.is_file():
        volume = _read_nifti_gz(path)
        if volume is not None:
            return volume
    return from_sitk(read_sitk(path, threads))


# NIfTI-1 datatype code -> numpy dtype and the SimpleITK pixel type ITK reads it as (no scaling)
_NIFTI_TYPES = {2: (np.uint8, sitk.sitkUInt8), 4: (np.int16, sitk.sitkInt16), 8: (np.int32, sitk.sitkInt32),
                16: (np.float32, sitk.sitkFloat32), 64: (np.float64, sitk.sitkFloat64), 256: (np.int8, sitk.sitkInt8),
                512: (np.uint16, sitk.sitkUInt16), 768: (np.uint32, sitk.sitkUInt32), 1024: (np.int64, sitk.sitkInt64)}


def _nifti1_layout(header: bytes) -> tuple[str, tuple[int, int, int], int, int, float, float] | None:
    """(byte order, dims xyz, datatype, vox_offset, scl_slope, scl_inter) of a 3D NIfTI-1 header, else None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            vox_offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            if dim[0] != 3 or min(dim[1:4]) < 1 or header[344:347] != b"n+1":
                return None
            return endian, dim[1:4], datatype, int(vox_offset), slope, inter
    return None


def _read_chunks(f, out: memoryview, chunk: int = 2**20) -> int:
    """Fill `out` in 1 MB reads (igzip's readinto makes one whole temporary: 25% more CPU); bytes read."""
    done = 0
    while done < len(out):
        data = f.read(min(chunk, len(out) - done))
        if not data:
            break
        out[done:done + len(data)] = data
        done += len(data)
    return done


def _read_nifti_gz(path: Path) -> Volume | None:
    """A single-file 3D NIfTI-1 `.nii.gz` decompressed by ISA-L into its array, with the geometry ITK's
    reader takes from the header (qform/sform rules included); None when ITK would read it otherwise
    (NIfTI-2, 4D, intensity scaling, another pixel type): then SimpleITK reads it.

    Raises:
        ImageReadError: unreadable, truncated, or float voxels that are NaN (as `read_sitk` says).
    """
    from isal import igzip  # imported here: only this path needs it

    try:
        with igzip.open(path, "rb") as f:
            layout = _nifti1_layout(f.read(348))
            if layout is None:
                return None
            endian, (nx, ny, nz), datatype, vox_offset, slope, inter = layout
            if datatype not in _NIFTI_TYPES or slope not in (0.0, 1.0) or inter != 0.0:
                return None
            info = _header_reader(path)  # after the cheap checks: its pixel type and geometry are ITK's
            dtype, pixel = _NIFTI_TYPES[datatype]
            if info.GetPixelID() != pixel or info.GetSize() != (nx, ny, nz) or info.GetNumberOfComponents() != 1:
                return None
            array = np.empty((nz, ny, nx), dtype=np.dtype(dtype).newbyteorder(endian))
            f.seek(vox_offset)
            got = _read_chunks(f, memoryview(array.reshape(-1).view(np.uint8)))
    except (OSError, EOFError, ValueError) as err:
        raise ImageReadError(f"{path} could not be read: {err}") from None
    if got < array.nbytes:
        raise ImageReadError(f"{path} could not be read: truncated NIfTI: {vox_offset + got} of "
                             f"{vox_offset + array.nbytes} bytes present")
    array = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "f" and (bad := int(np.isnan(array).sum())):
        raise ImageReadError(f"{path} could not be read: {bad} voxel(s) are NaN; a CT must hold finite "
                             "Hounsfield units")
    return Volume(array, tuple(float(s) for s in reversed(info.GetSpacing())),
                  tuple(float(o) for o in info.GetOrigin()), tuple(float(d) for d in info.GetDirection()))


def read_geometry(path: str | Path) -> Geometry:
    """The geometry of an image file from its header alone (the voxels are not read)."""
    path = Path(path)
    if path.is_dir():
        return geometry_of(_read_dicom_series(path))
    reader = _header_reader(path)
    size = reader.GetSize()
    if len(size) != 3:
        raise ImageReadError(f"{path} must be 3D, but its size is {size}")
    return Geometry(
        shape_zyx=tuple(int(s) for s in reversed(size)),
        spacing_zyx_mm=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin_xyz_mm=tuple(float(o) for o in reader.GetOrigin()),
        direction_xyz=tuple(float(d) for d in reader.GetDirection()),
    )


def read_notes(path: str | Path) -> str | None:
    """The free-text notes of an image file's header (NIfTI `descrip`), None when it has none (or empty).

    Raises:
        ImageReadError: the file cannot be read.
    """
    reader = _header_reader(path)
    return (reader.GetMetaData(NOTES_KEY) if reader.HasMetaDataKey(NOTES_KEY) else "") or None


def _header_reader(path: str | Path) -> sitk.ImageFileReader:
    """A SimpleITK reader that has read `path`'s header (not its voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(f"{path} could not be read: {_itk_reason(err)}") from None
    return reader


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(f"{folder} holds no DICOM series")
    if len(series) > 1:
        raise ImageReadError(f"{folder} holds {len(series)} DICOM series; give a folder with exactly one")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def write_volume(volume: Volume, path: str | Path, compress: bool = True, notes: str | None = None) -> Path:
    """Write a volume atomically: to a hidden temporary file beside `path`, then rename.

    The format follows the suffix (.nii.gz, .nii, .mha, .nrrd). A DICOM series is read-only here.
    `notes` go into the header (NIfTI `descrip`: at most 80 characters; `read_notes` reads them back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _image_suffix(path.name)
    if suffix is None:
        raise ValueError(f"cannot write {path}: the suffix must be one of {', '.join(IMAGE_SUFFIXES)}")
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        image = to_sitk(volume)
        if notes is not None:
            if len(notes) > MAX_NOTES:
                raise ValueError(f"cannot write {path}: header notes hold at most {MAX_NOTES} characters, "
                                 f"but these have {len(notes)}")
            image.SetMetaData(NOTES_KEY, notes)
        if compress and suffix == ".nii.gz":
            _write_nifti_gz(image, tmp)
        else:
            sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ISA-L's levels run 0-3; at 1 a 300x512x512 mask is written 1.52x faster than by ITK's zlib, in a file
# 1.8x larger (631 KB against 358 KB; BENCHMARKS.md, the CPU side of one case)
GZIP_LEVEL = 1


def _write_nifti_gz(image: sitk.Image, path: Path) -> None:
    """`path` (.nii.gz): ITK writes the NIfTI uncompressed beside it and ISA-L gzips those bytes, so the file
    inflates to exactly what ITK writes (header, qform/sform, notes) at a fraction of zlib's CPU time."""
    from isal import igzip

    raw = path.with_name(path.name[: -len(".gz")])
    try:
        sitk.WriteImage(image, str(raw), False)
        with open(raw, "rb") as src, igzip.open(path, "wb", compresslevel=GZIP_LEVEL) as dst:
            shutil.copyfileobj(src, dst, 2**22)
    finally:
        raw.unlink(missing_ok=True)


def _image_suffix(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_image_suffix(name: str) -> str | None:
    """File name without its image suffix, or None when the name is not an image file."""
    suffix = _image_suffix(name)
    return name[: -len(suffix)] if suffix else None


def validate_case_id(case_id: str) -> None:
    """Raise ValueError unless `case_id` is safe as a file and Zarr group name."""
    if not CASE_ID_PATTERN.match(case_id) or case_id in (".", ".."):
        raise ValueError(f"case id {case_id!r} is invalid: it must match [A-Za-z0-9._-]+ (no path separators or spaces)")


# ----------------------------------------------------------------------------------------------
# Cohort discovery
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. `error` is set when the case cannot be processed as found."""

    case_id: str
    image: str | None
    label: str | None = None
    organs: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Cohort:
    root: str
    cases: tuple[CaseFiles, ...] = field(default_factory=tuple)

    @property
    def valid(self) -> tuple[CaseFiles, ...]:
        return tuple(c for c in self.cases if c.error is None)

    @property
    def invalid(self) -> tuple[CaseFiles, ...]:
        return tuple(c for c in self.cases if c.error is not None)


def _entries_by_stem(folder: Path, strip_channel: bool) -> dict[str, Path]:
    """Image files (and DICOM folders for images) in `folder`, keyed by case id."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # temporary files of an atomic write, editor files
        stem = strip_image_suffix(entry.name) if entry.is_file() else (entry.name if strip_channel else None)
        if stem is None:
            continue
        if strip_channel:
            if not stem.endswith(CHANNEL_SUFFIX):
                continue
            stem = stem[: -len(CHANNEL_SUFFIX)]
        found[stem] = entry
    return found


def discover_cohort(raw_dir: str | Path, organs_dir: str | Path | None = None,
                    images_dir: str | Path | None = None) -> Cohort:
    """Find the cases of a raw cohort.

    Args:
        raw_dir: folder with imagesTr/ and optionally labelsTr/ and organsTr/.
        organs_dir: organ pseudo-label folder; default RAW/organsTr when it exists.
        images_dir: image folder when it is not RAW/imagesTr (e.g. a plain folder for prediction).

    Returns:
        A Cohort whose cases are sorted by id. Problems that concern one case (an invalid id, an organ
        or label file without an image) are recorded on that case as `error`, not raised, so the
        other cases go on.

    Raises:
        FileNotFoundError: the image folder does not exist or holds no images.
    """
    raw = Path(raw_dir)
    images_folder = Path(images_dir) if images_dir else raw / "imagesTr"
    if not images_folder.is_dir():
        raise FileNotFoundError(f"no image folder {images_folder}: a raw cohort needs imagesTr/<case>_0000.nii.gz")
    images = _entries_by_stem(images_folder, strip_channel=True)
    if not images:
        raise FileNotFoundError(f"{images_folder} holds no images named <case>_0000.<nii.gz|nii|mha|nrrd>")
    labels = _entries_by_stem(raw / "labelsTr", strip_channel=False)
    organs_folder = Path(organs_dir) if organs_dir else raw / "organsTr"
    organs = _entries_by_stem(organs_folder, strip_channel=False)

    cases = []
    for case_id in sorted(set(images) | set(labels) | set(organs)):
        image = images.get(case_id)
        error = None
        try:
            validate_case_id(case_id)
        except ValueError as err:
            error = str(err)
        if error is None and image is None:
            where = "labelsTr" if case_id in labels else organs_folder.name
            error = f"case {case_id}: {where} has a file but imagesTr has no {case_id}{CHANNEL_SUFFIX} image"
        cases.append(CaseFiles(
            case_id=case_id,
            image=str(image) if image else None,
            label=str(labels[case_id]) if case_id in labels else None,
            organs=str(organs[case_id]) if case_id in organs else None,
            error=error,
        ))
    return Cohort(root=str(raw), cases=tuple(cases))
