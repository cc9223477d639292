"""jobs.evaluation without servers: what is computed without weights (and that nothing connects), the
weights cache, and that an evaluation on two ranks gives the numbers of one rank."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.evaluation import masked_nll, sample_metrics, tokenizer_metrics
from jobs.judges import load_judges
from jobs.spec import EvaluationSpec
from tests import weights
from vqmodels.maskgit import MaskGIT, MaskGITConfig
from vqmodels.tokenizer import Tokenizer, TokenizerConfig

CPU = torch.device("cpu")


def _models() -> tuple[Tokenizer, MaskGIT]:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.debug(codebook_size=16)).eval()
    net = MaskGIT(MaskGITConfig.debug(codebook_size=16, grid_size=(8, 8), num_classes=3)).eval()
    return tok, net


def _split(n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 'eval split': n images in [-1, 1] in batches of 4, with labels."""
    x = weights.images(n, 5).float() / 127.5 - 1
    return [(x[i : i + 4], torch.arange(i, min(n, i + 4)) % 3) for i in range(0, n, 4)]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("weights")
    return {"fid": weights.inception_file(folder / "inception.pth"), "lpips": weights.lpips_files(folder)}


def test_without_weights_the_network_metrics_are_skipped_and_nothing_connects(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tok, net = _models()
    judges = load_judges(EvaluationSpec(), "tokenizer", CPU, 32)
    assert set(judges.skipped) == {"rfid", "lpips", "class_acc", "classifier_fd"}
    res = tokenizer_metrics(tok, _split(), judges, CPU)
    assert res is not None
    m = res.metrics
    assert m["eval/images"] == 12 and 0 < m["eval/ssim"] <= 1 and m["eval/psnr"] > 0
    assert m["eval/bits_per_image"] == 64 * 4  # 8 x 8 tokens of log2(16) bits
    assert 0 < m["eval/entropy_bits_per_image"] <= m["eval/bits_per_image"]
    assert m["eval/dead_codes"] == 16 * (1 - m["eval/usage"])
    assert "eval/rfid" not in m and "eval/lpips" not in m
    gen = load_judges(EvaluationSpec(), "maskgit", CPU, 32)
    assert set(gen.skipped) == {"fid", "inception_score", "class_acc", "classifier_fd"}
    assert sample_metrics(net, tok, gen, EvaluationSpec(), 0, 1, CPU, lambda: _split()) == {}


def test_weights_are_checked_and_fetched_once(tmp_path, monkeypatch, s3_server, s3_storage_options):
    import s3fs

    from jobs.eval_weights import fetch, sha256_of

    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path / "home"))
    local = tmp_path / "w.pth"
    local.write_bytes(b"weights")
    digest = sha256_of(local)
    assert fetch(str(local), "evaluation.fid_weights", digest) == local
    with pytest.raises(ValueError, match="evaluation.fid_weights: .* does not match its sha256"):
        fetch(str(local), "evaluation.fid_weights", "0" * 64)
    with pytest.raises(FileNotFoundError, match="evaluation.classifier: .*nothing is downloaded"):
        fetch(str(tmp_path / "absent.pt"), "evaluation.classifier")
    from tests import servers

    bucket = servers.make_bucket(s3_server, prefix="weights")
    fs = s3fs.S3FileSystem(**{"key": s3_storage_options["key"], "secret": s3_storage_options["secret"],
                              "endpoint_url": s3_storage_options["endpoint_url"]})
    url = f"{bucket}/inception.pth"
    fs.pipe(url[len("s3://"):], b"remote weights")
    with pytest.raises(ValueError, match="has sha256"):
        fetch(url, "evaluation.fid_weights", "0" * 64, s3_storage_options)
    got = fetch(url, "evaluation.fid_weights", None, s3_storage_options)
    assert got.read_bytes() == b"remote weights" and str(got).startswith(str(tmp_path / "home" / "weights"))
    fs.rm(url[len("s3://"):])  # fetched once: the cached copy serves from now on
    assert fetch(url, "evaluation.fid_weights", sha256_of(got), s3_storage_options) == got


