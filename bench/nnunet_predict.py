"""Benchmark: an nnU-Net v2 model predicted by panseg against nnU-Net's own predictor, same model and cases, CPU.

    flock /tmp/panseg-cpu.lock python bench/nnunet_predict.py              # ~8 min on 2 busy cores
    python bench/nnunet_predict.py --cases 1 --shape 40 96 96 --folds 0,1  # a quick look, two folds

The model is an nnU-Net v2 model folder written as nnU-Net's training leaves it
(tests/inference/nnunet_folder.py): plans in nnU-Net 2.8.1's format for a 4-stage PlainConvUNet
(16-32-64-128 features, patch 48x96x96, CT normalisation, spacing 2.5 x 1.6 x 1.6 mm), folds of
seeded random weights of the network nnU-Net builds from those plans. The cases are phantom CTs of
--shape voxels at 2.5 x 0.8 x 0.8 mm (so preprocessing halves y and x with order-3 resampling and
export upsamples the logits back with order 1), as `<case>_0000.nii.gz`.

Each run is a fresh Python process with `torch.set_num_threads(--threads)` that loads the model (timed
apart), then predicts one case from file to file. Three tools, runs alternating:
- nnunet: `nnUNetPredictor.predict_from_files_sequential` (nnU-Net's own path without worker
  processes: read, preprocess, windows, export, write);
- panseg: `NnunetPredictor` as `panseg predict`'s actors run it (read, preprocess, windows, export, write);
- panseg-compiled: the same with `infer.compile=true`; each fold's network is compiled while loading
  (once per actor in folder prediction), so compiling counts in "model load s", not in the case.
All use nnU-Net's defaults: tile step 0.5, mirroring over the checkpoint's axes, the folds given.
Reported per tool: the median seconds per case, the process's peak RSS (VmHWM, model included), and
the masks' voxel agreement and per-label Dice against nnU-Net's.

Needs nnunetv2 installed as README.md says (pinned 2.8.1, --no-deps plus light packages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.inference.nnunet_folder import LABELS, TinyPlan, phantom_ct, write_model_folder  # noqa: E402

PLAN = TinyPlan("3d_fullres", (2.5, 1.6, 1.6), (48, 96, 96), ((3, 3, 3),) * 4,
                ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), features=(16, 32, 64, 128))
SPACING_ZYX_MM = (2.5, 0.8, 0.8)
TOOLS = ("nnunet", "panseg", "panseg-compiled")  # nnU-Net first: the others are compared against it

_CHILD = r"""
import json, resource, sys, time, torch
tool, folder, image, out_dir, folds, threads, mode = sys.argv[1:8]


def phases(tool, predictor, image, threads):
    # seconds of preprocessing and of export (logits back to the CT grid, argmax) of one case
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    if tool.startswith("panseg"):
        from panseg.inference.nnunet_preprocess import export_labels
        from panseg.io import read_volume
        prepared = predictor.prepare(read_volume(image))
        shape, t1 = prepared.data.shape[1:], time.perf_counter()
        logits = torch.randn((predictor.model.plan.num_classes, *shape), generator=g).half()
        t2 = time.perf_counter()
        export_labels(logits, prepared, predictor.model.plan, threads)
    else:
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        pre = predictor.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case([image], None, predictor.plans_manager, predictor.configuration_manager,
                                      predictor.dataset_json)
        shape, t1 = data.shape[1:], time.perf_counter()
        logits = torch.randn((predictor.label_manager.num_segmentation_heads, *shape), generator=g).half()
        t2 = time.perf_counter()
        convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props,
            False, threads)
    return {"preprocess": round(t1 - t0, 3), "export": round(time.perf_counter() - t2, 3)}


folds = [int(f) for f in folds.split(",")]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
if tool.startswith("panseg"):
    from dataclasses import replace
    from panseg.inference.nnunet_model import load_nnunet_model
    from panseg.inference.nnunet_predict import NNUNET_INFER, NnunetPredictor
    from panseg.io import read_volume, write_volume
    infer = replace(NNUNET_INFER, all_labels=True, compile=tool == "panseg-compiled")
    predictor = NnunetPredictor(load_nnunet_model(folder, folds), infer)
    if infer.compile:  # compile now (once per actor in folder prediction), not inside the first case
        patch = predictor.model.plan.patch_size
        with torch.inference_mode():
            for network in predictor.networks:
                network(torch.zeros(infer.windows_per_batch, 1, *patch))
else:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, folds, "checkpoint_final.pth")
t1 = time.perf_counter()
name = image.split("/")[-1].replace("_0000", "")
r0 = resource.getrusage(resource.RUSAGE_SELF)
if mode == "phases":  # preprocessing and export only, around the same seeded float16 logits
    seconds = phases(tool, predictor, image, int(threads))
elif tool.startswith("panseg"):
    prediction = predictor.predict_volume(read_volume(image))
    write_volume(prediction.volume, out_dir + "/" + name)
    seconds = {k: round(v, 3) for k, v in prediction.seconds.items()}
else:
    predictor.predict_from_files_sequential([[image]], [out_dir + "/" + name[:-7]], False, True)
    seconds = {}
