"""The `panseg` command: one subcommand per stage, each parsing its arguments and calling an API function.

Parsing is strict (a misspelt flag or an abbreviation is an error) and heavy imports (Ray, torch,
SimpleITK) happen inside the handlers, so `panseg --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EPILOG = """examples:
  panseg phantom data/raw --cases 20 --healthy 4 --seed 0 --truth data/truth
  panseg preprocess --raw data/raw --out data/store.zarr --preset paper --num-cpus 2
  panseg train --store data/store.zarr --out runs/tiny --preset tiny --local
  panseg tune --store data/store.zarr --out sweeps/s1 --preset tiny --trials 4
  panseg predict --model runs/tiny --input data/test --output preds
  panseg pseudolabel --model runs/organs --input data/raw/imagesTr --output data/raw/organsTr
  panseg evaluate --pred preds --gt data/truth --out metrics.csv
  panseg report runs/tiny preds --images data/test --gt data/truth --out report.html
  panseg config --preset tiny --set train.lr=0.003 --out my.yaml
  panseg demo --workdir demo_work

Every stage takes --preset {paper,seed-code,nnunet,tiny}, --config FILE (YAML/JSON) and repeated
--set section.key=value; `panseg config --preset NAME` prints every key.
"""


class _Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations: `--case` must not silently mean `--cases`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


class _StageParser(_Parser):
    """A stage's parser rejects what it does not know itself, so the error shows that stage's usage
    (argparse alone hands a subparser's leftovers up to the top-level parser, which prints its own)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", choices=["paper", "seed-code", "nnunet", "tiny"], default=None,
                       help="base configuration (default: the config file's preset, else paper)")
    group.add_argument("--config", metavar="FILE", default=None, help="YAML or JSON config applied on the preset")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                       help="override one key, e.g. --set train.lr=0.003 (repeatable)")


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray")
    group.add_argument("--address", default=None,
                       help="Ray cluster address ('auto' inside `ray job submit`); default: RAY_ADDRESS, else a local Ray")
    group.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")


