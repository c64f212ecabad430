"""The HTML report: slices through the right voxel, views the right way up, overlays drawn, the page
self-contained and complete, and (in headless Chromium) every image loaded with no script error."""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from panseg.config import preset, save_config
from panseg.evaluation.folders import evaluate_folders, write_csv
from panseg.io import Volume, read_volume, write_volume
from panseg.preprocessing.crop import Box
from panseg.report.figures import (PREDICTION_COLOR, TRUTH_COLOR, CaseView, SlicePoint, display_flips,
                                   largest_component_point, pick_slice_point, render_case_png, render_curves_png)
from panseg.report.page import (DEFAULT_MAX_CASES, ReportSources, build_report, input_kind, read_training_log,
                                sources_from_paths)
from tests.optional import require_program

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Where the planes cut
# ----------------------------------------------------------------------------------------------


def test_largest_component_point_is_the_centre_of_the_largest_lesion():
    mask = np.zeros((20, 30, 40), dtype=np.uint8)
    mask[4:9, 10:15, 20:25] = 1  # 125 voxels, centre (6, 12, 22)
    mask[15:17, 2:4, 2:4] = 1  # 8 voxels
    assert largest_component_point(mask) == ((6, 12, 22), 125)
    assert largest_component_point(np.zeros((3, 3, 3))) is None


def test_largest_component_point_lies_inside_a_hollow_lesion():
    mask = np.zeros((21, 21, 21), dtype=bool)
    mask[3:18, 3:18, 3:18] = True
    mask[5:16, 5:16, 5:16] = False  # a shell: its centroid (10, 10, 10) is not lesion
    (z, y, x), voxels = largest_component_point(mask)
    assert mask[z, y, x]
    assert voxels == 15**3 - 11**3


def test_pick_slice_point_prefers_truth_then_false_positive_then_middle():
    shape = (20, 30, 40)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # small true lesion, centre (3, 3, 3)
    pred = np.zeros(shape, dtype=np.uint8)
    pred[10:16, 20:26, 30:36] = 1  # bigger predicted component, centre (12 or 13, ...)
    assert pick_slice_point(shape, truth, pred) == SlicePoint((3, 3, 3), "truth_lesion", 27)
    fp = pick_slice_point(shape, np.zeros(shape), pred)
    assert fp.source == "false_positive" and fp.component_voxels == 216 and pred[fp.zyx]
    assert pick_slice_point(shape, None, pred).source == "prediction"
    assert pick_slice_point(shape, np.zeros(shape), np.zeros(shape)) == SlicePoint((10, 15, 20), "middle", 0)
    assert pick_slice_point(shape, None, None).source == "middle"


# ----------------------------------------------------------------------------------------------
# Which way up
# ----------------------------------------------------------------------------------------------


def test_display_flips_turn_ras_into_lps_and_leave_swapped_axes_alone():
    assert display_flips(LPS) == (False, False, False)
    assert display_flips(RAS) == (False, True, True)
    assert display_flips((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)) == (True, False, False)
    tilted = (np.cos(0.1), -np.sin(0.1), 0.0, np.sin(0.1), np.cos(0.1), 0.0, 0.0, 0.0, 1.0)
    assert display_flips(tilted) == (False, False, False)
    swapped = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y index axes exchanged
    assert display_flips(swapped) == (False, False, False)


def test_flipped_view_moves_point_box_and_masks_together():
    shape = (10, 12, 14)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[2, 3, 4] = 1
    view = CaseView(np.zeros(shape, np.int16), (2.0, 1.0, 1.0), SlicePoint((2, 3, 4), "truth_lesion", 1), truth, None,
                    Box((1, 2, 3), (5, 6, 7)))
    flipped = view.flipped((False, True, True))
    assert flipped.point.zyx == (2, 12 - 1 - 3, 14 - 1 - 4)
    assert flipped.truth[flipped.point.zyx] == 1
    assert flipped.crop_box == Box((1, 12 - 6, 14 - 7), (5, 12 - 2, 14 - 3))
    assert view.flipped((False, False, False)) is view


# ----------------------------------------------------------------------------------------------
# PNGs
# ----------------------------------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(data), format="png")[..., :3]  # (H, W, 3) floats in [0, 1]


def _pixels_near(image: np.ndarray, hex_color: str, tolerance: float = 0.12) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=-1) < tolerance).sum())


def _blob_case():
    """A 40 HU body with a 'lesion' cube; the prediction is the cube shifted by 3 voxels in x."""
    shape = (30, 40, 40)
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[:, 5:35, 5:35] = 40
    truth = np.zeros(shape, dtype=np.uint8)
    truth[10:20, 15:25, 15:25] = 1
    pred = np.roll(truth, 3, axis=2)
    point = pick_slice_point(shape, truth, pred)
    return ct, truth, pred, point


