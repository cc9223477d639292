"""vqbase: the one parser of model references and URL schemes, and the job ↔ starter protocol."""

from __future__ import annotations

import json
import os

import pytest

from vqbase import protocol
from vqbase.uris import ModelRef, parse_model_uri, parse_ref, pinned_model_uri, split_model_uri, url_scheme


@pytest.mark.parametrize(
    ("uri", "ref"),
    [
        ("models:/tok@champion", ModelRef("tok", "champion")),
        ("models:/tok/3", ModelRef("tok", version=3)),
        ("models:/tok", None),  # no version: not a job's reference
        ("models:/tok/3\n", None),  # a trailing newline is no part of a reference
        ("models:/tok@", None),
        ("runs:/abc/model", None),
        ("/local/dir", None),
        (None, None),
    ],
)
def test_parse_model_uri(uri, ref):
    assert parse_model_uri(uri) == ref


def test_references_round_trip_and_pinning():
    assert parse_model_uri("models:/tok", need_version=False) == ModelRef("tok")
    assert parse_ref("tok@prod").uri == "models:/tok@prod" and parse_ref("tok/12").uri == "models:/tok/12"
    assert parse_ref("_x") is None and parse_ref("tok@-x") is None
    assert pinned_model_uri("models:/tok/3") and not pinned_model_uri("models:/tok@champion")


def test_split_model_uri_keeps_the_path_inside_the_model():
    assert split_model_uri("models:/w@v/inception.pth") == (ModelRef("w", "v"), "inception.pth")
    assert split_model_uri("models:/w/2/a/b.pt") == (ModelRef("w", version=2), "a/b.pt")
    assert split_model_uri("models:/w/latest/b.pt") == (ModelRef("w"), "b.pt")  # latest: the newest version
    assert split_model_uri("models:/w/Production") == (None, "")  # a stage: MLflow's own business
    assert split_model_uri("runs:/x/y") == (None, "")


def test_one_version_rule():
    """A version is at most 18 digits (int64) everywhere: a longer one is no reference (and never reaches int())."""
    assert parse_model_uri("models:/t/" + "9" * 18) == ModelRef("t", version=int("9" * 18))
    assert parse_model_uri("models:/t/" + "9" * 5000) is None
    assert split_model_uri("models:/t/" + "9" * 19) == (None, "")


@pytest.mark.parametrize(("url", "scheme"), [("S3://b/k", "s3"), ("pipe:cat x", "pipe"), ("/a/b", None), ("a/b", None)])
def test_url_scheme(url, scheme):
    assert url_scheme(url) == scheme


def test_the_log_protocol_reads_what_a_job_writes():
    log = "\n".join([
        "some ray noise",
        "(TrainController pid=1) " + protocol.progress_line({"step": 5, "total": 10, "time": 1.0}),
        protocol.progress_line({"step": 8, "total": 10, "time": 2.0}),
        protocol.progress_line({"step": 2, "total": 10, "time": 3.0}),  # a restart from a checkpoint
        protocol.result_line({"model_uri": "models:/t/1"}),
    ])
    report = protocol.parse_logs(log)
    assert report.progress == {"step": 2, "total": 10, "time": 3.0}
    assert report.first_progress["step"] == 2  # the newest attempt's first record
    assert report.result == {"model_uri": "models:/t/1"} and report.failure is None
    failed = protocol.parse_logs("invalid job spec:\n  optim.lr: must be > 0\nvqtrain: later")
    assert failed.failure == "invalid job spec: optim.lr: must be > 0"
    assert protocol.parse_logs("vqtrain: the shards are gone").failure == "the shards are gone"


def test_spec_transport_is_compact_ascii_json():
    env = protocol.spec_env({"name": "é", "optim": {"lr": 0.001}})
    text = env[protocol.SPEC_ENV]
    assert text.isascii() and json.loads(text) == {"name": "é", "optim": {"lr": 0.001}}
    assert protocol.read_spec_env(environ=env) == text and protocol.read_spec_env(environ={}) is None
    assert "--spec-env VQTRAIN_SPEC_JSON" in protocol.entrypoint("/usr/bin/python3", "vq-1")


def test_allowed_roots_from_the_environment() -> None:
    """`VQTRAIN_ALLOWED_ROOTS` as the service passes it (JSON) or as a person types it (os.pathsep)."""
    assert protocol.parse_roots('["/data", "/scratch"]') == ["/data", "/scratch"]
    assert protocol.parse_roots(f" /data{os.pathsep}/scratch{os.pathsep}") == ["/data", "/scratch"]
    assert protocol.parse_roots("") == [] and protocol.parse_roots("[]") == []
    for bad in ('["/data", 3]', "[not json"):
        with pytest.raises(ValueError, match="VQTRAIN_ALLOWED_ROOTS"):
            protocol.parse_roots(bad)
    env = protocol.ALLOWED_ROOTS_ENV
    assert protocol.allowed_roots_from_env({}) is None and protocol.allowed_roots_from_env({env: " "}) is None
    assert protocol.allowed_roots_from_env({env: '["/data"]'}) == ["/data"]
