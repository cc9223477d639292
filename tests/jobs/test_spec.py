"""The job spec: defaults, field-path errors, quantizer options from `QuantizerOptions`, URL rules,
allowed roots, flattening, the JSON Schema, the CLI (`vqtrain spec`) and the example specs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.spec import (
    JobSpec,
    MaskGITModelSpec,
    QuantizerSpec,
    SpecError,
    TokenizerModelSpec,
    absolute_paths,
    check_allowed_roots,
    flatten_spec,
    load_spec,
    parse_spec,
)
from vqmodels.quantize.options import PRESETS, QuantizerOptions

REPO = Path(__file__).resolve().parents[2]
MINIMAL = """\
kind: tokenizer
name: cifar-tokenizer
data:
  train: /data/cifar10/manifest.json
optim:
  steps: 100
"""


def base(**over) -> dict:
    d = {"kind": "tokenizer", "name": "t", "data": {"train": "/data/shards"}}
    d.update(over)
    return d


def errors_of(data) -> dict[str, str]:
    with pytest.raises(SpecError) as ei:
        parse_spec(data) if isinstance(data, dict) else load_spec(data)
    return {e["loc"]: e["msg"] for e in ei.value.errors}


def test_minimal_spec_gets_defaults():
    spec = load_spec(MINIMAL)
    assert len(MINIMAL.splitlines()) <= 10
    assert isinstance(spec.model, TokenizerModelSpec) and spec.model.codebook_size == 1024
    assert spec.optim.steps == 100 and spec.optim.batch_size == 64
    assert spec.quantizer.preset == "default"
    assert spec.quantizer.options() == QuantizerOptions(**PRESETS["default"])
    assert spec.model_name == "cifar-tokenizer" and spec.register.alias is None


def test_importable_without_torch():
    code = "import sys; sys.modules['torch'] = None; import jobs.spec; print(jobs.spec.load_spec.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "load_spec" in out.stdout


def test_model_follows_kind():
    spec = parse_spec(base(kind="maskgit", tokenizer="models:/tok@latest", model={"dim": 128, "heads": 8}))
    assert isinstance(spec.model, MaskGITModelSpec) and spec.model.dim == 128
    # the same keys are wrong for a tokenizer job, and the error says where
    errs = errors_of(base(model={"dim": 128}))
    assert "model.dim" in errs
    assert isinstance(parse_spec(base(kind="maskgit", tokenizer="models:/t/3")).model, MaskGITModelSpec)
    assert errors_of(base(kind="tokenize", tokenizer="models:/t@a", output="/out", model={}))["model"]


@pytest.mark.parametrize(
    ("over", "loc"),
    [
        ({"optim": {"steps": 0}}, "optim.steps"),
        ({"optim": {"batch_size": -1}}, "optim.batch_size"),
        ({"optim": {"steps": 10, "warmup_steps": 20}}, "optim.warmup_steps"),
        ({"resources": {"workers": 0}}, "resources.workers"),
        ({"data": {"train": "pipe:curl http://x"}}, "data.train"),
        ({"data": {"train": ["/ok", "ftp://host/x.tar"]}}, "data.train"),
        ({"data": {"train": "/ok", "eval": "pipe:cat x"}}, "data.eval"),
        ({"data": {"train": "/ok", "image_size": 30}}, "data.image_size"),
        ({"model": {"channel_mult": [1]}}, "model.channel_mult"),
        ({"model": {"rec_loss": "l3"}}, "model.rec_loss"),
        ({"model": {"adversarial": {"loss": "wgan"}}}, "model.adversarial.loss"),
        ({"quantizer": {"beta": 1.5}}, "quantizer.beta"),
        ({"quantizer": {"preset": "nope"}}, "quantizer.preset"),
        ({"quantizer": {"codebook": "simvq", "update": "ema"}}, "quantizer.update"),
        ({"quantizer": {"distance": "manhattan"}}, "quantizer.distance"),
        ({"name": "Has Spaces"}, "name"),
        ({"tokenizer": "models:/t@a"}, "tokenizer"),
        ({"output": "/out"}, "output"),
        ({"checkpoint": {"storage": "pipe:x"}}, "checkpoint.storage"),
        ({"register": {"alias": "bad alias"}}, "register.alias"),
        ({"model": {"res_blocks": 0}}, "model.res_blocks"),
    ],
)
def test_every_error_names_its_field(over, loc):
    assert loc in errors_of(base(**over))


@pytest.mark.parametrize("alias", ["v1", "V12", "v007", "a" * 256, "latest", "Latest"])
def test_aliases_mlflow_refuses_are_spec_errors(alias):
    """MLflow refuses these only when registering, after the whole training run (or, for 'latest', never sets
    it: it always means the newest version); the spec refuses them first, naming the field and why."""
    errors = errors_of(base(register={"alias": alias}))
    assert "register.alias" in errors
    if alias.lower() == "latest":
        assert "reserved by MLflow" in errors["register.alias"] and "newest version" in errors["register.alias"]


def test_aliases_mlflow_accepts_are_valid():
    for alias in ("candidate", "champion", "v1-rc", "prod_2", "version3", "latest2", "a" * 255):
        assert parse_spec(base(register={"alias": alias})).register.alias == alias
    assert parse_spec(base(register={"alias": None})).register.alias is None
    assert "newest version" in JobSpec.model_json_schema()["$defs"]["RegisterSpec"]["properties"]["alias"]["description"]


def test_alias_rules_agree_with_mlflow():
    """Every alias the spec accepts MLflow accepts too."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    for alias in ("candidate", "v1", "V2", "v1a", "v-1", "x" * 255, "x" * 256, "prod_2", "Champion", "9lives", "latest", "LATEST"):
        try:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
            mlflow_ok = True
        except MlflowException:
            mlflow_ok = False
        try:
            spec_ok = parse_spec(base(register={"alias": alias})).register.alias == alias
        except SpecError:
            spec_ok = False
        assert spec_ok <= mlflow_ok, alias