def _add_prediction_args(parser: argparse.ArgumentParser, set_example: str) -> None:
    """What every stage that runs a trained model over a folder takes: GPUs, progress, infer overrides, Ray."""
    parser.add_argument("--gpu", action="store_true", help="require GPUs (default: use them when the cluster has any)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    group = parser.add_argument_group("configuration (applied on the checkpoint's own config)")
    group.add_argument("--config", metavar="FILE", default=None, help="YAML or JSON whose infer keys apply")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides", help=set_example)
    _add_ray_args(parser)


def _config_from_args(args: argparse.Namespace):
    from panseg.config import build_config

    return build_config(args.preset, args.config, args.overrides)


# ----------------------------------------------------------------------------------------------
# Handlers: parse -> call the API -> print what was done. Nothing else.
# ----------------------------------------------------------------------------------------------


def _cmd_phantom(args: argparse.Namespace) -> int:
    from panseg.phantom.cohort import write_cohort

    summary = write_cohort(args.out, cases=args.cases, healthy=args.healthy, seed=args.seed, small=args.small,
                           truth_dir=args.truth, organ_cohort=args.organ_cohort, workers=args.workers)
    print(summary.describe())
    print(f"wrote {args.out}" + (f" and complete lesion labels to {args.truth}" if args.truth else ""))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from panseg.config import save_config, to_dict

    cfg = _config_from_args(args)
    if args.out:
        save_config(cfg, args.out)
        print(f"wrote {args.out}")
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from panseg.data_pipeline import format_summary, run_preprocessing

    cfg = _config_from_args(args)
    if args.task:
        from panseg.config import merge

        cfg = merge(cfg, {"preprocess": {"task": args.task}})
    result = run_preprocessing(args.raw, args.out, cfg.preprocess, organs_dir=args.organs, address=args.address,
                               num_cpus=args.num_cpus, progress=not args.quiet)
    print(format_summary(result))
    return 0 if result.num_failed == 0 else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from panseg.train_loop import make_job, summarize_run, train_distributed, train_local

    cfg = _config_from_args(args)
    job = make_job(cfg, args.store, args.out, split_file=args.split, resume=args.resume,
                   stop_after_epochs=args.stop_after_epochs)
    print(f"train: {len(job.train_ids)} training and {len(job.val_ids)} validation cases; run directory {job.run_dir}")
    if args.gpu and not args.workers:
        print("panseg train: --gpu needs --workers N (local mode uses a GPU when there is one)", file=sys.stderr)
        return 2
    if args.workers:
        train_distributed(job, num_workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                          max_failures=args.max_failures, address=args.address)
    else:
        train_local(job)
    print(summarize_run(job.run_dir))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from panseg.config import merge
    from panseg.tune_search import format_table, run_sweep

    cfg = None
    given = {"num_trials": args.trials, "scheduler": args.scheduler, "workers_per_trial": args.workers_per_trial,
             "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume:
        if args.preset or args.config or args.overrides or given:
            print("panseg tune: --resume continues the sweep with the config it started with; drop "
                  "--preset/--config/--set/--trials/--scheduler/--*-per-*", file=sys.stderr)
            return 2
    else:
        cfg = merge(_config_from_args(args), {"tune": given})
    result = run_sweep(cfg, args.store, args.out, resume=args.resume, address=args.address, num_cpus=args.num_cpus)
    metric = (cfg.tune if cfg else result.config.tune).metric
    print(format_table(result.table))
    print(f"tune: trials in {result.sweep_dir / 'trials.csv'}")
    if result.best_config:
        print(f"tune: best trial {result.best['trial_id']} ({metric} {result.best['best_' + metric]:.4f}); "
              f"its config: {result.best_config} (panseg train --config {result.best_config} ...)")
    if result.plot:
        print(f"tune: plot in {result.plot}")
    failed = [r for r in result.table if r["state"] == "ERROR"]
    return 1 if failed else 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from panseg.infer import predict_folder

    from panseg.config import apply_overrides
    from panseg.inference.nnunet_model import is_nnunet_model_folder
    from panseg.training.checkpoint import load_checkpoint

    if is_nnunet_model_folder(args.model):
        rows = _predict_nnunet(args)
    else:
        if args.folds:
            raise ValueError(f"--folds is for nnU-Net v2 model folders, and {args.model} is not one "
                             "(plans.json, dataset.json, fold_K/)")
        infer = None  # the checkpoint's own inference settings, unless changed here
        if args.config or args.overrides or args.all_labels:
            cfg = apply_overrides(load_checkpoint(args.model).cfg, args.config, args.overrides)
            infer = cfg.infer if not args.all_labels else _replace(cfg.infer, all_labels=True)
        rows = predict_folder(args.model, args.input, args.output, address=args.address, num_cpus=args.num_cpus,
                              use_gpu=True if args.gpu else None, progress=not args.quiet, infer=infer)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"predict: {len(rows)} cases, {sum(r['status'] == 'ok' for r in rows)} predicted, "
          f"{sum(r['status'] == 'skipped' for r in rows)} already there, {len(failed)} failed; masks in {args.output}")
    for row in failed:
        print(f"  {row['case_id']}: {row['error']}")
    return 1 if failed else 0


def _predict_nnunet(args: argparse.Namespace) -> list[dict]:
    """An nnU-Net v2 model folder: its own defaults (step 0.5, mirroring) with --config/--set infer keys on top."""
    from panseg.config import PansegConfig, apply_overrides
    from panseg.infer_nnunet import predict_nnunet_folder
    from panseg.inference.nnunet_predict import NNUNET_INFER

    infer = apply_overrides(PansegConfig(infer=NNUNET_INFER), args.config, args.overrides).infer
    if args.all_labels:
        infer = _replace(infer, all_labels=True)
    return predict_nnunet_folder(args.model, args.input, args.output, folds=args.folds, address=args.address,
                                 num_cpus=args.num_cpus, use_gpu=True if args.gpu else None,
                                 progress=not args.quiet, infer=infer)


def _cmd_pseudolabel(args: argparse.Namespace) -> int:
    from panseg.pseudolabel import format_summary, pseudolabel_folder

    infer = None
    if args.config or args.overrides:
        from panseg.config import apply_overrides
        from panseg.training.checkpoint import load_checkpoint

        infer = apply_overrides(load_checkpoint(args.model).cfg, args.config, args.overrides).infer
    rows = pseudolabel_folder(args.model, args.input, args.output, address=args.address, num_cpus=args.num_cpus,
                              use_gpu=True if args.gpu else None, progress=not args.quiet, infer=infer,
                              factor=args.factor)
    print(format_summary(rows, args.output))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from panseg.evaluation.folders import evaluate_folders, format_table, write_csv

    result = evaluate_folders(args.pred, args.gt, tolerance_mm=args.tolerance_mm)
    print(format_table(result))
    if args.out:
        write_csv(result, args.out)
        print(f"wrote {args.out}")
    return _evaluate_exit_code(result, allow_missing=args.allow_missing)


def _evaluate_exit_code(result, allow_missing: bool) -> int:
    """1 (saying why on stderr) when a case could not be scored, unless --allow-missing accepts it."""
    problems = []
    if result.truth_errors:
        problems.append(f"{len(result.truth_errors)} unreadable ground truth ({', '.join(result.truth_errors)})")
    if not allow_missing:
        if result.missing:
            problems.append(f"{len(result.missing)} predictions missing")
        if result.unreadable:
            problems.append(f"{len(result.unreadable)} predictions unreadable or off-grid "
                            f"({', '.join(result.unreadable)})")
    if not problems:
        return 0
    advice = "" if result.truth_errors else "; pass --allow-missing to accept them (they score 0)"
    print(f"panseg evaluate: {' and '.join(problems)}{advice}", file=sys.stderr)
    return 1


def _cmd_report(args: argparse.Namespace) -> int:
    from panseg.report.page import build_report, sources_from_paths

    sources = sources_from_paths(args.inputs, images_dir=args.images, gt_dir=args.gt, metrics_csv=args.metrics)
    result = build_report(sources, args.out, max_cases=args.max_cases)
    for line in result.notes + result.problems:
        print(f"  {line}")
    print(f"report: {result.cases} cases, {result.cases_drawn} drawn, {len(result.problems)} could not be drawn; "
          f"wrote {result.path}")
    return 1 if result.problems else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from panseg.demo import run_demo, run_two_stage_demo

    sizes = {k: v for k, v in (("cases", args.cases), ("healthy", args.healthy)) if v is not None}
    if args.two_stage:
        run_two_stage_demo(args.workdir, seed=args.seed, num_cpus=args.num_cpus, **sizes)
    else:
        minutes = {"minutes": args.minutes} if args.minutes is not None else {}
        run_demo(args.workdir, seed=args.seed, num_cpus=args.num_cpus, **sizes, **minutes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="panseg", description="Whole-body pan-cancer CT lesion segmentation on Ray "
                     "(Crop and Segment, FLARE 2024 Task 1).", epilog=EPILOG)
    from panseg import __version__

    parser.add_argument("--version", action="version", version=f"panseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", parser_class=_StageParser)
    sub.required = True

    p = sub.add_parser("phantom", help="write a synthetic whole-body CT cohort in the raw layout",
                       description="Write N diseased and K healthy synthetic CTs with organ pseudo-labels and "
                       "partial tumor labels.", epilog="example:\n  panseg phantom data/raw --cases 20 --healthy 4 "
                       "--seed 0 --truth data/truth")
    p.add_argument("out", help="output folder (imagesTr/, labelsTr/, organsTr/ are created)")
    p.add_argument("--cases", type=int, default=8, help="cases with lesions (default 8)")
    p.add_argument("--healthy", type=int, default=2, help="healthy cases (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="small, coarse volumes for fast tests")
    p.add_argument("--truth", default=None, metavar="DIR", help="also write complete lesion labels here")
    p.add_argument("--organ-cohort", action="store_true",
                   help="FLARE22-like organ cohort: labelsTr holds complete organ ids 1-13, no tumor labels")
    p.add_argument("--workers", type=int, default=1, help="processes used to generate cases")
    p.set_defaults(handler=_cmd_phantom)

    p = sub.add_parser("config", help="print or save the configuration a preset and overrides give",
                       epilog="example:\n  panseg config --preset tiny --set train.epochs=10 --out tiny10.yaml")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="write to this .yaml/.json instead of printing")
    p.set_defaults(handler=_cmd_config)

    p = sub.add_parser("preprocess", help="crop, resample and fuse labels of a cohort into a Zarr store (Ray Data)",
                       epilog="example:\n  panseg preprocess --raw data/raw --out data/store.zarr --preset paper\n"
                       "  ray job submit --runtime-env runtime_env.yaml --working-dir . -- panseg preprocess "
                       "--raw /mnt/panseg/raw --out /mnt/panseg/store.zarr --address auto")
    p.add_argument("--raw", required=True, help="raw cohort folder (imagesTr/, labelsTr/, optional organsTr/)")
    p.add_argument("--out", required=True, help="the store to write, e.g. data/store.zarr (resumable)")
    p.add_argument("--organs", default=None, metavar="DIR", help="organ pseudo-labels (default RAW/organsTr)")
    p.add_argument("--task", choices=["tumor", "organs"], default=None,
                   help="tumor: fuse organs and tumor (default); organs: labelsTr holds organ ids 1-13")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(handler=_cmd_preprocess)

    p = sub.add_parser("train", help="train the U-Net on a store: locally, or DDP over Ray Train workers",
                       epilog="examples:\n  panseg train --store data/store.zarr --out runs/tiny --preset tiny --local\n"
                       "  ray job submit --runtime-env runtime_env.yaml --working-dir . -- panseg train --store "
                       "/mnt/panseg/store.zarr --out /mnt/panseg/runs/paper --workers 4 --gpu --address auto\n"
                       "  panseg train --store data/store.zarr --out runs/paper --resume")
    p.add_argument("--store", required=True, help="the Zarr store written by `panseg preprocess`")
    p.add_argument("--out", required=True, help="run directory: config, split, checkpoints, metrics, models")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="one process, no Ray Train (the default; pdb works)")
    mode.add_argument("--workers", type=int, default=None, help="DDP over this many Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); without it, CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--split", default=None, metavar="FILE", help="train/val split JSON (default RUN/split.json, "
                   "created seeded if absent)")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="train N epochs in this call, then stop (continue later with --resume)")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address for --workers ('auto' on a cluster)")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over the tumor loss weight and sampling ratio (ASHA)",
                       epilog="examples:\n  panseg tune --store data/store.zarr --out sweeps/s1 --preset tiny --trials 4\n"
                       "  panseg tune --store data/store.zarr --out sweeps/s1 --resume\n"
                       "  panseg tune --store s3://bucket/store.zarr --out /shared/sweeps/s2 --preset paper "
                       "--workers-per-trial 2 --gpus-per-worker 1 --address auto")
    p.add_argument("--store", required=True, help="the Zarr store written by `panseg preprocess`")
    p.add_argument("--out", required=True, help="sweep directory: trials/, trials.csv, best_config.yaml, sweep.png")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default tune.num_trials)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=None, help="default tune.scheduler (asha)")
    p.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial (default 1: "
                   "the trial trains in its own process)")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    _add_config_args(p)
    _add_ray_args(p)
    p.set_defaults(handler=_cmd_tune)

    p = sub.add_parser("predict", help="tumor masks for a folder of CTs (Ray Data, one actor per GPU)",
                       epilog="examples:\n  panseg predict --model runs/paper --input data/test/imagesTs --output preds\n"
                       "  ray job submit --runtime-env runtime_env.yaml --working-dir . -- panseg predict --model "
                       "/mnt/panseg/runs/paper --input /mnt/panseg/test --output /mnt/panseg/preds --address auto")
    p.add_argument("--model", required=True, help="run directory (its best model), checkpoint directory or file, "
                   "or an nnU-Net v2 model folder (<Trainer>__<Plans>__<configuration>/, docs/inference.md)")
    p.add_argument("--input", required=True, help="folder of CTs named <case>_0000.nii.gz (or .nii/.mha/.nrrd)")
    p.add_argument("--output", required=True, help="folder for <case>.nii.gz masks and predictions.csv (resumable)")
    p.add_argument("--all-labels", action="store_true", help="write every class, not only the tumor")
    p.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                   help="nnU-Net model folds to ensemble, e.g. 0 1 2 3 4 or all (default: every fold with a checkpoint)")
    _add_prediction_args(p, "e.g. --set infer.mirror_tta=true --set infer.windows_per_batch=4")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("pseudolabel", help="organ masks (ids 0-13) for a folder of CTs from an organ model (Ray Data)",
                       description="Stage one of the method: run an organ model (trained on a store made with\n"
                       "`panseg preprocess --task organs`) over a cohort and write each case's organ mask in its\n"
                       "CT's grid, where `panseg preprocess` reads organ labels. Resumable; per-case organ\n"
                       "volumes and plausibility warnings go to OUTPUT/pseudolabels.csv.",
                       epilog="examples:\n  panseg pseudolabel --model runs/organs --input data/raw/imagesTr "
                       "--output data/raw/organsTr\n  ray job submit --working-dir . -- panseg pseudolabel "
                       "--model /shared/runs/organs --input /shared/raw/imagesTr --output /shared/raw/organsTr "
                       "--address auto")
    p.add_argument("--model", required=True, help="organ model: run directory, checkpoint directory or file")
    p.add_argument("--input", required=True, help="folder of CTs named <case>_0000.nii.gz, e.g. RAW/imagesTr")
    p.add_argument("--output", required=True, help="folder for <case>.nii.gz organ masks, e.g. RAW/organsTr "
                   "(cases already there are skipped)")
    p.add_argument("--factor", type=float, default=3.0,
                   help="warn when an organ's volume is outside [median/F, median*F] of the cohort (default 3)")
    _add_prediction_args(p, "e.g. --set infer.step_fraction=0.5 --set infer.windows_per_batch=4")
    p.set_defaults(handler=_cmd_pseudolabel)

    p = sub.add_parser("evaluate", help="FLARE 2024 lesion DSC / NSD of predicted masks against ground truth",
                       epilog="example:\n  panseg evaluate --pred preds --gt data/test/labelsTs --out metrics.csv")
    p.add_argument("--pred", required=True, help="folder of predicted <case>.nii.gz masks")
    p.add_argument("--gt", required=True, help="folder of ground-truth <case>.nii.gz masks (any value > 0 is lesion)")
    p.add_argument("--out", default=None, help="per-case CSV to write")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance (FLARE 2024: 2 mm)")
    p.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when predictions are missing, unreadable or off-grid (each scores 0, as FLARE "
                   "does; without this flag the table and CSV are still written, then the exit status is 1). An "
                   "unreadable ground truth always exits 1")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("report", help="a self-contained HTML page: training curves, per-case metrics, CT overlays",
                       description="Write one HTML file (images embedded) with the training curves of a run, the "
                       "per-case metrics table (sortable) and, per case, the CT with ground truth, prediction and "
                       "crop box in three planes through the largest lesion (or the largest false positive).",
                       epilog="examples:\n  panseg report runs/tiny --out report.html\n"
                       "  panseg report preds --images data/test --gt data/truth --out report.html\n"
                       "  panseg report runs/tiny preds --images data/test --gt data/truth --out report.html")
    p.add_argument("inputs", nargs="+", metavar="RUN_DIR|PRED_DIR",
                   help="a training run directory (metrics.jsonl, config.yaml) and/or a prediction folder "
                   "(<case>.nii.gz masks, predictions.csv); each is recognised by what it holds")
    p.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    p.add_argument("--images", default=None, metavar="DIR", help="folder of the CTs <case>_0000.nii.gz (for overlays)")
    p.add_argument("--gt", default=None, metavar="DIR", help="folder of ground-truth <case>.nii.gz masks")
    p.add_argument("--metrics", default=None, metavar="CSV",
                   help="per-case CSV of `panseg evaluate --out` (default: evaluate the predictions against --gt)")
    p.add_argument("--max-cases", type=int, default=60, help="draw at most this many cases, first by id (default 60)")
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("demo", help="the pipeline on a synthetic cohort, end to end",
                       epilog="examples:\n  panseg demo --workdir demo_work\n"
                       "  panseg demo --workdir demo_quick --cases 8 --healthy 2 --minutes 3\n"
                       "  panseg demo --workdir demo2 --two-stage")
    p.add_argument("--workdir", default="demo_work", help="where everything is written (default demo_work)")
    p.add_argument("--cases", type=int, default=None,
                   help="phantom cases with lesions (default 120; with --two-stage 8)")
    p.add_argument("--healthy", type=int, default=None, help="healthy phantom cases (default 16; with --two-stage 2)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget: the learning rate decays over it and the run ends at the first "
                   "epoch boundary past it (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--two-stage", action="store_true",
                   help="both stages: organ cohort -> organ model -> pseudo-labels on the tumor cohort -> fused "
                   "store -> tumor model -> evaluate")
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from panseg.cluster import ClusterResourcesError
    from panseg.config import ConfigError

    try:
        return handler(args)
    except ClusterResourcesError as err:  # fail fast: Ray alone would wait forever for what no node has
        parser.exit(3, f"panseg {args.command}: {err}\n")
    except ConfigError as err:
        parser.exit(2, f"panseg {args.command}: config error: {err}\n")
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        parser.exit(2, f"panseg {args.command}: {err}\n")
    except ValueError as err:  # bad input named by the stage (checkpoint, split, patch size, store)
        parser.exit(2, f"panseg {args.command}: {err}\n")
    except KeyboardInterrupt:
        print(f"panseg {args.command}: interrupted; completed work is kept and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
