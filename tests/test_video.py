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
    from edmkit.data.movingmnist import MovingMNIST, embedded_digits, moving_mnist, render_clip, trajectories

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
