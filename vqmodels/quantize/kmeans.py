"""Nearest-code search and k-means (k-means++ seeding + Lloyd), on CPU or GPU.

The search works on row chunks: `||c||^2 - 2 z.c` for a block of rows stays in cache and the
argmin follows immediately, instead of materialising the full N x K distance matrix. A block holds at most
BLOCK_ELEMENTS distances, so memory stays bounded at any codebook size (262,144 codes: 16 rows a block).

k-means++ seeding draws one centre at a time up to EXACT_SEEDING codes; beyond, it draws them in
SEEDING_ROUNDS batches, each by the same D² rule against the centres drawn so far (as k-means|| does), so
seeding costs about one Lloyd step whatever K is.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 22  # distances per block (16 MiB in fp32)
EXACT_SEEDING = 4096  # codes up to which k-means++ draws centres one by one
SEEDING_ROUNDS = 8


def block_rows(k: int, chunk_size: int = 4096) -> int:
    """Rows per block of an N × k distance computation: `chunk_size`, fewer when k is large."""
    return max(1, min(chunk_size, BLOCK_ELEMENTS // max(1, k)))


def _blocked_min(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(min over codes of |c|^2 - 2 z.c, its index) for each row of z, in blocks of `block_rows` rows.
    min(1) gives the same index as argmin (first minimum), with a faster kernel on CPU."""
    c_sq = codebook.pow(2).sum(1)
    ct = codebook.t()
    rows = block_rows(codebook.shape[0], chunk_size)
    if z.shape[0] <= rows:
        return torch.addmm(c_sq, z, ct, alpha=-2.0).min(1)
    values = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    indices = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], rows):
        block = z[start : start + rows]
        best = torch.addmm(c_sq, block, ct, alpha=-2.0).min(1)
        values[start : start + block.shape[0]] = best.values
        indices[start : start + block.shape[0]] = best.indices
    return values, indices


def nearest(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest code (squared l2) for each row of z: (N, d) x (K, d) -> (N,) long."""
    return _blocked_min(z, codebook, chunk_size)[1]


def sq_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Full (N, K) squared distances; used where every distance is needed (soft EM)."""
    d = torch.addmm(codebook.pow(2).sum(1), z, codebook.t(), alpha=-2.0)
    return (d + z.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)


def nearest_sq_distance(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared distance of each row of z to its nearest code, (N,), in bounded blocks."""
    return (_blocked_min(z, codebook)[0] + z.pow(2).sum(1)).clamp_min_(0.0)


def sampled_seeding(x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    rounds: int = SEEDING_ROUNDS) -> torch.Tensor:
    """k-means++'s D² rule in `rounds` batches: the first centre uniformly, then each batch of about k/rounds
    centres drawn without replacement with probability ∝ squared distance to the centres so far."""
    n = x.shape[0]
    chosen = [torch.randint(n, (1,), generator=generator, device="cpu")]
    closest = (x - x[chosen[0].item()]).pow(2).sum(1)
    remaining = k - 1
    for r in range(rounds):
        m = remaining if r == rounds - 1 else min(remaining, -(-remaining // (rounds - r)))
        if m == 0:
            break
        probs = closest.float().cpu()
        probs = probs if float(probs.sum()) > 0 else torch.ones_like(probs)
        pick = torch.multinomial(probs, m, replacement=m > int((probs > 0).sum()), generator=generator)
        chosen.append(pick)
        closest = torch.minimum(closest, nearest_sq_distance(x, x[pick.to(x.device)]))
        remaining -= m
    return x[torch.cat(chosen).to(x.device)].clone()


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far (in batches beyond
    EXACT_SEEDING codes: `sampled_seeding`)."""
    if k > EXACT_SEEDING:
        return sampled_seeding(x, k, generator)
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
        if k > EXACT_SEEDING:  # every point is a centre already: seeding and Lloyd would only cost N × K
            centres = x[:k].clone()
            return torch.nn.functional.normalize(centres, dim=1) if spherical else centres
    centres = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign = nearest(x, centres, chunk_size)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, assign, torch.ones_like(assign, dtype=x.dtype))
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centres = torch.nn.functional.normalize(centres, dim=1)
    return centres
