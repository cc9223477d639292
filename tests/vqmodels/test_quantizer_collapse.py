"""Index collapse: on data where bare straight-through VQ leaves most codes dead, the presets that
carry replacement / affine re-parameterisation keep more than 90% of the codebook in use."""

from __future__ import annotations

import pytest
import torch

from vqmodels import VectorQuantizer


def _data(n: int = 8192) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(512, 16, generator=g) * 2 + 4.0  # far from the N(0, 1) initial codebook
    return centres[torch.randint(512, (n,), generator=g)] + 0.3 * torch.randn(n, 16, generator=g)


def _train_usage(**options) -> float:
    torch.manual_seed(0)
    x = _data()
    enc, dec = torch.nn.Linear(16, 8), torch.nn.Linear(8, 16)
    q = VectorQuantizer(8, 128, **options)
    params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(200):
        batch = x[torch.randint(len(x), (256,))]
        out = q(enc(batch))
        loss = (dec(out.z_q) - batch).pow(2).mean() + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        idx = q(enc(x)).indices
    return idx.unique().numel() / 128


@pytest.fixture(scope="module")
def plain_usage() -> float:
    return _train_usage()


def test_plain_ste_collapses(plain_usage):
    assert plain_usage < 0.5


@pytest.mark.parametrize(
    "options",
    [
        {"preset": "default"},
        {"preset": "huh2023"},
        {"preset": "ema"},
        {"replace_every": 20},  # replacement alone
        {"affine": "running", "kmeans_init": True},  # affine (with k-means init) alone
    ],
    ids=["default", "huh2023", "ema", "replacement", "affine"],
)
def test_fixes_keep_codes_alive(options, plain_usage):
    usage = _train_usage(**options)
    assert usage > 0.9, f"{options}: usage {usage:.2f} (plain STE: {plain_usage:.2f})"
