"""Synthetic whole-body CT cohorts: the data every panseg test, benchmark and demo runs on.

A case is an int16 HU volume from the thighs to the neck (or the trunk, for thin slices and small mode)
with a body (fat, muscle, lungs, spine, ribs, pelvis), the 13 FLARE22 organs, a scanner table behind
the body that is never connected to it above 50 HU, lesion-like distractors that are not lesions, and
in diseased cases 1-4 lesions of which only the largest is labelled (FLARE 2024's partial labels).
Organ pseudo-labels are close to, not equal to, the true organs. See `plan` for the two kinds
of case (largest HU > 50 component body-sized, or a single small structure).

Conventions. Anatomy is painted in a canonical frame: array (z, y, x) with z from feet to head, y from
front (anterior) to back (posterior), x from the patient's right to left, i.e. ITK's LPS with an
identity direction; the table is posterior (larger y). Cases are written in one of three orientations
(`plan.ORIENTATIONS`): LPS as painted; RAS, the y and x axes reversed with direction
diag(-1, -1, 1) (what a file stored in RAS order reads as), so the table is at small y there; tilted, a
rotation of a few degrees. The physical position of every voxel is always what the direction says.

Written layout (nnU-Net raw, see DESIGN.md):
    OUT/imagesTr/<case>_0000.nii.gz   int16 HU
    OUT/labelsTr/<case>.nii.gz        uint8, 1 on the primary lesion only (zeros for healthy cases),
                                      or the true organ ids 1-13 for an organ cohort
    OUT/organsTr/<case>.nii.gz        uint8 organ pseudo-labels 1-13 (not for an organ cohort)
    OUT/phantom.json                  parameters and every case's metadata
    TRUTH/<case>.nii.gz, TRUTH/organs/<case>.nii.gz   all lesions, true organs (when truth_dir is given)
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from panseg import __version__
from panseg.io import Volume, validate_case_id, write_volume
from panseg.phantom.body import (paint_body, paint_outside_fov, paint_pelvis_and_femurs, paint_ribs, paint_spine,
                                 paint_table)
from panseg.phantom.lesions import PaintedLesion, lesion_volumes, place_lesions, pseudo_organs
from panseg.phantom.organs import paint_cysts, paint_organs
from panseg.phantom.plan import ORIENTATIONS, CasePlan, plan_case
from panseg.phantom.shapes import Canvas, Tissue

PHANTOM_FORMAT_VERSION = 1
LESION_COUNT_WEIGHTS = (0.35, 0.3, 0.2, 0.15)  # 1, 2, 3 or 4 lesions in a diseased case
NOISE_TABLE_SIZE = 65536  # noise is drawn as uint16 indices into a table of Gaussian samples: fast
HOST_TISSUE = {"liver": Tissue.LIVER, "kidney": Tissue.KIDNEY_CORTEX, "pancreas": Tissue.PANCREAS,
               "spleen": Tissue.SPLEEN, "lung": Tissue.LUNG, "lymph_node": Tissue.VISCERAL_FAT,
               "bone": Tissue.CANCELLOUS_BONE}


@dataclass(frozen=True)
class LesionInfo:
    """One lesion of a case, in the written (oriented) array and in physical space.

    `radius_mm` is the radius of the sphere of the same volume; `primary` marks the labelled one.
    """

    index: int
    site: str
    host: str
    contrast: str
    hu_mean: float
    host_hu: float
    centre_zyx_vox: tuple[int, int, int]
    centre_xyz_mm: tuple[float, float, float]
    radius_mm: float
    semi_axes_mm: tuple[float, float, float]
    voxels: int
    necrotic_core: bool
    primary: bool


@dataclass(frozen=True)
class PhantomCase:
    """A synthetic case: volumes sharing one geometry, and what was put where.

    Attributes:
        ct: int16 HU. organs_true / organs_pseudo: uint8 ids 0-13 (a lesion inside an organ is that
        organ in both). lesions_true: uint8 0/1, every lesion. lesions_labelled: uint8 0/1, the
        primary lesion only. tissue: uint8 `shapes.Tissue` codes (lesion k is LESION + k).
        lesions: every lesion, `primary` the index of the labelled one (None when healthy).
        kind: 'connected' or 'weak' (see `plan`). cysts: distractor cysts (not lesions).
    """

    case_id: str
    ct: Volume
    organs_true: Volume
    organs_pseudo: Volume
    lesions_true: Volume
    lesions_labelled: Volume
    tissue: Volume
    lesions: tuple[LesionInfo, ...]
    primary: int | None
    healthy: bool
    kind: str
    phase: str
    orientation: str
    noise_sigma_hu: float
    scale: float
    hu: dict
    cysts: tuple[dict, ...]

    def metadata(self) -> dict:
        """A JSON-ready description of the case (what phantom.json lists per case)."""
        geometry = self.ct.geometry
        return {
            "case_id": self.case_id, "healthy": self.healthy, "kind": self.kind, "phase": self.phase,
            "orientation": self.orientation, "shape_zyx": list(geometry.shape_zyx),
            "spacing_zyx_mm": list(geometry.spacing_zyx_mm), "origin_xyz_mm": list(geometry.origin_xyz_mm),
            "direction_xyz": list(geometry.direction_xyz), "noise_sigma_hu": self.noise_sigma_hu,
            "patient_scale": round(self.scale, 3), "primary_lesion": self.primary,
            "lesions": [asdict(lesion) for lesion in self.lesions], "cysts": list(self.cysts),
            "mean_hu": {Tissue(t).name.lower(): max(v, -1024.0) for t, v in sorted(self.hu.items())},  # as clipped
        }


def make_case(case_id: str, seed: int, healthy: bool, small: bool = False, *, weak: bool | None = None,
              orientation: str | None = None) -> PhantomCase:
    """Generate one case; pure: the same arguments give byte-identical arrays.

    Args:
        case_id: the case's id, [A-Za-z0-9._-]+; with `seed` it seeds the case's random stream.
        seed: the cohort seed (>= 0).
        healthy: no lesion at all (cysts and other distractors remain).
        small: fast coarse mode for tests (about 48-80 x 96-128 x 96-128 voxels, 2.5-3.5 mm in-plane).
        weak: the weak-component kind (True), the connected kind (False), or drawn (None: one in four).
        orientation: one of `ORIENTATIONS`, or drawn (None).

    Raises:
        ValueError: invalid case id, seed or orientation.
    """
    validate_case_id(case_id)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, but it is {seed}")
    rng = np.random.default_rng([seed, zlib.crc32(case_id.encode()), int(small)])
    weak = bool(rng.random() < 0.25) if weak is None else weak
    orientation = str(rng.choice(ORIENTATIONS)) if orientation is None else orientation
    plan = plan_case(rng, small, weak, orientation)
    canvas = _paint_anatomy(plan, rng)
    layout = paint_organs(canvas, plan.scale, rng)
    _paint_bones(canvas, plan.scale)
    cysts = paint_cysts(canvas, layout, plan.scale, rng)
    paint_outside_fov(canvas)
    count = 0 if healthy else int(rng.choice(len(LESION_COUNT_WEIGHTS), p=LESION_COUNT_WEIGHTS)) + 1
    lesions = place_lesions(canvas, layout, count, plan.scale, rng)
    primary = max(lesions, key=lambda lesion: lesion.voxels).index if lesions else None
    pseudo = pseudo_organs(canvas, rng)
    lesion_hu = {lesion.index: _lesion_hu(lesion, plan) for lesion in lesions}
    ct = _render(canvas.tissue, plan, lesion_hu, rng)
    every, labelled = lesion_volumes(canvas.shape, lesions, primary, flip_yx=plan.orientation == "RAS")
    for array in (ct, canvas.organs, pseudo, canvas.tissue):
        _orient_in_place(array, plan.orientation)
    volumes = {name: _volume(array, plan) for name, array in (
        ("ct", ct), ("organs_true", canvas.organs), ("organs_pseudo", pseudo), ("lesions_true", every),
        ("lesions_labelled", labelled), ("tissue", canvas.tissue))}
    infos = tuple(_lesion_info(lesion, plan, lesion_hu[lesion.index], lesion.index == primary) for lesion in lesions)
    return PhantomCase(case_id=case_id, **volumes, lesions=infos, primary=primary, healthy=healthy, kind=plan.kind,
                       phase=plan.phase, orientation=plan.orientation, noise_sigma_hu=plan.noise_sigma_hu,
                       scale=plan.scale, hu=plan.hu, cysts=tuple(cysts))


def _paint_anatomy(plan: CasePlan, rng: np.random.Generator) -> Canvas:
    """A canvas with the body wall and the table painted."""
    canvas = Canvas(tissue=np.zeros(plan.shape_zyx, np.uint8), organs=np.zeros(plan.shape_zyx, np.uint8),
                    spacing_zyx_mm=plan.spacing_zyx_mm, centre_yx_vox=plan.centre_yx_vox, z0_mm=plan.z0_mm)
    lowest_row = paint_body(canvas, plan.scale, plan.fat_mm, plan.muscle_mm, rng)
    paint_table(canvas, lowest_row, plan.scale, plan.table_gap_mm, plan.with_pad)
    return canvas


def _paint_bones(canvas: Canvas, scale: float) -> None:
    paint_spine(canvas, scale)
    paint_ribs(canvas, scale)
    paint_pelvis_and_femurs(canvas, scale)


def _lesion_hu(lesion: PaintedLesion, plan: CasePlan) -> float:
    """Mean HU of a lesion: a site-specific distance from its host, smaller without contrast."""
    host = plan.hu[int(HOST_TISSUE[lesion.site])]
    t = lesion.strength
    if lesion.site == "lung":
        return 15.0 + 45.0 * t  # solid nodule in air-filled lung
    if lesion.site == "lymph_node":
        return (30.0 + 20.0 * t) if plan.phase == "non_contrast" else (35.0 + 35.0 * t)
    if lesion.site == "bone":  # lytic metastasis far below bone, sclerotic far above
        return 60.0 + 120.0 * t if lesion.contrast == "hypo" else 800.0 + 300.0 * t
    delta = (12.0 + 18.0 * t) if plan.phase == "non_contrast" else (25.0 + 35.0 * t)
    return host - delta if lesion.contrast == "hypo" else host + delta


def _render(tissue: np.ndarray, plan: CasePlan, lesion_hu: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """HU = the tissue's mean + white Gaussian noise, clipped at -1024 as scanners do.

    Noise comes from uint16 indices into a table of 65536 Gaussian samples, a few slices at a time:
    several times faster than drawing float normals for ~40M voxels, and just as Gaussian to the eye
    and to every threshold the pipeline applies.
    """
    lut = np.full(256, -1000, np.int16)
    for code, value in plan.hu.items():
        lut[code] = int(round(value))
    for index, value in lesion_hu.items():
        lut[Tissue.LESION + index] = int(round(value))
    ct = lut[tissue]
    table = np.rint(rng.standard_normal(NOISE_TABLE_SIZE) * plan.noise_sigma_hu).astype(np.int16)
    slab = max(1, 4_000_000 // (tissue.shape[1] * tissue.shape[2]))
    for start in range(0, tissue.shape[0], slab):
        part = ct[start:start + slab]
        part += table[rng.integers(0, NOISE_TABLE_SIZE, size=part.shape, dtype=np.uint16)]
        np.maximum(part, -1024, out=part)
    return ct


def _orient_in_place(array: np.ndarray, orientation: str) -> None:
    """Turn a canonical-frame array into its stored layout (RAS reverses y and x), slice by slice.

    In place through a one-slice buffer: a flipped copy of the whole volume would cost more in fresh
    memory than in copying.
    """
    if orientation != "RAS":
        return
    buffer = np.empty(array.shape[1:], array.dtype)
    for k in range(array.shape[0]):
        np.copyto(buffer, array[k, ::-1, ::-1])
        array[k] = buffer


def _volume(array: np.ndarray, plan: CasePlan) -> Volume:
    """An array already in its stored layout, with the case's geometry."""
    return Volume(array, plan.spacing_zyx_mm, plan.origin_xyz_mm, plan.direction_xyz)


