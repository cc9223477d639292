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


def test_vqmodels_imports_torch_only():
    """No exception, not even lazily: `load_tokenizer("models:/…")` asks a fetcher (vqbase.fetch, found through
    the `vqmodels.fetchers` entry point) for a local directory instead of importing MLflow."""
    allowed = STDLIB | {"torch", "numpy", "vqmodels"}
    bad = {f: sorted(n - allowed) for f, n in _imports("vqmodels").items() if n - allowed}
    assert not bad, f"vqmodels must import torch (and small numeric helpers) only: {bad}"


def test_the_import_scan_sees_importlib_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("import importlib\nx = importlib.import_module('mlflow.artifacts')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert "mlflow" in _imports("pkg")["pkg/m.py"]


def test_vqmodels_loads_without_mlflow():
    """Importing vqmodels (and loading a local checkpoint) never needs MLflow."""
    code = "import sys; sys.modules['mlflow'] = None; import vqmodels, vqmodels.checkpoint"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_vqmodels_finds_its_fetcher_through_the_entry_point():
    from vqbase.fetch import fetch_model_dir
    from vqmodels.checkpoint import default_fetch

    assert default_fetch() is fetch_model_dir


def test_jobs_never_import_service():
    bad = {f: sorted(n & {"service"}) for f, n in _imports("jobs").items() if "service" in n}
    assert not bad, f"jobs/ must not import service/ (the shared parts live in vqbase/): {bad}"


def test_vqbase_is_stdlib_only():
    """The contract below jobs and service imports neither of them, nor torch; MLflow only in its fetcher."""
    allowed = STDLIB | {"vqbase"}
    exceptions = {"vqbase/fetch.py": {"mlflow"}}
    bad = {
        f: sorted(n - allowed - exceptions.get(f, set()))
        for f, n in _imports("vqbase").items()
        if n - allowed - exceptions.get(f, set())
    }
    assert not bad, f"vqbase must import the standard library only: {bad}"


def test_protocol_lines_are_spelled_in_one_place():
    """The job's output lines are written and parsed through vqbase.protocol only."""
    found = [
        str(path.relative_to(ROOT))
        for package in ("jobs", "service", "vqmodels", "bench", "scripts")
        for path in (ROOT / package).rglob("*.py")
        if any(f'"{word} ' in path.read_text() for word in ("VQTRAIN_PROGRESS", "VQTRAIN_RESULT", "VQTRAIN_RUN"))
    ]
    assert not found, f"protocol prefixes spelled outside vqbase/protocol.py: {found}"


def test_service_never_imports_torch_or_vqmodels():
    bad = {f: sorted(n & {"torch", "vqmodels"}) for f, n in _imports("service").items() if n & {"torch", "vqmodels"}}
    assert not bad, f"service/ must not import torch or vqmodels: {bad}"


@pytest.mark.parametrize("module", ["jobs.spec", "service.api.app", "service.cli", "jobs.data.shards", "vqbase.protocol", "vqbase.local"])
def test_light_modules_load_without_torch(module):
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
