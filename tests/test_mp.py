"""Magnitude-preserving primitives keep unit RMS; forced weight normalization behaves as documented."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import quad
from scipy.special import expit

from edmkit.nn.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, pixel_norm


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def unit(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def gaussian_mean(f, n=80):
    """E[f(x)] for x ~ N(0, 1) by Gauss-Hermite quadrature (float64; exact for smooth f to far below 1e-6)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)  # weight exp(-x^2 / 2)
    return float((w * f(torch.from_numpy(x)).numpy()).sum() / math.sqrt(2 * math.pi))


def silu_rms_integral():
    """E[silu(x)^2]^(1/2) for x ~ N(0, 1) by adaptive quadrature in float64, independent of edmkit: 0.59647."""
    value, _ = quad(lambda x: (x * expit(x)) ** 2 * math.exp(-x * x / 2) / math.sqrt(2 * math.pi), -math.inf, math.inf, epsabs=1e-13)
    return math.sqrt(value)


def test_mp_silu_divides_by_eq81s_constant():
    """EDM2 Eq. 81 divides by 0.596, the Gaussian RMS of SiLU rounded to 3 digits; pin both the constant and the integral."""
    assert abs(silu_rms_integral() - 0.596) < 1e-3
    x = torch.linspace(-12, 12, 2401, dtype=torch.float64)
    torch.testing.assert_close(mp_silu(x) * 0.596, F.silu(x), rtol=1e-12, atol=1e-300)
    x32 = x.float()
    torch.testing.assert_close(mp_silu(x32), F.silu(x32) / 0.596, rtol=1e-6, atol=1e-30)


def test_mp_silu_keeps_unit_rms():
    """The Gaussian RMS of mp_silu itself (quadrature, no sampling noise) is 0.59647 / 0.596 = 1.0008."""
    assert math.sqrt(gaussian_mean(lambda x: mp_silu(x) ** 2)) == pytest.approx(silu_rms_integral() / 0.596, rel=1e-6)
    assert math.sqrt(gaussian_mean(lambda x: mp_silu(x) ** 2)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_keeps_unit_rms(t):
    a, b = unit(500_000), unit(500_001)[:500_000]
    assert rms(mp_sum(a, b, t=t)) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_mp_cat_keeps_unit_rms_and_weights_parts(t):
    a, b = unit(64, 16, 20), unit(64, 48, 21)[..., :20]
    y = mp_cat(a, b, dim=1, t=t)
    assert y.shape == (64, 64, 20)
    assert rms(y) == pytest.approx(1.0, abs=0.01)
    # the blend factor sets the share of each part's total energy: (1-t)^2 : t^2
    ratio = y[:, :16].pow(2).sum() / y[:, 16:].pow(2).sum()
    assert ratio.item() == pytest.approx((1 - t) ** 2 / t**2, rel=0.05)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_is_eq88(t):
    """((1-t) a + t b) / sqrt((1-t)^2 + t^2), float64: ``t`` weights the second argument (an RMS test cannot see t <-> 1-t)."""
    a, b = unit(7, 5).double(), unit(7, 6)[:, :5].double()
    expected = ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)
    torch.testing.assert_close(mp_sum(a, b, t=t), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_cat_is_eq103(t):
    """Eq. 103 by hand for N_a = 3, N_b = 7 channels: [C (1-t)/sqrt(N_a) a, C t/sqrt(N_b) b], C = sqrt((N_a+N_b)/((1-t)^2+t^2))."""
    a, b = unit(2, 3, 4).double(), unit(2, 7, 4).double()
    C = math.sqrt(10 / ((1 - t) ** 2 + t**2))
    y = mp_cat(a, b, dim=1, t=t)
    torch.testing.assert_close(y[:, :3], C * (1 - t) / math.sqrt(3) * a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[:, 3:], C * t / math.sqrt(7) * b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1e-5, 1e-4, 1e-2, 1.0, 50.0])
