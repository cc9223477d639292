"""Pictures logged to MLflow: labelled image grids, the codebook-usage histogram, and the 2-D projection of
encoder outputs, codebook and used codes (the picture Huh et al. 2023 use to show index collapse: a collapsed
codebook leaves most codes far from the encoder outputs, unused).

Everything comes out as a uint8 (H, W, 3) array for `MlflowClient.log_image(key=..., step=...)`, so each picture
gets MLflow's step slider. Small images (CIFAR's 32 px) are enlarged by nearest-neighbour to a readable size and
every row is labelled. Matplotlib with the Agg backend only (workers have no display).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MIN_SIDE = 96  # px: a logged image is enlarged (integer factor, nearest) to at least this
LABEL_WIDTH = 120  # px of the label column
WHITE = (255, 255, 255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_rows(rows: list[tuple[str, np.ndarray]], min_side: int = MIN_SIDE, pad: int = 4) -> np.ndarray:
    """One row of images per (label, uint8 (N, H, W, 3)) pair, the label left of its row, each image enlarged
    by an integer factor (nearest, so pixels stay pixels) to at least `min_side`. Returns uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    scale = max(1, -(-min_side // max(h, w)))
    cell_h, cell_w = h * scale + pad, w * scale + pad
    cols = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (LABEL_WIDTH + cols * cell_w + pad, len(rows) * cell_h + pad), WHITE)
    draw, font = ImageDraw.Draw(canvas), _font(14)
    for r, (label, images) in enumerate(rows):
        y = pad + r * cell_h
        draw.text((6, y + cell_h // 2), label[:16], fill="black", font=font, anchor="lm")
        for c, img in enumerate(images):
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + pad + c * cell_w, y))
    return np.asarray(canvas)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """Inputs (row "original") above what the tokenizer makes of them (row "reconstruction")."""
    return labelled_rows([("original", to_uint8(originals)), ("reconstruction", to_uint8(reconstructions))])


def class_rows(images: np.ndarray, labels: list[int | None], class_names: list[str] | None = None,
               per_row: int = 10) -> list[tuple[str, np.ndarray]]:
    """uint8 images grouped into one row per class (at most `per_row` each), labelled with the class name
    where the data's manifest gives one, else the class index ("uncond" for an unconditional model)."""
    rows: dict[str, list[np.ndarray]] = {}
    for img, label in zip(images, labels, strict=True):
        if label is None:
            key = "uncond"
        else:
            key = class_names[label] if class_names and 0 <= label < len(class_names) else f"class {label}"
        if len(rows.setdefault(key, [])) < per_row:
            rows[key].append(img)
    return [(k, np.stack(v)) for k, v in rows.items()]


def figure_image(fig: Figure, dpi: int = 110) -> np.ndarray:
    """A matplotlib figure as uint8 (H, W, 3); the figure is closed (workers make many)."""
    from PIL import Image

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def usage_histogram(counts: torch.Tensor, step: int, split: str = "eval split") -> Figure:
    """How often each code was picked on `split`, codes sorted by count, log count axis: a flat curve is a
    healthy codebook, a cliff is index collapse. Unused codes (count 0) have no place on a log axis: they
    are the empty stretch at the right, and counted in the title, instead of a fake floor."""
    c = counts.detach().double().cpu()
    total = float(c.sum())
    p = c / max(total, 1.0)
    used = int((c > 0).sum())
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if total > 0 else 0.0
    ordered = np.sort(c.numpy())[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    if used:
        ax.bar(np.arange(used), ordered[:used], width=1.0, color="tab:blue", label="used codes")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8, top=float(ordered[0]) * 1.5)
    if used < len(c):
        ax.axvspan(used - 0.5, len(c) - 0.5, color="tab:gray", alpha=0.15, label=f"unused codes ({len(c) - used})")
    ax.set_xlim(-0.5, len(c) - 0.5)
    ax.set_xlabel(f"code, sorted by count (codebook of {len(c)})")
    ax.set_ylabel(f"times picked on the {split} (log)")
    ax.set_title(f"step {step}, {split}: {used}/{len(c)} codes used, perplexity {perplexity:.1f}", fontsize=10)
    if used < len(c):
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def pca_2d(*arrays: torch.Tensor) -> list[np.ndarray]:
    """Project several point sets with one PCA fitted on all of them together."""
    joint = torch.cat([a.detach().float().cpu() for a in arrays])
    mean = joint.mean(0, keepdim=True)
    # the top-2 right singular vectors of the centred data; torch.linalg.svd is exact and small here
    _, _, vh = torch.linalg.svd(joint - mean, full_matrices=False)
    basis = vh[:2].T
    return [((a.detach().float().cpu() - mean) @ basis).numpy() for a in arrays]


def codebook_projection(encodings: torch.Tensor, codebook: torch.Tensor, used: torch.Tensor, step: int,
                        split: str = "eval split") -> Figure:
    """Encoder outputs on `split`, the codebook, and the codes actually used there, in one 2-D PCA."""
    used_np = used.bool().cpu().numpy()
    p, c = pca_2d(encodings, codebook)
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.25, color="tab:gray", label=f"encoder outputs ({len(p)}, {split})")
    if (~used_np).any():
        ax.scatter(c[~used_np, 0], c[~used_np, 1], s=10, marker="x", color="tab:blue",
                   label=f"unused codes ({int((~used_np).sum())})")
    ax.scatter(c[used_np, 0], c[used_np, 1], s=10, color="tab:red", label=f"used codes ({int(used_np.sum())})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"step {step}, {split}: {int(used_np.sum())}/{len(used_np)} codes used", fontsize=10)
    ax.legend(loc="best", fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig
