"""Training: one per-worker loop for local debug runs, Ray Train DDP over any number of workers and nodes,
and Tune trials.

`train_loop_per_worker(config)` unpacks its config into a `TrainJob` first, then builds data, model,
loss and optimiser, restores the last checkpoint if there is one, and loops over epochs, reporting
every epoch. The same function runs:
- locally (`train_local`): one process, no Ray Train, CPU or one GPU, so pdb works;
- under `TorchTrainer` (`train_distributed`): DDP with NCCL on GPUs or gloo on CPUs, restarts from
  the last checkpoint when a worker dies (`FailureConfig`);
- inside a Tune trial (tune_search.py builds a TorchTrainer per trial).

Rank 0 writes checkpoints to RUN/checkpoints/epoch_NNNN, the metrics to RUN/metrics.jsonl and
RUN/metrics.csv, and RUN/model_best and RUN/model_final; every rank reports.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from panseg.config import PansegConfig, TrainConfig, config_from_json, config_to_json
from panseg.training.checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from panseg.training.init_from import initialise_from, load_init_source
from panseg.training.parts import (
    Session,
    build_training_parts,
    lr_at_epoch,
    make_model,
    make_sampler,
    selection_metric,
    validate,
)
from panseg.training.progress import MetricsFollower, epoch_line
from panseg.training.sampling import PatchSampler
from panseg.training.snapshots import Snapshots, TrainingClock


# ----------------------------------------------------------------------------------------------
# Where the loop runs under Ray Train (the local Session is in panseg.training.parts)
# ----------------------------------------------------------------------------------------------


class RayTrainSession(Session):
    """A Ray Train worker: DDP through Ray's process group, reports through `ray.train.report`."""

    def __init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        group = ray.util.get_current_placement_group()
        self.placement_group_id = group.id.hex() if group is not None else None
        self._restored_dir: tempfile.TemporaryDirectory | None = None
        if self.device.type == "cpu":
            # A CPU worker computes with as many threads as the CPUs it holds (ScalingConfig's
            # resources_per_worker), whatever OMP_NUM_THREADS Ray's worker process started with.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                torch.set_num_threads(max(1, int(cpus)))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return model
        # Without deep supervision the lower heads get no gradient; DDP must be told.
        unused = not getattr(model, "deep_supervision", True)
        return ray.train.torch.prepare_model(model, move_to_device=False,
                                             parallel_strategy_kwargs={"find_unused_parameters": unused})

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.rank == 0:
            super().report(metrics, checkpoint_dir)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restart_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored_dir = tempfile.TemporaryDirectory(prefix="panseg-restore-")
        return Path(checkpoint.to_directory(self._restored_dir.name))


def make_session(run_dir: str) -> Session:
    """A Ray Train session inside a Ray Train worker, else a local one."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        in_ray_train = True
    except Exception:  # not inside a TorchTrainer worker
        in_ray_train = False
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return RayTrainSession() if in_ray_train else Session()


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs beyond the config; travels through Ray as a plain dict."""

    cfg: PansegConfig
    store: str
    run_dir: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    resume: bool = False
    stop_after_epochs: int | None = None  # train this many epochs in this run, then stop (resumable)
    # This run's id (make_job): its checkpoints record it, so a restarted worker group finds them.
    run_id: str = ""
    # A fault drill for operators and tests: rank 0 SIGKILLs itself right after writing this epoch's
    # checkpoint, before Ray Train has it (once per run; RUN/.drill_killed marks it done).
    drill_kill_after_epoch: int | None = None

    def to_dict(self) -> dict:
        return {"cfg_json": config_to_json(self.cfg), "store": self.store, "run_dir": self.run_dir,
                "train_ids": list(self.train_ids), "val_ids": list(self.val_ids), "resume": self.resume,
                "stop_after_epochs": self.stop_after_epochs, "run_id": self.run_id,
                "drill_kill_after_epoch": self.drill_kill_after_epoch}

    @classmethod
    def from_dict(cls, data: dict) -> TrainJob:
        return cls(cfg=config_from_json(data["cfg_json"]), store=data["store"], run_dir=data["run_dir"],
                   train_ids=tuple(data["train_ids"]), val_ids=tuple(data["val_ids"]), resume=data["resume"],
                   stop_after_epochs=data["stop_after_epochs"], run_id=data.get("run_id", ""),
                   drill_kill_after_epoch=data.get("drill_kill_after_epoch"))


