"""Stage two on Ray Train: MaskGIT over a registered tokenizer's codes.

The tokenizer comes from the registry (`tokenizer: models:/name@alias`) and stays frozen. Training data
is token shards (a `kind: tokens` manifest, written by a tokenize job) or image shards, which are then
tokenised on the fly. Evaluation: masked-token NLL and accuracy over the whole eval split with fixed masks.
Rank 0 logs sample grids (MaskGIT decoding, then the tokenizer's decoder) and registers the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs import figures, model_card
from jobs.build import maskgit_config
from jobs.common import (
    JobEnv,
    Precision,
    TrainBatches,
    Worker,
    eval_batches,
    image_loader,
    load_checkpoint,
    lr_factor,
    maybe_checkpoint,
    maybe_kill,
    open_job,
    seed_everything,
    set_lr,
    wrap_ddp,
)
from jobs.evaluation import Judges, image_split, masked_nll, open_judges, sample_metrics
from jobs.progress import Throughput, log_eval, log_train_step
from jobs.spec import SpecError, pinned_model_uri

SAMPLES = 8  # images of an unconditional model in `images/samples`
SAMPLES_PER_CLASS = 8  # a near-square grid of 10 classes
SAMPLE_CHUNK = 20  # samples generated and decoded at once
SAMPLE_STEPS = 8
EVAL_SEED = 1234


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=maskgit job."""
    import ray.train

    from vqmodels import load_tokenizer
    from vqmodels.maskgit import MaskGIT

    env = open_job(config)
    spec, worker = env.spec, env.worker
    o = spec.optim
    tok = load_tokenizer(spec.tokenizer, map_location=worker.device, tracking_uri=config["tracking_uri"])
    tok.requires_grad_(False)
    torch.manual_seed(o.seed)
    net = MaskGIT(maskgit_config(spec, tok)).to(worker.device)
    model = wrap_ddp(net, worker)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.96), weight_decay=o.weight_decay)
    prec = Precision(o.precision, worker.device)
    conditional = net.config.num_classes > 0

    judges = open_judges(env, "maskgit")
    seed_everything(o.seed, worker.rank)
    step, skipped_before = 0, 0
    state = load_checkpoint(worker)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        prec.scaler.load_state_dict(state["scaler"])
        step, skipped_before = int(state["step"]), int(state.get("skipped_samples", 0))
        if env.run is not None:
            env.run.log_metrics({"train/resumed_from": step}, step, replay=False)

    def checkpoint_state() -> dict[str, Any]:
        return {"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": prec.scaler.state_dict(),
                "config": net.config_dict(), "skipped_samples": batches.skipped}

    batches = TrainBatches(token_loader(spec, worker, train=True, tok=tok), step, skipped_before)
    final: dict[str, float] = {}  # the last evaluation's metrics, for the model card
    names = class_names(spec) if worker.is_main else []
    to_tokens = _tokenise(tok, worker)
    if step == 0 and worker.is_main and spec.tracking.image_every:  # a fresh start: the untrained model's samples
        _log_samples(env, net, tok, 0, names)  # (MLflow's image cards open at step 0)
    rate = Throughput(worker.world_size)
    rate.pause()
    env.clock.saved()  # the wall-clock window opens with training, not with model building and resuming
    while step < o.steps:
        maybe_kill(step, worker, env.hooks)
        set_lr(opt, lr_factor(step, o.steps, o.warmup_steps, o.schedule))
        tokens, labels = to_tokens(next(batches))
        with prec.autocast():
            out = model(tokens, labels if conditional else None)
        grad_norm = prec.step(out.loss, opt, params, o.grad_clip)
        step += 1
        rate.tick(tokens.shape[0] * worker.world_size)
        batches.sync_skipped(step, worker.device, env.clock.due(step))

        if worker.is_main:
            metrics = {"loss/total": out.loss.detach(), **{f"train/{k}": v for k, v in out.metrics.items()}}
            log_train_step(env, step, metrics, opt, grad_norm, batches, rate)

        t = spec.tracking
        last = step == o.steps
        if (t.eval_every and step % t.eval_every == 0) or last:
            result = evaluate(net, spec, worker, tok, judges, last)
            final = result or final
            if worker.is_main and result:
                log_eval(env, step, result, last)
            rate.pause()
        if worker.is_main and ((t.image_every and step % t.image_every == 0) or last):
            _log_samples(env, net, tok, step, names)
            rate.pause()
        maybe_checkpoint(env, step, checkpoint_state, rate)

    result: dict[str, Any] = rate.summary()
    if worker.is_main:
        env.run.log_metrics(result, o.steps)
        env.run.flush()
        with tempfile.TemporaryDirectory(prefix="vqtrain-model-") as tmp:
            model_dir = Path(tmp) / "maskgit"
            # the pinned tokenizer version that decodes its codes; the class names label `vqtrain sample`'s grid
            net.save(model_dir, extra={"tokenizer": spec.tokenizer, "class_names": names})
            card = model_card.card_tags(spec, "maskgit", net)
            if final:
                card.update(model_card.eval_tags(model_card.dataset_name(spec.data.eval), final, judges.protocol,
                                                 judges.skipped))
            sig = model_card.signature("maskgit", spec.data.image_size, net.config.grid_size)
            example = model_card.input_example("maskgit", spec.data.image_size, net.config.num_classes)
            result["model_uri"] = env.run.log_model(model_dir, "maskgit", spec.model_name, spec.register.alias,
                                                    step=o.steps, card=card, metrics=final, signature=sig,
                                                    input_example=example)
        env.run.close()
    ray.train.report(result)


def token_loader(spec: Any, worker: Worker, train: bool, tok: Any) -> Any | None:
    """Token shards when the source's manifest says `kind: tokens` (checked against the tokenizer),
    else the image loader (tokenised on the fly); None when the split is not configured."""
    from jobs.data.manifest import resolve_shards
    from jobs.data.storage import allowed_roots_from_env
    from jobs.data.tokens import make_token_loader

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
    from jobs.data.storage import allowed_roots_from_env

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
