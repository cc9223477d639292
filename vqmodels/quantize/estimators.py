"""Gradient estimators through the non-differentiable code lookup.

Both return a tensor whose forward *value* is exactly z_q (so decoding from indices matches the
forward pass bit for bit) while gradients flow to z as the estimator prescribes.
"""

from __future__ import annotations

import torch


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: value z_q, gradient to z is the identity."""
    return z_q.detach() + (z - z.detach())


def rotation_trick(z: torch.Tensor, z_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024): value z_q, gradient to z is lambda * R^T g.

    R rotates z/|z| onto q/|q| and lambda = |q|/|z|, both treated as constants. R is applied in
    Householder form, R = I - 2 r r^T + 2 u e^T with r = (e + u)/|e + u|, so no d x d matrix is
    ever built: cost O(N d).
    """
    zd, qd = z.detach(), z_q.detach()
    z_norm = zd.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = qd.norm(dim=-1, keepdim=True).clamp_min(eps)
    e, u = zd / z_norm, qd / q_norm
    w = e + u
    r = w / w.norm(dim=-1, keepdim=True).clamp_min(eps)  # r = 0 for antipodal e, u: R still maps e to u
    rotated = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * u * (e * z).sum(-1, keepdim=True)
    out = (q_norm / z_norm) * rotated
    return out + (qd - out).detach()


def synchronised(out: torch.Tensor, z_q: torch.Tensor, nu: float) -> torch.Tensor:
    """Synchronised commitment (Huh et al. 2023): the value is unchanged, and the codebook
    additionally receives nu times the task-loss gradient at z_q."""
    if nu <= 0:
        return out
    return out + nu * (z_q - z_q.detach())


class _FusedSTE(torch.autograd.Function):
    """Straight-through output, VQ loss and synchronised commitment in one autograd node.

    Equal in value and gradient to `synchronised(straight_through(z, z_q), z_q, nu)` plus
    `(1-beta)*mse(z, sg(z_q)) + w_cb*mse(sg(z), z_q)`, but with one N x D difference instead of
    the half-dozen temporaries of the composed form: the layer's cost beyond the distance matmul
    is a few passes over N x D.
    """

    @staticmethod
    def forward(ctx, z, z_q, beta: float, w_cb: float, nu: float):  # noqa: ANN001, ANN205
        diff = z - z_q
        mse = diff.pow(2).mean()
        ctx.save_for_backward(diff)
        ctx.consts = (beta, w_cb, nu)
        ctx.mark_non_differentiable(mse)
        # both loss terms have the value |z - z_q|^2; their weights add up
        return z_q.view_as(z_q), mse * ((1.0 - beta) + w_cb), mse

    @staticmethod
    def backward(ctx, g_out, g_loss, _g_mse):  # noqa: ANN001, ANN205
        (diff,) = ctx.saved_tensors
        beta, w_cb, nu = ctx.consts
        scale = 2.0 * g_loss / max(diff.numel(), 1)
        grad_z = diff * (scale * (1.0 - beta))
        grad_q = diff * (-scale * w_cb)
        if g_out is not None:
            grad_z += g_out
            if nu:
                grad_q.add_(g_out, alpha=nu)
        return grad_z, grad_q, None, None, None


def fused_straight_through(
    z: torch.Tensor, z_q: torch.Tensor, beta: float, w_cb: float, nu: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, loss, mean squared error per element) for the straight-through estimator."""
    return _FusedSTE.apply(z, z_q, beta, w_cb, nu)
