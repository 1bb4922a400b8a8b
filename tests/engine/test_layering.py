"""The house's floors, read from the source with ast: imports only point down.

* No protocol module imports a sibling protocol: shared pieces live in protocols/protocol_base.py or
  protocols/constants.py.
* The engine (flexplugin/engine/) imports nothing from the package outside engine/, nor Scipion.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ROOT / "protocols"
ENGINE = ROOT / "flexplugin" / "engine"
SHARED_PROTOCOL_MODULES = {"protocol_base", "constants"}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a file, relative imports resolved against `package`
    (the file's own package); `from X import y` also yields X.y, since y may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def test_resolves_relative_imports(tmp_path):
    """The checker itself: relative imports at several levels and submodules named in `from . import x`."""
    f = tmp_path / "m.py"
    f.write_text("from . import plots as pv\nfrom ..io import read\nfrom ... import cli\nimport os\n"
                 "def g():\n    from .. import latents\n")
    names = {m for _, m in imported_modules(f, "flexplugin.engine.va3d")}
    assert {"flexplugin.engine.va3d.plots", "flexplugin.engine.io", "flexplugin.cli", "os",
            "flexplugin.engine.latents"} <= names


@pytest.mark.parametrize("path", sorted(PROTOCOLS.glob("*.py")), ids=lambda p: p.name)
def test_no_protocol_imports_a_sibling_protocol(path):
    siblings = {p.stem for p in PROTOCOLS.glob("protocol_*.py")} - SHARED_PROTOCOL_MODULES - {path.stem}
    if path.stem == "__init__":
        return  # the package lists every protocol for Scipion
    bad = [f"line {line}: {mod}" for line, mod in imported_modules(path, "flexplugin.protocols")
           if mod.startswith("flexplugin.protocols.") and mod.split(".")[2] in siblings]
    assert not bad, f"{path.name} imports a sibling protocol: {bad}"


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))


def test_engine_files_found():
    assert len(ENGINE_FILES) > 20 and ENGINE / "latents.py" in ENGINE_FILES


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ENGINE)))
def test_engine_imports_nothing_above_it(path):
    rel = path.relative_to(ROOT).with_suffix("")
    package = ".".join(rel.parts[:-1])  # the file's package (for __init__.py: its own)
    bad = [f"line {line}: {mod}" for line, mod in imported_modules(path, package)
           if (mod.startswith("flexplugin.") and not mod.startswith("flexplugin.engine"))
           or mod == "flexplugin" or mod.split(".")[0] in ("pyworkflow", "pwem")]
    assert not bad, f"{path.relative_to(ROOT)} reaches above the engine: {bad}"
