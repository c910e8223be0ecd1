"""Conditional video sampling against the exact denoiser of an AR(1)-correlated Gaussian clip.

Frames of a clip y [N, C, T, H, W] are zero-mean with covariance C_ij = ρ^|i−j| over time (each pixel independently),
so D(x; σ) = G x along T with G = C(C + σ²I)⁻¹ (symmetric), and the conditional mean of frame t given frame k − 1 = v is
ρ^(t−k+1)·v. VDM Eq. 7 in EDM space on this linear D has the closed form
D'^b = (Gx)^b + w_r·(Gᵀ M (y − Gx))^b, with M the known-frame mask.
"""

import pytest
import torch

from edmkit.diffusion.inverse import projected
from edmkit.diffusion.operators import downsample
from edmkit.diffusion.samplers import SAMPLERS, sample_heun
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.diffusion.video import (
    extension,
    frame_mask,
    frame_super_resolution,
    frames_guided,
    interpolation,
    per_frame,
    sample_conditioned,
    sample_long,
    window_starts,
)

T, RHO = 6, 0.9


def ar1_cov(frames=T, rho=RHO):
    idx = torch.arange(frames, dtype=torch.float64)
    return rho ** (idx[:, None] - idx[None]).abs()  # [T, T]


def ar1_gain(sigma, frames=T):
    cov = ar1_cov(frames)
    return cov @ torch.linalg.inv(cov + sigma.double().reshape(-1, 1, 1) ** 2 * torch.eye(frames, dtype=torch.float64))  # [N, T, T]


def ar1_denoiser(x, sigma, labels):  # x [N, C, T, H, W]
    return torch.einsum("ntu,ncuhw->ncthw", ar1_gain(sigma, x.shape[2]).to(x.dtype), x)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_heun_on_5d_noise_reproduces_the_ar1_covariance():
    x = sample_heun(ar1_denoiser, randn(12000, 1, T, 1, 1), karras_sigmas(32))
    f = x.reshape(len(x), T).double()
    # sampling error ~ √2/√12000 per entry; σ_max = 80 leaves a prior mismatch of ~1/80² only
    torch.testing.assert_close(f.T @ f / len(f), ar1_cov(), atol=0.06, rtol=0)


def test_eq7_guidance_matches_the_closed_form_and_replaces_known_frames():
    m = extension(randn(3, 2, 2, 2, 2, seed=1), frames=T)
    x, sigma, w_r = randn(3, 2, T, 2, 2, seed=2), torch.tensor([0.3, 1.0, 4.0]), 2.5
    with torch.no_grad():  # the combinator turns grad on itself
        got = frames_guided(ar1_denoiser, m, w_r=w_r)(x, sigma, None)
    g = ar1_gain(sigma).float()
    mask = frame_mask(T, range(2))
    gx = torch.einsum("ntu,ncuhw->ncthw", g, x)
    expected = gx + w_r * torch.einsum("nut,ncuhw->ncthw", g, mask * (m.y_full - gx))  # ∇ of ‖M(y − Gx)‖² is −2GᵀM(y − Gx)
    expected = mask * m.y_full + (1 - mask) * expected
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :, :2], m.y_full[:, :, :2])


def test_zero_weight_is_plain_replacement():
    m = interpolation(randn(2, 1, 3, 4, 4, seed=1), every=2)
    x, sigma = randn(2, 1, 5, 4, 4), torch.tensor([0.5, 2.0])
    replaced = projected(ar1_denoiser, y_full=m.y_full, project=m.project)(x, sigma, None)
    assert torch.equal(frames_guided(ar1_denoiser, m, w_r=0.0)(x, sigma, None), replaced)
    with torch.inference_mode():  # no gradient needed at w_r = 0
        frames_guided(ar1_denoiser, m, w_r=0.0)(x, sigma, None)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_extension_keeps_known_frames_exact(name):
    known = randn(4, 1, 2, 3, 3, seed=1)
    x = sample_conditioned(SAMPLERS[name], ar1_denoiser, extension(known, frames=T), noise=randn(4, 1, T, 3, 3), sigmas=karras_sigmas(8),
                           w_r=2.0)
    assert x.shape == (4, 1, T, 3, 3)
    assert torch.equal(x[:, :, :2], known)  # bit-exact


def test_guidance_moves_new_frames_toward_the_conditional_mean():
    known = torch.full((3000, 1, 2, 1, 1), 1.5)
    exact = 1.5 * RHO ** torch.arange(1, T - 1, dtype=torch.float32)  # E[x_t | x_1 = 1.5], t = 2 … T−1
    errors = {}
    for w_r in (0.0, 4.0):
        x = sample_conditioned(sample_heun, ar1_denoiser, extension(known, frames=T), noise=randn(3000, 1, T, 1, 1), sigmas=karras_sigmas(24),
                               w_r=w_r)
        errors[w_r] = (x[:, 0, 2:, 0, 0].mean(0) - exact).abs().max().item()
    # replacement alone ignores the correlation (VDM Sec. 3.1): new frames drift to the prior mean; Eq. 7 pulls them back
    assert errors[0.0] > 0.5 and errors[4.0] < errors[0.0] / 2


def test_frame_super_resolution_matches_low_res_frames():
    low = randn(2, 1, 3, 2, 2, seed=3)
    m = frame_super_resolution(low, scale=2)
    x = sample_conditioned(sample_heun, ar1_denoiser, m, noise=randn(2, 1, 3, 4, 4), sigmas=karras_sigmas(8), w_r=1.0)
    torch.testing.assert_close(per_frame(lambda f: downsample(f, scale=2))(x), low, atol=1e-5, rtol=0)


def test_long_video_windows_overlap_and_continue_the_clip():
    assert window_starts(10, window=4, overlap=2) == [0, 2, 4, 6]
    assert window_starts(9, window=4, overlap=2) == [0, 2, 4, 5]
    seen = []

    def recording(x, sigma, labels):
        seen.append(x.shape[2])
        return ar1_denoiser(x, sigma, labels)

    x = sample_long(sample_heun, recording, shape=(4000, 1, 4, 1, 1), total=10, overlap=2, sigmas=karras_sigmas(16), w_r=4.0)
    assert x.shape == (4000, 1, 10, 1, 1) and set(seen) == {4}
    f = x[:, 0, :, 0, 0].double()
    lag1 = (f[:, 1:] * f[:, :-1]).mean(0) / (f[:, 1:].std(0) * f[:, :-1].std(0))  # [9] correlation of consecutive frames
    assert lag1.min().item() > 0.8  # no seam between windows (ρ = 0.9; independent windows would give ~0)


def test_masks_and_shapes_are_checked():
    with pytest.raises(ValueError, match="5-D"):
        extension(randn(1, 1, 4, 4), frames=T)
    with pytest.raises(ValueError, match="more frames"):
        extension(randn(1, 1, 3, 2, 2), frames=3)
    with pytest.raises(ValueError, match="every >= 2"):
        interpolation(randn(1, 1, 3, 2, 2), every=1)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        frame_mask(4, [0, 4])
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, window=4, overlap=4)
    with pytest.raises(ValueError, match="must agree"):
        sample_conditioned(sample_heun, ar1_denoiser, extension(randn(1, 1, 2, 2, 2), frames=T), noise=randn(1, 1, T + 1, 2, 2),
                           sigmas=karras_sigmas(4))
    with pytest.raises(ValueError, match="w_r"):
        frames_guided(ar1_denoiser, extension(randn(1, 1, 2, 2, 2), frames=T), w_r=-1.0)
