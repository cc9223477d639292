"""The pyfunc wrapper that registered vqtrain models are logged with ("models from code": MLflow stores
this file, not a pickled class).

`mlflow.pyfunc.load_model("models:/name@alias")` gives a model whose `predict` encodes images to token
ids (tokenizers) or samples token grids (MaskGIT). Most users skip pyfunc and call
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

        (self.key, path), = context.artifacts.items()
        self.model = vqmodels.load(path)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        with torch.no_grad():
            if self.key == "tokenizer":
                # images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1]
                x = torch.as_tensor(np.asarray(model_input))
                if x.dtype == torch.uint8:
                    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                return self.model.encode(x.float()).cpu().numpy()
            # MaskGIT: class labels (N,) -> sampled token grids (N, h, w); an unconditional model
            # takes any N values and ignores them
            labels = torch.as_tensor(np.asarray(model_input)).long().reshape(-1)
            steps = int((params or {}).get("steps", 8))
            cond = labels if self.model.config.num_classes else None
            return self.model.generate(len(labels), steps=steps, labels=cond).cpu().numpy()


mlflow.models.set_model(VQTrainModel())
