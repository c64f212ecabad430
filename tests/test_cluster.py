"""Running panseg on a Ray cluster: the launcher config, resource checks, and `ray job submit` of each
stage on a two-node cluster started here with `ray start`, including losing a node during training."""

import copy
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from panseg.cluster import Capacity, node_types_of_launcher_config, unmet_requirements
from panseg.data_pipeline import actor_pool_sizes, task_cpus

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# ----------------------------------------------------------------------------------------------
# cluster.yaml (no Ray started)
# ----------------------------------------------------------------------------------------------


def _launcher_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` fills it with the AWS defaults
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["resource"] = {"GPU": 1}  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_has_cpu_and_gpu_workers_a_shared_store_and_a_private_dashboard():
    config = _launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"] == {"CPU": 0}  # no work on the head
    gpu = types["gpu-worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["node_config"]["InstanceType"].startswith("g5.")
    assert types["cpu-worker"]["resources"].get("GPU", 0) == 0
    for node_type in (types["cpu-worker"], gpu):
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in yaml.safe_dump(config)
    assert any("/mnt/panseg" in c for c in config["initialization_commands"])  # the shared file system
    assert "-v /mnt/panseg:/mnt/panseg" in config["docker"]["run_options"]
    assert any("pip install" in c and "panseg" in c for c in config["setup_commands"])


def test_capacity_of_an_autoscaling_cluster_counts_the_nodes_it_may_add():
    types = node_types_of_launcher_config(ROOT / "cluster.yaml")
    assert sorted(types, key=str) == sorted([({"CPU": 16.0, "memory": 100.0 * GiB}, 8),
                                            ({"CPU": 8.0, "GPU": 1.0, "memory": 24.0 * GiB}, 4)], key=str)
    shapes = (({"CPU": 0.0}),) + tuple(r for r, _ in types)
    capacity = Capacity(shapes, {"CPU": 8 * 16 + 4 * 8.0, "GPU": 4.0, "memory": 8 * 100.0 * GiB + 4 * 24.0 * GiB},
                        autoscaling=True)
    gpu_worker = {"CPU": 1.0, "GPU": 1.0}
    assert unmet_requirements([gpu_worker] * 4, capacity, "training worker") == []
    assert unmet_requirements([gpu_worker] * 5, capacity, "training worker") == [
        "5 training workers need 5 GPU in all, but the cluster can grow to 4 GPU"]
    [problem] = unmet_requirements([{"CPU": 1.0, "memory": 120.0 * GiB}], capacity, "preprocessing task")
    assert problem == ("each preprocessing task asks for 1 CPU, 120.0 GiB memory on one node, but no node type "
                       "has that (the most any node has: 16 CPU, 100.0 GiB memory)")
    assert node_types_of_launcher_config(ROOT / "no-such.yaml") == []


def test_a_worker_must_fit_on_one_node_not_only_in_the_totals():
    two_small = Capacity(({"CPU": 2.0}, {"CPU": 2.0}), {"CPU": 4.0})
    assert unmet_requirements([{"CPU": 2.0}] * 2, two_small, "training worker") == []
    assert unmet_requirements([{"CPU": 3.0}], two_small, "training worker") == [
        "each training worker asks for 3 CPU on one node, but no node has that (the most any node has: 2 CPU)"]
    assert len(unmet_requirements([{"CPU": 1.0, "GPU": 1.0}], two_small, "training worker")) == 2


def test_preprocessing_cpus_grow_with_the_memory_a_case_needs():
    per_cpu = 4 * GiB
    assert task_cpus(256 * 2**20, per_cpu) == 1  # small cases: one CPU each, many at once
    assert task_cpus(4 * GiB, per_cpu) == 1
    assert task_cpus(10 * GiB, per_cpu) == 3  # a case that takes the memory of 2.5 CPUs gets 3 as threads
    assert task_cpus(100 * GiB, per_cpu) == 8  # capped
    assert task_cpus(10 * GiB, 0.0) == 1  # a cluster that reports no memory


def test_preprocessing_actors_are_as_many_as_the_cluster_holds_now_and_can_grow_to():
    task = {"CPU": 1.0, "memory": 3 * GiB}
    two_cpus = {"CPU": 2.0, "memory": 20 * GiB}
    assert actor_pool_sizes(100, task, two_cpus, two_cpus) == (2, 2)
    assert actor_pool_sizes(1, task, two_cpus, two_cpus) == (1, 1)  # never more actors than cases
    # memory, not CPUs, limits a pool of big cases; an autoscaler's nodes raise the ceiling only
    assert actor_pool_sizes(100, task, {"CPU": 16.0, "memory": 10 * GiB}, {"CPU": 64.0, "memory": 200 * GiB}) == (3, 64)
    # a busy cluster: at least one actor now, the others when resources free up
    assert actor_pool_sizes(100, {"CPU": 2.0, "memory": GiB}, {"CPU": 1.0, "memory": 50 * GiB}, two_cpus) == (1, 1)



@pytest.mark.ray
def test_preprocessing_a_case_larger_than_any_node_is_refused_at_once(ray_local, small_cohort, tmp_path,
                                                                      monkeypatch):
    from panseg import data_pipeline
    from panseg.cluster import ClusterResourcesError
    from panseg.config import preset
    from panseg.store.zarr_store import list_complete_cases

    monkeypatch.setattr(data_pipeline, "task_memory_bytes", lambda cases: 1000 * GiB)  # as a huge cohort's headers
    started = time.perf_counter()
    with pytest.raises(ClusterResourcesError, match=r"each preprocessing task asks for \d CPU, 1000.0 GiB memory "
                       r"on one node, but no node has that \(the most any node has: \d CPU, [\d.]+ GiB memory\)"):
        data_pipeline.run_preprocessing(small_cohort / "raw", tmp_path / "store.zarr", preset("tiny").preprocess,
                                        progress=False)
    assert time.perf_counter() - started < 30
    assert list_complete_cases(tmp_path / "store.zarr") == []

# ----------------------------------------------------------------------------------------------
# A two-node cluster on this machine: `ray job submit` of each stage, and losing a node
# ----------------------------------------------------------------------------------------------

TRAIN_SETTINGS = ["--preset", "tiny", "--set", "train.epochs=4", "--set", "train.iterations_per_epoch=2",
                  "--set", "train.batch_size=1", "--set", "train.checkpoint_every_epochs=1",
                  "--set", "train.val_every_epochs=4", "--set", "train.val_max_cases=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and one worker node, 1 CPU each (so two of anything must use both), and a small cohort.

    Shared by the tests below, which run in order: preprocess, then train (losing a node), then refusal.
    """
    from tests.cluster_fixture import start_cluster

    from panseg.phantom.cohort import write_cohort

    data = tmp_path_factory.mktemp("cluster_data")
    write_cohort(data / "raw", cases=4, healthy=1, seed=0, small=True)
    started = time.perf_counter()
    running = start_cluster(workers=1, cpus_per_node=1)
    print(f"two-node cluster up in {time.perf_counter() - started:.1f} s: {running.dashboard}")
    try:
        yield running, data
    finally:
        running.stop()
        import shutil

        shutil.rmtree(running.base, ignore_errors=True)


def _node_ids(cluster_) -> dict[str, str]:
    """Ray node id -> 'head' or 'worker' for the alive nodes."""
    return {n["node_id"]: ("head" if n["is_head_node"] else "worker") for n in cluster_.alive_nodes()}


def _job_output(result) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.ray
@pytest.mark.slow
def test_preprocess_job_spreads_cases_over_both_nodes(cluster):
    from panseg.store.zarr_store import read_manifest

    running, data = cluster
    nodes = _node_ids(running)
    result = running.submit(["panseg", "preprocess", "--raw", str(data / "raw"), "--out", str(data / "store.zarr"),
                             "--preset", "tiny", "--quiet", "--address", "auto"], cwd=ROOT)
    assert result.returncode == 0, _job_output(result)
    assert "ok: 5" in result.stdout and "succeeded" in result.stdout + result.stderr, _job_output(result)
    rows = read_manifest(data / "store.zarr")
    assert [r["status"] for r in rows] == ["ok"] * 5
    used = {nodes.get(r["node"], r["node"]) for r in rows}
    assert used == {"head", "worker"}, [(r["case_id"], r["node"]) for r in rows]


def _wait_for(condition, what: str, timeout: float, job=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job is not None and job() in ("FAILED", "STOPPED", "SUCCEEDED"):
            raise AssertionError(f"waiting for {what}, the job ended: {job()}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout:.0f} s")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def _ranks(run: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in (run / "workers").glob("rank_*.json")}


@pytest.mark.ray
@pytest.mark.slow
def test_train_job_puts_a_worker_on_each_node_and_survives_losing_one(cluster):
    """`ray job submit` of a 2-worker `panseg train`: one worker per node; then the worker node's raylet
    is killed after a checkpoint, a fresh node joins, and the run resumes from its last checkpoint and
    finishes with nothing in the store or the run directory corrupt."""
    from ray.job_submission import JobSubmissionClient

    from panseg.config import load_config
    from panseg.store.zarr_store import read_case, read_manifest
    from panseg.training.checkpoint import load_checkpoint

    running, data = cluster
    store, run = data / "store.zarr", data / "run"
    if not (store / "manifest.parquet").exists():
        pytest.skip("needs the store of test_preprocess_job_spreads_cases_over_both_nodes")
    nodes = _node_ids(running)
    submitted = running.submit(["panseg", "train", "--store", str(store), "--out", str(run), "--workers", "2",
                                "--max-failures", "2", "--address", "auto", *TRAIN_SETTINGS], cwd=ROOT, wait=False)
    assert submitted.returncode == 0, _job_output(submitted)
    job_id = next(w.strip("'") for line in submitted.stdout.splitlines() + submitted.stderr.splitlines()
                  for w in line.split() if w.strip("'").startswith("raysubmit_"))
    client = JobSubmissionClient(running.dashboard)

    def status():
        return str(client.get_job_status(job_id)).split(".")[-1]

    # Epoch 2 logged: the checkpoint of epoch 1 has surely reached Ray Train (epoch 2's may not have).
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and any(r["epoch"] == 2 for r in _metrics(run)),
              "epoch 2", 240, job=status)
    before = _ranks(run)
    assert sorted(nodes[r["node_id"]] for r in before.values()) == ["head", "worker"], before
    lost = next(n for n in running.nodes if n.name == "worker1")
    killed_at = time.time()
    running.kill_raylet(lost)
    running.add_worker("worker2")  # resources come back: a new node, as an autoscaler would add

    _wait_for(lambda: status() in ("SUCCEEDED", "FAILED", "STOPPED"), "end of the training job", 300)
    logs = client.get_job_logs(job_id)
    assert status() == "SUCCEEDED", logs[-6000:]

    rows = _metrics(run)
    after = [r["epoch"] for r in rows if r["time"] > killed_at]
    done_before = max(r["epoch"] for r in rows if r["time"] <= killed_at)
    # Resumed from the last checkpoint Ray Train had (epoch 1 or 2), not from scratch.
    assert done_before == 2 and after and after[0] in (2, 3), (done_before, after)
    assert after[-1] == 4 and sorted({r["epoch"] for r in rows}) == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in rows)
    assert "resumed from" in logs
    # After the restart one rank runs on the head and one on the new node, none on the lost one.
    head, lost_id = (next(r["node_id"] for r in before.values() if nodes[r["node_id"]] == kind)
                     for kind in ("head", "worker"))
    now = {r["node_id"] for r in _ranks(run).values()}
    assert head in now and lost_id not in now and len(now) == 2, (before, now)

    # Nothing corrupt: every kept checkpoint and the final model load, the config reads, the store reads.
    assert load_checkpoint(run / "model_final").epoch == 4
    kept = sorted((run / "checkpoints").glob("epoch_*"))
    assert kept and all(load_checkpoint(c).epoch == int(c.name.split("_")[1]) for c in kept)
    assert load_config(run / "config.yaml").train.epochs == 4
    manifest = read_manifest(store)
    assert [r["status"] for r in manifest] == ["ok"] * 5
    for row in manifest:
        image, label, _ = read_case(store, row["case_id"])
        assert image.shape == label.shape == tuple(row["resampled_shape"])


@pytest.mark.ray
@pytest.mark.slow
def test_predict_job_writes_masks_to_the_shared_output(cluster):
    import shutil

    import SimpleITK as sitk

    from panseg.infer import read_csv_rows

    running, data = cluster
    run = data / "run"
    if not (run / "model_final").is_dir():
        pytest.skip("needs the run of test_train_job_puts_a_worker_on_each_node_and_survives_losing_one")
    (data / "test").mkdir(exist_ok=True)
    shutil.copy(data / "raw" / "imagesTr" / "phantom_000_0000.nii.gz", data / "test")
    result = running.submit(["panseg", "predict", "--model", str(run), "--input", str(data / "test"),
                             "--output", str(data / "preds"), "--quiet", "--address", "auto"], cwd=ROOT)
    assert result.returncode == 0, _job_output(result)
    rows = read_csv_rows(data / "preds" / "predictions.csv")
    assert rows["phantom_000"]["status"] == "ok", rows
    mask = sitk.ReadImage(str(data / "preds" / "phantom_000.nii.gz"))
    image = sitk.ReadImage(str(data / "test" / "phantom_000_0000.nii.gz"))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()

@pytest.mark.ray
def test_a_job_asking_for_what_the_cluster_lacks_fails_fast_and_says_what(cluster):
    running, data = cluster
    store = data / "store.zarr"
    if not (store / "manifest.parquet").exists():
        pytest.skip("needs the store of test_preprocess_job_spreads_cases_over_both_nodes")
    started = time.perf_counter()
    result = running.submit(["panseg", "train", "--store", str(store), "--out", str(data / "gpu_run"), "--workers", "2",
                             "--gpu", "--address", "auto", *TRAIN_SETTINGS], cwd=ROOT, timeout=120)
    elapsed = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in output, _job_output(result)
    assert "2 training workers need 2 GPU in all, but the cluster has 0 GPU" in output, _job_output(result)
    assert "each training worker asks for 1 CPU, 1 GPU on one node, but no node has that" in output
    assert "Traceback" not in output  # a message, not a crash
    assert elapsed < 60, f"took {elapsed:.0f} s to refuse"
    assert not (data / "gpu_run" / "checkpoints").exists()
