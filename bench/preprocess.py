"""Benchmark of preprocessing: per case against nnU-Net v2, the crop's size, and Ray throughput.

    python bench/preprocess.py                      # everything below: ~8 min of work on 2 cores, plus load waits
    python bench/preprocess.py --runs 1 --no-sitk-bspline --shape 150 256 256 --cohort 4 --skip-nnunet
    python bench/preprocess.py --kinds --skip-nnunet --cohort 40 --ray-repeats 5 --max-load 0.3 \
        --out bench/results/preprocess_ray.json   # Ray throughput only, 1 vs 2 CPUs, quiet machine
    python bench/preprocess.py --cpu-side --out bench/results/case_cpu_preprocess.json  # ~2 min: the rows below

--cpu-side measures only the CPU side of one case, today's code against issue 18's in the same run
(bench/_case_cpu.py): the read (SimpleITK vs ISA-L), the crop decision (the paper's crop vs
crop_method body; today's full-resolution body labelling vs the coarse body box) and read -> crop ->
resample -> normalise, on a realistic phantom case and on it tiled to 300 x 512 x 512.

Writes bench/results/preprocess.json (--out) and prints markdown tables. Four measurements:

1. Per case, on a synthetic 300x512x512 int16 CT at 0.8 x 0.8 x 2.5 mm: panseg's `preprocess_case`
   against nnU-Net v2's `DefaultPreprocessor.run_case` (3d_fullres CT plan at the paper's spacing,
   built in code in bench/_preprocess_nnunet.py), the runs of the two interleaved. Each run is a
   fresh Python process pinned to the same CPU with one BLAS thread, so peak RSS and time are those
   of one case as a Ray task with num_cpus=1 would see them. Two CT kinds: 'body' (soft tissue at
   60 +- 15 HU: the largest component above 50 HU is the body, the paper's path) and 'noisy' (soft
   tissue at 40 +- 20 HU: the largest component is an organ, so the body guard falls back to the
   body box; DESIGN.md's bad case). Inputs: the CT, a tumor label and 13 organ labels (nnU-Net
   reads them fused into one file).
2. Resampling of the cropped CT alone, panseg against SimpleITK (one thread, in this process).
3. The crop's size: voxels of panseg's crop / voxels of the released training code's HU > 0 box
   (`crop.threshold_bbox(hu, 0)`), on those CTs and on a realistic phantom cohort (--cohort cases,
   `phantom.write_cohort(small=False)`).
4. Throughput of `data_pipeline.run_preprocessing` on that cohort with a local Ray of 1, then 2 CPUs
   (a fresh store each, Ray shut down between), cases/minute and parallel efficiency
   (rate2 / rate1) / 2. ray.init is not timed, nor the start of Ray Data's per-cluster actors (stats,
   autoscaling coordinator, actor location tracker: ~1 CPU-second each, once per cluster; --ray-cold
   times them too, see `_preprocess_cohort.start_cluster_actors`); the rate counts from the first case's start to the
   last case's finish (store file times and the manifest's per-case seconds), and the whole
   run_preprocessing call is reported beside it.

nnunetv2 is not installed by `pip install -e '.[bench]'` here: that pulls nnunetv2 ->
dynamic-network-architectures -> timm -> torchvision 0.29 -> torch 2.14 with CUDA, replacing the CPU
torch. Install it without its dependencies, then what its preprocessing imports (none needs torch):

    pip install --no-deps nnunetv2 batchgenerators acvl-utils dynamic-network-architectures
    pip install tqdm blosc2 scikit-image nibabel

(check each with `pip install --dry-run` first), or pass --skip-nnunet.

The machine is shared: before each timed phase the bench waits until the 1-minute load average is
below --max-load (polling every 10 s, at most --max-wait seconds, then it goes on anyway), and the
JSON records the load averages at the start and end of every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _preprocess_cohort as cohort  # noqa: E402
import _preprocess_nnunet as nnunet  # noqa: E402

SPACING_ZYX_MM = (2.5, 0.8, 0.8)
BENCH_DIR = Path(__file__).resolve().parent
TARGETS = {"speedup_vs_nnunet": 5.0, "peak_rss_over_input_float32": 3.0, "parallel_efficiency": 0.85}

_CHILD = r"""
import json, os, resource, sys, time
os.sched_setaffinity(0, {int(sys.argv[3])})
from panseg.config import PreprocessConfig
from panseg.io import CaseFiles
from panseg.preprocessing.case import preprocess_case
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


