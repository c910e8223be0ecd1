"""Noise-aware classifier, classifier guidance and rejection sampling (issue 11).

Toy: two isotropic Gaussians N(mu_k, s0^2 I) in R^2 (as [N, 1, 1, 2] images), equal priors. At noise sigma
the exact denoiser is the responsibility-weighted mix of the per-class posterior means, and the exact
classifier has logits -|x - mu_k|^2 / (2 (s0^2 + sigma^2)).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edmkit.checkpoint import CheckpointError, build_denoiser, check_classifier, load_classifier, load_network, save_network
from edmkit.cli import main
from edmkit.config import NetworkConfig
from edmkit.diffusion.classifier import CLEAN_SIGMA, NoisyClassifier
from edmkit.diffusion.guidance import classifier_free, classifier_guided
from edmkit.diffusion.samplers import get_sampler
from edmkit.presets import get_preset
from edmkit.sampling.generate import guided_denoiser, sampling_sigmas
from edmkit.sampling.rejection import accept, check_threshold, rejection_sample
from edmkit.training.classifier import train_classifier

MU = torch.tensor([[-0.5, 0.0], [0.5, 0.0]])  # class means [K=2, 2]
S0 = 0.5  # per-class std


def toy_logits(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact log p(y | x, sigma) up to a constant: [N, 1, 1, 2] -> [N, 2]."""
    v = S0**2 + torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1) ** 2  # [N, 1]
    d2 = ((x.reshape(-1, 1, 2) - MU) ** 2).sum(-1)  # [N, K]
    return -d2 / (2 * v)