def test_case_png_shows_truth_fill_prediction_contour_and_crop_box():
    ct, truth, pred, point = _blob_case()
    with_all = _decode_png(render_case_png(CaseView(ct, (2.5, 1.0, 1.0), point, truth, pred, Box((0, 5, 5), (30, 35, 35)))))
    bare = _decode_png(render_case_png(CaseView(ct, (2.5, 1.0, 1.0), point)))
    # The truth is a translucent green over grey: more green than red or blue, where the CT is.
    greenish = (with_all[..., 1] - np.maximum(with_all[..., 0], with_all[..., 2])) > 0.15
    assert greenish.sum() > 300  # three planes of a 10x10 (axial) / 10x25 (coronal, sagittal) lesion
    assert _pixels_near(with_all, PREDICTION_COLOR) > 100  # the contour, in all three planes
    assert _pixels_near(with_all, "#facc15") > 100  # the crop box's dashes (and its legend entry)
    bare_green = (bare[..., 1] - np.maximum(bare[..., 0], bare[..., 2])) > 0.15
    assert bare_green.sum() == 0 and _pixels_near(bare, PREDICTION_COLOR) == 0
    assert _pixels_near(bare, TRUTH_COLOR, 0.05) == 0


def test_case_png_uses_the_spacing_for_proportions():
    ct, truth, pred, point = _blob_case()
    flat = _decode_png(render_case_png(CaseView(ct, (1.0, 1.0, 1.0), point)))
    tall = _decode_png(render_case_png(CaseView(ct, (4.0, 1.0, 1.0), point)))
    # 30 slices at 4 mm are a 120 mm tall coronal plane against 30 mm at 1 mm: the figure gets narrower
    # relative to its height, since the coronal and sagittal panels keep true proportions.
    assert tall.shape[1] / tall.shape[0] < flat.shape[1] / flat.shape[0]


def test_curves_png_and_training_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.8, "val_tumor_dsc": 0.1},
            {"epoch": 2, "train_loss": 0.7, "val_tumor_dsc": 0.2, "val_cases": 3}]  # epoch 2 again after a resume
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = read_training_log(log)
    assert [r["train_loss"] for r in read] == [1.0, 0.7]
    image = _decode_png(render_curves_png(read))
    assert image.shape[1] > 600  # two panels: loss and validation
    one_panel = _decode_png(render_curves_png(read[:1]))
    assert one_panel.shape[1] < image.shape[1]
    counts_only = _decode_png(render_curves_png([{"epoch": 1, "train_loss": 1.0, "val_cases": 3}]))
    assert counts_only.shape == one_panel.shape  # a count (int) is not plotted as a validation score
    log.write_text(json.dumps(rows[0]) + '\n{"epoch": 2, "train_lo\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_training_log(log)
    with pytest.raises(ValueError, match="no epoch with a train_loss"):
        render_curves_png([{"epoch": 1}])


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def test_input_kind_tells_runs_from_predictions_and_refuses_the_rest(tmp_path):
    run, pred, ct_dir, empty = (tmp_path / n for n in ("run", "pred", "cts", "empty"))
    for folder in (run, pred, ct_dir, empty):
        folder.mkdir()
    (run / "metrics.jsonl").write_text("")
    write_volume(Volume(np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0)), pred / "a.nii.gz")
    write_volume(Volume(np.zeros((2, 2, 2), np.int16), (1.0, 1.0, 1.0)), ct_dir / "a_0000.nii.gz")
    assert input_kind(run) == "run" and input_kind(pred) == "predictions"
    with pytest.raises(ValueError, match="neither a training run directory .* nor a prediction folder"):
        input_kind(empty)
    with pytest.raises(ValueError, match="holds CTs .* pass it as --images"):
        input_kind(ct_dir)
    with pytest.raises(ValueError, match="give one prediction folder"):
        sources_from_paths([pred, pred])
    with pytest.raises(ValueError, match="needs a training run directory or a prediction folder"):
        ReportSources(images_dir=ct_dir)
    with pytest.raises(FileNotFoundError, match="gt dir .* is not a folder"):
        sources_from_paths([pred], gt_dir=tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# The page, from the small phantom cohort and fake predictions
# ----------------------------------------------------------------------------------------------

PERFECT, MISSING, FP_HEALTHY, CLEAN_HEALTHY = "phantom_000", "phantom_001", "phantom_healthy_000", "phantom_healthy_001"


@pytest.fixture(scope="module")
def report_inputs(small_cohort, tmp_path_factory):
    """A run directory (log, config), predictions (one perfect, one missing, shifted others, one
    false positive on a healthy case), a predictions.csv with one crop box, and the report built."""
    root = tmp_path_factory.mktemp("report")
    truth_dir, images = small_cohort / "truth", small_cohort / "raw" / "imagesTr"
    run, pred = root / "run", root / "pred"
    run.mkdir()
    pred.mkdir()
    save_config(preset("tiny"), run / "config.yaml")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_tumor_dsc": e / 10})
                                                 for e in range(1, 5)) + "\n")
    for path in sorted(truth_dir.glob("*.nii.gz")):
        case_id = path.name[:-len(".nii.gz")]
        truth = read_volume(path)
        mask = (truth.array > 0).astype(np.uint8)
        if case_id == MISSING:
            continue
        if case_id == FP_HEALTHY:
            mask[8:11, 20:24, 30:35] = 1  # 60 voxels
        elif case_id != PERFECT:
            mask = np.roll(mask, 2, axis=2)
        write_volume(truth.with_array(mask), pred / path.name)
    (pred / "predictions.csv").write_text("case_id,status,error,seconds,crop_reason,crop_box_zyx\n"
                                          f'{PERFECT},ok,,1.5,largest_component,"[1, 2, 3, 20, 30, 40]"\n')
    out = root / "report.html"
    result = build_report(sources_from_paths([run, pred], images_dir=images, gt_dir=truth_dir), out)
    return {"root": root, "run": run, "pred": pred, "truth": truth_dir, "images": images, "out": out,
            "result": result, "html": out.read_text(encoding="utf-8")}


