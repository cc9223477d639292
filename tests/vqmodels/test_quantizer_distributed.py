"""Two gloo processes (torch.multiprocessing, no Ray): codebooks stay bit-identical, nothing hangs."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vqmodels import VectorQuantizer

SCENARIOS = {
    # the acceptance scenario: k-means init, replacement, EMA and running affine
    "ema_running_affine": dict(kmeans_init=True, replace_every=5, update="ema", affine="running"),
    # gradient-trained codebook under DDP, with every in-place writer enabled
    "alternating": dict(
        kmeans_init=True, replace_every=7, affine="learned", affine_groups=2, alternating=True, sync_nu=0.2,
        codebook_lr=3.0,
    ),
    "soft_em": dict(
        kmeans_init=True, replace_every=6, update="soft_em", soft_em_samples=4, replace_threshold=3,
        replace_sampling="error",
    ),
    "simvq_rotation": dict(codebook="simvq", kmeans_init=True, replace_every=5, estimator="rotation"),
    # the implicit codebooks (projected 8 -> 3 and 8 -> 6 dimensions and back)
    "fsq": dict(method="fsq", fsq_levels=(4, 4, 4)),
    "lfq": dict(method="lfq"),
    # a large codebook: sampled k-means++ seeding, bounded search blocks, replacement
    "large_k": dict(kmeans_init=True, replace_every=5, affine="running", sync_nu=0.2),
}
CODEBOOK_SIZE = {"large_k": 8192}  # else 64
EMPTY_STEPS = {1, 10, 20}  # rank 1 has no data: during k-means init, a plain step, a replacement step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _EncQ(torch.nn.Module):
    def __init__(self, scenario: str):
        super().__init__()
        self.enc = torch.nn.Linear(8, 8)
        self.q = VectorQuantizer(8, CODEBOOK_SIZE.get(scenario, 64), **SCENARIOS[scenario])

    def forward(self, x):
        z = self.enc(x)
        return z, self.q(z)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for scenario in SCENARIOS:
        _train(rank, scenario, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def _train(rank: int, scenario: str, out_dir: str) -> None:
    torch.manual_seed(100 + rank)  # different data, different local randomness on each rank
    model = _EncQ(scenario)
    q = model.q
    trainable = [p for p in model.parameters() if p.requires_grad]
    # DDP averages gradients; its own buffer broadcast is off: the quantizer keeps buffers in sync itself
    run = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    replaced = 0
    for step in range(1, 51):
        n = 0 if (rank == 1 and step in EMPTY_STEPS) else (90 + 13 * step % 17 if rank == 0 else 31)
        x = torch.randn(n, 8) * (1 + rank) + rank + (6.0 if step > 25 else 0.0)  # a shift kills codes
        z, out = run(x)
        loss = (out.z_q - z.detach()).pow(2).mean() if n else out.z_q.sum() * 0
        (loss + out.loss).backward()
        opt.step()
        opt.zero_grad()
        replaced += int(out.metrics["replaced"])
    # every codebook-defining tensor; `last_used` is rank-local usage between replacements
    # (it is max-reduced at each replacement), so it is not part of the comparison
    state = {k: v for k, v in q.state_dict().items() if k != "last_used"}
    state["effective"] = q.effective_codebook().detach()
    state["replaced_seen"] = torch.tensor(replaced)
    torch.save(state, os.path.join(out_dir, f"{scenario}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both ranks train every scenario once (one spawn: process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung (a collective was skipped by one rank)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_codebooks_identical_across_ranks(scenario, trained):
    s0, s1 = (torch.load(trained / f"{scenario}-rank{r}.pt") for r in range(2))
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"{key} differs between ranks"
    assert bool(s0["initialised"])
    if SCENARIOS[scenario].get("replace_every"):
        assert s0["replaced_seen"].item() > 0  # replacement really ran (and was counted) in this scenario
