"""Time to accuracy: held-out tumor DSC against minutes of training, on 2 CPU cores.

    python bench/learning.py --work /tmp/learning --minutes 120 --recipe panseg   # >= 2 h, nothing else running
    python bench/learning.py --work /tmp/learning --minutes 40 --recipe monai     # the peer, same store and split
    python bench/learning.py --work /tmp/lq --minutes 2 --snapshots 1 2 --cases 6 --healthy 2   # a rehearsal
    # levers (issue 17), each beside its baseline measured in the same session:
    python bench/learning.py --work /tmp/learning --minutes 10 --snapshots 5 10 --name panseg_10min
    python bench/learning.py --work /tmp/learning --minutes 10 --snapshots 5 10 --organ-minutes 10 \
        --name panseg_10min_init_organs10
    python bench/learning.py --work /tmp/learning --minutes 120 --organ-minutes 10 --name panseg_init_organs10
    # then which lesions a curve's snapshots find: python bench/lesion_recall.py --work /tmp/learning --run NAME

Cohort: the demo's (`panseg demo` defaults: 120 phantoms with lesions + 16 healthy, seed 0, small
phantoms), written once into WORK/raw and WORK/truth, preprocessed with the demo's preprocessing
(`data_pipeline.process_one` in a 2-process pool, what Ray Data's actors run per case) into
WORK/store.zarr. Split: the demo's (`load_or_create_split` with the demo config's seed and
validation fraction), written to WORK/split.json; its 27 held-out cases are the test cases here.

Recipes (each trains once, for `--minutes` of wall-clock training, keeping the model at each of
`--snapshots` minutes; nothing is chosen by validation, so no test case picks a model):
- `panseg`: `panseg.demo.demo_config` (tiny U-Net, lr 1e-2 AdamW, tumor weight 5 and sampling ratio
  5, no augmentation, `train.lr_schedule=poly_time` over `--minutes`) with `train.snapshot_minutes`,
  in one process with the machine's threads (`train_local`; the demo runs the same in one Ray Train
  worker holding every CPU). `--set KEY=VALUE` changes it (a lever); `--name` keeps the result apart.
- `--organ-minutes M` (the lever `train.init_from`): stage one first, an organ model of the same
  network trained for M minutes (`poly_time`, no validation) on an organ cohort of `--organ-cases`
  phantoms (complete organs, no tumor, seed 1000: none is a tumor case) in WORK/organ_store_<N>.zarr; the
  tumor model then starts from its weights. The method trains that organ model anyway (it makes the
  organ pseudo-labels), so its minutes are written beside the curve, not on its axis.
- `monai`: the peer of issue 17 (bench extra): MONAI's DynUNet (8-16-32-64), DiceCELoss,
  RandCropByLabelClassesd (tumor 5x each organ), AdamW 1e-2 with poly decay over the same time, on
  the same store, split, patch (32x64x64) and batch (2). Its snapshots are predicted by panseg's own
  predictor (the DynUNet in place of panseg's network, the same crop, resampling, window and restore).

Every snapshot is then scored on the test cases: panseg's predictor writes every class; the tumor
masks are scored with `panseg.evaluation.evaluate_folders` (FLARE rules) against the complete truth
(every lesion) and the partial labels (primary lesion only); lesion recall is the share of true
lesions (26-connected components of the complete truth) touched by a predicted tumor voxel; false
components are predicted tumor components that touch no true lesion; organ Dice is the mean over
the organs present in each case's true organ map. Output: WORK/learning.json, merged into
bench/results/learning.json (recipes measured in other runs are kept) and bench/results/learning.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from panseg.config import TUMOR_ID, PansegConfig, apply_overrides
from panseg.demo import DEFAULT_CASES, DEFAULT_HEALTHY, demo_config
from panseg.evaluation.folders import evaluate_folders
from panseg.evaluation.lesions import score_cases
from panseg.inference.predictor import Predictor, load_predictor, predict_case
from panseg.io import read_volume, write_volume
from panseg.phantom.cohort import write_cohort
from panseg.store.zarr_store import MANIFEST
from panseg.train_loop import load_or_create_split, make_job, read_metrics, train_local

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts' shared parts
from _preprocess_cohort import store_cohort  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SNAPSHOTS = (5, 10, 20, 30, 40, 60, 80, 100, 120)


def build_cohort(work: Path, cases: int, healthy: int, workers: int) -> Path:
    """WORK/raw, WORK/truth and WORK/store.zarr (reused when complete)."""
    raw, truth, store = work / "raw", work / "truth", work / "store.zarr"
    if (store / MANIFEST).exists():
        return store
    write_cohort(raw, cases=cases, healthy=healthy, seed=0, small=True, truth_dir=truth, workers=workers)
    if store.exists():
        shutil.rmtree(store)
    store_cohort(raw, store, demo_config().preprocess, workers)
    return store


def demo_split(work: Path, store: Path) -> dict:
    """The demo's split; its held-out cases' truth and partial labels are copied to WORK/test_truth and
    WORK/test_labels, the folders the scores are taken against."""
    cfg = demo_config()
    split = load_or_create_split(str(store), work / "split.json", cfg.train.val_fraction, cfg.train.seed)
    for name, source in (("test_truth", work / "truth"), ("test_labels", work / "raw" / "labelsTr")):
        folder = work / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        for case_id in split["val"]:
            shutil.copy(source / f"{case_id}.nii.gz", folder)
    return split


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------


def panseg_recipe(minutes: float, snapshots: tuple[float, ...] = (), overrides: tuple[str, ...] = ()) -> PansegConfig:
    """The panseg recipe's config (module docstring), `--set` overrides applied last."""
    cfg = demo_config(minutes=minutes)  # poly_time over `minutes`, the clock ends training
    tcfg = replace(cfg.train, snapshot_minutes=tuple(float(m) for m in snapshots),
                   val_every_epochs=100_000, checkpoint_every_epochs=20)
    return apply_overrides(replace(cfg, train=tcfg), overrides=overrides)


