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
                          num_cpus: int | None, started: float) -> dict:
    from panseg.evaluation import evaluate_folders, format_table, write_csv
    from panseg.infer_folder import predict_folder

    _stage("4/5 predict the held-out cases", started)
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

    _stage("5/5 evaluate (FLARE 2024 rules)", started)
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
