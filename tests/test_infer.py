"""`panseg predict` over a folder (panseg.infer): the actor plan, and folder prediction with Ray that
streams cases, records a bad one and resumes. The whole-case predictor's tests are in
tests/inference/test_predictor.py."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from panseg.infer import (CSV_NAME, mask_model_id, mask_notes, model_id, plan_actors, plan_folder, predict_folder,
                          read_csv_rows, remove_stale_masks, reusable, write_csv_rows)
from panseg.io import Volume, read_geometry, write_volume
from panseg.training.checkpoint import load_checkpoint, resolve_checkpoint_file
from tests.synthetic_ct import make_case


def test_actor_plan_leaves_cpus_for_reading():
    assert plan_actors(2, 0, use_gpu=False) == plan_actors(2.0, 0, False)
    cpu2 = plan_actors(2, 0, use_gpu=False)
    assert (cpu2.actors, cpu2.cpus_per_actor, cpu2.prepare_tasks) == (1, 1.0, 1)
    cpu64 = plan_actors(64, 0, use_gpu=False)
    assert cpu64.cpus_per_actor == 8 and cpu64.actors * 8 < 64
    gpu4 = plan_actors(32, 4, use_gpu=True)
    assert (gpu4.actors, gpu4.gpus_per_actor, gpu4.cpus_per_actor) == (4, 1.0, 1.0)
    # A GPU node keeps 4 cases in preparation per GPU (a CPU one 2 per actor), as its free CPUs allow.
    assert gpu4.prepare_tasks == 16 and plan_actors(16, 1, use_gpu=True).prepare_tasks == 4
    assert plan_actors(4, 1, use_gpu=True).prepare_tasks == 3  # 3 CPUs left beside the actor's
    assert plan_actors(16, 0, use_gpu=False).prepare_tasks == 2
    with pytest.raises(ValueError, match="needs a GPU"):
        plan_actors(8, 0, use_gpu=True)
    # Reading never waits for CPUs the actors hold: every plan leaves room for a prepare task.
    for cpus, gpus, use_gpu in [(1, 0, False), (0.5, 0, False), (2, 0, False), (3, 0, False), (64, 0, False),
                                (1, 1, True), (4, 4, True), (32, 4, True)]:
        plan = plan_actors(cpus, gpus, use_gpu)
        held = plan.actors * plan.cpus_per_actor + plan.prepare_tasks * plan.cpus_per_prepare
        assert plan.cpus_per_prepare > 0 and held <= cpus + 1e-9, (cpus, gpus, plan)
    one = plan_actors(1, 0, use_gpu=False)
    assert (one.actors, one.cpus_per_actor, one.prepare_tasks, one.cpus_per_prepare) == (1, 0.5, 1, 0.5)
    with pytest.raises(ValueError, match="no CPU"):
        plan_actors(0, 0, use_gpu=False)


# ----------------------------------------------------------------------------------------------
# Which model wrote a mask, and what is redone (no Ray)
# ----------------------------------------------------------------------------------------------


def test_model_id_is_the_checkpoints_content_and_the_inference_settings(tiny_checkpoint, tmp_path):
    file = resolve_checkpoint_file(tiny_checkpoint)
    infer = load_checkpoint(file).cfg.infer
    ours = model_id(file, infer)
    assert ours.startswith("sha256:") and len(ours) == len("sha256:") + 16
    copied = shutil.copy(file, tmp_path / "copy.pt")  # another path and mtime, the same model
    assert model_id(copied, infer) == ours
    assert model_id(file, replace(infer, mirror_tta=not infer.mirror_tta)) != ours
    with open(copied, "ab") as f:  # other bytes: another model
        f.write(b"\0")
    assert model_id(copied, infer) != ours
    assert len(mask_notes(ours)) <= 80  # fits a NIfTI header's descrip


def test_reusable_only_for_this_models_masks():
    assert reusable("sha256:aaaa", "sha256:aaaa")
    assert not reusable("sha256:bbbb", "sha256:aaaa")
    assert not reusable(None, "sha256:aaaa")  # a mask from before ids were recorded, or written by hand
    assert reusable(None, None) and reusable("sha256:bbbb", None)  # a caller that does not track models


def _tiny_volume(value=0):
    return Volume(np.full((3, 4, 5), value, np.int16), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def test_plan_folder_skips_this_models_masks_and_redoes_the_others(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for case in ("same", "other", "unmarked", "broken", "new"):
        write_volume(_tiny_volume(), inputs / f"{case}_0000.nii.gz")
    ours, theirs = "sha256:1111111111111111", "sha256:2222222222222222"
    write_volume(_tiny_volume(), outputs / "same.nii.gz", notes=mask_notes(ours))
    write_volume(_tiny_volume(), outputs / "other.nii.gz", notes=mask_notes(theirs))
    write_volume(_tiny_volume(), outputs / "unmarked.nii.gz")
    (outputs / "broken.nii.gz").write_bytes(b"not a nifti")
    # The earlier CSV says all were written by us: the header decides, not a row that may be stale.
    write_csv_rows([{"case_id": c, "status": "ok", "seconds": 4.5, "model_id": ours}
                    for c in ("same", "other", "unmarked")], outputs / CSV_NAME)
    assert mask_model_id(outputs / "same.nii.gz") == ours and mask_model_id(outputs / "unmarked.nii.gz") is None

    rows, todo = plan_folder(inputs, outputs, CSV_NAME, ours)
    assert [(r["case_id"], r["status"], r["seconds"], r["model_id"]) for r in rows] == [("same", "skipped", 4.5, ours)]
    assert [c.case_id for c in todo] == ["broken", "new", "other", "unmarked"]
    removed = remove_stale_masks(todo, outputs)
    assert sorted(p.name for p in removed) == ["broken.nii.gz", "other.nii.gz", "unmarked.nii.gz"]
    assert sorted(p.name for p in outputs.glob("*.nii.gz")) == ["same.nii.gz"]

    untracked_rows, untracked_todo = plan_folder(inputs, tmp_path / "fresh", CSV_NAME, None)
    assert untracked_rows == [] and len(untracked_todo) == 5


# ----------------------------------------------------------------------------------------------
# Folder prediction with Ray
# ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_predict_folder_streams_cases_records_a_bad_one_and_resumes(tmp_path, tiny_checkpoint, ray_local):
    """Uses conftest's session Ray (address='local', 2 CPUs, auth and usage stats off, shut down at the end)."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for i in (1, 2):
        write_volume(make_case(seed=i, shape=(24, 48, 56))[0], inputs / f"good{i}_0000.nii.gz")
    sitk.WriteImage(sitk.Image(30, 30, sitk.sitkInt16), str(inputs / "flat_0000.nii.gz"))

    rows = predict_folder(tiny_checkpoint, inputs, outputs, progress=False)
    by_id = {r["case_id"]: r for r in rows}
    assert [r["case_id"] for r in rows] == ["flat", "good1", "good2"]
    assert by_id["flat"]["status"] == "failed" and "case flat" in by_id["flat"]["error"]
    assert "3D" in by_id["flat"]["error"]
    for case in ("good1", "good2"):
        assert by_id[case]["status"] == "ok"
        assert read_geometry(outputs / f"{case}.nii.gz").matches(read_geometry(inputs / f"{case}_0000.nii.gz"))
    assert not (outputs / "flat.nii.gz").exists()
    csv_rows = read_csv_rows(outputs / CSV_NAME)
    assert csv_rows["flat"]["status"] == "failed" and "case flat" in csv_rows["flat"]["error"]
    assert csv_rows["good1"]["seconds"] > 0 and csv_rows["good1"]["peak_rss_mb"] > 0
    assert csv_rows["good1"]["gpu_area_mb_s"] is None and len(csv_rows["good1"]["crop_box_zyx"]) == 6

    mtime = (outputs / "good1.nii.gz").stat().st_mtime_ns
    again = {r["case_id"]: r for r in predict_folder(tiny_checkpoint, inputs, outputs, progress=False)}
    assert again["good1"]["status"] == again["good2"]["status"] == "skipped"
    assert again["flat"]["status"] == "failed"
    assert (outputs / "good1.nii.gz").stat().st_mtime_ns == mtime
    assert read_csv_rows(outputs / CSV_NAME)["good2"]["seconds"] == csv_rows["good2"]["seconds"]


