"""`panseg predict` over a folder: CTs stream through Ray Data, a model loaded once per actor.

Two stages, so reading and preprocessing the next case overlaps the prediction of the current one:

1. `prepare` (Ray tasks, 1 CPU each (half of one on a one-CPU Ray), memory reserved from the image headers): read the CT, crop,
   resample, clip (`inference.predictor.prepare_volume`); only numpy and plain values leave the task.
2. `PredictorActor` (a callable-class actor pool, `batch_size=1`, one actor per GPU, or one CPU actor
   with most of the CPUs): scale, sliding windows, argmax, paste back into the original grid, write
   `<case>.nii.gz` atomically, measure the case (peak RSS, GPU peak and memory-time area).

A case whose output exists is skipped when the same model wrote it, so a rerun resumes (a killed
one too); a mask from any other model (another checkpoint, other inference settings, or no record
of who wrote it) is deleted and predicted again. Which model wrote a mask (`model_id`: a hash of the
checkpoint file and the inference settings) is in the mask's own header, written with it
atomically, and in its row of predictions.csv. A bad case (unreadable, not 3D) becomes
a `failed` row naming the case; the others go on. Every case gets a row in `predictions.csv`.
Outputs are written by the actors, so on a multi-node cluster `output_dir` must be a shared path.
`plan_folder` (what is skipped, what is to do) and `run_cases` (the two stages, with an optional
per-mask `summarize` hook) are shared with `panseg pseudolabel` (panseg.pseudolabel).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from panseg.config import InferConfig, PreprocessConfig, from_dict, to_dict
from panseg.inference.predictor import PreparedCase, load_predictor, prediction_row, prepare_volume
from panseg.inference.resource_monitor import CaseUsage, peak_rss_mb, reset_peak_rss
from panseg.io import (CaseFiles, ImageReadError, Volume, discover_cohort, read_geometry, read_notes, read_volume,
                       write_volume)
from panseg.preprocessing.case import CaseError, warn_body_loss
from panseg.ray_shell import Progress, collect_rows, ray_session
from panseg.training.checkpoint import load_checkpoint, resolve_checkpoint_file

OUTPUT_SUFFIX = ".nii.gz"
CSV_NAME = "predictions.csv"
CSV_COLUMNS = (
    "case_id", "status", "error", "output", "seconds", "prepare_s", "predict_s", "wait_s", "read_s", "crop_s",
    "resample_s",
    "clip_s", "network_s", "restore_s", "write_s", "peak_rss_mb", "gpu_peak_mb", "gpu_area_mb_s",
    "gpu_memory_source", "crop_reason", "crop_box_zyx", "crop_body_lost_fraction", "original_shape_zyx",
    "resampled_shape_zyx", "model_id",
)
_HASH_CHUNK = 2**20
_NOTES_PREFIX = "panseg model "
_MAX_CPUS_PER_ACTOR = 8  # a CPU U-Net gains little from more threads than this
# Cases in preparation per GPU actor: a 300-slice CT's CPU side (~0.8 s on one core) against the H200's
# ~0.30 s network needs ~3 at once; 4 leaves room for larger cases (`plan_actors`).
_PREPARE_TASKS_PER_GPU_ACTOR = 4
_PREPARE_TASKS_PER_CPU_ACTOR = 2  # on CPU the network (tens of seconds a case) is the slow stage
# Memory of a prepare task: the worker process itself (Python, numpy, torch, SimpleITK: ~300 MB RSS),
# plus per input voxel the stored CT, float32 resampling passes and the int16 result (as data_pipeline's
# estimate for training preprocessing, which does the same steps).
_PREPARE_BYTES_PER_VOXEL = 12
_PREPARE_BASE_MEMORY = 512 * 2**20
_HEADER_SAMPLE = 64
Summarize = Callable[[Volume], dict]  # a written mask -> extra row values (e.g. organ volumes)


@dataclass(frozen=True)
class ActorPlan:
    """How the stages share a cluster: actors (count, CPUs, GPUs each) and concurrent prepare tasks
    (CPUs each), which together never ask for more CPUs than the cluster has."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    prepare_tasks: int
    cpus_per_prepare: float = 1.0


