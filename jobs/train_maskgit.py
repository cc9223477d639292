"""Stage two on Ray Train: MaskGIT over a registered tokenizer's codes.

The tokenizer comes from the registry (`tokenizer: models:/name@alias`) and stays frozen. Training data
is token shards (a `kind: tokens` manifest, written by a tokenize job) or image shards, which are then
tokenised on the fly. Evaluation: masked-token NLL and accuracy over the whole eval split with fixed masks.
Rank 0 logs sample grids (MaskGIT decoding, then the tokenizer's decoder) and registers the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jobs import figures, model_card
from jobs.batches import eval_batches, image_loader
from jobs.build import maskgit_config
from jobs.evaluation import masked_nll, sample_metrics
from jobs.job import JobEnv
from jobs.judges import Judges, image_split, open_judges
from jobs.optim import Precision, set_lr
from jobs.spec import SpecError, pinned_model_uri
from jobs.trainer import Step, Task, log_model, train
from jobs.worker import Worker, wrap_ddp

SAMPLES = 8  # images of an unconditional model in `images/samples`
SAMPLES_PER_CLASS = 8  # a near-square grid of 10 classes
SAMPLE_CHUNK = 20  # samples generated and decoded at once
SAMPLE_STEPS = 8
EVAL_SEED = 1234


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=maskgit job."""
    train(config, MaskGITTask)


