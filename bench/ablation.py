"""Organ interference, measured (the paper's Table 4) on the phantom cohort.

The same small model (the demo's config) is trained twice on the same phantom cohort, the same split
and the same seed: once on the fused store (organ pseudo-labels 1-13 + tumor 14, the paper's method)
and once on a store built without organ labels (background + tumor only). Both predict the same
held-out cases, which are scored against the complete lesion truth with the FLARE rules; the false
positive voxels (predicted lesion outside every true lesion) are split by what lies under them in
the phantom's tissue map: normal organ tissue, organ-like distractors that are not lesions (cysts,
bowel loops, bladder, vessels, gallbladder, stomach/duodenum), or anything else.

Run (about 2 x the demo's training time on 2 cores):
    python bench/ablation.py --workdir /tmp/ablation --out bench/results/ablation.json

Options: --cases N --healthy K --seed S (the cohort), --epochs E --iterations I (training length; the
demo's time limit is off, so both runs train exactly E x I steps). Training is the demo's: 2-worker
DDP on CPU, or one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import numpy as np

from panseg.phantom.shapes import Tissue

DISTRACTORS = (Tissue.CYST, Tissue.BOWEL, Tissue.BLADDER, Tissue.ARTERY, Tissue.VEIN, Tissue.GALLBLADDER,
               Tissue.STOMACH, Tissue.DUODENUM)


def false_positive_voxels(pred: np.ndarray, lesions: np.ndarray, organs: np.ndarray, tissue: np.ndarray) -> dict:
    """Predicted lesion voxels outside every true lesion, by what lies under them."""
    fp = (pred > 0) & (lesions == 0)
    distractor = np.isin(tissue, [int(t) for t in DISTRACTORS])
    on_organ = fp & (organs > 0) & ~distractor
    on_distractor = fp & distractor
    return {"fp_voxels": int(fp.sum()), "fp_on_organs": int(on_organ.sum()),
            "fp_on_distractors": int(on_distractor.sum()), "fp_elsewhere": int((fp & ~on_organ & ~on_distractor).sum())}


def _without_organs(raw: Path, out: Path) -> Path:
    """A raw folder that links the images and tumor labels of `raw` but has no organsTr."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        os.symlink((raw / sub).resolve(), out / sub)
    return out


def _score_run(name: str, run: Path, held_out: Path, gt: Path, cases: dict, work: Path) -> dict:
    from panseg.evaluation.folders import evaluate_folders
    from panseg.infer import predict_folder
    from panseg.io import read_volume

    preds = work / f"predictions_{name}"
    predict_folder(run, held_out, preds, progress=False)
    result = evaluate_folders(preds, gt)
    per_case = {}
    for case_id, case in cases.items():
        pred = read_volume(preds / f"{case_id}.nii.gz").array
        per_case[case_id] = false_positive_voxels(pred, case.lesions_true.array, case.organs_true.array,
                                                  case.tissue.array)
    diseased = [r for r in result.rows if not r["healthy"]]
    totals = {k: int(sum(c[k] for c in per_case.values())) for k in next(iter(per_case.values()))}
    return {
        "tumor_dsc_mean_all": result.dsc.mean, "tumor_nsd_mean_all": result.nsd.mean,
        "tumor_dsc_mean_diseased": float(np.mean([r["dsc"] for r in diseased])) if diseased else None,
        "tumor_nsd_mean_diseased": float(np.mean([r["nsd"] for r in diseased])) if diseased else None,
        "healthy_false_positive_rate": result.false_positive_rate, **totals,
        "per_case": {r["case_id"]: {"dsc": r["dsc"], "nsd": r["nsd"], **per_case[r["case_id"]]} for r in result.rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--healthy", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()

    import ray

    from panseg import demo
    from panseg.data_pipeline import run_preprocessing
    from panseg.phantom.cohort import cohort_jobs, make_case, write_cohort
    from panseg.train_loop import load_or_create_split

    cases = args.cases if args.cases is not None else demo.DEFAULT_CASES
    healthy = args.healthy if args.healthy is not None else demo.DEFAULT_HEALTHY
    cfg = demo.demo_config(**{k: v for k, v in (("epochs", args.epochs), ("iterations_per_epoch", args.iterations))
                              if v is not None}, minutes=None)  # both runs train the same number of steps
    work = Path(args.workdir)
    raw, truth = work / "raw", work / "truth"
    write_cohort(raw, cases=cases, healthy=healthy, seed=args.seed, small=True, truth_dir=truth)
    raw_without = _without_organs(raw, work / "raw_without_organs")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        stores = {"with_organs": work / "store_with_organs.zarr", "without_organs": work / "store_without_organs.zarr"}
        run_preprocessing(raw, stores["with_organs"], cfg.preprocess, progress=False)
        run_preprocessing(raw_without, stores["without_organs"], cfg.preprocess, progress=False)
        split = load_or_create_split(str(stores["with_organs"]), work / "split.json", cfg.train.val_fraction,
                                     cfg.train.seed)
        held_out, gt = work / "held_out_images", work / "held_out_truth"
        for folder in (held_out, gt):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for case_id in split["val"]:
            shutil.copy(raw / "imagesTr" / f"{case_id}_0000.nii.gz", held_out)
            shutil.copy(truth / f"{case_id}.nii.gz", gt)
        jobs = {case_id: (is_healthy, weak, orientation) for case_id, is_healthy, weak, orientation
                in cohort_jobs(cases, healthy)}
        phantoms = {c: make_case(c, args.seed, jobs[c][0], True, weak=jobs[c][1], orientation=jobs[c][2])
                    for c in split["val"]}

        rows = {}
        for name, store in stores.items():
            run = work / f"run_{name}"
            shutil.rmtree(run, ignore_errors=True)
            started = time.perf_counter()
            demo.train_demo_model(cfg, store, run, split_file=work / "split.json")
            train_seconds = time.perf_counter() - started
            rows[name] = {"train_seconds": round(train_seconds, 1), **_score_run(name, run, held_out, gt, phantoms, work)}
            print(name, {k: v for k, v in rows[name].items() if k != "per_case"}, flush=True)
    finally:
        ray.shutdown()

    report = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.processor()}",
        "cohort": {"cases": cases, "healthy": healthy, "seed": args.seed, "small": True,
                   "val": split["val"], "train": split["train"]},
        "train": {"epochs": cfg.train.epochs, "iterations_per_epoch": cfg.train.iterations_per_epoch,
                  "preset": cfg.preset, "recipe": "panseg.demo.demo_config"},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
