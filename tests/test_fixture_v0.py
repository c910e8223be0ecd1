"""Files written by edmkit before the package was regrouped still load, sample, resume and score.

The fixture (tests/fixtures/v0, see its README) was written by the code of commit 87e1c9c: a tiny run folder after
160 images (config, stats, state, three network snapshots), four samples drawn from it, the raw weights after
resuming it to 192 images, and a metrics reference file.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edmkit.checkpoint import load_network, load_state
from edmkit.cli import main
from edmkit.config import ExperimentConfig
from edmkit.metrics.reference import load_reference
from edmkit.training.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "v0"


def test_old_network_files_load_strictly_with_their_config():
    cfg = ExperimentConfig.from_json((FIXTURE / "run" / "config.json").read_text())
    for path in sorted((FIXTURE / "run").glob("network-*.safetensors")):
        net, meta = load_network(path)
        assert meta["nimg"] == 160 and meta["config"] == cfg
        assert sum(p.numel() for p in net.parameters()) > 0


def test_old_state_loads_with_weights_only():
    state = load_state(FIXTURE / "run" / "state-000000000160.pt")
    assert state["nimg"] == 160
    assert ExperimentConfig.from_json(state["config"]) == ExperimentConfig.from_json((FIXTURE / "run" / "config.json").read_text())


def test_old_run_samples_the_same_images(tmp_path):
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(FIXTURE / "run"), "--seeds", "0-3", "--steps", "4",
                                       "--ema", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = np.load(FIXTURE / "samples-ema0.1-heun4.npz")
    got = np.load(out)
    assert np.array_equal(got["seeds"], expected["seeds"])
    diff = np.abs(got["images"].astype(int) - expected["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # one uint8 level where float rounding differs, nowhere more


def test_old_run_resumes_to_the_same_weights(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    cfg = ExperimentConfig.from_json((run / "config.json").read_text()).override("train", total_nimg=192)
    train(cfg, run, progress=False, log=lambda s: None)
    got = load_file(run / "network-000000000192-0.000.safetensors")
    expected = load_file(FIXTURE / "resumed-192-raw.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert [json.loads(line)["nimg"] for line in (run / "stats.jsonl").read_text().splitlines()][-1] == 192


def test_old_reference_file_loads():
    ref = load_reference(FIXTURE / "ref.npz")
    f = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    assert ref.n == 12 and ref.resolution == 28 and ref.channels == 1
    np.testing.assert_array_equal(ref.features, f)
    np.testing.assert_allclose(ref.sigma, np.cov(f.astype(np.float64), rowvar=False))
