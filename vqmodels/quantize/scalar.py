"""Quantizers with an implicit codebook: FSQ and LFQ, the `method="fsq"` / `"lfq"` options of `VectorQuantizer`.

- FSQ (Mentzer et al. 2023, "Finite Scalar Quantization"): each of k = len(levels) dimensions is bounded by a
  shifted tanh and rounded to L_i levels with a straight-through gradient. The codebook is the grid of
  ∏ L_i points; nothing in it is learned, so no code can die.
- LFQ (Yu et al. 2023, MAGVIT-v2, "lookup-free quantization"): each of k dimensions becomes its sign, ±1,
  straight through; the codebook is the 2^k corners of the cube. An entropy loss keeps every code in use:
  `entropy_weight * (E_z[H(p(c|z))] - diversity * H(E_z[p(c|z)]))` with p(c|z) = softmax_c(-|z - c|² / T),
  plus a commitment term `commitment * |z - sg(q)|²`.

Both project `dim` to k and back with linear layers when they differ (as vector-quantize-pytorch does). No
state besides those layers: every rank computes the same function, DDP keeps the layers identical. The
codebook-entropy term is taken over each rank's own batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqmodels.quantize.options import QuantizerOptions, fsq_levels_for

ENTROPY_CHUNK_ELEMENTS = 1 << 22  # rows × (2^⌊k/2⌋ + 2^⌈k/2⌉) per block of the LFQ codebook-entropy pass (16 MiB)


def _code_probability_sum(log_p: torch.Tensor, log_q: torch.Tensor, split: int) -> torch.Tensor:
    """Σ_rows p(c|z) for every code c, as a (2^(k-split), 2^split) grid whose row-major order is the code index.

    p(c|z) is a product over dimensions, so it factors into the low `split` bits and the high ones:
    Σ_n p_low(c_low|z_n) p_high(c_high|z_n) is one matmul of two (rows, ~√K) probability tables. That costs
    rows × K multiply-adds, as the plain sum does, but only rows × 2√K exponentials and no rows × K tensor."""
    def table(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:  # (rows, 2^bits): every corner's probability
        n = lp.shape[-1]
        bits = ((torch.arange(2**n, device=lp.device).unsqueeze(-1) >> torch.arange(n, device=lp.device)) & 1)
        b = bits.to(lp.dtype)
        return (lp @ b.t() + lq @ (1 - b).t()).exp()

    low = table(log_p[:, :split], log_q[:, :split])
    high = table(log_p[:, split:], log_q[:, split:])
    return high.t() @ low


def _projections(dim: int, k: int) -> tuple[nn.Module, nn.Module]:
    if dim == k:
        return nn.Identity(), nn.Identity()
    return nn.Linear(dim, k), nn.Linear(k, dim)


class FSQ(nn.Module):
    """Finite scalar quantization to `levels` (each ≥ 2) per dimension; codes index the level grid."""

    def __init__(self, dim: int, levels: list[int] | tuple[int, ...]):
        super().__init__()
        self.levels = [int(x) for x in levels]
        self.codebook_size = math.prod(self.levels)
        self.project_in, self.project_out = _projections(dim, len(self.levels))
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.long), 0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z → (-L/2, L/2) per dimension, shifted for even L so that rounding gives exactly L values."""
        half_l = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Rounded to the grid, straight through, scaled to [-1, 1]: (..., k)."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (self._levels // 2)

    def codes_to_indices(self, q: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = (q * half + half).round().long()
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        digits = (idx.unsqueeze(-1) // self._basis) % self._levels.long()
        return (digits.float() - half) / half

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output (N, dim), indices (N,), loss) for rows z (N, dim). FSQ has no auxiliary loss."""
        q = self.quantize(self.project_in(z))
        return self.project_out(q), self.codes_to_indices(q.detach()), z.new_zeros(()) + 0.0 * q.sum()

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.indices_to_codes(idx))


class LFQ(nn.Module):
    """Lookup-free quantization to the signs of `bits` dimensions, with MAGVIT-v2's entropy loss."""

    def __init__(self, dim: int, bits: int, entropy_weight: float = 0.3, diversity: float = 1.0,
                 temperature: float = 0.1, commitment: float = 0.25):
        super().__init__()
        self.bits, self.codebook_size = bits, 2**bits
        self.entropy_weight, self.diversity, self.temperature, self.commitment = (
            entropy_weight, diversity, temperature, commitment)
        self.project_in, self.project_out = _projections(dim, bits)
        self.register_buffer("_mask", 2 ** torch.arange(bits), persistent=False)

    def indices_to_codes(self, idx: torch.Tensor) -> torch.Tensor:
        return ((idx.unsqueeze(-1) & self._mask) != 0).float() * 2 - 1

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-sample entropy E_z[H(p(c|z))], codebook entropy H(E_z[p(c|z)])) in nats, rows z (N, k).

        |z - c|² = |z|² + k - 2 z·c over the corners c ∈ {±1}^k, so p(c|z) is a product over dimensions of
        p(c_i = +1 | z) = sigmoid(4 z_i / T): the per-sample entropy is a sum of k binary entropies. The
        batch average of p(c|z) does not factor into dimensions; it is summed over all 2^k codes in row blocks,
        each block one matmul of the low-half and high-half corner probabilities (see _code_probability_sum)."""
        logit = 4 * z / self.temperature
        log_p, log_q = F.logsigmoid(logit), F.logsigmoid(-logit)  # log p(+1), log p(-1) per dimension
        per_sample = -(log_p.exp() * log_p + log_q.exp() * log_q).sum(-1).mean()
        split = self.bits // 2
        avg = z.new_zeros(2 ** (self.bits - split), 2**split)
        rows = max(1, ENTROPY_CHUNK_ELEMENTS // (2**split + 2 ** (self.bits - split)))
        for start in range(0, z.shape[0], rows):
            lp, lq = log_p[start : start + rows], log_q[start : start + rows]
            # recomputed in the backward pass: memory stays one block of probability tables
            avg = avg + checkpoint(_code_probability_sum, lp, lq, split, use_reentrant=False)
        avg = avg.flatten() / max(1, z.shape[0])
        codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
        return per_sample, codebook

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output (N, dim), indices (N,), loss) for rows z (N, dim)."""
        h = self.project_in(z)
        q = torch.where(h > 0, 1.0, -1.0).to(h.dtype)
        idx = ((q > 0).long() * self._mask).sum(-1)
        out = h + (q - h).detach()
        loss = self.commitment * F.mse_loss(h, q) if h.shape[0] else h.sum() * 0.0
        if self.training and self.entropy_weight and h.shape[0]:
            per_sample, codebook = self.entropy_terms(h)
            loss = loss + self.entropy_weight * (per_sample - self.diversity * codebook)
        return self.project_out(out), idx, loss

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.indices_to_codes(idx))


def scalar_quantizer(dim: int, codebook_size: int, o: QuantizerOptions) -> FSQ | LFQ:
    """The FSQ or LFQ layer of `o.method`; codebook_size must be what its levels or bits give."""
    if o.method == "fsq":
        return FSQ(dim, fsq_levels_for(o.fsq_levels, codebook_size))
    bits = codebook_size.bit_length() - 1
    if codebook_size < 2 or 2**bits != codebook_size:
        raise ValueError(f"codebook_size: LFQ has 2^bits codes, got {codebook_size} (not a power of two)")
    return LFQ(dim, bits, o.lfq_entropy_weight, o.lfq_diversity, o.lfq_temperature, o.lfq_commitment)
