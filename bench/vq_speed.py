"""Forward+backward time of the VQ layer against the floor every VQ layer pays: the bare distance
matmul z @ C^T (N*D*K multiply-adds). Also times vector-quantize-pytorch's counterparts (optional
bench dependency) in the same process, interleaved round by round so machine load hits all alike.

    .venv/bin/python bench/vq_speed.py                # N=16384, dim 64, 1024 codes, fp32 CPU
    .venv/bin/python bench/vq_speed.py --rounds 30 --threads 2
    .venv/bin/python bench/vq_speed.py --codes 16384 --dim 8 --only ours/default,ours/fsq,ours/lfq,vqp/fsq,vqp/lfq

Prints one JSON document: per configuration the median seconds and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from vqmodels import VectorQuantizer
from vqmodels.quantize.kmeans import nearest
from vqmodels.quantize.options import FSQ_LEVELS

OURS: dict[str, dict] = {
    "ours/plain": {"preset": "plain"},
    "ours/default": {"preset": "default"},
    "ours/ema": {"update": "ema"},
    "ours/rotation": {"estimator": "rotation"},
    "ours/simvq": {"codebook": "simvq"},
    "ours/affine_learned": {"affine": "learned"},
    "ours/affine_running": {"affine": "running"},
    "ours/sync_nu": {"sync_nu": 0.2},
    "ours/alternating": {"alternating": True},
    "ours/replace_every_20": {"replace_every": 20},
    "ours/cosine": {"distance": "cosine"},
    "ours/soft_em": {"update": "soft_em"},
    "ours/huh2023": {"preset": "huh2023"},
}


def _fsq_levels(codes: int) -> tuple[int, ...]:
    """The FSQ paper's levels for the bit count nearest to `codes` (their product is about `codes`)."""
    bits = min(FSQ_LEVELS, key=lambda b: abs(2**b - codes))
    return FSQ_LEVELS[bits]


def _scalar_configs(dim: int, codes: int) -> dict[str, tuple[Callable[[], torch.nn.Module], bool]]:
    """(make, ours) of the FSQ and LFQ layers of both libraries, at about `codes` codes."""
    levels = _fsq_levels(codes)
    out: dict[str, tuple[Callable[[], torch.nn.Module], bool]] = {
        "ours/fsq": (lambda: VectorQuantizer(dim, math.prod(levels), method="fsq", fsq_levels=levels), True),
    }
    if codes & (codes - 1) == 0:
        out["ours/lfq"] = (lambda: VectorQuantizer(dim, codes, method="lfq"), True)
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return out
    out["vqp/fsq"] = (lambda: vqp.FSQ(levels=list(levels), dim=dim), False)
    if codes & (codes - 1) == 0:
        out["vqp/lfq"] = (lambda: vqp.LFQ(dim=dim, codebook_size=codes, entropy_loss_weight=0.1, diversity_gamma=1.0),
                          False)
    return out


def _vqp_configs(dim: int, codes: int) -> dict[str, Callable[[], torch.nn.Module]]:
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return {}
    return {
        "vqp/ema": lambda: vqp.VectorQuantize(dim, codes, decay=0.99),
        "vqp/ema_kmeans_expiry": lambda: vqp.VectorQuantize(
            dim, codes, decay=0.99, kmeans_init=True, threshold_ema_dead_code=2
        ),
        "vqp/rotation": lambda: vqp.VectorQuantize(dim, codes, decay=0.99, rotation_trick=True),
        "vqp/gradient": lambda: vqp.VectorQuantize(dim, codes, learnable_codebook=True, ema_update=False),
        "vqp/cosine": lambda: vqp.VectorQuantize(dim, codes, decay=0.99, use_cosine_sim=True),
        "vqp/simvq": lambda: vqp.SimVQ(dim, codes),
    }


def _step_fn(module: torch.nn.Module, z: torch.Tensor, g: torch.Tensor, ours: bool) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        zz = z.detach().requires_grad_(True)
        out = module(zz)
        if ours:
            loss = (out.z_q * g).sum() + out.loss
        else:  # (quantized, indices[, aux loss]); FSQ has no loss
            quantized = out[0]
            loss = (quantized * g).sum() + (out[2].sum() if len(out) > 2 else 0.0)
        loss.backward()
        for p in params:
            p.grad = None

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    z = torch.randn(args.n, args.dim)
    g = torch.randn(args.n, args.dim)
    codebook = torch.randn(args.codes, args.dim)

    steps: dict[str, Callable[[], None]] = {
        "floor/matmul": lambda: z @ codebook.t(),
        "unchunked/dist_argmin_gather": lambda: codebook[
            (codebook.pow(2).sum(1) - 2 * z @ codebook.t()).argmin(1)
        ],
        "chunked/dist_argmin_gather": lambda: codebook[nearest(z, codebook)],
    }
    wanted = (lambda name: name in set(args.only.split(","))) if args.only else (lambda name: True)
    for name, opts in OURS.items():
        if not wanted(name):  # built only when asked for: at 262,144 codes some would not fit in memory
            continue
        q = VectorQuantizer(args.dim, args.codes, **opts)
        q.train()
        q(z[:4096])  # warm-up step: k-means init and first-call costs are not steady-state
        steps[name] = _step_fn(q, z, g, ours=True)
    for name, (make, ours) in _scalar_configs(args.dim, args.codes).items():
        if not wanted(name):
            continue
        m = make()
        m.train()
        zz, gg = (z, g) if ours else (z[None], g[None])
        _step_fn(m, zz, gg, ours)()
        steps[name] = _step_fn(m, zz, gg, ours)
    for name, make in _vqp_configs(args.dim, args.codes).items():
        if not wanted(name):
            continue
        m = make()
        m.train()
        _step_fn(m, z[None], g[None], ours=False)()
        steps[name] = _step_fn(m, z[None], g[None], ours=False)
    if args.only:
        keep = set(args.only.split(",")) | {"floor/matmul"}
        steps = {k: v for k, v in steps.items() if k in keep}

    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(args.rounds):  # interleaved: every configuration once per round
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["floor/matmul"])
    results = {
        name: {"median_s": round(statistics.median(t), 5), "x_floor": round(statistics.median(t) / floor, 2)}
        for name, t in times.items()
    }
    print(
        json.dumps(
            {
                "bench": "vq_speed",
                "n": args.n,
                "dim": args.dim,
                "codes": args.codes,
                "threads": args.threads,
                "rounds": args.rounds,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
