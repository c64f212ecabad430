"""`panseg pseudolabel`: organ masks for a whole cohort from an organ model (stage one of the method).

The paper's organ interference needs organ labels 1-13 on every tumor case, and FLARE 2024 ships none:
the authors trained an organ model on FLARE 2022 and ran it over their tumor cases. This module runs
such a model (a run trained on a store made with `panseg preprocess --task organs`) over a folder of
CTs with the same Ray Data machinery as `panseg predict` (`infer.plan_folder` / `run_cases`):

- each case's mask holds every organ id (0-13) in that CT's own grid and is written atomically to
  `OUTPUT/<case>.nii.gz`, which is what `panseg preprocess` reads from `RAW/organsTr`;
- cases whose mask exists and was written by the same model (its header's model id) are skipped, so a
  killed run resumes with only the missing cases; another model's masks are labelled again;
- every case gets a QA row in `OUTPUT/pseudolabels.csv`: the volume of each organ in mL, the organs
  missing, seconds, and a `qa_warning` from the plausibility rule below.

Plausibility rule (`implausible_cases`, a pure function of the QA rows): a case is flagged when an organ
is missing (0 voxels), or when an organ's volume lies outside [median / f, median * f] (f = 3 by
default), the median taken over the cohort's cases where that organ is present, and applied only when
at least 3 cases hold the organ. Flagged cases are warnings, not failures: a CT whose field of view
ends above the kidneys really has no kidneys.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from panseg.config import ORGAN_IDS, ORGAN_NAMES, InferConfig, to_dict
from panseg.infer import (CSV_COLUMNS, model_id, plan_folder, read_csv_rows, remove_stale_masks,
                          run_cases, write_csv_rows)
from panseg.io import ImageReadError, Volume, read_volume
from panseg.training.checkpoint import load_checkpoint, resolve_checkpoint_file

CSV_NAME = "pseudolabels.csv"
VOLUME_COLUMNS = tuple(f"{name}_ml" for name in ORGAN_NAMES)
QA_COLUMNS = (*VOLUME_COLUMNS, "organs_missing", "qa_warning")
PSEUDOLABEL_COLUMNS = (*CSV_COLUMNS[:5], *QA_COLUMNS, *CSV_COLUMNS[5:])
DEFAULT_FACTOR = 3.0
MIN_CASES_FOR_RANGE = 3


# ----------------------------------------------------------------------------------------------
# QA (pure)
# ----------------------------------------------------------------------------------------------


def organ_volumes_ml(mask: Volume) -> dict:
    """Per-case QA values of an organ mask: `<organ>_ml` for each of the 13 organs and `organs_missing`
    (names of the organs with no voxel). Runs in the prediction actor on each written mask.

    Raises:
        ValueError: the mask holds an id outside 0-13 (not an organ mask).
    """
    array = np.asarray(mask.array)
    counts = np.bincount(array.ravel(), minlength=len(ORGAN_IDS) + 1)
    if len(counts) > len(ORGAN_IDS) + 1:
        bad = sorted(int(i) for i in np.flatnonzero(counts[len(ORGAN_IDS) + 1:]) + len(ORGAN_IDS) + 1)
        raise ValueError(f"an organ mask holds ids 0-13, but this one also holds {bad}")
    voxel_ml = float(np.prod(mask.spacing_zyx_mm)) / 1000.0
    row: dict = {f"{name}_ml": round(float(counts[i]) * voxel_ml, 6) for i, name in zip(ORGAN_IDS, ORGAN_NAMES)}
    row["organs_missing"] = [name for i, name in zip(ORGAN_IDS, ORGAN_NAMES) if counts[i] == 0]
    return row


@dataclass(frozen=True)
class OrganRange:
    """The plausible volume range of one organ in a cohort (median over the cases that hold it)."""

    median_ml: float
    low_ml: float
    high_ml: float
    cases: int


def cohort_ranges(rows: list[dict], factor: float = DEFAULT_FACTOR,
                  min_cases: int = MIN_CASES_FOR_RANGE) -> dict[str, OrganRange]:
    """[median / factor, median * factor] per organ over the rows that hold it (organs held by fewer
    than `min_cases` rows get no range)."""
    if factor <= 1.0:
        raise ValueError(f"the plausibility factor must be > 1, but it is {factor}")
    ranges = {}
    for name in ORGAN_NAMES:
        present = [float(r[f"{name}_ml"]) for r in rows if (r.get(f"{name}_ml") or 0) > 0]
        if len(present) >= min_cases:
            median = statistics.median(present)
            ranges[name] = OrganRange(median, median / factor, median * factor, len(present))
    return ranges


def implausible_cases(rows: list[dict], factor: float = DEFAULT_FACTOR,
                      min_cases: int = MIN_CASES_FOR_RANGE) -> dict[str, list[str]]:
    """Case id -> reasons, for the rows whose organ volumes are implausible (see the module docstring).

    Rows without QA values (failed cases) are ignored.
    """
    measured = [r for r in rows if all(r.get(c) is not None for c in VOLUME_COLUMNS)]
    ranges = cohort_ranges(measured, factor, min_cases)
    flagged: dict[str, list[str]] = {}
    for row in measured:
        reasons = []
        for name in ORGAN_NAMES:
            volume = float(row[f"{name}_ml"])
            if volume <= 0:
                reasons.append(f"{name} missing")
            elif name in ranges and not ranges[name].low_ml <= volume <= ranges[name].high_ml:
                r = ranges[name]
                reasons.append(f"{name} {volume:.1f} mL is outside [{r.low_ml:.1f}, {r.high_ml:.1f}] mL "
                               f"(cohort median {r.median_ml:.1f} mL over {r.cases} cases, factor {factor:g})")
        if reasons:
            flagged[row["case_id"]] = reasons
    return flagged


def organ_dice(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Dice of each organ between two label maps on the same grid (None where both lack the organ)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    scores: dict[str, float | None] = {}
    for organ_id, name in zip(ORGAN_IDS, ORGAN_NAMES):
        p, t = prediction == organ_id, truth == organ_id
        total = int(p.sum()) + int(t.sum())
        scores[name] = None if total == 0 else 2.0 * int((p & t).sum()) / total
    return scores


def evaluate_organ_folders(pred_dir: str | Path, truth_dir: str | Path, case_ids: list[str]) -> dict[str, dict]:
    """Per-organ Dice of `pred_dir/<case>.nii.gz` against `truth_dir/<case>.nii.gz` for each case id.

    Raises:
        ValueError: a prediction's geometry differs from its truth's (names the case).
    """
    scores = {}
    for case_id in case_ids:
        pred, truth = read_volume(Path(pred_dir) / f"{case_id}.nii.gz"), read_volume(Path(truth_dir) / f"{case_id}.nii.gz")
        if not pred.geometry.matches(truth.geometry):
            raise ValueError(f"case {case_id}: the prediction's grid differs from the truth's")
        scores[case_id] = organ_dice(pred.array, truth.array)
    return scores


def mean_by_organ(scores: dict[str, dict]) -> dict[str, float]:
    """The mean over cases of each organ's Dice (cases where the organ is absent on both sides left out)."""
    means = {}
    for name in ORGAN_NAMES:
        values = [s[name] for s in scores.values() if s.get(name) is not None]
        if values:
            means[name] = float(np.mean(values))
    return means


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def pseudolabel_folder(model_path: str | Path, input_dir: str | Path, output_dir: str | Path,
                       address: str | None = None, num_cpus: int | None = None, use_gpu: bool | None = None,
                       progress: bool = True, infer: InferConfig | None = None,
                       factor: float = DEFAULT_FACTOR) -> list[dict]:
    """Organ masks of every `<case>_0000.*` CT of `input_dir` in `output_dir/<case>.nii.gz` (Ray Data).

    Args:
        model_path: an organ model (run directory, checkpoint directory or file) trained on a store
            made with `--task organs`.
        input_dir: folder of CTs named `<case>_0000.<nii.gz|nii|mha|nrrd>`, e.g. RAW/imagesTr.
        output_dir: e.g. RAW/organsTr; masks and pseudolabels.csv go there (resumable).
        address, num_cpus, use_gpu, progress, infer: as for `infer.predict_folder`.
        factor: the plausibility factor of the volume rule.

    Returns:
        One row per case, sorted by id: status 'ok', 'skipped' (mask existed) or 'failed' (error names
        the case), the organ volumes, organs_missing and qa_warning; also written to pseudolabels.csv.

    Raises:
        CheckpointError: not a panseg checkpoint; ValueError: a model that is not an organ model, or
        a factor <= 1 (both before Ray starts). FileNotFoundError: input_dir holds no CT.
    """
    if factor <= 1.0:
        raise ValueError(f"the plausibility factor must be > 1, but it is {factor}")
    checkpoint = resolve_checkpoint_file(model_path)  # the file hashed is the file the actors load
    cfg = load_checkpoint(checkpoint).cfg
    if cfg.preprocess.task != "organs":
        raise ValueError(f"{model_path} is a model for task {cfg.preprocess.task!r}; pseudolabel needs an organ "
                         "model (train it on a store made with `panseg preprocess --task organs`)")
    out_dir = Path(output_dir)
    current = model_id(checkpoint, infer if infer is not None else cfg.infer)
    rows, todo = plan_folder(input_dir, out_dir, CSV_NAME, current)
    remove_stale_masks(todo, out_dir)
    infer_json = json.dumps(to_dict(infer)) if infer is not None else None
    rows += run_cases(todo, checkpoint, out_dir, cfg.preprocess, infer_json, address=address, num_cpus=num_cpus,
                      use_gpu=use_gpu, progress=progress, summarize=organ_volumes_ml, stage="pseudolabel",
                      model_id=current)
    rows = [_with_qa(row) for row in rows]
    flagged = implausible_cases(rows, factor)
    for row in rows:
        row["qa_warning"] = "; ".join(flagged.get(row["case_id"], [])) or None
    rows.sort(key=lambda r: r["case_id"])
    write_csv_rows(rows, out_dir / CSV_NAME, PSEUDOLABEL_COLUMNS)
    return rows


