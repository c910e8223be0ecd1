"""Linear probe (edmkit.metrics.probe) and the run report (edmkit.report.write_report, `edmkit report`)."""

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edmkit.checkpoint import build_denoiser, network_path, save_network
from edmkit.cli import main
from edmkit.data.dataset import ImageDataset
from edmkit.data.images import images_to_float, save_image_grid
from edmkit.metrics import probe as probe_mod
from edmkit.metrics.probe import block_names, default_block, fit_ridge, linear_probe, pooled_features, probe_split, resolve_block
from edmkit.presets import get_preset
from edmkit.report import display_noisy, read_stats, write_report


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def net(cfg):
    torch.manual_seed(0)
    return build_denoiser(cfg).eval().requires_grad_(False)


def brightness_dataset(n: int = 48, *, seed: int = 0) -> ImageDataset:
    """Two classes told apart only by mean brightness (dark ~ 60, bright ~ 190), with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, [n], generator=g)
    images = (60 + 130 * labels.view(-1, 1, 1, 1) + 40 * torch.randn([n, 1, 28, 28], generator=g)).clamp(0, 255).round()
    return ImageDataset(images.to(torch.uint8).contiguous(), labels, 2, "brightness")


def test_probe_separates_brightness_classes(net):
    ds = brightness_dataset()
    r = linear_probe(net, ds, sigma=0.5, test_fraction=0.25, seed=0)
    assert r.block == default_block(net) and r.block.startswith("dec.") and r.block.endswith("_in0")
    assert r.n_train + r.n_test == len(ds) and r.n_test == 12
    assert r.test_accuracy >= 0.9 > r.chance + 0.2
    # fixed noise: the same call gives the same number; another σ and block still work
    assert linear_probe(net, ds, sigma=0.5, test_fraction=0.25, seed=0) == r
    assert linear_probe(net, ds, sigma=0.5, test_fraction=0.25, seed=0, block="enc.14x14_block0").test_accuracy >= 0.9


def test_probe_labels_carry_no_signal_when_shuffled(net):
    ds = brightness_dataset()
    shuffled = ImageDataset(ds.images, ds.labels[torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))], 2, "shuffled")
    assert linear_probe(net, shuffled, test_fraction=0.25).test_accuracy < 0.9


def test_probe_subset_is_random_not_the_first_images(net):
    ds = brightness_dataset()
    ds = ds.subset(torch.argsort(ds.labels, stable=True))  # sorted by class, as some datasets are
    r = linear_probe(net, ds, test_fraction=0.25, max_images=20)
    assert r.n_train + r.n_test == 20 and r.chance < 1 and r.test_accuracy >= 0.8


def test_probe_split_disjoint_and_deterministic():
    train, test = probe_split(50, test_fraction=0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train.tolist()).isdisjoint(test.tolist()) and set(train.tolist()) | set(test.tolist()) == set(range(50))
    assert torch.equal(probe_split(50, test_fraction=0.2, seed=3)[1], test)
    assert not torch.equal(probe_split(50, test_fraction=0.2, seed=4)[1], test)


def test_probe_bad_input(net):
    with pytest.raises(ValueError, match="valid: enc.28x28_conv"):
        resolve_block(net, "dec.3x3_in0")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_block(net, "14x14_block0")  # an encoder and a decoder block share it
    assert resolve_block(net, "14x14_in0")[0] == "dec.14x14_in0"
    assert default_block(net) in block_names(net)
    unlabelled = ImageDataset(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), None, 0, "plain")
    with pytest.raises(ValueError, match="labelled"):
        linear_probe(net, unlabelled)
    with pytest.raises(ValueError, match="too few"):
        probe_split(4, test_fraction=0.1, seed=0)


class IdentityDenoiser(torch.nn.Module):
    """D(x; σ) = x through one encoder and one decoder block (identities): the probed features are the spatial
    means of exactly the noisy input the denoiser saw. Records the σ it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Module()
        self.net.enc = torch.nn.ModuleDict({"4x4_in": torch.nn.Identity()})
        self.net.dec = torch.nn.ModuleDict({"4x4_out": torch.nn.Identity()})
        self.dummy = torch.nn.Parameter(torch.zeros([]))  # pooled_features reads the device from a parameter
        self.sigmas: list[torch.Tensor] = []

    def forward(self, x, sigma, labels=None):
        self.sigmas.append(sigma.clone())
        return self.net.dec["4x4_out"](self.net.enc["4x4_in"](x))


