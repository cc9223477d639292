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
