"""Stage-one tokenizer: shapes, loss plumbing (GAN, perceptual), and a short real training run on CIFAR-10."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqmodels.losses import PerceptualLoss, adaptive_weight, discriminator_loss, generator_loss
from vqmodels.tokenizer import Tokenizer, TokenizerConfig

CIFAR = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10/train.tar"


def images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("downsample", [2, 4, 8, 16])
def test_shapes_for_every_downsampling_factor(downsample: int) -> None:
    cfg = TokenizerConfig.debug(downsample=downsample, channel_mult=None, attention=downsample != 2)
    tok = Tokenizer(cfg).eval()
    x = images(2, 32)
    out = tok(x)
    side = 32 // downsample
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, side, side) and out.indices.dtype == torch.long
    assert set(out.losses) == {"rec", "quant", "total"}
    assert {"usage", "perplexity", "psnr"} <= set(out.metrics)
    tokens = tok.encode(x)
    assert torch.equal(tokens, out.indices)
    assert tok.decode(tokens).shape == x.shape
    assert torch.allclose(tok.decode(tokens), out.reconstruction, atol=1e-5)


def test_bad_inputs_and_config_name_the_field() -> None:
    with pytest.raises(ValueError, match="downsample"):
        TokenizerConfig.debug(downsample=3)
    with pytest.raises(ValueError, match="channel_mult"):
        TokenizerConfig.debug(channel_mult=(1, 2))
    with pytest.raises(ValueError, match="rec_loss"):
        TokenizerConfig.debug(rec_loss="l3")
    with pytest.raises(ValueError, match="quantizer.*beta"):
        TokenizerConfig.debug(quantizer={"beta": 2.0})
    with pytest.raises(ValueError, match="unknown TokenizerConfig"):
        TokenizerConfig.from_dict({"channels": 8, "chanels": 8})
    tok = Tokenizer(TokenizerConfig.debug())
    with pytest.raises(ValueError, match="images"):
        tok(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="tokens"):
        tok.decode(torch.full((1, 2, 2), 64))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_loss_kind(kind: str) -> None:
    tok = Tokenizer(TokenizerConfig.debug(rec_loss=kind)).eval()
    x = images()
    out = tok(x)
    diff = out.reconstruction - x
    expected = diff.abs().mean() if kind == "l1" else diff.pow(2).mean()
    assert torch.allclose(out.losses["rec"], expected)


@pytest.mark.parametrize("adv_loss", ["hinge", "non_saturating"])
def test_adversarial_loss_starts_at_adv_start_and_trains_only_the_generator(adv_loss: str) -> None:
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.debug(adv_weight=0.5, adv_start=10, adv_loss=adv_loss))
    x = images(4, 16)
    before = tok(x, step=9)
    assert "adv" not in before.losses and tok.adversarial_factor(9) == 0.0
    assert float(tok.discriminator_loss(x, before.reconstruction, step=9).loss.detach()) == 0.0

    out = tok(x, step=10)
    assert "adv" in out.losses and out.metrics["adv_weight"] > 0
    out.losses["total"].backward()
    assert all(p.grad is None for p in tok.discriminator.parameters()), "generator step must not train D"
    assert tok.decoder.conv_out.weight.grad is not None

    tok.zero_grad(set_to_none=True)
    d = tok.discriminator_loss(x, out.reconstruction, step=10)
    d.loss.backward()
    assert all(p.grad is not None for p in tok.discriminator.parameters())
    assert all(p.grad is None for p in tok.generator_parameters()), "D step must not reach the generator"
    assert set(d.metrics) == {"logits_real", "logits_fake"}


def test_adversarial_warmup_ramps_linearly() -> None:
    tok = Tokenizer(TokenizerConfig.debug(adv_weight=1.0, adv_start=5, adv_warmup=4))
    assert [tok.adversarial_factor(s) for s in (4, 5, 6, 8, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_gan_loss_formulas_and_adaptive_weight() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert torch.isclose(discriminator_loss(real, fake, "hinge"), torch.tensor(0.5 * (0.25 + 0.75)))
    assert torch.isclose(generator_loss(fake, "hinge"), torch.tensor(0.75))
    sp = torch.nn.functional.softplus
    assert torch.isclose(generator_loss(fake, "non_saturating"), sp(-fake).mean())
    w = torch.nn.Parameter(torch.ones(3, 3))
    # |grad nll| = 6·|1| and |grad g| = 2·|1|: the weight is their ratio
    lam = adaptive_weight(6.0 * w.sum(), 2.0 * w.sum(), w)
    assert torch.isclose(lam, torch.tensor(6.0 * 3 / (2.0 * 3 + 1e-4)))
    assert not lam.requires_grad


def test_adaptive_weight_survives_fp16_autocast_with_the_scalers_scale() -> None:
    """Under fp16 autocast the adaptive weight's gradients bypass the GradScaler: for a mean over many pixels
    they round to zero and the GAN term silently vanishes. With the scaler's scale passed in, λ matches fp32,
    also when that scale is so large that the scaled gradients overflow (they are taken again, smaller)."""
    torch.manual_seed(0)
    # a tiny rec_weight stands in for a mean over ~60 M pixels: per-pixel gradients below fp16's range
    tok = Tokenizer(TokenizerConfig.debug(adv_weight=1.0, adv_start=0, rec_weight=1e-4)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    fp32 = float(tok(x, step=1).metrics["adv_weight"])
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = float(tok(x, step=1).metrics["adv_weight"])
        scaled = float(tok(x, step=1, grad_scale=2.0**10).metrics["adv_weight"])
        overflow = tok(x, step=1, grad_scale=2.0**40).metrics["adv_weight"]
    assert fp32 > 0 and unscaled < 0.5 * fp32  # the failure this guards against
    assert scaled == pytest.approx(fp32, rel=0.1)
    assert float(overflow) == pytest.approx(fp32, rel=0.1)


def _fake_vgg(path: Path) -> None:
    """A random state dict in torchvision's vgg16 layout (weights the user would provide)."""
    from vqmodels.metrics.lpips import backbone

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in backbone("vgg").state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # full torchvision files carry the classifier too
    torch.save(state, path)


