"""The pyfunc wrapper that registered vqtrain models are logged with ("models from code": MLflow stores
this file, not a pickled class).

`mlflow.pyfunc.load_model("models:/name@alias")` gives a model whose `predict` encodes images to token
ids (tokenizers) or samples token grids (MaskGIT; with `params={"output": "images"}`, uint8 images decoded
by the tokenizer version it recorded, loaded from the registry on first use). Most users skip pyfunc and call
`vqmodels.load_tokenizer(uri)`, which reads the same artifacts directory.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class VQTrainModel(PythonModel):
    """Loads the artifact directory with `vqmodels.load` and serves it."""

    # untyped on purpose: MLflow turns predict's type hints into an input schema
    def load_context(self, context):
        import vqmodels
        from vqmodels.checkpoint import read_meta

        (self.key, path), = context.artifacts.items()
        self.model = vqmodels.load(path)
        self.model.eval()
        self.meta = read_meta(path)
        self.tokenizer = None

    def predict(self, context, model_input, params=None):
        import torch

        import vqmodels
        from vqbase.fetch import fetch_model_dir  # the model's code: vqmodels and vqbase

        if isinstance(model_input, dict):  # a named-tensor signature hands over {"images": array} / {"labels": ...}
            model_input = next(iter(model_input.values()))
        with torch.no_grad():
            if self.key == "tokenizer":
                # images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1]
                x = torch.as_tensor(np.asarray(model_input))
                if x.dtype == torch.uint8:
                    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                return self.model.encode(x.float()).cpu().numpy()
            # MaskGIT: class labels (N,) -> sampled token grids (N, h, w); an unconditional model
            # takes any N values and ignores them
            labels = torch.as_tensor(np.asarray(model_input).astype(np.int64)).reshape(-1)
            params = params or {}
            cond = labels if self.model.config.num_classes else None
            codes = self.model.generate(
                len(labels), steps=int(params.get("steps", 8)), labels=cond,
                guidance=float(params.get("guidance", 0.0)) if cond is not None else 0.0,
                temperature=float(params.get("temperature", 1.0)),
            )
            if params.get("output", "codes") != "images":
                return codes.cpu().numpy()
            if self.tokenizer is None:
                uri = (self.meta.get("extra") or {}).get("tokenizer")
                if not uri:
                    raise ValueError("this MaskGIT does not record its tokenizer: ask for codes instead")
                self.tokenizer = vqmodels.load_tokenizer(uri, fetch=fetch_model_dir)
            images = self.tokenizer.decode(codes).clamp(-1, 1)
            return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


mlflow.models.set_model(VQTrainModel())
