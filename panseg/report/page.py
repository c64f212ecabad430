"""`panseg report`: one self-contained HTML page on a training run and/or a folder of predictions.

The page holds the training curves (RUN/metrics.jsonl), the per-case metrics table (sortable by a
click on a column), and per case a PNG of the CT with the ground truth and the prediction in three
planes through the largest lesion (through the largest false positive on a healthy case), with the
crop box. Every image is a base64 data: URI, so the file can be mailed or archived alone.

Inputs (each optional, but a run or a prediction folder is needed):
    run_dir      RUN/metrics.jsonl -> curves; RUN/config.yaml -> the preprocessing used to compute crops
    pred_dir     <case>.nii.gz masks; pred_dir/predictions.csv -> seconds, and the crop box each case
                 was predicted with
    images_dir   <case>_0000.nii.gz CTs (as `panseg predict --input`) -> the overlays
    gt_dir       <case>.nii.gz ground truth -> the overlays and, with pred_dir, the metrics
                 (`panseg.evaluation.folders.evaluate_folders`)
    metrics_csv  a per-case CSV from `panseg evaluate --out`, used instead of evaluating again

Pure: no Ray, no torch. Figures are in `panseg.report.figures`.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from panseg.config import PreprocessConfig, load_config, preset
from panseg.evaluation.folders import evaluate_folders, format_table, mask_files
from panseg.io import ImageReadError, Volume, discover_cohort, read_volume
from panseg.preprocessing.crop import Box, choose_crop
from panseg.report.figures import CaseView, display_flips, pick_slice_point, render_case_png, render_curves_png

PREDICTIONS_CSV = "predictions.csv"  # panseg.infer.CSV_NAME (not imported: that module imports torch)
DEFAULT_MAX_CASES = 60  # a PNG is ~30-80 kB; 60 cases keep the page a few MB
_POINT_CAPTIONS = {
    "truth_lesion": "planes through the largest ground-truth lesion",
    "false_positive": "planes through the largest false positive (the ground truth is empty)",
    "prediction": "planes through the largest predicted component (no ground truth given)",
    "middle": "planes through the middle of the volume (no lesion in the ground truth or the prediction)",
}


@dataclass(frozen=True)
class ReportSources:
    """Where the report's inputs are (see the module docstring); None = not given."""

    run_dir: Path | None = None
    pred_dir: Path | None = None
    images_dir: Path | None = None
    gt_dir: Path | None = None
    metrics_csv: Path | None = None

    def __post_init__(self) -> None:
        if self.run_dir is None and self.pred_dir is None:
            raise ValueError("a report needs a training run directory or a prediction folder (or both)")
        for name in ("run_dir", "pred_dir", "images_dir", "gt_dir"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise FileNotFoundError(f"{name.replace('_', ' ')} {path} is not a folder")
        if self.metrics_csv is not None and not Path(self.metrics_csv).is_file():
            raise FileNotFoundError(f"metrics CSV {self.metrics_csv} does not exist")


def input_kind(path: str | Path) -> Literal["run", "predictions"]:
    """Whether `path` is a training run (metrics.jsonl or config.yaml) or a prediction folder
    (predictions.csv or <case>.nii.gz masks).

    Raises:
        FileNotFoundError: not a folder.
        ValueError: it is both, or neither.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a run directory or a prediction folder)")
    is_run = (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()
    masks = mask_files(path)
    if not is_run and masks and not (path / PREDICTIONS_CSV).is_file() and all(c.endswith("_0000") for c in masks):
        raise ValueError(f"{path} holds CTs (<case>_0000 files), not predicted masks: pass it as --images")
    is_pred = (path / PREDICTIONS_CSV).is_file() or bool(masks)
    if is_run == is_pred:
        raise ValueError(f"{path} is {'both' if is_run else 'neither'} a training run directory (metrics.jsonl or "
                         f"config.yaml) {'and' if is_run else 'nor'} a prediction folder (predictions.csv or "
                         "<case>.nii.gz masks)")
    return "run" if is_run else "predictions"


def sources_from_paths(paths: list[str | Path], images_dir: str | Path | None = None, gt_dir: str | Path | None = None,
                       metrics_csv: str | Path | None = None) -> ReportSources:
    """ReportSources from `panseg report RUN_DIR|PRED_DIR ...`: one run and/or one prediction folder.

    Raises:
        ValueError: more than one of a kind, or a path that is neither (see `input_kind`).
    """
    found: dict[str, Path] = {}
    for path in paths:
        kind = input_kind(path)
        if kind in found:
            raise ValueError(f"give one {'run directory' if kind == 'run' else 'prediction folder'}, but both "
                             f"{found[kind]} and {path} are one")
        found[kind] = Path(path)
    return ReportSources(run_dir=found.get("run"), pred_dir=found.get("predictions"),
                         images_dir=None if images_dir is None else Path(images_dir),
                         gt_dir=None if gt_dir is None else Path(gt_dir),
                         metrics_csv=None if metrics_csv is None else Path(metrics_csv))


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------


def read_training_log(path: str | Path) -> list[dict]:
    """RUN/metrics.jsonl as one dict per epoch, sorted; after a resume the later entry of an epoch wins.

    Raises:
        ValueError: a line is not a JSON object with an 'epoch' (the line is named).
    """
    by_epoch: dict[int, dict] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err}); was the run killed while writing it?") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise ValueError(f"{path} line {number} is not a metrics record with an 'epoch': {line[:80]}")
        by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Per-case rows of a CSV from `panseg evaluate --out` (cells that are numbers become floats).

    Raises:
        ValueError: the CSV has no case_id column.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "case_id" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no case_id column (columns: {reader.fieldnames}); "
                             "expected a CSV written by `panseg evaluate --out`")
        return [_parse_row(row) for row in reader]


def read_prediction_rows(pred_dir: Path | None) -> dict[str, dict]:
    """predictions.csv of a prediction folder by case id (empty when there is none)."""
    path = None if pred_dir is None else pred_dir / PREDICTIONS_CSV
    if path is None or not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["case_id"]: _parse_row(row) for row in csv.DictReader(f)}


def _parse_row(row: dict) -> dict:
    """CSV cells back to values; the case id stays text (an id like 007 is not a number)."""
    return {k: v if k == "case_id" else _number_or_text(v) for k, v in row.items()}


def _number_or_text(text: str | None):
    if text is None or text == "":
        return None
    try:
        return json.loads(text) if text[0] in "[-0123456789" else {"True": True, "False": False}.get(text, text)
    except json.JSONDecodeError:
        return text


def preprocess_config(run_dir: Path | None) -> tuple[PreprocessConfig, str]:
    """The preprocessing that decides crops: the run's config.yaml, else the paper preset; and its name."""
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return load_config(run_dir / "config.yaml").preprocess, f"{run_dir / 'config.yaml'}"
    return preset("paper").preprocess, "the paper preset"


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFigure:
    """One case's section: the PNG (None when it could not be drawn), what it shows, and volumes."""

    case_id: str
    png: bytes | None
    caption: str
    error: str = ""
    values: dict = field(default_factory=dict)  # truth_ml, pred_ml for the table


def crop_box_of(ct: np.ndarray, prediction_row: dict | None, cfg: PreprocessConfig,
                cfg_name: str) -> tuple[Box | None, str]:
    """The crop box to draw and where it comes from: the one the case was predicted with
    (predictions.csv), else `crop.choose_crop` on the CT with `cfg` (no labels, as at inference)."""
    listed = (prediction_row or {}).get("crop_box_zyx")
    if isinstance(listed, list) and len(listed) == 6:
        return Box.from_list(listed), f"crop box used by the prediction ({prediction_row.get('crop_reason')})"
    try:
        decision = choose_crop(ct, None, cfg)
    except ValueError as err:
        return None, f"no crop box: {err}"
    return decision.box, f"crop box from {cfg_name} ({decision.reason})"


def _read_mask(case_id: str, what: str, path: Path | None, ct: Volume) -> np.ndarray | None:
    if path is None:
        return None
    mask = read_volume(path)
    if not mask.geometry.matches(ct.geometry):
        raise ImageReadError(f"case {case_id}: the {what} {path} has {mask.geometry.describe()}, but the CT has "
                             f"{ct.geometry.describe()}; it must lie on the CT's grid")
    return mask.array


def render_case(case_id: str, image: Path, truth_path: Path | None, pred_path: Path | None,
                prediction_row: dict | None, cfg: PreprocessConfig, cfg_name: str) -> CaseFigure:
    """Read one case and draw it; a case that cannot be read or drawn gets an error, not an exception."""
    try:
        ct = read_volume(image)
        truth = _read_mask(case_id, "ground truth", truth_path, ct)
        prediction = _read_mask(case_id, "prediction", pred_path, ct)
    except ImageReadError as err:
        message = str(err) if str(err).startswith(f"case {case_id}") else f"case {case_id}: {err}"
        return CaseFigure(case_id, None, "", error=message)
    box, box_caption = crop_box_of(ct.array, prediction_row, cfg, cfg_name)
    point = pick_slice_point(ct.array.shape, truth, prediction)
    view = CaseView(ct.array, ct.spacing_zyx_mm, point, truth, prediction, box).flipped(display_flips(ct.direction_xyz))
    voxel_ml = float(np.prod(ct.spacing_zyx_mm)) / 1000.0
    values = {f"{name}_ml": round(int(np.count_nonzero(mask)) * voxel_ml, 2)
              for name, mask in (("truth", truth), ("pred", prediction)) if mask is not None}
    component = f", {point.component_voxels} voxels" if point.component_voxels else ""
    caption = f"{_POINT_CAPTIONS[point.source]}{component}; {box_caption}"
    return CaseFigure(case_id, render_case_png(view), caption, values=values)  # the page's heading names the case


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("case_id", "dsc", "nsd", "rule", "healthy", "false_positive", "truth_ml", "pred_ml", "seconds",
                 "crop_reason", "error")
_FORMATS = {"dsc": ".4f", "nsd": ".4f", "truth_ml": ".2f", "pred_ml": ".2f", "seconds": ".1f"}


def table_rows(case_ids: list[str], metrics: dict[str, dict], predictions: dict[str, dict],
               figures: dict[str, CaseFigure]) -> tuple[list[str], list[dict]]:
    """The per-case table: the columns of TABLE_COLUMNS that some case has a value for, and one row a case."""
    rows = []
    for case_id in case_ids:
        row = {"case_id": case_id}
        figure_values = figures[case_id].values if case_id in figures else {}
        for source in (predictions.get(case_id, {}), metrics.get(case_id, {}), figure_values):
            row.update({k: v for k, v in source.items() if k in TABLE_COLUMNS[1:] and v not in (None, "")})
        rows.append(row)
    columns = [c for c in TABLE_COLUMNS if c == "case_id" or any(r.get(c) not in (None, "") for r in rows)]
    return columns, rows


def _cell(column: str, value, link: bool) -> str:
    """A <td> whose data-value sorts numerically where the value is a number."""
    if value is None or value == "":
        return '<td data-value=""></td>'
    if isinstance(value, bool):
        return f'<td data-value="{int(value)}">{"yes" if value else "no"}</td>'
    if isinstance(value, (int, float)):
        text = format(value, _FORMATS.get(column, ".4g")) if math.isfinite(value) else str(value)
        return f'<td data-value="{value!r}">{text}</td>'
    text = html.escape(str(value))
    if link:
        text = f'<a href="#case-{text}">{text}</a>'
    return f'<td data-value="{html.escape(str(value))}">{text}</td>'


def table_html(columns: list[str], rows: list[dict], linked: set[str]) -> str:
    head = "".join(f'<th title="sort by {c}">{html.escape(c)}</th>' for c in columns)
    body = "\n".join("<tr>" + "".join(_cell(c, r.get(c), c == "case_id" and r["case_id"] in linked) for c in columns)
                     + "</tr>" for r in rows)
    return f'<table id="cases"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def png_img(png: bytes, alt: str) -> str:
    """An <img> holding the PNG itself (data: URI), so the page needs no other file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>
window.reportErrors = [];
window.addEventListener('error', function (e) {{
  window.reportErrors.push(String(e.message || (e.target && e.target.src ? 'failed to load ' + e.target.tagName : e)));
}}, true);
</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #111; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f3f4f6; cursor: pointer; user-select: none; }}
th[aria-sort=ascending]::after {{ content: " \\25B2"; }}
th[aria-sort=descending]::after {{ content: " \\25BC"; }}
section.case {{ margin: 1.5em 0; }}
section.case {{ overflow-x: auto; }}
section.case img {{ max-width: none; }}  /* natural size: every case's panels the same height */
.error {{ color: #b91c1c; }}
pre {{ background: #f9fafb; padding: 0.6em; }}
</style></head>
<body>
"""

_TAIL = """<script>
(function () {
  var table = document.getElementById('cases');
  if (table) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    headers.forEach(function (th, column) {
      th.addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[column].getAttribute('data-value'), y = b.cells[column].getAttribute('data-value');
          var nx = parseFloat(x), ny = parseFloat(y);
          var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
        headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      });
    });
  }
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    document.body.setAttribute('data-images', images.length);
    document.body.setAttribute('data-images-loaded',
      images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length);
    document.body.setAttribute('data-errors', window.reportErrors.length);
  });
})();
</script>
</body></html>
"""


RULES_HTML = ("The <code>rule</code> column is the FLARE 2024 rule that scored the case: <code>scored</code> "
              "DSC and NSD (2 mm); <code>low_dsc</code> DSC &lt; 0.2, so NSD counts as 0; <code>both_empty</code> "
              "no lesion in the truth or the prediction, DSC 1 and NSD 1; <code>one_empty</code> a lesion in "
              "only one of them, 0 and 0; <code>invalid_labels</code>, <code>missing</code>, "
              "<code>geometry_mismatch</code>, <code>read_error</code> 0 and 0.")


def build_html(title: str, sources_html: str, curves: bytes | None, summary: str, table: str,
               figures: list[CaseFigure], notes: list[str]) -> str:
    """The whole page (see the module docstring); every argument is already safe HTML or bytes."""
    parts = [_HEAD.format(title=html.escape(title)), f"<h1>{html.escape(title)}</h1>", sources_html]
    parts += [f'<p class="error">{html.escape(n)}</p>' for n in notes]
    if curves is not None:
        parts += ["<h2>Training</h2>", png_img(curves, "training curves")]
    if summary:
        parts += ["<h2>Summary</h2>", f"<pre>{html.escape(summary)}</pre>"]
    parts += ["<h2>Cases</h2>", f"<p>Click a column to sort. {RULES_HTML}</p>", table]
    for figure in figures:
        parts.append(f'<section class="case" id="case-{html.escape(figure.case_id)}"><h3>{html.escape(figure.case_id)}</h3>')
        if figure.png is not None:
            parts += [png_img(figure.png, f"{figure.case_id}: CT with ground truth and prediction"),
                      f"<p>{html.escape(figure.caption)}</p>"]
        if figure.error:
            parts.append(f'<p class="error">{html.escape(figure.error)}</p>')
        parts.append("</section>")
    return "\n".join(parts) + _TAIL


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    """What `build_report` wrote: the page, how many cases it drew of how many, the cases that could not
    be drawn (each message names the case), and notes on what the page lacks; both are on the page too."""

    path: Path
    cases: int
    cases_drawn: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]


