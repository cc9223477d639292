"""Stage one on Ray Train: train a VQ tokenizer, evaluate it, log pictures, register it.

Runs in every worker (`train_loop`); the quantizer keeps codebooks identical across ranks through its
own collectives, DDP averages the gradients (the discriminator's separately). Rank 0 logs to MLflow.
Checkpoints go through `ray.train.report` every `checkpoint.every` steps, so a restarted worker group
resumes at the same step with the same model, optimiser, quantizer buffers and RNG streams.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from jobs import figures, model_card
from jobs.build import tokenizer_config
from jobs.common import (
    JobEnv,
    Precision,
    average_gradients,
    eval_batches,
    load_checkpoint,
    lr_factor,
    maybe_checkpoint,
    maybe_kill,
    open_job,
    record_codebook,
    seed_everything,
    set_lr,
    train_batches,
    wrap_ddp,
)
from jobs.evaluation import Judges, TokenizerEval, open_judges, tokenizer_metrics
from jobs.progress import SyncClock, Throughput, log_eval, log_train_step

PREVIEW_IMAGES = 8
PROJECTION_VECTORS = 4096


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=tokenizer job."""
    from vqmodels.tokenizer import Tokenizer

    env = open_job(config)
    SyncClock.install()
    spec, worker = env.spec, env.worker
    o = spec.optim
    torch.manual_seed(o.seed)  # identical initial weights on every rank
    tok = Tokenizer(tokenizer_config(spec)).to(worker.device)
    model = wrap_ddp(tok, worker, ignore_prefix="discriminator.")
    gen_params = tok.generator_parameters()
    opt = torch.optim.AdamW(gen_params, lr=o.lr, betas=(0.9, 0.99), weight_decay=o.weight_decay)
    disc_params = list(tok.discriminator.parameters()) if tok.discriminator is not None else []
    dopt = torch.optim.AdamW(disc_params, lr=o.lr, betas=(0.9, 0.99), weight_decay=o.weight_decay) if disc_params else None
    prec, dprec = Precision(o.precision, worker.device), Precision(o.precision, worker.device)

    judges = open_judges(env, "tokenizer")
    seed_everything(o.seed, worker.rank)
    step, skipped_before = 0, 0
    state = load_checkpoint(worker)
    if state is not None:
        tok.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        prec.scaler.load_state_dict(state["scaler"])
        if dopt is not None:
            dopt.load_state_dict(state["disc_optimizer"])
            dprec.scaler.load_state_dict(state["disc_scaler"])
            for group in dopt.param_groups:  # checkpoints from before it followed the spec carry AdamW's 0.01
                group["weight_decay"] = o.weight_decay
        step, skipped_before = int(state["step"]), int(state.get("skipped_samples", 0))
        if env.run is not None:
            env.run.log_metrics({"train/resumed_from": step}, step, replay=False)

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": tok.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": prec.scaler.state_dict(),
            "disc_optimizer": dopt.state_dict() if dopt is not None else None,
            "disc_scaler": dprec.scaler.state_dict(),
            "config": tok.config_dict(),
            "skipped_samples": batches.skipped,
        }

    batches = train_batches(spec, worker, start_step=step, skipped_before=skipped_before)
    preview: torch.Tensor | None = None
    final: dict[str, float] = {}  # the last evaluation's metrics, for the model card
    rate = Throughput(worker.world_size)
    rate.pause()
    env.clock.saved()  # the wall-clock window opens with training, not with model building and resuming
    while step < o.steps:
        maybe_kill(step, worker, env.hooks)
        set_lr(opt, lr_factor(step, o.steps, o.warmup_steps, o.schedule))
        if dopt is not None:
            set_lr(dopt, lr_factor(step, o.steps, o.warmup_steps, o.schedule))
        images, _ = next(batches)
        images = images.to(worker.device, non_blocking=True)
        if preview is None:
            preview = images[:PREVIEW_IMAGES].detach().clone()
            if step == 0 and spec.tracking.image_every:  # a fresh start: the untrained model at step 0
                _log_step_zero(env, tok, spec, worker, preview, judges)
                rate.pause()
        with prec.autocast():
            # fp16 with the GAN on: the adaptive weight's own backward passes need the scaler's scale
            scale = prec.scaler.get_scale() if prec.scaler.is_enabled() and tok.adversarial_factor(step) > 0 else 1.0
            out = model(images, step, scale)
        grad_norm = prec.step(out.losses["total"], opt, gen_params, o.grad_clip)
        disc_metrics: dict[str, Any] = {}  # device tensors, read back when logged (see log_train_step)
        if dopt is not None and tok.adversarial_factor(step) > 0:
            with dprec.autocast():
                d = tok.discriminator_loss(images, out.reconstruction, step)
            dprec.step(d.loss, dopt, disc_params, o.grad_clip, sync=average_gradients)
            disc_metrics = {"loss/disc": d.loss.detach(), **{f"disc/{k}": v for k, v in d.metrics.items()}}
        step += 1
        rate.tick(images.shape[0] * worker.world_size)
        batches.sync_skipped(step, worker.device, env.clock.due(step))

        if worker.is_main:
            metrics = {f"loss/{k}": v.detach() for k, v in out.losses.items()}
            metrics.update({f"vq/{k}": v for k, v in out.metrics.items() if k not in ("psnr", "adv_weight")})
            metrics.update(disc_metrics)
            metrics["train/psnr"] = out.metrics["psnr"]
            if "adv_weight" in out.metrics:
                metrics["train/adv_weight"] = out.metrics["adv_weight"]
            log_train_step(env, step, metrics, opt, grad_norm, batches, rate, codebook_sync=True)

        t = spec.tracking
        last = step == o.steps
        if (t.eval_every and step % t.eval_every == 0) or last:
            result = evaluate(tok, spec, worker, preview, judges, last)
            if result is not None:
                final = result.metrics
            if worker.is_main and result is not None:
                log_eval(env, step, result.metrics, last)
                _log_codebook_figures(env, tok, result, step)
            rate.pause()
        if worker.is_main and ((t.image_every and step % t.image_every == 0) or last):
            _log_reconstructions(env, tok, preview, step)
            rate.pause()
        maybe_checkpoint(env, step, checkpoint_state, rate)

    finish(env, tok, rate, final, judges)