def class_denoiser(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Exact denoiser of class k: mu_k + s0^2 / (s0^2 + sigma^2) (x - mu_k)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
    mu = MU[k].reshape(1, 1, 1, 2)
    return mu + S0**2 / (S0**2 + s**2) * (x - mu)


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Exact unconditional denoiser of the mixture (labels ignored)."""
    w = toy_logits(x, sigma).softmax(1)  # [N, K] responsibilities
    return sum(w[:, k].reshape(-1, 1, 1, 1) * class_denoiser(x, sigma, k) for k in range(2))


def sample_toy(denoiser, n: int = 400, *, seed: int = 0) -> torch.Tensor:
    sigmas = sampling_sigmas("karras", 16, sigma_max=20.0)
    noise = torch.randn([n, 1, 1, 2], generator=torch.Generator().manual_seed(seed))  # unit noise: the sampler scales it by sigma_max
    with torch.no_grad():  # as in generate_images: guidance must switch grad mode on itself
        return get_sampler("heun")(denoiser, noise, sigmas, labels=None)


def frac_class1(x: torch.Tensor) -> float:
    return float((toy_logits(x, torch.tensor(0.002)).argmax(1) == 1).float().mean())


# --- classifier guidance on the exact toy ------------------------------------------------------------------


def test_scale_one_gives_exact_class_denoiser():
    x = torch.randn([8, 1, 1, 2]) * 2
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0, 0.05, 2.0, 10.0, 0.7])
    with torch.no_grad():
        d = classifier_guided(toy_denoiser, toy_logits, scale=1.0, class_idx=1)(x, sigma, None)
    torch.testing.assert_close(d, class_denoiser(x, sigma, 1), atol=1e-4, rtol=1e-4)


def test_scale_zero_is_exactly_unguided_and_skips_classifier():
    def boom(x, sigma):
        raise AssertionError("classifier evaluated at s = 0")

    x, sigma = torch.randn([4, 1, 1, 2]), torch.full([4], 0.7)
    assert torch.equal(classifier_guided(toy_denoiser, boom, scale=0.0, class_idx=0)(x, sigma, None), toy_denoiser(x, sigma, None))
    assert torch.equal(sample_toy(classifier_guided(toy_denoiser, boom, scale=0.0, class_idx=1), n=64), sample_toy(toy_denoiser, n=64))


def test_guidance_moves_samples_toward_requested_class():
    fracs = [frac_class1(sample_toy(classifier_guided(toy_denoiser, toy_logits, scale=s, class_idx=1))) for s in (0.0, 1.0, 3.0)]
    assert abs(fracs[0] - 0.5) < 0.1, fracs
    assert fracs[0] + 0.2 < fracs[1] < fracs[2], fracs
    assert fracs[1] > 0.75, fracs  # s = 1 samples the class-1 Gaussian: Phi(mu / s0) = 0.84 of it lies on its side


def test_class_from_labels_and_with_cfg():
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    x, sigma = torch.randn([2, 1, 1, 2]), torch.full([2], 0.5)

    def cond(x, sigma, labels):  # exact conditional denoiser; zero labels = unconditional
        if not labels.any():
            return toy_denoiser(x, sigma, None)
        return torch.cat([class_denoiser(x[i:i + 1], sigma[i:i + 1], int(labels[i].argmax())) for i in range(len(x))])

    cfg = classifier_free(cond, 2.0)
    with torch.no_grad():
        d = classifier_guided(cfg, toy_logits, scale=0.5)(x, sigma, labels)
        expect = cfg(x, sigma, labels).clone()
        for i, k in enumerate((1, 0)):
            ref = classifier_guided(cfg, toy_logits, scale=0.5, class_idx=k)(x, sigma, labels)
            expect[i] = ref[i]
    torch.testing.assert_close(d, expect)
    with pytest.raises(ValueError, match="needs a class"):
        classifier_guided(toy_denoiser, toy_logits, scale=1.0)(x, sigma, None)


def test_guided_denoiser_wiring():
    sigmas = sampling_sigmas("karras", 4)
    x, sigma = torch.randn([3, 1, 1, 2]), torch.full([3], 1.0)
    d = guided_denoiser(toy_denoiser, sigmas=sigmas, label_dim=0, classifier=toy_logits, classifier_scale=2.0, classifier_class=0)
    torch.testing.assert_close(d(x, sigma, None), classifier_guided(toy_denoiser, toy_logits, scale=2.0, class_idx=0)(x, sigma, None))
    assert guided_denoiser(toy_denoiser, sigmas=sigmas, label_dim=0, classifier=toy_logits) is toy_denoiser  # s = 0: untouched
    with pytest.raises(ValueError, match="needs a classifier"):
        guided_denoiser(toy_denoiser, sigmas=sigmas, label_dim=0, classifier_scale=1.0, classifier_class=0)
    with pytest.raises(ValueError, match="needs a class"):
        guided_denoiser(toy_denoiser, sigmas=sigmas, label_dim=0, classifier=toy_logits, classifier_scale=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        guided_denoiser(toy_denoiser, sigmas=sigmas, label_dim=0, classifier=toy_logits, classifier_scale=-1.0, classifier_class=0)


# --- rejection sampling -------------------------------------------------------------------------------------


def seeded_toy_samples(seeds: list[int]) -> torch.Tensor:
    """Deterministic per-seed draws from the mixture: [len(seeds), 1, 1, 2]."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        k = int(torch.randint(2, [1], generator=g))
        out.append(MU[k] + S0 * torch.randn(2, generator=g))
    return torch.stack(out).reshape(-1, 1, 1, 2)


def test_rejection_returns_only_accepted_and_reports_rate():
    calls = []

    def sample(seeds):
        calls.append(list(seeds))
        return seeded_toy_samples(seeds)

    r = rejection_sample(sample, toy_logits, n=10, class_idx=1, threshold=0.8, batch=4)
    assert len(r.seeds) == 10 and r.images.shape == (10, 1, 1, 2)
    assert bool(accept(toy_logits, r.images, class_idx=1, threshold=0.8).all())
    torch.testing.assert_close(r.images, seeded_toy_samples(r.seeds))  # each kept image is its seed's sample
    tried = [s for c in calls for s in c]
    n_ok = int(accept(toy_logits, seeded_toy_samples(tried), class_idx=1, threshold=0.8).sum())
    assert r.tried == len(tried) and r.accepted == n_ok and r.rate == pytest.approx(n_ok / len(tried))
    assert 0 < r.rate < 0.6


def test_accept_needs_the_top_class_and_a_probability_of_at_least_tau():
    """Hand-made logits: accepted iff argmax == class and p(class) >= τ, τ included; the classifier is asked at σ_min."""
    p = torch.tensor([[0.45, 0.35, 0.20], [0.20, 0.70, 0.10], [0.10, 0.60, 0.30]])
    seen = []

    def clf(x, sigma):
        seen.append(sigma)
        return p.log()

    x = torch.zeros(3, 1, 2, 2)
    # class 1 at τ = 0.3: row 0 has p = 0.35 >= τ but class 0 is predicted; rows 1 and 2 predict class 1
    assert accept(clf, x, class_idx=1, threshold=0.3).tolist() == [False, True, True]
    tau = float(p.log().softmax(1)[2, 1])  # row 2's probability exactly as softmax rounds it
    assert accept(clf, x, class_idx=1, threshold=tau).tolist() == [False, True, True]  # p == τ is accepted
    assert accept(clf, x, class_idx=1, threshold=0.65).tolist() == [False, True, False]
    assert accept(clf, x, class_idx=0, threshold=0.4).tolist() == [True, False, False]
    assert all(torch.equal(s, torch.full([3], CLEAN_SIGMA)) for s in seen)


def test_rejection_stops_at_max_tries():
    r = rejection_sample(seeded_toy_samples, toy_logits, n=5, class_idx=0, threshold=1.0, batch=3, max_tries=7)
    assert r.tried == 7 and len(r.seeds) == r.accepted == 0 and r.images.shape[0] == 0 and r.rate == 0.0


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_bad_threshold(tau):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_threshold(tau)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rejection_sample(seeded_toy_samples, toy_logits, n=2, class_idx=0, threshold=tau)


def test_bad_scale():
    for s in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="scale must be >= 0"):
            classifier_guided(toy_denoiser, toy_logits, scale=s)