def test_probe_features_are_taken_at_sigma_with_fixed_per_image_noise():
    """Features of image k = spatial mean of y_k + σ·n_k, n_k ~ N(0, I) from a generator seeded with seeds[k]
    (EDM Eq. 1 notation), and the denoiser is told that same σ; the batch size changes nothing."""
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([3, 1, 4, 1, 5])
    y = images_to_float(images)
    n = torch.stack([torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    for sigma, batch in [(0.0, 5), (0.5, 2), (2.0, 3)]:
        den = IdentityDenoiser()
        feats = pooled_features(den, images, block=den.net.dec["4x4_out"], sigma=sigma, seeds=seeds, batch=batch)
        torch.testing.assert_close(feats, (y + sigma * n).mean(dim=(2, 3)), rtol=0, atol=1e-6)
        assert torch.equal(torch.cat(den.sigmas), torch.full([5], sigma))


def test_probe_fits_on_the_train_split_only(monkeypatch):
    """The ridge classifier sees only the train split's features and labels (no test image leaks into the fit)."""
    ds = brightness_dataset()
    seen = []

    def recording_fit(features, labels, **kw):
        seen.append((features.clone(), labels.clone()))
        return fit_ridge(features, labels, **kw)

    monkeypatch.setattr(probe_mod, "fit_ridge", recording_fit)
    r = linear_probe(IdentityDenoiser(), ds, sigma=0.5, test_fraction=0.25, seed=0)
    train_idx, test_idx = probe_split(len(ds), test_fraction=0.25, seed=0)
    (features, labels), = seen
    assert r.block == "dec.4x4_out" and (r.n_train, r.n_test) == (36, 12) and features.shape == (36, 1)
    assert torch.equal(labels, ds.labels[train_idx])
    # the features are the training images' noisy means (image k noised with seed 0 * 2**32 + k)
    expected = torch.stack([(images_to_float(ds.images[k:k + 1]) + 0.5 * torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(k)))
                            .mean() for k in train_idx.tolist()])
    torch.testing.assert_close(features[:, 0], expected, rtol=0, atol=1e-5)
    assert r.test_accuracy == 1.0  # brightness 60 vs 190 with noise: one feature separates them


def test_ridge_predictions_do_not_depend_on_the_batch_and_the_bias_is_not_shrunk():
    """predict uses the train split's standardisation: one row alone gets the same class as in a batch. With a
    huge ridge the weights vanish while the unshrunk bias stays the class frequencies: every point gets the
    majority class (a shrunk bias would let the feature decide)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 4)
    feats = torch.randn(10, 3, generator=g) + 3.0 * labels[:, None]
    predict = fit_ridge(feats, labels, num_classes=2)
    assert torch.equal(predict(feats), labels)
    assert [int(predict(feats[i:i + 1])) for i in range(10)] == labels.tolist()
    assert torch.equal(fit_ridge(feats, labels, num_classes=2, ridge=1e8)(feats), torch.zeros(10, dtype=torch.int64))


def test_display_scaling_is_sigma_data_times_c_in():
    """x·σ_d/√(σ² + σ_d²): unchanged at σ = 0, 0.5/√2.5 at σ = 1.5 with σ_d = 0.5 (EDM Table 1's c_in times σ_d)."""
    x = torch.linspace(-3, 3, 12).reshape(1, 3, 2, 2)
    assert torch.equal(display_noisy(x, sigma=0.0), x)
    torch.testing.assert_close(display_noisy(x, sigma=1.5), x * (0.5 / 2.5**0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(display_noisy(x, sigma=3.0, sigma_data=1.0), x / 10**0.5, rtol=1e-6, atol=0)


def write_run(run: Path, cfg, net, *, val: bool = True, grids: bool = True, network: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    recs = [{"kind": "train", "nimg": 64 * i, "step": 4 * i, "loss": 1.0 / i, "mse": 0.5 / i, "lr": 0.01 * i, "grad_norm": 1.0 + i,
             "grad_norm_max": 2.0 + i} for i in range(1, 6)]
    if val:
        recs += [{"kind": "val", "nimg": 128 * i, "step": 8 * i, "loss": 0.4 + 0.01 * i, "train_loss": 0.4 - 0.01 * i, "sigma": [0.1, 1.0],
                  "loss_per_sigma": [0.2, 0.6], "memorization": i == 2} for i in range(1, 3)]
        recs.append({"kind": "metrics", "nimg": 256, "fid": 12.5})
    (run / "stats.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"kind\": \"tra")  # torn last line
    if grids:
        for nimg in (160, 320):
            save_image_grid(torch.zeros(4, 1, 28, 28), run / f"grid-{nimg:012d}.png")
    if network:
        save_network(network_path(run, 320, cfg.ema.sample_std), net.state_dict(), cfg=cfg, nimg=320, ema_std=cfg.ema.sample_std)


def linked_files(page: Path) -> list[str]:
    return re.findall(r'src="([^"]+)"', page.read_text())


def test_report_full_run(tmp_path, cfg, net):
    run = tmp_path / "run"
    write_run(run, cfg, net)
    assert len(read_stats(run / "stats.jsonl")) == 8
    page = write_report(run, gif_n=2, gif_steps=2)
    assert page == run / "report" / "index.html"
    links = linked_files(page)
    for name in ["loss.png", "lr.png", "grad_norm.png", "val_loss.png", "val_loss_per_sigma.png", "metric_metrics_fid.png",
                 "grids/grid-000000000160.png", "grids/grid-000000000320.png", "reverse.gif"]:
        assert name in links
    for link in links:
        assert not Path(link).is_absolute() and (page.parent / link).stat().st_size > 0
    from PIL import Image
    with Image.open(page.parent / "reverse.gif") as gif:
        assert gif.n_frames == 2


def test_report_missing_pieces(tmp_path, cfg, net):
    run = tmp_path / "bare"
    write_run(run, cfg, net, val=False, grids=False, network=False)
    page = write_report(run, tmp_path / "out")
    links = linked_files(page)
    assert "loss.png" in links and not any(n.startswith(("val", "grids/", "reverse")) for n in links)
    assert "no grid-*.png files" in page.read_text() and "no network-*.safetensors" in page.read_text()
    only_grids = tmp_path / "grids-only"
    write_run(only_grids, cfg, net, val=False, network=False)
    (only_grids / "stats.jsonl").unlink()
    assert "grids/grid-000000000160.png" in linked_files(write_report(only_grids))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_report_and_probe(tmp_path, cfg, net):
    run = tmp_path / "run"
    write_run(run, cfg, net, val=False, grids=False)
    res = run_cli("report", run, "--out", tmp_path / "rep", "--gif-n", 1, "--gif-steps", 1, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "reverse.gif").is_file()
    res = run_cli("report", tmp_path / "rep" / "no-such")
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1 and "no such run folder" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("report", empty)
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1 and "not a run folder" in res.output
    res = run_cli("metrics", "probe", "--checkpoint", run, "--data", "mnist5k", "--block", "nope", "--device", "cpu")
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1 and "valid: enc." in res.output
    res = run_cli("metrics", "probe", "--checkpoint", run, "--data", "mnist5k", "--n", 60, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and "on 12 images" in res.output