def finish(env: JobEnv, tok: Any, rate: Throughput, final: dict[str, float], judges: Judges) -> None:
    """Rank 0 saves the inference model (config + weights, no discriminator) and registers it; every
    rank then makes the last report, which carries the model URI to the driver."""
    import ray.train

    result: dict[str, Any] = rate.summary()
    record_codebook(env, tok.quantizer.effective_codebook())
    if env.worker.is_main:
        env.run.log_metrics(result, env.spec.optim.steps)
        env.run.flush()
        result["model_uri"] = register_tokenizer(env, tok, final, judges)
        env.run.close()
    ray.train.report(result)


def register_tokenizer(env: JobEnv, tok: Any, final: dict[str, float], judges: Judges) -> str:
    """Log the tokenizer as a pyfunc model and register it (once per run, also across restarts), with its
    model card: what it is, the final evaluation and that evaluation's protocol."""
    spec = env.spec
    side = spec.data.image_size // tok.config.downsample
    card = model_card.card_tags(spec, "tokenizer", tok)
    if final:
        card.update(model_card.eval_tags(model_card.dataset_name(spec.data.eval or "preview"), final, judges.protocol,
                                         judges.skipped))
    with tempfile.TemporaryDirectory(prefix="vqtrain-model-") as tmp:
        model_dir = Path(tmp) / "tokenizer"
        tok.save(model_dir, inference_only=True)
        return env.run.log_model(
            model_dir, "tokenizer", spec.model_name, spec.register.alias, step=spec.optim.steps, card=card,
            metrics=final, signature=model_card.signature("tokenizer", spec.data.image_size, (side, side)),
            input_example=model_card.input_example("tokenizer", spec.data.image_size))


def evaluate(tok: Any, spec: Any, worker: Any, preview: torch.Tensor | None, judges: Judges,
             last: bool = True, networks: bool | None = None) -> TokenizerEval | None:
    """The eval split's metrics (`jobs.evaluation.tokenizer_metrics`; every rank reads its part). Without an
    eval split, rank 0's preview batch (8 training images) stands in and the metrics are named "preview/..."."""
    source = eval_batches(spec, worker)
    prefix = "eval"
    if source is None:
        source = [(preview, None)] if (preview is not None and worker.is_main) else []
        prefix = "preview"
    return tokenizer_metrics(tok, source, judges, worker.device, prefix=prefix,
                             networks=(last or spec.evaluation.every_eval) if networks is None else networks,
                             keep_vectors=PROJECTION_VECTORS if worker.is_main else 0)


def _log_step_zero(env: JobEnv, tok: Any, spec: Any, worker: Any, preview: torch.Tensor, judges: Judges) -> None:
    """Step 0's pictures and cheap metrics (no feature networks), before any training or k-means init: a baseline
    for every chart, and MLflow's image cards open at step 0 (its default), so they show a picture from the
    start. Every rank takes part (the eval pass reduces across ranks)."""
    result = evaluate(tok, spec, worker, preview, judges, last=False, networks=False)
    if worker.is_main:
        if result is not None:
            log_eval(env, 0, result.metrics, last=False)
            _log_codebook_figures(env, tok, result, 0)
        _log_reconstructions(env, tok, preview, 0)


def _log_codebook_figures(env: JobEnv, tok: Any, result: TokenizerEval, step: int) -> None:
    """`codebook/usage` and `codebook/projection`: one picture per key per eval, with MLflow's step slider."""
    split = "eval split" if any(k.startswith("eval/") for k in result.metrics) else "preview batch"
    env.run.log_image(figures.figure_image(figures.usage_histogram(result.counts, step, split)), key="codebook/usage",
                      step=step)
    if result.vectors.shape[0]:
        codebook = tok.quantizer.effective_codebook().detach().float().cpu()
        fig = figures.codebook_projection(result.vectors, codebook, result.counts > 0, step, split)
        env.run.log_image(figures.figure_image(fig), key="codebook/projection", step=step)


@torch.no_grad()
def _log_reconstructions(env: JobEnv, tok: Any, preview: torch.Tensor | None, step: int) -> None:
    """`images/reconstructions`: 8 training images (row "original") above their reconstructions."""
    if preview is None:
        return
    was_training = tok.training
    tok.eval()
    try:
        rec = tok.decode(tok.encode(preview))
    finally:
        tok.train(was_training)
    env.run.log_image(figures.reconstruction_grid(preview, rec), key="images/reconstructions", step=step)
