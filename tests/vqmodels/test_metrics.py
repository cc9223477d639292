"""The field's metrics: the maths against closed forms, the networks and formulas against the reference
packages (torch-fidelity, lpips, torchmetrics) under the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import reference, weights
from vqmodels.metrics import GaussianStats, frechet_distance, inception_score, psnr, ssim, to_uint8
from vqmodels.metrics.inception import load_inception
from vqmodels.metrics.lpips import LPIPS, load_lpips


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return weights.inception_file(tmp_path_factory.mktemp("weights") / "weights-inception-random.pth")


_images = weights.images


def test_statistics_stream_exactly_and_match_numpy():
    x = torch.randn(257, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16) + 5
    stats = GaussianStats(16)
    for chunk in x.split(50):
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    # two "ranks" reduced with a sum give the one-rank statistics exactly
    a, b = GaussianStats(16), GaussianStats(16)
    a.update(x[:100])
    b.update(x[100:])
    parts = [a, b]

    def fake_all_reduce(t: torch.Tensor) -> None:
        flat = [torch.cat([p.n.view(1), p.sum, p.outer.view(-1)]) for p in parts]
        t.copy_(flat[0] + flat[1])

    a.reduce(fake_all_reduce)
    np.testing.assert_allclose(a.mean_cov()[1], sigma, rtol=1e-9, atol=1e-12)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_of_gaussians_the_closed_form():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2, size=8), rng.uniform(0.5, 2, size=8)
    closed = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)
    # a full covariance and a rotation of it: only the means differ
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    full = q @ np.diag(s1) @ q.T
    assert frechet_distance(mu1, full, mu1 + 1, full) == pytest.approx(8.0, rel=1e-8)


def test_inception_matches_torch_fidelity_under_the_same_weights(inception_file):
    ref_mod = reference.torch_fidelity("feature_extractor_inceptionv3")
    ref = ref_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(inception_file))
    ours = load_inception(inception_file)
    imgs = torch.cat([_images(3, 1, size=32), _images(2, 2, size=64)[:, :, :32, :32]])
    with torch.no_grad():
        ref_feat, ref_logits = ref(imgs)
        feat, logits = ours(imgs)
    assert feat.shape == (5, 2048) and logits.shape == (5, 1008)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)


def test_the_converted_weights_layout_loads(inception_file, tmp_path):
    """torch-fidelity's converter writes no BN `num_batches_tracked` counters: that file must load too."""
    state = torch.load(inception_file, weights_only=True)
    slim = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(slim) < len(state)
    torch.save(slim, tmp_path / "converted.pth")
    net = load_inception(tmp_path / "converted.pth")
    torch.testing.assert_close(net.fc.weight, state["fc.weight"])
    with pytest.raises(ValueError, match="not the FID Inception-v3"):
        torch.save({k: v for k, v in slim.items() if not k.startswith("Mixed_7c")}, tmp_path / "cut.pth")
        load_inception(tmp_path / "cut.pth")


def test_fid_and_inception_score_match_torch_fidelity(inception_file):
    metric_fid = reference.torch_fidelity("metric_fid")
    metric_isc = reference.torch_fidelity("metric_isc")
    net = load_inception(inception_file)
    a, b = _images(24, 3), _images(24, 4)
    with torch.no_grad():
        (fa, la), (fb, _) = net(a), net(b)
    ref = metric_fid.fid_statistics_to_metric(metric_fid.fid_features_to_statistics(fa),
                                              metric_fid.fid_features_to_statistics(fb), verbose=False)
    sa, sb = GaussianStats(2048), GaussianStats(2048)
    sa.update(fa)
    sb.update(fb)
    ours = frechet_distance(*sa.mean_cov(), *sb.mean_cov())
    assert ours == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert ours > 1.0  # features that vary: the comparison means something
    # 24 samples in 2048 dimensions: a singular covariance, so only to the rounding of its eigenvalues
    assert frechet_distance(*sa.mean_cov(), *sa.mean_cov()) == pytest.approx(0, abs=1e-4 * ours)
    ref_is = metric_isc.isc_features_to_metric(la, splits=4)
    mean, std = inception_score(la, splits=4)
    assert (mean, std) == pytest.approx((ref_is["inception_score_mean"], ref_is["inception_score_std"]), rel=1e-9)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_lpips_package_under_the_same_weights(net, tmp_path):
    lpips = reference.lpips_module()
    torch.manual_seed(1)
    ref = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    for lin in ref.lins:
        lin.model[1].weight.data.uniform_(0, 1)
    backbone = {}
    for name, tensor in ref.net.state_dict().items():  # slice1.0.weight -> features.0.weight
        backbone["features." + name.split(".", 1)[1]] = tensor
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save({k: v for k, v in ref.state_dict().items() if k.startswith("lin")}, tmp_path / "lin.pth")
    ours = load_lpips([tmp_path / "backbone.pth", tmp_path / "lin.pth"])
    assert ours.net_name == net
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = ours(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(ours(x, x) == 0)


def test_lpips_refuses_files_that_are_not_its_weights(tmp_path):
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "lin.pth")
    with pytest.raises(ValueError, match="vgg16/alexnet"):
        load_lpips(tmp_path / "lin.pth")
    torch.save({f"features.{k}": v for k, v in LPIPS("vgg").features.state_dict().items()}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="linear layers"):
        load_lpips(tmp_path / "vgg.pth")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lpips(tmp_path / "absent.pth")


def test_ssim_is_one_for_identical_images_and_matches_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    # torchmetrics averages over the reflection-padded border too; the valid region (Wang et al., tf.image.ssim,
    # pytorch-msssim) is its full SSIM map without the 5-px border
    _, full = tm_ssim((y + 1) / 2, (x + 1) / 2, data_range=1.0, reduction="none", return_full_image=True)
    expected = full[..., 5:-5, 5:-5].mean((1, 2, 3))
    torch.testing.assert_close(ssim(y, x), expected, rtol=1e-4, atol=1e-5)
    from pytorch_msssim import ssim as msssim_ssim  # the reference implementation of the same protocol

    reference = msssim_ssim((y + 1) / 2, (x + 1) / 2, data_range=1.0, size_average=False, win_size=11)
    torch.testing.assert_close(ssim(y, x), reference, rtol=1e-5, atol=1e-6)
    assert torch.all(ssim(y, x) < 0.99)


def test_psnr_and_uint8_conversion():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x, x + 0.2).tolist() == pytest.approx([10 * np.log10(4 / 0.04)] * 2, rel=1e-5)
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
