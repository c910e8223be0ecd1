"""Inverse problems against exact Gaussian denoisers, plus the ``edmkit restore`` command.

Per-pixel data y ~ N(μ, s²) has D(x; σ) = μ + s²/(s²+σ²)·(x − μ); a 2-pixel Gaussian with
covariance C = [[1, ρ], [ρ, 1]] has D(x; σ) = C(C + σ²I)⁻¹x and E[x₂ | x₁ = y] = ρ·y.
"""

from functools import partial

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit.diffusion.inverse import (
    manifold_constrained,
    measurement_noise,
    projected,
    reconstruction_guided,
    restore as restore_images,
    sample_resampled,
    truncate_sigmas,
)
from edmkit.diffusion.operators import (
    check_mask,
    check_scale,
    downsample,
    gaussian_blur_operator,
    low_pass,
    mask_operator,
    measurement_error,
    upsample,
)
from edmkit.diffusion.samplers import SAMPLERS, sample_ddpm, sample_euler, sample_heun
from edmkit.diffusion.schedules import karras_sigmas

MU, S, RHO = 0.3, 0.5, 0.8
SIGMA_MAX = 80.0


def gaussian_denoiser(x, sigma, labels):
    sigma = sigma.reshape(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def correlated_denoiser(x, sigma, labels):  # x [N, 1, 1, 2]
    cov = torch.tensor([[1.0, RHO], [RHO, 1.0]])
    gain = cov @ torch.linalg.inv(cov + sigma.reshape(-1, 1, 1) ** 2 * torch.eye(2))  # [N, 2, 2]
    return (gain @ x.reshape(-1, 2, 1)).reshape(x.shape)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def grid(steps):
    return karras_sigmas(steps, sigma_min=0.002, sigma_max=SIGMA_MAX)


# --- inpainting by replacement -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_replacement_keeps_known_pixels_and_fills_the_conditional_mean(name):
    y = randn(1, 1, 8, 8, seed=1)
    mask = (randn(1, 1, 8, 8, seed=2) > 0).float()
    noise = randn(2000, 1, 8, 8)
    den = projected(gaussian_denoiser, y_full=mask * y, project=mask_operator(mask))
    x = SAMPLERS[name](den, measurement_noise(noise, y_full=mask * y, sigma_start=SIGMA_MAX), grid(12))
    known, unknown = mask.expand_as(x) > 0, mask.expand_as(x) == 0
    assert torch.equal(x[known], y.expand_as(x)[known])  # bit-exact
    # independent pixels: the conditional mean of an unknown pixel is the prior mean μ
    assert x[unknown].mean().item() == pytest.approx(MU, abs=0.02)


def test_known_pixels_follow_y_plus_sigma_eps_at_every_step():
    y, mask = randn(3, 1, 4, 4, seed=1), (randn(1, 1, 4, 4, seed=2) > 0).float()
    noise, sigmas = randn(3, 1, 4, 4), grid(8)
    seen = []
    den = projected(gaussian_denoiser, y_full=mask * y, project=mask_operator(mask))
    sample_euler(den, measurement_noise(noise, y_full=mask * y, sigma_start=SIGMA_MAX), sigmas,
                 callback=lambda info: seen.append((info["sigma_next"], info["x"])))
    for sigma_next, x in seen:  # deterministic sampler: the initial ε is reused
        assert torch.allclose(mask * x, mask * (y + sigma_next * noise), atol=1e-4 * (1 + sigma_next))


def test_resampling_approaches_the_correct_conditional_mean():
    """Replacement alone is biased for correlated pixels; RePaint's resampling moves it to E[x₂|x₁] = ρy."""
    y, mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    den = projected(correlated_denoiser, y_full=mask * y, project=mask_operator(mask))
    noise = measurement_noise(randn(3000, 1, 1, 2), y_full=mask * y, sigma_start=SIGMA_MAX)
    errors = []
    for r in (1, 10, 40):
        torch.manual_seed(r)
        x = sample_resampled(sample_ddpm, den, noise, grid(20), resample=r)
        assert torch.equal(x[..., 0], y[..., 0].expand(3000, 1, 1))
        errors.append(abs(x[..., 1].mean().item() - RHO * 1.0))
        # spread stays near the conditional variance 1 − ρ² = 0.36 (a coarse grid under-disperses a bit);
        # repeating steps without RePaint's re-noising would collapse it to ~0.04
        assert 0.15 < x[..., 1].var().item() < 0.5
    assert errors[0] > 0.2  # the known bias of plain replacement
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


CORRELATED_Y = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)  # pixel 1 known (= 1), pixel 2 unknown: E[x₂ | x₁ = 1] = ρ
CORRELATED_MASK = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)


