"""Evaluation of a prediction folder against a ground-truth folder, FLARE 2024 Task 1 style.

Both folders hold `<case>.nii.gz` masks (any SimpleITK format; hidden files are ignored). Each
ground-truth case is scored with `metrics.flare_case_scores` at the ground truth's spacing. Beyond the
organisers' per-case rules:

    no prediction for a ground-truth case        -> DSC 0, NSD 0, rule 'missing' (listed)
    a prediction for no ground-truth case         -> ignored (listed as extra)
    a prediction on another grid than its ground  -> DSC 0, NSD 0, rule 'geometry_mismatch'; the error
      truth (shape, spacing, origin, direction)      names the case and both geometries
    an unreadable mask, or non-integer floats     -> DSC 0, NSD 0, rule 'read_error'

Healthy cases are those in `healthy_ids`, or when not given, those whose ground truth is empty; the
false-positive rate is the share of healthy cases whose (readable, on-grid) prediction has any lesion
voxel: it counts only the healthy cases that were scored, and the table says how many were not
("3 of 3 predicted; 13 missing"). DSC and NSD summaries are over every ground-truth case, healthy ones included (as the FLARE
rules score them: 1/1 for an empty prediction). When `pred_dir/predictions.csv` (from
`panseg.infer`) is present, inference time and GPU memory-time area are summarised too.

Kept out of `panseg.evaluation.metrics` (pure array scores) to keep that module small; it imports panseg.io.
"""

from __future__ import annotations

import csv
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from panseg.evaluation.metrics import FLARE_TOLERANCE_MM, Summary, false_positive_rate, flare_case_scores, summarize
from panseg.io import ImageReadError, Volume, read_volume, strip_image_suffix

ROW_COLUMNS = ("case_id", "dsc", "nsd", "rule", "healthy", "false_positive", "error")
PREDICTION_FAULTS = ("read_error", "geometry_mismatch")  # a prediction that is there but cannot be scored
TRUTH_READ_ERROR = "truth_read_error"


@dataclass(frozen=True)
class EvaluationResult:
    """Per-case rows and their summaries.

    Attributes:
        rows: one dict per ground-truth case (ROW_COLUMNS), sorted by case id.
        dsc, nsd: summaries over every row.
        false_positive_rate: share of healthy cases with a predicted lesion; NaN without healthy cases.
        healthy_ids: the healthy cases.
        missing: ground-truth cases without a prediction.
        unreadable: cases whose prediction exists but could not be scored (unreadable, non-integer, or on
            another grid than its ground truth); scored 0 like the missing ones.
        truth_errors: cases whose ground truth could not be read.
        extra: predictions without a ground-truth case (ignored).
        errors: one message per case that could not be scored normally (mismatch, unreadable).
        seconds, gpu_area_mb_s: from predictions.csv (n = 0 when absent or not measured).
    """

    rows: tuple[dict, ...]
    dsc: Summary
    nsd: Summary
    false_positive_rate: float
    healthy_ids: tuple[str, ...]
    missing: tuple[str, ...]
    unreadable: tuple[str, ...]
    truth_errors: tuple[str, ...]
    extra: tuple[str, ...]
    errors: tuple[str, ...]
    seconds: Summary
    gpu_area_mb_s: Summary