def train_loop_per_worker(config: dict, session: Session | None = None) -> None:
    """The training loop of one worker (see the module docstring). `session` defaults to Ray Train's
    inside a TorchTrainer worker and a local one elsewhere; a Tune trial passes its own."""
    job = TrainJob.from_dict(config)
    cfg, tcfg = job.cfg, job.cfg.train
    if session is None:
        session = make_session(job.run_dir)
    _record_worker(job.run_dir, session)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    parts = build_training_parts(cfg, session.device, session.world_size)
    start_epoch, best, elapsed_before = _restore(job, session, parts)
    model = session.wrap(parts.model)
    sampler = make_sampler(cfg, job.store, list(job.train_ids), rank=session.rank)
    end_epoch = tcfg.epochs if job.stop_after_epochs is None else min(tcfg.epochs, start_epoch + job.stop_after_epochs)
    iterations = max(1, math.ceil(tcfg.iterations_per_epoch / session.world_size))
    log = _MetricsLog(job.run_dir) if session.rank == 0 else None
    clock = TrainingClock(elapsed_before)
    snapshots = Snapshots(job.run_dir, cfg, tcfg.snapshot_minutes, elapsed_before) if session.rank == 0 else None
    with ThreadPoolExecutor(max_workers=max(1, tcfg.loader_threads)) as pool:
        for epoch in range(start_epoch, end_epoch):
            started = time.perf_counter()
            lr = lr_at_epoch(tcfg, epoch, clock.elapsed())
            for group in parts.optimizer.param_groups:
                group["lr"] = lr
            train_loss = _train_epoch(model, parts, sampler, pool, tcfg, epoch, iterations, session)
            metrics = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                       "epoch_seconds": time.perf_counter() - started, "world_size": session.world_size,
                       "elapsed_seconds": clock.elapsed()}
            out_of_time = (tcfg.time_limit_minutes is not None
                           and _any_rank(session, clock.elapsed() > 60.0 * tcfg.time_limit_minutes))
            if snapshots:
                snapshots.save_due(parts.model, epoch + 1, (epoch + 1) * iterations, clock.elapsed())
            last = epoch + 1 == end_epoch or out_of_time
            if (epoch + 1) % tcfg.val_every_epochs == 0 or last:
                metrics.update(validate(parts.model, cfg, job.store, list(job.val_ids), session))
            best, is_best = _update_best(best, metrics, cfg)
            metrics["best_val"] = best
            checkpoint_dir = None
            if (epoch + 1) % tcfg.checkpoint_every_epochs == 0 or last or is_best:
                checkpoint_dir = _write_checkpoints(job, session, parts, epoch + 1, best, is_best,
                                                    final=epoch + 1 == tcfg.epochs or out_of_time,
                                                    elapsed_seconds=clock.elapsed())
            if log:
                log.append({**metrics, "time": time.time()})
            session.report(metrics, checkpoint_dir)
            if session.rank == 0:
                print(epoch_line(metrics, tcfg), flush=True)
            if out_of_time:
                if session.rank == 0:
                    print(f"train: train.time_limit_minutes={tcfg.time_limit_minutes} reached after epoch "
                          f"{epoch + 1} of {tcfg.epochs}; model_final is this epoch's model", flush=True)
                break


def _any_rank(session: Session, flag: bool) -> bool:
    """True on every rank when it is true on any (ranks must agree on when to stop, or DDP hangs)."""
    return session.all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def _record_worker(run_dir: str, session: Session) -> None:
    """RUN/workers/rank_N.json: which process, host and Ray node runs each rank (for operators and fault drills).

    Nodes that share a host name (several per machine, or containers) differ by their Ray node id. The
    worker group's placement group lets a Tune driver free it when it stops the trial (tune_search).
    """
    import socket

    folder = Path(run_dir) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"rank": session.rank, "world_size": session.world_size, "pid": os.getpid(),
            "host": socket.gethostname(), "node_id": session.node_id, "device": str(session.device),
            "torch_threads": torch.get_num_threads(), "placement_group": session.placement_group_id,
            "started": time.time()}
    tmp = folder / f".rank_{session.rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / f"rank_{session.rank}.json")


