"""nnU-Net v2 model folders in panseg: the folder, the checkpoint loader, nnU-Net's numerics, and the
masks of `panseg predict` against nnU-Net v2's own `nnUNetPredictor` (pinned: nnunetv2==2.8.1)."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from panseg.cli import main
from panseg.infer import read_csv_rows
from panseg.inference.nnunet_model import (NnunetModelError, build_network, fold_checkpoints, is_nnunet_model_folder,
                                           load_nnunet_checkpoint, load_nnunet_model, read_plan)
from panseg.inference.nnunet_predict import lesion_labels, nnunet_gaussian, nnunet_window_starts
from panseg.inference.nnunet_resample import new_shape_for, resample
from panseg.io import read_volume
from tests.inference.nnunet_folder import ANISOTROPIC, FULLRES, LABELS, write_cases, write_model_folder
from tests.optional import import_optional

NNUNET_INSTALL = ("pip install --no-deps nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 "
                  "acvl-utils==0.2.6 dynamic-network-architectures==0.4.4 && pip install tqdm scikit-image nibabel "
                  "blosc2 seaborn scikit-learn yacs (README)")
CASES = {  # plan, CT shape (z, y, x), CT spacing (z, y, x) mm
    "fullres": (FULLRES, (20, 48, 44), (2.5, 1.2, 1.2)),
    "anisotropic": (ANISOTROPIC, (40, 40, 10), (1.0, 1.0, 5.0)),  # 5 mm along x: separate-axis resampling
}


def _nnunet():
    return import_optional("nnunetv2.inference.predict_from_raw_data", NNUNET_INSTALL)


# ----------------------------------------------------------------------------------------------
# The folder and its checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fullres_folder(tmp_path_factory):
    _nnunet()  # the weights come from nnU-Net's own network
    return write_model_folder(tmp_path_factory.mktemp("nnunet_fullres"), FULLRES)


def test_folder_is_recognised_and_folds_resolved(fullres_folder, tmp_path):
    assert is_nnunet_model_folder(fullres_folder)
    assert not is_nnunet_model_folder(tmp_path)
    assert [p.parent.name for p in fold_checkpoints(fullres_folder)] == ["fold_0", "fold_1"]
    assert [p.parent.name for p in fold_checkpoints(fullres_folder, ["1"])] == ["fold_1"]
    with pytest.raises(NnunetModelError, match="fold 3 has no checkpoint_final.pth or checkpoint_best.pth"):
        fold_checkpoints(fullres_folder, [3])
    with pytest.raises(NnunetModelError, match="'x' is not a fold"):
        fold_checkpoints(fullres_folder, ["x"])


def test_checkpoint_with_nnunets_numpy_scalars_loads_with_weights_only(fullres_folder):
    payload = load_nnunet_checkpoint(fullres_folder / "fold_0" / "checkpoint_final.pth")
    assert isinstance(payload["_best_ema"], np.float64) and payload["_best_ema"] == pytest.approx(0.11)
    assert payload["logging"]["train_losses"][1] == pytest.approx(0.9)
    model = load_nnunet_model(fullres_folder, [0, 1])
    assert len(model.fold_weights) == 2 and model.mirror_axes == (0, 1, 2)
    assert not torch.equal(model.fold_weights[0]["heads.1.weight"], model.fold_weights[1]["heads.1.weight"])


def test_checkpoint_holding_another_object_is_refused(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "logging": {"where": pathlib.PurePosixPath("/x")}}, path)
    with pytest.raises(NnunetModelError, match=r"PurePosixPath, which is not allowed"):
        load_nnunet_checkpoint(path)


def test_plans_naming_another_network_are_refused_naming_it(fullres_folder, tmp_path):
    folder = shutil.copytree(fullres_folder, tmp_path / fullres_folder.name)
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnunetModelError, match="ResidualEncoderUNet; panseg builds nnU-Net's PlainConvUNet"):
        build_network(read_plan(folder))


def test_cli_reports_a_missing_fold_before_starting_ray(fullres_folder, tmp_path, capsys):
    cases = write_cases(tmp_path / "in", (12, 20, 20), (2.0, 1.6, 1.6), cases=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(fullres_folder), "--input", str(cases), "--output", str(tmp_path / "o"),
              "--folds", "4"])
    assert exit_info.value.code == 2
    assert "fold 4 has no checkpoint_final.pth or checkpoint_best.pth in fold_4/" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_lesion_labels_by_name_or_the_only_foreground():
    assert lesion_labels(LABELS) == (2,)
    assert lesion_labels({"background": 0, "kidney": 1}) == (1,)
    with pytest.raises(NnunetModelError, match="pass --all-labels"):
        lesion_labels({"background": 0, "liver": 1, "spleen": 2})


# ----------------------------------------------------------------------------------------------
# nnU-Net's numerics, against nnU-Net's own functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(16, 32, 32), (8, 32, 32), (5, 7, 9)])
def test_gaussian_is_nnunets(patch):
    sw = import_optional("nnunetv2.inference.sliding_window_prediction", NNUNET_INSTALL)
    theirs = sw.compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).float()
    torch.testing.assert_close(nnunet_gaussian(patch), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("size,window", [(22, 16), (36, 32), (32, 32), (110, 64), (97, 41)])
def test_window_starts_are_nnunets(size, window):
    sw = import_optional("nnunetv2.inference.sliding_window_prediction", NNUNET_INSTALL)
    assert nnunet_window_starts(size, window, 0.5) == sw.compute_steps_for_sliding_window((size,), (window,), 0.5)[0]


@pytest.mark.parametrize("shape,spacing,new_spacing,order,order_z", [
    ((2, 20, 33, 30), (1.0, 1.0, 1.0), (0.8, 1.3, 1.1), 3, 0),  # 3D spline
    ((2, 12, 40, 37), (4.0, 1.0, 1.0), (2.0, 1.4, 1.4), 3, 0),  # separate z, nearest along it
    ((3, 12, 40, 37), (4.0, 1.0, 1.0), (2.0, 1.4, 1.4), 1, 0),  # probabilities: linear in plane
    ((3, 20, 33, 30), (1.0, 1.0, 1.0), (0.8, 1.3, 1.1), 1, 0),  # probabilities: trilinear
    ((1, 30, 12, 37), (1.0, 4.5, 1.0), (1.2, 3.0, 1.4), 3, 1),  # separate axis 1, linear along it
])
def test_resampling_is_nnunets(shape, spacing, new_spacing, order, order_z):
    rs = import_optional("nnunetv2.preprocessing.resampling.default_resampling", NNUNET_INSTALL)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    new_shape = new_shape_for(shape[1:], spacing, new_spacing)
    theirs = rs.resample_data_or_seg_to_shape(x, new_shape, spacing, new_spacing, False, order, order_z, None)
    ours = resample(x, new_shape, spacing, new_spacing, order, order_z, None).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-5)


# ----------------------------------------------------------------------------------------------
# Agreement: panseg predict against nnUNetPredictor
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnunet_runs(tmp_path_factory):
    """Per case kind: the model folder, its input CT and nnUNetPredictor's masks for folds (0,) and (0, 1)."""
    module = _nnunet()
    runs = {}
    for kind, (plan, shape, spacing) in CASES.items():
        root = tmp_path_factory.mktemp(f"nnunet_{kind}")
        folder = write_model_folder(root, plan)
        cases = write_cases(root / "in", shape, spacing, cases=1)
        for folds in ((0,), (0, 1)):
            out = root / f"nnunet_{len(folds)}"
            out.mkdir()
            predictor = module.nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
            predictor.predict_from_files_sequential(str(cases), str(out), save_probabilities=False, overwrite=True)
            runs[kind, folds] = (folder, cases, out)
    return runs


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, dict[int, float]]:
    dice = {}
    for k in range(1, len(LABELS)):
        a, b = ours == k, theirs == k
        if a.any() or b.any():
            dice[k] = 2 * (a & b).sum() / (a.sum() + b.sum())
    return float((ours == theirs).mean()), dice


