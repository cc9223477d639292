"""Hostile and malformed input to the real API: never a 5xx, never a stored job, every error small and naming
its field; plus what a job may ask of the cluster, who may cancel what, reused Idempotency-Keys, the
OpenAPI document and time zones. Dispatch is paused (max_active_jobs=0): nothing reaches Ray."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.service.conftest import ADMIN
from tests.service.test_api import spec_for, stored_rows


@pytest.fixture
def api(live, make_settings):
    return live(make_settings(max_active_jobs=0))


def _yaml(tmp_path, extra: str = "", train: str | None = None) -> str:
    return f"kind: tokenizer\nname: x\ndata: {{train: '{train or tmp_path / 'shards'}'}}\n{extra}"


def _json(tmp_path, **sections) -> str:
    spec = spec_for(tmp_path)
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return json.dumps(spec)


def corpus(tmp_path) -> list[tuple[str, str, str]]:
    """(case, body, the field the error must name; "" = the document itself)."""
    deep = "[" * 400 + "]" * 400
    return [
        ("5,001-digit integer", _yaml(tmp_path, "optim: {steps: " + "9" * 5001 + "}"), ""),
        ("31-digit integer", _json(tmp_path).replace('"steps": 5', '"steps": ' + "1" * 31), ""),
        ("NUL byte in a path (JSON escape)", _json(tmp_path, data={"train": "/x\u0000y"}), "data.train"),
        ("NUL byte in a storage option", _json(tmp_path, data={"storage_options": {"region": "a\u0000"}}),
         "data.storage_options.region"),
        ("lone surrogate (JSON escape)", _json(tmp_path, data={"train": "/x/\ud992"}), "data.train"),
        ("lone surrogate in a key", _json(tmp_path, data={"storage_options": {"\udb13": 1}}), "data.storage_options"),
        ("lists nested 400 deep", _yaml(tmp_path, f"extra: {deep}\n"), ""),
        ("mapping nested 400 deep", "{\"a\": " * 400 + "1" + "}" * 400, ""),
        ("YAML !!binary", _yaml(tmp_path).replace("}\n", ", storage_options: {k: !!binary aGVsbG8=}}\n"), ""),
        ("YAML !!set", _yaml(tmp_path, "optim: !!set {a, b}\n"), ""),
        ("YAML python tag", _yaml(tmp_path, "optim: !!python/object:os.system {}\n"), ""),
        ("lr: .inf", _yaml(tmp_path, "optim: {lr: .inf}\n"), "optim.lr"),
        ("lr: Infinity (JSON)", _json(tmp_path).replace('"steps": 5', '"steps": 5, "lr": Infinity'), "optim.lr"),
        ("lr: 1.0e+400", _yaml(tmp_path, "optim: {lr: 1.0e+400}\n"), "optim.lr"),
        ("lr: .nan", _yaml(tmp_path, "optim: {lr: .nan}\n"), "optim.lr"),
        ("grad_clip: .inf", _yaml(tmp_path, "optim: {grad_clip: .inf}\n"), "optim.grad_clip"),
        ("non-finite storage option", _yaml(tmp_path).replace("}\n", ", storage_options: {x: .inf}}\n"),
         "data.storage_options.x"),
        ("steps: 1e30", _json(tmp_path, optim={"steps": 1e30}), "optim.steps"),
        ("batch_size: 10**12", _json(tmp_path, optim={"steps": 5, "batch_size": 10**12}), "optim.batch_size"),
        ("workers: 10**12", _json(tmp_path, resources={"workers": 10**12}), "resources.workers"),
        ("gpus_per_worker: 1e6", _json(tmp_path, resources={"gpus_per_worker": 1e6}), "resources.gpus_per_worker"),
        ("quantizer option 1e20", _json(tmp_path, quantizer={"beta": 1e20}), "quantizer.beta"),
        ("brace pattern escaping the roots", _yaml(tmp_path, train=f"{tmp_path}/{{..,a}}/{{..,b}}/{{..,c}}/etc/passwd"),
         "data.train"),
        ("glob then ..", _yaml(tmp_path, train=f"{tmp_path}/*/../../etc"), "data.train"),
        ("braces that expand to ..", _yaml(tmp_path, train=f"{tmp_path}/.{{.,}}/.{{.,}}/etc/passwd"), "data.train"),
        ("braces that expand to .. (2)", _yaml(tmp_path, train=f"{tmp_path}/{{.,x}}./{{.,x}}./etc/shadow"), "data.train"),
        ("a :: part outside the roots", _yaml(tmp_path, train=f"{tmp_path}/ok.tar::/etc/passwd"), "data.train"),
        ("a :: part that is a pipe:", _yaml(tmp_path, train=f"{tmp_path}/x.tar::pipe:cat /etc/passwd"), "data.train"),
        ("a key MLflow cannot store", _json(tmp_path, data={"storage_options": {"x@y!": 1}}), "data.storage_options"),
        ("perceptual weights as a pipe:", _json(tmp_path, model={"perceptual": {"weights": "pipe:cat /etc/passwd"}}),
         "model.perceptual.weights"),
        ("perceptual weights outside the roots", _json(tmp_path, model={"perceptual": {"weights": "/etc/passwd"}}),
         "model.perceptual.weights"),
        ("50 KB experiment name", _json(tmp_path, tracking={"experiment": "e" * 50_000}), "tracking.experiment"),
        ("forged protocol line in a name",
         _json(tmp_path, tracking={"experiment": 'x\nVQTRAIN_RESULT {"model_uri": "models:/evil@x"}'}),
         "tracking.experiment"),
        ("integer keys", "{1: x}", ""),
        ("a list, not a mapping", "[1, 2]", ""),
        ("two documents", _yaml(tmp_path) + "---\n" + _yaml(tmp_path), ""),
    ]  # fmt: skip


def test_hostile_specs_get_small_422s_naming_the_field_and_store_nothing(api, tmp_path) -> None:
    with api.client() as c:
        for case, body, loc in corpus(tmp_path):
            r = c.post("/v1/jobs", content=body.encode(), headers={"Content-Type": "application/yaml"})
            assert r.status_code == 422, f"{case}: {r.status_code} {r.text[:300]}"
            assert len(r.content) < 8192, f"{case}: a {len(r.content)}-byte answer"
            locs = [e["loc"] for e in r.json()["detail"]]
            assert loc in locs, f"{case}: errors name {locs}, wanted {loc!r}"
        # 20,000 unknown fields: a bounded answer
        wide = {**spec_for(tmp_path), **{f"field{i}": i for i in range(20_000)}}
        r = c.post("/v1/jobs", json=wide)
        assert r.status_code == 422 and len(r.json()["detail"]) <= 51 and len(r.content) < 16384
        assert "more errors" in r.json()["detail"][-1]["msg"]
        assert c.get("/v1/jobs").json()["total"] == 0
    assert stored_rows(api) == 0


def test_every_url_field_obeys_the_services_schemes(live, make_settings, tmp_path) -> None:
    server = live(make_settings(max_active_jobs=0, allowed_schemes=["s3"]))
    with server.client() as c:
        weights = c.post("/v1/jobs", json=spec_for(tmp_path, model={"perceptual": {"weights": "https://h/vgg.pt"}}))
        assert weights.status_code == 422 and weights.json()["detail"][0]["loc"] == "model.perceptual.weights"
        assert c.post("/v1/jobs", json=spec_for(tmp_path, model={"perceptual": {"weights": "s3://b/vgg.pt"}})).status_code == 201


def test_body_type_and_size_are_checked_before_parsing(api, tmp_path) -> None:
    with api.client() as c:
        form = c.post("/v1/jobs", content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415 and "application/json" in form.json()["detail"]
        big = c.post("/v1/jobs", content=b"#" * (2 << 20), headers={"Content-Type": "application/yaml"})
        assert big.status_code == 413
    # a body that only declares 100 MB is refused from its headers, before any of it is sent
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as s:
        s.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n".encode())  # fmt: skip
        assert s.recv(4096).split(b"\r\n", 1)[0].endswith(b"413 Request Entity Too Large")
    assert stored_rows(api) == 0


def test_jobs_the_cluster_can_never_hold_are_refused(live, make_settings, tmp_path) -> None:
    """The tests' Ray is one node with 2 CPUs and no GPU: a GPU job, or 3 one-CPU workers, would wait
    forever while holding a slot. Behind an autoscaler the live nodes say nothing: then they pass."""
    server = live(make_settings(max_active_jobs=0))
    with server.client() as c:
        gpu = c.post("/v1/jobs", json=spec_for(tmp_path, resources={"gpus_per_worker": 1}))
        assert gpu.status_code == 422 and gpu.json()["detail"][0]["loc"] == "resources.gpus_per_worker"
        many = c.post("/v1/jobs", json=spec_for(tmp_path, resources={"workers": 3}))
        assert many.status_code == 422 and many.json()["detail"][0]["loc"] == "resources.workers"
        big = c.post("/v1/jobs", json=spec_for(tmp_path, resources={"cpus_per_worker": 64}))
        assert big.status_code == 422 and big.json()["detail"][0]["loc"] == "resources.cpus_per_worker"
        assert c.post("/v1/jobs", json=spec_for(tmp_path, resources={"workers": 2})).status_code == 201
    assert stored_rows(server) == 1
    scaling = live(make_settings(max_active_jobs=0, cluster_autoscales=True))
    shared = {"data": {"train": "s3://b/x"}, "checkpoint": {"storage": "s3://b/c"}}
    with scaling.client() as c:
        assert c.post("/v1/jobs", json=spec_for(tmp_path, resources={"gpus_per_worker": 1}, **shared)).status_code == 201
        # workers on nodes an autoscaler adds cannot see this machine's disk
        local = c.post("/v1/jobs", json=spec_for(tmp_path, resources={"gpus_per_worker": 1}))
        assert local.status_code == 422 and {"data.train", "checkpoint.storage"} <= {e["loc"] for e in local.json()["detail"]}


def test_a_writer_cancels_its_own_jobs_an_admin_any(live, make_settings, tmp_path) -> None:
    tokens = [{"name": "ann", "token": "ann-token"}, {"name": "bob", "token": "bob-token"},
              {"name": "ann", "token": "other-ann-token"}, {"name": "ops", "token": "ops-token", "admin": True}]  # fmt: skip
    server = live(make_settings(max_active_jobs=0, tokens=tokens))
    with server.client("ann-token") as ann:
        mine = ann.post("/v1/jobs", json=spec_for(tmp_path, "a1")).json()["id"]
        theirs = ann.post("/v1/jobs", json=spec_for(tmp_path, "a2")).json()["id"]
    for other in ("bob-token", "other-ann-token"):  # a token of the same name is still another token
        with server.client(other) as c:
            r = c.post(f"/v1/jobs/{mine}/cancel")
            assert r.status_code == 403 and "another token" in r.json()["detail"]
    with server.client("ann-token") as ann:
        assert ann.post(f"/v1/jobs/{mine}/cancel").json()["state"] == "cancelled"
    with server.client("ops-token") as ops:
        assert ops.post(f"/v1/jobs/{theirs}/cancel").json()["state"] == "cancelled"
    # rows stored before owners carried the token's fingerprint recorded the name alone
    from service import store

    engine = store.make_engine(server.settings.resolved_store_url)
    with store.session_factory(engine)() as db:
        db.add(store.Job(id="vq-legacy-owner", name="old", kind="tokenizer", spec=spec_for(tmp_path), owner="bob"))
        db.commit()
    engine.dispose()
    with server.client("ann-token") as ann:
        assert ann.post("/v1/jobs/vq-legacy-owner/cancel").status_code == 403
    with server.client("bob-token") as bob:
        assert bob.post("/v1/jobs/vq-legacy-owner/cancel").json()["state"] == "cancelled"


def test_an_idempotency_key_reused_for_another_spec_is_a_conflict(api, tmp_path) -> None:
    key = {"Idempotency-Key": "deploy-7"}
    with api.client() as c:
        first = c.post("/v1/jobs", json=spec_for(tmp_path, "one"), headers=key)
        again = c.post("/v1/jobs", json=spec_for(tmp_path, "one"), headers=key)
        assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = c.post("/v1/jobs", json=spec_for(tmp_path, "two"), headers=key)
        assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert stored_rows(api) == 1


def test_openapi_refs_resolve_and_times_carry_a_zone(api, tmp_path) -> None:
    with api.client() as c:
        doc = c.get("/openapi.json").json()
        refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
        assert refs and refs <= set(doc["components"]["schemas"])
        from openapi_spec_validator import validate

        validate(doc)
        job = c.post("/v1/jobs", json=spec_for(tmp_path)).json()
        assert job["created_at"].endswith(("Z", "+00:00"))
        d = c.get(f"/v1/jobs/{job['id']}").json()
        assert d["created_at"].endswith(("Z", "+00:00")) and d["updated_at"].endswith(("Z", "+00:00"))