def _with_qa(row: dict) -> dict:
    """A skipped case whose earlier row was lost (a killed run writes no CSV) is measured from its mask."""
    if row["status"] != "skipped" or all(row.get(c) is not None for c in VOLUME_COLUMNS):
        return row
    try:
        return {**row, **organ_volumes_ml(read_volume(row["output"]))}
    except (ImageReadError, ValueError, RuntimeError) as err:
        return {**row, "qa_warning": f"case {row['case_id']}: its existing mask could not be measured: {err}"}


def format_summary(rows: list[dict], output_dir: str | Path) -> str:
    """What a pseudolabel run did, and each failed or flagged case with its reasons."""
    failed = [r for r in rows if r["status"] == "failed"]
    warned = [r for r in rows if r.get("qa_warning")]
    lines = [f"pseudolabel: {len(rows)} cases, {sum(r['status'] == 'ok' for r in rows)} labelled, "
             f"{sum(r['status'] == 'skipped' for r in rows)} already there, {len(failed)} failed, "
             f"{len(warned)} with implausible organ volumes; masks and {CSV_NAME} in {output_dir}"]
    lines += [f"  failed {r['case_id']}: {r['error']}" for r in failed]
    lines += [f"  warning {r['case_id']}: {r['qa_warning']}" for r in warned]
    return "\n".join(lines)


def read_qa_rows(output_dir: str | Path) -> dict[str, dict]:
    """The rows of OUTPUT/pseudolabels.csv by case id."""
    return read_csv_rows(Path(output_dir) / CSV_NAME)


__all__ = ["CSV_NAME", "OrganRange", "PSEUDOLABEL_COLUMNS", "QA_COLUMNS", "cohort_ranges", "evaluate_organ_folders",
           "format_summary", "implausible_cases", "mean_by_organ", "organ_dice", "organ_volumes_ml",
           "pseudolabel_folder", "read_qa_rows"]