def _train_epoch(model, parts, sampler: PatchSampler, pool: ThreadPoolExecutor, tcfg: TrainConfig, epoch: int,
                 iterations: int, session: Session) -> float:
    """One epoch of `iterations` steps; batches are read ahead by the thread pool. Returns the mean loss."""
    model.train()
    ahead = max(1, tcfg.loader_threads) * 2
    futures = {i: pool.submit(sampler.batch, epoch, i, tcfg.batch_size) for i in range(min(ahead, iterations))}
    total = 0.0
    for it in range(iterations):
        if it + ahead < iterations:
            futures[it + ahead] = pool.submit(sampler.batch, epoch, it + ahead, tcfg.batch_size)
        images, labels = futures.pop(it).result()
        image = torch.from_numpy(images).to(session.device, non_blocking=True)  # (B, 1, D, H, W)
        label = torch.from_numpy(labels).to(session.device, non_blocking=True)
        generator = torch.Generator(device="cpu").manual_seed(_step_seed(tcfg.seed, session.rank, epoch, it))
        image, label = parts.augment(image, label, generator)
        total += _step(model, parts, image, label.long(), tcfg, session)
    return total / iterations


def _step_seed(seed: int, rank: int, epoch: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch, iteration, 7]).generate_state(1)[0])


def _step(model, parts, image: torch.Tensor, label: torch.Tensor, tcfg: TrainConfig, session: Session) -> float:
    parts.optimizer.zero_grad(set_to_none=True)
    use_bf16 = session.device.type == "cuda" and tcfg.precision == "bf16"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        outputs = model(image)
        loss = parts.loss(outputs, label)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip_norm)
    parts.optimizer.step()
    return float(loss.detach())


def restart_source(handed: Path | None, handed_epoch: int | None, on_disk: Path | None, disk_epoch: int | None
                   ) -> tuple[Path | None, str]:
    """Which checkpoint a (re)started worker group continues from, and why: the newer of the one Ray
    Train hands over (the last it was reported) and the newest complete one in RUN/checkpoints of this
    run (or of any run with --resume). A worker killed after writing a checkpoint and before reporting
    it leaves Ray Train one behind, or with none."""
    if on_disk is not None and (handed is None or disk_epoch > handed_epoch):
        why = "Ray Train handed over none" if handed is None else f"Ray Train's is older (epoch {handed_epoch})"
        return on_disk, f"the newest complete checkpoint in the run directory, epoch {disk_epoch} ({why})"
    if handed is not None:
        return handed, f"the checkpoint Ray Train handed over, epoch {handed_epoch}"
    return None, "no checkpoint: a new run"


def _restore(job: TrainJob, session: Session, parts) -> tuple[int, float | None, float]:
    """Load the newest checkpoint of this run (`restart_source`); log the choice on rank 0."""
    handed = session.restart_checkpoint()
    handed_epoch = load_checkpoint(handed).epoch if handed is not None else None
    on_disk = latest_checkpoint(Path(job.run_dir) / "checkpoints", run_id=None if job.resume else job.run_id)
    disk_epoch = int(on_disk.name.split("_")[1]) if on_disk is not None else None
    directory, why = restart_source(handed, handed_epoch, on_disk, disk_epoch)
    if directory is None:
        _initialise_new_run(job, session, parts)
        return 0, None, 0.0
    state = load_checkpoint(directory, map_location=session.device)
    parts.model.load_state_dict(state.model)
    if state.optimizer is not None:
        parts.optimizer.load_state_dict(state.optimizer)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    if session.rank == 0:
        print(f"train: resumed from {directory} after epoch {state.epoch}: {why}", flush=True)
    return state.epoch, state.best_metric, state.elapsed_seconds


def _initialise_new_run(job: TrainJob, session: Session, parts) -> None:
    """A new run with `train.init_from` starts from that model's weights (every rank loads the same)."""
    if job.cfg.train.init_from is None:
        return
    source = load_init_source(job.cfg.train.init_from, job.cfg)
    result = initialise_from(parts.model, source, job.cfg.train.init_from)
    if session.rank == 0:
        print(result.describe(), flush=True)


def _update_best(best: float | None, metrics: dict, cfg: PansegConfig) -> tuple[float | None, bool]:
    """The best validation score so far, and whether this epoch's model is the new best. On a tie the
    later model wins: it has trained longer (small validation sets tie often, e.g. when only the
    healthy cases score)."""
    value = metrics.get(selection_metric(cfg))
    if value is None:
        return best, False
    better = best is None or (value >= best if cfg.tune.mode == "max" else value <= best)
    return (value, True) if better else (best, False)