def _section(page: str, case_id: str) -> str:
    start = page.index(f'<section class="case" id="case-{case_id}">')
    return page[start:page.index("</section>", start)]


def test_report_page_holds_every_case_with_its_scores_and_images(report_inputs):
    page, result = report_inputs["html"], report_inputs["result"]
    evaluation = evaluate_folders(report_inputs["pred"], report_inputs["truth"])
    assert result.cases == len(evaluation.rows) == 8 and result.cases_drawn == 8 and result.problems == ()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == 1 + 8  # the curves and one per case
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    for row in evaluation.rows:  # the table holds each case's DSC as evaluate scores it
        assert re.search(rf'<a href="#case-{row["case_id"]}">{row["case_id"]}</a></td><td data-value="{row["dsc"]!r}">'
                         rf'{row["dsc"]:.4f}</td>', page)
    assert '<td data-value="1.0">1.0000</td>' in page  # the perfect case
    assert "missing" in page and "false-positive rate on healthy: 50.0%" in page
    assert "planes through the largest false positive (the ground truth is empty), 60 voxels" in _section(page, FP_HEALTHY)
    assert "through the middle of the volume" in _section(page, CLEAN_HEALTHY)
    assert "planes through the largest ground-truth lesion" in _section(page, MISSING)  # truth alone is drawn
    assert "crop box used by the prediction (largest_component)" in _section(page, PERFECT)
    assert "crop box from " + str(report_inputs["run"] / "config.yaml") in _section(page, "phantom_002")


