"""Whole-case prediction: geometry restored exactly, classes kept as asked, checkpoints refused,
a real tiny model end to end, the memory-time area.

The synthetic CT (tests/synthetic_ct.py) has a body (60 HU) with a separate table slab (200 HU)
under it, an anisotropic spacing, and a direction that is rotated 30 degrees and flipped, so every
geometry step is exercised.
"""

from dataclasses import replace
import json
import pathlib
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from panseg.config import TUMOR_ID, InferConfig, preset
from panseg.evaluation.metrics import dice
from panseg.inference.predictor import (PreparedCase, Predictor, argmax_uint8, load_predictor, predict_array,
                                        predict_case, prepare_volume, restore_labels)
from panseg.inference.resource_monitor import MemoryTimeMonitor
from panseg.io import Volume, read_geometry, read_volume, write_volume
from panseg.preprocessing.case import CaseError, crop_volume, resample_volume
from panseg.preprocessing.crop import mask_bbox
from panseg.training.checkpoint import CheckpointError, TrainingState, save_checkpoint
from panseg.training.parts import make_model, num_classes_of
from tests.synthetic_ct import DIRECTION, ORIGIN, SHAPE, SPACING, make_case


def one_hot_oracle(label_volume, box, cfg, calls):
    """A LogitsFn returning one-hot logits of the true labels after the training crop + resample."""
    expected = resample_volume(crop_volume(label_volume, box), cfg.preprocess.target_spacing_zyx_mm, "nearest").array
    num_classes = num_classes_of(cfg)

    def logits_fn(image):
        calls.append(tuple(image.shape))
        assert tuple(image.shape[2:]) == expected.shape, "the prepared grid differs from the training grid"
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        return torch.nn.functional.one_hot(torch.from_numpy(expected).long(), num_classes).permute(3, 0, 1, 2).float()

    return logits_fn


# ----------------------------------------------------------------------------------------------
# Geometry with an oracle network
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [SPACING, (1.9, 1.2, 1.4)])  # coarser, then finer than the target grid
def test_oracle_prediction_returns_the_tumor_in_the_original_grid(tiny_cfg, spacing):
    shape = tuple(int(round(n * s / t)) for n, s, t in zip(SHAPE, SPACING, spacing))  # same physical extent
    ct, labels, body = make_case(shape=shape, spacing=spacing)
    box = mask_bbox(body)
    calls = []
    predictor = Predictor(tiny_cfg, one_hot_oracle(ct.with_array(labels), box, tiny_cfg, calls))
    prediction = predictor.predict_volume(ct)
    out = prediction.volume
    assert len(calls) == 1
    assert prediction.box == box and prediction.crop_reason == "largest_component"  # the table is cut away
    assert out.array.shape == ct.array.shape and out.array.dtype == np.uint8
    assert out.spacing_zyx_mm == ct.spacing_zyx_mm
    assert out.origin_xyz_mm == ct.origin_xyz_mm and out.direction_xyz == ct.direction_xyz
    assert set(np.unique(out.array)) == {0, 1}
    assert dice(out.array, labels == TUMOR_ID) > 0.95
    assert set(prediction.seconds) == {"crop", "resample", "clip", "network", "restore"}


def test_mask_is_zero_outside_the_crop_box_and_all_labels_keep_organs(tiny_cfg):
    ct, labels, body = make_case()
    box = mask_bbox(body)
    everywhere_tumor = Predictor(tiny_cfg, lambda image: _constant_logits(image, num_classes_of(tiny_cfg), TUMOR_ID))
    out = everywhere_tumor.predict_volume(ct).volume.array
    inside = np.zeros(ct.array.shape, dtype=bool)
    inside[box.slices] = True
    np.testing.assert_array_equal(out, inside.astype(np.uint8))  # every voxel of the box, nothing else

    all_cfg = replace(tiny_cfg, infer=InferConfig(all_labels=True))
    oracle = one_hot_oracle(ct.with_array(labels), box, all_cfg, [])
    out = Predictor(all_cfg, oracle).predict_volume(ct).volume.array
    assert set(np.unique(out)) == {0, 1, TUMOR_ID}
    assert dice(out == 1, labels == 1) > 0.9


def _tie_voxels(prepared: PreparedCase) -> np.ndarray:
    """Voxels of the crop whose centre lies exactly half-way between two resampled voxels on some axis.

    There nearest neighbour has two answers: panseg rounds half up (ITK's rule) on the exact position,
    while ITK's position comes through the rotated direction matrix and lands a rounding error to
    either side, so SimpleITK's choice there is float noise.
    """
    c, r = prepared.cropped, prepared.resampled
    direction = np.asarray(r.direction_xyz, np.float64).reshape(3, 3)
    offset_zyx = np.linalg.solve(direction, np.subtract(c.origin_xyz_mm, r.origin_xyz_mm))[::-1]
    ties = np.zeros(c.shape_zyx, bool)
    for axis in range(3):
        position = (offset_zyx[axis] + c.spacing_zyx_mm[axis] * np.arange(c.shape_zyx[axis])) / r.spacing_zyx_mm[axis]
        on_tie = np.abs(position - np.floor(position) - 0.5) < 1e-9
        index = [None, None, None]
        index[axis] = slice(None)
        ties |= on_tie[tuple(index)]
    return ties


