"""Sweeps: Ray Tune over the hyperparameters that decide how strongly the model attends to tumors.

The paper chose its tumor loss weight and tumor sampling ratio by hand; `run_sweep` searches them
(or any float keys in `tune.search_space`) with Ray Tune. Every trial is the training `panseg train`
runs (`train_loop.train_loop_per_worker`):
- one worker per trial: the loop runs inside the trial's own process (CPU, or the GPU Tune gave it),
  reporting each validated epoch to Tune;
- W workers per trial: the trial builds a `TorchTrainer` (Ray Train V2 has no `Tuner(TorchTrainer)`)
  whose validated reports reach Tune through `TuneReportCallback`.

Only validated epochs reach Tune (`is_validated`): Tune refuses a result without the sweep's metric,
and the presets validate every 2nd or 5th epoch. ASHA stops weak trials at its rungs (time = the
training epoch), judged at the first validated epoch past each rung. Each trial trains in
SWEEP/trials/<trial_id> with its own checkpoints, so an interrupted sweep resumes with
`Tuner.restore`: finished trials stay finished, interrupted ones continue from their last checkpoint.
At the end SWEEP holds trials.csv (one row per trial), best_config.yaml (which `panseg train --config`
takes as it is) and sweep.png (the metric against the searched parameters).

Pure parts (search space, trial configs, resources, the table) are plain functions; `run_sweep` is
the Ray shell.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from panseg.config import ConfigError, PansegConfig, SearchDim, TuneConfig, config_from_json, config_to_json, merge
from panseg.training.parts import Session

# ----------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------


def check_search_space(cfg: PansegConfig) -> None:
    """Every searched key must be a float field (the config already checked that it exists and that
    its range is non-empty).

    Raises:
        ConfigError: a key that is not a float setting, or an empty search space.
    """
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one key to search")
    for dim in cfg.tune.search_space:
        section, name = dim.key.split(".", 1) if "." in dim.key else ("", dim.key)
        owner = getattr(cfg, section, None) if section else None
        hints = typing.get_type_hints(type(owner)) if owner is not None and dataclasses.is_dataclass(owner) else {}
        if hints.get(name) is not float:
            kind = getattr(hints.get(name), "__name__", str(hints.get(name)))
            raise ConfigError(f"tune.search_space: {dim.key} is not a float setting (its type is {kind}); only "
                              "float settings such as train.tumor_weight or train.lr can be searched")


def trial_config(base: PansegConfig, params: dict[str, float]) -> PansegConfig:
    """`base` with the dotted keys in `params` set (a trial's config; also the best config's)."""
    nested: dict = {}
    for key, value in params.items():
        node = nested
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = float(value)
    return merge(base, nested)


def sample_space(dims: typing.Sequence[SearchDim]) -> dict:
    """The Tune param space: log-uniform or uniform per searched key."""
    from ray import tune

    return {d.key: (tune.loguniform(d.low, d.high) if d.log else tune.uniform(d.low, d.high)) for d in dims}


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds: the trial process and, with several workers, its Ray Train workers."""

    trial: dict[str, float]
    workers: dict[str, float]

    def total(self) -> dict[str, float]:
        keys = set(self.trial) | set(self.workers)
        return {k: self.trial.get(k, 0.0) + self.workers.get(k, 0.0) for k in keys}


def trial_resources(tune_cfg: TuneConfig) -> TrialResources:
    """One worker: the trial process trains, holding the worker's CPUs/GPUs. W workers: the trial process
    only drives a TorchTrainer (a sliver of a CPU) and the W workers hold the rest."""
    worker = {"CPU": tune_cfg.cpus_per_worker, "GPU": tune_cfg.gpus_per_worker}
    if tune_cfg.workers_per_trial == 1:
        return TrialResources(trial=worker, workers={})
    w = tune_cfg.workers_per_trial
    return TrialResources(trial={"CPU": 0.1, "GPU": 0.0}, workers={k: v * w for k, v in worker.items()})


def trial_bundles(tune_cfg: TuneConfig) -> list[dict[str, float]]:
    """The resource bundles one trial holds at once: its own process, then each Ray Train worker."""
    resources = trial_resources(tune_cfg)
    if tune_cfg.workers_per_trial == 1:
        return [resources.trial]
    worker = {"CPU": tune_cfg.cpus_per_worker, "GPU": tune_cfg.gpus_per_worker}
    return [resources.trial] + [worker] * tune_cfg.workers_per_trial


