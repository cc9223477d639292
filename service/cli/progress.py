"""One progress bar for `vqtrain run` and `vqtrain submit --follow`: step, losses, codebook usage, images/s."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

_PREFERRED = ("loss/total", "loss/rec", "loss/quant", "loss", "vq/usage", "vq/perplexity")


def pick_metrics(metrics: dict[str, Any], n: int = 4) -> dict[str, str]:
    """The few metrics worth a glance: total/reconstruction loss, usage, perplexity, else the first ones."""
    keys = [k for k in _PREFERRED if k in metrics]
    keys += [k for k in metrics if "loss" in k and k not in keys]
    keys += [k for k in metrics if k not in keys and "images_per_s" not in k]
    return {
        k.rsplit("/", 1)[-1] if k.startswith(("loss/", "vq/")) else k: f"{metrics[k]:.4g}" for k in keys[:n]
    }


class ProgressBar:
    """Feeds `VQTRAIN_PROGRESS` records (or the API's job details) into a tqdm bar."""

    def __init__(self, desc: str, disable: bool = False) -> None:
        self.bar = tqdm(total=None, desc=desc, unit="step", dynamic_ncols=True, disable=disable)

    def update(self, step: int | None, total: int | None, metrics: dict[str, Any], images_per_s: Any) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        if step is not None and step != self.bar.n:
            self.bar.n = step
        post = pick_metrics(metrics or {})
        if images_per_s:
            post["img/s"] = f"{float(images_per_s):.0f}"
        self.bar.set_postfix(post, refresh=True)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
