"""Images out of a registered MaskGIT: `sample_images` (Python, one call from a registry URI to images) and
`python -m jobs.sample` (what `vqtrain sample` runs).

Writes `DIR/<label>/<n>.png` (label = class index; `uncond/` for an unconditional model) and a labelled
`DIR/grid.png`, decoded by the tokenizer version the MaskGIT recorded when it was registered.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.spec.evaluation import (
    DEFAULT_CHOICE_TEMPERATURE,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_TEMPERATURE,
)
from vqbase.protocol import result_line

BATCH = 50


@torch.no_grad()
def sample_images(uri: str, labels: list[int] | None = None, per_class: int | None = None, *, n: int | None = None,
                  steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, temperature: float = DEFAULT_TEMPERATURE,
                  choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE, seed: int = 0,
                  tracking_uri: str | None = None, device: str | None = None) -> tuple[np.ndarray, list[int | None]]:
    """(uint8 images (N, H, W, 3), their labels) sampled from the MaskGIT at `uri` (a registry URI or a dir).

    labels: one image per entry; per_class: that many of every class; an unconditional model takes `n`.
    Reproducible: the same arguments give the same images."""
    from vqbase.fetch import fetch_model_dir
    from vqmodels import load_generator

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, tok = load_generator(uri, dev, tracking_uri, fetch=fetch_model_dir)
    return sample_with(net, tok, labels, per_class, n=n, steps=steps, guidance=guidance, temperature=temperature,
                       choice_temperature=choice_temperature, seed=seed)


@torch.no_grad()
def sample_with(net: Any, tok: Any, labels: list[int] | None = None, per_class: int | None = None, *,
                n: int | None = None, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                temperature: float = DEFAULT_TEMPERATURE, choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE,
                seed: int = 0) -> tuple[np.ndarray, list[int | None]]:
    """`sample_images` with a MaskGIT and tokenizer already loaded."""
    from vqmodels.metrics import to_uint8

    dev = next(net.parameters()).device
    classes = net.config.num_classes
    if classes:
        if labels is None:
            if not per_class:
                raise ValueError("give labels or per_class for a class-conditional MaskGIT")
            labels = [c for c in range(classes) for _ in range(per_class)]
        bad = [c for c in labels if not 0 <= c < classes]
        if bad:
            raise ValueError(f"labels {bad} are outside this model's classes 0..{classes - 1}")
        want: list[int | None] = list(labels)
    else:
        if labels:
            raise ValueError("this MaskGIT is unconditional: it takes no labels (give n or per_class)")
        want = [None] * (n or per_class or 8)
    steps = min(steps, net.config.num_tokens)
    out = []
    for b in range(0, len(want), BATCH):
        chunk = want[b : b + BATCH]
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)
        lab = torch.tensor(chunk, device=dev) if classes else None
        codes = net.generate(len(chunk), steps=steps, labels=lab, guidance=guidance if classes else 0.0,
                             temperature=temperature, choice_temperature=choice_temperature, generator=gen)
        out.append(to_uint8(tok.decode(codes)).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out), want


def write_samples(images: np.ndarray, labels: list[int | None], out: str | Path,
                  class_names: list[str] | None = None) -> list[Path]:
    """PNG files `out/<label>/<n>.png` and `out/grid.png` (one labelled row per class); returns the files."""
    from PIL import Image

    root = Path(out)
    counters: dict[str, int] = {}
    files = []
    for img, label in zip(images, labels, strict=True):
        folder = "uncond" if label is None else str(label)
        n = counters.get(folder, 0)
        counters[folder] = n + 1
        path = root / folder / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        files.append(path)
    grid_path = root / "grid.png"
    labelled_grid(images, labels, class_names).save(grid_path)
    return files + [grid_path]


def labelled_grid(images: np.ndarray, labels: list[int | None], class_names: list[str] | None = None,
                  per_row: int = 10) -> object:
    """A PIL image with one labelled row per class (`jobs.figures.labelled_rows`: the same grid training logs)."""
    from PIL import Image

    from jobs import figures

    return Image.fromarray(figures.labelled_rows(figures.class_rows(images, labels, class_names, per_row)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description="Sample images from a registered MaskGIT.")
    p.add_argument("uri")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--labels", help="comma-separated class indices, one image each")
    p.add_argument("--per-class", type=int)
    p.add_argument("--num", type=int, help="images of an unconditional model")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        labels = [int(x) for x in a.labels.split(",") if x.strip()] if a.labels else None
    except ValueError:
        print(f"--labels: {a.labels!r} is not a comma-separated list of class indices", file=sys.stderr)
        return 2
    from vqbase.fetch import fetch_model_dir
    from vqmodels import load_generator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net, tok = load_generator(a.uri, device, fetch=fetch_model_dir)
        images, got = sample_with(net, tok, labels, a.per_class, n=a.num, steps=a.steps, guidance=a.guidance,
                                  temperature=a.temperature, seed=a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write_samples(images, got, a.out, getattr(net, "extra", {}).get("class_names"))
    print(result_line({"images": len(images), "out": str(Path(a.out).resolve()), "grid": str(files[-1]),
                       "size": list(images.shape[1:3])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
