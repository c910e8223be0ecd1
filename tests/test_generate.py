"""Sampling options end to end: samplers, schedules, CFG, autoguidance, interval, oscillation,
thresholding, the reverse-process GIF, bad-input errors, and label dropout during training."""

import functools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.data.images import float_to_images
from edmkit.diffusion.loss import EDMLoss
from edmkit.diffusion.samplers import SAMPLERS, SeededRandn, get_sampler
from edmkit.diffusion.schedules import karras_sigmas, loglinear_sigmas, vp_sigmas
from edmkit.presets import get_preset
from edmkit.report import ReverseProcessRecorder
from edmkit.sampling.generate import class_labels, generate_images, guided_denoiser, load_guide
from edmkit.training.loop import train, train_step
from edmkit.training.run_state import TrainState
from edmkit.training.step_inputs import drop_labels

CFG = get_preset("tiny").override("network", label_dim=10)
STEPS = "3"


def save_model(path, cfg, seed):
    """An untrained network whose output depends on x, sigma and the label (gains 1, not their initial 0)."""
    torch.manual_seed(seed)
    net = ckpt.build_denoiser(cfg)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("_gain"):  # output gain and the blocks' embedding gains
                param.fill_(1.0)
    ckpt.save_network(path, net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "cond": save_model(d / "cond.safetensors", CFG, 0),
        "guide": save_model(d / "guide.safetensors", CFG, 1),
        "uncond": save_model(d / "uncond.safetensors", CFG.override("network", label_dim=0), 2),
        "res32": save_model(d / "res32.safetensors", CFG.override("network", resolution=32), 3),
        "rgb": save_model(d / "rgb.safetensors", CFG.override("network", channels=3), 4),
    }


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def error_of(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0 and "Traceback" not in res.output
    return res.output


def sample_npz(models, tmp_path, *options, name="x.npz"):
    out = tmp_path / name
    run("generate", "--checkpoint", models["cond"], "--n", "2", "--steps", STEPS, "--out", out, *options)
    return np.load(out)["images"]


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory):
    return sample_npz(models, tmp_path_factory.mktemp("base"))


# --- each generate option alone, against what it must do ----------------------------------------


@pytest.fixture
def sampler_calls(monkeypatch):
    """Record every sampler call generate_images makes (name, denoiser, noise, grid, keywords), then run it."""
    import edmkit.sampling.generate as gen

    calls = []

    def spy_get_sampler(name):
        real = get_sampler(name)

        @functools.wraps(real)  # keeps the signature generate_images inspects
        def spy(denoiser, noise, sigmas, **kw):
            call = dict(name=name, denoiser=denoiser, noise=noise, sigmas=sigmas, **kw)
            call["out"] = real(denoiser, noise, sigmas, **kw)
            calls.append(call)
            return call["out"]

        return spy

    monkeypatch.setattr(gen, "get_sampler", spy_get_sampler)
    return calls


