"""The field's metrics over an eval split, one code path for training jobs and `vqtrain eval`.

Tokenizers: PSNR, SSIM, LPIPS, rFID (Inception pool3 features of the originals against those of their
reconstructions), code usage / perplexity / dead codes, bits per image. Generators (MaskGIT): masked-token
NLL against the unigram entropy of the same tokens, and over class-balanced samples FID, Inception Score and,
with a user's classifier, class-consistency accuracy and the FD in its features.

Every rank reads its share of the split (each sample once) and the sums and feature statistics are added
across ranks, so N workers give the number one worker gives. Samples are made in fixed batches, batch b on
rank b mod N with its own seed, so they too are the same samples whatever N is. A metric whose network was
not named is left out and listed in `Judges.skipped` with the reason; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from jobs.judges import SAMPLE_SEED, Judges, classifier_out
from jobs.spec import EvaluationSpec
from jobs.worker import all_gather, all_reduce_sum
from vqmodels.metrics import (
    GaussianStats,
    bits_per_image,
    entropy_bits,
    frechet_distance,
    inception_score,
    psnr,
    ssim,
    to_uint8,
)

Reduce = Callable[[torch.Tensor], Any]
SAMPLE_BATCH = 50  # samples per generation batch: fixed, so the samples do not depend on the worker count


# ----------------------------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerEval:
    metrics: dict[str, float]  # "eval/psnr", "eval/rfid", ... ("preview/..." when rank 0's preview stood in)
    counts: torch.Tensor  # (K,) code counts over the split, all ranks
    vectors: torch.Tensor  # a sample of encoder outputs (rank 0's), for the projection figure


@torch.no_grad()
def tokenizer_metrics(tok: Any, batches: Iterable[tuple[torch.Tensor, Any]], judges: Judges, device: torch.device, *,
                      prefix: str = "eval", networks: bool = True, keep_vectors: int = 0,
                      reduce: Reduce = all_reduce_sum) -> TokenizerEval | None:
    """Reconstruction metrics of `tok` over `batches` (this rank's share of the split); None if empty.
    `networks=False` leaves out the feature-network metrics (rFID, LPIPS) for a cheap pass."""
    k = tok.config.codebook_size
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # psnr, ssim, lpips, images, quant error, vectors
    real = GaussianStats(2048, device) if (networks and judges.inception is not None) else None
    recon = GaussianStats(2048, device) if real is not None else None
    vectors: list[torch.Tensor] = []
    kept = 0
    was_training = tok.training
    tok.eval()
    try:
        for images, _ in batches:
            if images.shape[0] == 0:
                continue
            x = images.to(device)
            z = tok.encoder(x).permute(0, 2, 3, 1)
            q = tok.quantizer(z)  # eval mode: no collectives, no codebook updates
            rec = tok.decoder(q.z_q.permute(0, 3, 1, 2)).clamp(-1, 1)
            n_vec = q.indices.numel()
            lp = judges.lpips(rec, x).sum() if (networks and judges.lpips is not None) else x.new_zeros(())
            sums += torch.stack([psnr(rec, x).sum(), ssim(rec, x).sum(), lp.float(), x.new_tensor(float(x.shape[0])),
                                 q.metrics["quant_error"].float() * n_vec, x.new_tensor(float(n_vec))]).double()
            counts += torch.bincount(q.indices.reshape(-1), minlength=k).double()
            if real is not None and recon is not None:
                real.update(judges.inception(to_uint8(x))[0])
                recon.update(judges.inception(to_uint8(rec))[0])
            if kept < keep_vectors:
                flat = z.reshape(-1, z.shape[-1]).float()
                if tok.quantizer.options.distance == "cosine":
                    flat = F.normalize(flat, dim=-1)
                vectors.append(flat[: keep_vectors - kept].cpu())
                kept += vectors[-1].shape[0]
    finally:
        tok.train(was_training)
    reduce(sums)
    reduce(counts)
    if real is not None and recon is not None:
        real.reduce(reduce)
        recon.reduce(reduce)
    n = float(sums[3])
    if n == 0:
        return None
    p = counts / counts.sum().clamp_min(1)
    nats = float(-(p[p > 0] * p[p > 0].log()).sum())
    grid = round(float(sums[5]) / n)  # tokens per image
    m = {
        "psnr": float(sums[0]) / n,
        "ssim": float(sums[1]) / n,
        "usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(nats),
        "dead_codes": float((counts == 0).sum()),
        "quant_error": float(sums[4] / sums[5].clamp_min(1)),
        "images": n,
        "bits_per_image": bits_per_image(grid, k),
        "entropy_bits_per_image": grid * entropy_bits(counts),
    }
    if networks and judges.lpips is not None:
        m["lpips"] = float(sums[2]) / n
    if real is not None and recon is not None and real.count >= 2:
        m["rfid"] = frechet_distance(*real.mean_cov(), *recon.mean_cov())
    vec = torch.cat(vectors) if vectors else torch.zeros(0, tok.config.code_dim)
    return TokenizerEval({f"{prefix}/{key}": v for key, v in m.items()}, counts.cpu(), vec)


# ----------------------------------------------------------------------------------------- generator


def eval_masks(tokens: torch.Tensor, seed: int, schedule: str) -> torch.Tensor:
    """(B, N) bool masks that depend only on each sample's codes and `seed` (not on its batch, rank or worker
    count): MaskGIT's training masking (r ~ U(0, 1), ⌈γ(r)·N⌉ random positions) from a per-sample generator."""
    import zlib

    from vqmodels.maskgit import gamma

    flat = tokens.reshape(tokens.shape[0], -1).long().cpu()
    b, n = flat.shape
    r, scores = torch.empty(b), torch.empty(b, n)
    for i in range(b):
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(flat[i].numpy().tobytes())) % 2**63)
        r[i] = torch.rand(1, generator=g)[0]
        scores[i] = torch.rand(n, generator=g)
    counts = torch.ceil(gamma(r, schedule) * n).long().clamp(1, n)
    return (scores.argsort(1).argsort(1) < counts[:, None]).to(tokens.device)


