"""FSQ and LFQ (`method="fsq"` / `"lfq"`) and the quantizer at large codebooks."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqmodels import VectorQuantizer
from vqmodels.quantize.kmeans import kmeans, nearest, sampled_seeding
from vqmodels.quantize.scalar import FSQ, LFQ

ROOT = Path(__file__).resolve().parents[2]


def test_fsq_rounds_to_the_stated_levels_with_straight_through_gradients():
    levels = [3, 4, 5, 8]
    fsq = FSQ(len(levels), levels)  # dim == k: no projections
    z = (torch.randn(4096, len(levels)) * 3).requires_grad_()
    q = fsq.quantize(z)
    for i, lv in enumerate(levels):
        values = torch.unique(q[:, i].detach())
        assert values.numel() == lv, (lv, values)  # exactly L_i values ...
        assert float(values.min()) >= -1 and float(values.max()) <= 1  # ... inside [-1, 1]
        steps = values.diff()
        assert torch.allclose(steps, steps[0].expand_as(steps))  # evenly spaced
    w = torch.randn_like(q)
    (q * w).sum().backward()
    zb = z.detach().clone().requires_grad_()
    (fsq.bound(zb) / (fsq._levels // 2) * w).sum().backward()  # rounding passes the gradient straight through
    assert torch.allclose(z.grad, zb.grad)


@pytest.mark.parametrize(("method", "size", "extra"), [("fsq", 240, {"fsq_levels": (8, 6, 5)}), ("lfq", 256, {})])
def test_indices_round_trip_through_codes_to_vectors(method, size, extra):
    q = VectorQuantizer(16, size, method=method, **extra)
    z = torch.randn(3, 50, 16) * 4
    out = q(z)
    assert out.indices.shape == (3, 50) and int(out.indices.min()) >= 0 and int(out.indices.max()) < size
    assert torch.allclose(q.codes_to_vectors(out.indices), out.z_q.detach(), atol=1e-6)
    every = q.effective_codebook()
    assert every.shape == (size, 16)
    again = VectorQuantizer(16, size, method=method, **extra)
    again.load_state_dict(q.state_dict())
    again.eval()
    assert torch.equal(again(z).indices, out.indices)  # the index is a function of the code: decode, re-encode
    assert 0 < float(out.metrics["usage"]) <= 1 and float(out.metrics["perplexity"]) >= 1


def test_lfq_entropy_terms_match_their_definitions():
    """p(c|z) = softmax over the 2^k corners c of -|z - c|^2 / T, written out by enumeration."""
    lfq = LFQ(2, 2, temperature=0.7)
    z = torch.tensor([[0.25, -0.5], [0.0, 0.1], [-0.3, -0.2]])
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)))
    p = torch.softmax(-torch.cdist(z, corners).pow(2) / 0.7, dim=1)  # (3, 4)
    per_sample = -(p * p.log()).sum(1).mean()
    avg = p.mean(0)
    codebook = -(avg * avg.log()).sum()
    got_sample, got_codebook = lfq.entropy_terms(z)
    assert torch.allclose(got_sample, per_sample, atol=1e-6)
    assert torch.allclose(got_codebook, codebook, atol=1e-6)
    # the loss: commitment + weight * (per-sample - diversity * codebook), straight-through signs
    lfq = LFQ(2, 2, entropy_weight=0.1, diversity=1.0, temperature=0.7, commitment=0.25)
    _, idx, loss = lfq(z)
    expected = 0.25 * (z - z.sign().where(z != 0, torch.tensor(-1.0))).pow(2).mean() + 0.1 * (per_sample - codebook)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert idx.tolist() == [1, 2, 0]  # bit i set where dimension i is positive


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_lfq_codebook_entropy_factored_equals_the_enumerated_sum(bits, monkeypatch):
    """The low-half × high-half matmul gives every code's batch-mean probability, in index order, in row blocks."""
    import vqmodels.quantize.scalar as scalar

    monkeypatch.setattr(scalar, "ENTROPY_CHUNK_ELEMENTS", 7 * (2 ** (bits // 2) + 2 ** (bits - bits // 2)))
    lfq = LFQ(bits, bits, temperature=2.0)
    z = torch.randn(40, bits, dtype=torch.float64, requires_grad=True)
    corners = lfq.indices_to_codes(torch.arange(2**bits)).double()  # code c in index order
    p = torch.softmax(-torch.cdist(z, corners).pow(2) / 2.0, dim=1)
    avg = p.mean(0)
    expected = -(avg * avg.log()).sum()
    split = bits // 2
    logit = 4 * z.detach() / 2.0
    grid = scalar._code_probability_sum(F.logsigmoid(logit), F.logsigmoid(-logit), split)
    assert torch.allclose(grid.flatten() / len(z), avg.detach(), atol=1e-12)  # index order, not only the values
    _, got = lfq.entropy_terms(z)
    assert torch.allclose(got, expected, atol=1e-10)
    (g_got,) = torch.autograd.grad(got, z)
    (g_expected,) = torch.autograd.grad(expected, z)
    assert torch.allclose(g_got, g_expected, atol=1e-9)


def test_sizes_must_match_the_implicit_codebook():
    with pytest.raises(ValueError, match="fsq_levels: .* give 64 codes"):
        VectorQuantizer(8, 100, method="fsq", fsq_levels=[4, 4, 4])
    with pytest.raises(ValueError, match="fsq_levels: none given, .* no levels for codebook_size 100;"):
        VectorQuantizer(8, 100, method="fsq")
    paper = VectorQuantizer(8, 1000, method="fsq")
    assert paper.scalar.levels == [8, 5, 5, 5]  # the paper's, for 1,000 codes ...
    assert paper.options.fsq_levels == [8, 5, 5, 5]  # ... and saved as such: a checkpoint never depends on the table
    with pytest.raises(ValueError, match="codebook_size: LFQ has 2\\^bits codes"):
        VectorQuantizer(8, 100, method="lfq")
    with pytest.raises(ValueError, match="kmeans_init: applies to method='vq' only"):
        VectorQuantizer(8, 64, method="lfq", kmeans_init=True)


def test_sampled_seeding_follows_the_d2_rule_at_a_large_codebook():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, 8), torch.randn(50, 8) + 40])  # a far, small cluster
    centres = sampled_seeding(x, 8192, gen)
    assert centres.shape == (8192, 8) and torch.unique(centres, dim=0).shape[0] == 8192  # data points, distinct
    assert int((centres[:, 0] > 20).sum()) >= 1  # D² sampling reaches the far cluster
    out = kmeans(x, 8192, iters=1, generator=gen)
    assert out.shape == (8192, 8) and torch.isfinite(out).all()


def test_nearest_agrees_with_the_full_matrix_in_blocks():
    z, c = torch.randn(300, 8), torch.randn(20000, 8)  # 20,000 codes: blocks of 209 rows
    assert torch.equal(nearest(z, c), torch.cdist(z, c).argmin(1))


def test_kmeans_init_at_262144_codes_stays_in_bounded_memory():
    """A training forward at K = 262,144 (k-means init, search, replacement) in a fresh process: its peak memory
    stays far below one N × K distance matrix (4,096 × 262,144 fp32 = 4.3 GB)."""
    code = (
        "import resource, torch\n"
        "from vqmodels import VectorQuantizer\n"
        "torch.manual_seed(0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "q = VectorQuantizer(8, 262144, kmeans_init=True, replace_every=1, affine='running')\n"
        "out = q(torch.randn(4096, 8))\n"
        "assert bool(q.initialised) and out.indices.max() < 262144\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.strip().splitlines()[-1])
    assert grown_mb < 1024, f"peak memory grew by {grown_mb} MB"
