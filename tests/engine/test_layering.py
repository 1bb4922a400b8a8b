"""The house's floors, read from the source with ast: imports only point down.

* No protocol module imports a sibling protocol: shared pieces live in protocols/protocol_base.py or
  protocols/constants.py.
* The engine (flexplugin/engine/) imports nothing from the package outside engine/, nor Scipion.
* The command modules of flexplugin/cli/ import cli/common.py and nothing else of cli/ (cryoDRGN's commands/).
* No import circle anywhere in the package (flexplugin/ and protocols/), lazy imports inside functions included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ROOT / "protocols"
ENGINE = ROOT / "flexplugin" / "engine"
CLI = ROOT / "flexplugin" / "cli"
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


CLI_FILES = sorted(CLI.glob("*.py"))


def test_cli_files_found():
    assert {"__init__.py", "common.py", "flex_train.py", "va3d.py"} <= {p.name for p in CLI_FILES}


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_cli_modules_import_only_the_common_module(path):
    """A command module imports cli/common.py and the floors below, never another command module; common.py
    imports no command module (only __init__.py lists them, and its __main__.py runs it)."""
    if path.stem in ("__init__", "__main__"):
        return
    allowed = set() if path.stem == "common" else {"flexplugin.cli.common"}
    bad = [f"line {line}: {mod}" for line, mod in imported_modules(path, "flexplugin.cli")
           if (mod == "flexplugin.cli" or mod.startswith("flexplugin.cli."))
           and not any(mod == a or mod.startswith(a + ".") for a in allowed)]
    assert not bad, f"cli/{path.name} imports another command module: {bad}"


def _module_name(path: Path) -> str:
    """The dotted name of a source file (protocols/ is installed as flexplugin.protocols)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ("flexplugin",) + rel.parts if rel.parts[0] == "protocols" else rel.parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside functions)."""
    files = sorted((ROOT / "flexplugin").rglob("*.py")) + sorted(PROTOCOLS.glob("*.py"))
    names = {_module_name(f): f for f in files if "tests" not in f.relative_to(ROOT).parts}
    graph = {}
    for name, f in names.items():
        package = name if f.stem == "__init__" else name.rsplit(".", 1)[0]
        graph[name] = {m for _, m in imported_modules(f, package) if m in names and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle():
    """The checker itself: a circle through three modules is found, a diamond is not a circle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "flexplugin.cli.common" in graph["flexplugin.cli.flex_train"]
    assert "flexplugin.engine.flex.outputs" in graph["flexplugin.cli.flex_train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