KARRAS3 = karras_sigmas(3)  # [80, 2.515, 0.002, 0]
PROBE_SIGMAS = torch.tensor([80.0, 20.0, 10.0, 5.0, 2.5152, 1.0, 0.5, 0.3, 0.002])  # both sides of --interval 0.5,10
CLI_CASES = {  # CLI options -> (sampler, grid, sampler keywords, guidance keywords of guided_denoiser, class)
    "plain": ([], "heun", KARRAS3, {}, {}, None),
    "euler-loglinear": (["--sampler", "euler", "--schedule", "loglinear"], "euler",
                        loglinear_sigmas(3, sigma_min=0.002, sigma_max=80.0), {}, {}, None),
    "heun-churn": (["--churn", "10", "--s-tmin", "0.01", "--s-tmax", "50", "--s-noise", "1.003"], "heun", KARRAS3,
                   dict(S_churn=10.0, S_tmin=0.01, S_tmax=50.0, S_noise=1.003), {}, None),
    "ddim-eta-vp": (["--sampler", "ddim", "--eta", "0.5", "--schedule", "vp"], "ddim", vp_sigmas(3), dict(eta=0.5), {}, None),
    "ddpm": (["--sampler", "ddpm"], "ddpm", KARRAS3, {}, {}, None),
    "dpmpp-2m": (["--sampler", "dpmpp-2m"], "dpmpp-2m", KARRAS3, {}, {}, None),
    "class": (["--class", "3"], "heun", KARRAS3, {}, {}, 3),
    "cfg-interval": (["--guidance", "3", "--interval", "0.5,10"], "heun", KARRAS3, {}, dict(guidance=3.0, interval=(0.5, 10.0)), None),
    "oscillate": (["--oscillate", "4,1", "--oscillate-warmup", "1"], "heun", KARRAS3, {},
                  dict(oscillate=(4.0, 1.0), oscillate_warmup=1), None),
    "threshold": (["--threshold", "0.9"], "heun", KARRAS3, {}, dict(threshold=0.9), None),
    "autoguidance": (["--guide-checkpoint", "GUIDE", "--guidance", "2"], "heun", KARRAS3, {}, dict(guide="GUIDE", guidance=2.0), None),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_option_reaches_the_sampler(models, tmp_path, sampler_calls, name):
    """End to end: each `edmkit generate` option alone arrives at the sampler call as the keyword, grid or denoiser it names.

    The sampler's denoiser is compared, on per-sample noise levels on both sides of the interval and on the grid
    points the oscillation counts, with guided_denoiser built from the expected keywords (whose own semantics the
    tests below pin with hand-made denoisers); without guidance options it must be the network itself.
    """
    options, sampler, sigmas, sampler_kw, guidance_kw, class_idx = CLI_CASES[name]
    options = [str(models["guide"]) if o == "GUIDE" else o for o in options]
    out = tmp_path / "x.npz"
    run("generate", "--checkpoint", models["cond"], "--n", "2", "--steps", STEPS, "--out", out, *options)
    (call,) = sampler_calls
    assert call["name"] == sampler
    assert torch.equal(call["sigmas"], sigmas)
    assert {k: call[k] for k in sampler_kw} == sampler_kw
    assert set(call) - {"name", "denoiser", "noise", "sigmas", "labels", "callback", "out", "randn"} == set(sampler_kw)
    assert torch.equal(call["noise"], SeededRandn([0, 1]).randn([1, 28, 28]))  # seeds 0 and 1
    if "randn" in call:
        assert isinstance(call["randn"], SeededRandn)
    expected_labels = class_labels([0, 1], label_dim=10, class_idx=class_idx, device="cpu")
    assert torch.equal(call["labels"], expected_labels)
    assert np.array_equal(np.load(out)["images"], float_to_images(call["out"]).numpy())  # the sampler's images are written

    net, meta = ckpt.load_network(models["cond"])
    if "guide" in guidance_kw:
        guidance_kw = dict(guidance_kw, guide=load_guide(models["guide"], like=meta["config"].network))
    reference = guided_denoiser(net, sigmas=sigmas, label_dim=10, **guidance_kw)
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(len(PROBE_SIGMAS), 1, 28, 28, generator=g)  # at σ = 0.002, D ≈ x: far outside [-1, 1]
    labels = torch.eye(10)[torch.randint(10, (len(PROBE_SIGMAS),), generator=g)]
    with torch.no_grad():
        got, want = call["denoiser"](x, PROBE_SIGMAS, labels), reference(x, PROBE_SIGMAS, labels)
        assert torch.equal(got, want)
        if not guidance_kw:
            assert isinstance(call["denoiser"], type(net))  # the network itself, not a combinator around it
        elif "threshold" in guidance_kw:
            assert got.abs().max() <= 1 < net(x, PROBE_SIGMAS, labels).abs().max()


# Hand-made denoisers for the Python API: D_main = 3 and D_guide = 1 everywhere make D_w = 1 + 2w, so each
# evaluation shows the weight it used, exactly.
def const_main(x, sigma, labels):
    return torch.full_like(x, 3.0)


def const_guide(x, sigma, labels):
    return torch.ones_like(x)


def forbidden(x, sigma, labels):
    raise AssertionError("the guide must not be evaluated outside the guidance interval")


def weights_seen(denoiser, sigma):
    """The guidance weight per sample that a D_main = 3, D_guide = 1 combination used at noise levels `sigma` [N]."""
    out = denoiser(torch.zeros(len(sigma), 1, 2, 2), sigma, None)
    assert bool((out == out[:, :1, :1, :1]).all())
    return ((out[:, 0, 0, 0] - 1) / 2).tolist()


def test_guidance_interval_option_leaves_noise_levels_outside_exactly_unguided():
    """--interval (LO, HI] = (0.5, 10]: w inside, the model itself (bit-exact, guide not run) outside, HI inclusive, LO not."""
    d = guided_denoiser(const_main, sigmas=KARRAS3, label_dim=0, guide=const_guide, guidance=4.0, interval=(0.5, 10.0))
    assert weights_seen(d, torch.tensor([20.0, 10.0001, 10.0, 5.0, 0.5001, 0.5, 0.3])) == [1, 1, 4, 4, 4, 1, 1]
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([20.0, 0.3])
    main_d = lambda x, s, l: 0.7 * x + s.reshape(-1, 1, 1, 1)  # noqa: E731
    outside = guided_denoiser(main_d, sigmas=KARRAS3, label_dim=0, guide=forbidden, guidance=4.0, interval=(0.5, 10.0))
    assert torch.equal(outside(x, sigma, None), main_d(x, sigma, None))
    # inside, autoguidance is D_guide + w·(D_main − D_guide), not the other way round
    guide_d = lambda x, s, l: 0.2 * x - 1.0  # noqa: E731
    inside = guided_denoiser(main_d, sigmas=KARRAS3, label_dim=0, guide=guide_d, guidance=4.0, interval=(0.5, 10.0))
    sigma = torch.tensor([5.0, 1.0])
    torch.testing.assert_close(inside(x, sigma, None), guide_d(x, sigma, None) + 4 * (main_d(x, sigma, None) - guide_d(x, sigma, None)))


def test_oscillate_option_gives_the_per_step_weights_inside_the_sampler():
    """--oscillate 4,1 --oscillate-warmup 1 on 6 Euler steps: w = 4 (warm-up), then 4, 1, 4, 1, 4 (HIGH first; the cycle
    counts from the end of the warm-up, so an odd warm-up tells it from counting from step 0)."""
    seen = []
    kw = dict(seeds=[0], resolution=2, channels=1, sampler="euler", steps=6, guide=const_guide, oscillate=(4.0, 1.0),
              callback=lambda info: seen.append(float(info["denoised"][0, 0, 0, 0])))
    generate_images(const_main, oscillate_warmup=1, **kw)
    assert [(d - 1) / 2 for d in seen] == [4, 4, 1, 4, 1, 4]
    seen.clear()  # with an interval (0.01, 10]: the grid is [80, 24.4, 5.84, 0.965, 0.085, 0.002]
    generate_images(const_main, oscillate_warmup=1, interval=(0.01, 10.0), **kw)
    assert [(d - 1) / 2 for d in seen] == [1, 1, 1, 4, 1, 1]
    d = guided_denoiser(const_main, sigmas=KARRAS3, label_dim=0, guide=const_guide, oscillate=(4.0, 1.0))
    assert weights_seen(d, KARRAS3[:-1]) == [4, 1, 4]  # no warm-up: the cycle starts at step 0


def imagen_threshold(x0, p):
    """Dynamic thresholding written from Imagen Sec. 2.3 with NumPy: s = max(percentile_p |x̂0| per sample, 1)."""
    a = x0.double().numpy()
    s = np.maximum(np.percentile(np.abs(a).reshape(len(a), -1), 100 * p, axis=1), 1.0).reshape(-1, *([1] * (a.ndim - 1)))
    return torch.from_numpy(np.clip(a, -s, s) / s).float()


def test_threshold_option_thresholds_the_guided_output():
    """threshold=p applies Imagen's dynamic thresholding to the final (guided) denoiser output, not only to D_main."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=g) * torch.tensor([3.0, 0.5, 1.5]).reshape(-1, 1, 1, 1)  # one row inside [-1, 1]
    sigma = torch.full((3,), 1.0)
    main_d = lambda x, s, l: 3 * x  # noqa: E731
    guide_d = lambda x, s, l: x  # noqa: E731
    plain = guided_denoiser(main_d, sigmas=KARRAS3, label_dim=0, threshold=0.9)
    torch.testing.assert_close(plain(x, sigma, None), imagen_threshold(3 * x, 0.9))
    auto = guided_denoiser(main_d, sigmas=KARRAS3, label_dim=0, guide=guide_d, guidance=2.0, threshold=0.9)
    out = auto(x, sigma, None)
    torch.testing.assert_close(out, imagen_threshold(5 * x, 0.9))  # D_guide + 2·(D_main − D_guide) = 5x, then thresholded
    assert out.abs().max() <= 1 and (5 * x).abs().max() > 1


def test_threshold_option_reaches_the_sampler_and_bounds_the_images():
    """generate_images(threshold=p): every denoised estimate the sampler uses is the thresholded one; with Euler the
    image is the last of them, so it lies in [−1, 1] where the unthresholded one does not."""
    raw = []

    def wide(x, sigma, labels):  # exact denoiser of N(0.3, 2²) data: estimates well outside [−1, 1]
        d = 0.3 + 4 / (4 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 0.3)
        raw.append(d)
        return d

    seen = []
    kw = dict(seeds=[0, 1, 2], resolution=4, channels=1, sampler="euler", steps=5)
    x = generate_images(wide, threshold=0.95, callback=lambda info: seen.append(info["denoised"]), **kw)
    assert len(seen) == len(raw) == 5
    for d_raw, d_used in zip(raw, seen):
        torch.testing.assert_close(d_used, imagen_threshold(d_raw, 0.95))
    assert torch.equal(x, seen[-1]) and x.abs().max() <= 1
    assert generate_images(wide, **kw).abs().max() > 1.5


def analytic(x, sigma, labels=None):
    """Exact denoiser of per-pixel N(0.3, 0.5²) data."""
    return 0.3 + 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 0.3)


GRIDS = {"karras": karras_sigmas(5), "loglinear": loglinear_sigmas(5, sigma_min=0.002, sigma_max=80.0), "vp": vp_sigmas(5)}


@pytest.mark.parametrize("sampler, schedule, options", [
    ("euler", "karras", {}),
    ("heun", "loglinear", {}),
    ("heun", "karras", dict(S_churn=5.0, S_tmin=0.05, S_tmax=10.0, S_noise=1.01)),
    ("ddim", "vp", dict(eta=0.5)),
    ("ddpm", "vp", {}),
    ("dpmpp-2m", "karras", {}),
])
def test_sampler_option_matches_calling_that_sampler_directly(sampler, schedule, options):
    """generate_images(sampler=, schedule=, options) is that sampler on that grid with per-seed noise, bit for bit."""
    seeds = [3, 7]
    rnd = SeededRandn(seeds)
    noise = rnd.randn([1, 4, 4])
    stochastic = dict(randn=rnd) if sampler in ("heun", "ddim", "ddpm") else {}
    expected = SAMPLERS[sampler](analytic, noise, GRIDS[schedule], **stochastic, **options)
    got = generate_images(analytic, seeds=seeds, resolution=4, channels=1, sampler=sampler, schedule=schedule, steps=5, **options)
    assert torch.equal(got, expected)


def test_churn_is_seeded_per_image_and_zero_churn_is_plain_heun():
    """Heun's churn noise comes from each image's seed: the same images for any batch size and on every run."""
    kw = dict(resolution=4, channels=1, steps=6)
    churn = dict(S_churn=20.0, S_tmin=0.05, S_tmax=50.0)
    a = generate_images(analytic, seeds=[4, 5, 6], batch=3, **kw, **churn)
    torch.testing.assert_close(generate_images(analytic, seeds=[4, 5, 6], batch=1, **kw, **churn), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(generate_images(analytic, seeds=[5], **kw, **churn), a[1:2], rtol=0, atol=1e-6)
    plain = generate_images(analytic, seeds=[4, 5, 6], **kw)
    assert torch.equal(generate_images(analytic, seeds=[4, 5, 6], S_churn=0.0, **kw), plain)
    assert (a - plain).abs().max() > 1e-2


def test_class_option_labels_every_image_and_default_classes_follow_the_seed():
    seen = []

    def spy(x, sigma, labels):
        seen.append(labels)
        return analytic(x, sigma)

    kw = dict(resolution=2, channels=1, label_dim=10, sampler="euler", steps=1)
    generate_images(spy, seeds=[0, 1, 2], class_idx=3, **kw)
    assert torch.equal(seen[-1], torch.eye(10)[[3, 3, 3]])
    generate_images(spy, seeds=list(range(8)), batch=8, **kw)
    together = seen[-1]
    assert len(set(together.argmax(1).tolist())) > 1  # drawn per image
    for k in range(8):  # image k's class depends on its seed alone, not on its place in the batch
        generate_images(spy, seeds=[k], **kw)
        assert torch.equal(seen[-1], together[k:k + 1])


def test_guidance_one_is_unguided_bit_exactly(models, tmp_path, baseline):
    assert np.array_equal(sample_npz(models, tmp_path, "--guidance", "1", name="a.npz"), baseline)
    assert np.array_equal(sample_npz(models, tmp_path, "--guidance", "1", "--guide-checkpoint", models["guide"], name="b.npz"), baseline)
    # and in float32 through the Python API, with a guide that must not matter
    net, meta = ckpt.load_network(models["cond"])
    guide = load_guide(models["guide"], like=meta["config"].network)
    kw = dict(seeds=[0, 1], resolution=28, channels=1, label_dim=10, steps=3)
    plain = generate_images(net, **kw)
    assert torch.equal(generate_images(net, guidance=1.0, guide=guide, **kw), plain)
    assert torch.equal(generate_images(net, guidance=3.0, interval=(100.0, 200.0), **kw), plain)  # interval above σ_max
    assert not torch.equal(generate_images(net, guidance=3.0, **kw), plain)


def test_guided_denoiser_weight_zero_is_the_guide():
    x, sigma, labels = torch.randn(2, 1, 4, 4), torch.full((2,), 1.0), torch.eye(3)[:2]
    main_d = lambda x, s, l: x + l.sum()  # noqa: E731
    guide_d = lambda x, s, l: 0.5 * x  # noqa: E731
    d = guided_denoiser(main_d, sigmas=karras_sigmas(3), label_dim=3, guide=guide_d, guidance=0.0)
    assert torch.equal(d(x, sigma, labels), guide_d(x, sigma, labels))
    cfg = guided_denoiser(main_d, sigmas=karras_sigmas(3), label_dim=3, guidance=0.0)  # CFG: zero labels
    assert torch.equal(cfg(x, sigma, labels), main_d(x, sigma, torch.zeros_like(labels)))


@pytest.mark.parametrize("bad, words", [("res32", "32x32x1"), ("rgb", "28x28x3"), ("uncond", "no classes")])
def test_guide_of_another_shape_is_refused(models, tmp_path, bad, words):
    msg = error_of("generate", "--checkpoint", models["cond"], "--guide-checkpoint", models[bad], "--guidance", "2",
                   "--n", "1", "--out", tmp_path / "x.png")
    assert words in msg and "must match" in msg
    with pytest.raises(ValueError, match="must match"):
        load_guide(models[bad], like=CFG.network)


def test_gif_has_one_frame_per_step_and_batches_do_not_change_it(models, tmp_path):
    gif = tmp_path / "rev.gif"
    run("generate", "--checkpoint", models["cond"], "--n", "3", "--steps", STEPS, "--out", tmp_path / "g.png",
        "--gif", gif, "--gif-n", "2")
    with Image.open(gif) as im:
        assert im.n_frames == int(STEPS)
    net, _ = ckpt.load_network(models["cond"])
    recs = []
    for batch in (1, 2):  # seeds 0 and 1 arrive in two batches or in one: same rows, same order
        recs.append(ReverseProcessRecorder(num=2))
        generate_images(net, seeds=[0, 1, 2], resolution=28, channels=1, label_dim=10, steps=3, batch=batch, callback=recs[-1])
    for i in range(3):
        for key in ("x", "denoised"):
            a, b = (torch.cat(r.steps[i][key]) for r in recs)
            assert a.shape == (2, 1, 28, 28)
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # batch size changes only float rounding
    frame = np.asarray(recs[0].frames()[0])
    assert frame.shape[0] > 2 * 28 and frame.shape[1] > 2 * 28  # two rows of [noisy | denoised] (+ title, padding)


@pytest.mark.parametrize("options, words", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--steps", "0"], "steps must be"),
    (["--schedule", "cosine"], "unknown sigma schedule"),
    (["--class", "10"], "out of range"),
    (["--sampler", "euler", "--churn", "5"], "does not take S_churn"),
    (["--interval", "1"], "cannot parse --interval"),
    (["--guidance", "2", "--oscillate", "4,1"], "not both"),
    (["--threshold", "2"], "percentile"),
])
def test_bad_options_give_one_line_errors(models, tmp_path, options, words):
    assert words in error_of("generate", "--checkpoint", models["cond"], "--n", "1", "--out", tmp_path / "x.png", *options)


def test_guidance_needs_conditional_model_or_guide(models, tmp_path):
    msg = error_of("generate", "--checkpoint", models["uncond"], "--guidance", "2", "--n", "1", "--out", tmp_path / "x.png")
    assert "class-conditional" in msg
    assert "unconditional" in error_of("generate", "--checkpoint", models["uncond"], "--class", "1", "--n", "1", "--out", tmp_path / "x.png")


# --- label dropout --------------------------------------------------------------------------------


def test_drop_labels_endpoints_and_rate():
    labels = torch.eye(10)[torch.arange(1000) % 10]  # [1000, 10] one-hot
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert not drop_labels(labels, p_uncond=1.0, generator=g()).any()
    assert torch.equal(drop_labels(labels, p_uncond=0.0, generator=g()), labels)
    half = drop_labels(labels, p_uncond=0.5, generator=g())
    kept = half.sum(1)
    assert set(kept.tolist()) <= {0.0, 1.0} and 400 < kept.sum() < 600
    assert torch.equal(half, drop_labels(labels, p_uncond=0.5, generator=g()))


class SpyLoss(EDMLoss):
    """EDMLoss that remembers the labels it was called with."""

    def __call__(self, denoiser, y, labels, **kw):
        self.seen = labels.clone()
        return super().__call__(denoiser, y, labels, **kw)


@pytest.mark.parametrize("p_uncond, rows_zero", [(1.0, 8), (0.0, 0)])
def test_train_step_applies_label_dropout(p_uncond, rows_zero):
    cfg = CFG.override("loss", p_uncond=p_uncond)
    net = ckpt.build_denoiser(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    from edmkit.training.ema import PowerFunctionEMA

    state = TrainState(net=net, optimizer=opt, ema=PowerFunctionEMA(net, stds=cfg.ema.stds))
    labels = torch.eye(10)[torch.arange(8)]
    spy = SpyLoss()
    train_step(state, spy, cfg, torch.zeros(8, 1, 28, 28), labels)
    assert int((spy.seen.sum(1) == 0).sum()) == rows_zero


def test_training_with_label_dropout_is_deterministic_and_resumable(tmp_path):
    cfg = CFG.override("loss", p_uncond=0.5).override("train", grid_nimg=10**9, total_nimg=32, grid_n=1)
    quiet = dict(progress=False, log=lambda s: None)
    a = train(cfg, tmp_path / "a", **quiet)
    b = train(cfg, tmp_path / "b", stop_nimg=16, **quiet)
    b = train(cfg, tmp_path / "b", **quiet)  # resumed after step 1
    no_dropout = train(cfg.override("loss", p_uncond=0.0), tmp_path / "c", **quiet)
    assert a.step == b.step == 2
    sd_a, sd_b, sd_c = a.net.state_dict(), b.net.state_dict(), no_dropout.net.state_dict()
    assert all(torch.equal(v, sd_b[k]) for k, v in sd_a.items())
    assert not all(torch.equal(v, sd_c[k]) for k, v in sd_a.items())


def test_cli_p_uncond(tmp_path):
    cfg = json.loads(run("train", "--preset", "tiny", "--cond", "--p-uncond", "0.1", "--dry-run").stdout)
    assert cfg["loss"]["p_uncond"] == 0.1 and cfg["network"]["label_dim"] == 10
    assert "--cond" in error_of("train", "--preset", "tiny", "--p-uncond", "0.1", "--dry-run")


def test_misspelled_option_is_a_value_error_naming_the_guidance_and_sampler_options():
    with pytest.raises(ValueError, match="does not take guidence.*guidance options: .*classifier_scale"):
        generate_images(lambda x, sigma, labels=None: x, seeds=[0], resolution=4, channels=1, guidence=2.0)


def test_a_run_with_churn_samples_with_it_unless_told_otherwise(tmp_path, sampler_calls):
    """The run's sampling setting (train.sample_churn, its sigma range and S_noise) is generate's default for Heun; any churn
    option on the command line replaces it, and other samplers never get it."""
    model = save_model(tmp_path / "churn.safetensors", CFG.override("train", sample_churn=7.0, sample_churn_sigmas=(0.1, 20.0), sample_s_noise=1.01), 5)
    out = run("generate", "--checkpoint", model, "--n", "2", "--steps", STEPS, "--out", tmp_path / "a.npz").output
    assert "S_churn 7 in [0.1, 20], S_noise 1.01 (the run's setting" in out
    assert {k: sampler_calls[-1][k] for k in ("S_churn", "S_tmin", "S_tmax", "S_noise")} == dict(S_churn=7.0, S_tmin=0.1, S_tmax=20.0, S_noise=1.01)
    run("generate", "--checkpoint", model, "--n", "2", "--steps", STEPS, "--churn", "0", "--out", tmp_path / "b.npz")
    assert sampler_calls[-1]["S_churn"] == 0 and "S_tmin" not in sampler_calls[-1]
    run("generate", "--checkpoint", model, "--n", "2", "--steps", STEPS, "--sampler", "euler", "--out", tmp_path / "c.npz")
    assert "S_churn" not in sampler_calls[-1]


def test_a_runs_own_sampler_and_steps_are_the_default_and_each_option_replaces_its_part(tmp_path, sampler_calls):
    """train.sample_sampler / sample_steps / sample_eta (the mnist preset: DPM-Solver++(2M) SDE, 11 steps) are what
    generate and metrics gen sample with when no --sampler/--steps/--eta is given; another sampler gets 18 steps and none
    of the run's options."""
    cfg = CFG.override("train", sample_sampler="dpmpp-2m", sample_steps=4, sample_eta=1.0, sample_schedule="loglinear")
    model = save_model(tmp_path / "sde.safetensors", cfg, 5)
    out = run("generate", "--checkpoint", model, "--n", "2", "--out", tmp_path / "a.npz").output
    assert "sampling: dpmpp-2m, 4 steps, loglinear sigmas, eta 1 (the run's setting" in out
    call = sampler_calls[-1]
    assert call["name"] == "dpmpp-2m" and call["eta"] == 1.0 and "randn" in call
    torch.testing.assert_close(call["sigmas"], loglinear_sigmas(4, sigma_min=0.002, sigma_max=80.0))
    run("generate", "--checkpoint", model, "--n", "2", "--steps", STEPS, "--eta", "0", "--schedule", "karras", "--out", tmp_path / "b.npz")
    assert sampler_calls[-1]["name"] == "dpmpp-2m" and sampler_calls[-1]["eta"] == 0
    torch.testing.assert_close(sampler_calls[-1]["sigmas"], KARRAS3)
    run("generate", "--checkpoint", model, "--n", "2", "--sampler", "heun", "--out", tmp_path / "c.npz")
    assert sampler_calls[-1]["name"] == "heun" and "eta" not in sampler_calls[-1]
    torch.testing.assert_close(sampler_calls[-1]["sigmas"], karras_sigmas(18))
    with pytest.raises(ValueError, match="sample_eta is an option of ddim, dpmpp-2m, dpmpp-3m, not of heun"):
        CFG.override("train", sample_eta=1.0)
