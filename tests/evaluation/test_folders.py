"""Folder evaluation (panseg.evaluation.folders): missing, extra, mismatched and healthy cases scored
as FLARE 2024 Task 1 does, the table and the CSV."""

import numpy as np
import pytest

from panseg.evaluation.folders import evaluate_folders, format_table, write_csv
from panseg.io import Volume, write_volume


def _mask(shape=(10, 12, 14), box=None, spacing=(2.0, 1.0, 1.0)):
    array = np.zeros(shape, np.uint8)
    if box is not None:
        array[box] = 1
    return Volume(array, spacing, (0.0, 0.0, 0.0))


def test_evaluate_folders_scores_missing_extra_mismatched_and_healthy_cases(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    lesion = np.s_[3:7, 4:9, 5:10]
    for case in ("perfect", "missing", "moved"):
        write_volume(_mask(box=lesion), gt / f"{case}.nii.gz")
    for case in ("healthy_fp", "healthy_ok"):
        write_volume(_mask(), gt / f"{case}.nii.gz")
    write_volume(_mask(box=lesion), pred / "perfect.nii.gz")
    write_volume(_mask(box=lesion, spacing=(2.5, 1.0, 1.0)), pred / "moved.nii.gz")
    write_volume(_mask(box=np.s_[0:1, 0:1, 0:1]), pred / "healthy_fp.nii.gz")
    write_volume(_mask(), pred / "healthy_ok.nii.gz")
    write_volume(_mask(box=lesion), pred / "stray.nii.gz")

    result = evaluate_folders(pred, gt)
    rows = {r["case_id"]: r for r in result.rows}
    assert (rows["perfect"]["dsc"], rows["perfect"]["nsd"], rows["perfect"]["rule"]) == (1.0, 1.0, "scored")
    assert (rows["missing"]["dsc"], rows["missing"]["rule"]) == (0.0, "missing")
    assert rows["moved"]["rule"] == "geometry_mismatch" and rows["moved"]["dsc"] == 0.0
    message = next(e for e in result.errors if "moved" in e)
    assert "case moved" in message and "(2.5, 1.0, 1.0)" in message and "(2.0, 1.0, 1.0)" in message
    assert rows["healthy_ok"]["rule"] == "both_empty" and rows["healthy_fp"]["rule"] == "one_empty"
    assert result.missing == ("missing",) and result.extra == ("stray",)
    assert result.unreadable == ("moved",) and result.truth_errors == ()
    assert result.healthy_ids == ("healthy_fp", "healthy_ok")
    assert result.false_positive_rate == 0.5
    assert result.dsc.n == 5 and result.dsc.mean == pytest.approx(2 / 5)
    table = format_table(result)
    assert "DSC (%)" in table and "40.00 ± 48.99" in table and "stray" in table and "50.0%" in table
    assert "cases: 5, scored 3, missing 1, unreadable or off-grid 1 (scored 0, as FLARE does)" in table
    assert "healthy: 2, false-positive rate on healthy: 50.0% (1 of 2 predicted)" in table
    assert "Inference Time" not in table  # no predictions.csv
    # perfect 1, missing 0, moved 0; an empty prediction everywhere scores the 2 healthy of 5 cases
    assert "cases with lesions: DSC 33.33% (mean of 3); predicting no lesion anywhere would score 40.00%" in table
    written = write_csv(result, tmp_path / "scores.csv").read_text().splitlines()
    assert written[0].startswith("case_id,dsc,nsd,rule") and len(written) == 6

    only_given = evaluate_folders(pred, gt, healthy_ids=["healthy_ok"])
    assert only_given.healthy_ids == ("healthy_ok",) and only_given.false_positive_rate == 0.0
