"""The job's tokenizer is pinned to one registry version at its start (an alias may move while it runs)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from jobs import tracking


def _registry(tmp_path: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.create_registered_model("tok")
    for _ in range(2):
        client.create_model_version("tok", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("tok", "prod", "1")
    return client, client.create_run(exp).info.run_id


def test_an_alias_is_pinned_once_per_job_and_kept_across_restarts(tmp_path):
    client, job_run = _registry(tmp_path)
    assert tracking.pin_model_uri(client, "models:/tok@prod") == "models:/tok/1"
    assert tracking.pin_model_uri(client, "models:/tok/2") == "models:/tok/2"  # already a version
    assert tracking.pin_tokenizer(client, job_run, "/local/tokenizer") == "/local/tokenizer"
    assert tracking.pin_tokenizer(client, job_run, "models:/tok@prod") == "models:/tok/1"
    client.set_registered_model_alias("tok", "prod", "2")  # a new tokenizer is promoted mid-job
    # the restarted (or resumed) job reads its run's record, not the alias
    assert tracking.pin_tokenizer(client, job_run, "models:/tok@prod") == "models:/tok/1"
    assert client.get_run(job_run).data.tags[tracking.TOKENIZER_TAG] == "models:/tok/1"


def _run(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    """A tracking URI (SQLite), its client and a fresh run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("t", (tmp_path / "a").as_uri())).info.run_id


def test_a_restarted_logger_logs_each_step_once(tmp_path):
    """Steps replayed after a restart (checkpoint at 5, failure after 10 had been flushed) are not logged twice."""
    uri, client, run_id = _run(tmp_path)
    first = tracking.RunLogger(uri, run_id)
    for step in range(1, 11):
        first.log_metrics({"train/loss": float(step)}, step)
        if step == 4:
            first.flush()
            first.log_metrics({"eval/psnr": 20.0}, step)  # more of a step already flushed: still logged
    first.flush()
    assert [m.step for m in client.get_metric_history(run_id, "eval/psnr")] == [4]
    second = tracking.RunLogger(uri, run_id)  # the restarted worker, resumed from step 5
    assert second.logged_through == 10
    for step in range(6, 13):
        second.log_metrics({"train/loss": 100.0 + step}, step)
    second.flush()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in history] == list(range(1, 13))
    assert dict(history)[8] == 8.0 and dict(history)[12] == 112.0


def test_a_superseded_logger_logs_nothing_more(tmp_path):
    """Ray replaced the worker group while the old rank 0 still ran a few steps: once the new group's logger
    has started, the old one's metrics (steps the new group replays and logs itself) never reach the run."""
    uri, client, run_id = _run(tmp_path)
    old = tracking.RunLogger(uri, run_id)
    for step in range(1, 6):
        old.log_metrics({"train/loss": float(step)}, step)
    old.flush()
    new = tracking.RunLogger(uri, run_id)  # resumed from a checkpoint at step 5
    for step in range(6, 9):
        old.log_metrics({"train/loss": -1.0}, step)  # the old rank 0, still running
        new.log_metrics({"train/loss": float(step)}, step)
    old.flush()
    new.flush()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(s, float(s)) for s in range(1, 9)] and old.superseded and not new.superseded
