"""Random feature-network weights in the standard file formats, for tests (nothing is ever downloaded).

The Inception's batch-norm statistics are set from real activations so that its random features vary from
image to image as a trained network's do (with the defaults they shrink to ~1e-3 and every FID is ~0)."""

from __future__ import annotations

from pathlib import Path

import torch


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, size, size) test images with a per-image colour cast (so sets differ in distribution)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200
    return (base + torch.rand(n, 3, size, size, generator=g) * 55).round().to(torch.uint8)


def inception_file(path: Path, seed: int = 0) -> Path:
    from vqmodels.metrics.inception import FIDInception

    torch.manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative: one pass sets the statistics of that batch
    torch.nn.Module.train(net, True)  # FIDInception.train() always stays in eval mode
    with torch.no_grad():
        net(torch.cat([images(8, 10), images(8, 11, size=48)[:, :, :32, :32]]))
    torch.save(net.state_dict(), path)
    return path


def lpips_files(folder: Path, net: str = "vgg", seed: int = 0) -> list[Path]:
    """[torchvision-format backbone, lpips-format linear layers] with random weights."""
    from vqmodels.metrics.lpips import LPIPS

    torch.manual_seed(seed)
    model = LPIPS(net)
    torch.save({f"features.{k}": v for k, v in model.features.state_dict().items()}, folder / f"{net}-backbone.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, getattr(model, f"lin{i}").shape[1], 1, 1)
            for i in range(len(model.tap_indices))}
    torch.save(lins, folder / f"{net}-lin.pth")
    return [folder / f"{net}-backbone.pth", folder / f"{net}-lin.pth"]
