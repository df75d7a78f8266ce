"""The benchmark scripts start the way the README runs them: ``python benchmarks/X.py`` puts benchmarks/ first on
``sys.path``, so a script named like a module that a dependency imports shadows it (benchmarks/kernels.py hid the
``kernels`` package and transformers failed to import). No timing is asserted here."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# timing.py is the helper the scripts import, not a script of its own.
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name != "timing.py")


def test_the_scripts_are_found():
    assert {"cache.py", "collect.py", "env.py", "evaluate.py", "train.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("module", sorted(path.stem for path in BENCHMARKS.glob("*.py")))
def test_no_script_is_named_like_another_module(module):
    """Beside benchmarks/, nothing on the path (the standard library, the installed packages) may hold a module
    of a script's name: the script would hide it from whatever imports it, now or after an upgrade."""
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCHMARKS]
    assert module not in sys.stdlib_module_names and module not in sys.builtin_module_names, module
    found = importlib.machinery.PathFinder.find_spec(module, elsewhere)
    assert found is None, f"benchmarks/{module}.py shadows {found.origin}: rename the script"


def test_every_script_starts():
    """``python benchmarks/X.py --help`` from the repository root exits 0 with its usage: every import of the script
    (torch, transformers and the project included) runs with benchmarks/ first on the path. The scripts start in
    parallel: each spends seconds importing."""
    runs = {
        script: subprocess.Popen(
            [sys.executable, f"benchmarks/{script}", "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in SCRIPTS
    }
    failures = []
    for script, process in runs.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or "usage:" not in out:
            failures.append(f"benchmarks/{script} --help: exit {process.returncode}\n{err[-2000:]}")
    assert not failures, "\n\n".join(failures)