t2 = time.perf_counter()
r1 = resource.getrusage(resource.RUSAGE_SELF)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"load_s": t1 - t0, "case_s": t2 - t1, "phases": seconds,
                  "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                  "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def run_child(tool: str, folder: Path, image: Path, out_dir: Path, folds: str, threads: int,
              mode: str = "case") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "nnUNet_def_n_proc": str(threads)}
    out = subprocess.run([sys.executable, "-c", _CHILD, tool, str(folder), str(image), str(out_dir), folds,
                          str(threads), mode], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tool} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    dice = {}
    for name, k in LABELS.items():
        a, b = ours == k, theirs == k
        if k and (a.any() or b.any()):
            dice[name] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 5)
    return {"voxel_agreement": round(float((ours == theirs).mean()), 6), "dice": dice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[60, 128, 128], help="CT shape (z, y, x)")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="runs per tool and case")
    parser.add_argument("--folds", default="0", help="comma-separated, e.g. 0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases-shape", type=int, nargs=3, default=[300, 512, 512],
                        help="CT shape of the preprocessing/export comparison (0 0 0: skip it)")
    parser.add_argument("--phases-runs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "nnunet_predict.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nnunet_bench_"))
    folder = write_model_folder(work / "model", PLAN)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpus": os.cpu_count(),
               "threads": args.threads, "shape_zyx": args.shape, "spacing_zyx_mm": SPACING_ZYX_MM,
               "plan": {"patch": PLAN.patch_size, "features": PLAN.features, "spacing": PLAN.spacing},
               "folds": args.folds, "load_avg_start": os.getloadavg()}
    results["cases"] = [bench_case(work, folder, k, args) for k in range(args.cases)]
    results["summary"] = summarize(results["cases"])
    print(table(results))
    if all(args.phases_shape):
        results["phases"] = bench_phases(work, folder, args)
        print(json.dumps(results["phases"]["summary"], indent=1))
    results["load_avg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2))


def bench_case(work: Path, folder: Path, k: int, args: argparse.Namespace) -> dict:
    """Every tool on case k, whole cases, runs alternating; masks compared with nnU-Net's."""
    from panseg.io import read_volume, write_volume

    image = work / "in" / f"case_{k}_0000.nii.gz"
    image.parent.mkdir(exist_ok=True)
    write_volume(phantom_ct(tuple(args.shape), SPACING_ZYX_MM, seed=k), image)
    runs = {tool: [] for tool in TOOLS}
    for r in range(args.runs):
        for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
            out_dir = work / f"{tool}_{k}_{r}"
            out_dir.mkdir()
            runs[tool].append(run_child(tool, folder, image, out_dir, args.folds, args.threads))
            print(tool, k, r, runs[tool][-1], flush=True)
    name = f"case_{k}.nii.gz"
    theirs = read_volume(work / f"nnunet_{k}_0" / name).array
    match = {tool: agreement(read_volume(work / f"{tool}_{k}_0" / name).array, theirs) for tool in TOOLS[1:]}
    return {"case": k, "runs": runs, "agreement": match}


def bench_phases(work: Path, folder: Path, args: argparse.Namespace) -> dict:
    """Preprocessing and export alone on a full-size CT (no network), nnU-Net against panseg, runs alternating."""
    from panseg.io import write_volume

    image = work / "big" / "big_0000.nii.gz"
    image.parent.mkdir()
    write_volume(phantom_ct(tuple(args.phases_shape), SPACING_ZYX_MM, seed=9), image)
    runs = {"nnunet": [], "panseg": []}
    for r in range(args.phases_runs):
        for tool in ("nnunet", "panseg") if r % 2 == 0 else ("panseg", "nnunet"):
            runs[tool].append(run_child(tool, folder, image, work / "big", args.folds, args.threads, "phases"))
            print("phases", tool, r, runs[tool][-1], flush=True)
    summary = {tool: {key: round(statistics.median(run["phases"][key] for run in runs[tool]), 2)
                      for key in ("preprocess", "export")} for tool in runs}
    for tool in runs:
        summary[tool]["peak_rss_mb"] = round(max(run["peak_rss_mb"] for run in runs[tool]), 1)
    return {"shape_zyx": args.phases_shape, "runs": runs, "summary": summary}


def summarize(cases: list[dict]) -> dict:
    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for c in cases for r in c["runs"][tool])

    s = {tool: {"case_s": round(med(tool, "case_s"), 2), "load_s": round(med(tool, "load_s"), 2),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for c in cases for r in c["runs"][tool]), 1)}
         for tool in TOOLS}
    for tool in TOOLS[1:]:
        s[tool]["time_ratio"] = round(s[tool]["case_s"] / s["nnunet"]["case_s"], 3)
        s[tool]["memory_ratio"] = round(s[tool]["peak_rss_mb"] / s["nnunet"]["peak_rss_mb"], 3)
        s[tool]["min_voxel_agreement"] = min(c["agreement"][tool]["voxel_agreement"] for c in cases)
        s[tool]["min_dice"] = min(d for c in cases for d in c["agreement"][tool]["dice"].values())
    return s


def table(results: dict) -> str:
    s = results["summary"]
    rows = ["| tool | s per case (median) | model load s | peak RSS MB | time / nnU-Net | memory / nnU-Net | "
            "voxel agreement (min) | Dice (min) |", "|---|---|---|---|---|---|---|---|"]
    for tool in TOOLS:
        t = s[tool]
        rows.append(f"| {tool} | {t['case_s']} | {t['load_s']} | {t['peak_rss_mb']} | {t.get('time_ratio', 1)} | "
                    f"{t.get('memory_ratio', 1)} | {t.get('min_voxel_agreement', '-')} | {t.get('min_dice', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
