"""The job store on both of its backends: SQLite (the default) and a real PostgreSQL server (what more than
one API replica needs, deploy/README.md). The same store functions, the same guarantees: one job per
idempotency key under racing requests, a cancel and a dispatch that cannot both win, specs kept as given."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from service import store
from tests.servers import postgres_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = store.make_engine(url)
    assert engine.dialect.name == request.param
    with engine.begin() as conn:  # the PostgreSQL cluster is shared by this module's tests
        conn.execute(store.Job.__table__.delete())
    yield store.session_factory(engine)
    engine.dispose()


def test_specs_round_trip_and_jobs_page_newest_first(sessions):
    spec = {"kind": "tokenizer", "name": "ü-job", "data": {"train": "s3://b/x-{0..9}.tar"}, "optim": {"lr": 1e-4}}
    with sessions() as db:
        ids = [store.create_job(db, spec | {"i": i}, f"job-{i}", "tokenizer")[0].id for i in range(5)]
        store.create_job(db, {"kind": "maskgit"}, "other", "maskgit")
    with sessions() as db:
        assert store.get_job(db, ids[2]).spec == spec | {"i": 2}
        page, total = store.list_jobs(db, kind="tokenizer", limit=2, offset=1)
        assert total == 5 and [j.name for j in page] == ["job-3", "job-2"]
        assert store.list_jobs(db, state="queued")[1] == 6 and store.list_jobs(db, state="running")[1] == 0


def test_one_job_per_idempotency_key_even_when_requests_race(sessions):
    barrier, made = threading.Barrier(8), []

    def submit() -> None:
        with sessions() as db:
            barrier.wait()
            job, created = store.create_job(db, {"kind": "tokenizer"}, "same", "tokenizer", idempotency_key="k" * 64)
            made.append((job.id, created))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8  # every request answered (a thread's exception would only be a warning)
    assert len({job_id for job_id, _ in made}) == 1 and sum(created for _, created in made) == 1
    with sessions() as db:
        assert store.list_jobs(db)[1] == 1


def test_a_cancel_and_a_dispatch_cannot_both_win(sessions):
    with sessions() as db:
        job_ids = [store.create_job(db, {"kind": "tokenizer"}, f"j{i}", "tokenizer")[0].id for i in range(10)]
    outcomes: dict[str, list[bool]] = {job_id: [] for job_id in job_ids}

    def race(job_id: str, action) -> None:  # noqa: ANN001
        with sessions() as db:
            outcomes[job_id].append(action(db, job_id))

    threads = [threading.Thread(target=race, args=(j, a)) for j in job_ids for a in (store.mark_submitted, store.cancel_unsubmitted)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(results) == 2 for results in outcomes.values())
    with sessions() as db:
        for job_id, results in outcomes.items():
            assert sorted(results) == [False, True]  # exactly one of the two took effect
            job = store.get_job(db, job_id)
            assert (job.state, job.submitted) in (("queued", True), ("cancelled", False))


def test_pending_stops_and_updates_persist(sessions):
    with sessions() as db:
        job, _ = store.create_job(db, {"kind": "tokenizer"}, "j", "tokenizer")
        assert store.mark_submitted(db, job.id)
        store.update_job(db, job, state="running", ray_status=store.STOP_PENDING, metrics={"loss/total": 0.5}, step=3)
    with sessions() as db:
        assert [j.id for j in store.pending_stops(db)] == [job.id]
        assert store.count_active_submitted(db) == 1 and [j.id for j in store.active_submitted(db)] == [job.id]
        again = store.get_job(db, job.id)
        assert again.metrics == {"loss/total": 0.5} and again.step == 3 and again.updated_at >= again.created_at
        assert store.queued_unsubmitted(db, 10) == []


def test_the_api_runs_on_postgresql_and_keeps_jobs_across_a_restart(postgres_url, live, make_settings, tmp_path):
    """The whole service on PostgreSQL (dispatch paused): a submission, its idempotent retry and a restart."""
    settings = make_settings(store_url=postgres_url, max_active_jobs=0)
    server = live(settings)
    spec = {"kind": "tokenizer", "name": "pg", "data": {"train": str(tmp_path / "shards")}, "optim": {"steps": 5}}
    with server.client() as c:
        first = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "pg-1"})
        retry = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "pg-1"})
        assert first.status_code == 201 and retry.json()["id"] == first.json()["id"]
    server.stop()
    server = live(settings, port=server.port)
    with server.client() as c:
        listed = c.get("/v1/jobs").json()
        assert first.json()["id"] in [j["id"] for j in listed["items"]]
        assert c.post(f"/v1/jobs/{first.json()['id']}/cancel").json()["state"] == "cancelled"
