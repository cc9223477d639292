"""Stage-two MaskGIT: masking schedule, masked-only loss, no mask leakage, iterative decoding, guidance; AR twin."""

from __future__ import annotations

import math

import pytest
import torch

from vqmodels.ar import ARConfig, ARTransformer
from vqmodels.maskgit import MaskGIT, MaskGITConfig, decoding_schedule, gamma, masked_cross_entropy

K, N = 64, 64  # debug codebook and 8×8 grid


def codes(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (b, 8, 8), generator=torch.Generator().manual_seed(seed))


def model(**overrides) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(MaskGITConfig.debug(**overrides))


def test_shapes() -> None:
    m = model(num_classes=10)
    out = m(codes(3), labels=torch.tensor([0, 5, 9]))
    assert out.logits.shape == (3, N, K) and out.mask.shape == (3, N) and out.mask.dtype == torch.bool
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert {"accuracy", "mask_ratio"} <= set(out.metrics)
    samples = m.generate(2, steps=4, labels=3)
    assert samples.shape == (2, 8, 8) and samples.dtype == torch.long
    assert 0 <= int(samples.min()) and int(samples.max()) < K


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square"])
def test_training_mask_counts_follow_the_schedule(schedule: str) -> None:
    m = model(schedule=schedule)
    assert float(gamma(0.0, schedule)) == 1.0 and abs(float(gamma(1.0, schedule))) < 1e-12
    r = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.77, 0.999])
    tokens = codes(len(r)).view(len(r), -1)
    inputs, mask = m.mask_tokens(tokens, r=r, generator=torch.Generator().manual_seed(1))
    expected = [max(1, math.ceil(float(gamma(v, schedule)) * N)) for v in r.tolist()]
    assert mask.sum(1).tolist() == expected
    assert torch.all(inputs[mask] == m.mask_id)
    assert torch.equal(inputs[~mask], tokens[~mask])
    # drawn r: every sample has between 1 and N masked tokens
    _, drawn = m.mask_tokens(codes(256).view(256, -1))
    assert drawn.sum(1).min() >= 1 and drawn.sum(1).max() <= N


def test_loss_is_computed_on_masked_positions_only() -> None:
    logits = torch.randn(2, N, K, requires_grad=True)
    targets = codes(2).view(2, -1)
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(0)) < 0.4
    loss = masked_cross_entropy(logits, targets, mask, label_smoothing=0.1)
    changed = torch.where(mask, targets, (targets + 1) % K)  # other targets where unmasked
    assert torch.equal(loss, masked_cross_entropy(logits, changed, mask, label_smoothing=0.1))
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0) and torch.all(logits.grad[mask].abs().sum(-1) > 0)

    # through the model: the loss equals cross-entropy over exactly the returned mask
    m = model()
    tokens, r = codes(4), torch.full((4,), 0.4)
    out = m(tokens, r=r, generator=torch.Generator().manual_seed(3))
    flat = tokens.view(4, -1)
    manual = torch.nn.functional.cross_entropy(out.logits[out.mask], flat[out.mask], label_smoothing=0.1)
    assert torch.allclose(out.loss, manual)


def test_masked_tokens_never_leak_into_the_inputs() -> None:
    m = model().eval()
    a = codes(4, seed=0)
    r = torch.full((4,), 0.5)
    out_a = m(a, r=r, generator=torch.Generator().manual_seed(7))
    b = torch.where(out_a.mask.view(4, 8, 8), (a + 17) % K, a)  # differ at masked positions only
    out_b = m(b, r=r, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out_a.mask, out_b.mask)
    assert torch.equal(out_a.logits, out_b.logits), "the content of masked positions reached the model"
    assert not torch.equal(out_a.loss, out_b.loss)
    c = torch.where(out_a.mask.view(4, 8, 8), a, (a + 17) % K)  # differ at visible positions: must matter
    assert not torch.equal(m(c, r=r, generator=torch.Generator().manual_seed(7)).logits, out_a.logits)


