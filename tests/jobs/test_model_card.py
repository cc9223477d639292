"""The model card: description rebuilt from tags, eval tags with the protocol, dataset names; the CLI's
refusals for eval/sample (no job starts)."""

from __future__ import annotations

from typer.testing import CliRunner

from jobs.model_card import CARD, dataset_name, describe, eval_tags
from service.cli import app


def test_dataset_names_are_short_and_tag_safe():
    assert dataset_name("s3://b/cifar/eval") == "eval"
    assert dataset_name("/data/cifar10/cifar10-{000000..000008}.tar") == "cifar10"
    assert dataset_name("/data/imagenet/val/manifest.json") == "val"
    assert dataset_name(["s3://b/x y/part-0000.tar"]) == "x_y"
    assert dataset_name(None) == "unknown"


def test_card_from_tags_lists_every_evaluated_dataset():
    tags = {CARD + "kind": "tokenizer", CARD + "grid": "8x8", CARD + "codebook_size": "1024", CARD + "code_dim": "16",
            CARD + "image_size": "32", CARD + "quantizer": "default", CARD + "data.train": "s3://b/train",
            CARD + "steps": "1600", CARD + "job": "cifar-tokenizer"}
    tags.update(eval_tags("cifar10", {"eval/psnr": 23.4567891, "eval/ssim": 0.8}, {"ssim": "gaussian 11"},
                          {"rfid": "no evaluation.fid_weights named"}))
    tags.update(eval_tags("celeba", {"eval/psnr": 20.0, "eval/rfid": 12.5}, {"fid": "Inception"}, {}))
    assert tags["eval.cifar10.psnr"] == "23.4568" and tags["eval.cifar10.rfid"] == "null"
    text = describe("cifar-tokenizer", "3", tags)
    assert "# cifar-tokenizer v3: a VQ image tokenizer" in text
    assert "a 8x8 grid of codes from a codebook of 1024" in text and "Trained for 1600 steps" in text
    assert 'vqmodels.load_tokenizer("models:/cifar-tokenizer/3")' in text
    assert "| celeba | 12.5 | 20 |" in text and "| cifar10 | null | 23.4568 | 0.8 |" in text
    assert "- **cifar10**: ssim: gaussian 11" in text
    gen = describe("cifar-maskgit", "1", {CARD + "kind": "maskgit", CARD + "tokenizer": "models:/t/3"})
    assert "load_generator" in gen and "decoded by tokenizer `models:/t/3`" in gen and "Evaluations" not in gen


def test_eval_and_sample_refuse_incomplete_commands(tmp_path):
    runner = CliRunner()
    env = {"VQTRAIN_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    out = runner.invoke(app, ["eval", "models:/t@a"], env=env)
    assert out.exit_code == 2 and "--data SHARDS is required" in out.output
    out = runner.invoke(app, ["eval", "stats", "shards/"], env=env)
    assert out.exit_code == 2 and "vqtrain eval stats SHARDS -o ref.npz --fid-weights" in out.output
    out = runner.invoke(app, ["sample", "models:/m@a", "-o", str(tmp_path / "o")], env=env)
    assert out.exit_code == 2 and "--per-class" in out.output
    out = runner.invoke(app, ["eval", "models:/t@a", "--data", "/x", "--fid-weights", "pipe:rm -rf /"], env=env)
    assert out.exit_code == 2 and "evaluation.fid_weights" in out.output