def correlated_restore(method, sampler, *, zeta=0.0, n=3000):
    torch.manual_seed(0)  # the stochastic sampler's fresh noise
    return restore_images(correlated_denoiser, CORRELATED_Y, task="inpaint", sample=SAMPLERS[sampler], sigmas=grid(20),
                          noise=randn(n, 1, 1, 2), mask=CORRELATED_MASK, method=method, zeta=zeta)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddpm"])
def test_mcg_with_alpha_zero_is_exactly_replacement(sampler):
    assert torch.equal(correlated_restore("mcg", sampler, zeta=0.0, n=64), correlated_restore("replace", sampler, n=64))


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddpm"])
def test_mcg_keeps_the_measurement_and_moves_replacement_toward_the_conditional_mean(sampler):
    """Plain replacement is biased for correlated pixels (E[x₂] ≈ 0.4-0.5 off ρ); MCG's gradient through D moves the
    unknown pixel toward E[x₂ | x₁] = ρ (measured with this grid: bias 0.49 -> 0.25 (euler), 0.45 -> 0.22 (heun),
    0.38 -> 0.12 (ddpm) at α = 1) while the known pixel stays the measurement exactly."""
    plain, mcg = correlated_restore("replace", sampler), correlated_restore("mcg", sampler, zeta=1.0)
    assert torch.equal(mcg[..., 0], CORRELATED_Y[..., 0].expand(len(mcg), 1, 1))
    bias_plain, bias_mcg = (abs(x[..., 1].mean().item() - RHO) for x in (plain, mcg))
    assert bias_plain > 0.3 and bias_mcg < 0.6 * bias_plain
    assert ((mcg[..., 1] - RHO) ** 2).mean() < ((plain[..., 1] - RHO) ** 2).mean()


def test_mcg_is_the_gradient_step_then_the_replacement_by_hand():
    x, sigma = randn(2, 1, 1, 2, seed=3), torch.full((2,), 0.7)
    den = manifold_constrained(correlated_denoiser, y=CORRELATED_MASK * CORRELATED_Y, operator=mask_operator(CORRELATED_MASK),
                               y_full=CORRELATED_MASK * CORRELATED_Y, project=mask_operator(CORRELATED_MASK), alpha=0.4)
    xg = x.clone().requires_grad_(True)
    residual = (CORRELATED_MASK * correlated_denoiser(xg, sigma, None) - CORRELATED_Y * CORRELATED_MASK).square().sum()
    (grad,) = torch.autograd.grad(residual, xg)
    d = correlated_denoiser(x, sigma, None) - 0.4 * grad
    expected = d * (1 - CORRELATED_MASK) + CORRELATED_Y * CORRELATED_MASK
    assert torch.allclose(den(x, sigma, None), expected, atol=1e-6) and not torch.allclose(grad[..., 1], torch.zeros(2, 1, 1))


def test_resample_one_matches_the_plain_sampler_for_single_step_methods():
    noise, sigmas = randn(4, 1, 4, 4), grid(6)
    plain = sample_euler(gaussian_denoiser, noise, sigmas)
    stepped = sample_resampled(sample_euler, gaussian_denoiser, noise, sigmas, resample=1)
    assert torch.allclose(plain, stepped, atol=1e-5)
    with pytest.raises(ValueError, match="resample"):
        sample_resampled(sample_euler, gaussian_denoiser, noise, sigmas, resample=0)


