"""Reconstruction quality of one fixed conv autoencoder on CIFAR-10, changing only the quantizer.

The model, optimiser and schedule are fixed by issue 2: encoder Conv(3-64,k4s2p1)-ReLU-Conv(64-128,
k4s2p1)-ReLU-Conv(128-128,k3p1)-ReLU-Conv(128-64,k1); quantizer on the 8x8x64 grid, 1024 codes;
decoder Conv(64-128,k3p1)-ReLU-Conv(128-128,k3p1)-ReLU-ConvT(128-64,k4s2p1)-ReLU-ConvT(64-3,k4s2p1);
loss MSE + the quantizer's loss; Adam 3e-4 over all parameters, batch 128, 800 steps, images in [-1,1].

Reported on 5,000 held-out images: PSNR (images in [0,1]), perplexity of code use, codes used, and
class retention: the accuracy of a fixed small classifier (trained once on the training split) on
the reconstructions, relative to its accuracy on the originals — how much of each image's class
the codes keep.

    .venv/bin/python bench/vq_quality.py --configs ours/default,vqp/ema_kmeans_expiry --out bench/results/vq_quality.jsonl
    .venv/bin/python bench/vq_quality.py --list
    .venv/bin/python bench/vq_quality.py --bits 14 --configs ours/default,ours/fsq,ours/lfq,vqp/ema_kmeans_expiry,vqp/fsq,vqp/lfq
    python bench/vq_quality.py --configs ours/default --device cuda   # same runs on a GPU (seconds each)

Seeds move PSNR by about ±0.15 dB; `bench/vq_quality_sweep.py` runs configurations × seeds in parallel
and tabulates means.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vqmodels import VectorQuantizer
from vqmodels.quantize.options import FSQ_LEVELS

ROOT = Path(__file__).resolve().parents[1]
# $VQTRAIN_CIFAR_TAR where the tar lies elsewhere (a device machine gets only the repository)
TAR = Path(os.environ.get("VQTRAIN_CIFAR_TAR") or ROOT.parent / "shared" / "data" / "cifar10" / "train.tar")
CACHE = ROOT / ".vqtrain" / "cache"
HELD_OUT = 5000


def load_cifar() -> tuple[np.ndarray, np.ndarray]:
    """All 50,000 images as uint8 (N, 32, 32, 3) and labels, decoded once and cached (not committed)."""
    cache = CACHE / "cifar10_train.npz"
    if cache.exists():
        d = np.load(cache)
        return d["x"], d["y"]
    if not TAR.exists():
        raise FileNotFoundError(f"CIFAR-10 tar not found at {TAR} (../shared/data/cifar10/train.tar, or $VQTRAIN_CIFAR_TAR)")
    xs, ys, classes = [], [], {}
    with tarfile.open(TAR) as tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            cls = m.name.split("/")[-2]
            classes.setdefault(cls, len(classes))
            xs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
            ys.append(cls)
    order = {c: i for i, c in enumerate(sorted(classes))}
    x, y = np.stack(xs), np.array([order[c] for c in ys])
    perm = np.random.default_rng(0).permutation(len(x))  # fixed split, classes mixed
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.npz")  # sweep workers decode at once: each renames a whole file
    np.savez(tmp, x=x[perm], y=y[perm])
    os.replace(tmp, cache)
    return x[perm], y[perm]


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Encoder(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(), nn.Conv2d(128, 64, 1),
        )  # fmt: skip


class Decoder(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 3, 4, 2, 1),
        )  # fmt: skip


CODES = 1024  # codebook size of every configuration; `--bits` changes it (FSQ: the paper's levels for those bits)


def _ours(**options) -> Callable[[], nn.Module]:
    return lambda: VectorQuantizer(64, CODES, **options)


def _fsq_levels() -> tuple[int, ...]:
    return FSQ_LEVELS[CODES.bit_length() - 1]


OURS = {f"ours/{p}": _ours(preset=p) for p in ("default", "plain", "ema", "rotation", "simvq", "huh2023")}
OURS["ours/lfq"] = _ours(preset="lfq")
OURS["ours/fsq"] = lambda: VectorQuantizer(64, math.prod(_fsq_levels()), preset="fsq", fsq_levels=_fsq_levels())


def _vqp(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import vector_quantize_pytorch as vqp

        if kind == "simvq":
            return vqp.SimVQ(64, CODES)
        if kind == "fsq":
            return vqp.FSQ(levels=list(_fsq_levels()), dim=64)
        if kind == "lfq":  # MAGVIT-v2's entropy loss at its usual weights
            return vqp.LFQ(dim=64, codebook_size=CODES, entropy_loss_weight=0.1, diversity_gamma=1.0)
        extra = {
            "ema": {},
            "ema_kmeans_expiry": {"kmeans_init": True, "threshold_ema_dead_code": 2},
            "ema_kmeans_expiry_rotation": {"kmeans_init": True, "threshold_ema_dead_code": 2, "rotation_trick": True},
        }[kind]
        return vqp.VectorQuantize(64, CODES, decay=0.99, commitment_weight=1.0, **extra)

    return make


VQP = {f"vqp/{k}": _vqp(k) for k in ("ema", "ema_kmeans_expiry", "ema_kmeans_expiry_rotation", "simvq", "fsq", "lfq")}
CONFIGS = {**OURS, **VQP}


def quantize(q: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q, indices, loss) for both libraries; z is B x C x h x w."""
    zl = z.permute(0, 2, 3, 1)
    if isinstance(q, VectorQuantizer):
        out = q(zl)
        zq, idx, loss = out.z_q, out.indices, out.loss
    else:
        b, h, w, c = zl.shape
        out = q(zl.reshape(b, h * w, c))
        zq, idx = out[0], out[1]
        loss = out[2].sum() if len(out) > 2 else zq.new_zeros(())  # FSQ: no auxiliary loss
        zq, idx = zq.reshape(b, h, w, c), idx.reshape(b, h, w)
    return zq.permute(0, 3, 1, 2), idx, loss


