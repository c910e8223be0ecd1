"""Video (issue 22): clips [N, C, T, H, W] through preconditioning and losses, Moving MNIST, the space-time network,
joint image-video batches, training and sampling."""

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