def train_panseg(work: Path, store: Path, name: str, cfg: PansegConfig) -> Path:
    """Train the panseg recipe `cfg` in WORK/runs/NAME (replaced); returns the run directory."""
    run = work / "runs" / name
    if run.exists():
        shutil.rmtree(run)
    job = make_job(cfg, str(store), str(run), split_file=str(work / "split.json"))
    train_local(job)
    return run


def train_organ_model(work: Path, minutes: float, cases: int, workers: int) -> Path:
    """Stage one for `--organ-minutes`: an organ model of the recipe's network, trained for `minutes` on an
    organ cohort of `cases` (complete organ labels, no tumor; seed 1000, so no case is a tumor case) in
    WORK/organ_raw_<N>, WORK/organ_store_<N>.zarr and WORK/runs/organs_<N>cases_<M>min. A finished run
    is reused."""
    run = work / "runs" / f"organs_{cases}cases_{minutes:g}min"
    if (run / "model_final").exists():
        return run
    raw, store = work / f"organ_raw_{cases}", work / f"organ_store_{cases}.zarr"
    cfg = panseg_recipe(minutes, overrides=("preprocess.task=organs",))
    if not (store / MANIFEST).exists():
        if raw.exists():
            shutil.rmtree(raw)
        write_cohort(raw, cases=cases, healthy=0, seed=1000, small=True, organ_cohort=True, workers=workers)
        if store.exists():
            shutil.rmtree(store)
        store_cohort(raw, store, cfg.preprocess, workers)
    if run.exists():
        shutil.rmtree(run)
    train_local(make_job(cfg, str(store), str(run)))
    return run


def snapshot_dirs(run: Path) -> list[tuple[dict, Path]]:
    found = []
    for folder in sorted((run / "snapshots").glob("minute_*")):
        info_file = folder / "snapshot.json"
        if info_file.is_file():
            found.append((json.loads(info_file.read_text()), folder))
    return sorted(found, key=lambda item: item[0]["minutes"])


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def load_snapshot(recipe: str, folder: Path, threads: int) -> Predictor:
    if recipe == "monai":
        from bench.learning_monai import monai_predictor

        return monai_predictor(folder, threads)
    return load_predictor(folder, device="cpu", threads=threads)


