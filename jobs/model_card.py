"""The model card of a registered version: what it is, how it was trained, how good it is (with the
protocol of every number) and how to load it, as the version's description and tags.

The description is rebuilt from the version's tags each time, so a training job and any number of later
`vqtrain eval` runs (each on its own dataset) all land on one consistent card.
"""

from __future__ import annotations

import re
from typing import Any

CARD = "vqtrain.card."  # facts about the model: kind, grid, codebook, data, steps, tokenizer
EVAL = "eval."  # eval.<dataset>.<metric> = value; eval.<dataset>.protocol = how
KEY_METRICS = {
    "tokenizer": ("rfid", "psnr", "ssim", "lpips", "usage", "perplexity", "bits_per_image"),
    "maskgit": ("fid", "inception_score", "class_acc", "classifier_fd", "nll", "unigram_entropy"),
}


def dataset_name(source: str | list[str] | None) -> str:
    """A short, tag-safe name for an eval split: its manifest's folder or the shards' folder."""
    first = (source[0] if isinstance(source, list) else source) or "unknown"
    parts = [p for p in re.split(r"[/\\]", first.split("::")[0]) if p and "{" not in p and not p.endswith(".tar")]
    parts = [p for p in parts if p not in ("manifest.json",) and not p.endswith(":")]
    name = parts[-1] if parts else "unknown"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "unknown"


def card_tags(spec: Any, kind: str, model: Any) -> dict[str, str]:
    """What a training job knows about the model it registers."""
    tags = {"kind": kind, "data.train": str(spec.data.train)[:500], "steps": str(spec.optim.steps),
            "image_size": str(spec.data.image_size), "job": spec.name}
    cfg = model.config
    if kind == "tokenizer":
        side = spec.data.image_size // cfg.downsample
        tags.update(grid=f"{side}x{side}", codebook_size=str(cfg.codebook_size), code_dim=str(cfg.code_dim),
                    quantizer=str(spec.quantizer.preset))
    else:
        tags.update(grid="x".join(str(g) for g in cfg.grid_size),
                    codebook_size=str(cfg.codebook_size), classes=str(cfg.num_classes),
                    tokenizer=str(spec.tokenizer))
    return {CARD + k: v for k, v in tags.items()}