def case_metrics(sources: ReportSources, truth_name: str | None = None) -> tuple[dict[str, dict], str]:
    """Per-case metric rows by case id and the summary text: from the metrics CSV, else from
    evaluating the predictions against the ground truth, else none. The summary's first line says which
    truth it is against (`truth_name`, e.g. 'the complete truth (every lesion)', and the folder)."""
    if sources.metrics_csv is not None:
        return {r["case_id"]: r for r in read_metrics_csv(sources.metrics_csv)}, ""
    if sources.pred_dir is not None and sources.gt_dir is not None:
        result = evaluate_folders(sources.pred_dir, sources.gt_dir)
        against = f"Tumor scores against {truth_name or 'the ground truth'} in {sources.gt_dir}, FLARE 2024 rules:"
        return {r["case_id"]: r for r in result.rows}, against + "\n" + format_table(result)
    return {}, ""


def _sources_html(sources: ReportSources) -> str:
    items = [f"<li>{name}: <code>{html.escape(str(path))}</code></li>" for name, path in
             (("run", sources.run_dir), ("predictions", sources.pred_dir), ("images", sources.images_dir),
              ("ground truth", sources.gt_dir), ("metrics", sources.metrics_csv)) if path is not None]
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"<p>Written {html.escape(when)} from:</p><ul>{''.join(items)}</ul>"