def max_concurrent_trials(need: dict[str, float], cluster: dict[str, float], num_trials: int) -> int:
    """How many trials needing `need` in all fit in the `cluster` totals at once (at least 1, at most
    `num_trials`); whether one trial fits at all is `panseg.cluster.require_resources`' question."""
    fits = num_trials
    for key, amount in need.items():
        if amount > 0:
            fits = min(fits, int(math.floor(cluster.get(key, 0.0) / amount + 1e-9)))
    return max(1, fits)


def read_trial(trial_dir: Path, metric: str, mode: str) -> dict:
    """A trial's row from its own run directory: searched values, best metric, its NSD, epochs run."""
    from panseg.config import load_config
    from panseg.train_loop import read_metrics

    rows = read_metrics(trial_dir)
    scored = [r for r in rows if r.get(metric) is not None]
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None
    cfg = load_config(trial_dir / "config.yaml") if (trial_dir / "config.yaml").is_file() else None
    return {"trial_id": trial_dir.name, "epochs_run": rows[-1]["epoch"] if rows else 0,
            "epochs": cfg.train.epochs if cfg else None, f"best_{metric}": best[metric] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "val_tumor_nsd_at_best": best.get("val_tumor_nsd") if best else None, "config": cfg}


def trial_table(trial_rows: list[dict], dims: typing.Sequence[SearchDim], states: dict[str, str],
                metric: str) -> list[dict]:
    """One flat row per trial for trials.csv: id, searched values, best metric and NSD, epochs, state.

    A trial that ran fewer epochs than configured and did not fail was stopped early by the scheduler.
    """
    table = []
    for row in trial_rows:
        cfg = row["config"]
        state = states.get(row["trial_id"], "UNKNOWN")
        if state == "TERMINATED":
            state = "completed" if row["epochs_run"] == row["epochs"] else "stopped early"
        out = {"trial_id": row["trial_id"]}
        for dim in dims:
            section, name = dim.key.split(".", 1)
            out[dim.key] = getattr(getattr(cfg, section), name) if cfg else None
        out.update({f"best_{metric}": row[f"best_{metric}"], "val_tumor_nsd_at_best": row["val_tumor_nsd_at_best"],
                    "best_epoch": row["best_epoch"], "epochs_run": row["epochs_run"], "state": state})
        table.append(out)
    return table


def best_row(table: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in table if r[f"best_{metric}"] is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[f"best_{metric}"])


def format_table(table: list[dict]) -> str:
    if not table:
        return "tune: no trials"
    keys = list(table[0])
    cells = [[_cell(r[k]) for k in keys] for r in table]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_table_csv(table: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["trial_id"])
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, path)


def plot_sweep(table: list[dict], dims: typing.Sequence[SearchDim], metric: str, path: Path) -> Path | None:
    """sweep.png: the metric against the first two searched keys (or the one key). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = [r for r in table if r[f"best_{metric}"] is not None]
    values = [r[f"best_{metric}"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    x = dims[0]
    if len(dims) >= 2:
        y = dims[1]
        points = ax.scatter([r[x.key] for r in rows], [r[y.key] for r in rows], c=values, s=80, cmap="viridis",
                            edgecolors=["red" if r["state"] == "stopped early" else "black" for r in rows],
                            linewidths=2)
        fig.colorbar(points, ax=ax, label=f"best {metric}")
        ax.set_ylabel(y.key)
        ax.set_yscale("log" if y.log else "linear")
    else:
        ax.scatter([r[x.key] for r in rows], values, s=60)
        ax.set_ylabel(f"best {metric}")
    ax.set_xlabel(x.key)
    ax.set_xscale("log" if x.log else "linear")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{len(rows)} trials (red edge: stopped early)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# The Ray shell
# ----------------------------------------------------------------------------------------------


def is_validated(metrics: dict, metric: str) -> bool:
    """Whether an epoch's metrics reach Tune: only validated epochs carry the sweep's metric, and Tune
    refuses a result without it (the presets validate every 2nd or 5th epoch). ASHA's rungs are
    epochs, so it compares trials at the validated epochs past each rung."""
    return metrics.get(metric) is not None


class TuneSession(Session):
    """The training loop inside a one-worker Tune trial: reports each validated epoch to Tune."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        from ray import tune

        super().report(metrics, checkpoint_dir)
        if is_validated(metrics, self.metric):
            tune.report({k: v for k, v in metrics.items() if v is not None})


