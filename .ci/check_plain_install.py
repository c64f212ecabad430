"""Import every panseg module as a plain `pip install panseg` (no extras) has them.

Run by .ci/run inside a fresh venv holding only torch and panseg's `dependencies`. Every module a
stage needs (preprocess, train, tune, predict, pseudolabel, evaluate, phantom, cluster) must import;
the report modules need the viz extra and must then fail with an ImportError that says how to get it.

    python .ci/check_plain_install.py                       # in the plain venv
    python .ci/check_plain_install.py --without matplotlib scipy  # emulate one here: block those imports

Exits 1 naming each module that failed and why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import sys
import traceback
from pathlib import Path

# Modules that need an optional extra, and the words their ImportError must contain.
NEEDS_EXTRA = {"panseg.report": "panseg[viz]", "panseg.report.figures": "panseg[viz]", "panseg.report.page": "panseg[viz]"}


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes the named top-level packages unimportable, as if not installed."""

    def __init__(self, names: list[str]):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}' (blocked by --without)", name=fullname)
        return None


def panseg_modules() -> list[str]:
    """Every module of the installed package, listed from its files (importing a package to list it would stop at
    the first one needing an extra)."""
    import panseg

    root = Path(panseg.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def check_module(name: str, extras_installed: bool) -> str | None:
    """None when `name` imports as expected, else what went wrong."""
    try:
        importlib.import_module(name)
        return None
    except ImportError as err:
        hint = NEEDS_EXTRA.get(name)
        if hint is not None and not extras_installed and hint in str(err):
            return None
        return f"{name}: {type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - any import-time crash is a failure of this check
        return f"{name}: {traceback.format_exc(limit=3)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", nargs="*", default=[], metavar="PACKAGE",
                        help="top-level packages to treat as not installed (emulates a plain venv)")
    args = parser.parse_args(argv)
    if args.without:
        sys.meta_path.insert(0, _Blocker(args.without))
    try:
        importlib.import_module("matplotlib")
        extras_installed = True
    except ImportError:
        extras_installed = False
    modules = panseg_modules()
    failures = [f for f in (check_module(m, extras_installed) for m in modules) if f]
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{len(modules) - len(failures)} of {len(modules)} panseg modules import as a plain install has them")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
