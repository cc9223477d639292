"""The service installs without torch: a fresh virtualenv with only the `service` extra imports the API and the
CLI, checks a spec and answers `vqtrain --help`. (A torch dependency creeping into the base or the service extra,
or a service module importing torch or the model library, fails here.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vqbase", "vqmodels", "jobs", "service")


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_service_installs_and_runs_without_torch(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so that building the wheel leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", f"{src}[service]"], tmp_path)

    installed = _run([py, "-m", "pip", "list", "--format=freeze"], tmp_path).stdout.lower()
    assert "torch==" not in installed, "the service extra must not install torch"

    work = tmp_path / "elsewhere"  # not the checkout: import the installed packages
    work.mkdir()
    code = (
        "import sys\n"
        "import service.api.app, service.cli, jobs.spec, vqbase.protocol\n"
        "bad = sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)\n"
        "assert not bad, f'the service imported {bad}'\n"
        # the spec's quantizer section is generated from the model library's torch-free options dataclass
        "vq = {m for m in sys.modules if m.startswith('vqmodels')}\n"
        "assert vq <= {'vqmodels', 'vqmodels.quantize', 'vqmodels.quantize.options'}, vq\n"
        "print(len(service.api.app.create_app().routes))\n"
    )
    assert int(_run([py, "-c", code], work).stdout.strip()) > 5
    vqtrain = venv / "bin" / "vqtrain"
    assert "spec" in _run([vqtrain, "--help"], work).stdout
    shutil.copy(ROOT / "examples" / "maskgit.yaml", work / "maskgit.yaml")
    _run([vqtrain, "spec", "check", "maskgit.yaml"], work)
