"""`panseg predict --model <nnU-Net v2 model folder>`: the same Ray Data shell as `panseg.infer`, with the
model's own preprocessing and export (`panseg.inference.nnunet_*`).

Two stages, as for panseg checkpoints: `prepare_nnunet_row` tasks read a CT and preprocess it as the
model's plan says (transpose, crop to nonzero, normalise, resample; float32 leaves the task), and an
`NnunetActor` pool (one actor per GPU, or CPU actors) loads the folds once, runs the windows, exports
(logits resampled back, argmax, pasted, transposed back), writes `<case>.nii.gz` atomically and
measures the case. Resuming, stale masks, failed rows and predictions.csv are `panseg.infer`'s; the
model id hashes plans.json, dataset.json, every fold's checkpoint, the folds and the inference settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from panseg.config import InferConfig, from_dict, to_dict
from panseg.infer import (CSV_NAME, ActorPlan, CaseActor, output_path, plan_actors, plan_folder, predict_and_write,
                          prepare_case_row, prepare_memory_bytes, remove_stale_masks, write_csv_rows)
from panseg.inference.nnunet_model import fold_checkpoints, load_nnunet_model, read_plan
from panseg.inference.nnunet_predict import NNUNET_INFER, NnunetPredictor, lesion_labels
from panseg.inference.nnunet_preprocess import NnunetPrepared, preprocess
from panseg.inference.predictor import default_device
from panseg.io import Volume
from panseg.ray_shell import Progress, collect_rows, ray_session

_HASH_CHUNK = 2**20
_PREPARE_BYTES_PER_VOXEL = 24  # float32 copies (transposed, cropped, resampled) of a CT, and numpy temporaries


def nnunet_model_id(folder: str | Path, folds: Sequence[str | int] | None, infer: InferConfig) -> str:
    """sha256 of plans.json, dataset.json, each fold's checkpoint (in fold order) and the settings."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = [folder / "plans.json", folder / "dataset.json", *fold_checkpoints(folder, folds)]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    digest.update(json.dumps(to_dict(infer), sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def prepare_nnunet_row(row: dict, folder: str, configuration: str, threads: int = 1) -> dict:
    """Read and preprocess one case as the model's plan says (`infer.prepare_case_row`)."""

    def prepare(volume: Volume) -> tuple[dict[str, np.ndarray], dict]:
        prepared = preprocess(volume.array, volume.geometry, read_plan(folder, configuration), threads)
        return {"data": prepared.data}, prepared.metadata()

    return prepare_case_row(row, threads, {"data": np.zeros((1, 1, 1, 1), dtype=np.float32)}, prepare)


class NnunetActor(CaseActor):
    """Ray Data callable class: loads the model's folds once, then predicts one prepared case per call."""

    def __init__(self, folder: str, folds: list[str] | None, infer_json: str, threads: int = 1,
                 model_id: str | None = None) -> None:
        torch.set_num_threads(threads)
        infer = from_dict(InferConfig, json.loads(infer_json))
        self.predictor = NnunetPredictor(load_nnunet_model(folder, folds), infer, default_device(), threads)
        self.model_id = model_id
        super().__init__()

    def _predict_item(self, case_id: str, output: str, item: dict, meta: dict) -> dict:
        prepared = NnunetPrepared.from_metadata(np.array(item["data"], dtype=np.float32), meta)
        return predict_and_write(self.predictor, prepared, case_id, output, meta, self.model_id)[0]


def predict_nnunet_folder(model_folder: str | Path, input_dir: str | Path, output_dir: str | Path,
                          folds: Sequence[str | int] | None = None, address: str | None = None,
                          num_cpus: int | None = None, use_gpu: bool | None = None, progress: bool = True,
                          infer: InferConfig = NNUNET_INFER) -> list[dict]:
    """Predict every `<case>_0000.*` CT of `input_dir` with an nnU-Net v2 model folder (see `infer.predict_folder`).

    Args:
        model_folder: `<Trainer>__<Plans>__<configuration>/` with plans.json, dataset.json and fold_K/.
        folds: e.g. (0, 1, 2, 3, 4) or ('all',); None: every fold with a checkpoint.
        infer: inference settings (default `NNUNET_INFER`: nnU-Net's step 0.5 and mirroring).

    Returns:
        One row per case, sorted by case id; also written to output_dir/predictions.csv.

    Raises:
        NnunetModelError: the folder, its plans, labels or checkpoints cannot be run (checked before Ray starts).
        FileNotFoundError: input_dir holds no CT.
    """
    folds = [str(f) for f in folds] if folds is not None else None
    model = load_nnunet_model(model_folder, folds)  # fail fast: plans, network, weights, labels
    if not infer.all_labels:
        lesion_labels(model.plan.labels)
    folds = folds or [p.parent.name[5:] for p in model.checkpoints]
    current = nnunet_model_id(model_folder, folds, infer)
    rows, todo = plan_folder(input_dir, output_dir, CSV_NAME, current)
    remove_stale_masks(todo, output_dir)
    if todo:
        rows += _run(todo, Path(model_folder).resolve(), model.plan.configuration, folds, output_dir, infer,
                     current, address, num_cpus, use_gpu, progress)
    rows.sort(key=lambda r: r["case_id"])
    write_csv_rows(rows, Path(output_dir) / CSV_NAME)
    return rows


def _run(todo, folder: Path, configuration: str, folds: list[str], output_dir, infer: InferConfig, current: str,
         address, num_cpus, use_gpu, progress) -> list[dict]:
    import ray

    from panseg.cluster import cluster_capacity

    with ray_session(address, num_cpus):
        gpus = cluster_capacity().totals.get("GPU", 0.0)
        plan = plan_actors(ray.cluster_resources().get("CPU", 1.0), gpus, gpus >= 1 if use_gpu is None else use_gpu)
        if plan.gpus_per_actor:
            plan = ActorPlan(min(plan.actors, len(todo)), plan.cpus_per_actor, plan.gpus_per_actor,
                             plan.prepare_tasks, plan.cpus_per_prepare)
        items = [{"case_id": c.case_id, "image": os.path.abspath(c.image),
                  "output": str(output_path(Path(output_dir).resolve(), c.case_id))} for c in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        memory = prepare_memory_bytes(todo) * _PREPARE_BYTES_PER_VOXEL // 12  # infer's estimate is 12 B/voxel
        ds = ds.map(prepare_nnunet_row, fn_kwargs={"folder": str(folder), "configuration": configuration},
                    num_cpus=plan.cpus_per_prepare, memory=memory,
                    compute=ray.data.TaskPoolStrategy(size=plan.prepare_tasks))
        ds = ds.map_batches(NnunetActor, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus_per_actor,
                            num_gpus=plan.gpus_per_actor,
                            fn_constructor_kwargs={"folder": str(folder), "folds": folds,
                                                   "infer_json": json.dumps(to_dict(infer)),
                                                   "threads": max(1, math.floor(plan.cpus_per_actor)),
                                                   "model_id": current})
        return collect_rows(ds, Progress("predict", len(todo), enabled=progress))


__all__ = ["NnunetActor", "nnunet_model_id", "predict_nnunet_folder", "prepare_nnunet_row"]
