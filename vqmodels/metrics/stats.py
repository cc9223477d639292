"""The maths of the field's metrics: streaming feature statistics, Fréchet distance, Inception Score,
PSNR and SSIM. The networks that make the features live beside this file.

Statistics stream: a split of any size is summarised by (count, sum, sum of outer products) in float64,
which add exactly across batches and ranks, so an evaluation on N workers gives the number one worker
gives. The Fréchet distance is computed as torch-fidelity computes it (eigenvalues of Σ1·Σ2), so on the
same features the two agree to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class GaussianStats:
    """Running mean and covariance of feature vectors (float64 sums; `add` is exact across ranks)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to(self.sum.device, torch.float64).reshape(-1, self.sum.shape[0])
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], object]) -> GaussianStats:
        """Sum over ranks with the caller's collective (each rank passes its own share)."""
        flat = torch.cat([self.n.view(1), self.sum, self.outer.view(-1)])
        all_reduce_sum(flat)
        d = self.sum.shape[0]
        self.n, self.sum, self.outer = flat[0], flat[1 : d + 1], flat[d + 1 :].view(d, d)
        return self

    @property
    def count(self) -> int:
        return int(self.n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance (numpy's `np.cov`), as float64 numpy arrays."""
        n = float(self.n)
        if n < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {int(n)}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()

    def save(self, path: str | Path, **meta: str) -> None:
        """`.npz` with `mu` and `sigma` (the layout clean-fid and ADM reference files use) plus the count."""
        mu, sigma = self.mean_cov()
        np.savez(path, mu=mu, sigma=sigma, n=np.int64(self.count), **{k: np.str_(v) for k, v in meta.items()})


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a reference-statistics `.npz` (ours, clean-fid's or ADM's: keys `mu` and `sigma`)."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"reference statistics {str(path)!r} lack 'mu' and 'sigma' (keys: {sorted(data.files)})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not fit")
    return mu, sigma


def reference_meta(path: str | Path) -> dict[str, str]:
    """The text fields a reference file carries besides mu/sigma (ours: n, source, image_size, weights_sha256)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: str(data[k]) for k in data.files if k not in ("mu", "sigma") and data[k].ndim == 0}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1Σ2), with tr √(Σ1Σ2) = Σ √λ over the eigenvalues of Σ1Σ2."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) ‖ p(y))) over `splits` parts of the shuffled samples (torch-fidelity's
    protocol: its seed, its split boundaries, logits without the fc bias)."""
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"inception score over {splits} splits needs at least {splits} samples, got {n}")
    x = logits[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = x.softmax(1), x.log_softmax(1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(0, keepdim=True)
        scores.append(float((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of images in [-1, 1] (peak-to-peak 2; an exact match is capped at 100 dB)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(4e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of images in [-1, 1], as everyone reports it (Wang et al. 2004; tf.image.ssim, pytorch-msssim):
    11-px Gaussian window, σ = 1.5, K = (0.01, 0.03) on the [0, 1] scale, valid region only, mean over the map
    and the channels. Plain torch (a separable Gaussian filter); the tests check it against pytorch-msssim and
    torchmetrics."""
    import torch.nn.functional as F

    x, y = ((a.float() + 1) / 2).clamp(0, 1), ((b.float() + 1) / 2).clamp(0, 1)
    win = min(11, x.shape[-1], x.shape[-2])
    win -= 1 - win % 2  # odd
    coords = torch.arange(win, dtype=torch.float32, device=x.device) - win // 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    c = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid (no padding) separable Gaussian, per channel
        t = F.conv2d(t, g.view(1, 1, 1, win).expand(c, 1, 1, win), groups=c)
        return F.conv2d(t, g.view(1, 1, win, 1).expand(c, 1, win, 1), groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim_map.flatten(2).mean(-1).mean(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (N, 3, H, W), rounded as PIL saves a picture (what reference packages read)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def entropy_bits(counts: torch.Tensor) -> float:
    """Shannon entropy (bits) of a histogram."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0


def bits_per_image(num_tokens: int, codebook_size: int) -> float:
    """What one image costs as tokens without entropy coding: tokens x log2(K)."""
    return num_tokens * math.log2(codebook_size)
