"""Real CTs (tests/data/real_ct, from TotalSegmentator's test data): both crops, the body they keep,
preprocessing, and a prediction in each CT's own grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cc3d
import numpy as np
import pytest
import torch

from panseg.config import TUMOR_ID, preset
from panseg.inference.predictor import Predictor, predict_case
from panseg.io import CaseFiles, read_geometry, read_volume
from panseg.preprocessing.case import preprocess_case
from panseg.preprocessing.crop import choose_crop, mask_bbox

DATA = Path(__file__).resolve().parents[1] / "data" / "real_ct"
# case -> share of the body the paper's crop (largest component of HU > 50) leaves out, as measured here
CASES = {"abdomen_3mm": (DATA / "abdomen_3mm.nii.gz", 0.0),  # its box falls back to the body box (guard)
         "ct_table_dicom": (DATA / "ct_table_dicom", 0.1714)}  # arms and subcutaneous fat left out


def reference_body(hu: np.ndarray) -> np.ndarray:
    """The body as cc3d finds it at full resolution: the largest 6-component of HU > -500."""
    return cc3d.largest_k(hu > -500, k=1, connectivity=6).astype(bool)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_body_crop_keeps_the_body_and_the_paper_crop_is_measured(case_id):
    path, paper_lost = CASES[case_id]
    hu = read_volume(path).array
    body = reference_body(hu)
    cfg = preset("paper").preprocess
    paper = choose_crop(hu, None, cfg)
    whole = choose_crop(hu, None, replace(cfg, crop_method="body"))
    lost = {name: 1 - body[d.box.slices].sum() / body.sum() for name, d in (("paper", paper), ("body", whole))}
    assert lost["body"] <= 0.01 and whole.body_lost_fraction == 0.0
    assert whole.box == mask_bbox(body)  # exactly cc3d's box, decided coarsely
    assert whole.box.num_voxels < 0.9 * hu.size  # air (and, in the DICOM series, the table) left out
    assert paper.body_lost_fraction == pytest.approx(lost["paper"])
    assert lost["paper"] == pytest.approx(paper_lost, abs=1e-4)


@pytest.mark.parametrize("case_id", sorted(CASES))
@pytest.mark.parametrize("method", ["largest_component", "body"])
def test_real_cts_preprocess_and_predict_in_their_own_grid(tmp_path, case_id, method):
    path, _ = CASES[case_id]
    cfg = preset("paper")
    cfg = replace(cfg, preprocess=replace(cfg.preprocess, crop_method=method, body_lost_warn_fraction=1.0))
    out = preprocess_case(CaseFiles(case_id, str(path)), cfg.preprocess)
    assert out.status == "unlabelled" and out.image.dtype == np.int16
    assert out.attrs["crop_reason"] in {method, "body_fallback"}
    assert out.attrs["crop_body_lost_fraction"] == pytest.approx(0.0 if method == "body" else CASES[case_id][1],
                                                                 abs=1e-4)

    def bright_is_tumor(image: torch.Tensor) -> torch.Tensor:  # HU > 40 (0.5 after scaling) -> class 14
        logits = torch.zeros((cfg.preprocess.num_classes,) + tuple(image.shape[2:]))
        logits[0] = 0.5
        logits[TUMOR_ID] = image[0, 0]
        return logits

    row = predict_case(Predictor(cfg, bright_is_tumor), path, tmp_path / f"{case_id}.nii.gz", case_id=case_id)
    mask = read_volume(tmp_path / f"{case_id}.nii.gz")
    assert mask.geometry.matches(read_geometry(path))  # the CT's own grid
    box = row["crop_box_zyx"]
    inside = np.zeros(mask.array.shape, dtype=bool)
    inside[box[0]:box[3], box[1]:box[4], box[2]:box[5]] = True
    assert not mask.array[~inside].any()
    expected = (read_volume(path).array > 40) & inside
    overlap = 2 * (mask.array.astype(bool) & expected).sum() / (mask.array.sum() + expected.sum())
    assert overlap > 0.75, overlap  # resampled to 1.6 x 1.29 x 1.29 mm and back: edges differ
