"""Pictures logged to MLflow: image grids, the codebook-usage histogram, and the 2-D projection of
encoder outputs, codebook and used codes (the picture Huh et al. 2023 use to show index collapse:
a collapsed codebook leaves most codes far from the encoder outputs, unused).

Matplotlib with the Agg backend only (workers have no display).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Stack rows of images (each (N, 3, H, W) in [-1, 1]) into one uint8 grid, e.g. inputs above
    their reconstructions."""
    arrays = [to_uint8(r) for r in rows]
    n = max(a.shape[0] for a in arrays)
    h, w = arrays[0].shape[1:3]
    grid = np.full((len(arrays) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrays):
        for j in range(a.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = a[j]
    return grid


def usage_histogram(counts: torch.Tensor, step: int) -> Figure:
    """Codes sorted by how often they were picked on the eval split (log scale): a flat curve is a
    healthy codebook, a cliff is index collapse."""
    c = counts.detach().double().cpu()
    total = float(c.sum())
    p = c / max(total, 1.0)
    used = int((c > 0).sum())
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if total > 0 else 0.0
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(c)), np.sort(c.numpy())[::-1] + 1e-9, width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("code (sorted by count)")
    ax.set_ylabel("count")
    ax.set_title(f"step {step}: {used}/{len(c)} codes used, perplexity {perplexity:.1f}")
    fig.tight_layout()
    return fig


def pca_2d(*arrays: torch.Tensor) -> list[np.ndarray]:
    """Project several point sets with one PCA fitted on all of them together."""
    joint = torch.cat([a.detach().float().cpu() for a in arrays])
    mean = joint.mean(0, keepdim=True)
    # the top-2 right singular vectors of the centred data; torch.linalg.svd is exact and small here
    _, _, vh = torch.linalg.svd(joint - mean, full_matrices=False)
    basis = vh[:2].T
    return [((a.detach().float().cpu() - mean) @ basis).numpy() for a in arrays]


def codebook_projection(encodings: torch.Tensor, codebook: torch.Tensor, used: torch.Tensor, step: int) -> Figure:
    """Encoder outputs (P), the codebook (C) and the codes actually used (Q) in one 2-D PCA."""
    used = used.bool().cpu()
    p, c = pca_2d(encodings, codebook)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.25, color="tab:gray", label="encoder outputs")
    ax.scatter(c[~used.numpy(), 0], c[~used.numpy(), 1], s=8, marker="x", color="tab:blue", label="unused codes")
    ax.scatter(c[used.numpy(), 0], c[used.numpy(), 1], s=10, color="tab:red", label="used codes")
    ax.set_title(f"step {step}: {int(used.sum())}/{len(used)} codes used")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig
