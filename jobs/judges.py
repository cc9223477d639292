"""The judges of an evaluation: the feature networks it uses (Inception for FID/IS/rFID, LPIPS, a user's
classifier), the reference statistics, and the protocol of every number, recorded on the run as tags.

Nothing is downloaded from a public hub: every network comes from weights the spec names (`jobs.eval_weights`
fetches them once per node); a metric whose network is not named is listed in `Judges.skipped`, with why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jobs.spec import EvaluationSpec
from vqmodels.metrics import load_reference, reference_meta

SAMPLE_SEED = 20_251_205  # generator samples: batch b is drawn with SAMPLE_SEED + b (jobs.evaluation)
SSIM_PROTOCOL = "gaussian window 11 px, sigma 1.5, K=(0.01, 0.03) on [0, 1], valid region, mean over RGB"


@dataclass
class Judges:
    """The feature networks an evaluation uses, and what it cannot compute without them."""

    inception: Any | None = None  # vqmodels.metrics.inception.FIDInception
    lpips: Any | None = None  # vqmodels.metrics.lpips.LPIPS
    classifier: Any | None = None  # a TorchScript module: images in [-1, 1] -> logits
    classifier_dim: int = 0  # size of its features
    reference: tuple[np.ndarray, np.ndarray] | None = None  # generator FID reference (mu, sigma)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it is not computed
    protocol: dict[str, str] = field(default_factory=dict)  # how each number is made (tags on the run)
    real_cache: dict[str, Any] = field(default_factory=dict)  # statistics of the eval split, made once per job


def load_judges(ev: EvaluationSpec, kind: str, device: torch.device, image_size: int,
                storage_options: dict[str, Any] | None = None, tracking_uri: str | None = None) -> Judges:
    """Fetch (once per node) and load the networks `ev` names; list the metrics left out and why."""
    from jobs.eval_weights import fetch, sha256_of

    j = Judges()
    get = lambda url, name: fetch(url, f"evaluation.{name}", ev.sha256.get(url), storage_options, tracking_uri)  # noqa: E731
    generator = kind == "maskgit"
    if ev.fid_weights:
        from vqmodels.metrics.inception import load_inception

        path = get(ev.fid_weights, "fid_weights")
        j.inception = load_inception(path, device)
        j.protocol["fid"] = (f"Inception-v3 2015-12-05 pool3 (sha256 {sha256_of(path)[:12]}), uint8 images, TF-1.x "
                             "bilinear resize to 299 (torch-fidelity's network); unbiased covariance")
    else:
        for name in ("fid", "inception_score") if generator else ("rfid",):
            j.skipped[name] = "no evaluation.fid_weights named"
    if ev.lpips_weights and not generator:
        from vqmodels.metrics.lpips import load_lpips

        urls = ev.lpips_weights if isinstance(ev.lpips_weights, list) else [ev.lpips_weights]
        j.lpips = load_lpips([get(u, "lpips_weights") for u in urls]).to(device)
        j.protocol["lpips"] = f"LPIPS v0.1, {j.lpips.net_name} backbone, images in [-1, 1] at the data's size"
    elif not generator:
        j.skipped["lpips"] = "no evaluation.lpips_weights named"
    if ev.classifier:
        path = get(ev.classifier, "classifier")
        j.classifier = load_classifier(path, device, ev.classifier)
        try:
            with torch.no_grad():
                j.classifier_dim = classifier_out(j.classifier, torch.zeros(2, 3, image_size, image_size, device=device))[1].shape[1]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"evaluation.classifier: {ev.classifier} fails on (2, 3, {image_size}, {image_size}) images "
                             f"in [-1, 1]: {e}") from e
        j.protocol["classifier"] = f"{ev.classifier} (sha256 {sha256_of(path)[:12]})"
    else:
        j.skipped["class_acc"] = "no evaluation.classifier named"
        j.skipped["classifier_fd"] = "no evaluation.classifier named"
    if generator and ev.reference_stats:
        ref_path = get(ev.reference_stats, "reference_stats")
        j.reference = load_reference(ref_path)
        meta = reference_meta(ref_path)
        weights_sha = j.protocol.get("fid", "")
        if meta.get("weights_sha256") and ev.fid_weights and meta["weights_sha256"][:12] not in weights_sha:
            raise ValueError(f"evaluation.reference_stats: {ev.reference_stats} was made with other Inception weights "
                             f"(sha256 {meta['weights_sha256'][:12]}): its FID would compare different features")
        if meta.get("image_size") and meta["image_size"] != str(image_size):
            raise ValueError(f"evaluation.reference_stats: {ev.reference_stats} holds {meta['image_size']} px images, "
                             f"this evaluation {image_size} px")
        j.protocol["fid_reference"] = f"{ev.reference_stats} ({meta.get('n', '?')} images of {meta.get('source', '?')})"
    if not generator:
        j.protocol["ssim"] = SSIM_PROTOCOL
    return j


SKIPPED_TAG = "vqtrain.eval.skipped"
PROTOCOL_TAG = "vqtrain.eval.protocol."


def open_judges(env: Any, kind: str) -> Judges:
    """A job's judges (every rank loads them; weights are fetched once per node). Rank 0 records on the run
    how each number is made and which metrics are left out and why (a tag and a log line each)."""
    spec = env.spec
    judges = load_judges(spec.evaluation, kind, env.worker.device, spec.data.image_size, spec.data.storage_options,
                         env.tracking_uri)
    if kind == "maskgit":
        judges.protocol.update(sampling_protocol(spec.evaluation, spec.model.num_classes or 0))
        if judges.inception is not None and judges.reference is None and not image_split(spec):
            judges.skipped["fid"] = "no image eval split and no evaluation.reference_stats to compare samples with"
    judges.protocol["split"] = f"{spec.data.eval} (every image once), at {spec.data.image_size} px"
    if env.worker.is_main:
        record_judges(env.run, judges)
    return judges


def image_split(spec: Any) -> bool:
    """Whether the spec's eval split holds images (token shards cannot be compared with samples in feature
    space)."""
    from jobs.data.manifest import resolve_shards
    from vqbase.protocol import allowed_roots_from_env

    if spec.data.eval is None:
        return False
    manifest = resolve_shards(spec.data.eval, spec.data.storage_options, allowed_roots_from_env()).manifest
    return manifest is None or manifest.kind != "tokens"


def record_judges(run: Any, judges: Judges) -> None:
    """Tags and a log line: the protocol of every number, and what is not computed."""
    if run is None:
        return
    for key, text in judges.protocol.items():
        run.set_tag(PROTOCOL_TAG + key, text[:5000])
    if judges.skipped:
        text = "; ".join(f"{m}: {why}" for m, why in judges.skipped.items())
        run.set_tag(SKIPPED_TAG, text[:5000])
        print(f"vqtrain note: not computed: {text}", flush=True)  # not "vqtrain: ", which reports a failure


def load_classifier(path: Any, device: torch.device, name: str) -> Any:
    """A user's classifier: a TorchScript file (`torch.jit.save`) or a `torch.export` program (`.pt2`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still what most ship
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except Exception as jit_error:  # noqa: BLE001 - maybe an exported program
            try:
                return torch.export.load(str(path)).module().to(device)
            except Exception:  # noqa: BLE001 - neither: report the TorchScript error, the common case
                raise ValueError(f"evaluation.classifier: {name} is not a TorchScript module nor a torch.export "
                                 f"program: {jit_error}") from jit_error


def classifier_out(clf: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of a user classifier; its logits stand in for features without a `features` method."""
    logits = clf(images)
    feats = clf.features(images) if hasattr(clf, "features") else logits
    return logits.float(), feats.float().flatten(1)


def sampling_protocol(ev: EvaluationSpec, classes: int) -> dict[str, str]:
    """The settings generator numbers depend on, as tags."""
    return {"sampling": (f"up to {ev.num_samples} samples{' class-balanced' if classes else ''} (at most the eval "
                         f"split's size without reference_stats; the count used is eval/samples), {ev.sample_steps} steps, "
                         f"guidance {ev.guidance}, temperature {ev.temperature}, choice temperature "
                         f"{ev.choice_temperature}, seed {SAMPLE_SEED} + batch")}