def test_normalize_adds_eps_to_the_rms(scale):
    """normalize(x) = x / (eps + ||x|| / sqrt(n)), eps = 1e-4 (PAPERS.md): exact, including near-zero rows where eps dominates."""
    x = unit(3, 4, 2).double()
    x = (x / x.flatten(1).pow(2).mean(1).sqrt()[:, None, None] * scale).float()  # every row has RMS `scale` (to float32 rounding)
    torch.testing.assert_close(normalize(x), x / (1e-4 + scale), rtol=1e-6, atol=0)
    if scale == 1e-4:
        assert normalize(x).flatten(1).pow(2).mean(1).sqrt().tolist() == pytest.approx([0.5] * 3, rel=1e-6)


def test_pixel_norm_unit_rms_per_pixel():
    y = pixel_norm(unit(4, 32, 8, 8) * 7.0)
    per_pixel = y.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(per_pixel, torch.ones_like(per_pixel), atol=1e-3)


def test_normalize_rows_have_unit_rms():
    w = normalize(unit(10, 3, 3, 3) * 5)
    assert torch.allclose(w.flatten(1).pow(2).mean(1).sqrt(), torch.ones(10), atol=1e-3)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mpconv_keeps_unit_rms(kernel):
    conv = MPConv(256, 128, kernel)
    if kernel:
        x = unit(8, 256, 12, 12)
        y = conv(x, gain=1.0)
        y = y[..., 1:-1, 1:-1] if kernel == (3, 3) else y  # interior only: zero padding shrinks the border
    else:
        x = unit(4096, 256)
        y = conv(x)
    assert rms(y) == pytest.approx(1.0, abs=0.02)


def test_forced_weight_normalization_after_train_step():
    conv = MPConv(16, 8, (3, 3)).train()
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    for _ in range(3):
        conv(unit(2, 16, 5, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    conv(unit(2, 16, 5, 5))  # the forward pass re-normalizes the stored weight
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(conv.fan_in)), rtol=1e-3)


def test_eval_mode_does_not_mutate_weights():
    conv = MPConv(16, 8, (3, 3)).eval()
    with torch.no_grad():
        conv.weight.mul_(3.0)
    before = conv.weight.detach().clone()
    conv(unit(2, 16, 5, 5))
    assert torch.equal(before, conv.weight)


def test_mp_fourier_unit_rms_and_deterministic():
    f1, f2 = MPFourier(512, seed=3), MPFourier(512, seed=3)
    c = torch.linspace(-3, 3, 1000)
    assert rms(f1(c)) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(f1(c), f2(c))


def test_mp_fourier_features_have_the_gaussian_kernel():
    """sqrt(2) cos(2 pi (f c + phi)) with f ~ N(0, 1), phi ~ U(0, 1) has channel-mean kernel E[F(c) F(c')] = exp(-2 pi^2 (c - c')^2).

    Frequencies in cycles (the 2 pi) and phases over a whole cycle are what the kernel sees; 16384 channels give about
    0.008 of Monte Carlo error (largest deviation over 30 seeds at 4096 channels: 0.046).
    """
    c = torch.tensor([0.0, 0.1, 0.2, 0.35, 1.0])
    feats = MPFourier(16384, seed=0)(c)  # [5, 16384]
    kernel = feats @ feats.t() / feats.shape[1]
    expected = torch.exp(-2 * math.pi**2 * (c[:, None] - c[None, :]) ** 2)
    torch.testing.assert_close(kernel, expected, rtol=0, atol=0.05)


def test_sampling_weight_cache_matches_autograd_path_and_follows_weight_updates():
    """Eval + no-grad reuses the normalized weight; any in-place update of the weight must invalidate it."""
    torch.manual_seed(0)
    conv = MPConv(8, 4, (3, 3)).eval()
    x = torch.randn(2, 8, 6, 6)
    reference = conv(x)  # grad enabled: computed afresh
    with torch.inference_mode():
        first = conv(x)
        again = conv(x)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    new = torch.randn_like(conv.weight)
    conv.load_state_dict({"weight": new})  # in-place copy_: bumps the version counter
    with torch.no_grad():
        after_load = conv(x)
        conv.weight.mul_(-1.0)  # an EMA / optimizer-style in-place update
        after_flip = conv(x)
    expected = MPConv(8, 4, (3, 3)).eval()
    expected.load_state_dict({"weight": new})
    torch.testing.assert_close(after_load, expected(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(after_flip, -after_load, rtol=0, atol=1e-6)