def test_kind_requirements():
    assert "tokenizer" in errors_of(base(kind="maskgit"))
    errs = errors_of(base(kind="tokenize", tokenizer="models:/t@a"))
    assert "output" in errs
    assert "tokenizer" in errors_of(base(kind="maskgit", tokenizer="models:/no-alias"))
    assert "tokenizer" in errors_of(base(kind="maskgit", tokenizer="s3://bucket/tok"))
    assert parse_spec(base(kind="tokenize", tokenizer="/models/tok", output="s3://b/tokens")).model is None
    assert "kind" in errors_of(base(kind="vae"))


def test_unknown_fields_are_errors_with_a_hint():
    errs = errors_of(base(optim={"stpes": 10}, extra_top=1))
    assert "did you mean 'steps'" in errs["optim.stpes"]
    assert "extra_top" in errs


def test_all_errors_reported_at_once():
    errs = errors_of(base(name="", optim={"steps": 0}, resources={"workers": 0}, quantizer={"beta": -1}))
    assert {"name", "optim.steps", "resources.workers", "quantizer.beta"} <= set(errs)


def test_quantizer_section_mirrors_options():
    names = {f.name for f in dataclasses.fields(QuantizerOptions)}
    assert set(QuantizerSpec.model_fields) == names | {"preset"}
    spec = parse_spec(base(quantizer={"preset": "ema", "replace_every": 5, "distance": "cosine"}))
    opts = spec.quantizer.options()
    assert opts.update == "ema" and opts.kmeans_init is True  # from the preset
    assert opts.replace_every == 5 and opts.distance == "cosine"  # explicit wins
    assert spec.quantizer.beta == QuantizerOptions().beta  # resolved values are visible on the spec
    plain = parse_spec(base(quantizer={"preset": "plain"})).quantizer.options()
    assert plain == QuantizerOptions()


def test_data_url_forms():
    for train in ["/abs/dir", "rel/dir", "file:///abs/x-{000..009}.tar", "s3://b/p/train-{000000..000009}.tar",
                  "gs://b/p/", "https://host/manifest.json", ["s3://b/a.tar", "s3://b/b.tar"]]:  # fmt: skip
        assert parse_spec(base(data={"train": train})).data.train == train


