"""The `panseg` command: fast help, strict parsing, config output."""

import subprocess
import sys
import time

import pytest

from panseg.cli import build_parser, main
from panseg.config import load_config


def test_help_is_fast_and_lists_every_stage():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "panseg.cli", "--help"], capture_output=True, encoding="utf-8",
                         errors="replace", check=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"panseg --help took {elapsed:.2f} s"
    for stage in ("phantom", "preprocess", "config", "train", "tune", "predict", "pseudolabel", "evaluate", "report",
                  "demo"):
        assert stage in out.stdout
    assert "examples:" in out.stdout


def test_help_imports_nothing_heavy():
    code = ("import sys; from panseg.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('ray', 'torch', 'SimpleITK', 'zarr', 'numpy', 'matplotlib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace",
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["phantom", "out", "--case", "3"],          # an abbreviation of --cases
    ["phantom", "out", "--cases", "3", "--sead", "1"],  # a typo
    ["preprocess", "--raw", "r"],               # --out missing
    ["config", "--preset", "papper"],
    ["pseudolabel", "--model", "m", "--input", "i"],  # --output missing
    ["demo", "--two"],                          # an abbreviation of --two-stage
    ["nonsense"],
])
def test_strict_parsing_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_every_subcommand_help_has_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        assert "example" in (subparser.epilog or ""), f"panseg {name} --help has no example"


def test_config_subcommand_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "tiny.yaml"
    assert main(["config", "--preset", "tiny", "--set", "train.epochs=9", "--out", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.preset == "tiny" and cfg.train.epochs == 9


def test_config_errors_exit_2_with_the_key_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "--preset", "tiny", "--set", "train.epoch=9"])
    assert exit_info.value.code == 2
    assert "train.epoch" in capsys.readouterr().err


def test_phantom_command_writes_what_it_describes(tmp_path, capsys):
    import json

    import numpy as np
    import SimpleITK as sitk

    out = tmp_path / "raw"
    assert main(["phantom", str(out), "--cases", "4", "--healthy", "1", "--small", "--truth", str(tmp_path / "t")]) == 0
    assert "phantom_healthy_000" in capsys.readouterr().out
    meta = json.loads((out / "phantom.json").read_text())
    assert len(meta["cases"]) == 5
    directions = set()
    for case in meta["cases"]:
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case['case_id']}_0000.nii.gz"))
        assert image.GetPixelID() == sitk.sitkInt16
        np.testing.assert_allclose(image.GetSpacing(), case["spacing_zyx_mm"][::-1], rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), case["origin_xyz_mm"], atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), case["direction_xyz"], atol=1e-6)
        directions.add(tuple(np.round(image.GetDirection(), 3)))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case['case_id']}.nii.gz")))
        assert (label.max() == 0) == case["healthy"]
    assert len(directions) >= 2 and any(d != (1, 0, 0, 0, 1, 0, 0, 0, 1) for d in directions)


@pytest.mark.parametrize("argv, stage", [
    (["phantom", "p", "--case", "3"], "phantom"),
    (["evaluate", "--pred", "p", "--gt", "g", "--tolerance", "1"], "evaluate"),
    (["predict", "--model", "m", "--input", "i", "--output", "o", "--all"], "predict"),
])
def test_a_stages_bad_flag_prints_that_stages_usage(argv, stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: panseg {stage} ")
    assert f"panseg {stage}: error: unrecognized arguments: {' '.join(argv[-2:] if stage != 'predict' else argv[-1:])}" in err


def _write_mask(path, lesion: bool):
    import numpy as np

    from panseg.io import Volume, write_volume

    array = np.zeros((8, 9, 10), np.uint8)
    if lesion:
        array[2:6, 3:7, 3:8] = 1
    write_volume(Volume(array, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0)), path)


def test_evaluate_exits_1_on_missing_or_unreadable_predictions_unless_allowed(tmp_path, capsys):
    import csv

    gt, pred, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "scores.csv"
    for case, lesion in (("lesion_ok", True), ("lesion_broken", True), ("healthy_ok", False),
                         ("healthy_gone", False), ("healthy_gone2", False)):
        _write_mask(gt / f"{case}.nii.gz", lesion)
    _write_mask(pred / "lesion_ok.nii.gz", True)
    _write_mask(pred / "healthy_ok.nii.gz", False)
    (pred / "lesion_broken.nii.gz").write_bytes(b"not a nifti")

    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "cases: 5, scored 2, missing 2, unreadable or off-grid 1 (scored 0, as FLARE does)" in captured.out
    assert "healthy: 3, false-positive rate on healthy: 0.0% (0 of 1 predicted; 2 missing)" in captured.out
    assert "2 predictions missing and 1 predictions unreadable or off-grid (lesion_broken)" in captured.err
    assert "--allow-missing" in captured.err
    with open(out, newline="") as f:  # the CSV is written all the same, every case in it
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lesion_ok", "lesion_broken", "healthy_ok", "healthy_gone", "healthy_gone2"}
    assert (rows["healthy_gone"]["rule"], float(rows["healthy_gone"]["dsc"])) == ("missing", 0.0)
    assert (rows["lesion_broken"]["rule"], float(rows["lesion_broken"]["dsc"])) == ("read_error", 0.0)
    assert float(rows["lesion_ok"]["dsc"]) == 1.0

    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--allow-missing"]) == 0
    assert capsys.readouterr().err == ""


def test_evaluate_exits_0_when_every_case_is_scored(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for case, lesion in (("a", True), ("b", False)):
        _write_mask(gt / f"{case}.nii.gz", lesion)
        _write_mask(pred / f"{case}.nii.gz", lesion)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 0
    out = capsys.readouterr().out
    assert "cases: 2\n" in out and "false-positive rate on healthy: 0.0% (0 of 1 predicted)" in out
