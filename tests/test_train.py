"""Training: resume exactness, the training clock, snapshots, init_from and learning in local mode, DDP over
Ray Train workers, worker loss."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from panseg.config import build_config
from panseg.train_loop import load_or_create_split, make_job, restart_source, train_distributed, train_local
from panseg.training.checkpoint import latest_checkpoint, load_checkpoint
from panseg.training.parts import lr_at_epoch


def _cfg(*overrides):
    return build_config("tiny", overrides=["train.iterations_per_epoch=3", "train.val_every_epochs=2",
                                           "train.checkpoint_every_epochs=1", "train.val_max_cases=1", *overrides])


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_split_is_seeded_disjoint_and_reused(tiny_store, tmp_path):
    _, store, result = tiny_store
    first = load_or_create_split(str(store), tmp_path / "split.json", 0.25, seed=3)
    again = load_or_create_split(str(store), tmp_path / "split.json", 0.5, seed=99)  # the file wins
    assert first == again
    assert not set(first["train"]) & set(first["val"])
    assert sorted(first["train"] + first["val"]) == sorted(r["case_id"] for r in result.rows if r["status"] == "ok")
    assert len(first["val"]) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["nope"], "val": []}))
    with pytest.raises(ValueError, match="nope"):
        load_or_create_split(str(store), tmp_path / "bad.json", 0.25, seed=0)


def test_patch_that_does_not_divide_is_refused_before_training(tiny_store, tmp_path):
    _, store, _ = tiny_store
    with pytest.raises(ValueError, match=r"patch_size_zyx\[0\]=30 must be divisible by \d+ .*try 32"):
        make_job(_cfg("train.patch_size_zyx=[30, 64, 64]"), str(store), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_gives_exactly_the_weights_of_a_straight_run(tiny_store, tmp_path):
    _, store, _ = tiny_store
    cfg = _cfg("train.epochs=2")
    straight = train_local(make_job(cfg, str(store), str(tmp_path / "straight")))
    train_local(make_job(cfg, str(store), str(tmp_path / "split"), stop_after_epochs=1))
    first_half = load_checkpoint(tmp_path / "split" / "checkpoints" / "epoch_0001")
    assert first_half.epoch == 1 and not (tmp_path / "split" / "model_final").exists()
    resumed = train_local(make_job(cfg, str(store), str(tmp_path / "split"), resume=True))

    a = load_checkpoint(straight / "model_final").model
    b = load_checkpoint(resumed / "model_final").model
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(not torch.equal(first_half.model[k], a[k]) for k in a if k.endswith("weight"))  # epoch 2 trained
    assert [m["epoch"] for m in _metrics(resumed)] == [1, 2]


def test_a_time_limit_ends_the_run_at_an_epoch_boundary_with_a_final_model(tiny_store, tmp_path):
    _, store, _ = tiny_store
    cfg = _cfg("train.epochs=5", "train.iterations_per_epoch=1", "train.val_every_epochs=5",
               "train.checkpoint_every_epochs=5", "train.time_limit_minutes=0.0001")
    run = train_local(make_job(cfg, str(store), str(tmp_path / "run")))
    rows = _metrics(run)
    assert [m["epoch"] for m in rows] == [1]  # 6 ms: over after the first epoch, not 5 epochs
    assert "val_organ_dsc" in rows[0]  # the last epoch of a run is validated
    assert load_checkpoint(run / "model_final").epoch == 1


def test_resume_without_a_run_is_an_error(tiny_store, tmp_path):
    _, store, _ = tiny_store
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        make_job(_cfg(), str(store), str(tmp_path / "nothing"), resume=True)


def test_snapshots_are_complete_models_at_their_training_minutes(local_store, tmp_path):
    """train.snapshot_minutes keeps the model at the first epoch end past each minute; a snapshot is a
    checkpoint folder the predictor loads, with snapshot.json beside it."""
    from panseg.inference.predictor import load_predictor

    cfg = _cfg("train.epochs=1", "train.iterations_per_epoch=1", "train.snapshot_minutes=[0.0001, 0.0002, 600]")
    run = train_local(make_job(cfg, str(local_store), str(tmp_path / "run")))
    folders = sorted(p.name for p in (run / "snapshots").iterdir())
    assert folders == ["minute_0.0001", "minute_0.0002"]  # 600 minutes never came
    for name in folders:
        info = json.loads((run / "snapshots" / name / "snapshot.json").read_text())
        assert info["epoch"] == 1 and info["steps"] == 1  # both minutes had passed by the first epoch end
        assert info["elapsed_seconds"] >= 60 * info["minutes"]
        state = load_checkpoint(run / "snapshots" / name)
        assert state.epoch == 1 and state.optimizer is None and state.elapsed_seconds == info["elapsed_seconds"]
        predictor = load_predictor(run / "snapshots" / name, device="cpu")
        assert predictor is not None
    assert not list((run / "snapshots").glob(".tmp-*"))


def test_a_resumed_poly_time_run_continues_the_clock_of_its_checkpoint(local_store, tmp_path):
    cfg = _cfg("train.epochs=2", "train.iterations_per_epoch=1", "train.val_every_epochs=2",
               "train.time_limit_minutes=60", "train.lr_schedule=poly_time")
    run = tmp_path / "run"
    train_local(make_job(cfg, str(local_store), str(run), stop_after_epochs=1))
    first = load_checkpoint(run / "checkpoints" / "epoch_0001")
    assert first.elapsed_seconds > 0
    train_local(make_job(cfg, str(local_store), str(run), resume=True))
    second = load_checkpoint(run / "checkpoints" / "epoch_0002")
    assert second.elapsed_seconds > first.elapsed_seconds
    lr_second = _metrics(run)[-1]["lr"]  # epoch 2 started at the first run's clock, plus the restore
    latest, earliest = lr_at_epoch(cfg.train, 1, second.elapsed_seconds), lr_at_epoch(cfg.train, 1, first.elapsed_seconds)
    assert latest <= lr_second <= earliest
    assert lr_second < cfg.train.lr


@pytest.mark.slow
def test_local_training_learns(tiny_store, tmp_path):
    """A short CPU run learns the anatomy: the loss falls and held-out organ Dice rises far above an
    untrained model's (~0.008 here; with the poly decay the demo uses, 45 steps reach ~0.06 and 90
    steps ~0.08; 240 steps ~0.14 with liver and stomach first). Learning the small, low-contrast
    phantom lesions takes longer than a test may run (issue 4)."""
    _, store, _ = tiny_store
    cfg = build_config("tiny", overrides=["train.epochs=6", "train.iterations_per_epoch=15", "train.lr=0.01",
                                          "train.lr_schedule=poly", "train.val_every_epochs=3", "train.val_max_cases=2"])
    untrained = train_local(make_job(build_config("tiny", overrides=["train.epochs=1", "train.iterations_per_epoch=1",
                                                                     "train.lr=1e-9", "train.val_max_cases=2"]),
                                     str(store), str(tmp_path / "untrained")))
    run = train_local(make_job(cfg, str(store), str(tmp_path / "run")))
    rows = _metrics(run)
    before = _metrics(untrained)[-1]["val_organ_dsc"]
    organ = [r["val_organ_dsc"] for r in rows if "val_organ_dsc" in r]
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert organ[-1] > max(0.03, 4 * before) and organ[-1] > organ[0], (before, organ)
    assert all("val_tumor_dsc" in r for r in rows if "val_organ_dsc" in r)
    assert (run / "model_best").is_dir() and (run / "metrics.csv").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_ddp_on_cpu(tiny_store, tmp_path):
    _, store, _ = tiny_store
    cfg = _cfg("train.epochs=2", "train.iterations_per_epoch=4")
    run = train_distributed(make_job(cfg, str(store), str(tmp_path / "ddp")), num_workers=2, use_gpu=False)
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "val_tumor_dsc" in rows[-1] and rows[-1]["val_cases"] == 1
    workers = sorted((json.loads(p.read_text()) for p in (run / "workers").glob("rank_*.json")), key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    group = workers[0]["placement_group"]  # both ranks run in the worker group's one placement group
    assert group == workers[1]["placement_group"] and len(bytes.fromhex(group)) == 18
    assert [w["torch_threads"] for w in workers] == [1, 1]  # one CPU each
    assert load_checkpoint(run / "model_final").epoch == 2


@pytest.mark.ray
@pytest.mark.slow
def test_one_cpu_worker_computes_with_a_thread_per_cpu_it_holds(tiny_store, tmp_path):
    """The demo's CPU training: one Ray Train worker holding both CPUs trains with 2 torch threads."""
    _, store, _ = tiny_store
    run = train_distributed(make_job(_cfg("train.epochs=1"), str(store), str(tmp_path / "one")), num_workers=1,
                            use_gpu=False, cpus_per_worker=2.0)
    worker = json.loads((run / "workers" / "rank_0.json").read_text())
    assert (worker["world_size"], worker["torch_threads"]) == (1, 2)
    assert [r["epoch"] for r in _metrics(run)] == [1] and load_checkpoint(run / "model_final").epoch == 1


