"""Stage one: the VQ tokenizer (VQGAN-style conv encoder/decoder around `VectorQuantizer`).

images (B, C, H, W) in [-1, 1] → encoder → (B, h, w, code_dim) → quantizer → indices (B, h, w)
→ codebook vectors → decoder → images. `forward` returns the generator-side losses; the discriminator's
loss is a separate call (`discriminator_loss`) so the training loop owns the two optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from vqmodels.config import FromDict, SavesConfig
from vqmodels.layers import AttnBlock, Downsample, ResBlock, Upsample, group_norm
from vqmodels.losses import (
    AdvLoss,
    PatchDiscriminator,
    PerceptualLoss,
    RecLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from vqmodels.quantize.options import resolve_options
from vqmodels.quantize.quantizer import VectorQuantizer

DEFAULT_MULT = {2: (1, 2), 4: (1, 2, 2), 8: (1, 1, 2, 4), 16: (1, 1, 2, 2, 4)}


@dataclass
class TokenizerConfig(FromDict):
    """Architecture, quantizer and loss settings of a `Tokenizer`; stored in every checkpoint."""

    in_channels: int = 3  # image channels
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    downsample: int = 8  # image side / token-grid side: 2, 4, 8 or 16
    channel_mult: tuple[int, ...] | None = None  # one per level (log2(downsample) + 1); None = VQGAN's
    num_res_blocks: int = 2  # residual blocks per level (decoder uses one more, as VQGAN)
    attention: bool = True  # self-attention in the mid blocks (lowest resolution)
    dropout: float = 0.0
    code_dim: int = 32  # quantizer dimension (a low-dim lookup keeps codebook usage high, Yu et al. 2022)
    codebook_size: int = 1024
    quantizer_preset: str | None = "default"  # a name in vqmodels.quantize.options.PRESETS
    quantizer: dict[str, Any] = field(default_factory=dict)  # QuantizerOptions fields; override the preset
    rec_loss: RecLoss = "l1"
    rec_weight: float = 1.0
    quant_weight: float = 1.0
    adv_weight: float = 0.0  # 0 = no discriminator at all
    adv_loss: AdvLoss = "hinge"
    adv_start: int = 0  # step at which the discriminator and the generator's GAN term switch on
    adv_warmup: int = 0  # steps of linear ramp of the GAN weight after adv_start (0 = full at once)
    adv_adaptive: bool = True  # VQGAN's adaptive weight from the decoder's last-layer gradient norms
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0  # > 0 needs perceptual_path (no weights are downloaded)
    perceptual_path: str | None = None  # VGG16 state dict (torchvision layout)
    perceptual_lpips_path: str | None = None  # optional LPIPS linear weights (lpips' vgg.pth)

    def __post_init__(self) -> None:
        if self.downsample not in DEFAULT_MULT:
            raise ValueError(f"downsample: must be one of {sorted(DEFAULT_MULT)}, got {self.downsample}")
        if self.channel_mult is None:
            self.channel_mult = DEFAULT_MULT[self.downsample]
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        levels = int(math.log2(self.downsample)) + 1
        if len(self.channel_mult) != levels or min(self.channel_mult) < 1:
            raise ValueError(
                f"channel_mult: downsample {self.downsample} needs {levels} positive entries, got {self.channel_mult}"
            )
        for name in ("in_channels", "channels", "num_res_blocks", "code_dim", "codebook_size", "disc_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss: {self.rec_loss!r} is not one of ['l1', 'l2']")
        if self.adv_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"adv_loss: {self.adv_loss!r} is not one of ['hinge', 'non_saturating']")
        for name in ("adv_weight", "perceptual_weight", "adv_start", "adv_warmup", "rec_weight", "quant_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.perceptual_weight > 0 and not self.perceptual_path:
            raise ValueError(
                "perceptual_path: perceptual_weight > 0 needs a VGG16 weights file given by path "
                "(vqtrain never downloads weights)"
            )
        try:
            resolve_options(self.quantizer_preset, **self.quantizer)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantizer: {e}") from e

    @classmethod
    def debug(cls, **overrides: Any) -> TokenizerConfig:
        """A tiny CPU-friendly tokenizer (32×32 images → 8×8 tokens over 64 codes) for tests and demos."""
        base: dict[str, Any] = dict(
            channels=16, downsample=4, channel_mult=(1, 2, 2), num_res_blocks=1, code_dim=8, codebook_size=64,
            disc_channels=16, disc_layers=2,
        )
        return cls(**{**base, **overrides})


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W)
    indices: torch.Tensor  # (B, h, w) long
    losses: dict[str, torch.Tensor]  # "rec", "quant", ["perceptual"], ["adv"], "total" (backward this one)
    metrics: dict[str, torch.Tensor]  # detached 0-d tensors: quantizer metrics, "psnr", ["adv_weight"]


class DiscriminatorOutput(NamedTuple):
    loss: torch.Tensor  # backward this one with the discriminator's optimiser
    metrics: dict[str, torch.Tensor]


class Encoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        mult = c.channel_mult or ()
        ch = c.channels * mult[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for i, m in enumerate(mult):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, c.channels * m, c.dropout))
                ch = c.channels * m
            if i < len(mult) - 1:
                blocks.append(Downsample(ch))
        attn: nn.Module = AttnBlock(ch) if c.attention else nn.Identity()
        blocks += [ResBlock(ch, ch, c.dropout), attn, ResBlock(ch, ch, c.dropout)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, c.code_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(nn.functional.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        mult = c.channel_mult or ()
        ch = c.channels * mult[-1]
        self.conv_in = nn.Conv2d(c.code_dim, ch, 3, padding=1)
        attn: nn.Module = AttnBlock(ch) if c.attention else nn.Identity()
        blocks: list[nn.Module] = [ResBlock(ch, ch, c.dropout), attn, ResBlock(ch, ch, c.dropout)]
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(ch, c.channels * m, c.dropout))
                ch = c.channels * m
            if i > 0:
                blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)  # the adaptive GAN weight's "last layer"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(nn.functional.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class Tokenizer(SavesConfig, nn.Module):
    """Image ↔ token-grid autoencoder. Images are float in [-1, 1], channels first.

    `discriminator` overrides whether the patch discriminator is built (default: when adv_weight > 0);
    `vqmodels.load` builds without it for checkpoints saved with `inference_only=True`.
    """

    def __init__(self, config: TokenizerConfig, *, discriminator: bool | None = None):
        super().__init__()
        c = self.config = config
        self.encoder = Encoder(c)
        self.quantizer = VectorQuantizer(c.code_dim, c.codebook_size, preset=c.quantizer_preset, **c.quantizer)
        self.decoder = Decoder(c)
        build_disc = c.adv_weight > 0 if discriminator is None else discriminator
        self.discriminator = PatchDiscriminator(c.in_channels, c.disc_channels, c.disc_layers) if build_disc else None
        self._perceptual: list[PerceptualLoss] = []  # loaded on first use; kept out of state_dict on purpose

    # -- inference ------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → token indices (B, H/f, W/f), f = config.downsample."""
        self._check_images(images)
        return self.quantizer(self.encoder(images).permute(0, 2, 3, 1)).indices

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices (B, h, w) → images (B, C, h·f, w·f) (not clamped; clamp to [-1, 1] for display)."""
        if tokens.dim() != 3 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor (B, h, w), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.codebook_size):
            raise ValueError(f"tokens: indices must lie in [0, {self.config.codebook_size})")
        z = self.quantizer.codes_to_vectors(tokens.long())
        return self.decoder(z.permute(0, 3, 1, 2))

    # -- training -------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, step: int = 0, grad_scale: float = 1.0) -> TokenizerOutput:
        """Reconstruct and return the generator-side losses; backward `losses["total"]`.

        `grad_scale`: the GradScaler's current scale when training under fp16 autocast (for the adaptive GAN
        weight, see `adaptive_weight`)."""
        self._check_images(images)
        c = self.config
        q = self.quantizer(self.encoder(images).permute(0, 2, 3, 1))
        rec = self.decoder(q.z_q.permute(0, 3, 1, 2))
        losses = {"rec": reconstruction_loss(rec, images, c.rec_loss), "quant": q.loss}
        nll = c.rec_weight * losses["rec"]
        if c.perceptual_weight > 0:
            losses["perceptual"] = self.perceptual_net(images.device)(rec, images)
            nll = nll + c.perceptual_weight * losses["perceptual"]
        total = nll + c.quant_weight * q.loss
        metrics = {k: v.detach() for k, v in q.metrics.items()}
        mse = (rec.detach().float() - images.float()).pow(2).mean()
        metrics["psnr"] = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
        factor = self.adversarial_factor(step)
        if factor > 0:
            g = generator_loss(self._frozen_discriminator(rec), c.adv_loss)
            losses["adv"] = g
            w = torch.ones((), device=images.device)
            if c.adv_adaptive and self.training and torch.is_grad_enabled() and g.requires_grad:
                w = adaptive_weight(nll, g, self.decoder.conv_out.weight, grad_scale=grad_scale)
            weight = w * c.adv_weight * factor
            metrics["adv_weight"] = weight.detach()
            total = total + weight * g
        losses["total"] = total
        return TokenizerOutput(rec, q.indices, losses, metrics)

    def discriminator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int = 0) -> DiscriminatorOutput:
        """The discriminator's loss on real images vs (detached) reconstructions, scaled by the start factor.

        Before `adv_start` the loss is 0 but still connected to the discriminator (safe to backward under
        DDP); a loop may skip the call entirely while `adversarial_factor(step) == 0`.
        """
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss: this tokenizer has no discriminator (adv_weight is 0 or it was "
                               "loaded from an inference-only checkpoint)")
        real = self.discriminator(images)
        fake = self.discriminator(reconstruction.detach())
        factor = 1.0 if self.adversarial_factor(step) > 0 else 0.0
        loss = factor * discriminator_loss(real, fake, self.config.adv_loss)
        metrics = {"logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
        return DiscriminatorOutput(loss, metrics)

    def adversarial_factor(self, step: int) -> float:
        """0 before `adv_start` (or without a GAN), then a linear ramp over `adv_warmup` steps up to 1."""
        c = self.config
        if c.adv_weight <= 0 or step < c.adv_start:
            return 0.0
        if c.adv_warmup <= 0:
            return 1.0
        return min(1.0, (step - c.adv_start + 1) / c.adv_warmup)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything but the discriminator: what the generator's optimiser should own."""
        return [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]

    def perceptual_net(self, device: torch.device | str | None = None) -> PerceptualLoss:
        """The frozen perceptual network, loaded from `perceptual_path` on first use (clear error if absent)."""
        c = self.config
        if not c.perceptual_path:
            raise ValueError("perceptual_path: no perceptual weights configured")
        if not self._perceptual:
            self._perceptual.append(PerceptualLoss(c.perceptual_path, c.perceptual_lpips_path))
        net = self._perceptual[0]
        if device is not None and net.shift.device != torch.device(device):
            self._perceptual[0] = net = net.to(device)
        return net

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """D(images) with gradients to the images only: the generator step must not train D."""
        if self.discriminator is None:
            raise RuntimeError("adv_weight > 0 but this tokenizer has no discriminator (inference-only checkpoint)")
        params = {n: p.detach() for n, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (images,))

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.config.downsample, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images: expected (B, {c}, H, W) with H and W divisible by {f}, got {tuple(images.shape)}"
            )

    # -- persistence ----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """JSON-able config with the quantizer options fully resolved (no dependence on preset contents)."""
        data = super().config_dict()
        data["channel_mult"] = list(self.config.channel_mult or ())
        data["quantizer_preset"] = None
        data["quantizer"] = dataclasses.asdict(self.quantizer.options)
        return data