def signature(kind: str, image_size: int, grid: tuple[int, int]) -> Any:
    """The pyfunc's signature: uint8 images (N, H, W, 3) -> int64 codes (N, h, w) for a tokenizer; int64
    labels (N,) -> int64 code grids (N, h, w) for a MaskGIT."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    out = Schema([TensorSpec(np.dtype(np.int64), (-1, *grid), "codes")])
    if kind == "tokenizer":
        return ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3), "images")]), out)
    params = ParamSchema([ParamSpec("steps", "long", 8), ParamSpec("guidance", "double", 0.0),
                          ParamSpec("temperature", "double", 1.0), ParamSpec("output", "string", "codes")])
    return ModelSignature(Schema([TensorSpec(np.dtype(np.int64), (-1,), "labels")]), out, params=params)


def input_example(kind: str, image_size: int, num_classes: int = 0) -> Any:
    """What the registry shows (and MLflow checks the model against when it logs it): one synthetic image for a
    tokenizer (a colour ramp, so no training image is copied into the model), two class labels for a MaskGIT."""
    import numpy as np

    if kind == "tokenizer":
        ramp = np.linspace(0, 255, image_size, dtype=np.float32)
        img = np.stack([ramp[None, :].repeat(image_size, 0), ramp[:, None].repeat(image_size, 1),
                        np.full((image_size, image_size), 128, np.float32)], axis=-1)
        return img.round().astype(np.uint8)[None]
    return np.arange(2, dtype=np.int64) % max(num_classes, 1)


def eval_tags(dataset: str, metrics: dict[str, float], protocol: dict[str, str], skipped: dict[str, str]) -> dict[str, str]:
    """eval.<dataset>.<metric> tags (values as text, 'null' for what could not be computed) + the protocol."""
    out = {f"{EVAL}{dataset}.{k.split('/', 1)[-1]}": _fmt(v) for k, v in metrics.items()}
    for name in skipped:
        out.setdefault(f"{EVAL}{dataset}.{name}", "null")
    text = "; ".join(f"{k}: {v}" for k, v in protocol.items())
    out[f"{EVAL}{dataset}.protocol"] = text[:4900]
    return out


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def describe(name: str, version: str, tags: dict[str, str]) -> str:
    """The version's description (Markdown) from its tags."""
    c = {k[len(CARD):]: v for k, v in tags.items() if k.startswith(CARD)}
    kind = c.get("kind", "tokenizer")
    uri = f"models:/{name}/{version}"
    lines = [f"# {name} v{version}: " + ("a VQ image tokenizer" if kind == "tokenizer" else "a MaskGIT generator"), ""]
    if kind == "tokenizer":
        lines.append(f"Turns {c.get('image_size', '?')} px RGB images into a {c.get('grid', '?')} grid of codes from a "
                     f"codebook of {c.get('codebook_size', '?')} ({c.get('code_dim', '?')}-d codes, quantizer "
                     f"preset `{c.get('quantizer', '?')}`), and back.")
    else:
        lines.append(f"Samples {c.get('grid', '?')} code grids over {c.get('codebook_size', '?')} codes "
                     f"({c.get('classes', '0')} classes; 0 = unconditional), decoded by tokenizer "
                     f"`{c.get('tokenizer', '?')}`.")
    if "data.train" in c:
        lines.append(f"Trained for {c.get('steps', '?')} steps on `{c['data.train']}` (job `{c.get('job', '?')}`).")
    lines += ["", "## Load it", "", "```python", "import vqmodels"]
    if kind == "tokenizer":
        lines += [f'tok = vqmodels.load_tokenizer("{uri}")',
                  "codes = tok.encode(images)   # float B x 3 x H x W in [-1, 1] -> LongTensor B x h x w",
                  "images = tok.decode(codes)"]
    else:
        lines += [f'net, tok = vqmodels.load_generator("{uri}")',
                  "images = tok.decode(net.generate(8, labels=3))   # or: vqtrain sample " + uri + " -o samples/"]
    lines += ["```", "", f"`vqtrain pull {name}/{version} -o DIR` downloads it; `vqtrain eval {uri} --data SHARDS` "
              "evaluates it on other data and adds a row below.", ""]
    evals = _evaluations(tags)
    if evals:
        keys = KEY_METRICS.get(kind, ())
        lines += ["## Evaluations", "", "| dataset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for ds, m in sorted(evals.items()):
            lines.append(f"| {ds} | " + " | ".join(m.get(k, "null") for k in keys) + " |")
        lines.append("")
        for ds, m in sorted(evals.items()):
            if m.get("protocol"):
                lines.append(f"- **{ds}**: {m['protocol']}")
    return "\n".join(lines).strip() + "\n"


def _evaluations(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for k, v in tags.items():
        if k.startswith(EVAL) and k.count(".") >= 2:
            ds, metric = k[len(EVAL):].rsplit(".", 1)
            out.setdefault(ds, {})[metric] = v
    return out


def update_card(client: Any, name: str, version: str, tags: dict[str, str]) -> str:
    """Set `tags` on the version and rebuild its description from all its tags; returns the description."""
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    current = dict(client.get_model_version(name, version).tags or {})
    text = describe(name, version, current)
    client.update_model_version(name, version, description=text)
    return text


GENERATED = "<!-- vqtrain -->"  # marks a registered-model description vqtrain wrote (a user's own is kept)


def describe_registered_model(client: Any, name: str, card: dict[str, str]) -> None:
    """The registered model's own page: what the name holds and how to use it, plus `vqtrain.kind` tags, written
    while the description is empty or still vqtrain's (each version carries its full card)."""
    model = client.get_registered_model(name)
    if model.description and GENERATED not in model.description:
        return
    c = {k[len(CARD):]: v for k, v in card.items() if k.startswith(CARD)}
    kind = c.get("kind", "tokenizer")
    what = (f"VQ image tokenizers: {c.get('image_size', '?')} px images to {c.get('grid', '?')} grids of "
            f"{c.get('codebook_size', '?')} codes" if kind == "tokenizer" else
            f"MaskGIT generators of {c.get('grid', '?')} code grids ({c.get('classes', '0')} classes), decoded by "
            f"tokenizer `{c.get('tokenizer', '?')}`")
    load = (f'tok = vqmodels.load_tokenizer("models:/{name}@latest")' if kind == "tokenizer"
            else f'net, tok = vqmodels.load_generator("models:/{name}@latest")')
    text = "\n".join([
        GENERATED, f"# {name}", "", f"{what}, trained by vqtrain (job spec `{c.get('job', '?')}`).", "",
        "Each version's page has its model card: training data and steps, the final evaluation with its protocol, "
        "the training run, and its signature and input example.", "", "```python", "import vqmodels", load,
        "```", "", f"`models:/{name}@latest` is always the newest version; aliases (e.g. `@champion`) are set by "
        "the job spec's `register.alias`.",
    ])
    client.update_registered_model(name, description=text)
    client.set_registered_model_tag(name, "vqtrain.kind", kind)
