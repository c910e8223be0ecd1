"""The command line: help, dry run, a tiny train -> generate, and one-line errors for user mistakes."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edmkit.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["train"], ["generate"], ["phema"], ["restore"], ["report"], ["dataset", "convert"], ["dataset", "info"],
                                 ["metrics", "ref"], ["metrics", "gen"], ["metrics", "folder"], ["metrics", "memorization"], ["metrics", "probe"],
                                 ["metrics", "video"], ["video"]])
def test_help(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Usage" in res.output


def test_dry_run_prints_resolved_config():
    res = run("train", "--preset", "tiny", "--batch", "8", "--duration", "1Ki", "--dry-run")
    assert res.exit_code == 0
    cfg = json.loads(res.stdout)  # stdout: the config JSON (stderr: its parameters and GFLOPs)
    assert cfg["train"]["batch"] == 8 and cfg["train"]["total_nimg"] == 1024


def test_tiny_train_then_generate(tmp_path):
    run_dir = tmp_path / "run"
    res = run("train", "--preset", "tiny", "--run", run_dir, "--duration", "64", "--quiet")
    assert res.exit_code == 0, res.output
    assert (run_dir / "config.json").is_file() and list(run_dir.glob("grid-*.png"))
    res = run("generate", "--checkpoint", run_dir, "--n", "6", "--steps", "3", "--out", tmp_path / "g.png")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "g.png").size == (3 * 29 + 1, 2 * 29 + 1)
    # image k is the same whatever the batch size, and .npz / folder outputs work
    run("generate", "--checkpoint", run_dir, "--seeds", "0-5", "--steps", "3", "--batch", "6", "--out", tmp_path / "a.npz")
    run("generate", "--checkpoint", run_dir, "--seeds", "0-5", "--steps", "3", "--batch", "2", "--out", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"]
    assert a.shape == (6, 1, 28, 28) and np.array_equal(a, b)
    run("generate", "--checkpoint", run_dir, "--seeds", "3,4", "--steps", "3", "--out", tmp_path / "pngs")
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000.png", "000001.png"]


def error_of(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    return res.output


def test_bad_inputs_give_one_line_errors(tmp_path):
    assert "unknown preset 'nope'" in error_of("train", "--preset", "nope", "--dry-run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to run folder" in error_of("train", "--preset", "tiny", "--run", blocker / "run")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "junk.safetensors" in error_of("generate", "--checkpoint", tmp_path / "junk.safetensors", "--out", tmp_path / "x.png")
    assert "no such checkpoint" in error_of("generate", "--checkpoint", tmp_path / "missing", "--out", tmp_path / "x.png")
    assert "cannot parse image count" in error_of("train", "--duration", "lots")
    assert "divisible" in error_of("train", "--preset", "cifar10-small", "--data", "mnist5k", "--resolution", "30", "--dry-run")
    assert "stop-when-flat watches" in error_of("train", "--preset", "tiny", "--stop-when-flat", "3", "--dry-run")
    assert '"stop_when_flat": 3' in run("train", "--preset", "tiny", "--val-fraction", "0.1", "--stop-when-flat", "3", "--dry-run").output


def test_class_subset_reaches_training_data():
    from edmkit.data.dataset import dataset_of

    res = run("train", "--preset", "tiny", "--classes", "3,5", "--cond", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)  # stdout: the config JSON (stderr: its parameters and GFLOPs)
    assert cfg["train"]["classes"] == [3, 5] and cfg["network"]["label_dim"] == 2
    from edmkit.config import ExperimentConfig

    data = dataset_of(ExperimentConfig.from_dict(cfg))
    assert len(data) == 1000 and set(data.labels.tolist()) == {0, 1}  # 500 threes -> 0, 500 fives -> 1
    assert "class index 12 out of range" in error_of("train", "--preset", "tiny", "--classes", "12", "--cond", "--dry-run")
