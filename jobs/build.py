"""Spec → model configs: the one place where the job spec's field names meet `vqmodels`' configs.

Takes a validated `JobSpec`: what the spec checks (model sizes, the image size against the downsampling) is
not checked again here. Errors name the spec's field (`model.adversarial`, …), not the config's, so a user
can fix the YAML.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.spec import JobSpec, MaskGITModelSpec, SpecError, TokenizerModelSpec


def _error(loc: str, msg: str) -> SpecError:
    return SpecError([{"loc": loc, "msg": msg}])


def tokenizer_config(spec: JobSpec) -> Any:
    """The `vqmodels.tokenizer.TokenizerConfig` of a tokenizer job (quantizer options fully resolved)."""
    from vqmodels.tokenizer import TokenizerConfig

    m = spec.model
    if not isinstance(m, TokenizerModelSpec):
        raise _error("model", f"kind={spec.kind} has no tokenizer model")
    fields: dict[str, Any] = dict(
        channels=m.channels,
        downsample=m.downsample,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.res_blocks,
        attention=m.attention,
        code_dim=m.code_dim,
        codebook_size=m.codebook_size,
        rec_loss=m.rec_loss,
        quantizer_preset=None,
        quantizer=dataclasses.asdict(spec.quantizer.options()),
    )
    if m.adversarial is not None:
        a = m.adversarial
        if spec.data.image_size < 32:  # the 3-layer patch discriminator needs 32 px to leave a patch
            raise _error("model.adversarial", f"needs data.image_size >= 32, got {spec.data.image_size}")
        fields.update(adv_weight=a.weight, adv_start=a.start_step, adv_loss=a.loss, disc_channels=a.disc_channels)
    if m.perceptual is not None:
        fields.update(perceptual_weight=m.perceptual.weight, perceptual_path=m.perceptual.weights)
    try:
        return TokenizerConfig(**fields)
    except ValueError as e:
        raise _error("model", str(e)) from e


def maskgit_config(spec: JobSpec, tokenizer: Any) -> Any:
    """The `vqmodels.maskgit.MaskGITConfig` of a maskgit job over `tokenizer`'s token grid."""
    from vqmodels.maskgit import MaskGITConfig

    m = spec.model
    if not isinstance(m, MaskGITModelSpec):
        raise _error("model", f"kind={spec.kind} has no MaskGIT model")
    side = spec.data.image_size // tokenizer.config.downsample
    try:
        return MaskGITConfig(
            codebook_size=tokenizer.config.codebook_size,
            grid_size=(side, side),
            dim=m.dim,
            depth=m.depth,
            heads=m.heads,
            mlp_ratio=m.mlp_ratio,
            schedule=m.schedule,
            label_smoothing=m.label_smoothing,
            class_dropout=m.class_dropout,
            num_classes=m.num_classes or 0,
        )
    except (TypeError, ValueError) as e:
        raise _error("model", str(e)) from e