def _training_curves(run_dir: Path | None, notes: list[str]) -> bytes | None:
    if run_dir is None:
        return None
    log = run_dir / "metrics.jsonl"
    rows = read_training_log(log) if log.is_file() else []
    if not any("train_loss" in r for r in rows):
        notes.append(f"no training epoch is logged in {log} yet")
        return None
    return render_curves_png(rows)


def _draw_cases(case_ids: list[str], sources: ReportSources, predictions: dict[str, dict], max_cases: int,
                notes: list[str]) -> dict[str, CaseFigure]:
    """The figure of each case that has a CT in images_dir (the first `max_cases` by id)."""
    if sources.images_dir is None:
        notes.append("no CT folder given (--images): the report has no overlays")
        return {}
    images = {c.case_id: Path(c.image) for c in discover_cohort(sources.images_dir, images_dir=sources.images_dir).valid}
    truths = mask_files(sources.gt_dir) if sources.gt_dir is not None else {}
    preds = mask_files(sources.pred_dir) if sources.pred_dir is not None else {}
    cfg, cfg_name = preprocess_config(sources.run_dir)
    drawable = [c for c in case_ids if c in images]
    if len(drawable) < len(case_ids):
        missing = [c for c in case_ids if c not in images]
        notes.append(f"{len(missing)} case(s) have no CT <case>_0000 in {sources.images_dir}: {', '.join(missing[:10])}")
    if len(drawable) > max_cases:
        notes.append(f"{max_cases} of {len(drawable)} cases are drawn (the first by id; see --max-cases)")
    figures = {}
    for case_id in drawable[:max_cases]:
        figures[case_id] = render_case(case_id, images[case_id], truths.get(case_id) if sources.gt_dir else None,
                                       preds.get(case_id) if sources.pred_dir else None, predictions.get(case_id),
                                       cfg, cfg_name)
    return figures