def test_perceptual_loss_only_from_user_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="perceptual_path"):
        TokenizerConfig.debug(perceptual_weight=1.0)
    missing = Tokenizer(TokenizerConfig.debug(perceptual_weight=1.0, perceptual_path=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        missing(images(1, 16))
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a VGG16 state dict"):
        PerceptualLoss(bad)

    vgg, lpips = tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"
    _fake_vgg(vgg)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}, lpips)
    tok = Tokenizer(TokenizerConfig.debug(perceptual_weight=0.5, perceptual_path=str(vgg),
                                          perceptual_lpips_path=str(lpips)))
    x = images(2, 16)
    out = tok(x)
    assert out.losses["perceptual"] > 0
    assert torch.isclose(out.losses["total"], out.losses["rec"] + 0.5 * out.losses["perceptual"] + out.losses["quant"])
    out.losses["total"].backward()
    assert tok.encoder.conv_in.weight.grad is not None
    net = tok.perceptual_net()
    assert float(net(x, x)) == 0.0
    assert not any(k.startswith("_perceptual") or "features" in k for k in tok.state_dict())


def _cifar_slice(n: int = 400, stride: int = 125) -> torch.Tensor:
    """Every `stride`-th image of the shared tar (all ten classes), as (n, 3, 32, 32) in [-1, 1]."""
    if not CIFAR.is_file():
        raise FileNotFoundError(f"shared CIFAR-10 tar missing at {CIFAR}")
    with tarfile.open(CIFAR) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")][::stride][:n]
        arrays = [np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")) for m in members]
    assert len(arrays) == n, f"{CIFAR} holds fewer than {n * stride} images"
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _train_debug_tokenizer(train: torch.Tensor, held_out: torch.Tensor, steps: int) -> tuple[float, float, float, dict]:
    """Adam on random 16×16 crops (the model is fully convolutional; crops are 4× cheaper than full images).
    Returns held-out rec loss before and after, the held-out fraction of codes used, and the last metrics."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.debug())  # default quantizer preset: k-means init + dead-code replacement
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def evaluate() -> tuple[float, float]:
        tok.eval()
        with torch.no_grad():
            out = tok(held_out)
        tok.train()
        return float(out.losses["rec"]), out.indices.unique().numel() / tok.config.codebook_size

    rec_before, _ = evaluate()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (32,), generator=gen)]
        i, j = torch.randint(0, 17, (2,), generator=gen).tolist()
        out = tok(batch[:, :, i : i + 16, j : j + 16], step=step)
        opt.zero_grad(set_to_none=True)
        out.losses["total"].backward()
        opt.step()
    rec_after, used = evaluate()
    return rec_before, rec_after, used, out.metrics


@pytest.mark.slow
def test_short_cifar_training_lowers_reconstruction_loss_and_uses_the_codebook() -> None:
    data = _cifar_slice()
    with torch.random.fork_rng():
        rec_before, rec_after, used, metrics = _train_debug_tokenizer(data[:336], data[336:], steps=200)
    assert rec_after < 0.7 * rec_before, (rec_before, rec_after)
    assert used >= 0.75, f"only {used:.0%} of the codebook used on held-out images"
    assert float(metrics["usage_window"]) >= 0.75