def mask_files(folder: str | Path) -> dict[str, Path]:
    """`<case>.<image suffix>` files of a folder by case id (hidden and non-image files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of <case>.nii.gz masks")
    found = {}
    for entry in sorted(folder.iterdir()):
        stem = strip_image_suffix(entry.name) if entry.is_file() and not entry.name.startswith(".") else None
        if stem is not None:
            found[stem] = entry
    return found


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, healthy_ids: Iterable[str] | None = None,
                     tolerance_mm: float = FLARE_TOLERANCE_MM) -> EvaluationResult:
    """Score every ground-truth case of `gt_dir` against `pred_dir` (see the module docstring).

    Args:
        pred_dir: predicted masks `<case>.nii.gz` (values 0/1; anything else scores 0/0).
        gt_dir: ground-truth masks `<case>.nii.gz` (any value > 0 is lesion).
        healthy_ids: cases without lesion; None: the cases whose ground truth is empty.
        tolerance_mm: NSD tolerance (FLARE 2024: 2 mm).

    Raises:
        FileNotFoundError: a folder is missing, or gt_dir holds no mask.
    """
    preds, gts = mask_files(pred_dir), mask_files(gt_dir)
    if not gts:
        raise FileNotFoundError(f"{gt_dir} holds no ground-truth masks named <case>.nii.gz")
    given_healthy = None if healthy_ids is None else set(healthy_ids)
    rows, fp_flags = [], []
    for case_id, gt_path in gts.items():
        row, flag = _evaluate_case(case_id, preds.get(case_id), gt_path, given_healthy, tolerance_mm)
        rows.append(row)
        if row["healthy"] and flag is not None:
            fp_flags.append(np.asarray(flag))  # a 0-d "mask": any lesion voxel predicted or not
    timing = _timing_rows(Path(pred_dir), set(gts))
    return EvaluationResult(
        rows=tuple(rows), dsc=summarize(r["dsc"] for r in rows), nsd=summarize(r["nsd"] for r in rows),
        false_positive_rate=false_positive_rate(fp_flags),
        healthy_ids=tuple(r["case_id"] for r in rows if r["healthy"]),
        missing=tuple(r["case_id"] for r in rows if r["rule"] == "missing"),
        unreadable=tuple(r["case_id"] for r in rows if r["rule"] in PREDICTION_FAULTS),
        truth_errors=tuple(r["case_id"] for r in rows if r["rule"] == TRUTH_READ_ERROR),
        extra=tuple(sorted(set(preds) - set(gts))),
        errors=tuple(r["error"] for r in rows if r["error"] and r["rule"] != "missing"),
        seconds=summarize(_floats(timing, "seconds")), gpu_area_mb_s=summarize(_floats(timing, "gpu_area_mb_s")),
    )


def _evaluate_case(case_id: str, pred_path: Path | None, gt_path: Path, given_healthy: set | None,
                   tolerance_mm: float) -> tuple[dict, bool | None]:
    """The row of one case and whether its prediction has a lesion voxel (None when not read)."""
    row = {"case_id": case_id, "dsc": 0.0, "nsd": 0.0, "rule": "", "healthy": False, "false_positive": None,
           "error": ""}
    try:
        gt = read_volume(gt_path)
    except ImageReadError as err:
        row.update(rule=TRUTH_READ_ERROR, error=f"case {case_id}: ground truth {err}")
        return row, None
    row["healthy"] = (case_id in given_healthy) if given_healthy is not None else not np.any(gt.array > 0)
    if pred_path is None:
        row.update(rule="missing", error=f"case {case_id}: no prediction")
        return row, None
    try:
        pred = read_volume(pred_path)
        labels = _integer_labels(pred.array)
    except (ImageReadError, ValueError) as err:
        row.update(rule="read_error", error=f"case {case_id}: prediction {err}")
        return row, None
    if not pred.geometry.matches(gt.geometry):
        row.update(rule="geometry_mismatch", error=f"case {case_id}: the prediction {pred_path} has "
                   f"{_describe(pred)}, but the ground truth {gt_path} has {_describe(gt)}; "
                   "predict on the ground truth's CT grid")
        return row, None
    scores = flare_case_scores(labels, gt.array, gt.spacing_zyx_mm, tolerance_mm)
    flag = bool(np.any(labels > 0))
    row.update(dsc=scores.dsc, nsd=scores.nsd, rule=scores.rule, false_positive=flag if row["healthy"] else None)
    return row, flag


def _integer_labels(array: np.ndarray) -> np.ndarray:
    """Integer masks as they are; float masks holding only whole numbers cast to int32."""
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.rint(array)):
        return array.astype(np.int32)
    raise ValueError(f"must hold integer labels, but its voxels are non-integer {array.dtype} values")


def _describe(volume: Volume) -> str:
    g = volume.geometry
    direction = tuple(round(d, 4) for d in g.direction_xyz)
    return f"{g.describe()}, direction {direction}"


def _timing_rows(pred_dir: Path, case_ids: set[str]) -> list[dict]:
    """predictions.csv rows of the evaluated cases that were predicted (or skipped after an earlier run)."""
    path = pred_dir / "predictions.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("case_id") in case_ids and r.get("status") in ("ok", "skipped")]


def _floats(rows: list[dict], key: str) -> list[float]:
    values = []
    for row in rows:
        try:
            value = float(row.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(value):
            values.append(value)
    return values


def write_csv(result: EvaluationResult, path: str | Path) -> Path:
    """Per-case rows (ROW_COLUMNS) as CSV, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in ROW_COLUMNS})
    os.replace(tmp, path)
    return path


