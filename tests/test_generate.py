"""Sampling options end to end: samplers, schedules, CFG, autoguidance, interval, oscillation,
thresholding, the reverse-process GIF, bad-input errors, and label dropout during training."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import get_preset
from edmkit.generate import generate_images, guided_denoiser, load_guide
from edmkit.loss import EDMLoss
from edmkit.report import ReverseProcessRecorder
from edmkit.schedules import karras_sigmas
from edmkit.train import TrainState, drop_labels, train, train_step

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


OPTION_SETS = {
    "euler-loglinear": ["--sampler", "euler", "--schedule", "loglinear"],
    "heun-churn": ["--churn", "10", "--s-tmin", "0.01", "--s-tmax", "50", "--s-noise", "1.003"],
    "ddim-eta-vp": ["--sampler", "ddim", "--eta", "0.5", "--schedule", "vp"],
    "ddpm-vp": ["--sampler", "ddpm", "--schedule", "vp"],
    "dpmpp-2m": ["--sampler", "dpmpp-2m"],
    "cfg-class-interval": ["--guidance", "3", "--class", "3", "--interval", "0.5,10"],
    "oscillate-threshold": ["--oscillate", "4,1", "--oscillate-warmup", "1", "--threshold", "0.9"],
    "autoguidance": ["--guide-checkpoint", "GUIDE", "--guidance", "2"],
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_each_option_set_writes_images_that_differ_from_plain_heun(models, tmp_path, baseline, name):
    options = [str(models["guide"]) if o == "GUIDE" else o for o in OPTION_SETS[name]]
    x = sample_npz(models, tmp_path, *options)
    assert x.shape == baseline.shape == (2, 1, 28, 28)
    assert not np.array_equal(x, baseline), f"{name} had no effect"


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
    from edmkit.ema import PowerFunctionEMA

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
    cfg = json.loads(run("train", "--preset", "tiny", "--cond", "--p-uncond", "0.1", "--dry-run").output)
    assert cfg["loss"]["p_uncond"] == 0.1 and cfg["network"]["label_dim"] == 10
    assert "--cond" in error_of("train", "--preset", "tiny", "--p-uncond", "0.1", "--dry-run")


def test_misspelled_option_is_a_value_error_naming_the_guidance_and_sampler_options():
    with pytest.raises(ValueError, match="does not take guidence.*guidance options: .*classifier_scale"):
        generate_images(lambda x, sigma, labels=None: x, seeds=[0], resolution=4, channels=1, guidence=2.0)
