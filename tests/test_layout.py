"""The tree is the architecture: Ray shells at the top of panseg/, pure stage packages beneath.

- importing any module of a stage package leaves Ray unimported, and no stage module imports Ray
  anywhere, not even inside a function;
- a stage module imports from the top level only the shared cores (`panseg.config`, `panseg.io`,
  `panseg.__version__`), never a Ray shell;
- every relative link in the Markdown files resolves to a file that exists.
"""

import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import panseg

PANSEG = Path(panseg.__file__).resolve().parent
ROOT = PANSEG.parent
STAGE_PACKAGES = ("phantom", "preprocessing", "store", "training", "inference", "evaluation", "report")
SHARED_CORES = ("config", "io")  # top-level modules every layer may use; they import nothing of panseg


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage_modules() -> list[Path]:
    return sorted(path for package in STAGE_PACKAGES for path in (PANSEG / package).rglob("*.py"))


def _imported_modules(path: Path) -> list[str]:
    """Every module an import statement in the file names, at any depth (lazy imports included);
    `from a import b` yields both `a` and `a.b`, since b may be a module."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_every_stage_package_is_there_and_the_shells_sit_above_it():
    for package in STAGE_PACKAGES:
        assert (PANSEG / package / "__init__.py").is_file(), f"panseg/{package}/ is not a package"
    top = {path.stem for path in PANSEG.glob("*.py")} - {"__init__"}
    assert top >= {"cli", "config", "io", "data_pipeline", "train_loop", "tune_search", "infer", "pseudolabel",
                   "demo", "cluster", "ray_shell"}
    assert not top & set(STAGE_PACKAGES), f"a top-level module shadows a stage package: {top & set(STAGE_PACKAGES)}"


def test_no_stage_module_imports_ray_even_lazily():
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in _stage_modules()
                 for name in _imported_modules(path) if name == "ray" or name.startswith("ray.")]
    assert not offenders, "a stage package must not import Ray (put it in a shell at panseg/'s top level):\n" + \
        "\n".join(offenders)


def _ray_after_importing(module: str) -> tuple[str, str]:
    code = (f"import sys; import {module}; "
            "print(' '.join(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    if done.returncode != 0:
        return module, f"import failed: {done.stderr[-1500:]}"
    return module, done.stdout.strip()


def test_importing_any_stage_module_leaves_ray_unimported():
    """Each module in a fresh interpreter, so one imported earlier cannot mask another."""
    modules = [_module_name(path) for path in _stage_modules()]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_ray_after_importing, modules))
    offenders = [f"{module}: {loaded}" for module, loaded in results if loaded]
    assert len(results) >= len(STAGE_PACKAGES) * 2
    assert not offenders, "importing a stage module imported Ray (or failed):\n" + "\n".join(offenders)


def test_no_stage_module_imports_a_shell():
    shells = {path.stem for path in PANSEG.glob("*.py")} - {"__init__", *SHARED_CORES}
    offenders = []
    for path in _stage_modules():
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] == "panseg" and len(parts) > 1 and parts[1] in shells:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, (f"a stage package imports only {', '.join(SHARED_CORES)} and other stage packages "
                           "from panseg, never a Ray shell:\n" + "\n".join(offenders))


# ----------------------------------------------------------------------------------------------
# Links in the Markdown files
# ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder in ("docs", "bench"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [path for path in files if path.is_file()]


def _relative_links(text: str) -> list[str]:
    prose = _CODE.sub("", _FENCE.sub("", text))
    targets = _INLINE.findall(prose) + _REFERENCE.findall(prose)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


def test_the_link_finder_reads_inline_image_and_reference_links():
    text = ("[a](docs/x.md#part) ![b](img.png) [c](https://example.org) [d](#here) [e](mailto:a@b.c)\n"
            "`[f](not/a/link.md)`\n```\n[g](inside/a/fence.md)\n```\n[h]: ../y.md \"title\"\n")
    assert _relative_links(text) == ["docs/x.md#part", "img.png", "../y.md"]


def test_every_relative_markdown_link_resolves():
    files = _markdown_files()
    assert ROOT / "README.md" in files and any(path.parent.name == "docs" for path in files)
    broken = []
    for path in files:
        for target in _relative_links(path.read_text(encoding="utf-8")):
            file_part = target.split("#", 1)[0]
            if file_part and not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to files that do not exist:\n" + "\n".join(broken)