@pytest.mark.parametrize("target_spacing, many_ties", [(None, False), ((1.6, 1.2859, 1.2859), False),
                                                      ((3.0, 3.7, 2.2), True)])
def test_restoring_labels_is_simpleitks_nearest_neighbour_resampling(tiny_cfg, target_spacing, many_ties):
    """Every label voxel of the CT's grid (30-degree rotated, flipped, anisotropic) is what SimpleITK's
    nearest-neighbour resampling of the same label array onto that grid gives; zeros outside the crop box.

    Exactly so wherever nearest neighbour has one answer; the voxels of exact ties are left out (see
    `_tie_voxels`): a plane or two on the tie-free grids, every other z plane on the last one (4.5 mm
    voxels restored from 3.0 mm), where 0.4% of the crop's voxels differ from SimpleITK.
    """
    pcfg = tiny_cfg.preprocess if target_spacing is None else replace(tiny_cfg.preprocess,
                                                                      target_spacing_zyx_mm=target_spacing)
    ct, _, body = make_case()
    prepared = prepare_volume(ct, pcfg)
    assert prepared.box == mask_bbox(body) and prepared.box.shape_zyx != ct.array.shape
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 15, size=prepared.resampled.shape_zyx, dtype=np.uint8)  # every voxel its own label
    restored = restore_labels(labels, prepared)

    r = prepared.resampled
    small = sitk.GetImageFromArray(labels)
    small.SetSpacing(tuple(float(v) for v in reversed(r.spacing_zyx_mm)))
    small.SetOrigin(tuple(float(v) for v in r.origin_xyz_mm))
    small.SetDirection(tuple(float(v) for v in r.direction_xyz))
    reference = sitk.GetImageFromArray(np.zeros(ct.array.shape, np.uint8))
    reference.SetSpacing(tuple(float(v) for v in reversed(ct.spacing_zyx_mm)))
    reference.SetOrigin(ct.origin_xyz_mm)
    reference.SetDirection(ct.direction_xyz)
    expected = sitk.GetArrayFromImage(sitk.Resample(small, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8))
    inside = np.zeros(ct.array.shape, bool)
    inside[prepared.box.slices] = True
    assert restored.array.dtype == np.uint8 and restored.geometry.matches(ct.geometry)
    ties = np.zeros(ct.array.shape, bool)
    ties[prepared.box.slices] = _tie_voxels(prepared)
    assert ties.any() if many_ties else ties.sum() < 0.1 * inside.sum()  # the others tie on a few planes at most
    assert (inside & ~ties).sum() > 0.4 * inside.sum()
    np.testing.assert_array_equal(restored.array[inside & ~ties], expected[inside & ~ties])
    assert not restored.array[~inside].any()
    assert len(np.unique(restored.array[inside])) == 15


def _constant_logits(image, num_classes, class_id):
    logits = torch.zeros((num_classes, *image.shape[2:]))
    logits[class_id] = 1.0
    return logits


def test_a_ct_without_bright_voxels_is_predicted_whole(tiny_cfg):
    ct = Volume(np.full((12, 20, 24), -1000, dtype=np.int16), SPACING, ORIGIN, DIRECTION)
    prepared = prepare_volume(ct, tiny_cfg.preprocess)
    assert prepared.crop_reason == "no_component" and prepared.box.shape_zyx == (12, 20, 24)
    again = PreparedCase.from_metadata(prepared.image_hu, json.loads(json.dumps(prepared.metadata())))
    assert (again.box, again.crop_reason, again.seconds) == (prepared.box, prepared.crop_reason, prepared.seconds)
    assert again.body_lost_fraction == prepared.body_lost_fraction == 0.0
    assert again.original.matches(prepared.original) and again.cropped.matches(prepared.cropped)
    assert again.resampled.matches(prepared.resampled)