@pytest.mark.ray
def test_a_cluster_too_small_is_refused_at_once(tiny_store, tmp_path):
    _, store, _ = tiny_store
    job = make_job(_cfg(), str(store), str(tmp_path / "big"))
    with pytest.raises(RuntimeError, match="8 training workers need 8 CPU in all, but the cluster has 2 CPU"):
        train_distributed(job, num_workers=8, use_gpu=False)
    with pytest.raises(RuntimeError, match="1 training worker needs 1 GPU in all, but the cluster has 0 GPU"):
        train_distributed(job, num_workers=1, use_gpu=True)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(tiny_store, tmp_path):
    """SIGKILL one DDP worker mid-run: Ray Train restarts the group from the last checkpoint."""
    import threading

    _, store, _ = tiny_store
    cfg = _cfg("train.epochs=6", "train.iterations_per_epoch=4", "train.val_every_epochs=6")
    job = make_job(cfg, str(store), str(tmp_path / "fault"))
    run = Path(job.run_dir)
    outcome = {}

    def fit():
        try:
            outcome["run"] = train_distributed(job, num_workers=2, use_gpu=False, max_failures=2)
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "checkpoints" / "epoch_0002").is_dir():
        time.sleep(0.2)
        assert thread.is_alive() or "error" not in outcome, outcome
    victim = json.loads((run / "workers" / "rank_1.json").read_text())["pid"]
    checkpoint_at_kill = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("epoch_*"))
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome

    rows = _metrics(run)
    after = [r["epoch"] for r in rows if r["time"] > killed_at]
    # Resumed from the checkpoint of epoch c (or c - 1 if its report had not landed): at most one interval lost.
    # Resumed from the newest complete checkpoint in the run directory (restart_source), whatever Ray
    # Train had been told of: the epoch after the newest on disk at the kill, or a later one that rank 0
    # wrote before the group stopped.
    assert after and after[0] >= checkpoint_at_kill + 1, (checkpoint_at_kill, after)
    assert after[-1] == 6 and sorted(set(r["epoch"] for r in rows)) == [1, 2, 3, 4, 5, 6]
    restarted = json.loads((run / "workers" / "rank_1.json").read_text())["pid"]
    assert restarted != victim
    assert load_checkpoint(run / "model_final").epoch == 6


