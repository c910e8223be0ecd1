"""Guidance combinators: exact endpoints, skipped guide evaluations, schedules, thresholding."""

import pytest
import torch

from edmkit.diffusion.guidance import classifier_free, dynamic_threshold, guidance_interval, guided, oscillating
from edmkit.diffusion.samplers import sample_euler
from edmkit.diffusion.schedules import karras_sigmas


def main(x, sigma, labels):
    return 0.7 * x + sigma.reshape(-1, 1, 1, 1)


def guide(x, sigma, labels):
    return 0.2 * x - 1.0


def forbidden(x, sigma, labels):
    raise AssertionError("guide must not be evaluated")


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, 4, 4, generator=g), torch.full((3,), 1.5), torch.randn(3, 5, generator=g)


def test_weight_one_returns_main_exactly_without_guide(inputs):
    x, sigma, labels = inputs
    assert torch.equal(guided(main, forbidden, 1.0)(x, sigma, labels), main(x, sigma, labels))
    ones = lambda s: torch.ones_like(s)  # noqa: E731
    assert torch.equal(guided(main, forbidden, ones)(x, sigma, labels), main(x, sigma, labels))


def test_weight_zero_returns_guide_and_weight_two_extrapolates(inputs):
    x, sigma, labels = inputs
    torch.testing.assert_close(guided(main, guide, 0.0)(x, sigma, labels), guide(x, sigma, labels))
    d_main, d_guide = main(x, sigma, labels), guide(x, sigma, labels)
    torch.testing.assert_close(guided(main, guide, 2.0)(x, sigma, labels), d_guide + 2 * (d_main - d_guide))


def test_per_sample_weights_keep_unguided_rows_exact(inputs):
    x, sigma, labels = inputs
    w = torch.tensor([1.0, 3.0, 1.0])
    out = guided(main, guide, lambda s: w)(x, sigma, labels)
    d_main, d_guide = main(x, sigma, labels), guide(x, sigma, labels)
    assert torch.equal(out[0], d_main[0]) and torch.equal(out[2], d_main[2])
    torch.testing.assert_close(out[1], d_guide[1] + 3 * (d_main[1] - d_guide[1]))


def test_guidance_interval(inputs):
    x, _, labels = inputs
    w = guidance_interval(4.0, sigma_lo=0.3, sigma_hi=2.0)
    assert w(torch.tensor([0.3, 0.31, 2.0, 2.01])).tolist() == [1.0, 4.0, 4.0, 1.0]
    for sigma_out in (0.1, 5.0):  # outside: main exactly, guide never evaluated
        sigma = torch.full((3,), sigma_out)
        assert torch.equal(guided(main, forbidden, w)(x, sigma, labels), main(x, sigma, labels))
    sigma = torch.full((3,), 1.0)
    d_main, d_guide = main(x, sigma, labels), guide(x, sigma, labels)
    torch.testing.assert_close(guided(main, guide, w)(x, sigma, labels), d_guide + 4 * (d_main - d_guide))


def test_classifier_free_uses_null_labels(inputs):
    x, sigma, labels = inputs
    seen = []

    def denoiser(x, sigma, labels):
        seen.append(labels)
        return x * (1 + labels.sum(dim=1)).reshape(-1, 1, 1, 1)

    out = classifier_free(denoiser, 2.0)(x, sigma, labels)
    d_cond, d_uncond = denoiser(x, sigma, labels), x  # zeroed labels: factor 1
    torch.testing.assert_close(out, d_uncond + 2 * (d_cond - d_uncond))
    assert any(bool((lab == 0).all()) for lab in seen)
    null = torch.full((5,), 0.1)
    classifier_free(denoiser, 3.0, uncond_labels=null)(x, sigma, labels)
    assert torch.equal(seen[-1], null.expand(3, 5)) or torch.equal(seen[-2], null.expand(3, 5))
    with pytest.raises(ValueError, match="labels"):
        classifier_free(denoiser, 2.0)(x, sigma, None)