class MaskGITTask(Task):
    """A MaskGIT over the frozen tokenizer's codes, for `jobs.trainer.train`."""

    def __init__(self, env: JobEnv):
        from vqbase.fetch import fetch_model_dir
        from vqmodels import load_tokenizer
        from vqmodels.maskgit import MaskGIT

        self.env = env
        spec, worker, o = env.spec, env.worker, env.spec.optim
        self.tok = load_tokenizer(spec.tokenizer, map_location=worker.device, tracking_uri=env.tracking_uri,
                                  fetch=fetch_model_dir)
        self.tok.requires_grad_(False)
        torch.manual_seed(o.seed)
        self.net = net = MaskGIT(maskgit_config(spec, self.tok)).to(worker.device)
        self.model = wrap_ddp(net, worker)
        self.params = list(net.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(0.9, 0.96), weight_decay=o.weight_decay)
        self.prec = Precision(o.precision, worker.device)
        self.conditional = net.config.num_classes > 0
        self.judges = open_judges(env, "maskgit")
        self.names = class_names(spec) if worker.is_main else []  # label the sample rows
        self.to_tokens = _tokenise(self.tok, worker)

    def train_loader(self) -> Any:
        return token_loader(self.env.spec, self.env.worker, train=True, tok=self.tok)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.prec.scaler.state_dict(), "config": self.net.config_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.prec.scaler.load_state_dict(state["scaler"])

    def set_lr(self, factor: float) -> None:
        set_lr(self.optimizer, factor)

    def prepare(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_tokens(batch)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> Step:
        tokens, labels = batch
        with self.prec.autocast():
            out = self.model(tokens, labels if self.conditional else None)
        grad_norm = self.prec.step(out.loss, self.optimizer, self.params, self.env.spec.optim.grad_clip)
        metrics = {"loss/total": out.loss.detach(), **{f"train/{k}": v for k, v in out.metrics.items()}}
        return Step(metrics, tokens.shape[0], grad_norm)

    def evaluate(self, step: int, last: bool) -> dict[str, float] | None:
        return evaluate(self.net, self.env.spec, self.env.worker, self.tok, self.judges, last)

    def log_pictures(self, step: int) -> None:
        _log_samples(self.env, self.net, self.tok, step, self.names)

    def register(self, final: dict[str, float]) -> str:
        """With the pinned tokenizer version that decodes its codes; the class names label `vqtrain sample`'s
        grid."""
        spec, net = self.env.spec, self.net
        return log_model(self.env, "maskgit", net,
                         lambda d: net.save(d, extra={"tokenizer": spec.tokenizer, "class_names": self.names}),
                         final, self.judges, dataset=spec.data.eval, grid=net.config.grid_size,
                         example=model_card.input_example("maskgit", spec.data.image_size, net.config.num_classes))


def token_loader(spec: Any, worker: Worker, train: bool, tok: Any) -> Any | None:
    """Token shards when the source's manifest says `kind: tokens` (checked against the tokenizer),
    else the image loader (tokenised on the fly); None when the split is not configured."""
    from jobs.data.manifest import resolve_shards
    from jobs.data.tokens import make_token_loader
    from vqbase.protocol import allowed_roots_from_env

    d = spec.data
    source = d.train if train else d.eval
    if source is None:
        return None
    roots = allowed_roots_from_env()
    manifest = resolve_shards(source, d.storage_options, roots).manifest
    if manifest is None or manifest.kind != "tokens":
        return image_loader(spec, worker, train=train)
    loc = "data.train" if train else "data.eval"
    grid = [spec.data.image_size // tok.config.downsample] * 2
    if manifest.meta.get("codebook_size") != tok.config.codebook_size or list(manifest.meta.get("grid", [])) != grid:
        raise SpecError([{"loc": loc, "msg": (
            f"token shards hold {manifest.meta.get('grid')} grids over {manifest.meta.get('codebook_size')} codes, "
            f"but tokenizer {spec.tokenizer} at image_size {spec.data.image_size} gives {grid} over "
            f"{tok.config.codebook_size}")}])
    made_with = manifest.meta.get("tokenizer")
    if pinned_model_uri(made_with) and pinned_model_uri(spec.tokenizer) and made_with != spec.tokenizer:
        raise SpecError([{"loc": loc, "msg": (
            f"token shards were made with tokenizer {made_with}, but this job's tokenizer is {spec.tokenizer}: "
            "their codes mean different things (name that version as the job's tokenizer, or re-tokenize)")}])
    return make_token_loader(
        source, batch_size=spec.optim.batch_size, train=train, rank=worker.rank, world_size=worker.world_size,
        num_workers=d.num_workers, seed=spec.optim.seed, shuffle_buffer=d.shuffle_buffer,
        epoch_batches=d.epoch_batches if train else None, storage_options=d.storage_options, allowed_roots=roots,
    )


def _tokenise(tok: Any, worker: Worker) -> Any:
    """Batch (token or image) → (tokens (B, h, w), labels) on the device."""

    @torch.no_grad()
    def convert(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.labels.to(worker.device)
        if hasattr(batch, "tokens"):
            return batch.tokens.to(worker.device), labels
        return tok.encode(batch.images.to(worker.device)), labels

    return convert


def evaluate(net: Any, spec: Any, worker: Worker, tok: Any, judges: Judges, last: bool = True) -> dict[str, float] | None:
    """Masked-token NLL against the unigram entropy over the eval split (fixed masks, so evaluations at
    different steps compare), then the sample metrics (FID, IS, class consistency) when their networks are
    named: at every eval pass, or only at the last with `evaluation.every_eval: false`."""
    loader = token_loader(spec, worker, train=False, tok=tok)
    metrics: dict[str, float] = {}
    if loader is not None:
        to_tokens = _tokenise(tok, worker)

        def valid_tokens():
            for batch in loader:
                keep = batch.valid.to(worker.device)
                tokens, labels = to_tokens(batch)
                yield tokens[keep], labels[keep]

        metrics.update(masked_nll(net, valid_tokens(), worker.device, EVAL_SEED) or {})
    if last or spec.evaluation.every_eval:
        real = (lambda: eval_batches(spec, worker)) if image_split(spec) else None
        metrics.update(sample_metrics(net, tok, judges, spec.evaluation, worker.rank, worker.world_size,
                                      worker.device, real))
    return metrics or None


def class_names(spec: Any) -> list[str]:
    """The training data's class names (its manifest's; token shards carry their source's), [] if unknown."""
    from jobs.data.manifest import resolve_shards
    from vqbase.protocol import allowed_roots_from_env

    try:
        manifest = resolve_shards(spec.data.train, spec.data.storage_options, allowed_roots_from_env()).manifest
    except (OSError, ValueError):
        return []
    return list(manifest.class_names) if manifest is not None else []


@torch.no_grad()
def _log_samples(env: JobEnv, net: Any, tok: Any, step: int, names: list[str]) -> None:
    """`images/samples`: one labelled row per class (up to 10 classes, SAMPLES_PER_CLASS each; one row for an
    unconditional model), decoded by the tokenizer, the same seed at every step so rows compare over time."""
    classes = min(net.config.num_classes, 10)
    device = net.pos_emb.device
    labels = torch.arange(classes, device=device).repeat_interleave(SAMPLES_PER_CLASS) if classes else None
    n = classes * SAMPLES_PER_CLASS if classes else SAMPLES
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    chunks = []
    for i in range(0, n, SAMPLE_CHUNK):  # bounded memory for a large model at a large image size
        lab = labels[i : i + SAMPLE_CHUNK] if labels is not None else None
        codes = net.generate(min(SAMPLE_CHUNK, n - i), steps=min(SAMPLE_STEPS, net.config.num_tokens), labels=lab,
                             generator=gen)
        chunks.append(figures.to_uint8(tok.decode(codes).clamp(-1, 1)))
    images = np.concatenate(chunks)
    rows = figures.class_rows(images, labels.tolist() if labels is not None else [None] * n, names)
    env.run.log_image(figures.labelled_rows(rows), key="images/samples", step=step)