def format_table(result: EvaluationResult) -> str:
    """The paper's Table 7: Mean ± Std and Median (Q1, Q3) per metric, then the case accounting."""
    lines = [("Metric", "Mean ± Std", "Median (Q1, Q3)"),
             ("DSC (%)", result.dsc.mean_std(), result.dsc.median_quartiles()),
             ("NSD (%)", result.nsd.mean_std(), result.nsd.median_quartiles())]
    if result.seconds.n:
        lines.append(("Inference Time (s)", result.seconds.mean_std(False), result.seconds.median_quartiles(False)))
    if result.gpu_area_mb_s.n:
        area = result.gpu_area_mb_s
        lines.append(("GPU Memory (MB·s)", area.mean_std(False, 1), area.median_quartiles(False, 1)))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text += accounting_lines(result)
    if result.healthy_ids and len(result.healthy_ids) < len(result.rows):
        text.append(reference_line(result))
    if result.missing:
        text.append(f"missing predictions ({len(result.missing)}, scored 0): {', '.join(result.missing)}")
    if result.extra:
        text.append(f"extra predictions ({len(result.extra)}, ignored): {', '.join(result.extra)}")
    text += [f"error: {message}" for message in result.errors]
    return "\n".join(text)


def accounting_lines(result: EvaluationResult) -> list[str]:
    """How many cases were scored, and the false-positive rate over the healthy cases that were.

    e.g. "cases: 136, scored 27, missing 109 (scored 0, as FLARE does)" and
    "healthy: 16, false-positive rate on healthy: 100.0% (3 of 3 predicted; 13 missing)".
    """
    unscored = len(result.missing) + len(result.unreadable) + len(result.truth_errors)
    cases = f"cases: {len(result.rows)}"
    if unscored:
        parts = [f"scored {len(result.rows) - unscored}", f"missing {len(result.missing)}"]
        parts += [f"unreadable or off-grid {len(result.unreadable)}"] if result.unreadable else []
        parts += [f"unreadable truth {len(result.truth_errors)}"] if result.truth_errors else []
        cases += ", " + ", ".join(parts) + " (scored 0, as FLARE does)"
    healthy = set(result.healthy_ids)
    scored = [r for r in result.rows if r["case_id"] in healthy and r["false_positive"] is not None]
    fpr = result.false_positive_rate
    rate = "n/a" if math.isnan(fpr) else f"{100 * fpr:.1f}%"
    if healthy:
        counts = [f"{sum(bool(r['false_positive']) for r in scored)} of {len(scored)} predicted"]
        missing = sum(case in healthy for case in result.missing)
        unreadable = sum(case in healthy for case in result.unreadable)
        counts += [f"{missing} missing"] if missing else []
        counts += [f"{unreadable} unreadable or off-grid"] if unreadable else []
        rate += f" ({'; '.join(counts)})"
    return [cases, f"healthy: {len(healthy)}, false-positive rate on healthy: {rate}"]


def reference_line(result: EvaluationResult) -> str:
    """The DSC of the cases with lesions alone, and what predicting no lesion anywhere would score.

    The FLARE rules give an empty prediction DSC 1 on a healthy case, so a model that finds nothing
    scores the healthy share of the cases; a mean DSC means something only above that.
    """
    healthy = set(result.healthy_ids)
    lesion = [float(r["dsc"]) for r in result.rows if r["case_id"] not in healthy]
    return (f"cases with lesions: DSC {100 * sum(lesion) / len(lesion):.2f}% (mean of {len(lesion)}); "
            f"predicting no lesion anywhere would score {100 * len(healthy) / len(result.rows):.2f}% mean DSC")


__all__ = ["EvaluationResult", "PREDICTION_FAULTS", "ROW_COLUMNS", "TRUTH_READ_ERROR", "accounting_lines", "evaluate_folders", "format_table", "mask_files", "reference_line",
           "write_csv"]
