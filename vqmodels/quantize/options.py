"""Every option of `VectorQuantizer`, its default, and the named presets.

This module imports no torch on purpose: the job spec (and through it the service) builds its
`quantizer:` section from these dataclass fields, so the names are defined in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Estimator = Literal["ste", "rotation"]
Affine = Literal["none", "learned", "running"]
Codebook = Literal["plain", "simvq"]
Update = Literal["gradient", "ema", "soft_em"]
Distance = Literal["l2", "cosine"]
Method = Literal["vq", "fsq", "lfq"]


@dataclass
class QuantizerOptions:
    """Options of `VectorQuantizer`; the defaults are a bare straight-through VQ layer (preset "plain")."""

    method: Method = "vq"  # "fsq": finite scalar quantization; "lfq": lookup-free (signs); both: implicit codebook
    fsq_levels: list[int] = field(default_factory=list)  # FSQ levels per dimension, e.g. [8, 8, 8, 5, 5, 5]: their product is the codebook size; [] = the paper's levels for codebook_size (FSQ_LEVELS)
    lfq_entropy_weight: float = 0.3  # LFQ: weight of MAGVIT-v2's entropy loss (the paper: 0.1; see lfq_temperature)
    lfq_diversity: float = 1.0  # LFQ: weight of the codebook (batch) entropy inside it
    lfq_temperature: float = 0.1  # LFQ: T of p(c|z) = softmax(-|z - c|^2 / T); the paper's 0.01 saturates at init (BENCHMARKS)
    lfq_commitment: float = 0.25  # LFQ: weight of |z - sg(sign(z))|^2
    beta: float = 0.95  # loss = (1-beta)*|z - sg(z_q)|^2 + beta*|sg(z) - z_q|^2
    estimator: Estimator = "ste"  # gradient to z: straight-through, or the rotation trick (Fifty et al. 2024)
    affine: Affine = "none"  # codebook used as scale*c + bias with shared parameters (Huh et al. 2023)
    affine_groups: int = 1  # codes split into this many groups, each with its own scale/bias
    affine_lr: float = 1.0  # learning-rate multiplier of the learned affine parameters
    codebook_lr: float = 1.0  # learning-rate multiplier of gradient-trained codes (c = lr * w), also under Adam
    affine_momentum: float = 0.1  # EMA momentum of the running affine statistics
    sync_nu: float = 0.0  # synchronised commitment: codebook also gets nu * task gradient at z_q
    alternating: bool = False  # in-place codebook step on the commitment error before the task step
    alternating_lr: float = 0.5  # step of that in-place step, as a fraction of the Gauss-Newton step
    kmeans_init: bool = False  # k-means++ seeding + Lloyd on the first training batch(es)
    kmeans_iters: int = 10  # Lloyd iterations after k-means++ seeding
    kmeans_samples: int = 16384  # at most this many vectors (across all ranks) feed the k-means init
    replace_every: int = 0  # steps; codes unused over the last window are replaced (0 = off)
    replace_noise: float = 0.01  # perturbation of replacement vectors, relative to the inputs' std
    replace_threshold: int = 1  # codes used fewer times than this over the window (all ranks) count as dead
    replace_sampling: Literal["uniform", "error"] = "uniform"  # "error": pick inputs with p ∝ |z - z_q|^2
    codebook: Codebook = "plain"  # "simvq": frozen random codebook through one learned linear layer
    update: Update = "gradient"  # "ema" (hard EM) or "soft_em" (Roy et al. 2018) update the codebook themselves
    ema_decay: float = 0.99  # decay of the EMA counts and sums
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    soft_em_samples: int = 8  # codes drawn per vector from softmax(-|z - e_k|^2 / T) in soft EM
    soft_em_temperature: float = 1.0  # T of that softmax
    distance: Distance = "l2"  # "cosine": vectors and codes are l2-normalised before matching
    usage_window: int = 100  # steps over which "usage_window" and dead codes are counted
    chunk_size: int = 1024  # rows per distance/argmin chunk (keeps the N x K block in cache)


# FSQ levels the FSQ paper recommends per target bit count (Mentzer et al. 2023, Table 1 and appendix); the
# codebook is their product, close to 2^bits
FSQ_LEVELS: dict[int, tuple[int, ...]] = {
    8: (8, 6, 5),
    10: (8, 5, 5, 5),
    12: (7, 5, 5, 5, 5),
    14: (8, 8, 8, 6, 5),
    16: (8, 8, 8, 5, 5, 5),
    18: (8, 8, 8, 8, 8, 8),
}


def _paper_levels(codebook_size: int) -> list[int] | None:
    """The FSQ paper's levels whose product is `codebook_size`, if the table has them."""
    return next((list(v) for v in FSQ_LEVELS.values() if math.prod(v) == codebook_size), None)


