"""Lesion-wise and organ scores of all-label predictions against the complete truth, per case.

FLARE's DSC and NSD score voxels; a reader also wants to know how many lesions a model finds and how
many it invents: `lesions` true lesions (26-connected components of the truth), `lesions_found` of them
touched by a predicted tumor voxel, `false_components` predicted tumor components touching no true
lesion; and `organ_dice`, the mean Dice of the organs present in the true organ map.
"""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

import numpy as np
from scipy import ndimage

from panseg.config import TUMOR_ID
from panseg.evaluation.metrics import dice
from panseg.io import read_volume

LESION_COLUMNS = ("case_id", "lesions", "lesions_found", "false_components", "organ_dice")
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def lesion_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(true lesions, true lesions touched by a predicted voxel, predicted components touching no lesion),
    components 26-connected; both masks boolean of one shape."""
    true_cc, n_true = ndimage.label(truth, structure=_CONNECTIVITY_26)
    pred_cc, n_pred = ndimage.label(prediction, structure=_CONNECTIVITY_26)
    found = len(set(np.unique(true_cc[prediction]).tolist()) - {0})
    hitting = len(set(np.unique(pred_cc[truth]).tolist()) - {0})
    return int(n_true), found, int(n_pred) - hitting


def mean_organ_dice(labels: np.ndarray, organs: np.ndarray) -> float | None:
    """Mean Dice of the organ classes (1-13) present in `organs`; None when none is."""
    present = [c for c in np.unique(organs) if 0 < c < TUMOR_ID]
    return float(np.mean([dice(labels == c, organs == c) for c in present])) if present else None


def score_cases(all_labels_dir: str | Path, truth_dir: str | Path, organs_dir: str | Path | None,
                case_ids: list[str]) -> list[dict]:
    """One LESION_COLUMNS row per case: `all_labels_dir/<case>.nii.gz` (class ids, tumor 14) against
    `truth_dir/<case>.nii.gz` (every lesion, > 0) and `organs_dir/<case>.nii.gz` (true organ ids)."""
    rows = []
    for case_id in case_ids:
        labels = read_volume(Path(all_labels_dir) / f"{case_id}.nii.gz").array
        truth = read_volume(Path(truth_dir) / f"{case_id}.nii.gz").array > 0
        lesions, found, false_components = lesion_counts(labels == TUMOR_ID, truth)
        organ = None
        if organs_dir is not None and (Path(organs_dir) / f"{case_id}.nii.gz").is_file():
            organ = mean_organ_dice(labels, read_volume(Path(organs_dir) / f"{case_id}.nii.gz").array)
        rows.append({"case_id": case_id, "lesions": lesions, "lesions_found": found,
                     "false_components": false_components, "organ_dice": organ})
    return rows


def write_lesion_csv(rows: list[dict], path: str | Path) -> Path:
    """The rows as CSV (LESION_COLUMNS; an organ Dice of None is empty), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in LESION_COLUMNS} for row in rows)
    os.replace(tmp, path)
    return path


__all__ = ["LESION_COLUMNS", "lesion_counts", "mean_organ_dice", "score_cases", "write_lesion_csv"]
