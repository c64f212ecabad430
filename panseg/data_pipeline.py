"""`panseg preprocess`: the paper's preprocessing over a whole cohort with Ray Data, into a Zarr store.

A thin Ray shell around `preprocessing.case.preprocess_case` and `store.write_case`:
- cases stream through one Ray Data `map` onto a pool of `CaseWriter` actors; only file paths travel
  through Ray, each actor reads its case's CT, preprocesses it, writes it to the store, and returns a
  small manifest row;
- each actor asks Ray for the memory a case of this cohort needs (estimated from image headers), so
  Ray never holds more volumes at once than memory allows, and for CPUs in proportion: 1, or as many
  as that memory would leave idle on the cluster's nodes, used as threads (`task_cpus`); a
  10k-case cohort is never materialised;
- each actor has its next case queued while it works on one, so it starts that case the moment the
  last one is written: with every core busy, tasks launched one by one by the driver waited for it
  ~0.2 s between cases (bench/preprocess.py);
- an actor no node can ever hold fails the job at once with what is missing (`panseg.cluster`);
- a case becomes visible in the store only when complete, so a rerun skips completed cases and
  redoes only what is missing; one bad case becomes a `failed` manifest row and the rest go on.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from panseg.config import PreprocessConfig, from_dict, to_dict
from panseg.io import CaseFiles, ImageReadError, discover_cohort, read_geometry
from panseg.preprocessing.case import CaseError, preprocess_case
from panseg.ray_shell import Progress, collect_rows, ray_session
from panseg.store.zarr_store import (
    case_manifest_row,
    create_store,
    failed_row,
    list_complete_cases,
    write_case,
    write_manifest,
)

# Peak memory of one case relative to its voxel count: the int16 input, a float32 working copy and the
# resampled float32 image, plus labels (measured in bench/preprocess.py).
BYTES_PER_INPUT_VOXEL = 12
MIN_TASK_MEMORY = 256 * 2**20
HEADER_SAMPLE = 64
# glibc returns each case's freed arrays to the kernel and page-faults them back for the next case:
# ~125k faults and 0.5-1 s of system time per 300x512x512 case on a warm worker (measured here). With
# big allocations kept on the heap and never trimmed, a worker reuses its memory from case to case
# (the task's memory reservation already covers that peak) and the faults go to ~0.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**33)}
ACTOR_START_TIMEOUT_S = 600  # the initial actors fit the resources free at the start; this is a guard


@dataclass(frozen=True)
class PreprocessResult:
    store: str
    rows: tuple[dict, ...]
    skipped: int  # complete in the store before this run
    seconds: float
    body_lost_warn_fraction: float = 0.05  # the config's: cases whose crop leaves out more are named

    @property
    def num_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def num_unlabelled(self) -> int:
        return sum(r["status"] == "unlabelled" for r in self.rows)

    @property
    def num_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)


def task_memory_bytes(cases: list[CaseFiles], sample: int = HEADER_SAMPLE) -> int:
    """Memory to reserve per preprocessing task: the largest sampled case's voxels times the bytes a voxel costs.

    Headers are read (not voxels) for an evenly spread sample of cases; unreadable headers are
    skipped here and reported by the case's own task.
    """
    step = max(1, len(cases) // sample)
    largest = 0
    for case in cases[::step][:sample]:
        try:
            shape = read_geometry(case.image).shape_zyx
        except (ImageReadError, RuntimeError, OSError):
            continue
        largest = max(largest, shape[0] * shape[1] * shape[2])
    return max(MIN_TASK_MEMORY, int(largest * BYTES_PER_INPUT_VOXEL * 1.25))


def task_cpus(memory_bytes: int, memory_per_cpu: float, max_cpus: int = 8) -> int:
    """CPUs for a task that reserves `memory_bytes`: 1, or the CPUs its memory would otherwise leave idle.

    A node with `memory_per_cpu` bytes per CPU runs at most memory / task_memory tasks at once; when a
    case is so large that this is fewer tasks than CPUs, the spare CPUs go to the task as threads
    (SimpleITK resampling scales with them) instead of idling. Capped at `max_cpus`.
    """
    if memory_per_cpu <= 0:
        return 1
    return int(min(max(1, math.ceil(memory_bytes / memory_per_cpu - 1e-9)), max_cpus))


def process_one(case: CaseFiles, store_path: str, cfg: PreprocessConfig, threads: int = 1) -> dict:
    """Preprocess one case into the store and return its manifest row; never raises for a bad case."""
    start = time.perf_counter()
    node = _node_name()
    try:
        result = preprocess_case(case, cfg, threads=threads)
        nbytes = write_case(store_path, result)
        return case_manifest_row(result, nbytes=nbytes, seconds=time.perf_counter() - start, node=node)
    except CaseError as err:
        return failed_row(case, str(err), seconds=time.perf_counter() - start, node=node)
    except Exception as err:  # an unexpected failure of one case must not stop the cohort
        message = f"case {case.case_id}: unexpected {type(err).__name__}: {err}"
        return failed_row(case, message, seconds=time.perf_counter() - start, node=node)


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray, or Ray half-started: the host name is still informative
        pass
    return socket.gethostname()


class CaseWriter:
    """The Ray Data actor: a row of file paths in, the case written to the store, a manifest row (as JSON) out."""

    def __init__(self, store_path: str, cfg_json: str, threads: int) -> None:
        self.store_path, self.threads = store_path, threads
        self.cfg = from_dict(PreprocessConfig, json.loads(cfg_json))

    def __call__(self, row: dict) -> dict:
        return {"row_json": json.dumps(process_one(CaseFiles(**row), self.store_path, self.cfg, self.threads))}


def actor_pool_sizes(cases: int, task: dict[str, float], now: dict[str, float], most: dict[str, float]
                     ) -> tuple[int, int]:
    """(initial, largest) number of preprocessing actors: as many as the cluster's resources hold now,
    and as it can grow to, of `task` each (resource name -> amount), never more than there are cases."""

    def fit(resources: dict[str, float]) -> int:
        return int(min(resources.get(name, 0.0) // need for name, need in task.items() if need > 0))

    largest = max(1, min(cases, fit(most)))
    return max(1, min(largest, fit(now))), largest


def run_preprocessing(
    raw_dir: str | Path,
    store_path: str | Path,
    cfg: PreprocessConfig,
    organs_dir: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
) -> PreprocessResult:
    """Preprocess every case of a raw cohort into `store_path`, in parallel with Ray Data.

    Args:
        raw_dir: the raw cohort (imagesTr/, labelsTr/, optional organsTr/).
        store_path: the Zarr store; created if missing, resumed if present.
        cfg: preprocessing config (must equal the store's if the store exists).
        organs_dir: organ pseudo-label folder (default RAW/organsTr).
        address: Ray cluster address ('auto' on a cluster); None uses RAY_ADDRESS or a local Ray.
        num_cpus: CPUs of a local Ray (ignored with an address).
        progress: print a progress line (cases done, failed, rate).

    Returns:
        The manifest rows of every case (this run's and those complete before it).
    """
    start = time.perf_counter()
    store_path = str(store_path)
    cohort = discover_cohort(raw_dir, organs_dir)
    create_store(store_path, cfg)
    complete = set(list_complete_cases(store_path))
    todo = [c for c in cohort.valid if c.case_id not in complete]
    rows = [failed_row(c, c.error) for c in cohort.invalid]
    rows += _rows_of_complete(store_path, [c for c in cohort.valid if c.case_id in complete])
    if todo:
        rows += _run_ray(todo, store_path, cfg, address, num_cpus, progress)
    rows.sort(key=lambda r: r["case_id"])
    write_manifest(store_path, rows)
    return PreprocessResult(store_path, tuple(rows), skipped=len(complete), seconds=time.perf_counter() - start,
                            body_lost_warn_fraction=cfg.body_lost_warn_fraction)


def _rows_of_complete(store_path: str, cases: list[CaseFiles]) -> list[dict]:
    from panseg.store.zarr_store import read_case_manifest_row

    return [read_case_manifest_row(store_path, c.case_id) for c in cases]


def _run_ray(todo: list[CaseFiles], store_path: str, cfg: PreprocessConfig, address: str | None,
             num_cpus: int | None, progress: bool) -> list[dict]:
    import ray

    from panseg.cluster import cluster_capacity, require_resources

    with ray_session(address, num_cpus):
        memory = task_memory_bytes(todo)
        capacity = cluster_capacity()  # the nodes, and those an autoscaler may add
        largest_node_cpus = max((shape.get("CPU", 0.0) for shape in capacity.node_shapes), default=1.0)
        cpus = task_cpus(memory, _memory_per_cpu(capacity.totals), max_cpus=max(1, min(8, int(largest_node_cpus))))
        require_resources([{"CPU": cpus, "memory": memory}], "preprocessing task",
                          "The largest case of this cohort needs that much on one node: add a node with more "
                          "memory, or preprocess the largest cases separately.", capacity)
        kwargs = {"store_path": os.path.abspath(store_path) if "://" not in store_path else store_path,
                  "cfg_json": json.dumps(to_dict(cfg)), "threads": cpus}
        initial, largest = actor_pool_sizes(len(todo), {"CPU": cpus, "memory": memory},
                                            ray.available_resources(), capacity.totals)
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=largest, initial_size=initial,
                                          max_tasks_in_flight_per_actor=2)
        # One case per block, so cases are handed out one by one across every node.
        ds = ray.data.from_items([asdict(c) for c in todo], override_num_blocks=len(todo))
        ds = ds.map(CaseWriter, fn_constructor_kwargs=kwargs, compute=pool, num_cpus=cpus, memory=memory,
                    runtime_env={"env_vars": WORKER_ENV})
        # Start handing out cases once the initial actors are up, not to the first one alone: one actor
        # would otherwise take a small cohort while the others still start (slower on another node).
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        return collect_rows(ds, Progress("preprocess", len(todo), enabled=progress))


def _memory_per_cpu(resources: dict) -> float:
    cpus = resources.get("CPU", 0.0)
    return resources.get("memory", 0.0) / cpus if cpus else 0.0


def format_summary(result: PreprocessResult) -> str:
    """The table printed at the end of `panseg preprocess`."""
    lines = [
        f"store: {result.store}",
        f"cases: {len(result.rows)}  ok: {result.num_ok}  unlabelled: {result.num_unlabelled}  "
        f"failed: {result.num_failed}  (already complete before this run: {result.skipped}; {result.seconds:.1f} s)",
    ]
    fallbacks = [r for r in result.rows if r.get("crop_reason") == "body_fallback"]
    if fallbacks:
        lines.append(f"crop fell back to the body box in {len(fallbacks)} case(s), as expected for non-contrast "
                     f"scans (their organs barely pass the crop threshold, so the body is kept whole): "
                     + ", ".join(r["case_id"] for r in fallbacks[:10]) + (", ..." if len(fallbacks) > 10 else ""))
    lossy = [r for r in result.rows if (r.get("crop_body_lost_fraction") or 0.0) > result.body_lost_warn_fraction]
    if lossy:
        lines.append(f"warning: the crop leaves out more than {100 * result.body_lost_warn_fraction:g}% of the body in "
                     f"{len(lossy)} case(s) (preprocess.crop_method 'body' keeps it whole): "
                     + ", ".join(f"{r['case_id']} ({100 * r['crop_body_lost_fraction']:.1f}%)" for r in lossy[:10])
                     + (", ..." if len(lossy) > 10 else ""))
    failed = [r for r in result.rows if r["status"] == "failed"]
    if failed:
        lines.append("failed cases:")
        lines += [f"  {r['case_id']}: {r['error']}" for r in failed]
    return "\n".join(lines)


__all__ = ["CaseWriter", "PreprocessResult", "actor_pool_sizes", "format_summary", "process_one", "run_preprocessing",
           "task_cpus", "task_memory_bytes"]