def test_classifier_model_mismatch():
    clf = NetworkConfig(resolution=28, channels=1, label_dim=10)
    check_classifier(NetworkConfig(resolution=28, channels=1), clf, class_idx=3)  # unconditional model: fine
    with pytest.raises(ValueError, match="28x28x1 images but the model makes 32x32x1"):
        check_classifier(NetworkConfig(resolution=32, channels=1), clf)
    with pytest.raises(ValueError, match="model makes 28x28x3"):
        check_classifier(NetworkConfig(resolution=28, channels=3), clf)
    with pytest.raises(ValueError, match="10 classes but the model has 2"):
        check_classifier(NetworkConfig(resolution=28, channels=1, label_dim=2), clf)
    with pytest.raises(ValueError, match="class 10 out of range"):
        check_classifier(NetworkConfig(resolution=28, channels=1), clf, class_idx=10)
    with pytest.raises(ValueError, match=r"takes \[N, 1, 28, 28\]"):
        NoisyClassifier(resolution=28, channels=1, num_classes=3, model_channels=4, channel_mult=(1,))(torch.zeros(1, 1, 16, 16), 1.0)


# --- the trained classifier and its files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    report = train_classifier(get_preset("tiny"), path, nimg=1600, progress=False, log=lambda s: None)
    return path, report


def test_trained_classifier_beats_chance(trained):
    _, report = trained
    assert report["num_classes"] == 10
    small_sigma_acc = [a for s, a in report["bins"] if s < 0.5]
    assert small_sigma_acc and report["clean"] > 0.15 and min(small_sigma_acc) > 0.15, report  # chance 0.10
    assert report["bins"][-1][1] < report["clean"] + 0.1  # the noisiest bin is not easier than clean


def test_classifier_file_round_trip(trained):
    path, _ = trained
    clf, meta = load_classifier(path)
    assert meta["kind"] == "classifier" and meta["config"].network.label_dim == 10
    x = torch.randn([2, 1, 28, 28])
    assert clf(x, torch.tensor([0.1, 1.0])).shape == (2, 10)
    with pytest.raises(CheckpointError, match="classifier file, not a denoiser"):
        load_network(path)


def test_load_classifier_refuses_denoiser(tmp_path):
    cfg = get_preset("tiny")
    save_network(tmp_path / "net.safetensors", build_denoiser(cfg).state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(tmp_path / "net.safetensors")


def test_cli_generate_with_classifier(trained, tmp_path):
    clf_path, _ = trained
    cfg = get_preset("tiny")
    net = tmp_path / "net.safetensors"
    save_network(net, build_denoiser(cfg).state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    run = CliRunner().invoke
    base = ["generate", "--checkpoint", str(net), "--steps", "2", "--sampler", "euler", "--device", "cpu", "--classifier", str(clf_path)]
    r = run(main, base + ["--n", "2", "--class", "3", "--classifier-scale", "1", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.png").is_file()
    r = run(main, base + ["--n", "2", "--class", "3", "--reject-threshold", "0.01", "--max-tries", "4", "--out", str(tmp_path / "r.npz")])
    assert "rejection sampling: accepted" in r.output and "of 4 candidates" in r.output, r.output
    for extra, msg in [(["--class", "3", "--reject-threshold", "0"], "(0, 1]"), (["--class", "3", "--classifier-scale", "-1"], ">= 0"),
                       (["--reject-threshold", "0.5"], "needs --class"), (["--class", "12", "--classifier-scale", "1"], "out of range")]:
        r = run(main, base + ["--n", "1", "--out", str(tmp_path / "x.png")] + extra)
        assert r.exit_code != 0 and msg in r.output, (extra, r.output)
    r = run(main, ["generate", "--checkpoint", str(clf_path), "--n", "1", "--out", str(tmp_path / "y.png")])
    assert r.exit_code != 0 and "not a denoiser" in r.output


def test_cli_train_classifier_help_and_run(tmp_path):
    r = CliRunner().invoke(main, ["train-classifier", "--help"])
    assert r.exit_code == 0 and "--duration" in r.output
    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(main, ["train-classifier", "--preset", "tiny", "--duration", "32", "--classes", "0,1", "--quiet",
                                  "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "held-out accuracy (2 classes" in r.output and out.is_file()
    assert load_classifier(out)[1]["config"].network.label_dim == 2
