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