def plan_actors(total_cpus: float, total_gpus: float, use_gpu: bool) -> ActorPlan:
    """One actor per GPU (1 CPU each); on CPU, actors of up to 8 CPUs. Either way CPUs are left for the
    prepare tasks, so reading never waits for CPUs the actors hold: on a one-CPU Ray the actor and one
    prepare task get half a CPU each (Ray's CPUs are reservations; both run, sharing the core).

    Prepare tasks are capped at `_PREPARE_TASKS_PER_GPU_ACTOR` per GPU actor and
    `_PREPARE_TASKS_PER_CPU_ACTOR` per CPU actor (at least 1), so at most a few cases wait in memory. A
    GPU predicts a case in a fraction of the CPU seconds its reading, crop and resampling take
    (BENCHMARKS.md: 0.30 s on an H200 against 0.5-0.8 s on one core), so it needs several cases in
    preparation at once to be the bottleneck.
    """
    if total_cpus <= 0:
        raise ValueError("the Ray cluster has no CPU: prediction needs at least part of one for reading cases")
    cpus = float(int(total_cpus)) if total_cpus >= 1 else float(total_cpus)
    if use_gpu:
        if total_gpus < 1:
            raise ValueError(f"use_gpu needs a GPU in the Ray cluster, but it has {total_gpus:g}")
        actors, gpus = int(total_gpus), 1.0
        per_actor = min(1.0, cpus / (actors + 1))
    elif cpus >= 2:
        per_actor = float(max(1, min(_MAX_CPUS_PER_ACTOR, int(cpus) // 2)))
        actors, gpus = max(1, int((cpus - 1) // per_actor)), 0.0
    else:
        per_actor, actors, gpus = cpus / 2, 1, 0.0
    free = cpus - actors * per_actor
    per_prepare = round(min(1.0, free), 3)
    per_actor_tasks = _PREPARE_TASKS_PER_GPU_ACTOR if use_gpu else _PREPARE_TASKS_PER_CPU_ACTOR
    tasks = max(1, min(int(free / per_prepare + 1e-9), per_actor_tasks * actors, int(cpus) or 1))
    return ActorPlan(actors, per_actor, gpus, tasks, per_prepare)


# ----------------------------------------------------------------------------------------------
# Stage 1: prepare (a Ray task per case)
# ----------------------------------------------------------------------------------------------


def prepare_memory_bytes(cases: list[CaseFiles], sample: int = _HEADER_SAMPLE) -> int:
    """Memory to reserve per prepare task, from the largest of a spread sample of image headers."""
    largest = 0
    for case in cases[:: max(1, len(cases) // sample)][:sample]:
        try:
            largest = max(largest, int(np.prod(read_geometry(case.image).shape_zyx)))
        except (ImageReadError, RuntimeError, OSError):
            continue  # the case's own task reports it
    return _PREPARE_BASE_MEMORY + int(largest * _PREPARE_BYTES_PER_VOXEL * 1.25)


def prepare_case_row(row: dict, threads: int, placeholders: dict[str, np.ndarray],
                     prepare: Callable[[Volume], tuple[dict[str, np.ndarray], dict]]) -> dict:
    """Read one case and `prepare` it (arrays for the batch, metadata with per-phase `seconds`); a bad case
    comes back with `error` set and `placeholders` as its arrays (never raises). What every model kind's
    prepare stage shares: the read, its time, the peak memory and the errors."""
    start = time.perf_counter()
    reset_peak_rss()
    out = {"case_id": row["case_id"], "output": row["output"], "error": "", "meta_json": "{}", **placeholders}
    try:
        volume = read_volume(row["image"], threads=threads)
        read_s = time.perf_counter() - start
        arrays, meta = prepare(volume)
        del volume
        meta["seconds"] = {"read": read_s, **meta["seconds"]}
        meta["prepare_s"] = time.perf_counter() - start
        meta["prepare_rss_mb"] = peak_rss_mb()
        out.update(arrays, meta_json=json.dumps(meta))
    except (ImageReadError, ValueError) as err:
        out["error"] = str(CaseError(row["case_id"], str(err)))
    except Exception as err:  # one unexpected failure must not stop the folder
        out["error"] = f"case {row['case_id']}: unexpected {type(err).__name__}: {err}"
    return out


def prepare_row(row: dict, preprocess_json: str, threads: int = 1) -> dict:
    """Read and preprocess one case for a panseg model (`prepare_case_row`)."""
    cfg = from_dict(PreprocessConfig, json.loads(preprocess_json))

    def prepare(volume: Volume) -> tuple[dict[str, np.ndarray], dict]:
        prepared = prepare_volume(volume, cfg, threads)
        warn_body_loss(row["case_id"], prepared.body_lost_fraction, cfg.body_lost_warn_fraction)
        return {"image": prepared.image_hu}, prepared.metadata()

    return prepare_case_row(row, threads, {"image": np.zeros((1, 1, 1), dtype=np.int16)}, prepare)


# ----------------------------------------------------------------------------------------------
# Stage 2: predict (an actor pool)
# ----------------------------------------------------------------------------------------------


class CaseActor:
    """What every Ray Data predictor actor shares: one row per prepared case, the time it waited for that
    case (`wait_s`, idle since its last case or since the model loaded), and a failed row, never an
    exception, for a case that failed to prepare or to predict. A subclass loads its model in
    `__init__` (as `self.predictor`, anything with a `device`), then calls `super().__init__()`, and
    predicts in `_predict_item`."""

    def __init__(self) -> None:
        self._idle_since = time.perf_counter()  # the model is loaded: from now on the actor waits for input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i in range(len(batch["case_id"])):
            wait_s = time.perf_counter() - self._idle_since  # idle since its last case (or since loading)
            row = self._predict_one({key: batch[key][i] for key in batch})
            row["wait_s"] = round(wait_s, 3)
            rows.append(row)
            self._idle_since = time.perf_counter()
        return {"row_json": np.array([json.dumps(r) for r in rows], dtype=object)}

    def _predict_one(self, item: dict) -> dict:
        case_id, error = str(item["case_id"]), str(item["error"])
        if error:
            return failed_row(case_id, error)
        try:
            return self._predict_item(case_id, str(item["output"]), item, json.loads(str(item["meta_json"])))
        except Exception as err:  # e.g. out of memory on one huge case: record it, go on
            if self.predictor.device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed case held must not starve the next one
            return failed_row(case_id, f"case {case_id}: prediction failed: {type(err).__name__}: {err}")

    def _predict_item(self, case_id: str, output: str, item: dict, meta: dict) -> dict:
        """Predict one prepared case (`item` holds its arrays) and write its mask; the CSV row."""
        raise NotImplementedError


class PredictorActor(CaseActor):
    """Ray Data callable class: loads the model once, then predicts one prepared case per call."""

    def __init__(self, model_path: str, infer_json: str | None = None, threads: int = 1,
                 summarize: Summarize | None = None, model_id: str | None = None) -> None:
        infer = from_dict(InferConfig, json.loads(infer_json)) if infer_json else None
        self.predictor = load_predictor(model_path, infer=infer, threads=threads)
        self.summarize = summarize
        self.model_id = model_id  # into each mask's header and row (see `reusable`)
        super().__init__()

    def _predict_item(self, case_id: str, output: str, item: dict, meta: dict) -> dict:
        prepared = PreparedCase.from_metadata(np.asarray(item["image"]), meta)
        row, prediction = predict_and_write(self.predictor, prepared, case_id, output, meta, self.model_id)
        if self.summarize is not None:
            row.update(self.summarize(prediction.volume))
        return row


def predict_and_write(predictor, prepared, case_id: str, output: str, meta: dict, model_id: str | None):
    """Predict a prepared case with any predictor that has `device` and `predict_prepared` (panseg's or an
    nnU-Net model's), write its mask with `model_id` in the header, and return (the per-case CSV row with
    the prepare, predict and write seconds and the peak memory of both stages, the prediction)."""
    with CaseUsage(predictor.device) as usage:
        prediction = predictor.predict_prepared(prepared)
        t0 = time.perf_counter()
        write_volume(prediction.volume, output, notes=mask_notes(model_id) if model_id else None)
        write_s = time.perf_counter() - t0
    report = usage.report.as_row()
    report["peak_rss_mb"] = max(report["peak_rss_mb"], round(meta.get("prepare_rss_mb", 0.0), 3))
    row = prediction_row(case_id, output, prediction, {**prediction.seconds, "write": write_s}, report)
    row.update(prepare_s=round(meta["prepare_s"], 3), predict_s=report["seconds"],
               seconds=round(meta["prepare_s"] + report["seconds"], 3), model_id=model_id)
    return row, prediction


# ----------------------------------------------------------------------------------------------
# Rows and the CSV
# ----------------------------------------------------------------------------------------------


def failed_row(case_id: str, error: str) -> dict:
    return {"case_id": case_id, "status": "failed", "error": error}


def output_path(output_dir: str | Path, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}{OUTPUT_SUFFIX}"


def read_csv_rows(path: str | Path) -> dict[str, dict]:
    """Rows of an earlier predictions.csv by case id, cells parsed back to values (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["case_id"]: {k: (v if k == "case_id" else _parse_cell(v)) for k, v in r.items()}
                for r in csv.DictReader(f)}


def write_csv_rows(rows: list[dict], path: str | Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Write predictions.csv (or another per-case CSV with `columns`) atomically; lists become JSON
    text, None an empty cell."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    os.replace(tmp, path)
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _parse_cell(text: str):
    """The inverse of `_cell`: '' -> None, numbers and JSON lists -> values, other text as it is."""
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def model_id(checkpoint_file: str | Path, infer: InferConfig) -> str:
    """Which model writes a mask: sha256 of the checkpoint file's bytes and of the inference settings.

    Two runs share it only when the same weights predict with the same settings (mirroring, step,
    all_labels, ...); the checkpoint's path and time do not enter, so a copied run keeps its masks.
    """
    digest = hashlib.sha256()
    with open(checkpoint_file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    digest.update(json.dumps(to_dict(infer), sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def reusable(written_by: str | None, current_model_id: str | None) -> bool:
    """Whether an existing mask can stand: `written_by` (its header's model id) is this model's.

    A mask from another model, or with no model id (written before ids were recorded, or by hand), is
    redone. `current_model_id` None (a caller that does not track models) trusts any existing mask.
    """
    return current_model_id is None or written_by == current_model_id


def mask_notes(current_model_id: str) -> str:
    """What a mask's header says about the model that wrote it (NIfTI `descrip`, at most 80 characters)."""
    return f"{_NOTES_PREFIX}{current_model_id}"


def mask_model_id(path: str | Path) -> str | None:
    """The model id in an existing mask's header (reads the header only), None when it has none."""
    notes = read_notes(path)
    return notes[len(_NOTES_PREFIX):] if notes and notes.startswith(_NOTES_PREFIX) else None


def _skipped_row(case_id: str, output: Path, earlier: dict | None, written_by: str | None = None) -> dict:
    """The row of a case whose output exists: the earlier run's measurements, status 'skipped'."""
    row = dict(earlier) if earlier and earlier.get("status") in ("ok", "skipped") else {"case_id": case_id}
    row.update(status="skipped", error="", output=str(output))
    if written_by is not None:
        row["model_id"] = written_by
    return row


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def predict_folder(model_path: str | Path, input_dir: str | Path, output_dir: str | Path, address: str | None = None,
                   num_cpus: int | None = None, use_gpu: bool | None = None, progress: bool = True,
                   infer: InferConfig | None = None) -> list[dict]:
    """Predict every `<case>_0000.*` CT of `input_dir` into `output_dir/<case>.nii.gz` with Ray Data.

    Args:
        model_path: a checkpoint file, checkpoint directory or run directory.
        input_dir: folder of CTs named `<case>_0000.<nii.gz|nii|mha|nrrd>` (or DICOM folders so named).
        output_dir: where masks and predictions.csv go (created; a shared path on a multi-node cluster).
        address: Ray address ('auto' on a cluster); None joins RAY_ADDRESS or starts a local Ray.
        num_cpus: CPUs of a local Ray started here.
        use_gpu: one actor per GPU; None uses GPUs when the cluster has any.
        progress: a progress line on stderr.
        infer: an `InferConfig` replacing the checkpoint's inference settings.

    Returns:
        One row per case, sorted by case id: status 'ok', 'skipped' (output existed) or 'failed' (error
        names the case); also written to output_dir/predictions.csv.

    Raises:
        CheckpointError: the model is not a panseg checkpoint (checked before Ray starts).
        FileNotFoundError: input_dir holds no CT.
    """
    checkpoint = resolve_checkpoint_file(model_path)  # the file hashed is the file the actors load
    cfg = load_checkpoint(checkpoint).cfg  # fail fast on a bad checkpoint; the read stage needs its preprocessing
    current = model_id(checkpoint, infer if infer is not None else cfg.infer)
    rows, todo = plan_folder(input_dir, output_dir, CSV_NAME, current)
    remove_stale_masks(todo, output_dir)
    infer_json = json.dumps(to_dict(infer)) if infer is not None else None
    rows += run_cases(todo, checkpoint, output_dir, cfg.preprocess, infer_json, address=address, num_cpus=num_cpus,
                      use_gpu=use_gpu, progress=progress, model_id=current)
    rows.sort(key=lambda r: r["case_id"])
    write_csv_rows(rows, Path(output_dir) / CSV_NAME)
    return rows


def plan_folder(input_dir: str | Path, output_dir: str | Path, csv_name: str,
                current_model_id: str | None = None) -> tuple[list[dict], list[CaseFiles]]:
    """What a folder run still has to do: rows of the cases that need no work (invalid ids: 'failed';
    an output already there from this model (`reusable`, from its header): 'skipped', with the
    measurements of the earlier run's row in `csv_name`) and the cases to predict, those whose mask
    another model wrote included. Creates `output_dir`.

    Raises:
        FileNotFoundError: input_dir holds no CT.
    """
    cohort = discover_cohort(input_dir, images_dir=input_dir)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = read_csv_rows(out_dir / csv_name)
    rows = [failed_row(c.case_id, c.error) for c in cohort.invalid]
    todo: list[CaseFiles] = []
    for case in cohort.valid:
        target = output_path(out_dir, case.case_id)
        written_by = _written_by(target, current_model_id) if target.exists() else None
        if target.exists() and reusable(written_by, current_model_id):
            rows.append(_skipped_row(case.case_id, target, earlier.get(case.case_id), written_by))
        else:
            todo.append(case)
    return rows, todo


def _written_by(mask: Path, current_model_id: str | None) -> str | None:
    if current_model_id is None:
        return None  # not tracked: no need to read the header
    try:
        return mask_model_id(mask)
    except ImageReadError:  # an unreadable mask is nobody's: predicted again
        return None


def remove_stale_masks(todo: list[CaseFiles], output_dir: str | Path) -> list[Path]:
    """Delete the masks of cases about to be predicted again (another model's): should a case now fail,
    no other model's mask may stand in the folder as if this run had written it. Returns those removed."""
    stale = [output_path(output_dir, case.case_id) for case in todo]
    stale = [path for path in stale if path.exists()]
    for path in stale:
        path.unlink()
    return stale


def run_cases(todo: list[CaseFiles], model_path: str | Path, output_dir: str | Path, pcfg: PreprocessConfig,
              infer_json: str | None, *, address: str | None = None, num_cpus: int | None = None,
              use_gpu: bool | None = None, progress: bool = True, summarize: Summarize | None = None,
              stage: str = "predict", model_id: str | None = None) -> list[dict]:
    """Predict `todo` into `output_dir/<case>.nii.gz` through Ray Data (nothing starts when it is empty).

    Args:
        model_id: written into each mask's header and its row (`reusable` compares it on the next run).
        summarize: a module-level function `Volume -> dict` run by the actor on each written mask;
            its keys join the case's row (pseudolabel's organ volumes).
        stage: the name on the progress line.

    Returns:
        One row per case of `todo`, in completion order.
    """
    if not todo:
        return []
    import ray

    from panseg.cluster import cluster_capacity

    out_dir = Path(output_dir)
    with ray_session(address, num_cpus):
        resources = ray.cluster_resources()
        # GPUs the cluster has or its autoscaler can add (GPU nodes of an autoscaled cluster start at 0).
        gpus = cluster_capacity().totals.get("GPU", 0.0)
        plan = plan_actors(resources.get("CPU", 1.0), gpus, gpus >= 1 if use_gpu is None else use_gpu)
        if plan.gpus_per_actor:
            plan = replace(plan, actors=min(plan.actors, len(todo)))  # never hold more GPUs than cases
        ds = _build_dataset(todo, str(Path(model_path).resolve()), out_dir, pcfg, infer_json, plan, summarize,
                            model_id)
        return collect_rows(ds, Progress(stage, len(todo), enabled=progress))


def _build_dataset(todo: list[CaseFiles], model_path: str, out_dir: Path, pcfg: PreprocessConfig,
                   infer_json: str | None, plan: ActorPlan, summarize: Summarize | None = None,
                   model_id: str | None = None):
    import ray

    items = [{"case_id": c.case_id, "image": os.path.abspath(c.image),
              "output": str(output_path(out_dir.resolve(), c.case_id))} for c in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one case per block
    # The reserved memory also keeps this stage from being fused into the actor stage (different remote
    # args), so reading the next case overlaps predicting the current one.
    ds = ds.map(prepare_row, fn_kwargs={"preprocess_json": json.dumps(to_dict(pcfg)), "threads": 1},
                num_cpus=plan.cpus_per_prepare, memory=prepare_memory_bytes(todo),
                compute=ray.data.TaskPoolStrategy(size=plan.prepare_tasks))
    threads = max(1, math.floor(plan.cpus_per_actor))
    # `compute=ActorPoolStrategy(size=n)` is Ray >= 2.51's spelling of `concurrency=n`.
    return ds.map_batches(PredictorActor, batch_size=1, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=plan.actors),
                          num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
                          fn_constructor_kwargs={"model_path": model_path, "infer_json": infer_json,
                                                 "threads": threads, "summarize": summarize,
                                                 "model_id": model_id})


__all__ = ["ActorPlan", "CSV_COLUMNS", "CSV_NAME", "CaseActor", "PredictorActor", "mask_model_id", "mask_notes",
           "model_id", "output_path", "plan_actors", "plan_folder", "predict_and_write", "predict_folder",
           "prepare_case_row", "prepare_row", "read_csv_rows", "remove_stale_masks", "reusable", "run_cases",
           "write_csv_rows"]
