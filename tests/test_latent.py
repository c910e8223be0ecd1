"""Latent spaces: the Encoder seam (pixels bit-identical; a diffusers VAE from a local folder, offline), its
standardisation, and sampling latent networks (trained or imported from EDM2) decoded to images."""

import json

import pytest
import torch
from click.testing import CliRunner

from edmkit.checkpoint import build_denoiser, save_network
from edmkit.cli import main
from edmkit.config import EMAConfig, ExperimentConfig, NetworkConfig, TrainConfig
from edmkit.data.images import images_to_float
from edmkit.latent.encoder import DiffusersVAE, PixelEncoder, encoder_from_spec, measured_vae, posterior_moments

diffusers = pytest.importorskip("diffusers")


def tiny_vae(folder, seed=0):
    """A random-weight AutoencoderKL (3 -> 4 latent channels, 2x down), written with save_pretrained."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def digits(n=16, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_pixel_encoder_is_todays_pipeline():
    images = digits()
    mean, std = PixelEncoder().encode(images)
    assert torch.equal(mean, images_to_float(images)) and not std.any()
    assert PixelEncoder().decode(mean) is mean
    assert isinstance(encoder_from_spec(None), PixelEncoder) and isinstance(encoder_from_spec({"kind": "pixels"}), PixelEncoder)


def test_posterior_moments_is_the_law_of_total_variance():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4000, 2, 1, 1, generator=g) * torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1) + torch.tensor([0.5, -2.0]).reshape(1, 2, 1, 1)
    std = torch.full_like(mean, 2.0)
    m, s = posterior_moments(mean, std)
    z = mean + std * torch.randn(mean.shape, generator=g)
    assert m == pytest.approx(z.mean(dim=(0, 2, 3)).tolist(), abs=0.15)
    assert s == pytest.approx(z.std(dim=(0, 2, 3)).tolist(), rel=0.05)


def test_measured_constants_give_sigma_data_latents_and_decode_inverts_the_standardisation(vae_dir):
    images = digits(64)
    enc = measured_vae(vae_dir, images, final_std=0.5)
    mean, std = enc.encode(images)
    assert mean.shape == (64, 4, 8, 8) and enc.factor == 2 and enc.channels == 4
    z = enc.latents(mean, std, torch.randn(mean.shape, generator=torch.Generator().manual_seed(1)))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert z.std(dim=(0, 2, 3)).tolist() == pytest.approx([0.5] * 4, rel=0.1)
    raw = diffusers.AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    with torch.no_grad():
        expected = raw.decode((mean - enc._constants(mean)[1]) / enc._constants(mean)[0]).sample.clamp(-1, 1)
    assert torch.allclose(enc.decode(mean), expected, atol=1e-5)
    again = encoder_from_spec(json.loads(json.dumps(enc.spec)))  # the spec alone rebuilds it
    assert torch.equal(again.decode(mean), enc.decode(mean))


def test_vae_folder_errors(tmp_path, vae_dir):
    for folder, message in ((tmp_path / "nope", "no such VAE folder"), (tmp_path, "no config.json")):
        with pytest.raises(ValueError, match=message):
            DiffusersVAE(folder, raw_mean=[0] * 4, raw_std=[1] * 4)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no VAE weights"):
        DiffusersVAE(tmp_path, raw_mean=[0] * 4, raw_std=[1] * 4)
    with pytest.raises(ValueError, match="4 latent channels but the constants give 3"):
        DiffusersVAE(vae_dir, raw_mean=[0] * 3, raw_std=[1] * 3)


def latent_network(path, spec, *, seed=0):
    n = NetworkConfig(resolution=8, channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=32)
    cfg = ExperimentConfig(network=n, ema=EMAConfig(sample_std=0.0), train=TrainConfig(encoder=json.dumps(spec)))
    torch.manual_seed(seed)
    net = build_denoiser(cfg)
    with torch.no_grad():
        net.net.out_gain.fill_(1.0)
    save_network(path, net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    return path


EDM2_SPEC = {"kind": "stability-vae", "class": "StabilityVAEEncoder", "vae_name": "stabilityai/sd-vae-ft-mse",
             "raw_mean": [5.81, 3.25, 0.12, -2.15], "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5}


@pytest.mark.parametrize("kind", ["diffusers-vae", "stability-vae"])
def test_generate_decodes_latent_networks(tmp_path, vae_dir, kind):
    """A latent network samples latents [N, 4, 8, 8]; generate writes the decoded 16 x 16 RGB images. The imported
    EDM2 spec (an ImageNet-512 network's) needs --vae, and a guide must live in the same latent space."""
    spec = measured_vae(vae_dir, digits()).spec if kind == "diffusers-vae" else EDM2_SPEC
    f = latent_network(tmp_path / "lat.safetensors", spec)
    r = CliRunner()
    args = ["generate", "--checkpoint", str(f), "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.npz")]
    if kind == "stability-vae":
        res = r.invoke(main, args)
        assert res.exit_code != 0 and "--vae DIR" in res.output and "Traceback" not in res.output
    res = r.invoke(main, args + ["--vae", str(vae_dir)])
    assert res.exit_code == 0, res.output
    import numpy as np

    images = np.load(tmp_path / "x.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8 and len(np.unique(images)) > 10
    pixel_guide = tmp_path / "pix.safetensors"
    pn = NetworkConfig(resolution=8, channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=32)
    save_network(pixel_guide, build_denoiser(ExperimentConfig(network=pn)).state_dict(), cfg=ExperimentConfig(network=pn), nimg=0, ema_std=0.05)
    res = r.invoke(main, args + ["--vae", str(vae_dir), "--guide-checkpoint", str(pixel_guide), "--guidance", "1.5"])
    assert res.exit_code != 0 and "another space" in res.output


def test_latents_of_another_vae_are_refused(tmp_path, vae_dir):
    spec = measured_vae(vae_dir, digits()).spec
    f = latent_network(tmp_path / "lat.safetensors", spec)
    other = tiny_vae(tmp_path / "other-vae", seed=1)
    res = CliRunner().invoke(main, ["generate", "--checkpoint", str(f), "--n", "1", "--steps", "2", "--vae", str(other),
                                    "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert res.exit_code != 0 and "weights differ" in res.output and "Traceback" not in res.output


def test_convert_train_resume_generate_in_latent_space(tmp_path, vae_dir):
    """convert (VAE once) -> train on posterior samples -> bit-exact resume -> generate decodes; the run's files
    record the encoder, and a pixel dataset given to a latent config (and the reverse) is refused."""
    import numpy as np

    r = CliRunner()
    lat = tmp_path / "digits.npz"
    res = r.invoke(main, ["dataset", "convert", "mnist5k", str(lat), "--channels", "3", "--resolution", "16", "--classes", "0,1", "--vae", str(vae_dir)])
    assert res.exit_code == 0, res.output
    assert "latents 4x8x8 of 16x16x3 images (2x downsampling), 2 classes" in res.output
    with np.load(lat) as z:
        z_mean, z_std = z["latent_mean"].astype(np.float64), z["latent_std"].astype(np.float64)
    total = np.sqrt(z_mean.var(axis=(0, 2, 3)) + (z_std**2).mean(axis=(0, 2, 3)))  # std of posterior samples per channel
    assert np.abs(z_mean.mean(axis=(0, 2, 3))).max() < 1e-3 and np.allclose(total, 0.5, rtol=2e-3)  # standardised to sigma_data

    train = ["train", "--preset", "tiny", "--data", str(lat), "--attn", "4", "--batch", "8", "--quiet", "--cond"]
    res = r.invoke(main, [*train, "--run", str(tmp_path / "a"), "--duration", "32"])
    assert res.exit_code == 0, res.output
    assert r.invoke(main, [*train, "--run", str(tmp_path / "b"), "--duration", "16"]).exit_code == 0
    res = r.invoke(main, [*train, "--run", str(tmp_path / "b"), "--duration", "32"])  # resumes at 16
    assert res.exit_code == 0, res.output
    fa, fb = (sorted((tmp_path / run).glob("network-000000000032-*.safetensors"))[-1] for run in ("a", "b"))
    from safetensors.torch import load_file

    wa, wb = load_file(str(fa)), load_file(str(fb))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted((tmp_path / "a").glob("grid-*.png"))  # grids decoded to images

    res = r.invoke(main, ["generate", "--checkpoint", str(tmp_path / "a"), "--n", "2", "--steps", "2", "--device", "cpu",
                          "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "x.npz") as z:
        assert z["images"].shape == (2, 3, 16, 16)

    import json

    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert json.loads(cfg["train"]["encoder"])["kind"] == "diffusers-vae"
    cfg["train"]["data"] = "mnist5k"  # a latent config given pixels
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = r.invoke(main, ["train", "--config-file", str(tmp_path / "cfg.json"), "--run", str(tmp_path / "c"), "--duration", "16", "--quiet"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_metrics_score_decoded_images(tmp_path, vae_dir):
    """metrics gen's stream yields the decoded images of a latent network (what the detector sees), not its latents."""
    from edmkit.checkpoint import load_network
    from edmkit.data.images import float_to_images
    from edmkit.metrics.evaluate import generated_batches
    from edmkit.sampling.generate import generate_images

    enc = measured_vae(vae_dir, digits())
    net, meta = load_network(latent_network(tmp_path / "lat.safetensors", enc.spec), latent=True)
    kw = dict(resolution=8, channels=4, label_dim=0, steps=2)
    got = torch.cat(list(generated_batches(net, [0, 1, 2], batch=2, device="cpu", generate_kw=kw, decode=enc.decode)))
    want = float_to_images(enc.decode(generate_images(net, seeds=[0, 1, 2], batch=3, device="cpu", **kw)))
    assert got.shape == (3, 3, 16, 16) and torch.equal(got, want)


def test_edmkit_autoencoder_beats_the_mean_image_resumes_exactly_and_encodes_a_dataset(tmp_path):
    """train-autoencoder on the digits: held-out PSNR above the mean image's, bit-exact resume, and its file serves as
    the encoder of `dataset convert --vae` (kind edmkit-ae)."""
    from safetensors.torch import load_file

    r = CliRunner()
    args = ["train-autoencoder", "--width", "8", "--batch", "16", "--quiet"]
    res = r.invoke(main, [*args, "--run", str(tmp_path / "a"), "--duration", "1024"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["psnr"] > report["psnr_mean_image"] + 3 and report["latent_shape"] == [4, 14, 14]
    assert (tmp_path / "a" / "recon.png").is_file()
    assert r.invoke(main, [*args, "--run", str(tmp_path / "b"), "--duration", "512"]).exit_code == 0
    res = r.invoke(main, [*args, "--run", str(tmp_path / "b"), "--duration", "1024"])
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    wa, wb = (load_file(str(tmp_path / run / "autoencoder.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    res = r.invoke(main, [*args, "--run", str(tmp_path / "b"), "--duration", "1024"])  # nothing left to train: reports as it is
    assert res.exit_code == 0 and f"PSNR {report['psnr']:.2f} dB" in res.output, res.output
    res = r.invoke(main, [*args, "--run", str(tmp_path / "b"), "--duration", "1024", "--kl-weight", "0.1"])
    assert res.exit_code != 0 and "another config" in res.output

    ae = tmp_path / "a" / "autoencoder.safetensors"
    res = r.invoke(main, ["dataset", "convert", "mnist5k", str(tmp_path / "lat.npz"), "--classes", "3", "--vae", str(ae)])
    assert res.exit_code == 0 and "latents 4x14x14 of 28x28x1 images (2x downsampling)" in res.output, res.output
    from edmkit.data.latents import read_latents

    spec = read_latents(tmp_path / "lat.npz").encoder
    assert spec["kind"] == "edmkit-ae" and len(spec["raw_mean"]) == 4
    enc = encoder_from_spec(spec)
    assert enc.decode(torch.zeros(1, 4, 14, 14)).shape == (1, 1, 28, 28)


def test_reconstruction_fid_is_the_floor_a_latent_model_is_scored_against(tmp_path, vae_dir):
    """metrics folder --reconstruct-with scores decode(encode(images)); with a random VAE those are far from the images,
    so their FID against the images' reference exceeds the images' own (same images, same detector)."""
    import numpy as np
    from test_metrics import save_tiny_detector

    images = digits(48).numpy()
    np.savez(tmp_path / "data.npz", images=images.transpose(0, 2, 3, 1))
    det = save_tiny_detector(tmp_path / "det.pt", 0)
    r = CliRunner()
    base = ["--ref", str(tmp_path / "ref.npz"), "--detector", str(det), "--batch", "16", "--device", "cpu", "--quiet"]
    assert r.invoke(main, ["metrics", "ref", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "ref.npz"), "--detector", str(det),
                           "--batch", "16", "--device", "cpu", "--quiet"]).exit_code == 0
    res = r.invoke(main, ["metrics", "folder", "--images", str(tmp_path / "data.npz"), *base, "--metrics", "fid", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["metrics", "folder", "--images", str(tmp_path / "data.npz"), *base, "--metrics", "fid", "--out", str(tmp_path / "b.json"),
                          "--reconstruct-with", str(vae_dir)])
    assert res.exit_code == 0 and "reconstructions of 48 images" in res.output, res.output
    own, recon = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert own["summary"]["fid"]["mean"] < 1e-3 < recon["summary"]["fid"]["mean"] and recon["reconstructed_by"] == str(vae_dir)


def test_xflip_stores_the_mirrored_images_moments_and_training_draws_both(tmp_path, vae_dir):
    """A VAE's latents of a mirrored image are not the mirrored latents, so --xflip encodes the flips; float_batch takes
    either per item (seeded), and the posterior mean of a mirrored image is what encoding it gives."""
    from edmkit.data.latents import read_latents

    r = CliRunner()
    res = r.invoke(main, ["dataset", "convert", "mnist5k", str(tmp_path / "f.npz"), "--channels", "3", "--resolution", "16", "--classes", "7",
                          "--vae", str(vae_dir), "--xflip"])
    assert res.exit_code == 0 and "with mirrored images" in res.output, res.output
    data = read_latents(tmp_path / "f.npz")
    assert data.flipped is not None and not torch.equal(data.flipped[0], data.mean.flip(-1))  # not the mirrored latents
    enc = encoder_from_spec(data.encoder)
    from edmkit.data.dataset import load_dataset

    images = load_dataset("mnist5k", resolution=16, channels=3, classes=[7]).images
    flipped_mean, _ = enc.encode(images[:4].flip(-1))
    assert torch.allclose(data.flipped[0][:4], flipped_mean, atol=2e-3)  # float16 storage
    import dataclasses

    exact = dataclasses.replace(data, std=torch.zeros_like(data.std), flipped=(data.flipped[0], torch.zeros_like(data.std)))  # no noise
    z = exact.float_batch(torch.zeros(256, dtype=torch.int64), generator=torch.Generator().manual_seed(0))  # one image, 256 draws
    is_flip = (z == data.flipped[0][0]).flatten(1).all(dim=1)
    assert torch.all(is_flip | (z == data.mean[0]).flatten(1).all(dim=1)) and 0.4 < is_flip.float().mean() < 0.6
    res = r.invoke(main, ["dataset", "convert", "mnist5k", str(tmp_path / "g.zip"), "--xflip"])
    assert res.exit_code != 0 and "needs --vae" in res.output
