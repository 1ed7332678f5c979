"""The package's shape: imports flow one way (edges -> studio -> engine -> stores), no cycles,
and every dotted name the architecture notes mention exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "masuka"

# Higher layers may import lower ones, never the other way; one package per owner.
LAYERS = {
    "masuka.web": 6,
    "masuka.studio": 5,
    "masuka.core": 4,
    "masuka.lora": 3,
    "masuka.model": 3,
    "masuka.net": 2,
    "masuka.store": 1,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    return "masuka", 0  # masuka, masuka.settings, small shared helpers: below everything


def project_imports(path: Path) -> set[str]:
    """Every masuka module a file imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("masuka")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("masuka"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() else node.module)
    return found


GRAPH = {module_name(p): project_imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_flow_one_way():
    wrong = []
    for module, imports in GRAPH.items():
        package, rank = layer_of(module)
        for target in imports:
            target_package, target_rank = layer_of(target)
            if target_package == package or target_rank == 0:
                continue
            if target_rank >= rank:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target] if target in trail else [module, target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_engine_never_imports_gradio():
    engine = [m for m in GRAPH if not m.startswith("masuka.web")]
    users = []
    for module in engine:
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n == "gradio" or n.startswith("gradio.") or n.startswith("gradio_client") for n in names):
                users.append(module)
    assert users == []


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_name_in_the_architecture_notes_exists():
    text = re.sub(r"```.*?```", "", (ROOT / "docs" / "architecture.md").read_text(), flags=re.S)
    names = set()
    for code in re.findall(r"`([^`]+)`", text):
        for candidate in re.findall(r"\bmasuka(?:\.[A-Za-z_][A-Za-z0-9_]*)+", code):
            names.add(candidate)
    assert len(names) >= 20, "the notes should name the modules and their main classes"
    missing = sorted(n for n in names if not _resolves(n))
    assert missing == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "masuka"))
def test_each_module_imports_on_its_own(module):
    importlib.import_module(module)


def test_the_edges_use_only_the_studios_methods():
    """The page, the Gradio API and REST never reach through the Studio into the pieces it holds."""
    from dataclasses import fields

    from masuka.studio import Studio

    held = "|".join(f.name for f in fields(Studio))
    reach = re.compile(rf"\bstudio\.({held})\b")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in (PACKAGE / "web").rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if reach.search(line)]
    assert found == []
