"""Nearest-code search and k-means (k-means++ seeding + Lloyd), on CPU or GPU.

The search works on row chunks: `||c||^2 - 2 z.c` for a block of rows stays in cache and the
argmin follows immediately, instead of materialising the full N x K distance matrix.
"""

from __future__ import annotations

import torch


def nearest(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest code (squared l2) for each row of z: (N, d) x (K, d) -> (N,) long."""
    c_sq = codebook.pow(2).sum(1)
    ct = codebook.t()
    # min(1).indices: the same index as argmin (first minimum), but a faster kernel on CPU
    if z.shape[0] <= chunk_size:
        return torch.addmm(c_sq, z, ct, alpha=-2.0).min(1).indices
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        block = z[start : start + chunk_size]
        out[start : start + block.shape[0]] = torch.addmm(c_sq, block, ct, alpha=-2.0).min(1).indices
    return out


def sq_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Full (N, K) squared distances; used where every distance is needed (soft EM)."""
    d = torch.addmm(codebook.pow(2).sum(1), z, codebook.t(), alpha=-2.0)
    return (d + z.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centres = x.new_empty((k, x.shape[1]))
    centres[0] = x[first]
    closest = (x - centres[0]).pow(2).sum(1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point already coincides with a centre: draw uniformly
            probs = torch.ones_like(closest)
        else:
            probs = closest / total
        j = torch.multinomial(probs.float().cpu(), 1, generator=generator).item()
        centres[i] = x[j]
        closest = torch.minimum(closest, (x - centres[i]).pow(2).sum(1))
    return centres


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    spherical: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """k-means++ then `iters` Lloyd steps; empty clusters keep their centre.

    With fewer points than centres the points are repeated with a little noise so that every
    centre is distinct. `spherical` re-normalises centres (cosine distance).
    """
    if x.shape[0] < k:
        reps = -(-k // x.shape[0])
        noise = torch.randn(x.shape[0] * reps, x.shape[1], generator=generator).to(x)
        x = x.repeat(reps, 1) + 1e-3 * x.std().clamp_min(1e-6) * noise
    centres = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign = nearest(x, centres, chunk_size)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centres = torch.nn.functional.normalize(centres, dim=1)
    return centres