def test_resampling_renoises_from_sigma_next_back_to_sigma_by_hand():
    """RePaint with Euler on (4, 1, 0), r = 3: step, re-noise by √(σ_i² − σ_{i+1}²)·z, step again (three times);
    no re-noising after a step's last repeat, and the final step to σ = 0 is taken once. The callback sees each
    step once, after its last repeat."""
    noise = randn(2, 1, 4, 4)
    zs = [randn(2, 1, 4, 4, seed=30 + k) for k in range(2)]
    queue, seen = list(zs), []
    x = sample_resampled(sample_euler, gaussian_denoiser, noise, torch.tensor([4.0, 1.0, 0.0]), resample=3,
                         randn=lambda like: queue.pop(0), callback=lambda info: seen.append((info["i"], info["x"])))
    assert not queue

    def D(x, sigma):
        return gaussian_denoiser(x, torch.full((2,), sigma, dtype=torch.float64), None)

    x_ref = noise.double() * 4.0
    for r in range(3):
        x_ref = D(x_ref, 4.0) + (1.0 / 4.0) * (x_ref - D(x_ref, 4.0))  # Euler 4 -> 1
        if r < 2:
            x_ref = x_ref + np.sqrt(4.0**2 - 1.0**2) * zs[r].double()
    after_step0 = x_ref
    x_ref = D(x_ref, 1.0)  # Euler 1 -> 0 returns D
    torch.testing.assert_close(x.double(), x_ref, rtol=1e-5, atol=1e-5)
    assert [i for i, _ in seen] == [0, 1]
    torch.testing.assert_close(seen[0][1].double(), after_step0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("operator_name", ["mask", "downsample"])
def test_reconstruction_guidance_step_by_hand(operator_name, normalize):
    """For a linear D(x; σ) = a(σ)·x + b and linear A: ∇_x‖A(D(x)) − y‖² = 2a·Aᵀ(A(D(x)) − y), so
    D' = D − ζ·2a·Aᵀ(A(D) − y), and with `normalize` (DPS) ζ is divided by ‖A(D) − y‖ per sample.
    Aᵀ is the mask itself, or for 2×2 box averaging the nearest upsampling divided by 4."""
    mask = (randn(1, 1, 4, 4, seed=7) > 0).float()
    operator, adjoint = {
        "mask": (mask_operator(mask), lambda v: mask * v),
        "downsample": (partial(downsample, scale=2), lambda v: upsample(v, scale=2) / 4),
    }[operator_name]
    x, sigma = randn(2, 1, 4, 4, seed=8), torch.tensor([0.5, 2.0])
    a = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
    linear = lambda x, sigma, labels: (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1) * x + 0.25  # noqa: E731
    y = operator(randn(2, 1, 4, 4, seed=9))
    d = a * x + 0.25
    residual = operator(d) - y
    step = torch.full((2, 1, 1, 1), 0.3)
    if normalize:
        step = step / residual.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    expected = d - step * 2 * a * adjoint(residual)
    got = reconstruction_guided(linear, y=y, operator=operator, zeta=0.3, normalize=normalize)(x, sigma, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- super-resolution: ILVR and CCDF -------------------------------------------------------------


def test_box_down_up_are_a_projection_pair():
    x = randn(2, 3, 8, 8)
    lo = randn(2, 3, 4, 4, seed=1)
    assert torch.allclose(downsample(upsample(lo, scale=2), scale=2), lo)
    assert torch.allclose(low_pass(low_pass(x, scale=2), scale=2), low_pass(x, scale=2), atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_ilvr_output_low_pass_equals_the_measurement(name):
    truth = randn(4, 1, 8, 8, seed=3)
    y = downsample(truth, scale=2)  # [4, 1, 4, 4]
    y_full = upsample(y, scale=2)
    den = projected(gaussian_denoiser, y_full=y_full, project=partial(low_pass, scale=2))
    x = SAMPLERS[name](den, measurement_noise(randn(4, 1, 8, 8), y_full=y_full, sigma_start=SIGMA_MAX), grid(10))
    assert torch.allclose(downsample(x, scale=2), y, atol=1e-5)
    assert not torch.allclose(x, y_full, atol=1e-2)  # the high frequencies were generated, not copied


def test_ccdf_starts_at_the_noised_estimate_on_a_shorter_grid():
    sigmas = grid(18)
    short = truncate_sigmas(sigmas, sigma_start=2.0)
    assert short[0].item() == 2.0 and short[-1].item() == 0.0 and len(short) < len(sigmas)
    assert bool((short[:-1] > short[1:]).all())
    estimate, noise = randn(2, 1, 8, 8, seed=4), randn(2, 1, 8, 8)
    seen = []
    sample_euler(gaussian_denoiser, measurement_noise(noise, y_full=estimate, sigma_start=2.0), short,
                 callback=lambda info: seen.append(info) if info["i"] == 0 else None)
    # the first step sees x_0 = x̂ + σ_start·ε: reconstruct it from the Euler update
    r = seen[0]["sigma_next"] / seen[0]["sigma"]
    x0 = (seen[0]["x"] - (1 - r) * seen[0]["denoised"]) / r
    assert torch.allclose(x0, estimate + 2.0 * noise, atol=1e-4)
    with pytest.raises(ValueError, match="sigma_start"):
        truncate_sigmas(sigmas, sigma_start=100.0)


# --- reconstruction guidance / DPS ----------------------------------------------------------------


@pytest.mark.parametrize("operator_name", ["mask", "downsample", "blur"])
def test_reconstruction_guidance_reduces_the_measurement_error(operator_name):
    truth = randn(8, 1, 8, 8, seed=5) * S + MU
    mask = (randn(1, 1, 8, 8, seed=6) > 0).float()
    operator = {"mask": mask_operator(mask), "downsample": partial(downsample, scale=2),
                "blur": gaussian_blur_operator(std=1.0)}[operator_name]
    y = operator(truth)
    noise, sigmas = randn(8, 1, 8, 8), grid(12)
    errors = []
    for zeta in (0.0, 0.05, 0.2, 0.5):
        den = reconstruction_guided(gaussian_denoiser, y=y, operator=operator, zeta=zeta)
        with torch.no_grad():  # the combinator turns grad on itself
            x = sample_heun(den, noise, sigmas)
        errors.append(measurement_error(x, y=y, operator=operator).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_reconstruction_guidance_zero_is_the_denoiser_and_refuses_inference_mode():
    x, sigma = randn(2, 1, 4, 4), torch.full([2], 1.5)
    op = mask_operator(torch.ones(1, 1, 4, 4))
    den = reconstruction_guided(gaussian_denoiser, y=x, operator=op, zeta=0.0)
    assert torch.allclose(den(x, sigma, None), gaussian_denoiser(x, sigma, None))
    with torch.inference_mode(), pytest.raises(ValueError, match="gradients"):
        reconstruction_guided(gaussian_denoiser, y=x, operator=op, zeta=1.0)(x, sigma, None)
    with pytest.raises(ValueError, match="zeta"):
        reconstruction_guided(gaussian_denoiser, y=x, operator=op, zeta=-1.0)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_masks_and_scales_raise_clear_errors():
    image = torch.zeros(1, 3, 8, 8)
    assert check_mask(torch.ones(8, 8), image).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="size"):
        check_mask(torch.ones(1, 1, 8, 6), image)
    with pytest.raises(ValueError, match="channels"):
        check_mask(torch.ones(1, 2, 8, 8), image)
    with pytest.raises(ValueError, match="no known pixels"):
        check_mask(torch.zeros(1, 1, 8, 8), image)
    with pytest.raises(ValueError, match="does not divide"):
        check_scale(28, 3)
    with pytest.raises(ValueError, match="does not divide"):
        downsample(torch.zeros(1, 1, 6, 6), scale=4)


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from edmkit.checkpoint import build_denoiser, save_network
    from edmkit.presets import get_preset

    folder = tmp_path_factory.mktemp("restore")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    save_network(folder / "net.safetensors", build_denoiser(cfg).state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    res = cfg.network.resolution
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (res, res), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((res, res), dtype=np.uint8)
    mask[:, : res // 2] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros((res, res), dtype=np.uint8)).save(folder / "empty.png")
    Image.fromarray(np.zeros((res - 2, res - 2), dtype=np.uint8)).save(folder / "small.png")
    Image.fromarray(np.zeros((res, res, 3), dtype=np.uint8) + 255).save(folder / "rgbmask.png")
    Image.fromarray(rng.integers(96, 160, (res // 2, res // 2), dtype=np.uint8)).save(folder / "low.png")
    return folder, res


def restore(*args):
    from edmkit.cli import main

    return CliRunner().invoke(main, ["restore", *[str(a) for a in args]], catch_exceptions=False)


@pytest.mark.parametrize("method", ["replace", "dps", "mcg"])
def test_cli_restore_inpaint(tiny_files, method):
    folder, res = tiny_files
    out = folder / f"inpaint-{method}.png"
    result = restore("--checkpoint", folder / "net.safetensors", "--task", "inpaint", "--image", folder / "image.png",
                     "--mask", folder / "mask.png", "--method", method, "--steps", "3", "--truth", folder / "image.png",
                     "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    restored = np.asarray(Image.open(out))
    assert restored.shape == (res, res)
    if method in ("replace", "mcg"):  # known pixels are the measurement
        assert np.array_equal(restored[:, : res // 2], np.asarray(Image.open(folder / "image.png"))[:, : res // 2])
    compare = Image.open(out.with_name(f"{out.stem}-compare.png"))
    assert compare.size[0] > 3 * res  # input | result | truth side by side


@pytest.mark.parametrize("method", ["ilvr", "ccdf", "dps", "mcg"])
def test_cli_restore_sr(tiny_files, method):
    folder, res = tiny_files
    out = folder / f"sr-{method}.png"
    result = restore("--checkpoint", folder / "net.safetensors", "--task", "sr", "--scale", "2", "--image", folder / "low.png",
                     "--method", method, "--steps", "3", "--sampler", "euler", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    restored = torch.from_numpy(np.array(Image.open(out))).float()[None, None]
    low = torch.from_numpy(np.array(Image.open(folder / "low.png"))).float()[None, None]
    assert restored.shape[-1] == res
    if method != "dps":  # projection methods: block means match the input (8-bit rounding; unclipped blocks)
        unclipped = downsample(((restored > 0) & (restored < 255)).float(), scale=2) == 1
        assert unclipped.float().mean().item() > 0.25
        assert (downsample(restored, scale=2) - low)[unclipped].abs().max().item() <= 1.0
    assert Image.open(out.with_name(f"{out.stem}-compare.png")).size[0] > 2 * res


@pytest.mark.parametrize("args,message", [
    (["--task", "inpaint", "--mask", "empty.png"], "no known pixels"),
    (["--task", "inpaint", "--mask", "small.png"], "size"),
    (["--task", "inpaint", "--mask", "rgbmask.png"], "channels"),
    (["--task", "inpaint"], "--mask"),
    (["--task", "sr", "--scale", "3"], "scale"),
    (["--task", "sr", "--scale", "4", "--image-low"], "size"),
    (["--task", "inpaint", "--mask", "mask.png", "--method", "ilvr"], "method"),
])
def test_cli_restore_errors_are_one_line(tiny_files, args, message):
    folder, _ = tiny_files
    image = folder / ("low.png" if args[-1] == "--image-low" else "image.png")
    args = [a if not a.endswith(".png") else folder / a for a in args if a != "--image-low"]
    result = restore("--checkpoint", folder / "net.safetensors", "--image", image, *args, "--steps", "2",
                     "--out", folder / "bad.png", "--device", "cpu")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
