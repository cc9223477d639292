"""LPIPS (Zhang et al. 2018) on VGG16 or AlexNet, from the standard weight files the user names.

Two files make the metric: the backbone as torchvision saves it (`vgg16-397923af.pth` or
`alexnet-owt-7be5be79.pth`, `features.*` keys) and LPIPS's linear layers (`weights/v0.1/vgg.pth` or
`alex.pth` from the lpips package, `lin0.model.1.weight` ...). A single file holding both key sets works
too. The backbone is rebuilt here layer for layer (torchvision cannot be imported beside the CPU build of
torch on some machines), so the same files give the lpips package's numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vqmodels.metrics.weights import load_state

# (layer list, tap indices after which features are taken, channels at the taps)
_VGG16 = ([("c", 64, 3, 1, 1), ("c", 64, 3, 1, 1), ("m", 2, 2), ("c", 128, 3, 1, 1), ("c", 128, 3, 1, 1), ("m", 2, 2)]
          + [("c", 256, 3, 1, 1)] * 3 + [("m", 2, 2)] + [("c", 512, 3, 1, 1)] * 3 + [("m", 2, 2)]
          + [("c", 512, 3, 1, 1)] * 3)
_ALEX = [("c", 64, 11, 4, 2), ("m", 3, 2), ("c", 192, 5, 1, 2), ("m", 3, 2), ("c", 384, 3, 1, 1), ("c", 256, 3, 1, 1),
         ("c", 256, 3, 1, 1)]
NETS = {
    "vgg": (_VGG16, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),  # relu1_2 ... relu5_3
    "alex": (_ALEX, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),  # relu1 ... relu5
}


def backbone(net: str) -> nn.Sequential:
    """The `features` part of torchvision's vgg16 / alexnet, same indices (so its state dict loads)."""
    layers: list[nn.Module] = []
    ch = 3
    for kind, *args in NETS[net][0]:
        if kind == "m":
            layers.append(nn.MaxPool2d(args[0], args[1]))
        else:
            cout, k, s, p = args
            layers += [nn.Conv2d(ch, cout, k, stride=s, padding=p), nn.ReLU(inplace=False)]
            ch = cout
    return nn.Sequential(*layers)


def _net_of(state: dict[str, torch.Tensor]) -> str | None:
    first = state.get("features.0.weight", state.get("net.slice1.0.weight"))
    if first is None:
        return None
    return "alex" if first.shape[-1] == 11 else "vgg"


class LPIPS(nn.Module):
    """Per-image LPIPS distance of images in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"lpips net must be one of {sorted(NETS)}, got {net!r}")
        self.net_name = net
        self.features = backbone(net)
        self.tap_indices, channels = NETS[net][1], NETS[net][2]
        for i, c in enumerate(channels):
            self.register_buffer(f"lin{i}", torch.full((1, c, 1, 1), 1.0 / c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def load_files(self, backbone_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor] | None,
                   field: str = "lpips_weights") -> LPIPS:
        """Load torchvision `features.*` weights and LPIPS `lin*` weights (None: every channel 1/C)."""
        feats = {k.removeprefix("features."): v for k, v in backbone_state.items() if k.startswith("features.")}
        expected = self.features.state_dict()
        missing = sorted(set(expected) - set(feats))
        if missing or any(feats[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(f"{field}: not torchvision {self.net_name} weights (missing or mis-shaped {missing[:3]}...; "
                             "expected keys like 'features.0.weight')")
        self.features.load_state_dict({k: feats[k] for k in expected})
        if linear_state is not None:
            found = {int(m.group(1)): v for k, v in linear_state.items() if (m := re.match(r"^lin(\d)\.(?:model\.\d+\.)?weight$", k))}
            if sorted(found) != list(range(len(self.tap_indices))):
                raise ValueError(f"{field}: the LPIPS linear weights lack lin0..lin4 (keys like 'lin0.model.1.weight')")
            for i in range(len(self.tap_indices)):
                buf = getattr(self, f"lin{i}")
                buf.copy_(found[i].reshape(buf.shape).float())
        return self

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised features at the five taps (images in [-1, 1])."""
        out, x = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_indices:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
                if i == self.tap_indices[-1]:
                    break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) distances between images `a` and `b` (N, 3, H, W) in [-1, 1]."""
        total = a.new_zeros(a.shape[0])
        for i, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
            total = total + ((fa - fb) ** 2 * getattr(self, f"lin{i}")).sum(1).mean((1, 2))
        return total


def load_lpips(paths: str | Path | list[str | Path], field: str = "lpips_weights") -> LPIPS:
    """LPIPS from [backbone, linear] files, or one file holding both; the net (vgg / alex) is read off
    the backbone's first layer."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not 1 <= len(files) <= 2:
        raise ValueError(f"{field}: give the backbone weights and the LPIPS linear weights (one or two files)")
    states = [load_state(f, field) for f in files]
    back = next((s for s in states if _net_of(s)), None)
    if back is None:
        raise ValueError(f"{field}: none of {[str(f) for f in files]} holds torchvision vgg16/alexnet weights")
    lin = next((s for s in states if any(re.match(r"^lin\d\.", k) for k in s)), None)
    if lin is None:
        raise ValueError(f"{field}: none of {[str(f) for f in files]} holds LPIPS linear layers (lin0..lin4); "
                         "without them the number is not LPIPS")
    return LPIPS(_net_of(back) or "vgg").load_files(back, lin, field)