@torch.no_grad()
def masked_nll(net: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
               seed: int = 1234, reduce: Reduce = all_reduce_sum) -> dict[str, float] | None:
    """Masked-token NLL (nats, no label smoothing) and accuracy over (tokens, labels) batches, each sample
    masked as a function of its own codes (`eval_masks`: evaluations at different steps and on any number
    of workers compare), against the unigram entropy of the same tokens (what a model that knows only the
    code frequencies would score); None for an empty split."""
    k = net.config.codebook_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, correct, masked tokens
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    conditional = net.config.num_classes > 0
    was_training = net.training
    net.eval()
    try:
        for tokens, labels in batches:
            if tokens.shape[0] == 0:
                continue
            targets = tokens.reshape(tokens.shape[0], -1).long()
            mask = eval_masks(targets, seed, net.config.schedule)
            inputs = torch.where(mask, torch.full_like(targets, net.mask_id), targets)
            logits = net.logits(inputs, labels if conditional else None)[mask].float()
            picked = targets[mask]
            sums[0] += F.cross_entropy(logits, picked, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == picked).sum().double()
            sums[2] += picked.numel()
            counts += torch.bincount(targets.reshape(-1), minlength=k).double()
    finally:
        net.train(was_training)
    reduce(sums)
    reduce(counts)
    if sums[2] == 0:
        return None
    nll = float(sums[0] / sums[2])
    unigram = entropy_bits(counts) * math.log(2)  # nats, like the NLL
    return {"eval/nll": nll, "eval/perplexity": math.exp(min(nll, 50.0)), "eval/accuracy": float(sums[1] / sums[2]),
            "eval/unigram_entropy": unigram, "eval/nll_vs_unigram": nll / unigram if unigram > 0 else float("nan")}


