"""Generation quality of the demo-generation recipe, judged by an independent CIFAR-10 classifier.

The bench trains the classifier once on the training split (shards 0-8, 45,000 images; a ResNet-9 at a
quarter of its width with crop/flip augmentation, cached as TorchScript) and scores, on the 5,000 held-out images of
shard 9:
  - real images: its accuracy (the ceiling of everything below), and their features' statistics;
  - reconstructions (tokenizer encode -> decode of the held-out images): class consistency (accuracy
    against the true labels) and Fréchet distance (FD) in the classifier's features to the real images;
  - samples of the MaskGIT (100 per class, class-balanced, 8 steps) over a sweep of guidance scales: class
    consistency (accuracy against the requested label) and FD to the same real images; reconstructions
    are scored on 1,000 held-out images (100 per class) too, so both FDs come from the same sample count;
  - the MaskGIT's masked-token NLL on the held-out codes against the unigram entropy of those codes.

Targets (issue 15), at the default sampling settings (jobs.spec.evaluation):
  samples' class consistency >= the reconstructions' and >= 60 % of the classifier's accuracy on real images;
  samples' FD <= 1.25 x the reconstructions' FD; masked-token NLL >= 20 % below the unigram entropy.

    scripts/demo-generation
    .venv/bin/python bench/generation_quality.py --out bench/results/generation_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jobs.spec.evaluation import DEFAULT_GUIDANCE, DEFAULT_STEPS

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_split(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of the shards as uint8 (N, 3, 32, 32) and their labels."""
    from jobs.data.loader import make_image_loader

    xs, ys = [], []
    for b in make_image_loader(pattern, image_size=32, batch_size=500, train=False, rank=0, world_size=1, num_workers=1):
        keep = b.valid
        xs.append(((b.images[keep] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        ys.append(b.labels[keep])
    return torch.cat(xs), torch.cat(ys)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


class Classifier(nn.Module):
    """ResNet-9 (the DAWNBench CIFAR-10 net) at `w`/64 of its width; `features` = the pooled 8w-d vector."""

    def __init__(self, w: int = 16):
        super().__init__()

        def block(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.prep = block(3, w)
        self.layer1, self.res1 = block(w, 2 * w, pool=True), nn.Sequential(block(2 * w, 2 * w), block(2 * w, 2 * w))
        self.layer2 = block(2 * w, 4 * w, pool=True)
        self.layer3, self.res3 = block(4 * w, 8 * w, pool=True), nn.Sequential(block(8 * w, 8 * w), block(8 * w, 8 * w))
        self.fc = nn.Linear(8 * w, 10, bias=False)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prep(x)
        x = self.layer1(x)
        x = x + self.res1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = x + self.res3(x)
        return torch.amax(x, dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * 0.125


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, width: int, batch: int = 256,
                     seed: int = 0) -> nn.Module:
    """SGD (Nesterov) with a one-cycle learning rate, random crops (4 px reflect padding) and flips."""
    torch.manual_seed(seed)
    net = Classifier(width).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps, pct_start=0.25,
                                                anneal_strategy="linear")
    net.train()
    t0 = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = to_float(x[idx])
            xb = F.pad(xb, (4, 4, 4, 4), mode="reflect")
            dx, dy = np.random.randint(0, 9, 2)
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return net.eval()


@torch.no_grad()
def judge(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(accuracy against `labels`, features) of float images in [-1, 1]."""
    correct, feats = 0, []
    for i in range(0, len(images), 500):
        xb = images[i : i + 500].contiguous(memory_format=torch.channels_last)
        f = clf.features(xb)
        correct += int((clf.fc(f).argmax(1) == labels[i : i + 500]).sum())
        feats.append(f)
    return correct / len(images), torch.cat(feats)


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    from vqmodels.metrics import GaussianStats, frechet_distance

    sa, sb = GaussianStats(a.shape[1]), GaussianStats(b.shape[1])
    sa.update(a)
    sb.update(b)
    return frechet_distance(*sa.mean_cov(), *sb.mean_cov())


def balanced(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])


@torch.no_grad()
def reconstruct(tok: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.cat([tok.encode(images[i : i + 250]) for i in range(0, len(images), 250)])
    recon = torch.cat([tok.decode(codes[i : i + 250]).clamp(-1, 1) for i in range(0, len(codes), 250)])
    return recon, codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(REPO / ".vqtrain/shards/cifar10"))
    p.add_argument("--tokenizer", default="models:/cifar-tokenizer@champion")
    p.add_argument("--maskgit", default="models:/cifar-maskgit@champion")
    p.add_argument("--guidance", default="0,1,2,3,4,6")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=16, help="classifier base width (ResNet-9's is 64)")
    p.add_argument("--classifier", default=str(REPO / ".vqtrain/bench/cifar-classifier.pt"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classifier-only", action="store_true", help="train (or load) the classifier, score it, stop")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from jobs.evaluation import masked_nll
    from jobs.sample import sample_images, write_samples
    from jobs.tracking import resolve_tracking_uri
    from vqmodels import load_generator

    uri = resolve_tracking_uri()
    held_x, held_y = load_split(f"{a.shards}/cifar10-000009.tar")
    clf_path = Path(a.classifier)
    t0 = time.time()
    if clf_path.is_file():
        clf = torch.jit.load(str(clf_path)).eval()
        clf_note = f"loaded {clf_path}"
    else:
        train_x, train_y = load_split(f"{a.shards}/cifar10-{{000000..000008}}.tar")
        clf = torch.jit.script(train_classifier(train_x, train_y, a.epochs, a.width))
        clf_path.parent.mkdir(parents=True, exist_ok=True)
        clf.save(str(clf_path))
        clf_note = (f"ResNet-9 at width {a.width}, trained {a.epochs} epochs on {len(train_x)} images in "
                    f"{time.time() - t0:.0f} s")
    real = to_float(held_x)
    real_acc, real_feats = judge(clf, real, held_y)
    print(f"classifier: {real_acc:.4f} on {len(real)} held-out images ({clf_note})", flush=True)
    if a.classifier_only:
        return

    net, tok = load_generator(a.maskgit, "cpu", uri)
    net.eval()
    tok.eval()
    recon, codes = reconstruct(tok, real)
    recon_acc, recon_feats = judge(clf, recon, held_y)
    pick = balanced(held_y, a.per_class)
    nll = masked_nll(net, [(codes[i : i + 250], held_y[i : i + 250]) for i in range(0, len(codes), 250)],
                     torch.device("cpu"))
    assert nll is not None
    mse = (recon - real).pow(2).flatten(1).mean(1)
    report: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads},
        "tokenizer": tok_uri(a.maskgit, uri), "maskgit": a.maskgit, "classifier": clf_note,
        "held_out_images": len(real),
        "real": {"class_acc": real_acc},
        "reconstructions": {"class_acc": recon_acc, "fd": fd(recon_feats[pick], real_feats),
                            "fd_all": fd(recon_feats, real_feats), "psnr": float((10 * torch.log10(4 / mse)).mean())},
        "nll": {"nll": nll["eval/nll"], "unigram_entropy": nll["eval/unigram_entropy"],
                "ratio": nll["eval/nll_vs_unigram"]},
        "samples": {},
    }
    print(json.dumps(report["reconstructions"]), json.dumps(report["nll"]), flush=True)
    out_dir = REPO / ".vqtrain/samples/bench"
    for g in [float(v) for v in a.guidance.split(",")]:
        t1 = time.time()
        imgs, labels = sample_images(a.maskgit, per_class=a.per_class, steps=a.steps, guidance=g, seed=0,
                                     tracking_uri=uri, device="cpu")
        secs = time.time() - t1
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        acc, feats = judge(clf, x, torch.tensor(labels))
        report["samples"][str(g)] = {"class_acc": acc, "fd": fd(feats, real_feats), "seconds": round(secs, 1)}
        write_samples(imgs[:: max(1, a.per_class // 10)], labels[:: max(1, a.per_class // 10)], out_dir / f"g{g:g}",
                      list(CLASSES))
        print(f"guidance {g}: {report['samples'][str(g)]}", flush=True)
    default = report["samples"].get(str(float(DEFAULT_GUIDANCE)))
    r = report["reconstructions"]
    if default is not None:
        report["targets"] = {
            "default_guidance": DEFAULT_GUIDANCE, "default_steps": a.steps,
            "samples_acc_ge_recon_acc": default["class_acc"] >= r["class_acc"],
            "samples_acc_ge_60pct_real": default["class_acc"] >= 0.6 * real_acc,
            "samples_fd_le_1.25x_recon_fd": default["fd"] <= 1.25 * r["fd"],
            "nll_20pct_below_unigram": report["nll"]["ratio"] <= 0.8,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def tok_uri(maskgit: str, tracking_uri: str) -> str | None:
    from vqmodels.checkpoint import load_model

    _, meta = load_model(maskgit, "maskgit", "cpu", tracking_uri, with_meta=True)
    return (meta.get("extra") or {}).get("tokenizer")


if __name__ == "__main__":
    main()
