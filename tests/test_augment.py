"""Non-leaky augmentation (EDM App. C): exact flips and translations, labels, network conditioning, training."""

import math

import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.data.augment import AUGMENT_DIM, TRANSFORMS, apply_augment, augment, augment_params
from edmkit.diffusion.precond import Denoiser
from edmkit.nn.unet import UNet
from edmkit.presets import get_preset
from edmkit.training.loop import train
from edmkit.training.run_state import RunError


def images(n=32, c=3, size=8, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def labels_with(n=1, **cols):
    """Augment labels [n, 7] with the named columns set: flip, tx, ty, scale, cos, sin, aniso."""
    p = torch.zeros(n, AUGMENT_DIM)
    for name, v in cols.items():
        p[:, ["flip", "tx", "ty", "scale", "cos", "sin", "aniso"].index(name)] = v
    return p


def test_p0_is_identity_with_zero_labels():
    x = images()
    y, labels = augment(x, p=0.0, generator=gen())
    assert torch.equal(y, x) and labels.shape == (32, AUGMENT_DIM) and not labels.any()


def test_p1_flips_are_exact_mirror_images():
    x = images(n=64)
    y, labels = augment(x, p=1.0, generator=gen(), transforms=("xflip",))
    flipped = labels[:, 0] == 1
    assert 10 < int(flipped.sum()) < 54  # a fair coin once selected (ADA): both outcomes occur
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])
    assert not labels[:, 1:].any()


def test_integer_translation_is_exact_with_reflection():
    x = images(n=1, size=8)
    y = apply_augment(x, labels_with(tx=2 / 8, ty=-1 / 8))  # content 2 px right, 1 px up
    assert torch.equal(y[..., :-1, 2:], x[..., 1:, :-2])
    assert torch.equal(y[..., :-1, 0], x[..., 1:, 2]) and torch.equal(y[..., :-1, 1], x[..., 1:, 1])  # mirrored border
    assert torch.equal(y[..., -1, 2:], x[..., -2, :-2])


def test_random_translations_are_whole_pixels_within_an_eighth():
    x = images(n=256, size=16)
    y, labels = augment(x, p=1.0, generator=gen(), transforms=("translate",))
    t = labels[:, 1:3] * 16
    assert torch.equal(t, t.round()) and t.abs().max() <= 2 and t.abs().max() > 0
    i = int((t.abs().sum(1) > 0).nonzero()[0])  # a shifted image is a permutation of pixels of the original (no resampling)
    assert set(y[i].flatten().tolist()) <= set(x[i].flatten().tolist())


def test_quarter_rotation_matches_rot90():
    x = images(n=2, size=8)
    y = apply_augment(x, labels_with(n=2, cos=math.cos(math.pi / 2) - 1, sin=1.0))
    torch.testing.assert_close(y, torch.rot90(x, k=-1, dims=(2, 3)), atol=1e-5, rtol=0)  # +theta: clockwise as displayed


def test_scaling_up_then_centre_is_magnified():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 6:10, 6:10] = 1  # a 4x4 square in the centre
    y = apply_augment(x, labels_with(scale=1.0))  # s = 2
    assert 0.9 < y.sum().item() / (4 * x.sum().item()) < 1.1  # area x4
    a = apply_augment(x, labels_with(aniso=1.0))  # x * 2, y / 2: same area, wider than tall
    assert (a[0, 0].sum(0) > 0.5).sum() > (a[0, 0].sum(1) > 0.5).sum()


def test_labels_encode_parameters():
    labels = augment_params(4000, p=0.5, generator=gen(), resolution=32)
    applied = labels.ne(0)
    rate = torch.stack([applied[:, 0], applied[:, 1:3].any(1), applied[:, 3], applied[:, 4:6].any(1), applied[:, 6]], 1).float().mean(0)
    assert torch.allclose(rate[1:], torch.full((4,), 0.5), atol=0.04), rate  # each transform with probability p
    assert abs(rate[0] - 0.25) < 0.04  # x-flip: selected with p, then a fair coin
    rotated = applied[:, 4:6].any(1)
    torch.testing.assert_close((labels[rotated, 4] + 1) ** 2 + labels[rotated, 5] ** 2, torch.ones(int(rotated.sum())))
    assert labels[:, 0].unique().tolist() == [0.0, 1.0]


