"""Cohort parts of `bench/preprocess.py`: Ray throughput with 1 and 2 CPUs, and the crop's size against
the released training code's HU > 0 box, on a realistic phantom cohort."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before Ray is imported (DESIGN.md, "Ray on these machines")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_phantom_cohort(raw: Path, cases: int, healthy: int, workers: int) -> dict:
    """A realistic (small=False) phantom cohort in the nnU-Net raw layout; returns its description."""
    from panseg.phantom.cohort import write_cohort

    summary = write_cohort(raw, cases=cases, healthy=healthy, seed=0, small=False, workers=workers)
    shapes = [c.shape_zyx for c in summary.cases]
    voxels = [z * y * x for z, y, x in shapes]
    return {"cases": len(shapes), "healthy": healthy, "seed": 0, "generation_s": summary.seconds,
            "shapes_zyx": [list(s) for s in shapes],
            "spacings_zyx_mm": [list(c.spacing_zyx_mm) for c in summary.cases],
            "kinds": [c.kind for c in summary.cases], "mean_megavoxels": round(statistics.mean(voxels) / 1e6, 1)}


def store_cohort(raw: Path, store: Path, cfg, workers: int) -> list[dict]:
    """Every valid case of `raw` preprocessed by `data_pipeline.process_one` (what Ray Data's actors run
    per case) in a spawn pool of `workers` (no Ray, no forked CUDA context) into a new store with its
    manifest; returns the manifest rows. Raises naming the first failed case."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from panseg.data_pipeline import process_one
    from panseg.io import discover_cohort
    from panseg.store.zarr_store import create_store, write_manifest

    create_store(store, cfg)
    cases = list(discover_cohort(raw).valid)
    with ProcessPoolExecutor(min(workers, len(cases)), mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(process_one, cases, [str(store)] * len(cases), [cfg] * len(cases)))
    write_manifest(store, rows)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} case(s) failed to preprocess, first: {failed[0]}")
    return rows


def start_cluster_actors() -> float:
    """Run a one-row Ray Data job on an actor pool, so Ray Data's per-cluster actors exist; seconds taken.

    Ray Data starts three named, detached actors the first time a cluster runs a dataset (its stats
    actor, autoscaling coordinator and actor location tracker) and keeps them for the cluster's life.
    Each is a new Python process importing Ray, ~1 CPU-second: on a fresh 2-CPU Ray they start beside
    the first cases and take that time from them, while with 1 CPU they run on the idle second core.
    A cluster that has run any dataset already has them, as a 10k-case job does after its first
    seconds, so `warm` runs start them before the clock.
    """
    import ray

    class Noop:  # defined here, so it travels by value: Ray's workers cannot import this bench module
        def __call__(self, row: dict) -> dict:
            return row

    start = time.perf_counter()
    ray.data.range(1).map(Noop, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0).take_all()
    return time.perf_counter() - start


def ray_throughput(raw: Path, store: Path, num_cpus: int, warm: bool = True) -> dict:
    """Preprocess the cohort into a fresh store on a local Ray of `num_cpus` CPUs; cases per minute.

    Ray is started before the clock (ray.init is not timed), and with `warm` Ray Data's per-cluster
    actors too (`start_cluster_actors`). Two rates: `span` runs from the first
    case's start to the last case's finish (finish = when the case's files were last written, start =
    finish - the manifest's per-case seconds), so it also leaves out Ray Data's planning, worker
    start-up and imports; `call` is the whole run_preprocessing call after ray.init.
    """
    import ray

    from panseg.config import PreprocessConfig
    from panseg.data_pipeline import run_preprocessing

    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - start
    try:
        warmup_s = start_cluster_actors() if warm else None
        start, call_start = time.perf_counter(), time.time()
        result = run_preprocessing(raw, store, PreprocessConfig(), progress=False)
        call_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    rows = [r for r in result.rows if r["status"] != "failed"]
    finished = {r["case_id"]: _finished_at(store / "cases" / r["case_id"]) for r in rows}
    first_start = min(finished[r["case_id"]] - r["seconds"] for r in rows)
    span_s = max(finished.values()) - first_start
    seconds = [r["seconds"] for r in rows]
    timeline = sorted((finished[r["case_id"]] - r["seconds"] - call_start, finished[r["case_id"]] - call_start)
                      for r in rows)
    return {
        "num_cpus": num_cpus, "cases_ok": len(rows), "cases_failed": result.num_failed,
        "ray_init_s": round(init_s, 2), "warm": warm,
        "cluster_actors_start_s": None if warmup_s is None else round(warmup_s, 2),
        "call_s": round(call_s, 2), "span_s": round(span_s, 2),
        "cases_per_min_span": round(len(rows) / span_s * 60, 2),
        "cases_per_min_call": round(len(rows) / call_s * 60, 2),
        "case_s_mean": round(statistics.mean(seconds), 2), "case_s_sum": round(sum(seconds), 1),
        "busy_fraction": round(sum(seconds) / (num_cpus * span_s), 3),  # of the CPUs' time over the span
        "case_s_min": round(min(seconds), 2), "case_s_max": round(max(seconds), 2),
        "first_case_start_after_call_s": round(timeline[0][0], 2),
        "timeline_s": [[round(a, 2), round(b, 2)] for a, b in timeline],  # (start, finish) after the call began
        "crop_boxes": {r["case_id"]: list(r["crop_box"]) for r in rows},
        "crop_reasons": {r["case_id"]: r["crop_reason"] for r in rows},
        "image_paths": {r["case_id"]: r["image_path"] for r in rows},
    }


def _finished_at(case_dir: Path) -> float:
    """Wall-clock time a stored case was completed: its last file write, or the rename that published it."""
    times = [case_dir.stat().st_ctime]
    for root, _, names in os.walk(case_dir):
        times += [os.stat(os.path.join(root, n)).st_mtime for n in names]
    return max(times)


def crop_ratio(image_path: str, crop_box: list[int]) -> dict:
    """Voxels of panseg's crop / voxels of the HU > 0 bounding box (crop.threshold_bbox(hu, 0))."""
    from panseg.io import read_volume
    from panseg.preprocessing.crop import Box, threshold_bbox

    hu = read_volume(image_path).array
    released = threshold_bbox(hu, 0)
    ours = Box.from_list(crop_box)
    return {"crop_voxels": ours.num_voxels, "hu0_box_voxels": released.num_voxels,
            "image_voxels": int(hu.size), "ratio": ours.num_voxels / released.num_voxels,
            "crop_box": crop_box, "hu0_box": released.to_list()}


def summarise_ratios(per_case: dict[str, dict]) -> dict:
    ratios = [c["ratio"] for c in per_case.values()]
    return {"n": len(ratios), "mean": round(statistics.mean(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "median": round(statistics.median(ratios), 3),
            "crop_over_image_mean": round(statistics.mean(c["crop_voxels"] / c["image_voxels"]
                                                          for c in per_case.values()), 3),
            "hu0_box_over_image_mean": round(statistics.mean(c["hu0_box_voxels"] / c["image_voxels"]
                                                             for c in per_case.values()), 3),
            "per_case": {k: round(c["ratio"], 3) for k, c in per_case.items()}}


__all__ = ["crop_ratio", "ray_throughput", "summarise_ratios", "write_phantom_cohort"]