def test_report_names_a_case_whose_mask_is_on_another_grid(report_inputs, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(report_inputs["pred"], pred)
    bad = read_volume(pred / f"{PERFECT}.nii.gz")
    write_volume(Volume(bad.array[:-1], bad.spacing_zyx_mm, bad.origin_xyz_mm, bad.direction_xyz), pred / f"{PERFECT}.nii.gz")
    result = build_report(ReportSources(pred_dir=pred, images_dir=report_inputs["images"]), tmp_path / "r.html",
                          max_cases=2)
    assert result.cases_drawn == 1 and len(result.problems) == 1
    assert result.problems[0].startswith(f"case {PERFECT}: the prediction") and "CT's grid" in result.problems[0]
    assert "2 of 7 cases are drawn" in " ".join(result.notes)


def test_report_from_a_metrics_csv_and_a_run_alone(report_inputs, tmp_path):
    csv_path = write_csv(evaluate_folders(report_inputs["pred"], report_inputs["truth"]), tmp_path / "m.csv")
    result = build_report(ReportSources(pred_dir=report_inputs["pred"], metrics_csv=csv_path), tmp_path / "a.html")
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert result.cases == 8 and result.cases_drawn == 0 and result.problems == ()  # noted, not an error
    assert "no CT folder given" in page and '<td data-value="1.0">1.0000</td>' in page
    build_report(ReportSources(run_dir=report_inputs["run"]), tmp_path / "b.html")
    assert (tmp_path / "b.html").read_text(encoding="utf-8").count("<img") == 1


def test_cli_report_writes_the_page_and_rejects_bad_input(report_inputs, tmp_path, capsys):
    from panseg.cli import build_parser, main

    out = tmp_path / "cli.html"
    assert main(["report", str(report_inputs["pred"]), "--images", str(report_inputs["images"]), "--gt",
                 str(report_inputs["truth"]), "--max-cases", "2", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").count("<img") == 2 and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(report_inputs["images"]), "--out", str(out)])
    assert exit_info.value.code == 2 and "pass it as --images" in capsys.readouterr().err
    defaults = build_parser().parse_args(["report", "x", "--out", "y"])
    assert defaults.max_cases == DEFAULT_MAX_CASES


# ----------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------

_SORT_PROBE = """<script>
window.addEventListener('load', function () {
  var th = Array.prototype.slice.call(document.querySelectorAll('#cases th')).filter(function (h) {
    return h.textContent === 'dsc'; })[0];
  th.click();
  var column = Array.prototype.indexOf.call(th.parentNode.children, th);
  var values = Array.prototype.slice.call(document.querySelectorAll('#cases tbody tr')).map(function (r) {
    return r.cells[column].getAttribute('data-value'); });
  document.body.setAttribute('data-sorted-dsc', values.join(' '));
});
</script>
</body>"""


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    chromium = require_program("chromium", "apt-get install chromium (Debian's package; .ci/run installs it)")
    return subprocess.run([chromium, *flags, *args], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=120)


def _body_attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, f"no <body> in Chromium's DOM dump: {dom[:300]}"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def test_report_opens_in_headless_chromium_with_every_image_loaded(report_inputs, tmp_path):
    page = report_inputs["out"]
    dumped = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    body = _body_attributes(dumped.stdout)
    assert body.get("data-images") == "9", body  # the curves and 8 cases, all in the page
    assert body.get("data-images-loaded") == "9", body  # each decoded: naturalWidth > 0
    assert body.get("data-errors") == "0", body

    # The table sorts by a click on its header (a probe added to a copy of the page clicks 'dsc').
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _SORT_PROBE), encoding="utf-8")
    body = _body_attributes(_chromium(["--dump-dom", probe.as_uri()], tmp_path).stdout)
    dsc = [float(v) for v in body["data-sorted-dsc"].split()]
    assert len(dsc) == 8 and dsc == sorted(dsc) and dsc[-1] == 1.0 and body.get("data-errors") == "0"

    # And it shows them: a screenshot of the top of the page is far from blank.
    shot = tmp_path / "shot.png"
    _chromium(["--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()], tmp_path)
    pixels = _decode_png(shot.read_bytes())
    assert (pixels.mean(axis=-1) < 0.3).mean() > 0.05  # dark CT pixels cover a good part of it


def test_a_one_voxel_prediction_is_visible_and_panels_keep_their_size():
    ct, truth, _, point = _blob_case()
    speck = np.zeros_like(truth)
    speck[point.zyx] = 1  # a lesion of one voxel, predicted
    image = _decode_png(render_case_png(CaseView(ct, (2.5, 1.0, 1.0), point, None, speck)))
    assert _pixels_near(image, PREDICTION_COLOR) > 3 * 8  # a contour of 2 px around the voxel in each plane
    reddish = (image[..., 0] - np.maximum(image[..., 1], image[..., 2])) > 0.1  # the faint fill over grey
    assert reddish.sum() > _pixels_near(image, PREDICTION_COLOR)
    # A very wide case keeps the panel height of a narrow one (no cap on the figure width shrinks it).
    wide_ct = np.full((30, 40, 400), 40, dtype=np.int16)
    wide = _decode_png(render_case_png(CaseView(wide_ct, (2.5, 1.0, 1.0), pick_slice_point(wide_ct.shape, None, None))))
    narrow = _decode_png(render_case_png(CaseView(ct, (2.5, 1.0, 1.0), point)))
    assert wide.shape[0] == narrow.shape[0] and wide.shape[1] > 1800


def test_tumor_scores_have_their_own_axis():
    rows = [{"epoch": 1, "train_loss": 1.0, "val_organ_dsc": 0.5, "val_tumor_dsc": 0.01, "val_tumor_nsd": 0.0}]
    three = _decode_png(render_curves_png(rows))
    two = _decode_png(render_curves_png([{k: v for k, v in rows[0].items() if not k.startswith("val_tumor")}]))
    assert three.shape[1] > two.shape[1] > _decode_png(render_curves_png([{"epoch": 1, "train_loss": 1.0}])).shape[1]


def test_the_page_says_which_truth_and_explains_the_rules(report_inputs, tmp_path):
    build_report(ReportSources(pred_dir=report_inputs["pred"], gt_dir=report_inputs["truth"]), tmp_path / "t.html",
                 max_cases=0, truth_name="the complete truth (every lesion)")
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert f"Tumor scores against the complete truth (every lesion) in {report_inputs['truth']}" in page
    assert "<code>low_dsc</code> DSC &lt; 0.2, so NSD counts as 0" in page
