"""Sweeps: the pure parts of tune_search, bad input refused before any trial, and a real interrupted
and resumed 4-trial ASHA sweep whose best config trains with `panseg train --config`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from panseg.config import PRESETS, ConfigError, build_config, load_config
from panseg.cluster import ClusterResourcesError
from panseg.tune_search import (
    check_search_space,
    free_worker_group,
    is_validated,
    max_concurrent_trials,
    read_trial,
    run_sweep,
    trial_config,
    trial_bundles,
    trial_resources,
    trial_table,
)

TINY_TRIAL = ["train.epochs=3", "train.iterations_per_epoch=3", "train.val_every_epochs=1", "train.val_max_cases=1",
              "train.checkpoint_every_epochs=1", "tune.metric=val_organ_dsc"]


def test_trial_config_sets_the_searched_keys_and_nothing_else():
    base = build_config("tiny")
    cfg = trial_config(base, {"train.tumor_weight": 7.25, "train.tumor_sampling_ratio": 2.5, "train.lr": 1e-4})
    assert (cfg.train.tumor_weight, cfg.train.tumor_sampling_ratio, cfg.train.lr) == (7.25, 2.5, 1e-4)
    assert cfg.train.epochs == base.train.epochs and cfg.model == base.model and cfg.preprocess == base.preprocess


def test_search_space_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.tumor_wieght"):
        build_config("tiny", overrides=['tune.search_space=[{"key": "train.tumor_wieght", "low": 1, "high": 10}]'])
    with pytest.raises(ConfigError, match=r"train.tumor_weight has an empty range \[5.0, 5.0\]"):
        build_config("tiny", overrides=['tune.search_space=[{"key": "train.tumor_weight", "low": 5, "high": 5}]'])
    with pytest.raises(ConfigError, match=r"train.batch_size is not a float setting \(its type is int\)"):
        check_search_space(build_config("tiny", overrides=[
            'tune.search_space=[{"key": "train.batch_size", "low": 1, "high": 4, "log": false}]']))
    with pytest.raises(ConfigError, match="search_space is empty"):
        check_search_space(build_config("tiny", overrides=["tune.search_space=[]"]))
    check_search_space(build_config("paper"))  # the default space is valid


def test_concurrency_follows_the_cluster_and_oversized_trials_are_refused():
    one = trial_resources(build_config("tiny", overrides=["tune.cpus_per_worker=0.5"]).tune)
    assert one.total() == {"CPU": 0.5, "GPU": 0.0}
    assert max_concurrent_trials(one.total(), {"CPU": 2.0}, num_trials=8) == 4
    assert max_concurrent_trials(one.total(), {"CPU": 2.0}, num_trials=3) == 3
    ddp = trial_resources(build_config("tiny", overrides=["tune.workers_per_trial=2", "tune.cpus_per_worker=2",
                                                          "tune.gpus_per_worker=1"]).tune)
    assert ddp.workers == {"CPU": 4.0, "GPU": 2.0} and ddp.total()["CPU"] == pytest.approx(4.1)
    assert max_concurrent_trials(ddp.total(), {"CPU": 64.0, "GPU": 5.0}, num_trials=8) == 2  # GPUs decide
    assert trial_bundles(build_config("tiny", overrides=["tune.workers_per_trial=2", "tune.cpus_per_worker=2",
                                                         "tune.gpus_per_worker=1"]).tune) == \
        [{"CPU": 0.1, "GPU": 0.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]


def test_trial_rows_tell_completed_stopped_and_failed_apart(tmp_path):
    from panseg.config import save_config

    base = build_config("tiny", overrides=["train.epochs=4"])
    for trial, epochs, weight in (("t0", 4, 2.0), ("t1", 1, 5.0), ("t2", 2, 9.0)):
        run = tmp_path / trial
        run.mkdir()
        save_config(trial_config(base, {"train.tumor_weight": weight}), run / "config.yaml")
        lines = [{"epoch": e, "train_loss": 1.0, "val_tumor_dsc": 0.1 * e * weight, "val_tumor_nsd": 0.05 * e}
                 for e in range(1, epochs + 1)]
        lines.append(dict(lines[-1]))  # an epoch logged twice (after a resume) counts once
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = [read_trial(tmp_path / t, "val_tumor_dsc", "max") for t in ("t0", "t1", "t2")]
    assert [r["epochs_run"] for r in rows] == [4, 1, 2]
    assert rows[0]["best_val_tumor_dsc"] == pytest.approx(0.8) and rows[0]["val_tumor_nsd_at_best"] == 0.2
    table = trial_table(rows, base.tune.search_space, {"t0": "TERMINATED", "t1": "TERMINATED", "t2": "ERROR"},
                        "val_tumor_dsc")
    assert [r["state"] for r in table] == ["completed", "stopped early", "ERROR"]
    assert [r["train.tumor_weight"] for r in table] == [2.0, 5.0, 9.0]


@pytest.mark.ray
def test_the_driver_frees_the_placement_group_of_an_ended_trials_workers(ray_local, tmp_path):
    """What a killed multi-worker trial leaves behind (its workers' placement group, id in rank_0.json)
    is removed, and its CPUs come back."""
    from ray.util.placement_group import placement_group, placement_group_table

    before = ray_local.available_resources().get("CPU", 0.0)  # read before the group exists: the view lags
    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray_local.get(group.ready())
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "rank_0.json").write_text(json.dumps({"rank": 0, "placement_group": group.id.hex()}))
    assert free_worker_group(tmp_path)
    deadline = time.monotonic() + 10
    while ray_local.available_resources().get("CPU", 0.0) < before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert placement_group_table(group)["state"] == "REMOVED"
    assert ray_local.available_resources().get("CPU", 0.0) == pytest.approx(before)  # its CPUs are back
    assert not free_worker_group(tmp_path)  # already gone
    assert not free_worker_group(tmp_path / "no_such_trial")


@pytest.mark.ray
def test_a_trial_the_cluster_cannot_hold_fails_before_any_trial_starts(tiny_store, ray_local, tmp_path):
    _, store, _ = tiny_store
    cfg = build_config("tiny", overrides=["tune.workers_per_trial=3", "tune.cpus_per_worker=1"])
    started = time.monotonic()
    with pytest.raises(ClusterResourcesError, match=r"4 trial resource bundles need 3.1 CPU in all, but the "
                                                    r"cluster has 2 CPU.*tune.workers_per_trial"):
        run_sweep(cfg, str(store), tmp_path / "sweep")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "sweep" / "trials").exists()


def _panseg(*args):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return [sys.executable, "-m", "panseg.cli", *args], env


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_and_its_best_config_trains(tiny_store, tmp_path):
    """A 4-trial ASHA sweep, one trial at a time (each holds both CPUs); SIGKILL the driver while the
    second trial trains; `--resume` finishes the sweep without touching the first trial."""
    _, store, _ = tiny_store
    sweep = tmp_path / "sweep"
    overrides = [a for o in TINY_TRIAL for a in ("--set", o)]
    cmd, env = _panseg("tune", "--store", str(store), "--out", str(sweep), "--preset", "tiny", "--trials", "4",
                       "--cpus-per-worker", "2", "--num-cpus", "2", *overrides)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = second = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            trials = sorted((sweep / "trials").glob("*")) if (sweep / "trials").exists() else []
            ended = [t for t in trials if (t / "ended.json").is_file()]
            running = [t for t in trials if t not in ended and (t / "checkpoints").is_dir()
                       and any((t / "checkpoints").glob("epoch_*"))]
            if ended and running:
                first, second = ended[0], running[0]
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert first is not None, "never saw one trial ended and the next one training"
    time.sleep(3)  # a trial process of the killed Ray may write its last epoch before it notices
    first_metrics = (first / "metrics.jsonl").read_bytes()
    second_epochs = len((second / "metrics.jsonl").read_text().splitlines())

    cmd, env = _panseg("tune", "--store", str(store), "--out", str(sweep), "--resume", "--num-cpus", "2")
    resumed = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (first / "metrics.jsonl").read_bytes() == first_metrics  # the finished trial was not rerun
    second_rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    if len(second_rows) > second_epochs:  # it continued: from its checkpoint, not from epoch 1
        assert second_rows[second_epochs]["epoch"] > 1

    table = list(__import__("csv").DictReader(open(sweep / "trials.csv")))
    assert len(table) == 4 and len({r["trial_id"] for r in table}) == 4
    assert {r["state"] for r in table} <= {"completed", "stopped early"}, table
    assert any(r["state"] == "stopped early" and int(r["epochs_run"]) < 3 for r in table), table
    assert all(1 <= float(r["train.tumor_weight"]) <= 10 for r in table)
    best = max(table, key=lambda r: float(r["best_val_organ_dsc"]))
    assert best["trial_id"] in resumed.stdout and (sweep / "sweep.png").stat().st_size > 5000

    best_cfg = load_config(sweep / "best_config.yaml")
    assert best_cfg.train.tumor_weight == pytest.approx(float(best["train.tumor_weight"]))
    cmd, env = _panseg("train", "--store", str(store), "--out", str(tmp_path / "run"), "--config",
                       str(sweep / "best_config.yaml"))
    train = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert load_config(tmp_path / "run" / "config.yaml") == best_cfg
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_only_validated_epochs_reach_tune():
    assert is_validated({"epoch": 2, "val_tumor_dsc": 0.0}, "val_tumor_dsc")
    assert not is_validated({"epoch": 1, "train_loss": 0.9}, "val_tumor_dsc")
    assert not is_validated({"epoch": 1, "val_tumor_dsc": None}, "val_tumor_dsc")


SHIPPED_CADENCES = sorted({make().train.val_every_epochs for make in PRESETS.values()})


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("val_every", SHIPPED_CADENCES)
def test_a_sweep_runs_with_each_shipped_presets_validation_cadence(tiny_store, tmp_path, val_every):
    """`panseg tune` with the shipped presets' own cadences (validation every 2nd / 5th epoch), where
    the first epochs have no `val_tumor_dsc`: Tune must not refuse them (issue 20)."""
    _, store, _ = tiny_store
    sweep = tmp_path / "sweep"
    overrides = [f"train.epochs={val_every + 1}", "train.iterations_per_epoch=2", f"train.val_every_epochs={val_every}",
                 "train.val_max_cases=1", f"train.checkpoint_every_epochs={val_every}"]
    cmd, env = _panseg("tune", "--store", str(store), "--out", str(sweep), "--preset", "tiny", "--trials", "2",
                       "--cpus-per-worker", "1", "--num-cpus", "2", *[a for o in overrides for a in ("--set", o)])
    done = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = list(__import__("csv").DictReader(open(sweep / "trials.csv")))
    assert len(table) == 2 and all(r["best_val_tumor_dsc"] != "" for r in table), table
    for trial in (sweep / "trials").iterdir():
        rows = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
        assert rows[0].get("val_tumor_dsc") is None  # the first epoch was not validated
        assert [r["epoch"] for r in rows if r.get("val_tumor_dsc") is not None][0] == val_every