def test_class_dropout_replaces_labels_with_the_null_class_in_training_only() -> None:
    m = model(num_classes=10, class_dropout=0.5)
    seen: list[torch.Tensor] = []
    real_logits = m.logits
    m.logits = lambda tokens, labels=None: (seen.append(labels), real_logits(tokens, labels))[1]  # type: ignore[method-assign]
    labels = torch.full((400,), 3)
    m(codes(400), labels=labels)
    dropped = float((seen[-1] == -1).float().mean())
    assert 0.35 < dropped < 0.65 and set(seen[-1].tolist()) == {-1, 3}
    m.eval()
    m(codes(400), labels=labels)
    assert torch.equal(seen[-1], labels)


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [("cosine", 1), ("cosine", 8), ("cosine", 13), ("linear", 3), ("linear", N), ("square", 8), ("square", 30)],
)
def test_generate_fixes_all_tokens_in_exactly_steps_and_never_changes_a_fixed_one(schedule: str, steps: int) -> None:
    m = model(schedule=schedule)
    out, history = m.generate(3, steps=steps, return_history=True, generator=torch.Generator().manual_seed(0))
    assert len(history) == steps
    masked = [int((h == m.mask_id).sum()) // 3 for h in history]
    assert masked == decoding_schedule(N, steps, schedule)
    assert all(a > b for a, b in zip([N, *masked], masked, strict=False)), "each iteration fixes >= 1 token"
    assert masked[-1] == 0 and torch.equal(history[-1], out)
    for before, after in zip(history, history[1:], strict=False):
        fixed = before != m.mask_id
        assert torch.equal(after[fixed], before[fixed]), "a fixed token changed"
    if steps > 1:
        assert 0 < masked[0] < N


def test_decoding_schedule_is_floor_of_gamma_and_rejects_impossible_steps() -> None:
    assert decoding_schedule(256, 8) == [math.floor(math.cos(math.pi / 2 * (t + 1) / 8) * 256) for t in range(8)]
    with pytest.raises(ValueError, match="steps"):
        decoding_schedule(N, N + 1)
    with pytest.raises(ValueError, match="steps"):
        model().generate(1, steps=0)


def test_generate_is_reproducible_and_choice_temperature_matters() -> None:
    m = model()
    def gen(seed: int, **kw) -> torch.Tensor:
        return m.generate(4, steps=6, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(gen(0), gen(0))
    assert not torch.equal(gen(0), gen(1))
    greedy = m.generate(2, steps=6, temperature=0.0, choice_temperature=0.0)
    assert torch.equal(greedy, m.generate(2, steps=6, temperature=0.0, choice_temperature=0.0))


def _record_calls(m: MaskGIT) -> list[tuple[int, torch.Tensor | None]]:
    calls: list[tuple[int, torch.Tensor | None]] = []
    real = m.hidden  # the transformer forward: everything generate runs per iteration goes through it

    def spy(tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((tokens.shape[0], None if labels is None else labels.clone()))
        return real(tokens, labels)

    m.hidden = spy  # type: ignore[method-assign]
    return calls


def test_guidance_zero_is_exactly_the_conditional_path() -> None:
    m = model(num_classes=10)
    with torch.no_grad():  # sharpen the untrained model so that the class token visibly steers sampling
        for p in m.parameters():
            p.mul_(8.0)
    labels = torch.tensor([1, 2, 3])
    calls = _record_calls(m)
    g0 = m.generate(3, steps=5, labels=labels, guidance=0.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5 and all(b == 3 and torch.equal(lab, labels) for b, lab in calls), "one forward per step"
    calls.clear()
    g2 = m.generate(3, steps=5, labels=labels, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5 and all(b == 6 and torch.equal(lab, torch.tensor([1, 2, 3, -1, -1, -1])) for b, lab in calls)

    # the null-class embedding (the unconditional branch) cannot affect guidance-0 sampling, but does affect CFG
    with torch.no_grad():  # (a random direction: LayerNorm would cancel a constant shift)
        m.tok_emb.weight[m.null_class] += 5.0 * torch.randn(m.config.dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g0, m.generate(3, steps=5, labels=labels, guidance=0.0, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(g2, m.generate(3, steps=5, labels=labels, guidance=2.0, generator=torch.Generator().manual_seed(0)))


def test_unconditional_model_rejects_labels_and_guidance() -> None:
    m = model()
    with pytest.raises(ValueError, match="guidance"):
        m.generate(1, guidance=1.0)
    with pytest.raises(ValueError, match="labels"):
        m.generate(1, labels=2)
    with pytest.raises(ValueError, match="labels"):
        model(num_classes=4).generate(2, labels=torch.tensor([0, 4]))


def test_ar_baseline_matches_maskgit_size_and_its_kv_cache_is_exact() -> None:
    cfg = MaskGITConfig.debug(num_classes=10)
    ar = ARTransformer(ARConfig.matching(cfg))
    mg = MaskGIT(cfg)
    assert sum(p.numel() for p in ar.transformer.parameters()) == sum(p.numel() for p in mg.transformer.parameters())
    out = ar(codes(2), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, N, K) and out.loss.requires_grad
    cached = ar.generate(2, temperature=0.0, labels=4)
    uncached = ar.generate(2, temperature=0.0, labels=4, use_cache=False)
    assert torch.equal(cached, uncached)
    teacher = ar.eval().logits(cached, labels=torch.tensor([4, 4])).argmax(-1)
    assert torch.equal(teacher, cached.view(2, -1)), "greedy tokens must be the teacher-forced argmax"
    sampled = ar.generate(3, labels=1, guidance=1.5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 8, 8)


def test_confidence_noise_is_scaled_gumbel() -> None:
    """`perturbed` adds scale × Gumbel(0, 1) noise (mean γ·scale, variance π²/6·scale²), drawn from the
    generator, and nothing at scale 0 (the last iterations)."""
    from vqmodels.maskgit import perturbed

    base = torch.zeros(200_000)
    noise = perturbed(base, 2.0, torch.Generator().manual_seed(0))
    assert abs(float(noise.mean()) - 2.0 * 0.5772) < 0.02
    assert abs(float(noise.var()) - 4.0 * math.pi**2 / 6) < 0.1
    assert torch.equal(perturbed(base, 2.0, torch.Generator().manual_seed(0)), noise)
    assert perturbed(base, 0.0, None) is base


def test_both_decoders_run_in_bfloat16() -> None:
    """The sampling benchmark's low-precision setting: weights and activations bf16, sampling in fp32."""
    cfg = MaskGITConfig.debug(num_classes=3)
    torch.manual_seed(0)
    mg, ar = MaskGIT(cfg).to(torch.bfloat16), ARTransformer(ARConfig.matching(cfg)).to(torch.bfloat16)
    out, history = mg.generate(2, steps=4, labels=1, guidance=1.0, return_history=True,
                               generator=torch.Generator().manual_seed(0))
    assert [int((h == mg.mask_id).sum()) // 2 for h in history] == decoding_schedule(N, 4, "cosine")
    assert out.dtype == torch.long and 0 <= int(out.min()) and int(out.max()) < K
    tokens = ar.generate(2, temperature=0.0, labels=1)
    assert tokens.shape == (2, 8, 8) and int(tokens.max()) < K


def test_sample_tokens_draws_from_the_tempered_softmax() -> None:
    from vqmodels.maskgit import sample_tokens

    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0])).expand(20000, 4)
    draws = sample_tokens(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015), freq
    hot = torch.bincount(sample_tokens(logits, 0.5, torch.Generator().manual_seed(0)), minlength=4).float() / 20000
    expected = torch.tensor([0.25, 0.09, 0.04, 0.0]) / 0.38  # p^(1/T), renormalised
    assert torch.allclose(hot, expected, atol=0.015), hot
    assert torch.equal(sample_tokens(logits[:3], 0.0, None), torch.zeros(3, dtype=torch.long))