def fsq_levels_for(levels: list[int], codebook_size: int) -> list[int]:
    """`levels`, or when none are given the FSQ paper's levels for `codebook_size`; a ValueError naming the field
    when the product does not match (a spec reports it under `quantizer.fsq_levels`)."""
    if not levels:
        paper = _paper_levels(codebook_size)
        if paper is None:
            raise ValueError(f"fsq_levels: none given, and the FSQ paper has no levels for codebook_size "
                             f"{codebook_size}; name them ({fsq_levels_hint(codebook_size)})")
        return paper
    levels = [int(x) for x in levels]
    if math.prod(levels) != codebook_size:
        raise ValueError(f"fsq_levels: {levels} give {math.prod(levels)} codes, but codebook_size is {codebook_size}; "
                         f"codebook_size must equal the product of the levels ({fsq_levels_hint(codebook_size)})")
    return levels


def fsq_levels_hint(codebook_size: int) -> str:
    """What to write instead, for an error about fsq_levels that do not give `codebook_size` codes."""
    paper = _paper_levels(codebook_size)
    if paper is not None:
        return f"the FSQ paper's levels for {codebook_size} codes are {paper}"
    table = "; ".join(f"{list(v)} = {math.prod(v):,}" for v in FSQ_LEVELS.values())
    return f"the FSQ paper's levels: {table}"


PRESETS: dict[str, dict[str, Any]] = {
    # bare straight-through VQ (van den Oord et al. 2017)
    "plain": {},
    # what a job gets when it names nothing; chosen by measurement (docs/BENCHMARKS.md, bench/vq_quality.py)
    "default": {
        "kmeans_init": True,
        "affine": "running",
        "sync_nu": 0.2,
        "replace_every": 20,
        "beta": 0.95,
    },
    # finite scalar quantization (Mentzer et al. 2023): the paper's levels for codebook_size (1,000, 15,360, 64,000, ...),
    # or name fsq_levels, e.g. [8, 8, 8, 5, 5, 5] for 64,000 codes
    "fsq": {"method": "fsq"},
    # lookup-free quantization (MAGVIT-v2): codebook_size = 2^bits, with its entropy loss. The lfq_* defaults are
    # measured at 14 bits (docs/BENCHMARKS.md): at the paper's T = 0.01 the sigmoids saturate at init and bits that
    # start on one side never move (128 of 16,384 codes used); T = 0.1 and weight 0.3 keep all bits alive, +1 dB
    "lfq": {"method": "lfq"},
    # the classic recipe: EMA codebook, k-means init, dead-code replacement
    "ema": {"update": "ema", "kmeans_init": True, "replace_every": 20},
    # rotation-trick gradients on top of the default recipe
    "rotation": {"estimator": "rotation", "kmeans_init": True, "affine": "running", "replace_every": 20},
    # SimVQ: frozen codebook through one learned linear layer
    "simvq": {"codebook": "simvq", "kmeans_init": True, "replace_every": 20},
    # the paper's full recipe: learned affine, alternating optimisation, synchronised commitment, replacement
    "huh2023": {
        "affine": "learned",
        "affine_lr": 10.0,
        "alternating": True,
        "sync_nu": 0.2,
        "kmeans_init": True,
        "replace_every": 20,
        "beta": 0.98,
    },
}

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(QuantizerOptions))


