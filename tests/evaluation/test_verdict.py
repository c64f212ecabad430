"""The demo's verdict (panseg.evaluation.verdict) and the lesion-wise scores it reads
(panseg.evaluation.lesions): every number in the verdict is the one in the CSVs."""

import numpy as np

from panseg.evaluation.folders import EvaluationResult, write_csv
from panseg.evaluation.lesions import lesion_counts, mean_organ_dice, write_lesion_csv
from panseg.evaluation.metrics import summarize
from panseg.evaluation.verdict import curve_points, format_verdict, read_test_scores


def _metrics_csv(path, rows):
    full = [{"case_id": c, "dsc": d, "nsd": d, "rule": "", "healthy": h, "false_positive": fp if h else None,
             "error": None} for c, d, h, fp in rows]
    result = EvaluationResult(tuple(full), summarize(r["dsc"] for r in full), summarize(r["nsd"] for r in full),
                              0.5, tuple(r["case_id"] for r in full if r["healthy"]), missing=(), unreadable=(),
                              truth_errors=(), extra=(), errors=(), seconds=summarize([]),
                              gpu_area_mb_s=summarize([]))
    return write_csv(result, path)


def test_the_verdict_reports_the_numbers_of_its_csvs(tmp_path):
    # 4 test cases: 2 with lesions (DSC 0.30 and 0.10), 2 healthy (one clean: 1, one with a false positive: 0)
    metrics = _metrics_csv(tmp_path / "metrics.csv", [("a", 0.3, False, None), ("b", 0.1, False, None),
                                                      ("h1", 1.0, True, False), ("h2", 0.0, True, True)])
    lesions = write_lesion_csv([
        {"case_id": "a", "lesions": 3, "lesions_found": 2, "false_components": 1, "organ_dice": 0.6},
        {"case_id": "b", "lesions": 1, "lesions_found": 0, "false_components": 0, "organ_dice": 0.4},
        {"case_id": "h1", "lesions": 0, "lesions_found": 0, "false_components": 0, "organ_dice": 0.5},
        {"case_id": "h2", "lesions": 0, "lesions_found": 0, "false_components": 4, "organ_dice": None},
    ], tmp_path / "lesions.csv")
    scores = read_test_scores(metrics, lesions)
    assert (scores.cases, scores.healthy, scores.healthy_with_fp) == (4, 2, 1)
    assert abs(scores.dsc - 0.35) < 1e-12 and scores.empty_dsc == 0.5 and abs(scores.lesion_case_dsc - 0.2) < 1e-12
    assert scores.lesion_recall == 0.5 and abs(scores.organ_dice - 0.5) < 1e-12
    text = format_verdict(scores, minutes=9.0, val_cases=8, on_gpu=False, curve=[(5.0, 0.05), (10.0, 0.158)])
    assert "9 minutes of training on the CPU; 4 test cases" in text and "8 validation cases" in text
    assert "tumor DSC 35.0% against 50.0% for an empty prediction" in text and "not above it" in text
    assert "2 of 4 are healthy" in text
    assert "on the 2 cases with lesions: DSC 20.0% (an empty prediction: 0%)" in text
    assert "lesions found: 2 of 4 (50.0%)" in text
    assert "healthy cases with a false-positive lesion: 1 of 2" in text
    assert "organ Dice (mean of the organs present): 0.50" in text
    assert "5 min 5.0%, 10 min 15.8%" in text
    assert "too short to beat predicting nothing" in text and "panseg demo --minutes N, or on a GPU" in text
    assert "BENCHMARKS.md" in text and "first beats" not in text  # no curve point is above 50%
    # A curve that passes the empty prediction names the minutes that did, and the command to run them.
    text = format_verdict(scores, minutes=12.0, val_cases=8, on_gpu=False,
                          curve=[(10.0, 0.45), (20.0, 0.55), (40.0, 0.60)])
    assert "on the measured curve a model first beats predicting nothing at 20 minutes (55.0% against 50.0%)" in text
    assert "panseg demo --minutes 20, or on a GPU" in text


def test_a_run_above_the_empty_prediction_says_so(tmp_path):
    metrics = _metrics_csv(tmp_path / "m.csv", [("a", 0.8, False, None), ("h", 1.0, True, False)])
    text = format_verdict(read_test_scores(metrics), minutes=None, val_cases=8, on_gpu=True)
    assert "tumor DSC 90.0% against 50.0%" in text and "above it" in text and "learnt more than" in text
    assert "lesions found" not in text and "organ Dice" not in text and ", or on a GPU" not in text


def test_curve_points_are_read_when_the_results_exist(tmp_path):
    assert curve_points(tmp_path / "absent.json") == [] and curve_points(None) == []
    path = tmp_path / "learning.json"
    path.write_text('{"machine": {}, "recipes": {"panseg": [{"minutes": 5, "tumor_dsc": 0.04}, '
                    '{"minutes": 10, "tumor_dsc": null}], "monai": [{"minutes": 5, "tumor_dsc": 0.0}]}}')
    assert curve_points(path) == [(5.0, 0.04)]


def test_lesion_counts_and_organ_dice_by_hand():
    truth = np.zeros((10, 10, 10), bool)
    truth[1:3, 1:3, 1:3] = True  # lesion 1: found
    truth[6:8, 6:8, 6:8] = True  # lesion 2: missed
    prediction = np.zeros_like(truth)
    prediction[2, 2, 2] = True  # touches lesion 1
    prediction[5, 0, 9] = True  # touches nothing: a false component
    assert lesion_counts(prediction, truth) == (2, 1, 1)
    organs = np.zeros((4, 4, 4), np.uint8)
    organs[:2] = 1
    organs[2:] = 2
    labels = organs.copy()
    labels[3] = 0  # organ 2: half of it predicted -> Dice 2*16/(16+32) = 2/3
    assert abs(mean_organ_dice(labels, organs) - (1 + 2 / 3) / 2) < 1e-12
    assert mean_organ_dice(labels, np.zeros_like(organs)) is None
