"""From a fresh process: pull a registered tokenizer from MLflow (MLFLOW_TRACKING_URI) and round-trip images.

Usage: pull_model.py models:/NAME@ALIAS IMAGE_TAR
"""

import io
import sys
import tarfile

import numpy as np
import torch
from PIL import Image

import vqmodels

uri, image_tar = sys.argv[1], sys.argv[2]
tok = vqmodels.load_tokenizer(uri)
images = []
with tarfile.open(image_tar) as tar:
    for member in tar:
        if member.isfile() and len(images) < 8:
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((32, 32))
            images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
batch = torch.stack(images)
with torch.no_grad():
    codes = tok.encode(batch)
    recon = tok.decode(codes)
assert codes.dtype == torch.long and codes.shape[0] == len(images), (codes.dtype, codes.shape)
assert recon.shape == batch.shape, (recon.shape, batch.shape)
assert torch.isfinite(recon).all()
mse = torch.mean((recon - batch) ** 2).item()
print(
    f"pulled {uri}: encode {tuple(batch.shape)} -> codes {tuple(codes.shape)}, decode -> {tuple(recon.shape)}, mse {mse:.4f}"
)
