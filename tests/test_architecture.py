"""The dependency direction is the design: vqmodels imports torch only; service never imports torch or
vqmodels (it uses the job spec); the spec and the CLI load on a machine without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level module names imported anywhere (also inside functions, and through
    `importlib.import_module("literal")` / `__import__("literal")`) in each file of a package."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


# The one sanctioned exception: `vqmodels.load_tokenizer("models:/name@alias")` must reach the MLflow
# registry, so checkpoint.py imports mlflow lazily, only for such URIs (a plain directory needs no MLflow).
LAZY_EXCEPTIONS = {"vqmodels/checkpoint.py": {"mlflow"}}


def test_vqmodels_imports_torch_only():
    allowed = STDLIB | {"torch", "numpy", "vqmodels"}
    bad = {
        f: sorted(n - allowed - LAZY_EXCEPTIONS.get(f, set()))
        for f, n in _imports("vqmodels").items()
        if n - allowed - LAZY_EXCEPTIONS.get(f, set())
    }
    assert not bad, f"vqmodels must import torch (and small numeric helpers) only: {bad}"
    assert "mlflow" in _imports("vqmodels")["vqmodels/checkpoint.py"], "the scan must see importlib imports"


def test_vqmodels_loads_without_mlflow():
    """The exception stays lazy: importing vqmodels (and loading a local checkpoint) never needs MLflow."""
    code = "import sys; sys.modules['mlflow'] = None; import vqmodels, vqmodels.checkpoint"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_service_never_imports_torch_or_vqmodels():
    bad = {f: sorted(n & {"torch", "vqmodels"}) for f, n in _imports("service").items() if n & {"torch", "vqmodels"}}
    assert not bad, f"service/ must not import torch or vqmodels: {bad}"


@pytest.mark.parametrize("module", ["jobs.spec", "service.app", "service.cli", "jobs.data.shards"])
def test_light_modules_load_without_torch(module):
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
