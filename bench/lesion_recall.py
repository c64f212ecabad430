"""Which lesions a time-to-accuracy snapshot finds: lesion recall by lesion volume and by contrast.

    python bench/lesion_recall.py --work /tmp/learning --run panseg_init_organs10
    python bench/lesion_recall.py --work /tmp/learning --run panseg_init_organs10 --minutes 40 120

Reads what `bench/learning.py` left in WORK (run it first): the test cases' complete truth
(WORK/test_truth), their CTs (WORK/raw/imagesTr) and each snapshot's tumor masks
(WORK/scored/RUN/minute_M/tumor). A lesion is a 26-connected component of the truth, found when a
predicted tumor voxel touches it (as `bench/learning.py`'s lesion recall). Its contrast is
|mean HU inside - mean HU of a 2-voxel shell around it| / the shell's HU standard deviation: how far
the lesion stands out of the tissue around it, in units of that tissue's texture. The lesions are cut
into terciles of volume and of contrast (over all test lesions), and recall is given per tercile.
Output: bench/results/lesion_recall.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from panseg.io import read_volume

RESULTS = Path(__file__).resolve().parent / "results"
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
SHELL_VOXELS = 2


def lesion_table(ct: np.ndarray, truth: np.ndarray, voxel_mm3: float) -> list[dict]:
    """One row per true lesion: volume (mm³), contrast, and its component mask index."""
    components, n = ndimage.label(truth, structure=_CONNECTIVITY_26)
    rows = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        pad = tuple(slice(max(0, s.start - SHELL_VOXELS - 1), s.stop + SHELL_VOXELS + 1) for s in box)
        lesion = components[pad] == index
        shell = ndimage.binary_dilation(lesion, iterations=SHELL_VOXELS) & ~truth[pad]
        inside, around = ct[pad][lesion].astype(float), ct[pad][shell].astype(float)
        spread = around.std() if around.size > 1 else 0.0
        contrast = abs(inside.mean() - around.mean()) / spread if spread > 0 else float("inf")
        rows.append({"index": index, "volume_mm3": float(lesion.sum() * voxel_mm3), "contrast": float(contrast)})
    return rows


def found_lesions(prediction: np.ndarray, truth: np.ndarray) -> set[int]:
    components, _ = ndimage.label(truth, structure=_CONNECTIVITY_26)
    return set(np.unique(components[prediction]).tolist()) - {0}


def terciles(values: list[float]) -> list[float]:
    return [float(v) for v in np.quantile(values, [1 / 3, 2 / 3])]


def recall_by_bin(lesions: list[dict], key: str, edges: list[float], found_key: str) -> list[dict]:
    bins = []
    bounds = [-np.inf, *edges, np.inf]
    for low, high in zip(bounds[:-1], bounds[1:]):
        members = [row for row in lesions if low < row[key] <= high]
        bins.append({"from": low if np.isfinite(low) else None, "to": high if np.isfinite(high) else None,
                     "lesions": len(members),
                     "recall": round(sum(row[found_key] for row in members) / len(members), 3) if members else None})
    return bins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--run", required=True, help="the curve's name (WORK/scored/RUN)")
    parser.add_argument("--minutes", type=float, nargs="*", help="snapshots to read (default: every scored one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "lesion_recall.json")
    args = parser.parse_args(argv)
    scored = args.work / "scored" / args.run
    snapshots = sorted(scored.glob("minute_*"), key=lambda p: float(p.name.split("_", 1)[1]))
    if args.minutes:
        snapshots = [p for p in snapshots if float(p.name.split("_", 1)[1]) in args.minutes]
    if not snapshots:
        parser.error(f"no scored snapshot under {scored}: run bench/learning.py first")
    case_ids = sorted(p.name[: -len(".nii.gz")] for p in (snapshots[0] / "tumor").glob("*.nii.gz"))

    lesions = []
    for case_id in case_ids:
        truth_volume = read_volume(args.work / "test_truth" / f"{case_id}.nii.gz")
        truth = truth_volume.array > 0
        if not truth.any():
            continue
        ct = read_volume(args.work / "raw" / "imagesTr" / f"{case_id}_0000.nii.gz").array
        voxel_mm3 = float(np.prod(truth_volume.spacing_zyx_mm))
        found = {snapshot.name: found_lesions(read_volume(snapshot / "tumor" / f"{case_id}.nii.gz").array > 0, truth)
                 for snapshot in snapshots}
        for row in lesion_table(ct, truth, voxel_mm3):
            lesions.append({"case_id": case_id, **row, **{name: row["index"] in ids for name, ids in found.items()}})

    volume_edges = terciles([row["volume_mm3"] for row in lesions])
    contrast_edges = terciles([row["contrast"] for row in lesions])
    result = {"run": args.run, "lesions": len(lesions), "volume_terciles_mm3": volume_edges,
              "contrast_terciles": contrast_edges, "snapshots": {}}
    for snapshot in snapshots:
        result["snapshots"][snapshot.name] = {
            "recall": round(sum(row[snapshot.name] for row in lesions) / len(lesions), 3),
            "by_volume": recall_by_bin(lesions, "volume_mm3", volume_edges, snapshot.name),
            "by_contrast": recall_by_bin(lesions, "contrast", contrast_edges, snapshot.name),
        }
    result["lesion_rows"] = lesions
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{len(lesions)} lesions; volume terciles {volume_edges[0]:.0f} / {volume_edges[1]:.0f} mm³; "
          f"contrast terciles {contrast_edges[0]:.2f} / {contrast_edges[1]:.2f}")
    print("snapshot      recall   by volume (small / mid / large)   by contrast (low / mid / high)")
    for name, s in result["snapshots"].items():
        fmt = lambda bins: " / ".join(f"{b['recall']:.2f}" if b["recall"] is not None else "-" for b in bins)  # noqa: E731
        print(f"{name:<12}  {s['recall']:.2f}     {fmt(s['by_volume']):<32}  {fmt(s['by_contrast'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
