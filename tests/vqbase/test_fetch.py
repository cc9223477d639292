"""vqbase.fetch resolves registry references against the given tracking URI only (a SQLite store: no server)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from vqbase.fetch import fetch_model_dir


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")  # must not be used
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.pth").write_bytes(b"w1")
    client.log_artifacts(run_id, str(model), "model")
    client.create_registered_model("w")
    version = client.create_model_version("w", f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias("w", "prod", version)
    return uri


def test_fetch_by_alias_version_and_path_inside(registry: str, tmp_path: Path) -> None:
    for i, uri in enumerate(["models:/w@prod", "models:/w/1", "models:/w", "models:/w/latest", "models:/w@latest"]):
        got = Path(fetch_model_dir(uri, str(tmp_path / f"d{i}"), registry))
        assert (got / "weights.pth").read_bytes() == b"w1"
    one = Path(fetch_model_dir("models:/w@prod/weights.pth", str(tmp_path / "f"), registry))
    assert one.is_file() and one.read_bytes() == b"w1"
    assert os.environ["MLFLOW_REGISTRY_URI"].endswith("elsewhere.db")  # untouched
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" not in os.environ


def test_fetch_names_a_missing_model(registry: str, tmp_path: Path) -> None:
    with pytest.raises(mlflow.exceptions.MlflowException):
        fetch_model_dir("models:/nope@prod", str(tmp_path / "x"), registry)