def test_oscillating_weight_per_step():
    sigmas = karras_sigmas(9)
    w = oscillating([15.0, 1.0], sigmas=sigmas, warmup_steps=3)
    expected = [15.0, 15.0, 15.0, 15.0, 1.0, 15.0, 1.0, 15.0, 1.0]
    assert w(sigmas[:-1]).tolist() == expected
    between = (sigmas[:-2] * sigmas[1:-1]).sqrt()  # geometric midpoints belong to the upper step
    assert w(between).tolist() == expected[:-1]
    assert w(torch.tensor([100.0, 1e-4])).tolist() == [15.0, 1.0]  # above σ_0 and below σ_{N-1}


def test_oscillating_guidance_runs_inside_a_sampler():
    sigmas = karras_sigmas(6)
    weights_seen = []
    wfn = oscillating([5.0, 1.0], sigmas=sigmas, warmup_steps=2)
    record = lambda s: (weights_seen.append(wfn(s)[0].item()), wfn(s))[1]  # noqa: E731
    x = sample_euler(guided(main, guide, record), torch.randn(2, 1, 4, 4), sigmas)
    assert weights_seen == [5.0, 5.0, 5.0, 1.0, 5.0, 1.0] and torch.isfinite(x).all()


def test_dynamic_threshold():
    def big(x, sigma, labels):
        return x

    x = torch.randn(2, 3, 8, 8)
    x[0] *= 10  # far outside [-1, 1]
    x[1] = x[1].clamp(-0.9, 0.9)
    out = dynamic_threshold(big, percentile=0.9)(x, torch.ones(2), None)
    assert out.abs().max() <= 1.0
    assert torch.equal(out[1], x[1])  # s = 1: identity when |x̂0| <= 1
    s = torch.quantile(x[0].abs().flatten(), 0.9)
    torch.testing.assert_close(out[0], x[0].clamp(-s, s) / s)


def test_dynamic_threshold_on_hand_computed_values():
    """Imagen: s = max(percentile_p |x̂0| per sample, 1), x̂0 ← clip(x̂0, −s, s)/s; percentiles interpolate linearly.

    Row 0: |x̂0| sorted (0.5, 2, 3, 4), the median is 2.5, so s = 2.5. Row 1: the median 0.625 < 1, so s = 1
    (clip only, no scaling up). A percentile over the whole batch (1.125) would change both rows.
    """
    x0 = torch.tensor([[-4.0, -2.0, 0.5, 3.0], [0.5, -0.25, 0.75, -1.5]]).reshape(2, 1, 2, 2)
    out = dynamic_threshold(lambda x, s, l: x, percentile=0.5)(x0, torch.ones(2), None)
    expected = torch.tensor([[-1.0, -0.8, 0.2, 1.0], [0.5, -0.25, 0.75, -1.0]]).reshape(2, 1, 2, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # p = 1: s is the largest |x̂0| of the sample, so row 0 is scaled by 1/4 and row 1 by 1/1.5
    out = dynamic_threshold(lambda x, s, l: x, percentile=1.0)(x0, torch.ones(2), None)
    torch.testing.assert_close(out, x0 / torch.tensor([4.0, 1.5]).reshape(2, 1, 1, 1), rtol=0, atol=1e-7)


def test_arguments_are_validated():
    with pytest.raises(ValueError):
        guided(main, guide, -0.5)
    with pytest.raises(ValueError):
        classifier_free(main, -1.0)
    for p in (0.0, 1.5):
        with pytest.raises(ValueError):
            dynamic_threshold(main, percentile=p)
    with pytest.raises(ValueError):
        guidance_interval(2.0, sigma_lo=1.0, sigma_hi=1.0)
    with pytest.raises(ValueError):
        oscillating([], sigmas=karras_sigmas(4), warmup_steps=1)