def test_load_spec_sources(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text(MINIMAL)
    assert load_spec(f).name == "cifar-tokenizer"
    assert load_spec(str(f)).name == "cifar-tokenizer"
    j = tmp_path / "spec.json"
    j.write_text(json.dumps(base()))
    assert load_spec(j).name == "t"
    assert load_spec(json.dumps(base())).name == "t"
    assert "does not exist" in errors_of(str(tmp_path / "missing.yaml"))[""]
    assert "not valid YAML" in errors_of("kind: [tokenizer\nname: x\n")[""]
    assert "mapping" in errors_of("[1, 2]")[""]


def test_round_trip_is_stable():
    spec = parse_spec(base(quantizer={"preset": "huh2023"}, model={"adversarial": {"weight": 0.5}}))
    again = parse_spec(spec.model_dump(mode="json"))
    assert again == spec
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_flatten_spec_redacts_credentials():
    with pytest.raises(SpecError, match="data.storage_options.key"):  # refused at the door...
        parse_spec(base(data={"train": "s3://b/x", "storage_options": {"key": "AKIA"}}))
    # ...and masked should one get past (a job stored before the rule): built without parse_spec's check
    spec = JobSpec.model_validate(base(data={"train": "s3://b/x", "storage_options": {
        "key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://h:9000"}}))
    flat = flatten_spec(spec)
    assert flat["data.storage_options.key"] == "***" and flat["data.storage_options.secret"] == "***"
    assert flat["data.storage_options.endpoint_url"] == "http://h:9000"
    assert flat["optim.steps"] == "1000" and flat["model.channel_mult"] == "[1, 2, 2]"
    assert flat["quantizer.kmeans_init"] == "true"
    assert all(isinstance(v, str) for v in flat.values())
    assert spec.data.storage_options["secret"] == "s3cr3t"  # the job itself still gets it


def test_allowed_roots(tmp_path):
    root = tmp_path / "data"
    check_allowed_roots(parse_spec(base(data={"train": f"{root}/c10/train-{{000..009}}.tar"})), [root])
    check_allowed_roots(parse_spec(base(data={"train": "s3://anything"})), [])  # remote URLs are not local paths
    for bad in ["/etc/passwd", f"{root}/../secrets", f"file://{tmp_path}/other"]:
        with pytest.raises(SpecError) as ei:
            check_allowed_roots(parse_spec(base(data={"train": bad})), [root])
        assert ei.value.errors[0]["loc"] == "data.train"
    with pytest.raises(SpecError) as ei:
        check_allowed_roots(parse_spec(base(data={"train": "c10"}, checkpoint={"storage": "/ckpt"})), [root], base=root)
    assert [e["loc"] for e in ei.value.errors] == ["checkpoint.storage"]
    # '..' before any pattern is resolved and checked like the rest (the CLI sends `spec-dir/../shards`)
    check_allowed_roots(parse_spec(base(data={"train": f"{root}/sub/../c10/x-{{0..3}}.tar"})), [root])
    # '..' after a pattern character is invisible to a prefix check: refused
    for sneaky in [f"{root}/*/../../../etc", f"{root}/[x]/../../home/.ssh"]:
        with pytest.raises(SpecError) as ei:
            check_allowed_roots(parse_spec(base(data={"train": str(root)}, checkpoint={"storage": sneaky})), [root])
        assert [e["loc"] for e in ei.value.errors] == ["checkpoint.storage"] and "'..'" in ei.value.errors[0]["msg"]
    # braces are expanded first, so each alternative is resolved and checked (`.{.,}` is `..` once expanded)
    for sneaky in [f"{root}/{{a,b}}/../../x", f"{root}/.{{.,}}/etc", f"{root}/x.tar::/etc/passwd"]:
        with pytest.raises(SpecError) as ei:
            check_allowed_roots(parse_spec(base(data={"train": str(root)}, checkpoint={"storage": sneaky})), [root])
        assert [e["loc"] for e in ei.value.errors] == ["checkpoint.storage"] and "outside" in ei.value.errors[0]["msg"]
    check_allowed_roots(parse_spec(base(data={"train": f"{root}/{{a,b}}/../c10/x-{{0..3}}.tar"})), [root])
    for example in ("maskgit.yaml", "tokenize.yaml", "demo-cifar.yaml", "tokenizer-cifar-local.yaml"):
        spec = absolute_paths(load_spec(REPO / "examples" / example), REPO / "examples")  # what `vqtrain submit` sends
        check_allowed_roots(spec, [REPO], base=REPO)


def test_absolute_paths(tmp_path):
    spec = absolute_paths(parse_spec(base(data={"train": "shards/m.json", "eval": "s3://b/e"})), tmp_path)
    assert spec.data.train == str(tmp_path / "shards/m.json") and spec.data.eval == "s3://b/e"


def test_json_schema_documents_every_section():
    schema = JobSpec.model_json_schema()
    assert {"kind", "name", "data", "model", "quantizer", "optim", "resources", "checkpoint", "tracking",
            "register", "evaluation", "evaluate", "tokenizer", "output"} == set(schema["properties"])  # fmt: skip
    q = schema["$defs"]["QuantizerSpec"]
    assert set(q["properties"]) == {f.name for f in dataclasses.fields(QuantizerOptions)} | {"preset"}
    assert q["additionalProperties"] is False


def test_cli_spec_schema_and_check(tmp_path):
    from service.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["spec", "schema"])
    assert out.exit_code == 0 and json.loads(out.stdout)["title"] == "JobSpec"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: tokenizer\nname: x\ndata: {train: 'pipe:ls'}\noptim: {steps: 0}\n")
    out = runner.invoke(app, ["spec", "check", str(bad)])
    assert out.exit_code == 1
    assert "data.train" in out.stderr and "optim.steps" in out.stderr


