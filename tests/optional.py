"""Optional oracles of the tests (DeepMind's surface-distance, nnU-Net's network, Chromium).

A missing oracle skips its tests on a developer's machine; in CI (`PANSEG_STRICT_SKIPS=1`, set by
`.ci/run`) it fails them instead, so a broken install cannot pass as a green run full of skips. Use
these helpers instead of `pytest.importorskip` and `pytest.mark.skipif(shutil.which(...) is None)`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

STRICT_SKIPS = "PANSEG_STRICT_SKIPS"


def strict_skips() -> bool:
    """Whether a missing oracle is an error (read when a test asks, never at import)."""
    return os.environ.get(STRICT_SKIPS, "") == "1"


def _missing(what: str, install: str, err: Exception | None = None) -> None:
    detail = f" ({err})" if err else ""
    if strict_skips():
        pytest.fail(f"{what} is missing{detail} and {STRICT_SKIPS}=1 forbids skipping: {install}", pytrace=False)
    pytest.skip(f"needs {what}{detail}: {install}")


def import_optional(module: str, install: str) -> ModuleType:
    """`module` imported, or this test skipped (failed under PANSEG_STRICT_SKIPS=1) with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        _missing(f"the module {module}", install, err)
        raise  # unreachable: skip and fail raise


def require_program(name: str, install: str) -> str:
    """The path of the program `name` on PATH, or this test skipped (failed when strict)."""
    path = shutil.which(name)
    if path is None:
        _missing(f"the program {name} on PATH", install)
    return path
