"""The CPU side of one case, today's code against this issue's, measured in the same process and run.

Used by `bench/preprocess.py --cpu-side` (read, crop decision, read -> crop -> resample -> normalise) and
`bench/infer.py --cpu-side` (the same prepare, and paste back -> write). One thread (OMP/BLAS 1), each
row the minimum over `repeats` runs, today's and the new code alternating so both see the same load.
Wall seconds (perf_counter) and CPU seconds (process_time) are both recorded.

Inputs (written once into a temporary folder):
    phantom   one realistic phantom case (`phantom.cohort.make_case('case_000', 0, small=False,
              weak=False)`: 168 x 512 x 512 int16 at 4 x 0.86 x 0.86 mm), as .nii.gz
    ct300     the same phantom tiled along z to 300 x 512 x 512 at 2.5 x 0.86 x 0.86 mm (the issue's
              300-slice CT), as .nii.gz (both written by ITK's zlib)

Today's code: `io.from_sitk(io.read_sitk(path))` (SimpleITK reads .nii.gz); the crop of the paper preset
(`largest_component`, with the body guard); the body as today's full-resolution cc3d labelling
(`crop._largest_component`); ITK writes the mask (.nii.gz, zlib). New: `io.read_volume` (ISA-L igzip),
`crop_method: body` (coarse box), `io.write_volume` (ISA-L gzip of ITK's NIfTI).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def write_inputs(folder: Path) -> dict[str, Path]:
    """The phantom case and its 300-slice tiling as .nii.gz files (see the module docstring), compressed by
    ITK's zlib as scanners' converters and public datasets write them (not by panseg's faster writer)."""
    import SimpleITK as sitk

    from panseg.io import Volume, to_sitk
    from panseg.phantom.cohort import make_case

    ct = make_case("case_000", 0, healthy=False, small=False, weak=False).ct
    tiled = np.concatenate([ct.array, ct.array[: 300 - ct.array.shape[0]]])
    volumes = {"phantom": ct, "ct300": Volume(tiled, (2.5, *ct.spacing_zyx_mm[1:]), ct.origin_xyz_mm, ct.direction_xyz)}
    paths = {}
    for name, volume in volumes.items():
        paths[name] = folder / f"{name}_0000.nii.gz"
        sitk.WriteImage(to_sitk(volume), str(paths[name]), True)
    return paths


def _best(fn, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": round(min(walls), 4), "cpu_s": round(min(cpus), 4)}


def _pairs(rows: dict, name: str, today, new, repeats: int) -> None:
    """Today's and the new function measured alternately; rows[name] gets both and the speed-up."""
    t, n = [], []
    for _ in range(repeats):
        t.append(_best(today, 1))
        n.append(_best(new, 1))
    today_best = {k: min(r[k] for r in t) for k in ("wall_s", "cpu_s")}
    new_best = {k: min(r[k] for r in n) for k in ("wall_s", "cpu_s")}
    rows[name] = {"today": today_best, "new": new_best,
                  "speedup_wall": round(today_best["wall_s"] / new_best["wall_s"], 2),
                  "speedup_cpu": round(today_best["cpu_s"] / new_best["cpu_s"], 2)}


def preprocess_rows(path: Path, repeats: int) -> dict:
    """read; crop decision; read -> crop -> resample -> normalise (today's against new) for one CT."""
    from panseg.config import preset
    from panseg.inference.predictor import prepare_volume
    from panseg.io import from_sitk, read_sitk, read_volume
    from panseg.preprocessing.crop import _largest_component, above_threshold, choose_crop

    paper = preset("paper").preprocess
    body = replace(paper, crop_method="body", body_lost_warn_fraction=1.0)
    paper = replace(paper, body_lost_warn_fraction=1.0)
    hu = read_volume(path).array
    rows: dict = {"shape_zyx": list(hu.shape)}
    _pairs(rows, "read", lambda: from_sitk(read_sitk(path)), lambda: read_volume(path), repeats)
    _pairs(rows, "crop_decision_paper_vs_body", lambda: choose_crop(hu, None, paper),
           lambda: choose_crop(hu, None, body), repeats)
    _pairs(rows, "body_box_full_vs_coarse",
           lambda: _largest_component(above_threshold(hu, paper.body_threshold_hu), 6).box,
           lambda: choose_crop(hu, None, body).box, repeats)
    _pairs(rows, "read_crop_resample_normalise",
           lambda: prepare_volume(from_sitk(read_sitk(path)), paper),
           lambda: prepare_volume(read_volume(path), body), repeats)
    rows["boxes"] = {name: choose_crop(hu, None, cfg).box.to_list() for name, cfg in (("paper", paper), ("body", body))}
    return rows


def infer_rows(path: Path, out_dir: Path, repeats: int) -> dict:
    """The prepare of predict (read -> crop -> resample -> clip) and paste back -> write, today's against new.

    The network's label map is stood in for by the resampled image > 100 HU (a mask of the size a
    prediction has); paste back is the same code either way, timed after each crop; today's write is
    ITK's .nii.gz writer (zlib), the new one `io.write_volume` (ITK's NIfTI gzipped by ISA-L). The row
    `write_mask` writes the same pasted-back mask both ways.
    """
    from panseg.config import preset
    from panseg.inference.predictor import prepare_volume, restore_labels
    import SimpleITK as sitk

    from panseg.io import from_sitk, read_sitk, read_volume, to_sitk, write_volume

    paper = replace(preset("paper").preprocess, body_lost_warn_fraction=1.0)
    body = replace(paper, crop_method="body")
    rows: dict = {}
    _pairs(rows, "prepare", lambda: prepare_volume(from_sitk(read_sitk(path)), paper),
           lambda: prepare_volume(read_volume(path), body), repeats)
    prepared = {"today": prepare_volume(read_volume(path), paper), "new": prepare_volume(read_volume(path), body)}
    labels = {k: (p.image_hu > 100).astype(np.uint8) for k, p in prepared.items()}

    def itk_write(volume, path: Path) -> None:  # today's write_volume: ITK's own zlib
        sitk.WriteImage(to_sitk(volume), str(path), True)

    def paste_write(which: str, write):
        return lambda: write(restore_labels(labels[which], prepared[which]), out_dir / f"{which}.nii.gz")

    mask = restore_labels(labels["new"], prepared["new"])
    _pairs(rows, "write_mask", lambda: itk_write(mask, out_dir / "itk.nii.gz"),
           lambda: write_volume(mask, out_dir / "isal.nii.gz"), repeats)
    rows["mask_file_bytes"] = {"today": (out_dir / "itk.nii.gz").stat().st_size,
                               "new": (out_dir / "isal.nii.gz").stat().st_size}
    _pairs(rows, "paste_back_write", paste_write("today", itk_write), paste_write("new", write_volume), repeats)
    rows["resampled_shape_zyx"] = {k: list(p.resampled.shape_zyx) for k, p in prepared.items()}
    rows["cpu_side_total_s"] = {k: round(rows["prepare"][k]["wall_s"] + rows["paste_back_write"][k]["wall_s"], 4)
                                for k in ("today", "new")}
    return rows


def one_thread() -> None:
    """One thread for BLAS, OpenMP and torch, as in a 1-CPU prepare task.

    BLAS reads its thread count when numpy loads, so unless the variables were set before this
    process started, the process replaces itself with a copy started with them (os.execve).
    """
    wanted = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    import torch

    torch.set_num_threads(1)


def markdown(results: dict) -> str:
    """One table: row, input, today's and the new seconds (wall / CPU), speed-up."""
    lines = ["| row | CT | today: wall / CPU s | new: wall / CPU s | speed-up (wall) |", "|---|---|---|---|---|"]
    for ct, rows in results.items():
        for name, row in rows.items():
            if isinstance(row, dict) and "today" in row and isinstance(row["today"], dict):
                lines.append(f"| {name} | {ct} | {row['today']['wall_s']:.3f} / {row['today']['cpu_s']:.3f} | "
                             f"{row['new']['wall_s']:.3f} / {row['new']['cpu_s']:.3f} | {row['speedup_wall']:.2f}x |")
    return "\n".join(lines)
