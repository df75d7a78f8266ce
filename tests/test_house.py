"""The house rules (docs/architecture.md), read from the source with ``ast``: the dependency direction between the
four packages, no import cycles, no module importing another module's private names, rooms small enough to read
in one sitting, and an opening docstring in every module.

``python tests/test_house.py [CHECKOUT]`` prints the report the rules are checked on: the largest files and functions
and the import graph's floors (floor 0 imports no project module; floor k imports at least one module of floor
k - 1).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name of each source folder (pyproject.toml's package-dir).
PACKAGES = {"kvp_gym": "kvp_gym", "agents": "kvp_gym_agents", "baselines": "kvp_gym_baselines",
            "leaderboard": "kvp_gym_leaderboard"}  # fmt: skip
# Which packages each package may import (design: leaderboard -> agents -> kvp_gym <- baselines; leaderboard ->
# baselines).
ALLOWED = {
    "kvp_gym": {"kvp_gym"},
    "kvp_gym_baselines": {"kvp_gym", "kvp_gym_baselines"},
    "kvp_gym_agents": {"kvp_gym", "kvp_gym_agents"},
    "kvp_gym_leaderboard": {"kvp_gym", "kvp_gym_agents", "kvp_gym_baselines", "kvp_gym_leaderboard"},
}
MAX_FILE_LINES = 500
# Files allowed past MAX_FILE_LINES, each with the reason it must be one file.
LARGE_FILES: dict[str, str] = {}


@dataclass
class Module:
    name: str  # the dotted import name, e.g. kvp_gym.traces.reader
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # project modules imported at module level (the graph's edges)
    lazy_imports: set[str] = field(default_factory=set)  # imported inside functions (loaded on first call)
    private: list[str] = field(default_factory=list)  # "line: from X import _name" of another module's privates

    @property
    def package(self) -> str:
        return self.name.split(".")[0]


# Folders of scripts and tests that use the packages: held to the no-private-imports rule too.
USERS = ("tests", "benchmarks", "examples")


def project_modules(root: Path = ROOT, users: bool = False) -> dict[str, Module]:
    """Every module of the four packages (and, with ``users``, of USERS), parsed, with its imports of project
    modules resolved."""
    modules = {}
    for folder, package in PACKAGES.items() | ({(user, user) for user in USERS} if users else set()):
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        _resolve_imports(module, modules)
    return modules


def _resolve_imports(module: Module, modules: dict[str, Module]) -> None:
    for node, lazy in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif node.level == 0 and node.module:
            targets = []
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                targets.append(submodule if submodule in modules else node.module)
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and submodule not in modules and node.module in modules and node.module != module.name:
                    module.private.append(f"{node.lineno}: from {node.module} import {alias.name}")
        else:
            continue
        found = {target for target in targets if target in modules and target != module.name}
        (module.lazy_imports if lazy else module.imports).update(found)


def _import_nodes(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs lazily (inside a function); ``if TYPE_CHECKING:`` blocks, which
    never run, are skipped."""

    def visit(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            yield from visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    yield from visit(tree, False)


def floors(modules: dict[str, Module]) -> dict[str, int]:
    """Each module's floor in the module-level import graph (which must be acyclic)."""
    floor: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise ValueError("import cycle: " + " -> ".join((*path[path.index(name) :], name)))
        if name not in floor:
            below = [visit(target, (*path, name)) for target in modules[name].imports]
            floor[name] = 1 + max(below) if below else 0
        return floor[name]

    for name in modules:
        visit(name, ())
    return floor


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines())


def functions(modules: dict[str, Module]) -> list[tuple[int, str]]:
    """(lines, "module:qualified.name") of every function and method."""
    found = []
    for module in modules.values():
        stack: list[tuple[ast.AST, str]] = [(module.tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    qualified = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        found.append((child.end_lineno - child.lineno + 1, f"{module.name}:{qualified}"))
                    stack.append((child, qualified + "."))
    return sorted(found, reverse=True)


MODULES = project_modules()


def test_packages_import_only_in_the_design_direction():
    wrong = [
        f"{module.name} imports {target}"
        for module in MODULES.values()
        for target in module.imports | module.lazy_imports
        if target.split(".")[0] not in ALLOWED[module.package]
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    floors(MODULES)  # raises on a cycle, naming it


def test_no_module_imports_another_modules_private_names():
    everything = project_modules(users=True)
    found = [f"{module.path.relative_to(ROOT)}:{line}" for module in everything.values() for line in module.private]
    assert not found, found


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_room_size_and_docstring(module):
    found = MODULES[module]
    relative = str(found.path.relative_to(ROOT))
    assert ast.get_docstring(found.tree), f"{relative}: no opening docstring saying what the module is for"
    if relative not in LARGE_FILES:
        assert lines_of(found.path) <= MAX_FILE_LINES, f"{relative}: {lines_of(found.path)} lines"


def test_pyproject_installs_every_package():
    """A package missing from pyproject.toml works in an editable install and is absent from a wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, module in MODULES.items() if module.path.name == "__init__.py"}
    assert packages == listed


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path):
    """The analysis itself: a planted cycle and a planted private import are found."""
    (tmp_path / "kvp_gym").mkdir()
    for folder in ("agents", "baselines", "leaderboard"):
        (tmp_path / folder).mkdir()
    (tmp_path / "kvp_gym" / "a.py").write_text('"""a."""\nfrom kvp_gym.b import _hidden\n')
    (tmp_path / "kvp_gym" / "b.py").write_text('"""b."""\nimport kvp_gym.a\n\n_hidden = 1\n')
    planted = project_modules(tmp_path)
    assert planted["kvp_gym.a"].private == ["2: from kvp_gym.b import _hidden"]
    with pytest.raises(ValueError, match="import cycle: kvp_gym.(a|b) -> kvp_gym.(a|b) -> kvp_gym.(a|b)"):
        floors(planted)


def report(root: Path = ROOT, top: int = 12) -> str:
    modules = project_modules(root)
    sizes = sorted(((lines_of(m.path), str(m.path.relative_to(root))) for m in modules.values()), reverse=True)
    lines = ["largest files (lines):", *(f"  {n:5d}  {path}" for n, path in sizes[:top])]
    lines += ["largest functions (lines):", *(f"  {n:5d}  {name}" for n, name in functions(modules)[:top])]
    by_floor: dict[int, list[str]] = {}
    for name, level in floors(modules).items():
        by_floor.setdefault(level, []).append(name)
    lines.append(f"import floors ({len(modules)} modules, module-level imports):")
    lines += [
        f"  {level:2d} ({len(names):2d}): {', '.join(sorted(names))}" for level, names in sorted(by_floor.items())
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_house.py [ANOTHER_CHECKOUT]
    print(report(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