def _write_checkpoints(job: TrainJob, session: Session, parts, epochs_done: int, best: float | None,
                       is_best: bool, final: bool, elapsed_seconds: float = 0.0) -> Path | None:
    """Rank 0 writes checkpoints (all ranks return the directory so every rank reports it)."""
    run = Path(job.run_dir)
    directory = run / "checkpoints" / f"epoch_{epochs_done:04d}"
    if session.rank == 0:
        state = TrainingState(job.cfg, epochs_done, parts.model.state_dict(), parts.optimizer.state_dict(),
                              best, torch.get_rng_state(), elapsed_seconds, job.run_id)
        save_checkpoint(state, directory)
        _fault_drill(job, epochs_done)
        model_only = TrainingState(job.cfg, epochs_done, parts.model.state_dict(), None, best, None, elapsed_seconds,
                                   job.run_id)
        if is_best:
            save_checkpoint(model_only, run / "model_best")
        if final:
            save_checkpoint(model_only, run / "model_final")
        _prune_checkpoints(run / "checkpoints", keep=2)
    session.barrier()
    return directory if session.rank == 0 else None


def _fault_drill(job: TrainJob, epochs_done: int) -> None:
    """`TrainJob.drill_kill_after_epoch`: SIGKILL this process (rank 0) once, right after the checkpoint."""
    marker = Path(job.run_dir) / ".drill_killed"
    if job.drill_kill_after_epoch == epochs_done and not marker.exists():
        import signal

        marker.write_text(str(epochs_done))
        os.kill(os.getpid(), signal.SIGKILL)


def _prune_checkpoints(folder: Path, keep: int) -> None:
    import shutil

    complete = sorted(d for d in folder.glob("epoch_*") if d.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class _MetricsLog:
    """metrics.jsonl and metrics.csv in the run directory (and TensorBoard scalars when installed)."""

    def __init__(self, run_dir: str):
        self.run = Path(run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run / "tensorboard"))
        except ImportError:  # tensorboard is optional (the viz extra)
            pass

    def append(self, metrics: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        rows = read_metrics(self.run)
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
        tmp = self.run / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.run / "metrics.csv")
        if self.writer:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, metrics["epoch"])
            self.writer.flush()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl, one row per epoch in epoch order ([] before the first epoch). After a resume
    an epoch may be logged twice; the later entry wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


# ----------------------------------------------------------------------------------------------
# Drivers: the split, local debug mode, and Ray Train DDP
# ----------------------------------------------------------------------------------------------


def load_or_create_split(store: str, split_file: str | Path, val_fraction: float, seed: int) -> dict:
    """Train/val case ids: read `split_file`, or create it (seeded) from the store's complete labelled cases.

    Raises:
        ValueError: too few labelled cases, or the file names cases the store lacks.
    """
    from panseg.store.zarr_store import read_manifest

    ok = sorted(r["case_id"] for r in read_manifest(store) if r["status"] == "ok")
    path = Path(split_file)
    if path.is_file():
        split = json.loads(path.read_text())
        unknown = sorted((set(split.get("train", [])) | set(split.get("val", []))) - set(ok))
        if unknown or not split.get("train"):
            raise ValueError(f"split file {path} names cases that are not complete labelled cases of {store}: "
                             f"{unknown[:5]}; delete it to create a new split")
        return split
    if len(ok) < 2:
        raise ValueError(f"store {store} has {len(ok)} labelled case(s); training needs at least 2 (1 to validate)")
    split = seeded_split(ok, val_fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(split, indent=2))
    os.replace(tmp, path)
    return split


def seeded_split(case_ids: list[str], val_fraction: float, seed: int) -> dict:
    """{"seed", "val", "train"}: `val_fraction` of the (sorted) cases held out (at least 1, at most all
    but 1) by a permutation seeded with `seed`; the rest train."""
    ok = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ok))
    n_val = min(len(ok) - 1, max(1, round(len(ok) * val_fraction)))
    return {"seed": seed, "val": sorted(ok[i] for i in order[:n_val]), "train": sorted(ok[i] for i in order[n_val:])}


