"""Where `bench/vq_quality.py`'s autoencoder loses PSNR: the same model, data and schedule, with probes.

Reports, as one JSON object:
- `early`: codes used and replaced at each of the first steps (the encoder's outputs move fast at the start,
  and codes die faster than a `replace_every` window can notice);
- `curve`: held-out PSNR (1,000 images) at steps 100, 200, 400, 600 and the last;
- `final`: held-out PSNR (5,000 images) decoding the codes, decoding the encoder's continuous outputs
  instead (what the quantization itself costs this decoder), and decoding after a Lloyd refit of the
  codebook to the final encoder's outputs on training images (whether the codebook sits where k-means would);
- `continuous` (with `--continuous`): the same autoencoder trained without a quantizer, the ceiling.

    .venv/bin/python bench/vq_diagnose.py --seed 0 --continuous
    .venv/bin/python bench/vq_diagnose.py --seed 0 --set replace_every=10
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vq_quality import HELD_OUT, Decoder, Encoder, _option, load_cifar, to_tensor  # noqa: E402
from vqmodels import VectorQuantizer  # noqa: E402
from vqmodels.quantize.kmeans import nearest  # noqa: E402

CURVE_STEPS = (100, 200, 400, 600)


def held_out_psnr(x: np.ndarray, enc: torch.nn.Module, dec: torch.nn.Module, latent: Callable, n: int) -> float:
    """Mean per-image PSNR (images in [0, 1]) of the first n held-out images through `latent`."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 500):
            imgs = to_tensor(x[i : min(i + 500, n)])
            rec = dec(latent(enc(imgs))).clamp(-1, 1)
            total += ((rec - imgs) / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10).log10().mul(-10).sum().item()
    return round(total / n, 3)


def quantize_with(codebook: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def latent(z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return codebook[nearest(flat, codebook)].view(z.shape[0], *z.shape[2:], -1).permute(0, 3, 1, 2)

    return latent


def train(
    x: np.ndarray, seed: int, steps: int, make_quantizer: Callable[[], VectorQuantizer] | None, early: int = 40
) -> dict:
    """The issue-2 training loop (initialised as `bench/vq_quality.py` does, so its PSNR is reproduced);
    with a quantizer, also the probes above."""
    torch.manual_seed(seed)
    quantizer = make_quantizer() if make_quantizer else None
    enc, dec = Encoder(), Decoder()
    params = [*enc.parameters(), *dec.parameters(), *(quantizer.parameters() if quantizer else [])]
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=3e-4)
    data, rng = x[HELD_OUT:], np.random.default_rng(seed)
    report: dict = {"early": [], "curve": {}}
    identity = lambda z: z  # noqa: E731

    def eval_latent(z: torch.Tensor) -> torch.Tensor:
        return identity(z) if quantizer is None else quantizer(z.permute(0, 2, 3, 1)).z_q.permute(0, 3, 1, 2)

    for step in range(1, steps + 1):
        imgs = to_tensor(data[rng.integers(0, len(data), 128)])
        z = enc(imgs)
        if quantizer is None:
            loss = F.mse_loss(dec(z), imgs)
        else:
            out = quantizer(z.permute(0, 2, 3, 1))
            loss = F.mse_loss(dec(out.z_q.permute(0, 3, 1, 2)), imgs) + out.loss
            if step <= early:
                m = out.metrics
                report["early"].append([step, int(m["usage"] * quantizer.codebook_size), int(m["replaced"])])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CURVE_STEPS and step < steps:
            for module in (enc, dec, quantizer):
                if module is not None:
                    module.eval()
            report["curve"][step] = held_out_psnr(x, enc, dec, eval_latent, 1000)
            for module in (enc, dec, quantizer):
                if module is not None:
                    module.train()
    for module in (enc, dec, quantizer):
        if module is not None:
            module.eval()
    report["curve"][steps] = held_out_psnr(x, enc, dec, eval_latent, 1000)
    if quantizer is None:
        report["final"] = {"continuous": held_out_psnr(x, enc, dec, identity, HELD_OUT)}
        return report
    codebook = quantizer.effective_codebook().detach()
    final = {
        "codes": held_out_psnr(x, enc, dec, quantize_with(codebook), HELD_OUT),
        "continuous_z": held_out_psnr(x, enc, dec, identity, HELD_OUT),
    }
    with torch.no_grad():  # Lloyd steps from the trained codebook on 10,000 training images' outputs
        z = torch.cat([enc(to_tensor(data[i : i + 500])).permute(0, 2, 3, 1).reshape(-1, 64) for i in range(0, 10000, 500)])
        refit = codebook.clone()
        for _ in range(10):
            assign = nearest(z, refit)
            counts = torch.bincount(assign, minlength=refit.shape[0]).float()
            sums = torch.zeros_like(refit).index_add_(0, assign, z)
            used = counts > 0
            refit[used] = sums[used] / counts[used, None]
    final["codes_after_lloyd_refit"] = held_out_psnr(x, enc, dec, quantize_with(refit), HELD_OUT)
    report["final"] = final
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], help="option=value on top of the preset")
    ap.add_argument("--continuous", action="store_true", help="also train the autoencoder without a quantizer")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, _ = load_cifar()
    overrides = dict(_option(s) for s in args.set)
    result = {"preset": args.preset, "overrides": overrides, "seed": args.seed, "steps": args.steps}
    result["vq"] = train(x, args.seed, args.steps, lambda: VectorQuantizer(64, 1024, preset=args.preset, **overrides))
    if args.continuous:
        result["continuous"] = train(x, args.seed, args.steps, None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
