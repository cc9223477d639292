"""The session's tokenizer job as a user sees it in the MLflow UI, in Debian's headless Chromium
(`scripts/ui_check.py`, which `scripts/test` provides with the `chromium` package): the run page opens in the
model-training view with who made it, its source and datasets; every picture card opens on a picture and its
slider reaches the latest step; system metrics chart; the model version shows its signature and card; the
registered model its description."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.jobs.conftest import JobRun

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", REPO / "scripts" / "ui_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ui_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_run_and_its_model_render_in_chromium(registered_tokenizer: JobRun, mlflow_url: str,
                                                  tmp_path: Path) -> None:
    from mlflow import MlflowClient

    ui = _ui_check()
    assert os.access(ui.CHROMIUM, os.X_OK), f"{ui.CHROMIUM} is missing: scripts/test installs Debian's chromium"
    result = registered_tokenizer.result
    version = MlflowClient(mlflow_url, registry_uri=mlflow_url).get_model_version_by_alias(
        registered_tokenizer.spec.name, "candidate").version
    report = ui.check_pages(mlflow_url, result["run_id"], f"{registered_tokenizer.spec.name}/{version}", tmp_path)
    assert report.failures == [], (report.failures, report.seen)
    assert {Path(p).name for p in report.screenshots} >= {"run-overview.png", "picture-images-reconstructions.png", "picture-enlarged.png", "model-version.png"}