def build_report(sources: ReportSources, out: str | Path, max_cases: int = DEFAULT_MAX_CASES,
                 title: str = "panseg report", truth_name: str | None = None) -> ReportResult:
    """Write the self-contained HTML report of `sources` to `out` (atomically).

    Cases are the union of the predicted masks, the ground-truth masks and the metric rows. A case
    without a prediction where a prediction folder is given is drawn with the truth alone (and scores
    'missing' in the metrics); a case that cannot be read is listed with its error. `truth_name` says in
    the summary which truth `sources.gt_dir` holds.

    Raises:
        ValueError: max_cases < 0, or an input is malformed (named).
    """
    if max_cases < 0:
        raise ValueError(f"max_cases must be >= 0, but it is {max_cases}")
    notes: list[str] = []
    curves = _training_curves(sources.run_dir, notes)
    metrics, summary = case_metrics(sources, truth_name)
    predictions = read_prediction_rows(sources.pred_dir)
    case_ids = sorted(set(metrics)
                      | (set(mask_files(sources.pred_dir)) if sources.pred_dir is not None else set())
                      | (set(mask_files(sources.gt_dir)) if sources.gt_dir is not None else set()))
    figures = _draw_cases(case_ids, sources, predictions, max_cases, notes) if case_ids else {}
    problems = tuple(f.error for f in figures.values() if f.error)
    columns, rows = table_rows(case_ids, metrics, predictions, figures)
    page = build_html(title, _sources_html(sources), curves, summary,
                      table_html(columns, rows, {c for c, f in figures.items() if f.png is not None}),
                      list(figures.values()), notes)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return ReportResult(path, len(case_ids), sum(f.png is not None for f in figures.values()), problems,
                        tuple(notes))


__all__ = ["CaseFigure", "DEFAULT_MAX_CASES", "ReportResult", "ReportSources", "build_html", "build_report",
           "case_metrics", "crop_box_of", "input_kind", "read_metrics_csv", "read_training_log", "render_case",
           "sources_from_paths", "table_rows"]
