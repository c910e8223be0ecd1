"""Video (issue 22): clips [N, C, T, H, W] through preconditioning and losses, Moving MNIST, the space-time network,
joint image-video batches, training and sampling."""

import numpy as np
import pytest
import torch

from edmkit.diffusion.loss import EDMLoss
from edmkit.diffusion.precond import Denoiser, per_example


class PixelNet(torch.nn.Module):
    """A backbone that mixes nothing across examples: F = tanh(x * (1 + c_noise)) per element, any rank."""

    def forward(self, x, c_noise, labels=None):
        return torch.tanh(x * (1 + per_example(c_noise, x)))


def test_per_example_broadcasts_over_any_rank():
    x = torch.zeros(3, 1, 4, 5, 6)
    assert per_example(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1, 1)
    assert per_example(2.0, x).shape == (3, 1, 1, 1, 1)
    assert (per_example(torch.tensor([1.0, 2.0, 3.0]), x) * x).shape == x.shape


def test_clip_precond_and_loss_equal_a_per_clip_loop():
    # One channel is the case a fixed [N, 1, 1, 1] sigma would silently broadcast to [N, N, T, H, W].
    g = torch.Generator().manual_seed(0)
    y, noise = torch.randn(3, 1, 4, 6, 6, generator=g), torch.randn(3, 1, 4, 6, 6, generator=g)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    net = Denoiser(PixelNet())
    D = net(y, sigma)
    assert D.shape == y.shape
    for i in range(3):
        torch.testing.assert_close(D[i:i + 1], net(y[i:i + 1], sigma[i:i + 1]))
    loss_fn = EDMLoss(uncertainty=True)
    loss, mse = loss_fn(net, y, None, sigma=sigma, noise=noise)
    assert loss.shape == mse.shape == (3,)
    for i in range(3):
        li, mi = loss_fn(net, y[i:i + 1], None, sigma=sigma[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(loss[i:i + 1], li)
        torch.testing.assert_close(mse[i:i + 1], mi)


# --- Moving MNIST --------------------------------------------------------------------------------------------------

def test_bounce_is_reflection_off_both_walls():
    from edmkit.data.movingmnist import bounce

    # A point stepped frame by frame, its velocity flipped where it would leave [0, L], lands where the closed form says.
    L, p, v = 10.0, 3.0, 2.7
    for t in range(1, 40):
        p += v
        if p > L:
            p, v = 2 * L - p, -v
        elif p < 0:
            p, v = -p, -v
        assert abs(float(bounce(3.0, 2.7, t, L)) - p) < 1e-9
    assert float(bounce(9.0, 2.0, 1, 10.0)) == 9.0  # 11 reflects to 9
    t = np.arange(1000.0)
    assert bounce(0.5, -3.3, t, 7.0).min() >= 0 and bounce(0.5, -3.3, t, 7.0).max() <= 7.0


def test_moving_mnist_is_seeded_per_clip_and_in_bounds():
    from edmkit.data.movingmnist import (
        MovingMNIST,
        embedded_digits,
        moving_mnist,
        render_clip,
        trajectories,
    )

    spec = MovingMNIST(size=32, frames=6, clips=5, seed=3)
    clips = moving_mnist(spec)
    assert clips.shape == (5, 6, 32, 32, 1) and clips.dtype == np.uint8
    digits = embedded_digits(spec.digit_px)
    assert spec.digit_px == 14 and digits.shape[1:] == (14, 14)
    # clip i depends on (seed, i) only: the same from a smaller dataset, another from another seed
    np.testing.assert_array_equal(render_clip(MovingMNIST(size=32, frames=6, clips=1, seed=3), 4, digits), clips[4, ..., 0])
    assert not np.array_equal(render_clip(MovingMNIST(size=32, frames=6, seed=4), 4, digits), clips[4, ..., 0])
    for i in range(5):
        picks, pos = trajectories(spec, i)
        assert pos.min() >= 0 and pos.max() <= 32 - 14  # every digit wholly inside every frame
        step = np.linalg.norm(np.diff(pos, axis=1), axis=2)
        assert np.all(step <= spec.pixels_per_frame + 1e-9)  # at most the speed (less only when it reflects mid-step)
        # overlaps combine by max: every frame's brightest pixel is some digit's brightest pixel
        assert all(clips[i, f].max() <= max(digits[p].max() for p in picks) for f in range(6))
        assert all(clips[i, f].max() > 0 for f in range(6))


def test_video_sources_load_as_clips(tmp_path):
    from PIL import Image

    from edmkit.data.dataset import load_dataset

    data = load_dataset("movingmnist:clips=3,digits=1", resolution=16, channels=1, frames=4)
    assert tuple(data.images.shape) == (3, 1, 4, 16, 16) and data.frames == 4 and data.resolution == 16
    videos = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "v.npz", videos=videos, labels=np.array([0, 1]))
    data = load_dataset(tmp_path / "v.npz", frames=4)  # 8 frames -> two clips of 4 each
    assert tuple(data.images.shape) == (4, 1, 4, 8, 8) and data.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(data.images[1, 0].numpy(), videos[0, 4:])
    (tmp_path / "gifs").mkdir()
    for k in range(2):
        frames = [Image.fromarray(videos[k, t]).convert("P") for t in range(8)]
        frames[0].save(tmp_path / "gifs" / f"{k}.gif", save_all=True, append_images=frames[1:])
    assert tuple(load_dataset(tmp_path / "gifs", frames=8).images.shape) == (2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="shorter than the network's 9"):
        load_dataset(tmp_path / "v.npz", frames=9)
    with pytest.raises(ValueError, match="takes clips of 4 frames"):
        load_dataset("mnist5k", frames=4)
    with pytest.raises(ValueError, match="moving mnist option 'nope=1'"):
        load_dataset("movingmnist:nope=1", frames=4)


# --- the space-time network -----------------------------------------------------------------------------------------

def tiny_video_net(**network):
    from edmkit.checkpoint import build_denoiser
    from edmkit.presets import get_preset

    cfg = get_preset("movingmnist-tiny")
    torch.manual_seed(0)
    net = build_denoiser(cfg.override("network", **network) if network else cfg).eval()
    with torch.no_grad():  # open the zero-initialised gains so every path matters
        for name, p in net.named_parameters():
            if not p.any():
                p.copy_(0.5 + 0.1 * torch.randn(p.shape))
    return net


def test_video_net_takes_any_clip_length_and_checks_its_inputs():
    net = tiny_video_net()
    for T in (1, 4, 7):
        assert net(torch.randn(2, 1, T, 16, 16), torch.ones(2)).shape == (2, 1, T, 16, 16)
    with pytest.raises(ValueError, match=r"takes clips \[N, C, T, H, W\]"):
        net.net(torch.randn(2, 1, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match="segment ids of shape"):
        net.net(torch.randn(2, 1, 4, 16, 16), torch.ones(2), segments=torch.zeros(2, 3, dtype=torch.long))
    from edmkit.config import NetworkConfig

    with pytest.raises(ValueError, match="frames must be >= 1"):
        NetworkConfig(arch="video-unet", resolution=28)
    with pytest.raises(ValueError, match="takes images, not clips"):
        NetworkConfig(frames=4)


def test_appended_images_are_independent_of_everything_else():
    # Joint training: a clip of 4 frames (segment 0) plus 2 appended images (segments 1, 2). Changing image 5 must
    # leave every other frame's output bit-identical, and change its own.
    net = tiny_video_net()
    segments = torch.tensor([0, 0, 0, 0, 1, 2])
    x = torch.randn(2, 1, 6, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        a = net(x, sigma, segments=segments)
        x2 = x.clone()
        x2[0, :, 5] = torch.randn(1, 16, 16)
        b = net(x2, sigma, segments=segments)
        assert torch.equal(a[:, :, :5], b[:, :, :5]) and torch.equal(a[1], b[1])
        assert not torch.allclose(a[0, :, 5], b[0, :, 5])
        # without the segments, the same change reaches the clip's frames through temporal attention
        assert not torch.equal(net(x, sigma)[0, :, :4], net(x2, sigma)[0, :, :4])
        # an appended image is denoised as a one-frame clip
        torch.testing.assert_close(a[:, :, 4:5], net(x[:, :, 4:5], sigma), atol=1e-5, rtol=1e-5)


def test_frame_permutation_equivariance_with_the_distance_bias_zeroed():
    net = tiny_video_net()
    x, sigma, perm = torch.randn(2, 1, 5, 16, 16), torch.tensor([0.3, 3.0]), torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        for block in net.net.temporal.values():
            block.bias.zero_()
        torch.testing.assert_close(net(x, sigma)[:, :, perm], net(x[:, :, perm], sigma), atol=1e-5, rtol=1e-5)
        for block in net.net.temporal.values():  # a distance bias breaks it: the test can fail
            block.bias.copy_(torch.arange(block.bias.numel(), dtype=torch.float32).reshape(block.bias.shape) / 10)
        assert not torch.allclose(net(x, sigma)[:, :, perm], net(x[:, :, perm], sigma), atol=1e-4)


# --- training, checkpoints, sampling -------------------------------------------------------------------------------

def fixed_clip_loss(net, clips: torch.Tensor) -> float:
    """lambda-weighted error on fixed clips, sigmas and noise (comparable before / after training)."""
    g = torch.Generator().manual_seed(123)
    loss_fn = EDMLoss(uncertainty=False)
    sigma = loss_fn.sample_sigma(len(clips), generator=g)
    noise = torch.randn(clips.shape, generator=g)
    with torch.no_grad():
        return loss_fn(net.eval(), clips, None, sigma=sigma, noise=noise)[0].mean().item()


def test_joint_training_lowers_the_loss_and_the_network_round_trips(tmp_path):
    from edmkit import checkpoint as ckpt
    from edmkit.data.dataset import dataset_of, sample_order
    from edmkit.data.images import images_to_float
    from edmkit.presets import get_preset
    from edmkit.training.loop import make_batch, train

    cfg = get_preset("movingmnist-tiny").override("train", image_frames=2, total_nimg=96, grid_nimg=96)
    clips = images_to_float(dataset_of(cfg).images[:16])
    y, _, _ = make_batch(dataset_of(cfg), cfg, 0, "cpu")
    assert tuple(y.shape) == (4, 1, 6, 16, 16)  # 4 frames + 2 appended images
    torch.testing.assert_close(y[:, :, :4], images_to_float(dataset_of(cfg).images[sample_order(num_items=64, seed=0, start=0, count=4)]))
    torch.manual_seed(0)
    before = fixed_clip_loss(ckpt.build_denoiser(cfg), clips)
    state = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    after = fixed_clip_loss(state.net, clips)
    assert after < 0.8 * before, (before, after)
    assert sorted(p.name for p in (tmp_path / "run").glob("grid-*")) == ["grid-000000000096.gif", "grid-000000000096.png"]
    from edmkit.report import write_report

    page = write_report(tmp_path / "run", tmp_path / "report").read_text()
    assert "grid-000000000096.png" in page and "reverse.gif" in page  # the reverse process of clips: strips of their frames
    from PIL import Image

    with Image.open(tmp_path / "report" / "reverse.gif") as gif:  # 4 clips of 4 frames, 16 px: strips 64 px wide per panel
        assert gif.n_frames == cfg.train.sample_steps and gif.size[0] > 2 * 4 * 16
    ckpt.save_network(tmp_path / "net.safetensors", state.net.state_dict(), cfg=cfg, nimg=state.nimg, ema_std=0)
    net, meta = ckpt.load_network(tmp_path / "net.safetensors")
    assert meta["config"] == cfg
    with torch.no_grad():
        assert torch.equal(net(clips[:2], torch.tensor([0.5, 5.0])), state.net.eval()(clips[:2], torch.tensor([0.5, 5.0])))


def test_joint_images_come_from_an_image_dataset_when_given(tmp_path):
    """--image-data: every appended frame is one of that dataset's images (here, constant images no clip frame equals);
    a clip source or a missing --image-frames is a one-line error."""
    import numpy as np

    from edmkit.data.dataset import dataset_of
    from edmkit.data.images import images_to_float
    from edmkit.presets import get_preset
    from edmkit.training.loop import load_training_data, make_batch
    from edmkit.training.run_state import RunError

    levels = np.array([3, 77, 151, 229], dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=np.broadcast_to(levels[:, None, None], (4, 16, 16)).copy())
    cfg = get_preset("movingmnist-tiny").override("train", image_frames=3, image_data=str(tmp_path / "imgs.npz"))
    data = load_training_data(cfg)
    y, _, _ = make_batch(data, cfg, 0, "cpu")
    assert tuple(y.shape) == (4, 1, 7, 16, 16)
    appended = y[:, :, 4:]  # [4, 1, 3, 16, 16]
    assert (appended == appended[..., :1, :1]).all()  # each appended frame is one constant image of the pool
    allowed = images_to_float(torch.from_numpy(levels).reshape(4, 1, 1, 1))[:, 0, 0, 0]
    assert torch.isin(appended[..., 0, 0].flatten(), allowed).all() and appended[..., 0, 0].unique().numel() > 1
    torch.testing.assert_close(make_batch(data, cfg, 0, "cpu")[0], y)  # seeded by (seed, nimg): resume draws the same
    assert data.subset([0, 1]).joint_images is data.joint_images  # the validation split keeps the pool
    assert dataset_of(cfg).joint_images is None  # without load_training_data: frames of other clips
    with pytest.raises(RunError, match="not clips"):
        load_training_data(cfg.override("train", image_data="movingmnist:clips=8"))
    with pytest.raises(ValueError, match="give --image-frames K too"):
        cfg.override("train", image_frames=0)


def test_clips_sample_with_heun_and_cfg_and_generate_writes_them(tmp_path):
    from click.testing import CliRunner

    from edmkit import checkpoint as ckpt
    from edmkit.cli import main
    from edmkit.presets import get_preset
    from edmkit.sampling.generate import generate_images

    cfg = get_preset("movingmnist-tiny").override("network", label_dim=3)
    net = tiny_video_net(label_dim=3)
    x = generate_images(net, seeds=[0, 1, 2], resolution=16, channels=1, label_dim=3, frames=4, steps=3, guidance=2.0, class_idx=1)
    assert x.shape == (3, 1, 4, 16, 16) and x.isfinite().all()
    again = generate_images(net, seeds=[2], resolution=16, channels=1, label_dim=3, frames=4, steps=3, guidance=2.0, class_idx=1)
    torch.testing.assert_close(again[0], x[2], atol=1e-3, rtol=1e-3)  # clip k depends on its seed only (up to batched-conv rounding)
    plain = generate_images(net, seeds=[2], resolution=16, channels=1, label_dim=3, frames=4, steps=3, class_idx=1)
    assert not torch.allclose(plain[0], x[2])  # the guidance weight reaches the clips
    ckpt.save_network(tmp_path / "net.safetensors", net.state_dict(), cfg=cfg, nimg=0, ema_std=0)
    for out in ("clips.gif", "clips.npz", "strip.png"):
        result = CliRunner().invoke(main, ["generate", "--checkpoint", str(tmp_path / "net.safetensors"), "--out", str(tmp_path / out),
                                           "--n", "3", "--steps", "3", "--guidance", "2", "--frames", "5", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    videos = np.load(tmp_path / "clips.npz")["videos"]
    assert videos.shape == (3, 5, 16, 16) and videos.dtype == np.uint8
    from PIL import Image

    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == 5
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(tmp_path / "net.safetensors"), "--out", str(tmp_path / "c.npz"),
                                       "--n", "2", "--steps", "3", "--gif", str(tmp_path / "rev.gif"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "rev.gif") as gif:  # one GIF frame per step; the 2 clips as strips of 4 frames, noisy | denoised
        assert gif.n_frames == 3 and gif.size[0] > gif.size[1]
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(tmp_path / "net.safetensors"), "--out", str(tmp_path / "folder"),
                                       "--n", "2", "--steps", "2", "--device", "cpu"])
    assert result.exit_code != 0 and "clips" in result.output


def test_autoguidance_of_clips_needs_a_clip_guide():
    from edmkit.config import NetworkConfig
    from edmkit.presets import get_preset
    from edmkit.sampling.generate import check_guide, generate_images

    video = get_preset("movingmnist-tiny").network
    check_guide(video, NetworkConfig(**{**video.__dict__, "frames": 8}))  # another training length is fine
    with pytest.raises(ValueError, match="denoises images but the model clips"):
        check_guide(video, get_preset("tiny").override("network", resolution=16, attn_resolutions=(8,)).network)
    main, guide = tiny_video_net(), tiny_video_net(model_channels=4)
    x = generate_images(main, seeds=[0], resolution=16, channels=1, frames=3, steps=2, guide=guide, guidance=2.0)
    plain = generate_images(main, seeds=[0], resolution=16, channels=1, frames=3, steps=2)
    assert x.shape == (1, 1, 3, 16, 16) and not torch.allclose(x, plain)
