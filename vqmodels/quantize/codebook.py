"""The codebook and its re-parameterisations: plain, SimVQ, and affine (learned or running).

The quantizer only ever sees the *effective* codebook (what vectors are matched against and
decoded from). Writes (k-means init, replacement, EMA) are given in effective space and mapped
back through the inverse re-parameterisation here, so every option composes with every writer.
"""

from __future__ import annotations

import torch
from torch import nn

from vqmodels.quantize import dist
from vqmodels.quantize.options import QuantizerOptions


class Codebook(nn.Module):
    """K codes of size d. `forward()` returns the effective (K, d) codebook."""

    def __init__(self, dim: int, codebook_size: int, opts: QuantizerOptions):
        super().__init__()
        if codebook_size % opts.affine_groups:
            raise ValueError(
                f"affine_groups: {opts.affine_groups} must divide codebook_size {codebook_size}"
            )
        self.dim, self.size, self.opts = dim, codebook_size, opts
        self.groups = opts.affine_groups
        init = torch.randn(codebook_size, dim)
        if opts.codebook == "simvq":
            # SimVQ: a frozen random basis C, the codebook is C W^T with one learned linear layer.
            self.register_buffer("frozen", init * dim**-0.5)
            self.proj = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.proj.weight)
        elif opts.update == "gradient":
            self.weight = nn.Parameter(init)
        else:  # EMA / soft EM own the codebook: a buffer, so no optimiser can update it twice
            self.register_buffer("weight", init)
        if opts.affine == "learned":
            self.affine_scale = nn.Parameter(torch.zeros(self.groups, dim))
            self.affine_bias = nn.Parameter(torch.zeros(self.groups, dim))
        elif opts.affine == "running":
            self.register_buffer("z_mean", torch.zeros(dim))
            self.register_buffer("z_var", torch.ones(dim))
            self.register_buffer("c_mean", torch.zeros(self.groups, dim))
            self.register_buffer("c_var", torch.ones(self.groups, dim))
            self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))

    # -- reading -------------------------------------------------------------------------------
    def raw(self) -> torch.Tensor:
        if self.opts.codebook == "simvq":
            return self.proj(self.frozen)
        if isinstance(self.weight, nn.Parameter):
            # c = lr * w: Adam's step on w is scale-free, so this multiplies the codes' step by lr
            return self.weight * self.opts.codebook_lr if self.opts.codebook_lr != 1.0 else self.weight
        # EMA rewrites this buffer in place after the forward; autograd must keep the old values
        return self.weight.clone()

    def affine_params(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-group (scale, bias), each (G, d); None without affine."""
        if self.opts.affine == "learned":
            lr = self.opts.affine_lr  # a true lr multiplier, also under Adam: scale = 1 + lr * s
            return 1.0 + lr * self.affine_scale, lr * self.affine_bias
        if self.opts.affine == "running":
            scale = (self.z_var / (self.c_var + 1e-8)).sqrt()
            return scale, self.z_mean - scale * self.c_mean
        return None

    def forward(self) -> torch.Tensor:
        c = self.raw()
        ab = self.affine_params()
        if ab is None:
            return c
        scale, bias = ab
        grouped = c.view(self.groups, -1, self.dim)
        return (grouped * scale[:, None] + bias[:, None]).reshape(self.size, self.dim)

    def to_raw(self, vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Map effective-space vectors assigned to `codes` back into raw codebook space."""
        ab = self.affine_params()
        if ab is None:
            return vectors
        scale, bias = (p.detach() for p in ab)
        g = codes * self.groups // self.size
        return (vectors - bias[g]) / scale[g]

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def gauss_newton_diag(self, counts: torch.Tensor) -> dict[int, torch.Tensor]:
        """Diagonal of the Gauss-Newton matrix of 1/2 sum_i |c'_{k(i)} - z_i|^2 for each trainable
        parameter (keyed by id), given the number of vectors assigned to each code."""
        out: dict[int, torch.Tensor] = {}
        raw = self.raw().detach()
        ab = self.affine_params()
        n = counts.view(self.groups, -1, 1)  # (G, K/G, 1)
        if self.opts.codebook == "simvq":
            # c'_k = W C_k: d c'_ki / d W_ij = C_kj
            out[id(self.proj.weight)] = (counts[:, None] * self.frozen.pow(2)).sum(0)[None, :]
        elif isinstance(self.weight, nn.Parameter):
            scale2 = ab[0].detach().pow(2)[:, None] if ab is not None else raw.new_ones(1, 1, 1)
            scale2 = scale2 * self.opts.codebook_lr**2  # dc/dw = lr
            out[id(self.weight)] = (n * scale2).expand(self.groups, -1, self.dim).reshape(self.size, self.dim)
        if self.opts.affine == "learned":
            lr2 = self.opts.affine_lr**2
            grouped = raw.view(self.groups, -1, self.dim)
            out[id(self.affine_scale)] = lr2 * (n * grouped.pow(2)).sum(1)
            out[id(self.affine_bias)] = lr2 * n.sum(1).expand(-1, self.dim)
        return out

    # -- writing (no autograd) -----------------------------------------------------------------
    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, vectors: torch.Tensor) -> None:
        """Make the effective codes `codes` equal `vectors` (given in effective space)."""
        raw = self.to_raw(vectors, codes)
        # .data: a replacement inside the forward must not invalidate the graph built so far
        # (replaced codes had no assignment, so no gradient depends on their old values)
        if self.opts.codebook == "simvq":
            # C[codes] W^T = raw  =>  C[codes] = raw (W^T)^+
            # LAPACK results can depend on memory alignment: solve on rank 0, broadcast the rows
            rows = raw @ torch.linalg.pinv(self.proj.weight.t())
            self.frozen.data[codes] = dist.broadcast_(rows.contiguous())
        else:
            self.weight.data[codes] = raw / self.opts.codebook_lr

    @torch.no_grad()
    def set_all(self, vectors: torch.Tensor) -> None:
        """Initialise the whole effective codebook to `vectors` (k-means init)."""
        if self.opts.affine == "running":
            # Identity transform at init: codebook statistics equal the target's.
            self.c_mean.copy_(vectors.view(self.groups, -1, self.dim).mean(1))
            self.c_var.copy_(vectors.view(self.groups, -1, self.dim).var(1, unbiased=False))
            self.z_mean.copy_(vectors.mean(0))
            self.z_var.copy_(vectors.var(0, unbiased=False))
            self.stats_ready.fill_(True)
        if self.opts.codebook == "simvq":
            # least squares: frozen @ W^T = vectors
            w_t = torch.linalg.lstsq(self.frozen.float(), vectors.float()).solution
            self.proj.weight.copy_(dist.broadcast_(w_t.t().contiguous()))  # one rank's solve for all
            return
        self.set_codes(torch.arange(self.size, device=vectors.device), vectors)

    @torch.no_grad()
    def update_running_stats(self, z_sum: torch.Tensor, z_sqsum: torch.Tensor, n: torch.Tensor) -> None:
        """EMA of the inputs' and the codebook's per-feature mean/variance (inputs already reduced
        over all ranks, so every rank computes the same statistics)."""
        # device-side throughout (no .item(): a sync per step on a GPU): nothing changes when n == 0
        has = n > 0
        n = n.clamp_min(1)
        mean = z_sum / n
        var = (z_sqsum / n - mean.pow(2)).clamp_min(0.0)
        raw = self.raw().detach().view(self.groups, -1, self.dim)
        c_mean, c_var = raw.mean(1), raw.var(1, unbiased=False)
        m = torch.where(self.stats_ready, self.opts.affine_momentum, 1.0) * has
        self.z_mean.lerp_(mean, m)
        self.z_var.lerp_(var, m)
        self.c_mean.lerp_(c_mean, m)
        self.c_var.lerp_(c_var, m)
        self.stats_ready |= has
