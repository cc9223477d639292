"""Progress records and per-step logging (jobs.progress), without a Ray cluster."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import torch

from jobs.progress import Progress, Throughput, log_eval, log_train_step
from jobs.worker import Worker
from vqbase.protocol import PROGRESS_PREFIX


def test_progress_records_carry_their_time(capsys) -> None:
    """The service computes a job's ETA from the step rate between records, so each carries `time`."""
    progress = Progress(None, total=10, worker=Worker(0, 1, 0, torch.device("cpu")), interval=0.0)
    before = time.time() - 0.001  # records round to milliseconds
    progress.update(3, {"loss/total": 0.5}, images_per_s=12.0)
    progress.update(10, {"loss/total": 0.4}, images_per_s=None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(PROGRESS_PREFIX)]
    records = [json.loads(line[len(PROGRESS_PREFIX) :]) for line in lines]
    assert [r["step"] for r in records] == [3, 10]
    assert before <= records[0]["time"] <= records[1]["time"] <= time.time() + 1


def test_only_rank_zero_reports_progress(capsys) -> None:
    Progress(None, total=10, worker=Worker(1, 2, 1, torch.device("cpu")), interval=0.0).update(10, {}, None)
    assert PROGRESS_PREFIX not in capsys.readouterr().out


class _Run:
    """Records what a loop hands to MLflow (the real RunLogger is exercised by the job integration tests)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.texts: dict[str, str] = {}

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((dict(metrics), step))

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text


def test_every_loop_logs_the_same_step_metrics(capsys) -> None:
    worker = Worker(0, 1, 0, torch.device("cpu"))
    env = SimpleNamespace(run=_Run(), progress=Progress(None, total=5, worker=worker, interval=0.0))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    rate = Throughput()
    for _ in range(3):
        rate.tick(8)
    for sync in (False, True):
        log_train_step(env, 5, {"loss/total": 1.0}, opt, 0.5, SimpleNamespace(skipped=2), rate, codebook_sync=sync)
    (plain, _), (with_sync, step) = env.run.metrics
    assert step == 5 and plain["train/lr"] == 0.25 and plain["train/grad_norm"] == 0.5
    assert plain["train/skipped_samples"] == 2.0 and plain["train/images_per_s"] > 0
    assert "train/codebook_sync_share" not in plain and "train/codebook_sync_share" in with_sync
    assert PROGRESS_PREFIX in capsys.readouterr().out  # rank 0's progress bar got the step too


def test_only_the_last_evaluation_is_kept_as_final_json() -> None:
    env = SimpleNamespace(run=_Run())
    log_eval(env, 10, {"eval/psnr": 20.0}, last=False)
    assert env.run.texts == {}
    log_eval(env, 20, {"eval/psnr": 21.0}, last=True)
    assert json.loads(env.run.texts["eval/final.json"]) == {"step": 20, "eval/psnr": 21.0}
    assert [s for _, s in env.run.metrics] == [10, 20]


def test_records_thin_out_as_a_job_ages(monkeypatch, capsys) -> None:
    """A long job's log (re-read by the service) stays small: after 10 minutes, one record per 10 s."""
    from jobs import progress as progress_module

    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    p = Progress(None, total=10**6, worker=Worker(0, 1, 0, torch.device("cpu")), interval=0.5)

    def records_over(seconds: float) -> int:
        capsys.readouterr()  # forget earlier output
        end = clock[0] + seconds
        step = 0
        while clock[0] < end:
            step += 1
            p.update(step, {}, None)
            clock[0] += 0.1
        return capsys.readouterr().out.count(PROGRESS_PREFIX)

    assert 18 <= records_over(10) <= 21  # young: every 0.5 s
    clock[0] += 3600
    assert 5 <= records_over(60) <= 7  # an hour old: every 10 s


def test_a_logged_training_step_reads_nothing_back_until_the_flush(tmp_path, capsys) -> None:
    """Rank 0 logs every step; on a GPU each `float(tensor)` would stall the pipeline, so a step's metrics
    (and the clipped gradient norm) stay device tensors until the logger flushes or the bar is drawn,
    and are then read back together. The values that reach MLflow are the tensors' values."""
    import collections

    from mlflow import MlflowClient
    from torch.utils._python_dispatch import TorchDispatchMode

    from jobs.optim import Precision
    from jobs.tracking import RunLogger

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", (tmp_path / "a").as_uri())).info.run_id
    worker = Worker(0, 1, 0, torch.device("cpu"))
    env = SimpleNamespace(run=RunLogger(uri, run_id, flush_every=1e9), progress=Progress(None, 10, worker))
    env.progress._last = time.monotonic()  # the bar was just drawn: this step only buffers
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    reads = Reads()
    with reads:
        loss = (w * w).sum() / 2  # gradient (3, 4): norm 5
        grad_norm = Precision("fp32", worker.device).step(loss, opt, [w], grad_clip=100.0)
        metrics = {"loss/total": loss.detach(), "vq/perplexity": torch.tensor(7.5), "train/flag": None}
        log_train_step(env, 1, metrics, opt, grad_norm, SimpleNamespace(skipped=0), Throughput())
    assert reads.seen["_local_scalar_dense"] == 0 and reads.seen["item"] == 0, reads.seen
    env.run.flush()
    latest = client.get_run(run_id).data.metrics
    assert latest["loss/total"] == 12.5 and latest["vq/perplexity"] == 7.5
    assert abs(latest["train/grad_norm"] - 5.0) < 1e-6 and "train/flag" not in latest
    env.progress.update(1, metrics, None, force=True)  # the bar reads tensors too, and skips None
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1][len(PROGRESS_PREFIX) :])
    assert record["metrics"]["vq/perplexity"] == 7.5 and "train/flag" not in record["metrics"]
