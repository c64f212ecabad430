"""Benchmark of per-case preprocessing on a synthetic 300x512x512 CT, one core.

    python bench/preprocess.py                      # both CT kinds, 3 fresh-process runs each, resampler table
    python bench/preprocess.py --runs 1 --no-sitk-bspline --shape 150 256 256

Each run of `preprocess_case` is a fresh Python process pinned to one CPU with one BLAS thread, so
peak RSS and time are those of one case as a Ray task with num_cpus=1 would see them. Two CT kinds:
'body' (soft tissue at 60 +- 15 HU: the largest component above 50 HU is the body, the paper's
path) and 'noisy' (soft tissue at 40 +- 20 HU: the largest component is an organ, so the body
guard falls back to the body box; DESIGN.md's bad case). Input: 0.8 x 0.8 x 2.5 mm int16 NIfTI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING_ZYX_MM = (2.5, 0.8, 0.8)

_CHILD = r"""
import json, os, resource, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from panseg.config import PreprocessConfig
from panseg.io import CaseFiles
from panseg.preprocess import preprocess_case
case = CaseFiles(**json.loads(sys.argv[1]))
cfg = PreprocessConfig(**json.loads(sys.argv[2]))
BASE_RSS_MB = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0]) / 1024
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
out = preprocess_case(case, cfg, threads=1)
r1 = resource.getrusage(resource.RUSAGE_SELF)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"wall_s": time.perf_counter() - t0, "user_s": r1.ru_utime - r0.ru_utime,
                  "sys_s": r1.ru_stime - r0.ru_stime,
                  "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,  # ru_maxrss survives exec, VmHWM not
                  "base_rss_mb": BASE_RSS_MB, "page_faults": r1.ru_minflt - r0.ru_minflt,
                  "shape": list(out.image.shape),
                  "crop_reason": out.attrs["crop_reason"], "crop_box": out.attrs["crop_box_zyx"]}))
"""


def make_case(folder: Path, kind: str, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """Write a synthetic CT, a tumor label and 13 organ labels; return the CaseFiles fields."""
    from panseg.io import Volume, write_volume

    tissue_hu, noise_hu = {"body": (60.0, 15.0), "noisy": (40.0, 20.0)}[kind]
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.ogrid[:z, :y, :x]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    y2, x2 = np.ogrid[:y, :x]
    hu[:, ((y2 - 0.45 * y) / (0.33 * y)) ** 2 + ((x2 - 0.5 * x) / (0.36 * x)) ** 2 <= 1] = tissue_hu
    hu[:, ((y2 - 0.65 * y) / (0.05 * y)) ** 2 + ((x2 - 0.5 * x) / (0.05 * x)) ** 2 <= 1] = 500.0  # spine
    hu[:, int(0.85 * y):int(0.88 * y), int(0.1 * x):int(0.9 * x)] = 100.0  # table
    organs = np.zeros(shape, dtype=np.uint8)
    def ellipsoid(center, radii):
        return sum(((a - c) / r) ** 2 for a, c, r in zip((zz, yy, xx), center, radii)) <= 1

    for i in range(1, 14):  # 13 organs of growing size, bright (contrast-enhanced)
        radius = (12 + i) * x / 512
        blob = ellipsoid((z * (0.2 + 0.04 * i), y * (0.3 + 0.02 * i), x * (0.3 + 0.03 * i)),
                         (0.4 * radius * 512 / x, radius, radius))
        organs[blob] = i
        hu[blob] = 120.0
    tumor = ellipsoid((z / 2, 0.4 * y, 0.5 * x), (0.02 * z, 0.03 * y, 0.03 * x))
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    volume = Volume(hu.astype(np.int16), SPACING_ZYX_MM, (-200.0, -180.0, -700.0))
    files = {"case_id": kind, "image": folder / f"{kind}_0000.nii.gz", "label": folder / f"{kind}.nii.gz",
             "organs": folder / f"{kind}_organs.nii.gz"}
    write_volume(volume, files["image"])
    write_volume(volume.with_array(tumor.astype(np.uint8)), files["label"])
    write_volume(volume.with_array(organs), files["organs"])
    return {k: str(v) for k, v in files.items()}


def run_cases(files: dict, runs: int, extra_env: dict | None = None) -> list[dict]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(files), "{}"], env=env, check=True,
                             capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def resampler_table(files: dict, crop_box: list[int], sitk_bspline: bool) -> list[tuple[str, float]]:
    """Seconds to resample the cropped CT to the paper's spacing, ours vs SimpleITK (1 thread each)."""
    from panseg.crop import Box
    from panseg.io import read_volume
    from panseg.preprocess import crop_volume
    from panseg.resample import _resample_sitk, resample_volume, resampled_geometry

    spacing = (1.6, 1.2859, 1.2859)
    cropped = crop_volume(read_volume(files["image"]), Box.from_list(crop_box))
    grid = resampled_geometry(cropped.geometry, spacing)
    cases = [("panseg bspline (cubic)", lambda: resample_volume(cropped, spacing, "bspline")),
             ("panseg linear", lambda: resample_volume(cropped, spacing, "linear")),
             ("panseg nearest (labels)", lambda: resample_volume(cropped, spacing, "nearest")),
             ("SimpleITK linear", lambda: _resample_sitk(cropped, grid, "linear", 1, 0.0))]
    if sitk_bspline:
        cases.append(("SimpleITK bspline", lambda: _resample_sitk(cropped, grid, "bspline", 1, 0.0)))
    rows = []
    for name, fn in cases:
        best = min(_seconds(fn) for _ in range(1 if "SimpleITK b" in name else 3))
        rows.append((name, best))
    return rows


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["body", "noisy"], choices=["body", "noisy"])
    parser.add_argument("--no-sitk-bspline", action="store_true", help="skip SimpleITK's slow B-spline")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            files = make_case(Path(tmp), kind, tuple(args.shape))
            results = run_cases(files, args.runs)
            first = results[0]
            print(f"\n{kind}: {tuple(args.shape)} -> {tuple(first['shape'])}, crop {first['crop_reason']} "
                  f"{first['crop_box']}, {args.runs} fresh processes, 1 CPU")
            for key in ("wall_s", "user_s", "sys_s", "page_faults", "peak_rss_mb"):
                values = [r[key] for r in results]
                print(f"  {key:12s} min {min(values):8.2f}  median {statistics.median(values):8.2f}")
            print(f"  base_rss_mb  {first['base_rss_mb']:.0f} (Python and libraries before the case)")
            for name, seconds in resampler_table(files, first["crop_box"], not args.no_sitk_bspline):
                print(f"  resample {name:26s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