def _real_statistics(images: Iterable[tuple[torch.Tensor, Any]], judges: Judges, device: torch.device,
                     reduce: Reduce) -> tuple[GaussianStats | None, GaussianStats | None, int]:
    """(Inception statistics, classifier-feature statistics, image count) of the eval split, all ranks."""
    inc = GaussianStats(2048, device) if judges.inception is not None else None
    clf = GaussianStats(judges.classifier_dim, device) if judges.classifier is not None else None
    n = torch.zeros(1, dtype=torch.float64, device=device)
    for x, _ in images:
        if x.shape[0] == 0:
            continue
        x = x.to(device)
        n += x.shape[0]
        if inc is not None:
            inc.update(judges.inception(to_uint8(x))[0])
        if clf is not None:
            clf.update(classifier_out(judges.classifier, x)[1])
    if clf is not None:
        clf.reduce(reduce)
    if inc is not None:
        inc.reduce(reduce)
    reduce(n)
    return inc, clf, int(n.item())


@torch.no_grad()
def sample_metrics(net: Any, tok: Any, judges: Judges, ev: EvaluationSpec, rank: int, world_size: int,
                   device: torch.device, real_images: Callable[[], Iterable[tuple[torch.Tensor, Any]]] | None, *,
                   reduce: Reduce = all_reduce_sum, batch: int = SAMPLE_BATCH) -> dict[str, float]:
    """FID / IS / class consistency / classifier FD of class-balanced samples (see the module docstring)."""
    wanted = judges.inception is not None or judges.classifier is not None
    if not wanted:
        return {}
    real_inc = real_clf = None
    n_real = 0
    if real_images is not None and (judges.reference is None or judges.classifier is not None):
        if "real" not in judges.real_cache:
            judges.real_cache["real"] = _real_statistics(real_images(), judges, device, reduce)
        real_inc, real_clf, n_real = judges.real_cache["real"]
    # FID compares with the eval split (at most its size in samples) or the reference file; IS and class
    # consistency need no reference
    n = min(ev.num_samples, n_real) if (judges.reference is None and n_real >= 2) else ev.num_samples
    classes = net.config.num_classes
    fake_inc = GaussianStats(2048, device) if judges.inception is not None else None
    fake_clf = GaussianStats(judges.classifier_dim, device) if real_clf is not None else None
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # right, judged
    logits_parts: list[tuple[int, torch.Tensor]] = []
    was_training = net.training
    net.eval()
    try:
        for b in range(rank, math.ceil(n / batch), world_size):
            idx = torch.arange(b * batch, min(n, (b + 1) * batch), device=device)
            labels = idx % classes if classes else None
            gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED + b)
            codes = net.generate(idx.numel(), steps=min(ev.sample_steps, net.config.num_tokens), labels=labels,
                                 guidance=ev.guidance if classes else 0.0, temperature=ev.temperature,
                                 choice_temperature=ev.choice_temperature, generator=gen)
            images = tok.decode(codes).clamp(-1, 1)
            if fake_inc is not None:
                feats, logits = judges.inception(to_uint8(images))
                fake_inc.update(feats)
                logits_parts.append((b, logits.cpu()))
            if judges.classifier is not None:
                clf_logits, clf_feats = classifier_out(judges.classifier, images)
                if labels is not None:
                    correct += torch.stack([(clf_logits.argmax(1) == labels).sum(), idx.new_tensor(idx.numel())]).double()
                if fake_clf is not None:
                    fake_clf.update(clf_feats)
    finally:
        net.train(was_training)
    out: dict[str, float] = {"eval/samples": float(n)}
    if fake_inc is not None:
        fake_inc.reduce(reduce)
        ref = judges.reference or (real_inc.mean_cov() if real_inc is not None and real_inc.count >= 2 else None)
        if ref is not None:
            out["eval/fid"] = frechet_distance(*ref, *fake_inc.mean_cov())
        parts = sorted(p for rank_parts in all_gather(logits_parts) for p in rank_parts)
        logits = torch.cat([t for _, t in parts])
        if logits.shape[0] >= 10:
            out["eval/inception_score"], out["eval/inception_score_std"] = inception_score(logits)
    if judges.classifier is not None:
        reduce(correct)
        if classes and correct[1] > 0:
            out["eval/class_acc"] = float(correct[0] / correct[1])
        if fake_clf is not None and real_clf is not None and real_clf.count >= 2:
            fake_clf.reduce(reduce)
            out["eval/classifier_fd"] = frechet_distance(*real_clf.mean_cov(), *fake_clf.mean_cov())
    return out