@pytest.mark.parametrize("path", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_examples_validate(path):
    spec = load_spec(path)
    assert spec.name and spec.kind in ("tokenizer", "maskgit", "tokenize", "eval")


def test_examples_cover_every_kind():
    kinds = {load_spec(p).kind for p in (REPO / "examples").rglob("*.yaml")}
    assert kinds == {"tokenizer", "maskgit", "tokenize", "eval"}


def test_cluster_storage_errors_name_every_field_on_this_machines_disk() -> None:
    """On a multi-node cluster: local shards, the default checkpoint folder, local token output and a
    file: MLflow artifact root are refused with the field and what to use instead; object storage passes."""
    from jobs.spec import cluster_storage_errors, parse_spec

    local = parse_spec({"name": "t", "data": {"train": "/data/train", "eval": ["file:///data/eval"]}})
    errors = {e["loc"]: e["msg"] for e in cluster_storage_errors(local, "file:///srv/mlruns")}
    assert set(errors) == {"data.train", "data.eval[0]", "checkpoint.storage", "tracking.experiment"}
    assert "s3://" in errors["data.train"] and "--serve-artifacts" in errors["tracking.experiment"]
    assert cluster_storage_errors(local, "/srv/mlruns")[-1]["loc"] == "tracking.experiment"

    shared = parse_spec({"name": "t", "data": {"train": "s3://b/train"}, "checkpoint": {"storage": "s3://b/ck"},
                         "model": {"perceptual": {"weights": "/home/ray/weights/vgg16.pt"}}})  # fmt: skip
    assert cluster_storage_errors(shared, "mlflow-artifacts:/3") == []  # weights baked into the image are fine
    assert cluster_storage_errors(shared, "s3://b/mlflow/3") == []


def test_a_stored_spec_with_the_old_default_alias_still_runs():
    """Specs the service stored before 'latest' was refused hold it as their default: it meant no alias."""
    from jobs.spec import upgrade_stored

    stored = parse_spec(base()).model_dump(mode="json")
    stored["register"]["alias"] = "latest"
    assert "register.alias" in errors_of(stored)  # refused as a new spec...
    assert parse_spec(upgrade_stored(stored)).register.alias is None  # ...and read back as what it meant
    assert upgrade_stored({"kind": "tokenizer"}) == {"kind": "tokenizer"}


def test_implicit_codebooks_are_checked_against_the_model():
    """FSQ's codebook is the product of its levels, LFQ's a power of two; VQ-only options are refused by name."""
    spec = parse_spec({**base(), "quantizer": {"preset": "fsq", "fsq_levels": [8, 8, 8, 5, 5, 5]},
                       "model": {"codebook_size": 64000}})
    assert spec.quantizer.method == "fsq" and spec.quantizer.options().fsq_levels == [8, 8, 8, 5, 5, 5]
    assert parse_spec({**base(), "quantizer": {"preset": "lfq"}, "model": {"codebook_size": 16384}}).quantizer.method == "lfq"
    # no levels named: the FSQ paper's for the codebook size (the layer resolves them the same way)
    assert parse_spec({**base(), "quantizer": {"preset": "fsq"}, "model": {"codebook_size": 15360}}).quantizer.method == "fsq"
    for quantizer, model, loc, words in [
        ({"preset": "fsq", "fsq_levels": [8, 8]}, {}, "quantizer.fsq_levels", "give 64 codes"),
        ({"preset": "fsq"}, {}, "quantizer.fsq_levels", "no levels for model.codebook_size 1024"),
        ({"preset": "fsq", "fsq_levels": [8, 1]}, {"codebook_size": 8}, "quantizer.fsq_levels", "must be >= 2"),
        ({"preset": "lfq"}, {"codebook_size": 1000}, "model.codebook_size", "not a power of two"),
        ({"method": "fsq", "fsq_levels": [4, 4]}, {"codebook_size": 16}, "quantizer.affine", "method='vq' only"),
        ({"method": "sq"}, {}, "quantizer.method", ""),
    ]:
        with pytest.raises(SpecError) as e:
            parse_spec({**base(), "quantizer": quantizer, "model": model})
        assert e.value.errors[0]["loc"] == loc and words in e.value.errors[0]["msg"], e.value.errors