def validated_report_callback(metric: str):
    """Ray Train's `TuneReportCallback` for a multi-worker trial, passing on only validated epochs
    (Ray Train still gets every epoch's report and checkpoint)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidatedEpochsCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and is_validated(metrics[0], metric):
                super().after_report(run_context, metrics, checkpoint)

    return ValidatedEpochsCallback()


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    config: PansegConfig  # the sweep's base config (each trial's is this with its searched values)
    table: list[dict]
    best: dict | None
    best_config: Path | None
    plot: Path | None


def _run_trial(params: dict, *, base_json: str, store: str, sweep_dir: str) -> None:
    """One trial: the base config with `params`, trained in SWEEP/trials/<trial_id>, resuming its own
    checkpoint when the sweep was interrupted."""
    import torch
    from ray import tune

    from panseg.train_loop import make_job, train_distributed, train_loop_per_worker
    from panseg.training.checkpoint import latest_checkpoint

    cfg = trial_config(config_from_json(base_json), params)
    run_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    if ended_state(run_dir) == "TERMINATED":
        return  # a resumed sweep whose saved state predates this trial's end: nothing to do
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    job = make_job(cfg, store, str(run_dir), split_file=str(Path(sweep_dir) / "split.json"), resume=resume)
    tcfg = cfg.tune
    if tcfg.workers_per_trial == 1:
        torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
        train_loop_per_worker(job.to_dict(), session=TuneSession(tcfg.metric))
    else:
        train_distributed(job, num_workers=tcfg.workers_per_trial, use_gpu=tcfg.gpus_per_worker > 0,
                          cpus_per_worker=tcfg.cpus_per_worker,
                          callbacks=[validated_report_callback(tcfg.metric)])


ENDED = "ended.json"  # SWEEP/trials/<id>/ended.json: how Tune ended the trial (written by the driver)


def _sweep_callback(metric: str, sweep: Path):
    """Prints one line per trial epoch, and records in each trial's directory how Tune ended it, so a
    resumed sweep never retrains a finished or stopped trial (Tune saves its own state only every few
    seconds, and a killed driver may lose the last of it)."""
    from ray.tune import Callback

    def record(trial, state: str) -> None:
        folder = sweep / "trials" / trial.trial_id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{ENDED}.tmp"
        tmp.write_text(json.dumps({"state": state}))
        os.replace(tmp, folder / ENDED)
        free_worker_group(folder)

    class SweepCallback(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            print(f"tune: {trial.trial_id} epoch {result.get('epoch')} {metric} {shown}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            record(trial, "TERMINATED")
            print(f"tune: {trial.trial_id} finished", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            record(trial, "ERROR")
            print(f"tune: {trial.trial_id} failed (see {trial.path})", flush=True)

    return SweepCallback()


def free_worker_group(trial_dir: Path) -> bool:
    """Remove the placement group of an ended trial's Ray Train workers, if it is still there.

    Tune stops a trial (ASHA, or the last epoch) by killing the trial's process; a `TorchTrainer` the
    trial was driving then leaves its workers' placement group CREATED (Ray 2.60, seen here), holding
    their CPUs/GPUs, and the next trials wait for them forever. Rank 0 records the group's id in
    RUN/workers/rank_0.json; the driver frees it here once Tune has ended the trial. Returns whether
    a group was removed.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    info = trial_dir / "workers" / "rank_0.json"
    group_hex = json.loads(info.read_text()).get("placement_group") if info.is_file() else None
    if not group_hex or not ray.is_initialized():
        return False
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex)))
    if placement_group_table(group).get("state") not in ("CREATED", "PENDING", "RESCHEDULING"):
        return False
    remove_placement_group(group)
    return True


def ended_state(trial_dir: Path) -> str | None:
    """How Tune ended this trial (TERMINATED or ERROR), or None while it has not ended."""
    path = trial_dir / ENDED
    return json.loads(path.read_text())["state"] if path.is_file() else None