def _evaluate(rank: int, world: int, files: dict, port: int, out: dict) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tok, net = _models()
        ev = EvaluationSpec(fid_weights=str(files["fid"]), lpips_weights=[str(p) for p in files["lpips"]],
                            num_samples=20, sample_steps=2, guidance=1.0)
        judges = load_judges(ev, "tokenizer", CPU, 32)
        split = _split()
        mine = [b for i, b in enumerate(split) if i % world == rank]  # each image on exactly one rank
        res = tokenizer_metrics(tok, mine, judges, CPU)
        gen_judges = load_judges(ev, "maskgit", CPU, 32)
        tokens = [(tok.encode(x), y) for x, y in mine]
        nll = masked_nll(net, tokens, CPU) or {}
        samples = sample_metrics(net, tok, gen_judges, ev, rank, world, CPU, lambda: mine, batch=5)
        if rank == 0:
            out.update({**res.metrics, **samples, **nll})
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run_two_ranks(files: dict) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.spawn(_evaluate, args=(2, files, port, out), nprocs=2, join=True)
        return dict(out)


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(weight_files):
    one: dict = {}
    _evaluate(0, 1, weight_files, 0, one)
    two = _run_two_ranks(weight_files)
    for key in ("eval/psnr", "eval/ssim", "eval/lpips", "eval/rfid", "eval/usage", "eval/perplexity", "eval/images",
                "eval/fid", "eval/inception_score", "eval/samples", "eval/nll"):
        assert key in one, key
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert one["eval/rfid"] > 0 and one["eval/lpips"] > 0 and one["eval/samples"] == 12  # min(20, split size)
    for key in ("eval/nll", "eval/accuracy", "eval/unigram_entropy", "eval/nll_vs_unigram"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key  # masks follow the samples, not the ranks


def test_generator_metrics_with_a_classifier(tmp_path):
    """Class consistency and the classifier FD with a TorchScript classifier (features method included)."""

    class Clf(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)

        @torch.jit.export
        def features(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.mean((2, 3)))

    path = tmp_path / "clf.pt"
    torch.jit.script(Clf()).save(str(path))
    tok, net = _models()
    ev = EvaluationSpec(classifier=str(path), num_samples=12, sample_steps=2)
    judges = load_judges(ev, "maskgit", CPU, 32)
    assert judges.classifier_dim == 6 and "class_acc" not in judges.skipped and "fid" in judges.skipped
    m = sample_metrics(net, tok, judges, ev, 0, 1, CPU, lambda: _split(), batch=5)
    assert 0 <= m["eval/class_acc"] <= 1 and m["eval/classifier_fd"] > 0 and "eval/fid" not in m
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="evaluation.classifier: .* is not a TorchScript module nor"):
        load_judges(EvaluationSpec(classifier=str(bad)), "maskgit", CPU, 32)


def test_evaluation_spec_names_bad_fields():
    from jobs.spec import SpecError, parse_spec

    base = {"name": "e", "kind": "eval", "evaluate": "models:/tok@champion", "data": {"eval": "/data/eval"}}
    parse_spec(base)
    cases = [
        ({"evaluation": {"sha256": {"/w.pth": "abc"}, "fid_weights": "/w.pth"}}, "evaluation.sha256"),
        ({"evaluation": {"sha256": {"/other.pth": "a" * 64}}}, "evaluation"),
        ({"evaluation": {"lpips_weights": ["/a", "/b", "/c"]}}, "evaluation.lpips_weights"),
        ({"evaluation": {"fid_weights": "pipe:curl x"}}, "evaluation.fid_weights"),
        ({"evaluate": "cifar-tokenizer"}, "evaluate"),
        ({"data": {"train": "/x"}}, "data.eval"),
        ({"tokenizer": "models:/t@a"}, "tokenizer"),
    ]
    for change, loc in cases:
        with pytest.raises(SpecError) as e:
            parse_spec({**base, **change})
        assert any(err["loc"] == loc for err in e.value.errors), (change, e.value.errors)
    spec = parse_spec({**base, "evaluation": {"fid_weights": "models:/inception@v1/weights.pth"}})
    assert spec.evaluation.fid_weights.startswith("models:/")
    from jobs.spec import absolute_paths

    rel = parse_spec({**base, "evaluation": {"fid_weights": "w/inception.pth", "sha256": {"w/inception.pth": "a" * 64}}})
    moved = absolute_paths(rel, "/specs")  # a spec file's relative paths: the digest follows its file
    assert moved.evaluation.sha256 == {"/specs/w/inception.pth": "a" * 64}
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "t", "data": {"eval": "/x"}})
    assert e.value.errors[0]["loc"] == "data.train"


def test_reference_statistics_of_a_dataset(cifar_slice, weight_files, tmp_path):
    """`vqtrain eval stats`: the Inception statistics of a shard set, loadable as a generator FID reference."""
    import numpy as np

    from jobs.data.shards import make_shards
    from jobs.eval_job import stats_main
    from vqmodels.metrics import load_reference

    make_shards(str(cifar_slice.folder), str(tmp_path / "shards"), per_shard=100, progress=False)
    out = tmp_path / "ref.npz"
    assert stats_main([str(tmp_path / "shards"), "-o", str(out), "--fid-weights", str(weight_files["fid"]),
                       "--num", "40"]) == 0
    mu, sigma = load_reference(out)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(sigma).all()
    with np.load(out) as data:
        assert int(data["n"]) == 40 and str(data["image_size"]) == "32"
    ev = EvaluationSpec(fid_weights=str(weight_files["fid"]), reference_stats=str(out), num_samples=10, sample_steps=2)
    tok, net = _models()
    judges = load_judges(ev, "maskgit", CPU, 32)
    m = sample_metrics(net, tok, judges, ev, 0, 1, CPU, None, batch=5)
    assert m["eval/fid"] > 0 and m["eval/samples"] == 10  # against the file: no eval split needed
    assert stats_main([str(tmp_path / "none"), "-o", str(out), "--fid-weights", str(weight_files["fid"])]) == 2
