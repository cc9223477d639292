"""`VectorQuantizer`: one VQ layer carrying the known fixes for training VQ networks, correct under DDP.

Every codebook change (k-means init, EMA, dead-code replacement, running affine statistics, the
alternating step) is reduced or broadcast across ranks when a process group exists, so all ranks
hold identical codebooks. Every rank enters the same collectives in the same order whatever its
local batch (an empty one included): each branch that guards a collective depends only on the
step counter or on globally reduced values. No collective runs in eval mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqmodels.quantize import dist
from vqmodels.quantize.codebook import Codebook
from vqmodels.quantize.estimators import (
    fused_straight_through,
    rotation_trick,
    straight_through,
    synchronised,
)
from vqmodels.quantize.kmeans import kmeans, nearest, sq_distances
from vqmodels.quantize.options import QuantizerOptions, resolve_options
from vqmodels.quantize.scalar import FSQ, LFQ, scalar_quantizer

NEVER = -(2**40)  # "last used" step of a code that was never used
SOFT_EM_BLOCK = 1 << 26  # soft EM probabilities per block of rows (256 MiB in fp32): one block at the usual sizes


def code_counts(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Uses of each of k codes (long). Unlike `bincount`, which sizes its output from the data's maximum,
    this never waits for the GPU."""
    return torch.zeros(k, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # quantised vectors, shaped like the input
    indices: torch.Tensor  # long, input shape without the feature dimension
    loss: torch.Tensor  # scalar: commitment + codebook terms
    metrics: dict[str, torch.Tensor]  # detached 0-d tensors


class VectorQuantizer(nn.Module):
    """Vector quantizer over the last dimension.

    `VectorQuantizer(dim, codebook_size, preset=None, **options)`: options are the fields of
    `QuantizerOptions`; a preset fills in a named bundle and explicit options override it.
    Works with a plain optimiser over `model.parameters()`: codebooks that EMA updates are buffers,
    and the alternating step's codebook term is not applied a second time by the task loss.
    """

    def __init__(self, dim: int, codebook_size: int, preset: str | None = None, **options: Any):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.preset = preset
        self.options: QuantizerOptions = resolve_options(preset, **options)
        o = self.options
        self.scalar: FSQ | LFQ | None = None
        if o.method == "vq":
            self.codebook = Codebook(dim, codebook_size, o)
        else:
            self.scalar = scalar_quantizer(dim, codebook_size, o)
            if isinstance(self.scalar, FSQ):  # levels resolved from the paper's table are saved as such
                self.options = o = dataclasses.replace(o, fsq_levels=list(self.scalar.levels))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not o.kmeans_init))
        self.register_buffer("last_used", torch.full((codebook_size,), NEVER, dtype=torch.long))
        # uses per code since the last replacement on this rank (summed over ranks when replacing);
        # not persistent: a resumed run starts a fresh window
        self.register_buffer("window_count", torch.zeros(codebook_size), persistent=False)
        self.register_buffer("replaced_total", torch.zeros((), dtype=torch.long))
        if o.update in ("ema", "soft_em"):
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", self.codebook.weight.detach().clone())
        self._init_done = not o.kmeans_init
        self._step = 0  # `step` mirrored on the host: reading the buffer would wait for the GPU every forward
        self._window_start = 0  # step the current replacement window began (at 0, a replacement, a resume)
        self._resumed = False  # state was loaded: the next training forward starts a fresh window
        self._synced = False  # rank 0's random init is broadcast at the first training forward

    # -- public ------------------------------------------------------------------------------
    def effective_codebook(self) -> torch.Tensor:
        """The (K, dim) codebook that inputs are matched against and decoded from (FSQ / LFQ: every point of the
        implicit codebook, decoded)."""
        if self.scalar is not None:
            with torch.autocast(self._device_type(), enabled=False):
                return self.scalar.decode(torch.arange(self.codebook_size, device=self.step.device))
        with torch.autocast(self._device_type(), enabled=False):
            c = self.codebook()
            c = c.to(torch.promote_types(c.dtype, torch.float32))
            return F.normalize(c, dim=-1) if self.options.distance == "cosine" else c

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode indices (any shape) to vectors (..., dim) through the effective codebook."""
        if self.scalar is not None:
            with torch.autocast(self._device_type(), enabled=False):
                return self.scalar.decode(indices)
        return F.embedding(indices, self.effective_codebook())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer expects features last with size {self.dim}, got shape {tuple(z.shape)}")
        if self.scalar is not None:
            return self._forward_scalar(z)
        o, training = self.options, self.training
        with torch.autocast(self._device_type(), enabled=False):  # distances and updates in fp32
            dtype = torch.promote_types(self._codebook_dtype(), torch.float32)
            flat = z.reshape(-1, self.dim).to(dtype)
            if o.distance == "cosine":
                flat = F.normalize(flat, dim=-1)
            if training:
                if not self._synced:
                    self._broadcast_state()
                if self._resumed:
                    self._start_window_after_resume()
                self.step += 1
                self._step += 1
                if not self._init_done:
                    self._kmeans_init(flat.detach())
                if o.affine == "running":
                    self._running_affine(flat.detach())
            codebook = self.effective_codebook()
            if training and o.update == "soft_em":
                idx, z_q = self._soft_em(flat.detach(), codebook)
            else:
                with torch.no_grad():
                    idx = nearest(flat.detach(), codebook.detach(), o.chunk_size)
                if training and o.alternating:
                    self._alternating_step(flat.detach(), idx)
                    codebook = self.effective_codebook()
                z_q = F.embedding(idx, codebook)
            # With alternating optimisation the codebook term was minimised in place already: it is
            # kept in the graph with weight 0 so that DDP still sees the codebook parameters.
            cb_weight = 0.0 if o.alternating else o.beta
            if o.estimator == "ste" and flat.shape[0] > 0:
                out, loss, mse = fused_straight_through(flat, z_q, o.beta, cb_weight, o.sync_nu)
            else:
                loss, mse = self._loss(flat, z_q, cb_weight)
                out = rotation_trick(flat, z_q) if o.estimator == "rotation" else straight_through(flat, z_q)
                out = synchronised(out, z_q, o.sync_nu)
            counts = code_counts(idx, self.codebook_size)
            replaced = torch.zeros((), dtype=torch.long, device=z.device)
            if training:
                with torch.no_grad():
                    if o.update == "ema":
                        self._ema_update(flat.detach(), idx, counts)
                    self._track_usage(counts)
                    if o.replace_every and self._step % o.replace_every == 0:
                        replaced = self._replace_dead(flat.detach())
            metrics = self._metrics(mse * self.dim, counts, replaced)
        return QuantizerOutput(out.view(z.shape).to(z.dtype), idx.view(z.shape[:-1]), loss, metrics)

    def _forward_scalar(self, z: torch.Tensor) -> QuantizerOutput:
        """FSQ / LFQ: the implicit codebook's function of z, with the same usage bookkeeping and metrics."""
        with torch.autocast(self._device_type(), enabled=False):
            flat = z.reshape(-1, self.dim).float()
            if self.training:
                if not self._synced:
                    self._broadcast_state()
                self.step += 1
                self._step += 1
            out, idx, loss = self.scalar(flat)
            counts = code_counts(idx, self.codebook_size)
            if self.training:
                with torch.no_grad():
                    self._track_usage(counts)
            mse = (out.detach() - flat.detach()).pow(2).mean() if flat.shape[0] else flat.new_zeros(())
            metrics = self._metrics(mse * self.dim, counts, torch.zeros((), dtype=torch.long, device=z.device))
        return QuantizerOutput(out.view(z.shape).to(z.dtype), idx.view(z.shape[:-1]), loss, metrics)

    # -- loss --------------------------------------------------------------------------------
    def _loss(self, z: torch.Tensor, z_q: torch.Tensor, cb_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(VQ loss, detached mean squared error per element), composed from autograd ops."""
        if z.shape[0] == 0:
            zero = z_q.sum() * 0.0  # connected to the graph, so DDP sees every parameter used
            return zero, zero.detach()
        commit = F.mse_loss(z, z_q.detach())
        loss = (1.0 - self.options.beta) * commit + cb_weight * F.mse_loss(z.detach(), z_q)
        return loss, commit.detach()

    # -- codebook updates --------------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        o = self.options
        cap = max(1, math.ceil(o.kmeans_samples / dist.world_size()))
        local = z[torch.randperm(z.shape[0], device=z.device)[:cap]] if z.shape[0] > cap else z
        pool = dist.all_gather_rows(local.contiguous())
        if pool.shape[0] == 0:  # no rank had data: the same decision on every rank
            return
        centres = torch.empty(self.codebook_size, self.dim, device=z.device)
        if dist.rank() == 0:
            gen = torch.Generator().manual_seed(self._step)
            centres = kmeans(pool, self.codebook_size, o.kmeans_iters, o.distance == "cosine", gen, o.chunk_size)
        dist.broadcast_(centres)
        self.codebook.set_all(centres)
        if o.update in ("ema", "soft_em"):
            self.ema_sum.copy_(self.codebook.weight)
            self.ema_count.fill_(1.0)
        self.initialised.fill_(True)
        self._init_done = True

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Start every rank from rank 0's codebook (random init, frozen SimVQ basis, buffers): DDP
        syncs parameters at wrap time but not buffers with broadcast_buffers=False."""
        for t in [*self.parameters(), *self.buffers()]:
            dist.broadcast_(t.data)
        self._step = int(self.step)
        self._synced = True

    @torch.no_grad()
    def _running_affine(self, z: torch.Tensor) -> None:
        stats = torch.cat([z.sum(0), z.pow(2).sum(0), z.new_tensor([z.shape[0]])])
        dist.all_reduce_(stats)
        d = self.dim
        self.codebook.update_running_stats(stats[:d], stats[d : 2 * d], stats[2 * d])

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """Hard EM as moving averages: counts and sums of assigned vectors (all-reduced), with
        Laplace smoothing of the counts. Sums are taken in raw codebook space (inverse affine)."""
        raw = self.codebook.to_raw(z, idx)
        sums = torch.zeros(self.codebook_size, self.dim, device=z.device).index_add_(0, idx, raw)
        self._ema_apply(counts.float(), sums)

    @torch.no_grad()
    def _ema_apply(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        o = self.options
        packed = torch.cat([counts[:, None], sums], 1)
        dist.all_reduce_(packed)
        self.ema_count.lerp_(packed[:, 0], 1 - o.ema_decay)
        self.ema_sum.lerp_(packed[:, 1:], 1 - o.ema_decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + o.ema_eps) / (n + self.codebook_size * o.ema_eps) * n
        self.codebook.weight.copy_(self.ema_sum / smoothed[:, None])

    def _soft_em(self, z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft EM (Roy et al. 2018): draw m codes per vector from softmax(-|z - e_k|^2 / T), output
        their mean, and update the codebook by EMA on the soft counts. Indices are the argmax. Rows go in
        blocks of at most BLOCK_ELEMENTS probabilities (one block at the usual sizes)."""
        o = self.options
        n = max(1, z.shape[0])
        rows = n if n * self.codebook_size <= SOFT_EM_BLOCK else max(1, SOFT_EM_BLOCK // self.codebook_size)
        idx_parts, zq_parts = [], []
        counts = z.new_zeros(self.codebook_size)
        sums = z.new_zeros(self.codebook_size, self.dim)
        for start in range(0, max(1, z.shape[0]), rows):
            zb = z[start : start + rows]
            with torch.no_grad():
                probs = torch.softmax(-sq_distances(zb, codebook.detach()) / o.soft_em_temperature, dim=1)
                idx = probs.argmax(1)
                if zb.shape[0]:
                    draws = torch.multinomial(probs, o.soft_em_samples, replacement=True)  # (rows, m)
                else:
                    draws = idx.new_zeros((0, o.soft_em_samples))
                weights = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
                weights /= o.soft_em_samples
                raw = self.codebook.to_raw(zb, idx)  # soft counts and sums in raw space
                counts += weights.sum(0)
                sums += weights.t() @ raw
            idx_parts.append(idx)
            zq_parts.append(weights @ codebook)  # mean of the drawn codes (codebook as it was when drawn)
        with torch.no_grad():
            self._ema_apply(counts, sums)
        return torch.cat(idx_parts), torch.cat(zq_parts)

    def _alternating_step(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """One in-place step of the codebook parameters on the commitment error for the current
        assignment (Huh et al. 2023), before the task step.

        The step is preconditioned by the Gauss-Newton diagonal of that least-squares error, so it
        is scale-free: with alternating_lr=1 a plain code moves exactly to the mean of its vectors
        (a Lloyd step), and affine / SimVQ parameters take the matching Newton step. Gradients and
        counts are summed over ranks, so every rank takes the same step.
        """
        params = self.codebook.trainable()
        with torch.enable_grad():
            err = (F.embedding(idx, self.effective_codebook()) - z).pow(2).sum() * 0.5
            grads = torch.autograd.grad(err, params, allow_unused=True)
        counts = code_counts(idx, self.codebook_size).to(z.dtype)
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
        packed = dist.all_reduce_(torch.cat([*flat, counts]))
        curvature = self.codebook.gauss_newton_diag(packed[-self.codebook_size :])
        offset = 0
        with torch.no_grad():
            for p in params:
                g = packed[offset : offset + p.numel()].view_as(p)
                h = curvature[id(p)].expand_as(p)
                p.sub_(self.options.alternating_lr * g / h.clamp_min(1e-8))
                offset += p.numel()

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))  # no nonzero(): no GPU wait
        if self.options.replace_threshold > 1:
            self.window_count += counts

    @torch.no_grad()
    def _start_window_after_resume(self) -> None:
        """A checkpoint holds one rank's `last_used` (other ranks' uses since the last replacement are not in
        it) and no window counts: judged on that, a resumed run would replace a burst of live codes. So every
        code counts as used at the resume step and the window restarts there (same on every rank: all load
        the same checkpoint)."""
        self.last_used.clamp_(min=self._step)
        self.window_count.zero_()
        self._window_start = self._step
        self._resumed = False

    @torch.no_grad()
    def _replace_dead(self, z: torch.Tensor) -> torch.Tensor:
        """Replace codes unused over the last `replace_every` steps (or used fewer than
        `replace_threshold` times; usage reduced over ranks) by perturbed recent inputs, chosen once
        on rank 0 and broadcast. With replace_sampling="error" inputs are drawn with probability
        proportional to their quantisation error (k-means++'s D² rule), so new codes go where the
        codebook fits the data worst."""
        o = self.options
        dist.all_reduce_(self.last_used, op="max")
        dead = (self.step - self.last_used) >= o.replace_every
        if o.replace_threshold > 1:
            dist.all_reduce_(self.window_count)
            if self._step - self._window_start >= o.replace_every:  # only a full window's counts judge
                dead |= self.window_count < o.replace_threshold
            self.window_count.zero_()
        self._window_start = self._step
        n_dead = int(dead.sum())
        if n_dead == 0:  # last_used is global now: every rank takes this branch together
            return torch.zeros((), dtype=torch.long, device=z.device)
        pool = dist.all_gather_rows(z[torch.randperm(z.shape[0], device=z.device)[:4096]].contiguous())
        if pool.shape[0] == 0:
            return torch.zeros((), dtype=torch.long, device=z.device)
        targets = torch.empty(n_dead, self.dim, device=z.device)
        if dist.rank() == 0:
            if o.replace_sampling == "error":
                codebook = self.effective_codebook()
                p = F.normalize(pool, dim=-1) if o.distance == "cosine" else pool
                err = (p - codebook[nearest(p, codebook, o.chunk_size)]).pow(2).sum(1)
                pick = torch.multinomial(err + 1e-12, n_dead, replacement=True)
            else:
                pick = torch.randint(pool.shape[0], (n_dead,), device=z.device)
            std = pool.std(0, unbiased=False) if pool.shape[0] > 1 else pool.new_ones(self.dim)
            targets = pool[pick] + o.replace_noise * std * torch.randn_like(pool[pick])
        dist.broadcast_(targets)
        if o.distance == "cosine":
            targets = F.normalize(targets, dim=-1)
        codes = dead.nonzero().squeeze(1)
        self.codebook.set_codes(codes, targets)
        if o.update in ("ema", "soft_em"):
            self.ema_sum[codes] = self.codebook.weight[codes]
            self.ema_count[codes] = 1.0
        self.last_used[codes] = self.step
        self.replaced_total += n_dead
        return torch.tensor(n_dead, device=z.device)

    # -- metrics -----------------------------------------------------------------------------
    @torch.no_grad()
    def _metrics(self, quant_error: torch.Tensor, counts: torch.Tensor, replaced: torch.Tensor) -> dict:
        n = counts.sum().clamp_min(1)
        p = counts.float() / n
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        age = self.step - self.last_used
        window = self.options.replace_every or self.options.usage_window
        return {
            "usage": (counts > 0).float().mean(),
            "usage_window": (age < self.options.usage_window).float().mean(),
            "perplexity": entropy.exp(),
            "dead_codes": (age >= window).sum(),
            "quant_error": quant_error,  # mean over vectors of |z - z_q|^2
            "replaced": replaced,
        }

    # -- plumbing ----------------------------------------------------------------------------
    def _codebook_dtype(self) -> torch.dtype:
        if self.scalar is not None:
            return torch.float32
        return self.codebook.frozen.dtype if self.options.codebook == "simvq" else self.codebook.weight.dtype

    def _device_type(self) -> str:
        return self.step.device.type

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._init_done = bool(self.initialised)
        self._step = int(self.step)
        self._resumed = True

    def extra_repr(self) -> str:
        changed = {
            k: v for k, v in vars(self.options).items() if v != getattr(QuantizerOptions, k, v)
        }
        return f"dim={self.dim}, codebook_size={self.codebook_size}, preset={self.preset!r}, {changed}"