def run_sweep(cfg: PansegConfig | None, store: str | Path, sweep_dir: str | Path, resume: bool = False,
              address: str | None = None, num_cpus: int | None = None) -> SweepResult:
    """Run the sweep `cfg.tune` describes on `store`, in `sweep_dir`; with `resume`, continue the sweep
    there with the config it was started with (`cfg` must then be None).

    Raises:
        ConfigError: the search space names a key that cannot be searched.
        ClusterResourcesError: one trial needs more than the cluster can ever have.
        FileNotFoundError / FileExistsError: `resume` without a sweep, or a new sweep over an old one.
    """
    import functools

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from panseg.cluster import cluster_capacity, require_resources
    from panseg.config import load_config, save_config
    from panseg.ray_shell import ray_session
    from panseg.train_loop import load_or_create_split, resolve_config

    sweep = Path(sweep_dir).resolve()
    experiment, saved = sweep / "tune", sweep / "sweep_config.yaml"
    store = str(Path(store).resolve()) if "://" not in str(store) else str(store)
    if resume:
        if not (experiment.is_dir() and saved.is_file()):
            raise FileNotFoundError(f"--resume: {sweep} holds no sweep to resume (no {experiment.name}/ and "
                                    f"{saved.name})")
        if cfg is not None:
            raise ConfigError("a resumed sweep keeps the config it started with; drop --preset/--config/--set")
        base = load_config(saved)
    else:
        if experiment.exists():
            raise FileExistsError(f"{sweep} already holds a sweep; pass --resume to continue it, or choose "
                                  "another --out")
        check_search_space(cfg)
        base = resolve_config(cfg, store)
        sweep.mkdir(parents=True, exist_ok=True)
        save_config(base, saved)
    load_or_create_split(store, sweep / "split.json", base.train.val_fraction, base.train.seed)
    tcfg = base.tune
    resources = trial_resources(tcfg)

    with ray_session(address, num_cpus):
        capacity = cluster_capacity()
        require_resources(trial_bundles(tcfg), what="trial resource bundle", capacity=capacity,
                          advice="Lower tune.workers_per_trial, tune.cpus_per_worker or tune.gpus_per_worker, "
                                 "or add nodes.")
        concurrent = max_concurrent_trials(resources.total(), capacity.totals, tcfg.num_trials)
        print(f"tune: {tcfg.num_trials} trials, up to {concurrent} at once, {tcfg.scheduler} scheduler, "
              f"searching {', '.join(d.key for d in tcfg.search_space)}; sweep directory {sweep}", flush=True)
        trainable = tune.with_resources(
            functools.partial(_run_trial, base_json=config_to_json(base), store=store, sweep_dir=str(sweep)),
            {k: v for k, v in resources.trial.items() if v > 0},
        )
        if resume:
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            # max_t one past the last epoch: ASHA never stops a trial that is finishing anyway (a
            # Tune stop kills the trial process, and with W workers that leaks their placement group).
            scheduler = (ASHAScheduler(time_attr="epoch", max_t=base.train.epochs + 1,
                                       grace_period=tcfg.grace_period_epochs, reduction_factor=tcfg.reduction_factor)
                         if tcfg.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                param_space=sample_space(tcfg.search_space),
                tune_config=tune.TuneConfig(
                    metric=tcfg.metric, mode=tcfg.mode, scheduler=scheduler, num_samples=tcfg.num_trials,
                    search_alg=BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=concurrent),
                    trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id,
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep), verbose=0,
                                          callbacks=[_sweep_callback(tcfg.metric, sweep)]),
            )
        grid = tuner.fit()
    states = {Path(r.path).name: ("ERROR" if r.error else "TERMINATED") for r in grid}
    return summarize_sweep(sweep, base, states)


def summarize_sweep(sweep_dir: Path, base: PansegConfig, states: dict[str, str]) -> SweepResult:
    """trials.csv, best_config.yaml and sweep.png from the trial directories."""
    from panseg.config import save_config

    tcfg = base.tune
    trial_dirs = sorted(d for d in (sweep_dir / "trials").glob("*") if d.is_dir())
    rows = [read_trial(d, tcfg.metric, tcfg.mode) for d in trial_dirs]
    states = {**states, **{d.name: ended_state(d) for d in trial_dirs if ended_state(d)}}
    table = trial_table(rows, tcfg.search_space, states, tcfg.metric)
    write_table_csv(table, sweep_dir / "trials.csv")
    best = best_row(table, tcfg.metric, tcfg.mode)
    best_config = None
    if best is not None:
        cfg = next(r["config"] for r in rows if r["trial_id"] == best["trial_id"])
        best_config = save_config(cfg, sweep_dir / "best_config.yaml")
    plot = plot_sweep(table, tcfg.search_space, tcfg.metric, sweep_dir / "sweep.png")
    return SweepResult(sweep_dir, base, table, best, best_config, plot)


__all__ = ["SweepResult", "TrialResources", "TuneSession", "best_row", "check_search_space", "format_table",
           "free_worker_group", "max_concurrent_trials", "read_trial", "run_sweep", "summarize_sweep", "trial_bundles",
           "trial_config", "trial_resources", "trial_table"]
