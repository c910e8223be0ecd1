"""Magnitude-preserving primitives keep unit RMS; forced weight normalization behaves as documented."""

import math

import pytest
import torch

from edmkit.nn.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, pixel_norm


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def unit(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_mp_silu_keeps_unit_rms():
    assert rms(mp_silu(unit(1_000_000))) == pytest.approx(1.0, abs=0.01)


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
