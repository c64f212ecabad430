"""`panseg demo`: the method end to end on a synthetic cohort, on a laptop without a GPU.

phantom cohort -> preprocess (Ray Data) -> train (one Ray Train worker with every CPU core, or one
process on the GPU when there is one) -> predict the test cases -> evaluate with the FLARE rules
against their partial labels and against the complete truth -> report.html -> a verdict. Each stage
prints what it did and where it wrote it.

Three disjoint sets (`demo_split`, WORK/split.json): the test cases (the store's seeded held-out
share, the same cases bench/learning.py scores its curve on), VAL_CASES validation cases drawn from
the rest, which pick RUN/model_best, and the training cases. The test cases are used for nothing but
the final scores.

The demo's training (`demo_config`) is the tiny preset tuned to learn within minutes on CPU: the
paper's learning rate (1e-2), tumor loss weight and tumor sampling ratio (5 each), no augmentation
(a few thousand steps cannot use it), and nnU-Net's poly learning-rate decay over the share of
`minutes` used (`train.lr_schedule=poly_time`), so the budget is used whole on a faster or slower
machine and the last model is a settled one. It is the recipe of bench/learning.py's `panseg` curve.
On the CPU one worker holds every core (torch threads = its CPUs): at these budgets the number of
updates matters more than patches per update, and one 2-thread process makes ~1.7x the updates of
two 1-thread DDP workers on 2 cores (BENCHMARKS.md, time to accuracy).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from panseg.config import PansegConfig, build_config

# 12 minutes of training leave the whole demo within 15 minutes on 2 CPU cores (README).
DEFAULT_CASES, DEFAULT_HEALTHY, DEFAULT_MINUTES = 120, 16, 12.0
VAL_CASES = 8  # validation cases that pick model_best (train.val_max_cases validates them all)
LEARNING_JSON = Path(__file__).resolve().parents[1] / "bench" / "results" / "learning.json"  # the measured curve
EPOCH_CAP = 100_000  # with a time budget the clock ends training; epochs only bound it


def _stage(name: str, started: float) -> None:
    print(f"\n== {name} ({time.perf_counter() - started:.0f} s since start)", flush=True)


def demo_config(epochs: int | None = None, iterations_per_epoch: int = 40, minutes: float | None = DEFAULT_MINUTES
                ) -> PansegConfig:
    """The demo's config: the tiny preset made to learn tumors in minutes on CPU (module docstring).

    With `minutes` the learning rate decays to 0 over the share of them used (`poly_time`) and the
    clock ends training (`epochs`, default EPOCH_CAP, only bounds it); without, it decays over
    `epochs` (default 32).
    """
    if epochs is None:
        epochs = 32 if minutes is None else EPOCH_CAP
    limit = "null" if minutes is None else str(minutes)
    schedule = "poly" if minutes is None else "poly_time"
    return build_config("tiny", overrides=[
        f"train.epochs={epochs}", f"train.iterations_per_epoch={iterations_per_epoch}", "train.lr=0.01",
        f"train.time_limit_minutes={limit}", f"train.lr_schedule={schedule}", "train.augment.enabled=false",
        "train.tumor_weight=5", "train.tumor_sampling_ratio=5", "train.val_every_epochs=4",
        "train.checkpoint_every_epochs=4", "train.val_max_cases=8"])


def demo_split(case_ids: list[str], test_fraction: float, val_cases: int, seed: int) -> dict:
    """Three disjoint sets of `case_ids`: `test` is `train_loop.seeded_split`'s held-out share (the cases
    a split file created for the store holds out), `val` has `val_cases` of the rest drawn with
    seed + 1, `train` the others. `train` and `val` are what a split file holds (make_job's split_file)."""
    import numpy as np

    from panseg.train_loop import seeded_split

    held = seeded_split(case_ids, test_fraction, seed)
    rest = held["train"]
    if len(rest) < val_cases + 1:
        raise ValueError(f"the demo needs at least {val_cases + 1} cases besides its {len(held['val'])} test "
                         f"cases, but the store has {len(rest)}; use more --cases")
    order = np.random.default_rng(seed + 1).permutation(len(rest))
    val = sorted(rest[i] for i in order[:val_cases])
    return {"seed": seed, "train": sorted(set(rest) - set(val)), "val": val, "test": held["val"]}


def write_demo_split(store: Path, path: Path, cfg: PansegConfig) -> dict:
    """`demo_split` of the store's complete labelled cases, written to `path` (replacing an older one)."""
    import json

    from panseg.store.zarr_store import read_manifest

    ok = sorted(r["case_id"] for r in read_manifest(str(store)) if r["status"] == "ok")
    split = demo_split(ok, cfg.train.val_fraction, VAL_CASES, cfg.train.seed)
    path.write_text(json.dumps(split, indent=2))
    return split


def train_demo_model(cfg: PansegConfig, store: Path, run: Path, split_file: Path | None = None):
    """A new training run in `run` (an old one is removed): one process on the GPU when there is one,
    else one Ray Train worker holding every CPU of the local Ray (module docstring), whose epoch lines
    are printed here. Returns its job."""
    import ray
    import torch

    from panseg.train_loop import make_job, train_distributed, train_local

    if run.exists():
        shutil.rmtree(run)
    job = make_job(cfg, str(store), str(run), split_file=str(split_file) if split_file else None)
    if torch.cuda.is_available():
        print("train: one process on the GPU", flush=True)
        train_local(job)
        return job
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1
    print(f"train: one Ray Train worker on the CPU, {cpus} thread{'s' * (cpus > 1)}", flush=True)
    train_distributed(job, num_workers=1, use_gpu=False, cpus_per_worker=float(cpus), follow_progress=True)
    return job


def run_demo(workdir: str | Path, cases: int = DEFAULT_CASES, healthy: int = DEFAULT_HEALTHY, seed: int = 0,
             num_cpus: int | None = None, minutes: float | None = DEFAULT_MINUTES) -> dict:
    """Run every stage on a small phantom cohort in `workdir`; returns the paths it wrote.

    Stages that are already complete in `workdir` (a cohort, store cases) are reused, so a rerun
    continues rather than repeats; the training run is always new.
    """
    import ray

    from panseg.data_pipeline import format_summary, run_preprocessing
    from panseg.phantom.cohort import write_cohort
    from panseg.train_loop import summarize_run

    started = time.perf_counter()
    work = Path(workdir)
    raw, truth, store, run = work / "raw", work / "truth", work / "store.zarr", work / "run"
    cfg = demo_config(minutes=minutes)

    _stage("1/6 phantom cohort", started)
    summary = write_cohort(raw, cases=cases, healthy=healthy, seed=seed, small=True, truth_dir=truth)
    print(summary.summary_line())
    print(f"wrote {raw} (imagesTr, labelsTr with the primary lesion only, organsTr) and {truth} (every lesion); "
          f"the table of cases is {raw / 'phantom.json'}")

    start_quiet_local_ray(num_cpus)  # one local Ray for every stage
    try:
        _stage("2/6 preprocess with Ray Data", started)
        result = run_preprocessing(raw, store, cfg.preprocess, progress=True)
        print(format_summary(result))

        _stage(f"3/6 train (tiny model, demo recipe, up to {minutes} minutes)", started)
        split = write_demo_split(store, work / "split.json", cfg)
        print(f"split ({work / 'split.json'}): {len(split['train'])} cases train, {len(split['val'])} validate "
              f"(they pick model_best), {len(split['test'])} are kept for the test and used for nothing else")
        train_demo_model(cfg, store, run, split_file=work / "split.json")
        print(summarize_run(run))

        paths = {"raw": raw, "truth": truth, "store": store, "run": run, "split": work / "split.json"}
        paths.update(_predict_and_evaluate(work, raw, truth, run, tuple(split["test"]), None, started,
                                           ("4/6 predict the test cases", "5/6 evaluate (FLARE 2024 rules)")))
    finally:
        ray.shutdown()
    paths.update(_write_report(work, run, started))
    paths["verdict"] = _print_verdict(work, minutes, len(split["val"]))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is in {work}")
    return paths


def start_quiet_local_ray(num_cpus: int | None) -> None:
    """The demo's local Ray: worker output stays in Ray's log files (the training worker's epoch lines
    are followed from RUN/metrics.jsonl), and Ray's own choice of authentication stands (Ray 2.60 turns
    token authentication on for a new local cluster when RAY_AUTH_MODE is unset, making a token in
    ~/.ray/auth_token if there is none) without the notice it prints about it. With RAY_ADDRESS set,
    Ray joins that cluster and its own rules apply."""
    import ray

    from panseg.ray_shell import hide_token_auth_notice

    hide_token_auth_notice()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _print_verdict(work: Path, minutes: float | None, val_cases: int) -> Path:
    """Print the verdict from the test set's CSVs, and keep it in WORK/verdict.txt."""
    import torch

    from panseg.evaluation.verdict import curve_points, format_verdict, read_test_scores

    scores = read_test_scores(work / "metrics_held_out_truth.csv", work / "lesions_held_out_truth.csv")
    text = format_verdict(scores, minutes, val_cases, torch.cuda.is_available(), curve_points(LEARNING_JSON))
    print("\n" + text)
    (work / "verdict.txt").write_text(text + "\n")
    return work / "verdict.txt"


def _predict_and_evaluate(work: Path, raw: Path, truth: Path, run: Path, case_ids: tuple[str, ...],
                          num_cpus: int | None, started: float,
                          stage_names: tuple[str, str] = ("4/6 predict the held-out cases",
                                                          "5/6 evaluate (FLARE 2024 rules)")) -> dict:
    from panseg.evaluation.folders import evaluate_folders, format_table, write_csv
    from panseg.evaluation.lesions import score_cases, write_lesion_csv
    from panseg.infer import predict_folder
    from panseg.training.checkpoint import load_checkpoint

    _stage(stage_names[0], started)
    held_out = work / "held_out_images"
    if held_out.exists():
        shutil.rmtree(held_out)
    held_out.mkdir(parents=True)
    gt_partial = work / "held_out_labels"
    if gt_partial.exists():
        shutil.rmtree(gt_partial)
    gt_partial.mkdir()
    gt_full = work / "held_out_truth"
    if gt_full.exists():
        shutil.rmtree(gt_full)
    gt_full.mkdir()
    for case_id in case_ids:
        shutil.copy(raw / "imagesTr" / f"{case_id}_0000.nii.gz", held_out)
        shutil.copy(raw / "labelsTr" / f"{case_id}.nii.gz", gt_partial)
        shutil.copy(truth / f"{case_id}.nii.gz", gt_full)
    predictions, all_labels = work / "predictions", work / "predictions_all_labels"
    for folder in (predictions, all_labels):
        if folder.exists():
            shutil.rmtree(folder)  # masks of an earlier model would be kept as already done
    infer = replace(load_checkpoint(run).cfg.infer, all_labels=True)  # organs too, for the organ Dice
    predict_folder(run, held_out, all_labels, num_cpus=num_cpus, progress=True, infer=infer)
    _tumor_masks(all_labels, predictions)
    print(f"wrote the class maps of the {len(case_ids)} cases to {all_labels} and their tumor masks to {predictions}")

    _stage(stage_names[1], started)
    for name, gt in (("partial labels (primary lesion only)", gt_partial), ("complete truth (every lesion)", gt_full)):
        result = evaluate_folders(predictions, gt)
        print(f"-- against the {name}:")
        print(format_table(result))
        write_csv(result, work / f"metrics_{gt.name}.csv")
    rows = score_cases(all_labels, gt_full, truth / "organs", list(case_ids))
    write_lesion_csv(rows, work / "lesions_held_out_truth.csv")
    print(f"lesions and organs of the test cases: {work / 'lesions_held_out_truth.csv'}")
    return {"predictions": predictions, "predictions_all_labels": all_labels}


def _tumor_masks(all_labels: Path, predictions: Path) -> None:
    """predictions/<case>.nii.gz: tumor (class 14) -> 1 of each class map, with predictions.csv beside them."""
    import numpy as np

    from panseg.config import TUMOR_ID
    from panseg.io import read_volume, write_volume

    predictions.mkdir(parents=True)
    for path in sorted(all_labels.glob("*.nii.gz")):
        labels = read_volume(path)
        write_volume(replace(labels, array=(labels.array == TUMOR_ID).astype(np.uint8)), predictions / path.name)
    if (all_labels / "predictions.csv").is_file():
        shutil.copy(all_labels / "predictions.csv", predictions)  # inference time for the table and report


def _write_report(work: Path, run: Path, started: float) -> dict:
    """WORKDIR/report.html: curves, metrics against the complete truth, overlays (needs the viz extra)."""
    _stage("6/6 report", started)
    try:
        from panseg.report.page import build_report, sources_from_paths
    except ImportError as err:  # matplotlib is in the viz extra
        print(f"report skipped: {err}; install it with pip install 'panseg[viz]'")
        return {}
    sources = sources_from_paths([run, work / "predictions"], images_dir=work / "held_out_images",
                                 gt_dir=work / "held_out_truth")
    result = build_report(sources, work / "report.html", title="panseg demo: the test cases",
                          truth_name="the complete truth (every lesion)")
    print(f"wrote {result.path} ({result.cases_drawn} case(s) drawn); open it in a browser")
    return {"report": result.path}


# ----------------------------------------------------------------------------------------------
# `panseg demo --two-stage`: the organ model first, its pseudo-labels feed the tumor model
# ----------------------------------------------------------------------------------------------


def run_two_stage_demo(workdir: str | Path, cases: int = 8, healthy: int = 2, organ_cases: int = 8, seed: int = 0,
                       num_cpus: int | None = None, organ_epochs: int = 12, organ_iterations_per_epoch: int = 20,
                       epochs: int = 12, iterations_per_epoch: int = 20) -> dict:
    """Both stages of the method on phantoms, as the authors ran them on FLARE 2022 and FLARE 2024:

    organ cohort (complete organ labels, seed + 1000) -> organ store (`--task organs`) -> organ model
    -> pseudo-labels on the tumor cohort (seed), scored per organ against the phantoms' true organs
    -> fused store from the pseudo-labels -> tumor model -> predict and evaluate the held-out cases.

    The tumor cohort's own RAW/organsTr (the phantom's organ labels) is not used: preprocessing reads
    the pseudo-labels from WORK/pseudo_organs. Returns the paths it wrote.
    """
    from panseg.data_pipeline import format_summary, run_preprocessing
    from panseg.phantom.cohort import write_cohort
    from panseg.train_loop import summarize_run

    started = time.perf_counter()
    work = Path(workdir)
    organ_raw, organ_store, organ_run = work / "organ_raw", work / "organ_store.zarr", work / "organ_run"
    raw, truth, pseudo = work / "raw", work / "truth", work / "pseudo_organs"
    store, run = work / "store.zarr", work / "run"
    schedule = ["train.val_every_epochs=4", "train.checkpoint_every_epochs=4"]
    organ_cfg = build_config("tiny", overrides=["preprocess.task=organs", f"train.epochs={organ_epochs}",
                                                f"train.iterations_per_epoch={organ_iterations_per_epoch}", *schedule])
    tumor_cfg = build_config("tiny", overrides=[f"train.epochs={epochs}", f"train.iterations_per_epoch={iterations_per_epoch}",
                                                *schedule])

    _stage("1/8 organ cohort (FLARE22-like: complete organ labels, no tumor labels)", started)
    print(write_cohort(organ_raw, cases=organ_cases, healthy=0, seed=seed + 1000, small=True, organ_cohort=True).describe())

    _stage("2/8 preprocess the organ cohort (task organs)", started)
    print(format_summary(run_preprocessing(organ_raw, organ_store, organ_cfg.preprocess, num_cpus=num_cpus, progress=True)))

    _stage("3/8 train the organ model (tiny preset, local)", started)
    _train_fresh(organ_cfg, organ_store, organ_run)
    print(summarize_run(organ_run))

    _stage("4/8 tumor cohort (no organ labels are used from it)", started)
    print(write_cohort(raw, cases=cases, healthy=healthy, seed=seed, small=True, truth_dir=truth).describe())

    _stage("5/8 organ pseudo-labels for the tumor cohort (Ray Data)", started)
    _pseudolabel_and_score(organ_run, raw, truth, pseudo, num_cpus)

    _stage("6/8 preprocess the tumor cohort with the pseudo-labels (fused store)", started)
    print(format_summary(run_preprocessing(raw, store, tumor_cfg.preprocess, organs_dir=pseudo, num_cpus=num_cpus,
                                           progress=True)))

    _stage("7/8 train the tumor model (tiny preset, local)", started)
    job = _train_fresh(tumor_cfg, store, run)
    print(summarize_run(run))

    paths = {"organ_raw": organ_raw, "organ_store": organ_store, "organ_run": organ_run, "raw": raw, "truth": truth,
             "pseudo_organs": pseudo, "store": store, "run": run}
    paths.update(_predict_and_evaluate(work, raw, truth, run, job.val_ids, num_cpus, started,
                                       ("8/8 predict the held-out cases", "8/8 evaluate (FLARE 2024 rules)")))
    print(f"\ntwo-stage demo finished in {time.perf_counter() - started:.0f} s; everything is in {work}")
    return paths


def _train_fresh(cfg, store: Path, run: Path):
    """A new local training run in `run` (an old one is removed); returns its job."""
    from panseg.train_loop import make_job, train_local

    if run.exists():
        shutil.rmtree(run)
    job = make_job(cfg, str(store), str(run))
    train_local(job)
    return job


def _pseudolabel_and_score(organ_run: Path, raw: Path, truth: Path, pseudo: Path, num_cpus: int | None) -> None:
    """Pseudo-label the cohort, print the QA summary and each organ's Dice against the true organs."""
    from panseg.pseudolabel import evaluate_organ_folders, format_summary, mean_by_organ, pseudolabel_folder

    if pseudo.exists():
        shutil.rmtree(pseudo)  # a new organ model was trained: its labels replace the old ones
    rows = pseudolabel_folder(organ_run, raw / "imagesTr", pseudo, num_cpus=num_cpus, progress=True)
    print(format_summary(rows, pseudo))
    done = [r["case_id"] for r in rows if r["status"] in ("ok", "skipped")]
    means = mean_by_organ(evaluate_organ_folders(pseudo, truth / "organs", done))
    print("organ Dice of the pseudo-labels against the true organs (mean over the cohort):")
    print("  " + ", ".join(f"{name} {value:.2f}" for name, value in means.items()))
    print(f"  mean over organs: {sum(means.values()) / max(1, len(means)):.3f}")