def make_job(cfg: PansegConfig, store: str, run_dir: str, split_file: str | None = None, resume: bool = False,
             stop_after_epochs: int | None = None) -> TrainJob:
    """Check the store against the config (and `train.init_from`'s network against it for a new run),
    write RUN/config.yaml, and fix the split."""
    from panseg.config import save_config

    cfg = resolve_config(cfg, store)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if resume and not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume: {run} holds no config.yaml, so there is no run to resume")
    if cfg.train.init_from is not None and not resume:
        load_init_source(cfg.train.init_from, cfg)  # another network is refused before any worker starts
    save_config(cfg, run / "config.yaml")
    split = load_or_create_split(store, split_file or run / "split.json", cfg.train.val_fraction, cfg.train.seed)
    return TrainJob(cfg, str(Path(store).resolve()) if "://" not in store else store, str(run.resolve()),
                    tuple(split["train"]), tuple(split["val"]), resume, stop_after_epochs, run_id=uuid.uuid4().hex)


def resolve_config(cfg: PansegConfig, store: str) -> PansegConfig:
    """`cfg` with the store's preprocessing, checked against the network before any worker starts.

    Raises:
        ValueError: a patch size the network cannot take.
    """
    from panseg.store.zarr_store import read_store_config

    store_cfg = read_store_config(store)
    if store_cfg != cfg.preprocess:
        cfg = _with_store_preprocessing(cfg, store_cfg)
    make_model(cfg)  # a patch the network cannot take fails here
    return cfg


def _with_store_preprocessing(cfg: PansegConfig, store_cfg) -> PansegConfig:
    """Training always uses the preprocessing the store was made with (it decides classes and spacing)."""
    from dataclasses import replace

    print(f"train: using the store's preprocessing config (task {store_cfg.task}, spacing "
          f"{store_cfg.target_spacing_zyx_mm}) instead of the preset's", flush=True)
    return replace(cfg, preprocess=store_cfg)


def train_local(job: TrainJob) -> Path:
    """Local debug mode: the loop in this process (no Ray), CPU or one GPU. Returns the run directory."""
    train_loop_per_worker(job.to_dict())
    return Path(job.run_dir)


def train_distributed(job: TrainJob, num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0,
                      max_failures: int = 2, address: str | None = None, callbacks: list | None = None,
                      follow_progress: bool = False) -> Path:
    """DDP over `num_workers` Ray Train workers (any number of nodes); restarts from the last checkpoint
    when a worker dies, up to `max_failures` times. `callbacks` go to Ray Train's RunConfig (a Tune
    trial passes `TuneReportCallback`). `follow_progress`: print rank 0's epoch lines from
    RUN/metrics.jsonl here, for a driver whose Ray does not forward worker output (log_to_driver=False).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=True)
    try:
        _check_cluster_fits(num_workers, use_gpu, cpus_per_worker)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=job.to_dict(),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, placement_strategy="SPREAD",
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name="ray_train", storage_path=str(Path(job.run_dir) / "ray"),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 callbacks=callbacks or None),
        )
        if follow_progress:
            with MetricsFollower(job.run_dir, job.cfg.train):
                trainer.fit()
        else:
            trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    return Path(job.run_dir)


def summarize_run(run_dir: str | Path) -> str:
    """A few lines on a finished run: epochs, last and best validation, where the models are."""
    run = Path(run_dir)
    rows = read_metrics(run)
    if not rows:
        return f"train: no epoch finished in {run}"
    last = rows[-1]
    vals = [r for r in rows if "val_tumor_dsc" in r or "val_organ_dsc" in r]
    lines = [f"train: {last['epoch']} epochs, last train loss {last['train_loss']:.4f}"]
    if vals:
        key = "val_tumor_dsc" if "val_tumor_dsc" in vals[-1] else "val_organ_dsc"
        lines.append(f"train: {key} by epoch: " + ", ".join(f"{r['epoch']}: {r[key]:.3f}" for r in vals))
    for name in ("model_best", "model_final"):
        if (run / name).is_dir():
            lines.append(f"train: {name}: {run / name}")
    return "\n".join(lines)


def _check_cluster_fits(num_workers: int, use_gpu: bool, cpus_per_worker: float) -> None:
    """Fail before training when the cluster can never hold the workers (Ray would wait forever)."""
    from panseg.cluster import require_resources

    worker = {"CPU": cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}
    require_resources([worker] * num_workers, "training worker",
                      "Use fewer --workers or a smaller --cpus-per-worker, drop --gpu, or add nodes.")


__all__ = ["RayTrainSession", "TrainJob", "load_or_create_split", "make_job", "make_session", "read_metrics",
           "resolve_config", "seeded_split", "summarize_run", "train_distributed", "train_local",
           "train_loop_per_worker"]