def _lesion_info(lesion: PaintedLesion, plan: CasePlan, hu: float, primary: bool) -> LesionInfo:
    """Where a painted lesion lies in the stored array and in physical (ITK LPS) millimetres."""
    coords = np.argwhere(lesion.mask).mean(axis=0) + np.array([s.start for s in lesion.box])
    if plan.orientation == "RAS":
        coords = np.array([coords[0], plan.shape_zyx[1] - 1 - coords[1], plan.shape_zyx[2] - 1 - coords[2]])
    physical = np.asarray(plan.origin_xyz_mm) + np.asarray(plan.direction_xyz).reshape(3, 3) @ (
        coords[::-1] * np.asarray(plan.spacing_zyx_mm)[::-1])
    voxel_mm3 = float(np.prod(plan.spacing_zyx_mm))
    radius = (3.0 * lesion.voxels * voxel_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    return LesionInfo(index=lesion.index, site=lesion.site, host=lesion.host, contrast=lesion.contrast,
                      hu_mean=round(hu, 1), host_hu=plan.hu[int(HOST_TISSUE[lesion.site])],
                      centre_zyx_vox=tuple(int(round(c)) for c in coords),
                      centre_xyz_mm=tuple(round(float(p), 2) for p in physical), radius_mm=round(radius, 2),
                      semi_axes_mm=tuple(round(a, 2) for a in lesion.semi_axes_mm), voxels=lesion.voxels,
                      necrotic_core=lesion.necrotic_core, primary=primary)


# ----------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSummary:
    """What was written for one case."""

    case_id: str
    healthy: bool
    kind: str
    phase: str
    orientation: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction_xyz: tuple[float, ...]
    lesions: int
    primary_voxels: int
    seconds: float


@dataclass(frozen=True)
class CohortSummary:
    """What `write_cohort` wrote: the folder, its parameters and one summary per case (sorted by id)."""

    out_dir: str
    seed: int
    small: bool
    organ_cohort: bool
    truth_dir: str | None
    cases: tuple[CaseSummary, ...]
    seconds: float

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(c.case_id for c in self.cases)

    @property
    def healthy_ids(self) -> tuple[str, ...]:
        return tuple(c.case_id for c in self.cases if c.healthy)

    def summary_line(self) -> str:
        """One line on the cohort: counts, phases, lesions and the range of shapes."""
        diseased = len(self.cases) - len(self.healthy_ids)
        mode = "small" if self.small else "realistic"
        task = "organ cohort (labelsTr = organs 1-13)" if self.organ_cohort else "tumor cohort"
        phases = {}
        for c in self.cases:
            phases[c.phase] = phases.get(c.phase, 0) + 1
        shapes = sorted(c.shape_zyx for c in self.cases)
        low, high = ("x".join(str(n) for n in shape) for shape in (shapes[0], shapes[-1]))
        return (f"phantom cohort in {self.out_dir}: {len(self.cases)} cases ({diseased} with lesions, "
                f"{len(self.healthy_ids)} healthy; {sum(c.lesions for c in self.cases)} lesions; phases "
                + ", ".join(f"{name} {n}" for name, n in sorted(phases.items()))
                + f"; shapes {low} to {high}), seed {self.seed}, {mode}, {task}, {self.seconds:.1f} s")

    def describe(self) -> str:
        """`summary_line` and a short table of the cases, for the command line."""
        lines = [self.summary_line(),
                 f"{'case_id':<24} {'kind':<9} {'phase':<12} {'orient':<7} {'lesions':>7} "
                 f"{'shape (z, y, x)':<17} spacing (z, y, x) mm"]
        for c in self.cases:
            shape = "x".join(str(n) for n in c.shape_zyx)
            spacing = ", ".join(f"{s:.3g}" for s in c.spacing_zyx_mm)
            lines.append(f"{c.case_id:<24} {c.kind:<9} {c.phase:<12} {c.orientation:<7} {c.lesions:>7} "
                         f"{shape:<17} {spacing}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    case_id: str
    seed: int
    healthy: bool
    small: bool
    weak: bool
    orientation: str
    out_dir: str
    truth_dir: str | None
    organ_cohort: bool


def cohort_jobs(cases: int, healthy: int) -> list[tuple[str, bool, bool, str]]:
    """(case_id, healthy, weak, orientation) of every case of a cohort, deterministically.

    Diseased cases are phantom_000.., healthy ones phantom_healthy_000..; every fourth case of each
    group is of the weak-component kind (index 3, 7, ... and 1, 5, ... for healthy ones), and the
    orientations cycle through LPS, RAS and tilted.
    """
    digits = max(3, len(str(max(cases, healthy, 1) - 1)))
    jobs = [(f"phantom_{i:0{digits}d}", False, i % 4 == 3, ORIENTATIONS[i % 3]) for i in range(cases)]
    jobs += [(f"phantom_healthy_{i:0{digits}d}", True, i % 4 == 1, ORIENTATIONS[(i + 1) % 3]) for i in range(healthy)]
    return jobs


def write_cohort(out_dir: str | Path, cases: int, healthy: int, seed: int, small: bool = False,
                 truth_dir: str | Path | None = None, organ_cohort: bool = False, workers: int = 1) -> CohortSummary:
    """Generate and write a phantom cohort in the nnU-Net raw layout (see the module docstring).

    Args:
        out_dir: the cohort folder (created; files of the same names are replaced, and cases that a
            previous phantom run listed in OUT/phantom.json but this cohort lacks are removed).
        cases: number of cases with lesions; healthy: number without.
        seed: cohort seed (>= 0); case i is generated from (seed, its id) alone, so a cohort of 20
            holds the same first 10 cases as a cohort of 10.
        small: coarse fast cases for tests.
        truth_dir: where to also write every lesion (<case>.nii.gz) and the true organs (organs/<case>.nii.gz).
        organ_cohort: a FLARE22-like organ cohort: labelsTr holds the true organ ids, no organsTr.
        workers: processes generating cases in parallel (1: in this process).

    Raises:
        ValueError: negative counts, no case at all, a negative seed or fewer than one worker.
    """
    if cases < 0 or healthy < 0 or cases + healthy == 0:
        raise ValueError(f"a cohort needs cases >= 0 and healthy >= 0 with at least one case, but got "
                         f"cases={cases}, healthy={healthy}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, but it is {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, but it is {workers}")
    start = time.perf_counter()
    out = Path(out_dir)
    truth = None if truth_dir is None else str(Path(truth_dir))
    jobs = [_Job(case_id, seed, is_healthy, small, weak, orientation, str(out), truth, organ_cohort)
            for case_id, is_healthy, weak, orientation in cohort_jobs(cases, healthy)]
    _remove_stale_cases(out, {job.case_id for job in jobs}, organ_cohort)
    records = _run_jobs(jobs, workers)
    records.sort(key=lambda r: r["summary"].case_id)
    summary = CohortSummary(out_dir=str(out), seed=seed, small=small, organ_cohort=organ_cohort, truth_dir=truth,
                            cases=tuple(r["summary"] for r in records), seconds=round(time.perf_counter() - start, 2))
    _write_json(out / "phantom.json", {
        "format": "panseg-phantom", "format_version": PHANTOM_FORMAT_VERSION, "panseg_version": __version__,
        "parameters": {"cases": cases, "healthy": healthy, "seed": seed, "small": small,
                       "organ_cohort": organ_cohort, "truth_dir": truth},
        "conventions": {
            "canonical_frame": "array (z, y, x): z feet->head, y anterior->posterior, x patient right->left (LPS)",
            "table": "posterior of the body (larger y in LPS/tilted arrays, smaller y in RAS arrays), "
                     "separated from it by air or a mattress below -500 HU",
            "labelsTr": "true organ ids 1-13" if organ_cohort else "1 on the primary (largest) lesion only",
            "kinds": {"connected": "the largest HU>50 component spans the body (muscle wall, bones, organs)",
                      "weak": "muscle and liver below 50 HU, no contrast: the largest HU>50 component is one "
                              "structure outside the soft tissue (the table or the vertebral column)"},
        },
        "cases": [r["metadata"] for r in records],
    })
    return summary


def _remove_stale_cases(out: Path, keep: set[str], organ_cohort: bool) -> None:
    """Delete files of phantom cases a previous run wrote here that this cohort does not hold.

    Only ids listed in the old phantom.json are touched, so nothing a user put in the folder goes;
    without this, a cohort of 5 written over one of 20 would read as 20 cases.
    """
    old = out / "phantom.json"
    if not old.is_file():
        return
    try:
        meta = json.loads(old.read_text())
        old_ids = {case["case_id"] for case in meta["cases"]}
        old_truth = meta["parameters"].get("truth_dir")
    except (ValueError, KeyError, TypeError):
        return  # not ours to interpret: leave everything
    for case_id in old_ids:
        stale = [] if case_id in keep else [out / "imagesTr" / f"{case_id}_0000.nii.gz",
                                            out / "labelsTr" / f"{case_id}.nii.gz"]
        if case_id not in keep or organ_cohort:  # an organ cohort has no organsTr
            stale.append(out / "organsTr" / f"{case_id}.nii.gz")
        if old_truth and case_id not in keep:
            stale += [Path(old_truth) / f"{case_id}.nii.gz", Path(old_truth) / "organs" / f"{case_id}.nii.gz"]
        for path in stale:
            path.unlink(missing_ok=True)


def _run_jobs(jobs: list[_Job], workers: int) -> list[dict]:
    if workers == 1 or len(jobs) == 1:
        return [_write_case(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold threads (Ray, SimpleITK) that a fork would copy mid-flight
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                             initializer=_init_worker, initargs=(threads,)) as pool:
        return list(pool.map(_write_case, jobs))


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _write_case(job: _Job) -> dict:
    """Generate one case and write its files; returns its summary and metadata."""
    start = time.perf_counter()
    case = make_case(job.case_id, job.seed, job.healthy, job.small, weak=job.weak, orientation=job.orientation)
    out = Path(job.out_dir)
    write_volume(case.ct, out / "imagesTr" / f"{job.case_id}_0000.nii.gz")
    if job.organ_cohort:
        write_volume(case.organs_true, out / "labelsTr" / f"{job.case_id}.nii.gz")
    else:
        write_volume(case.lesions_labelled, out / "labelsTr" / f"{job.case_id}.nii.gz")
        write_volume(case.organs_pseudo, out / "organsTr" / f"{job.case_id}.nii.gz")
    if job.truth_dir is not None:
        write_volume(case.lesions_true, Path(job.truth_dir) / f"{job.case_id}.nii.gz")
        write_volume(case.organs_true, Path(job.truth_dir) / "organs" / f"{job.case_id}.nii.gz")
    geometry = case.ct.geometry
    primary = case.lesions[case.primary].voxels if case.primary is not None else 0
    summary = CaseSummary(case_id=job.case_id, healthy=job.healthy, kind=case.kind, phase=case.phase,
                          orientation=case.orientation, shape_zyx=geometry.shape_zyx,
                          spacing_zyx_mm=geometry.spacing_zyx_mm, origin_xyz_mm=geometry.origin_xyz_mm,
                          direction_xyz=geometry.direction_xyz, lesions=len(case.lesions), primary_voxels=primary,
                          seconds=round(time.perf_counter() - start, 3))
    return {"summary": summary, "metadata": case.metadata()}


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (aside, then rename), like every other file panseg writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


__all__ = ["ORIENTATIONS", "CaseSummary", "CohortSummary", "LesionInfo", "PhantomCase", "Tissue", "cohort_jobs",
           "make_case", "write_cohort"]