def score_snapshot(predictor: Predictor, work: Path, test_ids: list[str], out: Path) -> dict:
    """Predict the test cases with a snapshot's predictor and score them (module docstring)."""
    predictor = predictor.with_config(replace(predictor.cfg, infer=replace(predictor.cfg.infer, all_labels=True)))
    full, tumor_dir = out / "all_labels", out / "tumor"
    for d in (full, tumor_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    seconds = 0.0
    for case_id in test_ids:
        row = predict_case(predictor, work / "raw" / "imagesTr" / f"{case_id}_0000.nii.gz", full / f"{case_id}.nii.gz",
                           case_id=case_id)
        seconds += row["seconds"]
        labels = read_volume(full / f"{case_id}.nii.gz")
        write_volume(replace(labels, array=(labels.array == TUMOR_ID).astype(np.uint8)), tumor_dir / f"{case_id}.nii.gz")
    lesions = score_cases(full, work / "test_truth", work / "truth" / "organs", test_ids)
    organ = [r["organ_dice"] for r in lesions if r["organ_dice"] is not None]
    complete = evaluate_folders(tumor_dir, work / "test_truth")
    partial = evaluate_folders(tumor_dir, work / "test_labels")
    assert not complete.missing and not partial.missing, (complete.missing, partial.missing)
    lesion_rows = [r for r in complete.rows if not r["healthy"]]
    return {
        "tumor_dsc": round(complete.dsc.mean, 4), "tumor_nsd": round(complete.nsd.mean, 4),
        "tumor_dsc_lesion_cases": round(float(np.mean([r["dsc"] for r in lesion_rows])), 4) if lesion_rows else None,
        "tumor_dsc_partial": round(partial.dsc.mean, 4), "tumor_nsd_partial": round(partial.nsd.mean, 4),
        "lesion_recall": round(sum(r["lesions_found"] for r in lesions) / max(1, sum(r["lesions"] for r in lesions)), 4),
        "false_components_per_case": round(sum(r["false_components"] for r in lesions) / len(test_ids), 2),
        # A healthy case with any tumor voxel has a component touching no lesion.
        "healthy_with_fp": sum(1 for r in lesions if r["lesions"] == 0 and r["false_components"] > 0),
        "healthy_cases": len(complete.healthy_ids),
        "organ_dice": round(float(np.mean(organ)), 4) if organ else None,
        "predict_seconds_per_case": round(seconds / len(test_ids), 2),
    }


def empty_prediction_dsc(work: Path, test_ids: list[str]) -> float:
    """What predicting no lesion anywhere scores on the test cases (FLARE rules: 1 on a healthy case)."""
    healthy = sum(1 for cid in test_ids if not read_volume(work / "truth" / f"{cid}.nii.gz").array.any())
    return healthy / len(test_ids)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine()}


