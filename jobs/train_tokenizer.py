"""Stage one on Ray Train: train a VQ tokenizer, evaluate it, log pictures, register it.

What the tokenizer brings to the shared loop (`jobs.trainer.train`): the generator under DDP and the
discriminator beside it (its gradients averaged separately), the quantizer keeping codebooks identical across
ranks through its own collectives (`SyncClock` times them), reconstructions of a preview batch (8 training
images) and codebook figures, and a step-0 baseline evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs import figures, model_card
from jobs.batches import eval_batches, image_loader
from jobs.build import tokenizer_config
from jobs.evaluation import TokenizerEval, tokenizer_metrics
from jobs.job import JobEnv
from jobs.judges import Judges, open_judges
from jobs.optim import Precision, set_lr
from jobs.progress import SyncClock, log_eval
from jobs.testhooks import record_codebook
from jobs.trainer import Step, Task, log_model, train
from jobs.worker import average_gradients, wrap_ddp

PREVIEW_IMAGES = 8
PROJECTION_VECTORS = 4096


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=tokenizer job."""
    train(config, TokenizerTask)


class TokenizerTask(Task):
    """The tokenizer (generator + discriminator) and its two optimisers, for `jobs.trainer.train`."""

    codebook_sync = True
    step_zero_needs_batch = True  # the baseline reconstructs the preview: the first training batch

    def __init__(self, env: JobEnv):
        from vqmodels.tokenizer import Tokenizer

        SyncClock.install()
        self.env = env
        spec, worker, o = env.spec, env.worker, env.spec.optim
        torch.manual_seed(o.seed)  # identical initial weights on every rank
        self.tok = tok = Tokenizer(tokenizer_config(spec)).to(worker.device)
        self.model = wrap_ddp(tok, worker, ignore_prefix="discriminator.")
        self.gen_params = tok.generator_parameters()
        self.optimizer = torch.optim.AdamW(self.gen_params, lr=o.lr, betas=(0.9, 0.99), weight_decay=o.weight_decay)
        self.disc_params = list(tok.discriminator.parameters()) if tok.discriminator is not None else []
        self.dopt = (torch.optim.AdamW(self.disc_params, lr=o.lr, betas=(0.9, 0.99), weight_decay=o.weight_decay)
                     if self.disc_params else None)
        self.prec, self.dprec = Precision(o.precision, worker.device), Precision(o.precision, worker.device)
        self.judges = open_judges(env, "tokenizer")
        self.preview: torch.Tensor | None = None  # the first training batch's first images
        self.last_eval: TokenizerEval | None = None

    def train_loader(self) -> Any:
        return image_loader(self.env.spec, self.env.worker, train=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.tok.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.prec.scaler.state_dict(),
            "disc_optimizer": self.dopt.state_dict() if self.dopt is not None else None,
            "disc_scaler": self.dprec.scaler.state_dict(),
            "config": self.tok.config_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tok.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.prec.scaler.load_state_dict(state["scaler"])
        if self.dopt is not None:
            self.dopt.load_state_dict(state["disc_optimizer"])
            self.dprec.scaler.load_state_dict(state["disc_scaler"])
            for group in self.dopt.param_groups:  # checkpoints from before it followed the spec carry AdamW's 0.01
                group["weight_decay"] = self.env.spec.optim.weight_decay

    def set_lr(self, factor: float) -> None:
        set_lr(self.optimizer, factor)
        if self.dopt is not None:
            set_lr(self.dopt, factor)

    def prepare(self, batch: Any) -> torch.Tensor:
        images, _ = batch
        images = images.to(self.env.worker.device, non_blocking=True)
        if self.preview is None:
            self.preview = images[:PREVIEW_IMAGES].detach().clone()
        return images

    def train_step(self, images: torch.Tensor, step: int) -> Step:
        tok, prec, dprec, o = self.tok, self.prec, self.dprec, self.env.spec.optim
        with prec.autocast():
            # fp16 with the GAN on: the adaptive weight's own backward passes need the scaler's scale
            scale = prec.scaler.get_scale() if prec.scaler.is_enabled() and tok.adversarial_factor(step) > 0 else 1.0
            out = self.model(images, step, scale)
        grad_norm = prec.step(out.losses["total"], self.optimizer, self.gen_params, o.grad_clip)
        disc_metrics: dict[str, Any] = {}  # device tensors, read back when logged (see log_train_step)
        if self.dopt is not None and tok.adversarial_factor(step) > 0:
            with dprec.autocast():
                d = tok.discriminator_loss(images, out.reconstruction, step)
            dprec.step(d.loss, self.dopt, self.disc_params, o.grad_clip, sync=average_gradients)
            disc_metrics = {"loss/disc": d.loss.detach(), **{f"disc/{k}": v for k, v in d.metrics.items()}}
        metrics = {f"loss/{k}": v.detach() for k, v in out.losses.items()}
        metrics.update({f"vq/{k}": v for k, v in out.metrics.items() if k not in ("psnr", "adv_weight")})
        metrics.update(disc_metrics)
        metrics["train/psnr"] = out.metrics["psnr"]
        if "adv_weight" in out.metrics:
            metrics["train/adv_weight"] = out.metrics["adv_weight"]
        return Step(metrics, images.shape[0], grad_norm)

    def evaluate(self, step: int, last: bool) -> dict[str, float] | None:
        env = self.env
        self.last_eval = evaluate(self.tok, env.spec, env.worker, self.preview, self.judges, last)
        return self.last_eval.metrics if self.last_eval is not None else None

    def log_eval_figures(self, step: int) -> None:
        if self.last_eval is not None:
            _log_codebook_figures(self.env, self.tok, self.last_eval, step)

    def log_pictures(self, step: int) -> None:
        _log_reconstructions(self.env, self.tok, self.preview, step)

    def log_step_zero(self) -> None:
        """Step 0's pictures and cheap metrics (no feature networks), before any training or k-means init: a
        baseline for every chart, and MLflow's image cards open at step 0 (its default), so they show a picture
        from the start. Every rank takes part (the eval pass reduces across ranks)."""
        env, tok, worker = self.env, self.tok, self.env.worker
        result = evaluate(tok, env.spec, worker, self.preview, self.judges, last=False, networks=False)
        if worker.is_main:
            if result is not None:
                log_eval(env, 0, result.metrics, last=False)
                _log_codebook_figures(env, tok, result, 0)
            _log_reconstructions(env, tok, self.preview, 0)

    def finishing(self) -> None:
        record_codebook(self.env, self.tok.quantizer.effective_codebook())

    def register(self, final: dict[str, float]) -> str:
        """The inference model (config + weights, no discriminator), with its model card."""
        spec, tok = self.env.spec, self.tok
        side = spec.data.image_size // tok.config.downsample
        return log_model(self.env, "tokenizer", tok, lambda d: tok.save(d, inference_only=True), final, self.judges,
                         dataset=spec.data.eval or "preview", grid=(side, side),
                         example=model_card.input_example("tokenizer", spec.data.image_size))


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
