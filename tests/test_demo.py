"""The demo's pure parts: three disjoint case sets, the preprocessing summary's crop line, and Ray Data's
progress-bar notice kept out of a quiet run, and the demo's own local Ray on a machine with no token. (The
whole demo starts Ray: tests/test_pseudolabel.py runs the two-stage demo under the `ray` marker.)"""

import logging
import os
import subprocess
import sys

import pytest

from panseg.data_pipeline import PreprocessResult, format_summary
from panseg.demo import VAL_CASES, demo_split
from panseg.train_loop import seeded_split


def test_the_split_is_three_disjoint_sets_whose_test_set_is_the_stores_held_out_share():
    ids = [f"phantom_{i:03d}" for i in range(120)] + [f"phantom_healthy_{i:03d}" for i in range(16)]
    split = demo_split(ids, 0.2, VAL_CASES, seed=0)
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert len(test) == 27 and len(val) == VAL_CASES == 8 and len(train) == 136 - 27 - 8
    assert not train & val and not train & test and not val & test and train | val | test == set(ids)
    assert split["test"] == seeded_split(ids, 0.2, 0)["val"]  # the cases bench/learning.py scores its curve on
    assert demo_split(ids, 0.2, 8, seed=0) == split and demo_split(ids, 0.2, 8, seed=1) != split


def test_the_crop_fallback_line_says_it_is_expected_for_non_contrast_scans():
    rows = tuple({"case_id": f"c{i}", "status": "ok", "crop_reason": "body_fallback" if i < 12 else "largest_component"}
                 for i in range(14))
    text = format_summary(PreprocessResult("/store", rows, skipped=0, seconds=1.0))
    line = next(x for x in text.splitlines() if x.startswith("crop fell back"))
    assert line.startswith("crop fell back to the body box in 12 case(s), as expected for non-contrast scans")
    assert line.endswith("c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, ...")


def test_ray_datas_progress_bar_notice_is_filtered_and_other_warnings_are_not(caplog):
    from panseg.ray_shell import _hide_progress_bar_notice

    _hide_progress_bar_notice()
    _hide_progress_bar_notice()  # once only
    logger = logging.getLogger("ray.data._internal.progress")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Progress bars disabled. To enable, set ...")
        logger.warning("Progress bars for operators disabled.")
    assert [r.getMessage() for r in caplog.records] == ["Progress bars for operators disabled."]


@pytest.mark.ray
def test_the_demos_ray_starts_on_a_machine_without_a_token_with_token_auth_on_and_no_notice(tmp_path):
    """A new user's machine: RAY_AUTH_MODE unset and no ~/.ray/auth_token. The demo's local Ray starts with
    the token authentication Ray turns on by default (making the token), and Ray's notice about it is not
    printed. (Setting RAY_AUTH_MODE=token here instead made Ray's GCS abort: no token.)"""
    script = ("import ray\nfrom panseg.demo import start_quiet_local_ray\nstart_quiet_local_ray(1)\n"
              "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "print('token auth', get_authentication_mode() == AuthenticationMode.TOKEN)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token auth True" in done.stdout
    assert (tmp_path / ".ray" / "auth_token").is_file()
    assert "Token authentication is enabled" not in done.stderr + done.stdout
