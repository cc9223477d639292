"""Credentials never travel in a spec: every place and form of one is refused by `parse_spec` (so by the API,
`vqtrain spec check`, `vqtrain run` and `python -m jobs.run`), naming the field and never echoing the value;
non-secret storage options pass; redaction masks by key and by value. The API side: tests/service/test_secrets.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from jobs.credentials import credential_errors, redact_spec, redact_text, secret_key
from jobs.run import main as run_main
from jobs.spec import JobSpec, SpecError, flatten_spec, parse_spec, redacted

REPO = Path(__file__).resolve().parents[2]
PLANTED = "PLANTED"  # every planted credential holds this marker; no error or redacted form may


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "tokenizer", "name": "t", "data": {"train": "s3://bucket/train"}}
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


def _opts(options: dict[str, Any]) -> dict[str, Any]:
    return _spec(data={"storage_options": options})


# (spec, the field its error names): one per place and form a credential was found in
CASES: list[tuple[dict[str, Any], str]] = [
    (_opts({"secret": "PLANTED-s3cr3t"}), "data.storage_options.secret"),
    (_opts({"key": "PLANTED-key-id"}), "data.storage_options.key"),
    (_opts({"passwd": "PLANTED-pw"}), "data.storage_options.passwd"),
    (_opts({"client_kwargs": {"headers": {"Authorization": "Bearer PLANTED-bearer"}}}),
     "data.storage_options.client_kwargs.headers.Authorization"),
    (_opts({"client_kwargs": {"headers": {"X-Api-Key": "PLANTED-api"}}}), "data.storage_options.client_kwargs.headers.X-Api-Key"),
    (_opts({"s3": {"aws_secret_access_key": "PLANTED-nested"}}), "data.storage_options.s3.aws_secret_access_key"),
    (_opts({"Session-Token": 12345}), "data.storage_options.Session-Token"),  # any type, any spelling
    (_opts({"sas_token": "sv=2022&sig=PLANTED"}), "data.storage_options.sas_token"),
    (_opts({"credentials": {"type": "service_account", "private_key": "PLANTED"}}), "data.storage_options.credentials"),
    (_opts({"client_kwargs": {"aws_id": "AKIAPLANTED000000001"}}), "data.storage_options.client_kwargs.aws_id"),
    (_opts({"endpoint_url": "http://minio:PLANTED-pw@minio:9000"}), "data.storage_options.endpoint_url"),
    (_spec(data={"train": "s3://AKIAPLANTED000000002:PLANTED/sec+ret@bucket/train"}), "data.train"),
    (_spec(data={"train": ["s3://b/ok", "https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=PLANTED"]}),
     "data.train[1]"),
    (_spec(data={"eval": "https://user:PLANTED@host/eval"}), "data.eval"),
    (_spec(data={"train": "s3://ghp_PLANTED0123456789abcdefghijklmnopq@bucket/x"}), "data.train"),
    (_spec(checkpoint={"storage": "s3://user:PLANTED@bucket/ckpt"}), "checkpoint.storage"),
    (_spec(kind="tokenize", tokenizer="models:/t@latest", output="s3://u:PLANTED@bucket/out"), "output"),
    (_spec(kind="maskgit", tokenizer="https://u:PLANTED@host/tok"), "tokenizer"),
    (_spec(model={"perceptual": {"weights": "https://u:PLANTED@host/lpips.pt"}}), "model.perceptual.weights"),
    # an all-digit password is no port: `host:8080/path@x` is, because a path follows the digits
    (_opts({"endpoint_url": "https://admin:12345678@minio.internal:9000"}), "data.storage_options.endpoint_url"),
    (_opts({"sse_customer_key": "PLANTED-ssec"}), "data.storage_options.sse_customer_key"),
]  # fmt: skip

NOT_SECRET = {
    "endpoint_url": "http://minio:9000", "region_name": "eu-west-1", "anon": False, "use_ssl": False,
    "client_kwargs": {"region_name": "eu-west-1", "verify": False},
    "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
    "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:eu:1:key/k"},
    "requester_pays": True, "key": None, "secret": "", "gs": {"token": "google_default", "project": "p"},
    "key_prefix": "runs/", "sse_customer_key_md5": "abc",  # "key" as a prefix or a qualifier names no secret
}  # fmt: skip


@pytest.mark.parametrize(("spec", "loc"), CASES, ids=[c[1] for c in CASES])
def test_a_credential_is_refused_naming_its_field(spec: dict, loc: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    found = {err["loc"]: err["msg"] for err in e.value.errors}
    assert loc in found, e.value.errors
    assert "AWS_ACCESS_KEY_ID" in found[loc] and "instance role" in found[loc]  # says what to do instead
    assert PLANTED not in str(e.value)  # never echoes the value


def test_non_secret_options_and_urls_pass() -> None:
    spec = parse_spec(_spec(data={"train": ["s3://b/x@2/shard-{000..009}.tar", "http://h:9000/a@b/c.tar"],
                                  "storage_options": NOT_SECRET}))  # fmt: skip
    assert spec.data.storage_options == NOT_SECRET
    assert not credential_errors(_spec(name="tok", tokenizer="models:/tok@latest", kind="maskgit"))
    for key in ("endpoint_url", "region_name", "signature_version", "SSEKMSKeyId", "anon", "use_ssl"):
        assert not secret_key(key), key
    for key in ("Authorization", "passwd", "pwd", "AccountKey", "x-amz-security-token", "api_key", "Cookie", "sig"):
        assert secret_key(key), key


def test_redaction_masks_by_key_and_by_value() -> None:
    """For rows stored before the rule (built here without parse_spec's check) and what no rule names."""
    data = {"kind": "tokenizer", "name": "t", "data": {
        "train": ["s3://AKIAPLANTED000000003:PLANTED@b/x", "https://h/x.tar?sv=1&sig=PLANTED"],
        "storage_options": {"endpoint_url": "http://u:PLANTED@minio:9000", "passwd": 1234, "region_name": "eu",
                            "client_kwargs": {"headers": {"Authorization": "Bearer PLANTED"}}}}}  # fmt: skip
    spec = JobSpec.model_validate(data)
    for shown in (redacted(spec), redact_spec(spec.model_dump(mode="json")), redacted(spec.model_dump(mode="json"))):
        text = json.dumps(shown)
        assert PLANTED not in text and "1234" not in text
        assert shown["data"]["storage_options"]["endpoint_url"] == "http://***@minio:9000"
        assert shown["data"]["storage_options"]["region_name"] == "eu"
        assert shown["data"]["train"][1] == "https://h/x.tar?sv=1&sig=***"
    assert PLANTED not in json.dumps(flatten_spec(spec))  # MLflow params
    assert redact_text("s3://b/key/x.tar") == "s3://b/key/x.tar"


@pytest.mark.parametrize(("spec", "loc"), CASES[:: 3], ids=[c[1] for c in CASES[:: 3]])
def test_the_entry_point_refuses_it_with_exit_2(spec: dict, loc: str, capsys: pytest.CaptureFixture) -> None:
    assert run_main(["--spec-json", json.dumps(spec)]) == 2
    err = capsys.readouterr().err
    assert loc in err and PLANTED not in err


def test_the_entry_point_reads_the_spec_from_the_named_variable(tmp_path: Path) -> None:
    """What Ray runs (`--spec-env VQTRAIN_SPEC_JSON`), as a real process: refused before anything starts."""
    spec, loc = CASES[3]
    env = {**os.environ, "VQTRAIN_SPEC_JSON": json.dumps(spec)}
    p = subprocess.run([sys.executable, "-m", "jobs.run", "--job-id", "x", "--spec-env", "VQTRAIN_SPEC_JSON"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and loc in p.stderr and PLANTED not in p.stderr + p.stdout
    assert run_main(["--spec-env", "VQTRAIN_NO_SUCH_VARIABLE"]) == 2


def test_spec_check_and_run_refuse_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import app as cli

    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    for i, (spec, loc) in enumerate(CASES):
        path = tmp_path / f"spec-{i}.json"
        path.write_text(json.dumps(spec))
        out = runner.invoke(cli, ["spec", "check", str(path)])
        assert out.exit_code == 1 and loc in out.output and PLANTED not in out.output, out.output
    out = runner.invoke(cli, ["run", str(tmp_path / "spec-0.json")])  # refused before Ray or MLflow start
    assert out.exit_code == 2 and CASES[0][1] in out.output and PLANTED not in out.output, out.output
