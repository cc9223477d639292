"""Sampling speed: MaskGIT with `steps` parallel-decoding iterations vs KV-cached autoregressive decoding of
the same token count with the same transformer (width, depth, heads, MLP). Prints JSON (and writes --out).

Target (issue 4): speed-up >= 0.8 × (tokens ÷ steps), i.e. MaskGIT's 8 full forwards must cost little more
than 8 of AR's N sequential single-token steps.

    .venv/bin/python bench/sampling.py --threads 2 --out bench/results/sampling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vqmodels.ar import ARConfig, ARTransformer
from vqmodels.maskgit import MaskGIT, MaskGITConfig


def timed(fn, repeats: int, sync) -> tuple[float, float]:
    """Best-of-`repeats` (wall, process CPU) seconds of fn(), after one warm-up call.

    CPU time is reported because shared CPU machines make wall time noisy; with one thread and no
    contention the two agree.
    """
    fn()
    sync()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def profile(fn, sync, device: torch.device) -> dict:
    """One call of fn() under torch.profiler: top-level operators dispatched and, on CUDA, kernels launched
    and their summed GPU time. Kernel time well below the timed wall time means decoding is bound by launches,
not arithmetic."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"ops": len(ops), "kernels": len(kernels), "kernel_ms": sum(e.device_time for e in kernels) / 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    p.add_argument("--grid", type=int, default=16, help="token grid side (16 → 256 tokens, MaskGIT's 256px)")
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations of both models (bfloat16 is the usual GPU inference setting)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (both models)")
    p.add_argument("--profile", action="store_true", help="also profile one call per batch size (ops, kernels)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, a.dtype)
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    cfg = MaskGITConfig(codebook_size=a.codebook, grid_size=(a.grid, a.grid), dim=a.dim, depth=a.depth,
                        heads=a.heads, dropout=0.0)
    # the same weights for both decoders' transformers would not change their speed; same sizes and dtype do
    maskgit = MaskGIT(cfg).to(device, dtype).eval()
    ar = ARTransformer(ARConfig.matching(cfg)).to(device, dtype).eval()
    tokens = cfg.num_tokens
    ideal = tokens / a.steps
    rows = []
    with torch.inference_mode():
        for b in a.batch:
            (t_mg, c_mg), (t_ar, c_ar) = (timed(f, a.repeats, sync) for f in (
                lambda b=b: maskgit.generate(b, steps=a.steps), lambda b=b: ar.generate(b)))
            speedup = t_ar / t_mg
            extra = {}
            if a.profile:
                extra = {"profile_maskgit": profile(lambda b=b: maskgit.generate(b, steps=a.steps), sync, device),
                         "profile_ar": profile(lambda b=b: ar.generate(b), sync, device)}
                print(f"  profile: MaskGIT {extra['profile_maskgit']}  AR {extra['profile_ar']}", flush=True)
            rows.append({
                "batch": b,
                "maskgit_images_per_s": b / t_mg,
                "ar_images_per_s": b / t_ar,
                "maskgit_s": t_mg,
                "ar_s": t_ar,
                "maskgit_cpu_s": c_mg,
                "ar_cpu_s": c_ar,
                "speedup": speedup,
                "speedup_cpu_time": c_ar / c_mg,
                "target": 0.8 * ideal,
                "meets_target": speedup >= 0.8 * ideal,
                **extra,
            })
            print(f"batch {b:3d}: MaskGIT {b / t_mg:8.2f} img/s  AR {b / t_ar:8.2f} img/s  "
                  f"speed-up {speedup:5.1f}x (by CPU time {c_ar / c_mg:5.1f}x; ideal {ideal:.0f}x, "
                  f"target {0.8 * ideal:.1f}x)", flush=True)
    result = {
        "benchmark": "sampling",
        "device": str(device) if device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "config": {"tokens": tokens, "steps": a.steps, "codebook": a.codebook, "dim": a.dim, "depth": a.depth,
                   "heads": a.heads, "dtype": a.dtype, "tf32": a.tf32, "params_M": sum(q.numel() for q in maskgit.parameters()) / 1e6},
        "ideal_speedup": ideal,
        "results": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
