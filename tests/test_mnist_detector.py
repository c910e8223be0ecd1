"""The built-in "mnist" detector: the shipped file is the recorded one, it classifies held-out digits, it loads offline
through the registry and the CLI, and its FID orders real digits before collapsed or noisy ones."""

import json
import re
from importlib import resources

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edmkit.cli import main
from edmkit.data.dataset import load_dataset
from edmkit.files import file_sha256
from edmkit.metrics.detectors import MNIST, DetectorError, load_detector
from edmkit.metrics.mnist_net import heldout_mask, packaged_weights
from edmkit.metrics.reference import load_reference, reference_detector
from edmkit.metrics.stats import feature_stats, frechet_distance


@pytest.fixture(scope="module")
def detector():
    return load_detector("mnist")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist5k")


def test_shipped_file_matches_recorded_sha256():
    digest = file_sha256(packaged_weights())
    assert digest == MNIST.sha256
    readme = resources.files("edmkit").joinpath("assets", "README.md").read_text()
    assert digest in re.findall(r"[0-9a-f]{64}", readme)


def test_classifies_heldout_digits(detector, digits):
    held = torch.from_numpy(heldout_mask(len(digits.images)))
    images, labels = digits.images[held][:500], digits.labels[held][:500]
    probs = detector.probs(images)
    assert probs.shape == (500, 10)
    assert float((probs.argmax(1) == labels).float().mean()) > 0.9
    assert detector(images).shape == (500, 128)


def test_wrong_hash_or_foreign_file_is_a_detector_error(tmp_path):
    with pytest.raises(DetectorError, match="sha256"):
        load_detector("mnist", sha256="0" * 64)
    bad = tmp_path / MNIST.filename  # a file of the detector's name that is not one
    bad.write_bytes(b"not safetensors")
    with pytest.raises(DetectorError):
        load_detector(bad, sha256=file_sha256(bad))


def test_cli_metrics_ref_works_offline(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("EDMKIT_CACHE", str(tmp_path / "empty-cache"))  # nothing cached: the file comes from the package
    np.savez(tmp_path / "digits.npz", images=digits.images[:200, 0].numpy(), labels=digits.labels[:200].numpy())
    res = CliRunner().invoke(main, ["metrics", "ref", "--data", str(tmp_path / "digits.npz"), "--out", str(tmp_path / "ref.npz"),
                                    "--detector", "mnist", "--device", "cpu", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "not comparable to Inception" in res.output
    ref = load_reference(tmp_path / "ref.npz")
    assert (ref.detector, ref.detector_sha256, ref.n, ref.features.shape[1]) == ("mnist", MNIST.sha256, 200, 128)
    assert not (tmp_path / "empty-cache").exists()
    assert reference_detector(ref).spec is MNIST  # what metrics gen / train --eval-ref load when no --detector is given
    res = CliRunner().invoke(main, ["metrics", "folder", "--images", str(tmp_path / "digits.npz"), "--ref", str(tmp_path / "ref.npz"),
                                    "--metrics", "fid,is", "--out", str(tmp_path / "scores.json"), "--device", "cpu", "--quiet"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("not comparable to Inception") == 2  # the notice before, the note under the scores
    assert "not comparable to Inception" in json.loads((tmp_path / "scores.json").read_text())["detector_note"]


def test_fid_ranks_real_before_collapsed_and_noise(detector, digits):
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits.images), generator=g)[:1000]
    a, b = digits.images[perm[:500]], digits.images[perm[500:]]
    ref_stats = feature_stats(detector(a))

    def fid(images):
        return frechet_distance(*feature_stats(detector(images)), *ref_stats)

    floor = fid(b)
    assert floor < fid(torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8))
    assert floor < fid(b[:1].repeat(len(b), 1, 1, 1))
    assert floor < fid(digits.images[digits.labels == 1][:500])
