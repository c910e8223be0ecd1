"""Linear probe (edmkit.metrics.probe) and the run report (edmkit.report.write_report, `edmkit report`)."""

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edmkit.checkpoint import build_denoiser, network_path, save_network
from edmkit.cli import main
from edmkit.config import get_preset
from edmkit.data import ImageDataset, save_image_grid
from edmkit.metrics.probe import block_names, default_block, linear_probe, probe_split, resolve_block
from edmkit.report import read_stats, write_report


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
