"""The demo's closing verdict, in numbers read back from the CSVs it wrote (so they always match them).

Like is compared with like: the test cases' mean tumor DSC beside what predicting no lesion anywhere
scores on the same cases (the FLARE rules give an empty prediction DSC 1 on a healthy case and 0 on a
lesion case), the DSC on the lesion cases alone beside 0, the share of true lesions found, the healthy
cases with false positives, and the organ Dice. Pure: reads CSVs, returns text.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestScores:
    """The test set's figures (DSC as fractions)."""

    cases: int
    healthy: int
    dsc: float  # mean over every test case, FLARE rules
    empty_dsc: float  # what an empty prediction scores on the same cases: the healthy share
    lesion_case_dsc: float | None  # mean over the cases with lesions (an empty prediction: 0)
    healthy_with_fp: int
    lesions: int | None
    lesions_found: int | None
    organ_dice: float | None

    @property
    def lesion_recall(self) -> float | None:
        return None if not self.lesions else self.lesions_found / self.lesions


def _read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_test_scores(metrics_csv: str | Path, lesions_csv: str | Path | None = None) -> TestScores:
    """The figures of `metrics_csv` (evaluation.folders.write_csv: dsc, healthy, false_positive per case)
    and of `lesions_csv` (evaluation.lesions.write_lesion_csv), when given."""
    rows = _read_rows(metrics_csv)
    if not rows:
        raise ValueError(f"{metrics_csv} holds no case")
    healthy = [r for r in rows if r["healthy"] == "True"]
    lesion = [float(r["dsc"]) for r in rows if r["healthy"] != "True"]
    lesions = found = organ = None
    if lesions_csv is not None:
        extra = _read_rows(lesions_csv)
        lesions = sum(int(r["lesions"]) for r in extra)
        found = sum(int(r["lesions_found"]) for r in extra)
        organs = [float(r["organ_dice"]) for r in extra if r["organ_dice"] != ""]
        organ = sum(organs) / len(organs) if organs else None
    return TestScores(
        cases=len(rows), healthy=len(healthy), dsc=sum(float(r["dsc"]) for r in rows) / len(rows),
        empty_dsc=len(healthy) / len(rows), lesion_case_dsc=sum(lesion) / len(lesion) if lesion else None,
        healthy_with_fp=sum(r["false_positive"] == "True" for r in healthy), lesions=lesions, lesions_found=found,
        organ_dice=organ)


def curve_points(learning_json: str | Path | None, recipe: str = "panseg") -> list[tuple[float, float]]:
    """(minutes, tumor DSC) of `recipe` in bench/results/learning.json; [] when it is absent."""
    if learning_json is None or not Path(learning_json).is_file():
        return []
    points = json.loads(Path(learning_json).read_text()).get("recipes", {}).get(recipe, [])
    return [(float(p["minutes"]), float(p["tumor_dsc"])) for p in points if p.get("tumor_dsc") is not None]


def format_verdict(scores: TestScores, minutes: float | None, val_cases: int, on_gpu: bool,
                   curve: list[tuple[float, float]] = ()) -> str:
    """The verdict's lines (module docstring); `val_cases` picked model_best and are not among the test cases."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    budget = "no time limit" if minutes is None else f"{minutes:g} minutes of training"
    lines = [f"verdict ({budget} on {'a GPU' if on_gpu else 'the CPU'}; {scores.cases} test cases against the "
             f"complete truth, none of them seen in training or in choosing model_best, which {val_cases} "
             f"validation cases picked):"]
    above = scores.dsc > scores.empty_dsc
    lines.append(f"  tumor DSC {pct(scores.dsc)} against {pct(scores.empty_dsc)} for an empty prediction on the "
                 f"same cases ({scores.healthy} of {scores.cases} are healthy, where predicting nothing scores 1): "
                 + ("above it" if above else "not above it"))
    if scores.lesion_case_dsc is not None:
        lines.append(f"  on the {scores.cases - scores.healthy} cases with lesions: DSC {pct(scores.lesion_case_dsc)} "
                     f"(an empty prediction: 0%)")
    if scores.lesion_recall is not None:
        lines.append(f"  lesions found: {scores.lesions_found} of {scores.lesions} ({pct(scores.lesion_recall)})")
    if scores.healthy:
        lines.append(f"  healthy cases with a false-positive lesion: {scores.healthy_with_fp} of {scores.healthy}")
    if scores.organ_dice is not None:
        lines.append(f"  organ Dice (mean of the organs present): {scores.organ_dice:.2f}")
    if curve:
        lines.append("  measured curve (bench/results/learning.json: the demo's recipe on 2 CPU cores, models kept at "
                     "these minutes of one longer run): "
                     + ", ".join(f"{m:g} min {pct(d)}" for m, d in curve))
    more = "" if on_gpu else ", or on a GPU, where the demo trains the same minutes in one process"
    beats = next(((m, d) for m, d in curve if d > scores.empty_dsc), None)  # the curve's first point above empty
    minutes_hint = "N"
    if not above and beats is not None and not on_gpu:
        minutes_hint = f"{beats[0]:g}"
        lines.append(f"  on the measured curve a model first beats predicting nothing at {beats[0]:g} minutes "
                     f"({pct(beats[1])} against {pct(scores.empty_dsc)})")
    lines.append(("  this run learnt more than predicting nothing. " if above else
                  "  this run is too short to beat predicting nothing. ")
                 + f"For more, train longer: panseg demo --minutes {minutes_hint}{more}; BENCHMARKS.md's "
                 f"time-to-accuracy section (bench/learning.py) shows the DSC reached after how many minutes.")
    return "\n".join(lines)


__all__ = ["TestScores", "curve_points", "format_verdict", "read_test_scores"]
