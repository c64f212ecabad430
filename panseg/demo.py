"""`panseg demo`: the method end to end on a synthetic cohort, on a laptop without a GPU.

phantom cohort -> preprocess (Ray Data) -> train (tiny preset, local) -> predict the held-out cases
-> evaluate with the FLARE rules against their partial labels and against the complete truth.
Each stage prints what it did and where it wrote it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from panseg.config import build_config


def _stage(name: str, started: float) -> None:
    print(f"\n== {name} ({time.perf_counter() - started:.0f} s since start)", flush=True)


def run_demo(workdir: str | Path, cases: int = 8, healthy: int = 2, seed: int = 0, num_cpus: int | None = None,
             epochs: int = 12, iterations_per_epoch: int = 20) -> dict:
    """Run every stage on a small phantom cohort in `workdir`; returns the paths it wrote.

    Stages that are already complete in `workdir` (a cohort, store cases) are reused, so a rerun
    continues rather than repeats; the training run is always new.
    """
    from panseg.data_pipeline import format_summary, run_preprocessing
    from panseg.phantom import write_cohort
    from panseg.train_loop import make_job, summarize_run, train_local

    started = time.perf_counter()
    work = Path(workdir)
    raw, truth, store, run = work / "raw", work / "truth", work / "store.zarr", work / "run"
    cfg = build_config("tiny", overrides=[f"train.epochs={epochs}", f"train.iterations_per_epoch={iterations_per_epoch}",
                                          "train.val_every_epochs=4", "train.checkpoint_every_epochs=4"])

    _stage("1/5 phantom cohort", started)
    summary = write_cohort(raw, cases=cases, healthy=healthy, seed=seed, small=True, truth_dir=truth)
    print(summary.describe())
    print(f"wrote {raw} (imagesTr, labelsTr with the primary lesion only, organsTr) and {truth} (every lesion)")

    _stage("2/5 preprocess with Ray Data", started)
    result = run_preprocessing(raw, store, cfg.preprocess, num_cpus=num_cpus, progress=True)
    print(format_summary(result))

    _stage("3/5 train (tiny preset, local)", started)
    if run.exists():
        shutil.rmtree(run)
    job = make_job(cfg, str(store), str(run))
    train_local(job)
    print(summarize_run(run))

    paths = {"raw": raw, "truth": truth, "store": store, "run": run}
    paths.update(_predict_and_evaluate(work, raw, truth, run, job.val_ids, num_cpus, started))
    paths.update(_write_report(work, run, started))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is in {work}")
    return paths


def _predict_and_evaluate(work: Path, raw: Path, truth: Path, run: Path, val_ids: tuple[str, ...],
                          num_cpus: int | None, started: float,
                          stage_names: tuple[str, str] = ("4/5 predict the held-out cases",
                                                          "5/5 evaluate (FLARE 2024 rules)")) -> dict:
    from panseg.evaluation import evaluate_folders, format_table, write_csv
    from panseg.infer_folder import predict_folder

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
    for case_id in val_ids:
        shutil.copy(raw / "imagesTr" / f"{case_id}_0000.nii.gz", held_out)
        shutil.copy(raw / "labelsTr" / f"{case_id}.nii.gz", gt_partial)
        shutil.copy(truth / f"{case_id}.nii.gz", gt_full)
    predictions = work / "predictions"
    predict_folder(run, held_out, predictions, num_cpus=num_cpus, progress=True)
    print(f"wrote tumor masks of {len(val_ids)} held-out cases to {predictions}")

    _stage(stage_names[1], started)
    for name, gt in (("partial labels (primary lesion only)", gt_partial), ("complete truth (every lesion)", gt_full)):
        result = evaluate_folders(predictions, gt)
        print(f"-- against the {name}:")
        print(format_table(result))
        write_csv(result, work / f"metrics_{gt.name}.csv")
    return {"predictions": predictions}


def _write_report(work: Path, run: Path, started: float) -> dict:
    """WORKDIR/report.html: curves, metrics against the complete truth, overlays (needs the viz extra)."""
    _stage("report", started)
    try:
        from panseg.report import build_report, sources_from_paths
    except ImportError as err:  # matplotlib is in the viz extra
        print(f"report skipped: {err}; install it with pip install 'panseg[viz]'")
        return {}
    sources = sources_from_paths([run, work / "predictions"], images_dir=work / "held_out_images",
                                 gt_dir=work / "held_out_truth")
    result = build_report(sources, work / "report.html", title="panseg demo")
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
    from panseg.phantom import write_cohort
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