@pytest.mark.ray
@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("folds", [(0,), (0, 1)], ids=["one_fold", "two_folds"])
def test_panseg_predict_gives_nnunets_masks(nnunet_runs, kind, folds, ray_local, tmp_path):
    """All labels (two folds) or the lesion mask (one fold) in each CT's own grid, against nnU-Net's."""
    folder, cases, reference = nnunet_runs[kind, folds]
    argv = ["predict", "--model", str(folder), "--input", str(cases), "--output", str(tmp_path),
            "--folds", *map(str, folds), "--quiet"]
    all_labels = len(folds) == 2
    assert main(argv + (["--all-labels"] if all_labels else [])) == 0
    for ct in sorted(cases.glob("*_0000.nii.gz")):
        name = ct.name.replace("_0000", "")
        ours, theirs = read_volume(tmp_path / name), read_volume(reference / name)
        assert ours.geometry == read_volume(ct).geometry == theirs.geometry
        expected = theirs.array if all_labels else (theirs.array == LABELS["tumor"]).astype(np.uint8)
        agreement, dice = _agreement(ours.array, expected)
        assert agreement >= 0.999, (kind, folds, agreement)
        assert dice and all(d >= 0.99 for d in dice.values()), (kind, folds, dice)
        assert len(np.unique(expected)) > 1  # the comparison is not between two empty masks


