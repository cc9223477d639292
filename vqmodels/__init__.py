"""vqmodels: pure-PyTorch VQ tokenizers, MaskGIT and the vector-quantization layer.

Attributes load lazily so that torch-free submodules (`vqmodels.quantize.options`, used by the
job spec) can be imported on machines without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VectorQuantizer": "vqmodels.quantize.quantizer",
    "QuantizerOutput": "vqmodels.quantize.quantizer",
    "QuantizerOptions": "vqmodels.quantize.options",
    "PRESETS": "vqmodels.quantize.options",
    "Tokenizer": "vqmodels.tokenizer",
    "TokenizerConfig": "vqmodels.tokenizer",
    "TokenizerOutput": "vqmodels.tokenizer",
    "MaskGIT": "vqmodels.maskgit",
    "MaskGITConfig": "vqmodels.maskgit",
    "MaskGITOutput": "vqmodels.maskgit",
    "ARTransformer": "vqmodels.ar",
    "ARConfig": "vqmodels.ar",
    "save": "vqmodels.checkpoint",
    "load": "vqmodels.checkpoint",
    "load_tokenizer": "vqmodels.checkpoint",
    "load_model": "vqmodels.checkpoint",
    "load_generator": "vqmodels.checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vqmodels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
