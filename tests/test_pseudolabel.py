"""Stage one: the organ task end to end, organ QA and its plausibility rule, `panseg pseudolabel`
killed and resumed, and the tiny two-stage path (organ model -> pseudo-labels -> fused store -> tumor model).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from panseg.config import ORGAN_NAMES, build_config, label_names
from panseg.io import Volume, read_geometry, read_volume
from panseg.pseudolabel import (CSV_NAME, cohort_ranges, implausible_cases, mean_by_organ, organ_dice,
                                organ_volumes_ml, pseudolabel_folder, read_qa_rows)
from panseg.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from panseg.training.parts import make_loss, make_model, selection_metric

# ----------------------------------------------------------------------------------------------
# QA and the plausibility rule (pure)
# ----------------------------------------------------------------------------------------------


def test_organ_volumes_are_counts_times_the_voxel_volume():
    array = np.zeros((4, 5, 6), np.uint8)
    array[0, :2, :3] = 1  # 6 liver voxels
    array[3, 4, 5] = 13  # 1 left kidney voxel
    row = organ_volumes_ml(Volume(array, (2.0, 0.5, 0.5)))  # 0.5 mm^3 = 0.0005 mL per voxel
    assert row["liver_ml"] == pytest.approx(6 * 0.0005) and row["left_kidney_ml"] == pytest.approx(0.0005)
    assert row["spleen_ml"] == 0.0
    assert row["organs_missing"] == [n for n in ORGAN_NAMES if n not in ("liver", "left_kidney")]
    array[1, 1, 1] = 14
    with pytest.raises(ValueError, match=r"ids 0-13, but this one also holds \[14\]"):
        organ_volumes_ml(Volume(array, (1.0, 1.0, 1.0)))


def _qa_row(case_id, **volumes):
    row = {"case_id": case_id, **{f"{n}_ml": 100.0 for n in ORGAN_NAMES}}
    row.update({f"{k}_ml": v for k, v in volumes.items()})
    return row


def test_implausible_cases_are_missing_organs_and_volumes_beyond_three_times_the_median():
    rows = [_qa_row("a"), _qa_row("b", liver=120.0), _qa_row("c", liver=80.0),
            _qa_row("big", liver=350.0),  # liver median over 7 cases: 100 -> range [33.3, 300]
            _qa_row("edge", liver=260.0),  # inside at factor 3, outside at 2.5 (> 250)
            _qa_row("small", spleen=30.0),
            _qa_row("nokidney", left_kidney=0.0), {"case_id": "failed", "status": "failed"}]
    ranges = cohort_ranges(rows[:-1])
    assert ranges["liver"].median_ml == 100.0 and ranges["liver"].cases == 7
    assert ranges["left_kidney"].cases == 6  # the missing one does not count towards the median
    flagged = implausible_cases(rows)
    assert set(flagged) == {"big", "small", "nokidney"}
    assert flagged["nokidney"] == ["left_kidney missing"]
    assert flagged["big"] == ["liver 350.0 mL is outside [33.3, 300.0] mL (cohort median 100.0 mL over 7 cases, "
                              "factor 3)"]
    assert "spleen 30.0 mL is outside [33.3, 300.0] mL" in flagged["small"][0]
    assert set(implausible_cases(rows, factor=2.5)) == {"big", "edge", "small", "nokidney"}
    # Fewer than 3 cases holding an organ: no range, only missing organs are flagged.
    assert implausible_cases([_qa_row("x"), _qa_row("y", liver=1000.0)]) == {}
    with pytest.raises(ValueError, match="factor must be > 1"):
        cohort_ranges(rows, factor=1.0)


def test_organ_dice_by_name():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    prediction = truth.copy()
    prediction[0] = 3  # half the liver predicted as spleen
    scores = organ_dice(prediction, truth)
    assert scores["liver"] == pytest.approx(2 * 16 / (16 + 32))
    assert scores["spleen"] == 0.0 and scores["pancreas"] is None
    assert mean_by_organ({"a": scores, "b": organ_dice(truth, truth)}) == pytest.approx(
        {"liver": (2 / 3 + 1) / 2, "spleen": 0.0})


# ----------------------------------------------------------------------------------------------
# The organ task: store, classes, weights, sampling, model selection
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organ_store(ray_local, tmp_path_factory):
    """A 4-case phantom organ cohort preprocessed with `--task organs` (tiny preset)."""
    from panseg.data_pipeline import run_preprocessing
    from panseg.phantom.cohort import write_cohort

    root = tmp_path_factory.mktemp("organs")
    write_cohort(root / "raw", cases=3, healthy=1, seed=7, small=True, organ_cohort=True)
    cfg = build_config("tiny", overrides=["preprocess.task=organs"])
    result = run_preprocessing(root / "raw", root / "organs.zarr", cfg.preprocess, progress=False)
    assert result.num_failed == 0
    return root


def test_organ_store_records_the_task_and_trains_uniform_over_organs(organ_store):
    from panseg.store.zarr_store import open_store, read_manifest
    from panseg.training.sampling import PatchSampler

    store = str(organ_store / "organs.zarr")
    attrs = open_store(store).attrs
    assert attrs["task"] == "organs" and attrs["preprocess"]["task"] == "organs"
    assert attrs["label_names"] == {str(k): v for k, v in label_names("organs").items()}
    rows = read_manifest(store)
    assert all(r["status"] == "ok" for r in rows)
    assert all(set(json.loads(r["class_counts"])) == {str(i) for i in range(14)} for r in rows)

    cfg = build_config("tiny", overrides=["preprocess.task=organs"])  # tumor weight and ratio stay 5
    assert cfg.train.tumor_weight == 5.0 and cfg.train.tumor_sampling_ratio == 5.0
    assert make_loss(cfg, 1).class_weights.tolist() == [1.0] * 14
    sampler = PatchSampler(store, [r["case_id"] for r in rows], cfg.train.patch_size_zyx,
                           cfg.train.tumor_sampling_ratio, 0.0, cfg.preprocess.clip_hu)
    assert sampler.probabilities == pytest.approx({c: 1 / 13 for c in range(1, 14)})
    assert selection_metric(cfg) == "val_organ_dsc"
    assert selection_metric(build_config("tiny")) == "val_tumor_dsc"


def test_an_organ_run_has_14_classes_from_the_store_and_keeps_a_best_model(organ_store, tmp_path):
    from panseg.train_loop import make_job, train_local

    # The tumor preset's config: the store decides the task, so the model has 14 classes.
    cfg = build_config("tiny", overrides=["train.epochs=1", "train.iterations_per_epoch=1", "train.val_max_cases=1"])
    run = train_local(make_job(cfg, str(organ_store / "organs.zarr"), str(tmp_path / "run")))
    best = load_checkpoint(run / "model_best")
    assert best.cfg.preprocess.task == "organs" and best.best_metric is not None
    heads = [v for k, v in best.model.items() if k.startswith("heads.") and k.endswith(".bias")]
    assert heads and all(v.shape == (14,) for v in heads)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_organ_dsc" in last and "val_tumor_dsc" not in last


# ----------------------------------------------------------------------------------------------
# `panseg pseudolabel`
# ----------------------------------------------------------------------------------------------


def _untrained(task, path):
    cfg = build_config("tiny", overrides=[f"preprocess.task={task}"])
    torch.manual_seed(0)
    return save_checkpoint(TrainingState(cfg, 0, make_model(cfg).state_dict(), None, None), path)


def test_pseudolabel_refuses_a_tumor_model_before_starting_ray(tmp_path):
    model = _untrained("tumor", tmp_path / "tumor_model")
    with pytest.raises(ValueError, match="task 'tumor'; pseudolabel needs an organ model"):
        pseudolabel_folder(model, tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ValueError, match="factor must be > 1"):
        pseudolabel_folder(_untrained("organs", tmp_path / "organ_model"), tmp_path / "nothing", tmp_path / "out",
                           factor=0.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_killed_pseudolabel_resumes_with_only_the_missing_cases(ray_local, small_cohort, tmp_path):
    """SIGKILL `panseg pseudolabel` once 2 masks exist; the rerun labels only the rest. Every mask has
    its CT's grid and ids within 0-13, and every case has its QA row."""
    model = _untrained("organs", tmp_path / "organ_model")
    images, out = small_cohort / "raw" / "imagesTr", tmp_path / "organsTr"
    cmd = [sys.executable, "-m", "panseg.cli", "pseudolabel", "--model", str(model), "--input", str(images),
           "--output", str(out), "--num-cpus", "2", "--quiet", "--set", "infer.windows_per_batch=4"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    masks = lambda: {p.name for p in out.glob("*.nii.gz")}  # noqa: E731 (atomic writes: no partial file has this name)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(masks() if out.exists() else ()) < 2:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    done, stable_since = masks(), time.monotonic()  # an actor may publish the case it was writing
    while time.monotonic() - stable_since < 3:
        time.sleep(0.5)
        if masks() != done:
            done, stable_since = masks(), time.monotonic()
    assert 2 <= len(done) < 8, "the run finished before it could be killed: use a bigger cohort"
    assert not (out / CSV_NAME).exists()  # written at the end only
    mtimes = {name: (out / name).stat().st_mtime_ns for name in done}

    from panseg.cli import main

    assert main(["pseudolabel", "--model", str(model), "--input", str(images), "--output", str(out), "--quiet",
                 "--set", "infer.windows_per_batch=4"]) == 0  # in this process, on the session's Ray
    rows = read_qa_rows(out)
    assert len(rows) == 8 and len(masks()) == 8
    skipped = {f"{c}.nii.gz" for c, r in rows.items() if r["status"] == "skipped"}
    assert skipped == done and all(r["status"] == "ok" for c, r in rows.items() if f"{c}.nii.gz" not in done)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == mtimes  # not redone
    for case_id, row in rows.items():
        mask = read_volume(out / f"{case_id}.nii.gz")
        assert mask.geometry.matches(read_geometry(images / f"{case_id}_0000.nii.gz")), case_id
        assert mask.array.dtype == np.uint8 and int(mask.array.max()) <= 13, case_id
        assert row["liver_ml"] == pytest.approx(organ_volumes_ml(mask)["liver_ml"])  # measured, also when skipped
        assert isinstance(row["organs_missing"], list)
    assert sum(r["seconds"] is not None and r["seconds"] > 0 for r in rows.values()) == 8 - len(done)


# ----------------------------------------------------------------------------------------------
# Both stages, tiny
# ----------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_two_stage_demo_trains_the_tumor_model_on_pseudo_labels(ray_local, tmp_path, capsys):
    from panseg.demo import run_two_stage_demo
    from panseg.store.zarr_store import case_attrs, open_store, read_case, read_manifest

    paths = run_two_stage_demo(tmp_path / "demo", cases=3, healthy=0, organ_cases=3, seed=0, organ_epochs=1,
                               organ_iterations_per_epoch=2, epochs=1, iterations_per_epoch=2)
    out = capsys.readouterr().out
    assert "organ Dice of the pseudo-labels against the true organs" in out and "8/8 evaluate" in out

    organ_model = load_checkpoint(paths["organ_run"])
    assert organ_model.cfg.preprocess.task == "organs"
    pseudo_rows = read_qa_rows(paths["pseudo_organs"])
    assert sorted(pseudo_rows) == ["phantom_000", "phantom_001", "phantom_002"]

    store = str(paths["store"])
    assert open_store(store).attrs["task"] == "tumor"
    for row in read_manifest(store):
        attrs = case_attrs(store, row["case_id"])
        assert attrs["organs_path"].startswith(str(paths["pseudo_organs"]))  # not the phantom's organsTr
        _, label, _ = read_case(store, row["case_id"])
        assert int(label.max()) <= 14 and (label == 14).any()  # fused: pseudo organs 0-13, tumor 14
    tumor_model = load_checkpoint(paths["run"] / "model_final")
    assert tumor_model.cfg.preprocess.task == "tumor" and tumor_model.epoch == 1
    heads = [v for k, v in tumor_model.model.items() if k.startswith("heads.") and k.endswith(".bias")]
    assert heads and all(v.shape == (15,) for v in heads)
    assert sorted(p.name for p in paths["predictions"].glob("*.nii.gz"))