@pytest.mark.ray
def test_nnunet_predict_resumes_and_redoes_other_settings(nnunet_runs, ray_local, tmp_path, capsys):
    folder, cases, _ = nnunet_runs["anisotropic", (0,)]
    argv = ["predict", "--model", str(folder), "--input", str(cases), "--output", str(tmp_path), "--folds", "0",
            "--quiet"]
    assert main(argv) == 0
    first = read_csv_rows(tmp_path / "predictions.csv")["case_0"]["model_id"]
    assert main(argv) == 0
    assert "0 predicted, 1 already there" in capsys.readouterr().out
    assert main(argv + ["--set", "infer.mirror_tta=false"]) == 0
    assert "1 predicted, 0 already there" in capsys.readouterr().out
    second = read_csv_rows(tmp_path / "predictions.csv")["case_0"]
    assert second["status"] == "ok" and second["model_id"].startswith("sha256:") and second["model_id"] != first
    assert float(second["wait_s"]) >= 0.0  # the actor's wait for its input, as for panseg models (infer.CaseActor)


@pytest.mark.parametrize("scheme,use_mask", [("ZScoreNormalization", True), ("ZScoreNormalization", False),
                                             ("CTNormalization", False)])
def test_normalisation_is_nnunets(fullres_folder, scheme, use_mask):
    """panseg's normalisation of a cropped CT (zeros around a body) against nnU-Net's own normaliser classes."""
    schemes = import_optional("nnunetv2.preprocessing.normalization.default_normalization_schemes", NNUNET_INSTALL)
    cropping = import_optional("nnunetv2.preprocessing.cropping.cropping", NNUNET_INSTALL)
    from dataclasses import replace

    from panseg.inference.nnunet_preprocess import normalize

    plan = replace(read_plan(fullres_folder), normalization_schemes=(scheme,), use_mask_for_norm=(use_mask,))
    data = np.zeros((1, 12, 20, 18), dtype=np.float32)
    data[0, 2:10, 3:17, 2:16] = np.random.default_rng(1).normal(40, 200, size=(8, 14, 14))
    data[0, 5, 8, 8] = 0  # a hole: nnU-Net's nonzero mask fills it
    _, seg, _ = cropping.crop_to_nonzero(data.copy())  # -1 outside the filled nonzero mask
    normaliser = getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=plan.intensity_properties[0])
    theirs = normaliser.run(data[0].copy(), np.pad(seg[0], [(a, data.shape[i + 1] - b) for i, (a, b) in
                                                            enumerate(_bbox(data))], constant_values=-1))
    np.testing.assert_allclose(normalize(data.copy(), plan)[0], theirs, rtol=1e-5, atol=1e-5)


def _bbox(data: np.ndarray) -> list[tuple[int, int]]:
    from panseg.inference.nnunet_preprocess import nonzero_bbox

    return list(nonzero_bbox(data))
