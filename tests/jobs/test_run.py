"""The entry point's pieces that need no cluster: where `ray.init` connects, the preflight's root check,
and the spec as it is logged to MLflow."""

from __future__ import annotations

import json

import pytest
import yaml

from jobs.run import preflight, ray_address, ray_init_kwargs
from jobs.spec import JobSpec, SpecError, parse_spec
from tests.jobs.data_helpers import write_shards
from vqbase.protocol import ALLOWED_ROOTS_ENV


def test_ray_address_skips_jobs_api_urls() -> None:
    # the service's VQTRAIN_RAY_ADDRESS is its Jobs API; inside a Ray job, Ray sets RAY_ADDRESS to the cluster
    env = {"VQTRAIN_RAY_ADDRESS": "http://head:8265", "RAY_ADDRESS": "10.0.0.5:6379"}
    assert ray_address(env) == "10.0.0.5:6379"
    assert ray_init_kwargs(env) == {"address": "10.0.0.5:6379", "log_to_driver": True}
    assert ray_address({"VQTRAIN_RAY_ADDRESS": "ray://head:10001", "RAY_ADDRESS": "10.0.0.5:6379"}) == "ray://head:10001"
    assert ray_address({"RAY_ADDRESS": "HTTPS://head:8265"}) is None  # what `ray job submit` reads
    assert ray_address({"VQTRAIN_RAY_ADDRESS": "auto"}) == "auto"  # an explicit choice to join any cluster


def test_no_address_starts_a_private_local_ray() -> None:
    """address="local", not None: ray.init(address=None) would join a `ray start` head on the machine."""
    for env in ({}, {"VQTRAIN_RAY_ADDRESS": "", "RAY_ADDRESS": " "}, {"VQTRAIN_RAY_ADDRESS": "http://h:8265"}):
        assert ray_init_kwargs(env) == {"address": "local", "include_dashboard": False, "log_to_driver": True}


def test_preflight_refuses_data_outside_the_allowed_roots(tmp_path, monkeypatch) -> None:
    write_shards(str(tmp_path / "outside"), [4])
    spec = parse_spec({"name": "t", "data": {"train": str(tmp_path / "outside"), "image_size": 16}})
    preflight(spec)  # no roots configured: a job run by hand reads any local path
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, json.dumps([str(tmp_path / "allowed")]))
    with pytest.raises(SpecError) as e:
        preflight(spec)
    assert e.value.errors[0]["loc"] == "data.train" and "allowed data roots" in e.value.errors[0]["msg"]
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, json.dumps([str(tmp_path)]))
    preflight(spec)


def test_logged_spec_is_redacted() -> None:
    from jobs.tracking import spec_yaml

    spec = JobSpec.model_validate({"name": "t", "data": {"train": "s3://b/train", "storage_options": {  # (parse_spec refuses it)
        "endpoint_url": "http://h:9000", "key": "AKIA-ID", "secret": "s3cr3t", "client_kwargs": {"token": "tok"}}}})
    text = spec_yaml(spec)
    assert "s3cr3t" not in text and "AKIA-ID" not in text and "tok\n" not in text
    logged = yaml.safe_load(text)
    assert logged["data"]["storage_options"] == {
        "endpoint_url": "http://h:9000", "key": "***", "secret": "***", "client_kwargs": {"token": "***"}}
    assert logged["name"] == "t" and logged["optim"]["steps"] == spec.optim.steps