def merge_results(curve: dict, path: Path = RESULTS / "learning.json") -> dict:
    merged = json.loads(path.read_text()) if path.is_file() else {"recipes": {}}
    merged.setdefault("recipes", {}).update(curve["recipes"])
    merged.setdefault("runs", {}).update({name: curve["machine"] for name in curve["recipes"]})
    merged["machine"] = curve["machine"]
    merged["empty_prediction_dsc"] = curve["empty_prediction_dsc"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


SHORT_BUDGET_MINUTES = 20  # curves that end by here are drawn in their own panel (the levers)


def plot(results: dict, path: Path = RESULTS / "learning.png") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("learning.png skipped: matplotlib is not installed (the viz extra)")
        return None
    recipes = sorted(results["recipes"].items())
    long_runs = [(n, pts) for n, pts in recipes if max(p["minutes"] for p in pts) > SHORT_BUDGET_MINUTES]
    short_runs = [(n, pts) for n, pts in recipes if max(p["minutes"] for p in pts) <= SHORT_BUDGET_MINUTES]
    panels = [("long runs", long_runs), (f"budgets up to {SHORT_BUDGET_MINUTES:g} minutes (levers)", short_runs)]
    panels = [(title, runs) for title, runs in panels if runs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for name, points in runs:
            ax.plot([p["minutes"] for p in points], [100 * p["tumor_dsc"] for p in points], marker="o", label=name)
        if "empty_prediction_dsc" in results:
            ax.axhline(100 * results["empty_prediction_dsc"], color="grey", linestyle="--", label="empty prediction")
        ax.set_title(title)
        ax.set_xlabel("minutes of training (2 CPU cores)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out tumor DSC (%), complete truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--recipe", choices=("panseg", "monai"), default="panseg")
    parser.add_argument("--name", help="the curve's name in learning.json and WORK/runs (default: the recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="panseg recipe: a config override, e.g. train.lr=0.02 (repeatable)")
    parser.add_argument("--organ-minutes", type=float,
                        help="panseg recipe: first train a stage-one organ model for this many minutes on an organ "
                             "cohort, then start the tumor model from it (train.init_from); its minutes are not on "
                             "the curve's axis")
    parser.add_argument("--organ-cases", type=int, default=40, help="the organ cohort's size (--organ-minutes)")
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--snapshots", type=float, nargs="+", default=list(DEFAULT_SNAPSHOTS))
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--healthy", type=int, default=DEFAULT_HEALTHY)
    parser.add_argument("--score-only", action="store_true", help="score the snapshots of an earlier run again")
    parser.add_argument("--no-merge", action="store_true", help="leave bench/results alone (rehearsals)")
    args = parser.parse_args(argv)
    if args.recipe != "panseg" and (args.overrides or args.organ_minutes is not None):
        parser.error("--set and --organ-minutes change the panseg recipe only")
    snapshots = tuple(sorted(m for m in args.snapshots if m <= args.minutes))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()

    started = time.perf_counter()
    store = build_cohort(work, args.cases, args.healthy, workers=min(2, os.cpu_count() or 1))
    split = demo_split(work, store)
    test_ids = list(split["val"])
    print(f"cohort ready in {time.perf_counter() - started:.0f} s: {len(split['train'])} training, "
          f"{len(test_ids)} test cases", flush=True)

    name = args.name or args.recipe
    run = work / "runs" / name
    init_from = None
    if args.recipe == "panseg":
        overrides = tuple(args.overrides)
        if args.organ_minutes is not None:
            t0 = time.perf_counter()
            init_from = train_organ_model(work, args.organ_minutes, args.organ_cases,
                                          workers=min(2, os.cpu_count() or 1))
            print(f"organ model ready in {time.perf_counter() - t0:.0f} s: {init_from}", flush=True)
            overrides += (f"train.init_from={init_from}",)
        cfg = panseg_recipe(args.minutes, snapshots, overrides)
    if not args.score_only:
        t0 = time.perf_counter()
        if args.recipe == "panseg":
            train_panseg(work, store, name, cfg)
        else:
            from bench.learning_monai import train_monai

            train_monai(work, store, split, args.minutes, snapshots)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)

    points = []
    for info, folder in snapshot_dirs(run):
        t0 = time.perf_counter()
        scores = score_snapshot(load_snapshot(args.recipe, folder, threads), work, test_ids,
                                work / "scored" / name / folder.name)
        point = {"minutes": info["minutes"], "elapsed_minutes": round(info["elapsed_seconds"] / 60, 2),
                 "steps": info["steps"], **scores}
        points.append(point)
        print(json.dumps(point), f"(scored in {time.perf_counter() - t0:.0f} s)", flush=True)
    machine = {**machine_facts(), "recipe": args.recipe, "minutes": args.minutes,
               "train_loss_last": (read_metrics(run) or [{}])[-1].get("train_loss")}
    if args.overrides:
        machine["overrides"] = list(args.overrides)
    if init_from is not None:
        machine.update(init_from=str(init_from), organ_minutes=args.organ_minutes, organ_cases=args.organ_cases)
    curve = {"machine": machine, "empty_prediction_dsc": round(empty_prediction_dsc(work, test_ids), 4),
             "recipes": {name: points}}
    (work / f"learning_{name}.json").write_text(json.dumps(curve, indent=2) + "\n")
    if not args.no_merge:
        merged = merge_results(curve)
        plot(merged)
    print(f"wrote {work / f'learning_{name}.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