class Classifier(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 10),
        )  # fmt: skip


def classifier(x: np.ndarray, y: np.ndarray) -> nn.Module:
    """A fixed small CNN trained once on the training split (cached): the judge of class retention."""
    path = CACHE / "cifar10_classifier.pt"
    model = Classifier()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xt, yt = x[HELD_OUT:], torch.from_numpy(y[HELD_OUT:])
    for _epoch in range(4):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt) - 255, 256):
            j = perm[i : i + 256].numpy()
            loss = F.cross_entropy(model(to_tensor(xt[j])), yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), path)
    return model.eval()


def run(name: str, steps: int, batch: int, seed: int, overrides: dict | None = None, device: str = "cpu") -> dict:
    x, y = load_cifar()
    dev = torch.device(device)
    judge = classifier(x, y).to(dev)
    torch.manual_seed(seed)
    if overrides:  # variations of one of our presets, e.g. --set replace_every=10
        # the preset is read off the name, not by building a throwaway quantizer: its random codebook would
        # shift the random stream, and a variant would start from other weights than its preset at this seed
        preset = name.split("/", 1)[1]
        q = VectorQuantizer(64, CODES, preset=preset, **overrides)
        name = f"{name}+" + ",".join(f"{k}={v}" for k, v in overrides.items())
    else:
        q = CONFIGS[name]()
    enc, dec, q = Encoder().to(dev), Decoder().to(dev), q.to(dev)
    params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=3e-4)
    train = x[HELD_OUT:]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        imgs = to_tensor(train[rng.integers(0, len(train), batch)]).to(dev, non_blocking=True)
        zq, _, qloss = quantize(q, enc(imgs))
        loss = F.mse_loss(dec(zq), imgs) + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    enc.eval(), dec.eval(), q.eval()
    size = int(getattr(q, "codebook_size", 0) or CODES)
    counts = torch.zeros(max(size, CODES), device=dev)
    se, correct_rec, correct_orig = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, HELD_OUT, 500):
            imgs = to_tensor(x[i : i + 500]).to(dev)
            zq, idx, _ = quantize(q, enc(imgs))
            rec = dec(zq).clamp(-1, 1)
            se += ((rec - imgs) / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10).log10().mul(-10).sum().item()
            counts += torch.bincount(idx.flatten(), minlength=counts.numel()).float()[: counts.numel()]
            labels = torch.from_numpy(y[i : i + 500]).to(dev)
            correct_rec += (judge(rec).argmax(1) == labels).sum().item()
            correct_orig += (judge(imgs).argmax(1) == labels).sum().item()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return {
        "config": name,
        "psnr_db": round(se / HELD_OUT, 2),  # mean per-image PSNR, images in [0, 1]
        "perplexity": round(perplexity, 1),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": int(math.prod(_fsq_levels())) if name.endswith("/fsq") else CODES,
        "class_acc_recon": round(correct_rec / HELD_OUT, 4),
        "class_acc_orig": round(correct_orig / HELD_OUT, 4),
        "class_retention": round(correct_rec / max(correct_orig, 1), 4),
        "train_s": round(train_s, 1),
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }


def _option(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (numbers, true/false) or a bare string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="ours/default", help="comma-separated; see --list")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="append each result as a JSON line to this file")
    ap.add_argument("--set", action="append", default=[], help="option=value on top of an ours/ preset")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bits", type=int, default=10, help="codebook of 2^bits codes (FSQ: the paper's levels for it)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    global CODES
    CODES = 2**args.bits
    if args.list:
        print("\n".join(CONFIGS))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(_option(s) for s in args.set)
    for name in args.configs.split(","):
        if name not in CONFIGS or (overrides and name not in OURS):
            raise SystemExit(f"--configs: unknown configuration {name!r} (--set needs an ours/ one); see --list")
        result = run(name, args.steps, args.batch, args.seed, overrides, args.device)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