def test_predict_array_scales_to_unit_and_keeps_only_the_tumor():
    image_hu = np.array([[[-500, -160, 40, 240, 900]]], dtype=np.int16)  # (1, 1, 5)
    seen = []

    def logits_fn(image):
        seen.append(image.clone())
        logits = torch.zeros((15, 1, 1, 5))
        logits[TUMOR_ID, 0, 0, 2:] = 1.0  # tumor where image >= 0.5
        logits[3, 0, 0, :2] = 1.0
        return logits

    out = predict_array(image_hu, logits_fn, (-160.0, 240.0))
    torch.testing.assert_close(seen[0][0, 0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(predict_array(image_hu, logits_fn, (-160.0, 240.0), keep_all_labels=True)[0, 0],
                                  [3, 3, 14, 14, 14])
    logits = torch.randn(15, 40, 3, 4)
    torch.testing.assert_close(argmax_uint8(logits, slab=7), logits.argmax(0).to(torch.uint8))


# ----------------------------------------------------------------------------------------------
# Checkpoints and a real (tiny) model
# ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_foreign_checkpoints_are_refused_without_unpickling(tmp_path, tiny_cfg):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "panseg-checkpoint", "format_version": 1, "model": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="not a loadable panseg checkpoint"):
        load_predictor(evil, device="cpu")
    assert not marker.exists()
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError):
        load_predictor(noise, device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a panseg checkpoint"):
        load_predictor(foreign, device="cpu")
    paper_cfg = preset("paper")
    small = make_model(tiny_cfg).state_dict()
    mismatched = save_checkpoint(TrainingState(paper_cfg, 0, small, None, None), tmp_path / "mismatch")
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_predictor(mismatched, device="cpu")


def test_tiny_model_predicts_a_case_end_to_end(tmp_path, tiny_checkpoint):
    ct, _, _ = make_case(seed=1)
    image = write_volume(ct, tmp_path / "case1_0000.nii.gz")
    predictor = load_predictor(tiny_checkpoint.parent, device="cpu")  # a run directory
    assert predictor.logits_fn.model.deep_supervision is False and not predictor.logits_fn.model.training
    row = predict_case(predictor, image, tmp_path / "out" / "case1.nii.gz")
    written = read_volume(tmp_path / "out" / "case1.nii.gz")
    assert written.geometry.matches(read_geometry(image))
    assert written.array.dtype == np.uint8 and set(np.unique(written.array)) <= {0, 1}
    assert row["case_id"] == "case1" and row["status"] == "ok"
    assert row["seconds"] > 0 and row["peak_rss_mb"] > 50 and row["network_s"] > 0
    assert row["gpu_peak_mb"] is None and row["gpu_area_mb_s"] is None  # CPU
    assert row["crop_body_lost_fraction"] == 0.0  # the body is above 50 HU: its box is the paper's
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat_0000.nii.gz"))
    with pytest.raises(CaseError, match="case flat: .* must be a 3D"):
        predict_case(predictor, tmp_path / "flat_0000.nii.gz", tmp_path / "out" / "flat.nii.gz")
    assert not (tmp_path / "out" / "flat.nii.gz").exists()


def test_memory_time_area_integrates_the_samples():
    monitor = MemoryTimeMonitor(lambda: 100.0, interval_s=0.02).start()
    start = time.perf_counter()
    time.sleep(0.3)
    monitor.stop()
    elapsed = time.perf_counter() - start
    assert monitor.peak_mb == 100.0 and monitor.samples >= 5
    assert monitor.area_mb_s == pytest.approx(100.0 * elapsed, rel=0.1)


def test_a_crop_that_cuts_the_body_is_in_the_row_and_warned_about(tmp_path, tiny_cfg):
    from panseg.preprocessing.case import BodyLossWarning

    ct, labels, body = make_case()
    hu = ct.array.copy()
    hu[(hu == 200) | body] = 40  # table and soft tissue below 50 HU: the paper's crop is the tumor's (110 HU)
    hu[labels == TUMOR_ID] = 110
    image = write_volume(ct.with_array(hu), tmp_path / "case1_0000.nii.gz")
    cfg = replace(tiny_cfg, preprocess=replace(tiny_cfg.preprocess, min_body_fraction=0.0))
    predictor = Predictor(cfg, lambda x: torch.zeros((num_classes_of(cfg),) + tuple(x.shape[2:])))
    with pytest.warns(BodyLossWarning, match="case case1: the crop leaves out"):
        row = predict_case(predictor, image, tmp_path / "out" / "case1.nii.gz")
    cut = mask_bbox(labels == TUMOR_ID)
    assert row["crop_box_zyx"] == cut.to_list()
    assert row["crop_body_lost_fraction"] == pytest.approx(1 - body[cut.slices].sum() / body.sum(), abs=1e-4)
    whole = predictor.with_config(replace(cfg, preprocess=replace(cfg.preprocess, crop_method="body")))
    row = predict_case(whole, image, tmp_path / "out" / "case1.nii.gz")
    assert (row["crop_reason"], row["crop_box_zyx"], row["crop_body_lost_fraction"]) == (
        "body", mask_bbox(body).to_list(), 0.0)