def test_restart_source_takes_the_newer_of_ray_trains_and_the_run_directorys_checkpoint(tmp_path):
    handed, disk = tmp_path / "handed", tmp_path / "checkpoints" / "epoch_0003"
    assert restart_source(None, None, None, None) == (None, "no checkpoint: a new run")
    assert restart_source(handed, 2, disk, 3)[0] == disk  # killed after writing epoch 3, before reporting it
    assert restart_source(None, None, disk, 3)[0] == disk  # Ray Train was told of no checkpoint at all
    assert restart_source(handed, 3, disk, 3)[0] == handed
    assert restart_source(handed, 2, None, None)[0] == handed
    assert "Ray Train handed over none" in restart_source(None, None, disk, 3)[1]


def test_a_new_run_never_continues_from_another_runs_checkpoints(local_store, tmp_path):
    """Checkpoints of an earlier run in the same directory are taken only with --resume."""
    store = local_store
    run = tmp_path / "run"
    train_local(make_job(_cfg("train.epochs=1"), str(store), str(run)))
    assert latest_checkpoint(run / "checkpoints") is not None
    again = make_job(_cfg("train.epochs=1"), str(store), str(run))
    assert latest_checkpoint(run / "checkpoints", run_id=again.run_id) is None
    assert latest_checkpoint(run / "checkpoints", run_id=load_checkpoint(run / "model_final").run_id) is not None


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_after_writing_a_checkpoint_and_before_reporting_it_resumes_from_it(tiny_store, tmp_path):
    """Rank 0 SIGKILLs itself right after writing epoch 2's checkpoint, before Ray Train has it
    (`TrainJob.drill_kill_after_epoch`): the restarted group continues from epoch 2, not from epoch 1
    (the last one reported) or from scratch."""
    from dataclasses import replace

    _, store, _ = tiny_store
    cfg = _cfg("train.epochs=4", "train.iterations_per_epoch=4", "train.val_every_epochs=4")
    job = replace(make_job(cfg, str(store), str(tmp_path / "drill")), drill_kill_after_epoch=2)
    run = train_distributed(job, num_workers=2, use_gpu=False, max_failures=2)
    assert (run / ".drill_killed").read_text() == "2"
    epochs = [r["epoch"] for r in _metrics(run)]
    assert epochs == [1, 3, 4], epochs  # epoch 2's metrics were never logged: rank 0 died before it
    assert load_checkpoint(run / "model_final").epoch == 4


def test_init_from_starts_a_new_run_but_not_a_resume(local_store, tmp_path):
    """A new run with train.init_from trains from the source's weights; another network is refused by
    make_job, before any training; a resume takes its own checkpoint."""
    from panseg.training.init_from import InitFromError

    source = train_local(make_job(_cfg("train.epochs=1", "train.iterations_per_epoch=1"), str(local_store),
                                  str(tmp_path / "source")))
    cfg = _cfg("train.epochs=1", "train.iterations_per_epoch=1", f"train.init_from={source}", "train.lr=1e-12")
    run = train_local(make_job(cfg, str(local_store), str(tmp_path / "run")))
    a, b = load_checkpoint(source / "model_final").model, load_checkpoint(run / "model_final").model
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "running" not in k)  # lr ~0: still the source's
    with pytest.raises(InitFromError, match="model.features_per_stage"):
        make_job(_cfg("model.features_per_stage=[4, 8, 16, 32]", f"train.init_from={source}"), str(local_store),
                 str(tmp_path / "other"))
    assert not (tmp_path / "other" / "config.yaml").exists()
    gone = _cfg("train.epochs=2", "train.iterations_per_epoch=1", f"train.init_from={tmp_path / 'gone'}")
    assert make_job(gone, str(local_store), str(run), resume=True).resume  # a resume never reads init_from