@pytest.mark.ray
@pytest.mark.slow
def test_predict_finishes_on_a_one_cpu_ray(tmp_path, tiny_checkpoint):
    """`panseg predict --num-cpus 1`: the actor must not hold the only CPU the prepare tasks wait for
    (issue 20: it hung with nothing written after 150 s; two small cases take ~15 s with 2 CPUs)."""
    import subprocess
    import sys

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for i in (1, 2):
        write_volume(make_case(seed=i, shape=(24, 48, 56))[0], inputs / f"good{i}_0000.nii.gz")
    cmd = [sys.executable, "-m", "panseg.cli", "predict", "--model", str(tiny_checkpoint), "--input", str(inputs),
           "--output", str(outputs), "--num-cpus", "1"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in outputs.glob("*.nii.gz")) == ["good1.nii.gz", "good2.nii.gz"]


@pytest.mark.ray
@pytest.mark.slow
def test_predict_cli_records_the_model_and_redoes_another_models_masks(tmp_path, tiny_checkpoint, ray_local, capsys):
    """Through `panseg predict`: the second run with other inference settings is another model, so every
    mask is predicted again and its header and row carry the new id; a third, same-settings run skips."""
    from panseg.cli import main

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_volume(make_case(seed=1, shape=(24, 48, 56))[0], inputs / "good1_0000.nii.gz")
    argv = ["predict", "--model", str(tiny_checkpoint), "--input", str(inputs), "--output", str(outputs), "--quiet"]
    assert main(argv) == 0
    first = read_csv_rows(outputs / CSV_NAME)["good1"]
    assert first["status"] == "ok" and first["model_id"] == mask_model_id(outputs / "good1.nii.gz")

    mirrored = load_checkpoint(tiny_checkpoint).cfg.infer.mirror_tta
    assert main(argv + ["--set", f"infer.mirror_tta={str(not mirrored).lower()}"]) == 0
    second = read_csv_rows(outputs / CSV_NAME)["good1"]
    assert second["status"] == "ok" and second["model_id"] != first["model_id"]
    assert mask_model_id(outputs / "good1.nii.gz") == second["model_id"]
    assert "1 predicted, 0 already there" in capsys.readouterr().out

    assert main(argv + ["--set", f"infer.mirror_tta={str(not mirrored).lower()}"]) == 0
    assert read_csv_rows(outputs / CSV_NAME)["good1"]["status"] == "skipped"


def test_predictor_actor_rows_show_the_time_it_waited_for_input(tmp_path, tiny_checkpoint):
    import json
    import time

    from panseg.infer import PredictorActor, prepare_row
    from panseg.config import to_dict
    from panseg.training.checkpoint import load_checkpoint as load

    image = write_volume(make_case(seed=1, shape=(24, 48, 56))[0], tmp_path / "case1_0000.nii.gz")
    preprocess = json.dumps(to_dict(load(tiny_checkpoint).cfg.preprocess))
    prepared = prepare_row({"case_id": "case1", "image": str(image), "output": str(tmp_path / "case1.nii.gz")},
                           preprocess)
    batch = {key: np.array([value], dtype=object) for key, value in prepared.items()}
    batch["image"] = [prepared["image"]]
    actor = PredictorActor(str(tiny_checkpoint))
    first = json.loads(actor(batch)["row_json"][0])
    time.sleep(0.5)  # the next case arrives half a second after the first is written
    second = json.loads(actor(batch)["row_json"][0])
    assert first["status"] == second["status"] == "ok"
    assert 0.5 <= second["wait_s"] < 0.8  # the sleep, not the prediction (its own predict_s)
    assert first["wait_s"] >= 0.0