def test_same_generator_same_result_and_fixed_draw_count():
    x = images()
    a, la = augment(x, p=0.5, generator=gen(3))
    b, lb = augment(x, p=0.5, generator=gen(3))
    assert torch.equal(a, b) and torch.equal(la, lb)
    g1, g2 = gen(5), gen(5)
    augment_params(8, p=0.0, generator=g1)
    augment_params(8, p=1.0, generator=g2, transforms=("xflip",))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # draws stay aligned across settings


def test_bad_arguments():
    with pytest.raises(ValueError, match="probability"):
        augment(images(), p=1.5, generator=gen())
    with pytest.raises(ValueError, match="unknown augmentation shear"):
        augment(images(), p=0.5, generator=gen(), transforms=("shear",))
    with pytest.raises(ValueError, match="augment labels must be"):
        apply_augment(images(n=2), torch.zeros(2, 3))
    assert set(TRANSFORMS) == {"xflip", "translate", "scale", "rotate", "aniso"}


def tiny_unet(ladder="G", augment_dim=AUGMENT_DIM):
    torch.manual_seed(0)
    net = UNet(resolution=8, channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=(), ladder=ladder, augment_dim=augment_dim)
    with torch.no_grad():  # zero-initialized gains (G) and output layers (A) would hide the embedding's effect
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
            elif not p.any():
                p.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("ladder", ["A", "G"])
def test_zero_augment_labels_equal_none(ladder):
    den = Denoiser(tiny_unet(ladder), logvar_channels=8).eval()
    x, sigma = images(n=4, c=1), torch.full((4,), 0.7)
    with torch.no_grad():
        none = den(x, sigma)
        zero = den(x, sigma, augment_labels=torch.zeros(4, AUGMENT_DIM))
        some = den(x, sigma, augment_labels=augment_params(4, p=1.0, generator=gen()))
    assert torch.equal(none, zero)
    assert not torch.allclose(none, some)  # the labels do reach the network


def test_network_without_augment_conditioning_refuses_labels():
    den = Denoiser(tiny_unet(augment_dim=0), logvar_channels=8)
    with pytest.raises(ValueError, match="augment_dim = 0"):
        den(images(n=2, c=1), torch.ones(2), augment_labels=torch.zeros(2, AUGMENT_DIM))


def test_build_denoiser_default_has_no_augment_layer():
    cfg = get_preset("tiny")
    assert ckpt.build_denoiser(cfg).net.emb_augment is None
    assert ckpt.build_denoiser(cfg.override("network", augment_dim=AUGMENT_DIM)).net.emb_augment is not None


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_two_step_training_with_augment_is_deterministic(tmp_path):
    args = ["train", "--preset", "tiny", "--duration", "32", "--augment", "0.5", "--quiet"]
    a = run_cli(*args, "--run", tmp_path / "a")
    b = run_cli(*args, "--run", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    na, meta = ckpt.load_network(ckpt.find_network(tmp_path / "a", ema_std=0.0))
    nb, _ = ckpt.load_network(ckpt.find_network(tmp_path / "b", ema_std=0.0))
    assert meta["config"].train.augment_p == 0.5 and na.net.augment_dim == AUGMENT_DIM
    for k, v in na.state_dict().items():
        assert torch.equal(v, nb.state_dict()[k]), k
    # the same network trained on the same noise without augmentation ends elsewhere: the images were augmented
    cfg = meta["config"].override("train", augment_p=0.0)
    plain = train(cfg, tmp_path / "c", progress=False, log=lambda s: None)
    assert any(not torch.equal(v, na.state_dict()[k]) for k, v in plain.net.state_dict().items())


def test_augment_without_conditioning_is_refused(tmp_path):
    cfg = get_preset("tiny").override("train", augment_p=0.5, total_nimg=16)
    with pytest.raises(RunError, match="augment_dim"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)


def test_resume_with_augment_is_bit_exact(tmp_path):
    cfg = get_preset("tiny").override("network", augment_dim=AUGMENT_DIM)
    cfg = cfg.override("train", augment_p=0.5, total_nimg=64, state_nimg=32, grid_nimg=10**9)
    straight = train(cfg, tmp_path / "a", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "b", stop_nimg=32, progress=False, log=lambda s: None)
    resumed = train(cfg, tmp_path / "b", progress=False, log=lambda s: None)
    assert resumed.nimg == straight.nimg == 64
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