def resolve_options(preset: str | None = None, **options: Any) -> QuantizerOptions:
    """Merge a preset with explicit options (explicit wins) and check every value.

    Raises ValueError naming the offending option, so a bad spec fails before any training starts.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown quantizer option(s) {unknown}; known: {list(OPTION_NAMES)}")
    merged = {**PRESETS.get(preset or "plain", {}), **options}
    if merged.get("fsq_levels") is not None:
        merged["fsq_levels"] = [int(x) for x in merged["fsq_levels"]]  # tuples too; a copy, never the caller's
    opts = QuantizerOptions(**merged)
    validate(opts)
    return opts


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {list(allowed)}")


VQ_ONLY = {  # options that shape a learned codebook; FSQ and LFQ have none
    "estimator": "ste", "affine": "none", "sync_nu": 0.0, "alternating": False, "kmeans_init": False,
    "replace_every": 0, "codebook": "plain", "update": "gradient", "distance": "l2",
}


def validate(o: QuantizerOptions) -> None:
    """Check ranges and combinations; each error names its option."""
    _choice("method", o.method, ("vq", "fsq", "lfq"))
    if o.method != "vq":
        for name, plain in VQ_ONLY.items():
            if getattr(o, name) != plain:
                raise ValueError(f"{name}: applies to method='vq' only (an {o.method.upper()} codebook is fixed); "
                                 f"use preset {o.method!r}, or set {name}={plain!r}")
    if o.method == "fsq" and any(int(x) < 2 for x in o.fsq_levels):
        raise ValueError(f"fsq_levels: each level must be >= 2 (e.g. [8, 8, 8, 5, 5, 5]), got {list(o.fsq_levels)}")
    if o.lfq_temperature <= 0 or o.lfq_entropy_weight < 0 or o.lfq_commitment < 0:
        raise ValueError("lfq_temperature must be > 0; lfq_entropy_weight and lfq_commitment >= 0")
    _choice("estimator", o.estimator, ("ste", "rotation"))
    _choice("affine", o.affine, ("none", "learned", "running"))
    _choice("codebook", o.codebook, ("plain", "simvq"))
    _choice("update", o.update, ("gradient", "ema", "soft_em"))
    _choice("distance", o.distance, ("l2", "cosine"))
    if not 0.0 <= o.beta <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {o.beta}")
    if o.sync_nu < 0:
        raise ValueError(f"sync_nu: must be >= 0, got {o.sync_nu}")
    if o.codebook_lr <= 0:
        raise ValueError(f"codebook_lr: must be > 0, got {o.codebook_lr}")
    if o.codebook_lr != 1.0 and (o.update != "gradient" or o.codebook == "simvq"):
        raise ValueError("codebook_lr: only gradient-trained plain codebooks have a learning rate (update='gradient', codebook='plain')")
    if o.affine_groups < 1:
        raise ValueError(f"affine_groups: must be >= 1, got {o.affine_groups}")
    _choice("replace_sampling", o.replace_sampling, ("uniform", "error"))
    if o.replace_threshold < 1:
        raise ValueError(f"replace_threshold: must be >= 1 (1 = only unused codes), got {o.replace_threshold}")
    if o.replace_every < 0:
        raise ValueError(f"replace_every: must be >= 0 (0 = off), got {o.replace_every}")
    if not 0.0 < o.ema_decay < 1.0:
        raise ValueError(f"ema_decay: must be in (0, 1), got {o.ema_decay}")
    if o.soft_em_samples < 1:
        raise ValueError(f"soft_em_samples: must be >= 1, got {o.soft_em_samples}")
    if o.kmeans_iters < 0 or o.kmeans_samples < 1:
        raise ValueError("kmeans_iters must be >= 0 and kmeans_samples >= 1")
    if o.chunk_size < 1 or o.usage_window < 1:
        raise ValueError("chunk_size and usage_window must be >= 1")
    if o.codebook == "simvq" and o.update != "gradient":
        raise ValueError("update: SimVQ learns its projection by gradient; use update='gradient' with codebook='simvq'")
    if o.codebook == "simvq" and o.affine != "none":
        raise ValueError("affine: SimVQ's linear layer already re-parameterises the codebook; use affine='none'")
    if o.alternating and o.update != "gradient":
        raise ValueError("alternating: the in-place step is a gradient step; it needs update='gradient'")


def options_dict(o: QuantizerOptions) -> dict[str, Any]:
    """Plain-JSON form, stored in checkpoints so a model carries its quantizer config."""
    return dataclasses.asdict(o)