_ENV_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _child(args: list[str], extra_env: dict | None = None) -> dict:
    env = {**os.environ, **_ENV_ONE_THREAD, **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    run["cpu_s"] = run["user_s"] + run["sys_s"]
    return run


def run_cases(files: dict, runs: int, extra_env: dict | None = None, cpu: int | None = None) -> list[dict]:
    """`runs` fresh processes, each running panseg's preprocess_case on one pinned CPU."""
    cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
    return [_child([_CHILD, json.dumps(files), "{}", str(cpu)], extra_env) for _ in range(runs)]


def run_nnunet(image: str, seg: str, cpu: int) -> dict:
    """One fresh process running nnU-Net v2's DefaultPreprocessor.run_case on the same pinned CPU."""
    return _child([nnunet.CHILD, image, seg, str(cpu), str(BENCH_DIR)])


def median_of(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_mb", "base_rss_mb", "page_faults")
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


# ----------------------------------------------------------------------------------------------
# The shared machine: wait for quiet, record the load
# ----------------------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 10.0) -> dict:
    """Wait until the 1-minute load average is below max_load, at most max_wait_s seconds."""
    start, first = time.monotonic(), os.getloadavg()[0]
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < max_wait_s:
        print(f"  waiting for load < {max_load} (now {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    load = os.getloadavg()[0]
    return {"load_before_wait": round(first, 2), "waited_s": round(time.monotonic() - start, 1),
            "quiet": load < max_load}


@contextmanager
def phase(record: dict, name: str, args: argparse.Namespace, timed: bool = True):
    """Record a phase's load averages (1, 5, 15 min) at start and end, waiting for quiet first if timed."""
    entry = wait_for_quiet(args.max_load, args.max_wait) if timed else {}
    entry["load_start"] = [round(v, 2) for v in os.getloadavg()]
    entry["started"] = time.strftime("%H:%M:%S")
    start = time.perf_counter()
    print(f"[{entry['started']}] {name}: load {entry['load_start'][0]:.2f}", file=sys.stderr, flush=True)
    try:
        yield entry
    finally:
        entry["load_end"] = [round(v, 2) for v in os.getloadavg()]
        entry["seconds"] = round(time.perf_counter() - start, 1)
        record[name] = entry


@contextmanager
def pinned(cpu: int):
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ----------------------------------------------------------------------------------------------
# The measurements
# ----------------------------------------------------------------------------------------------


def per_case(kind: str, folder: Path, args: argparse.Namespace, loads: dict) -> dict:
    """Measurements 1-3 on one synthetic CT kind."""
    files = make_case(folder, kind, tuple(args.shape))
    seg = nnunet.write_fused_seg(files, folder / f"{kind}_fused.nii.gz")
    cpu = min(os.sched_getaffinity(0))
    ours, theirs = [], []
    with phase(loads, f"per_case_{kind}", args):
        for _ in range(args.runs):  # interleaved, so both see the same machine
            ours.append(run_cases(files, 1, cpu=cpu)[0])
            if not args.skip_nnunet:
                theirs.append(run_nnunet(files["image"], seg, cpu))
    first = ours[0]
    input_f32_mb = float(np.prod(args.shape)) * 4 / 2**20
    result = {"shape_zyx": list(args.shape), "spacing_zyx_mm": list(SPACING_ZYX_MM), "cpu": cpu,
              "input_float32_mb": round(input_f32_mb, 1), "resampled_shape_zyx": first["shape"],
              "crop_reason": first["crop_reason"], "crop_box_zyx": first["crop_box"],
              "panseg": {"runs": ours, "median": median_of(ours)}}
    med = result["panseg"]["median"]
    result["panseg_peak_rss_over_input_f32"] = round(med["peak_rss_mb"] / input_f32_mb, 2)
    result["panseg_case_rss_over_input_f32"] = round((med["peak_rss_mb"] - med["base_rss_mb"]) / input_f32_mb, 2)
    if theirs:
        them = median_of(theirs)
        result["nnunet"] = {"runs": theirs, "median": them, "resampled_shape_zyx": theirs[0]["shape"],
                            "nonzero_crop_bbox": theirs[0]["nonzero_crop_bbox"],
                            "version": theirs[0]["nnunetv2_version"]}
        result["speedup_wall"] = round(them["wall_s"] / med["wall_s"], 2)
        result["speedup_cpu"] = round(them["cpu_s"] / med["cpu_s"], 2)
        result["nnunet_peak_rss_over_input_f32"] = round(them["peak_rss_mb"] / input_f32_mb, 2)
    result["crop_vs_hu0_box"] = cohort.crop_ratio(files["image"], first["crop_box"])
    with phase(loads, f"resample_{kind}", args), pinned(cpu):
        result["resample_s"] = dict(resampler_table(files, first["crop_box"], not args.no_sitk_bspline))
    return result


def cohort_measurements(folder: Path, args: argparse.Namespace, loads: dict) -> dict:
    """Measurement 4, and measurement 3 on the cohort (the crop boxes come from the 1-CPU run's manifest)."""
    raw = folder / "raw"
    with phase(loads, "cohort_generation", args, timed=False):
        out = {"cohort": cohort.write_phantom_cohort(raw, args.cohort - args.cohort // 5, args.cohort // 5,
                                                     workers=2)}
    repeats: dict[int, list[dict]] = {n: [] for n in args.ray_cpus}
    for rep in range(args.ray_repeats):  # 1, 2, 1, 2, ...: both CPU counts see the same machine
        for num_cpus in args.ray_cpus:
            name = f"ray_{num_cpus}cpu" + (f"_{rep + 1}" if args.ray_repeats > 1 else "")
            store = folder / f"store_{num_cpus}cpu.zarr"
            shutil.rmtree(store, ignore_errors=True)
            with phase(loads, name, args):
                run = cohort.ray_throughput(raw, store, num_cpus, warm=not args.ray_cold)
            repeats[num_cpus].append({**run, "phase": name})
    # the run of median rate stands for each CPU count; every repeat's rates are kept beside it
    runs = {}
    for n, done in repeats.items():
        runs[n] = sorted(done, key=lambda r: r["cases_per_min_span"])[(len(done) - 1) // 2]
        runs[n]["repeat_rates_span"] = [r["cases_per_min_span"] for r in done]
        runs[n]["repeat_rates_call"] = [r["cases_per_min_call"] for r in done]
    first = runs[args.ray_cpus[0]]
    with phase(loads, "cohort_crop_ratio", args, timed=False):
        ratios = {case_id: cohort.crop_ratio(first["image_paths"][case_id], box)
                  for case_id, box in first["crop_boxes"].items()}
    out["crop_vs_hu0_box"] = cohort.summarise_ratios(ratios)
    out["crop_reasons"] = first["crop_reasons"]
    for run in runs.values():
        for key in ("crop_boxes", "crop_reasons", "image_paths"):
            del run[key]
    out["ray"] = {str(n): run for n, run in runs.items()}
    if 1 in runs and 2 in runs:
        for how in ("span", "call"):
            rate1, rate2 = runs[1][f"cases_per_min_{how}"], runs[2][f"cases_per_min_{how}"]
            out[f"parallel_efficiency_{how}"] = round(rate2 / rate1 / 2, 3)
        # What the efficiency would be had every case taken as long in both runs: the share of CPU time
        # spent in cases, 2 CPUs against 1 (the rest is scheduling gaps and worker start-up).
        out["parallel_efficiency_equal_case_time"] = round(runs[2]["busy_fraction"] / runs[1]["busy_fraction"], 3)
    return out


def resampler_table(files: dict, crop_box: list[int], sitk_bspline: bool) -> list[tuple[str, float]]:
    """Seconds to resample the cropped CT to the paper's spacing, ours vs SimpleITK (1 thread each)."""
    from panseg.io import read_volume
    from panseg.preprocessing.case import crop_volume
    from panseg.preprocessing.crop import Box
    from panseg.preprocessing.resample import _resample_sitk, resample_volume, resampled_geometry

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


def targets(results: dict) -> dict:
    """The issue's targets, each with the figure it is judged on and whether it is met."""
    met = {}
    for kind, r in results["per_case"].items():
        if "speedup_wall" in r:
            met[f"speedup_vs_nnunet_{kind}"] = {"target": f">= {TARGETS['speedup_vs_nnunet']}x (wall, median)",
                                                "value": r["speedup_wall"], "cpu_time_value": r["speedup_cpu"],
                                                "met": r["speedup_wall"] >= TARGETS["speedup_vs_nnunet"]}
        limit = TARGETS["peak_rss_over_input_float32"]
        met[f"peak_rss_{kind}"] = {"target": f"< {limit}x input float32 (process peak RSS)",
                                   "value": r["panseg_peak_rss_over_input_f32"],
                                   "without_python_and_libraries": r["panseg_case_rss_over_input_f32"],
                                   "met": r["panseg_peak_rss_over_input_f32"] < limit}
    if "parallel_efficiency_span" in results.get("cohort", {}):
        eff = results["cohort"]["parallel_efficiency_span"]
        met["parallel_efficiency_1_to_2_cpus"] = {
            "target": f">= {TARGETS['parallel_efficiency']} (span rate)", "value": eff,
            "call_value": results["cohort"]["parallel_efficiency_call"],
            "equal_case_time_value": results["cohort"]["parallel_efficiency_equal_case_time"],
            "met": eff >= TARGETS["parallel_efficiency"]}
    return met


def markdown(results: dict) -> str:
    """The figures as markdown tables."""
    lines = [f"{results['date']}, {results['machine']}, nnunetv2 {results['versions'].get('nnunetv2')}", ""]
    lines += ["| case | tool | wall s (median) | CPU s | peak RSS MB | of which Python+libs | peak / input f32 "
              "| load start-end |", "|---|---|---|---|---|---|---|---|"]
    for kind, r in results["per_case"].items():
        load = results["loads"][f"per_case_{kind}"]
        span = f"{load['load_start'][0]:.2f}-{load['load_end'][0]:.2f}"
        for tool in ("panseg", "nnunet"):
            if tool in r:
                m = r[tool]["median"]
                lines.append(f"| {kind} {'x'.join(map(str, r['shape_zyx']))} | {tool} | {m['wall_s']:.2f} | "
                             f"{m['cpu_s']:.2f} | {m['peak_rss_mb']:.0f} | {m['base_rss_mb']:.0f} | "
                             f"{m['peak_rss_mb'] / r['input_float32_mb']:.2f} | {span} |")
        if "speedup_wall" in r:
            lines.append(f"| {kind} | speed-up | {r['speedup_wall']:.1f}x | {r['speedup_cpu']:.1f}x | | | | |")
    if results["per_case"]:
        lines += ["", "| resampling the crop (1 thread) | " + " | ".join(results["per_case"]) + " |",
                  "|---|" + "---|" * len(results["per_case"])]
    names = next(iter(results["per_case"].values()))["resample_s"] if results["per_case"] else []
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['resample_s'][name]:.2f} s"
                                                   for r in results["per_case"].values()) + " |")
    lines += ["", "| crop / HU > 0 box (voxels) | n | mean | min | max |", "|---|---|---|---|---|"]
    for kind, r in results["per_case"].items():
        ratio = r["crop_vs_hu0_box"]["ratio"]
        lines.append(f"| synthetic {kind} ({r['crop_reason']}) | 1 | {ratio:.3f} | {ratio:.3f} | {ratio:.3f} |")
    if "cohort" in results:
        c = results["cohort"]["crop_vs_hu0_box"]
        lines.append(f"| phantom cohort (realistic) | {c['n']} | {c['mean']:.3f} | {c['min']:.3f} | {c['max']:.3f} |")
        lines += ["", "| Ray CPUs | cases | cases/min (span) | cases/min (whole call) | mean s/case | CPUs busy "
                  "| load start-end |", "|---|---|---|---|---|---|---|"]
        for n, run in results["cohort"]["ray"].items():  # the median-rate run of each CPU count
            load = results["loads"][run.get("phase", f"ray_{n}cpu")]
            lines.append(f"| {n} | {run['cases_ok']} | {run['cases_per_min_span']:.1f} | "
                         f"{run['cases_per_min_call']:.1f} | {run['case_s_mean']:.2f} | {run['busy_fraction']:.1%} | "
                         f"{load['load_start'][0]:.2f}-{load['load_end'][0]:.2f} |")
        if "parallel_efficiency_span" in results["cohort"]:
            c = results["cohort"]
            lines.append(f"| efficiency 1 -> 2 | | {c['parallel_efficiency_span']:.1%} | "
                         f"{c['parallel_efficiency_call']:.1%} | | {c['parallel_efficiency_equal_case_time']:.1%} | |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {name}: {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |"
              for name, t in results["targets"].items()]
    return "\n".join(lines)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("panseg", "torch", "numpy", "SimpleITK", "ray", "nnunetv2", "scikit-image", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_side(args: argparse.Namespace, argv: list[str] | None) -> None:
    """The --cpu-side rows, written to --out and printed as a table."""
    import _case_cpu

    _case_cpu.one_thread()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core {platform.machine()} VM",
               "command": " ".join(["python", "bench/preprocess.py", *(sys.argv[1:] if argv is None else argv)]),
               "load_before": os.getloadavg(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _case_cpu.write_inputs(Path(tmp)).items():
            results["cases"][name] = _case_cpu.preprocess_rows(path, args.repeats)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(_case_cpu.markdown(results["cases"]))
    print(f"load average before {results['load_before']}, after {results['load_after']}; written to {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs per tool and kind (median)")
    parser.add_argument("--kinds", nargs="*", default=["body", "noisy"], choices=["body", "noisy"],
                        help="CT kinds for the per-case measurements (none: skip them)")
    parser.add_argument("--no-sitk-bspline", action="store_true", help="skip SimpleITK's slow B-spline")
    parser.add_argument("--skip-nnunet", action="store_true", help="panseg only (nnunetv2 not installed)")
    parser.add_argument("--cohort", type=int, default=20, help="phantom cohort size (0: no cohort measurements)")
    parser.add_argument("--ray-cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-repeats", type=int, default=1,
                        help="runs per Ray CPU count, alternating; the median-rate run is reported")
    parser.add_argument("--ray-cold", action="store_true",
                        help="time each run from a fresh Ray, with Ray Data's per-cluster actors starting beside "
                             "the first cases (default: they start before the clock, as on a cluster that has "
                             "run a dataset)")
    parser.add_argument("--max-load", type=float, default=1.2, help="wait for a 1-min load average below this")
    parser.add_argument("--max-wait", type=float, default=600.0, help="longest wait for it per phase, seconds")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "preprocess.json")
    parser.add_argument("--cpu-side", action="store_true", help="only the CPU side of one case (bench/_case_cpu.py)")
    parser.add_argument("--repeats", type=int, default=5, help="--cpu-side: runs per row (minimum reported)")
    args = parser.parse_args(argv)
    if args.cpu_side:
        cpu_side(args, argv)
        return
    if not args.skip_nnunet and (why := nnunet.available()):
        parser.error(f"{why}; or pass --skip-nnunet")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core {platform.machine()} VM, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB",
               "command": " ".join(["python", "bench/preprocess.py", *(sys.argv[1:] if argv is None else argv)]),
               "versions": _versions(), "targets_set": TARGETS, "loads": {}, "per_case": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            results["per_case"][kind] = per_case(kind, Path(tmp), args, results["loads"])
        if args.cohort:
            results["cohort"] = cohort_measurements(Path(tmp) / "cohort", args, results["loads"])
    results["targets"] = targets(results)
    results["total_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"\n{results['total_s']:.0f} s in all; written to {args.out}")


if __name__ == "__main__":
    main()
