"""save → load rebuilds identical models from weights + JSON config (no pickled classes); load_tokenizer URIs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import vqmodels
from vqmodels.ar import ARConfig, ARTransformer
from vqmodels.checkpoint import CONFIG, WEIGHTS, find_checkpoint, load, load_tokenizer, save
from vqmodels.maskgit import MaskGIT, MaskGITConfig
from vqmodels.tokenizer import Tokenizer, TokenizerConfig


def trained_tokenizer(**overrides) -> Tokenizer:
    """A debug tokenizer after a few steps, so k-means init, running stats and counters are non-trivial."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.debug(**overrides))
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    for step in range(3):
        out = tok(torch.rand(8, 3, 16, 16) * 2 - 1, step=step)
        opt.zero_grad()
        out.losses["total"].backward()
        if tok.discriminator is not None:
            tok.discriminator_loss(torch.rand(8, 3, 16, 16), out.reconstruction, step).loss.backward()
        opt.step()
    return tok.eval()


def test_tokenizer_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    tok = trained_tokenizer(quantizer_preset="ema", adv_weight=0.1)
    tok.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG).read_text())
    assert meta["model"] == "tokenizer" and meta["config"]["quantizer_preset"] is None
    assert meta["config"]["quantizer"] == dataclasses.asdict(tok.quantizer.options)  # resolved, preset-free
    torch.load(tmp_path / "ckpt" / WEIGHTS, weights_only=True)  # plain tensors only

    loaded = vqmodels.load(tmp_path / "ckpt")
    assert isinstance(loaded, Tokenizer) and not loaded.training
    assert loaded.quantizer.options == tok.quantizer.options
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), tok.encode(x))
        a, b = tok(x), loaded(x, step=5)
        assert torch.equal(a.reconstruction, b.reconstruction)
        assert torch.equal(loaded.decode(a.indices), tok.decode(a.indices))
    for (k, v), (k2, v2) in zip(tok.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_inference_only_checkpoint_drops_the_discriminator(tmp_path: Path) -> None:
    tok = trained_tokenizer(adv_weight=0.1)
    save(tok, tmp_path, inference_only=True)
    weights = torch.load(tmp_path / WEIGHTS, weights_only=True)
    assert not any(k.startswith("discriminator.") for k in weights)
    loaded = load(tmp_path)
    assert loaded.discriminator is None
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), tok.decode(tok.encode(x)))
    with pytest.raises(RuntimeError, match="discriminator"):
        loaded.discriminator_loss(x, x)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_transformer_save_load_gives_identical_outputs(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    cfg = MaskGITConfig.debug(num_classes=5)
    m = (MaskGIT(cfg) if kind == "maskgit" else ARTransformer(ARConfig.matching(cfg))).eval()
    m.save(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["model"] == kind
    loaded = load(tmp_path)
    assert type(loaded) is type(m) and loaded.config == m.config
    tokens, labels = torch.randint(0, 64, (2, 8, 8)), torch.tensor([0, 4])
    assert torch.equal(loaded.logits(tokens, labels), m.logits(tokens, labels))
    kw = {"steps": 4} if kind == "maskgit" else {}
    a = m.generate(2, labels=labels, generator=torch.Generator().manual_seed(0), **kw)
    b = loaded.generate(2, labels=labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"model": "resnet", "config": {}}))
    with pytest.raises(ValueError, match="'model'"):
        load(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"model": "maskgit", "config": {"dim": 32, "depht": 2}}))
    with pytest.raises(ValueError, match="depht"):
        load(tmp_path)
    MaskGIT(MaskGITConfig.debug()).save(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load(tmp_path / "m")
    with pytest.raises(TypeError, match="cannot save"):
        save(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        load_tokenizer(tmp_path / "does-not-exist")


def test_load_tokenizer_finds_the_checkpoint_in_a_registry_layout(tmp_path: Path) -> None:
    tok = trained_tokenizer()
    pyfunc = tmp_path / "model"
    (pyfunc / "MLmodel").parent.mkdir(parents=True)
    (pyfunc / "MLmodel").write_text("flavors: {}\n")
    MaskGIT(MaskGITConfig.debug()).save(pyfunc / "artifacts" / "maskgit")  # a decoy of another type
    tok.save(pyfunc / "artifacts" / "tokenizer", inference_only=True)
    assert find_checkpoint(pyfunc) == pyfunc / "artifacts" / "tokenizer"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = tok.encode(x)
        assert torch.equal(vqmodels.load_tokenizer(pyfunc).encode(x), expected)
        # through MLflow's artifact download (a file:// URI needs no server)
        via_mlflow = load_tokenizer(pyfunc.as_uri())
        assert torch.equal(via_mlflow.encode(x), expected)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        find_checkpoint(pyfunc / "artifacts" / "maskgit")


def test_load_tokenizer_finds_a_registered_model_through_the_given_tracking_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models:/name@alias` with `tracking_uri=` works in a process with no MLflow configuration: MLflow
    looks registered models up through its registry URI, which must follow the given tracking URI.
    (A SQLite store needs no server. vqmodels asks vqbase.fetch, found through its entry point, for the files.)"""
    import importlib

    mlflow = importlib.import_module("mlflow")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # unset now, restored afterwards
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    monkeypatch.setattr(importlib.import_module("mlflow.tracking._tracking_service.utils"), "_tracking_uri", None)
    monkeypatch.setattr(importlib.import_module("mlflow.tracking._model_registry.utils"), "_registry_uri", None)
    monkeypatch.chdir(tmp_path)  # MLflow's default store, should it be consulted, lands here

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    tok = trained_tokenizer()
    tok.save(tmp_path / "model" / "artifacts" / "tokenizer", inference_only=True)
    client.log_artifacts(run_id, str(tmp_path / "model"), "model")
    client.create_registered_model("tok")
    version = client.create_model_version("tok", f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias("tok", "prod", version)

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        loaded = load_tokenizer("models:/tok@prod", tracking_uri=uri)
        assert torch.equal(loaded.encode(x), tok.encode(x))
    # nothing leaks: a registry URI left behind would redirect this process's (and its children's)
    # later registrations, e.g. a Ray head started afterwards hands it to every job
    assert "MLFLOW_REGISTRY_URI" not in os.environ and mlflow.get_registry_uri() != uri

    # a stale registry setting of the process does not win over the tracking_uri given here
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with torch.no_grad():
        assert torch.equal(load_tokenizer("models:/tok/1", tracking_uri=uri).encode(x), tok.encode(x))
    assert os.environ["MLFLOW_REGISTRY_URI"] == f"sqlite:///{tmp_path / 'elsewhere.db'}"


def test_every_model_config_names_unknown_keys():
    from vqmodels import ARConfig, MaskGITConfig, TokenizerConfig

    for cls in (TokenizerConfig, MaskGITConfig, ARConfig):
        with pytest.raises(ValueError, match=rf"unknown {cls.__name__} field\(s\) \['bogus'\]"):
            cls.from_dict({"bogus": 1})
