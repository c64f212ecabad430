"""tests/optional.py: a missing oracle skips, and fails under PANSEG_STRICT_SKIPS=1."""

import pytest

from tests.optional import STRICT_SKIPS, import_optional, require_program

MISSING = "panseg_no_such_oracle"


def test_a_missing_module_skips_by_default(monkeypatch):
    monkeypatch.delenv(STRICT_SKIPS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING}.*pip install it"):
        import_optional(MISSING, "pip install it")


def test_a_missing_module_or_program_fails_when_strict(monkeypatch):
    monkeypatch.setenv(STRICT_SKIPS, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} is missing.*PANSEG_STRICT_SKIPS=1.*pip install it"):
        import_optional(MISSING, "pip install it")
    with pytest.raises(pytest.fail.Exception, match=f"program {MISSING} on PATH is missing"):
        require_program(MISSING, "apt-get install it")


def test_a_present_module_and_program_are_returned(monkeypatch):
    monkeypatch.setenv(STRICT_SKIPS, "1")
    assert import_optional("json", "stdlib").dumps([1]) == "[1]"
    assert require_program("sh", "coreutils").endswith("sh")
