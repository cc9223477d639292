"""Tokenizer losses: reconstruction, patch-GAN adversarial terms with VQGAN's adaptive weight, perceptual.

The perceptual loss is built only from weights the user provides by path (a VGG16 `features` state dict,
e.g. torchvision's `vgg16-397923af.pth`, and optionally LPIPS's linear-layer file `vgg.pth`): nothing is
downloaded at run time, so a training job on an air-gapped cluster behaves exactly like one on a laptop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqmodels.layers import group_norm
from vqmodels.metrics.lpips import backbone
from vqmodels.metrics.weights import load_state

RecLoss = Literal["l1", "l2"]
AdvLoss = Literal["hinge", "non_saturating"]


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: RecLoss = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error per element."""
    if kind == "l1":
        return (reconstruction - target).abs().mean()
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"rec_loss: {kind!r} is not one of ['l1', 'l2']")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, as in VQGAN) with GroupNorm instead of BatchNorm.

    GroupNorm keeps the discriminator stateless in forward (no running statistics to sync across DDP ranks
    or to corrupt when the generator's pass goes through it).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch real/fake logits, shape (B, 1, h', w')."""
        return self.net(images)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: AdvLoss = "hinge") -> torch.Tensor:
    """Discriminator objective: hinge (Lim & Ye 2017) or non-saturating logistic (Goodfellow et al. 2014)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    raise ValueError(f"adv_loss: {kind!r} is not one of ['hinge', 'non_saturating']")


def generator_loss(fake_logits: torch.Tensor, kind: AdvLoss = "hinge") -> torch.Tensor:
    """Generator side: -E[D(x̂)] for hinge (as VQGAN), softplus(-D(x̂)) for non-saturating."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"adv_loss: {kind!r} is not one of ['hinge', 'non_saturating']")


def adaptive_weight(
    nll_loss: torch.Tensor,
    gen_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """VQGAN's λ = |∇_L nll| / (|∇_L g| + 1e-4) at the decoder's last layer L, detached.

    It scales the GAN gradient to the reconstruction gradient's size, which is what keeps the decoder from
    being torn apart when the discriminator switches on. Under fp16 autocast pass the GradScaler's scale as
    `grad_scale`: these two backward passes bypass the scaler, and unscaled fp16 gradients of a mean over
    millions of pixels round to zero (λ would silently become 0). A gradient that overflows at that scale is
    taken again at a smaller one; λ itself does not depend on the scale.
    """
    w = _grad_norm(nll_loss, last_layer, grad_scale) / (_grad_norm(gen_loss, last_layer, grad_scale) + 1e-4)
    return torch.where(w.isfinite(), w, 0.0).clamp(0.0, max_weight).detach()


def _grad_norm(loss: torch.Tensor, layer: torch.Tensor, scale: float) -> torch.Tensor:
    """|∇_layer loss|, computed on loss·scale (then divided back), stepping the scale down by 2⁸ while the
    scaled gradient overflows. At scale 1 (fp32, bf16) it is one backward pass and never reads the device."""
    while True:
        norm = torch.autograd.grad(loss * scale, layer, retain_graph=True)[0].float().norm()
        if scale <= 1.0 or bool(norm.isfinite()):
            return norm / scale
        scale = max(1.0, scale / 256.0)


# ---------------------------------------------------------------------------------------------------------
# perceptual loss from user-provided weights

_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's `features` indices
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features: unit-normalise channels, squared difference, weight, average.

    Without LPIPS linear weights every channel gets weight 1/C (a plain normalised-VGG perceptual loss).
    The module is frozen; its weights are not part of the tokenizer's checkpoint.
    """

    def __init__(self, vgg_path: str | Path, lpips_path: str | Path | None = None):
        super().__init__()
        self.features = backbone("vgg")
        state = load_state(vgg_path, "perceptual_path")
        feats = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        feats = {k: v for k, v in feats.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) < 30}
        missing = sorted(set(self.features.state_dict()) - set(feats))
        if missing:
            raise ValueError(
                f"perceptual_path: {str(vgg_path)!r} is not a VGG16 state dict "
                f"(missing {missing[:4]}...; expected torchvision keys like 'features.0.weight')"
            )
        self.features.load_state_dict(feats)
        lins = [torch.full((1, c, 1, 1), 1.0 / c) for c in _TAP_CHANNELS]
        if lpips_path is not None:
            lstate = load_state(lpips_path, "perceptual_lpips_path")
            found = {int(m.group(1)): v for k, v in lstate.items() if (m := re.match(r"lin(\d)\..*weight$", k))}
            if sorted(found) != list(range(5)):
                raise ValueError(f"perceptual_lpips_path: {str(lpips_path)!r} lacks lin0..lin4 weights")
            lins = [found[i].reshape(1, c, 1, 1).float() for i, c in enumerate(_TAP_CHANNELS)]
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w, persistent=False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen feature extractor: always eval

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, x = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
                if i == _TAPS[-1]:
                    break
        return out

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean perceptual distance over the batch; images in [-1, 1]."""
        with torch.no_grad():
            target_taps = self._taps(target)
        total = reconstruction.new_zeros(())
        for i, (a, b) in enumerate(zip(self._taps(reconstruction), target_taps, strict=True)):
            total = total + ((a - b) ** 2 * getattr(self, f"lin{i}")).sum(1).mean()
        return total
