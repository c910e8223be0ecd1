"""``edmkit video``: extension keeps the known frames, interpolation and long clips have the asked-for length, one-line errors."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_video import tiny_video_net  # movingmnist-tiny (16x16x1, 4 frames) with its zero gains opened

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.cli.video import conditioned_clips, read_input_clips
from edmkit.diffusion.samplers import get_sampler
from edmkit.diffusion.schedules import karras_sigmas
from edmkit.presets import get_preset


def invoke(*args):
    return CliRunner().invoke(main, ["video", *map(str, args), "--steps", "2", "--device", "cpu"])


@pytest.fixture(scope="module")
def video_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "net.safetensors"
    ckpt.save_network(path, tiny_video_net().state_dict(), cfg=get_preset("movingmnist-tiny"), nimg=0, ema_std=0)
    return path


def write_clips(path, n=3, frames=5, size=16):
    videos = np.random.default_rng(0).integers(0, 256, (n, frames, size, size), dtype=np.uint8)
    np.savez(path, videos=videos)
    return videos


@pytest.mark.parametrize("w_r", ["0", "4"])
def test_extension_keeps_the_known_frames_exactly(video_net, tmp_path, w_r):
    videos = write_clips(tmp_path / "in.npz")
    res = invoke("--checkpoint", video_net, "--extend", tmp_path / "in.npz", "--known", 3, "--frames", 6, "--w-r", w_r,
                 "--batch", 2, "--out", tmp_path / "out.npz")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "out.npz") as npz:
        out, seeds = npz["videos"], npz["seeds"]
    assert out.shape == (3, 6, 16, 16) and list(seeds) == [0, 1, 2]
    np.testing.assert_array_equal(out[:, :3], videos[:, :3])  # bit-exact through uint8 -> float -> sampler -> uint8
    assert (out[:, 3:] != videos[:, 3:4]).any()  # new frames were sampled, not copied


def test_interpolation_and_long_clips_have_the_asked_for_frames(video_net, tmp_path):
    videos = write_clips(tmp_path / "in.npz", n=1, frames=3)
    res = invoke("--checkpoint", video_net, "--interpolate", tmp_path / "in.npz", "--every", 2, "--w-r", 0, "--out", tmp_path / "i.npz")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "i.npz") as npz:
        out = npz["videos"]
    assert out.shape == (1, 5, 16, 16)
    np.testing.assert_array_equal(out[:, ::2], videos)
    res = invoke("--checkpoint", video_net, "--long", 7, "--overlap", 2, "--n", 2, "--w-r", 0, "--out", tmp_path / "long.gif")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "long.gif") as gif:
        assert gif.n_frames == 7


@pytest.mark.parametrize("w_r", [0.0, 2.0])
def test_super_resolution_frames_average_to_their_inputs(video_net, tmp_path, w_r):
    """Per-frame SR: each 2x2 block of an output frame averages to its input pixel (exact in float: the projection);
    the command writes clips at the network's size."""
    videos = write_clips(tmp_path / "small.npz", n=2, frames=3, size=8)
    res = invoke("--checkpoint", video_net, "--sr", tmp_path / "small.npz", "--w-r", w_r, "--out", tmp_path / "sr.npz")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "sr.npz") as npz:
        assert npz["videos"].shape == (2, 3, 16, 16)
    net, _ = ckpt.load_network(video_net)
    small = read_input_clips(str(tmp_path / "small.npz"), resolution=8, channels=1)  # [2, 1, 3, 8, 8] float
    x = conditioned_clips(net, get_sampler("euler"), small, seeds=[0, 1], task=dict(scale=2), w_r=w_r, batch=2, device="cpu",
                          label_dim=0, class_idx=None, sigmas=karras_sigmas(3))
    assert x.shape == (2, 1, 3, 16, 16)
    torch.testing.assert_close(x.unflatten(-1, (8, 2)).unflatten(-3, (8, 2)).mean(dim=(-1, -3)), small, atol=1e-5, rtol=0)
    assert x.unflatten(-1, (8, 2)).unflatten(-3, (8, 2)).std(dim=(-1, -3)).mean() > 0.01  # detail sampled, not pixel copies


def error_of(*args):
    res = invoke(*args)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    return res.output


def test_user_mistakes_are_one_line_errors(video_net, tmp_path):
    write_clips(tmp_path / "in.npz")
    write_clips(tmp_path / "big.npz", size=32)
    net, inp, out = ["--checkpoint", video_net], ["--extend", tmp_path / "in.npz"], ["--out", tmp_path / "o.gif"]
    image_net = tmp_path / "image.safetensors"
    image_cfg = get_preset("tiny")
    ckpt.save_network(image_net, ckpt.build_denoiser(image_cfg).state_dict(), cfg=image_cfg, nimg=0, ema_std=0)
    assert "image network" in error_of("--checkpoint", image_net, *inp, *out)
    assert "the network takes 16x16x1" in error_of(*net, "--extend", tmp_path / "big.npz", *out)
    assert "must be below --frames" in error_of(*net, *inp, "--known", 4, "--frames", 4, *out)
    assert "overlap must be in [1, window - 1]" in error_of(*net, "--long", 8, "--overlap", 4, *out)
    assert "no such clips file" in error_of(*net, "--extend", tmp_path / "missing.npz", *out)
    assert "exactly one of" in error_of(*net, *inp, "--long", 8, *out)
    assert "--scale must be >= 2 and divide" in error_of(*net, "--sr", tmp_path / "in.npz", "--scale", 3, *out)
    assert "the network takes 8x8x1" in error_of(*net, "--sr", tmp_path / "in.npz", *out)
    assert "--scale does not apply" in error_of(*net, *inp, "--scale", 2, *out)
