"""Metrics: FID / KID / precision-recall math against closed forms and SciPy, memorization, detector
loading (a tiny TorchScript detector through the real loading code; nothing is downloaded), and the
`edmkit metrics` commands end to end."""

import json
import shutil
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.data.images import save_images
from edmkit.metrics import evaluate as ev
from edmkit.metrics import reference as rf
from edmkit.metrics.detectors import (
    DETECTORS,
    DINOV2,
    INCEPTION,
    DetectorError,
    detector_input,
    file_sha256,
    generic_spec,
    load_detector,
)
from edmkit.metrics.memorization import memorization, pairwise_distance
from edmkit.metrics.stats import (
    ClassProbStats,
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    kid,
    knn_radii,
    mmd2_unbiased,
    precision_recall,
)
from edmkit.presets import get_preset


def gaussian(n, d, *, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


# ---------------------------------------------------------------------------------------------
# Fréchet distance and streaming statistics.


@pytest.mark.parametrize("n, d", [(400, 16), (20, 64)])  # full-rank and singular (N < D) covariances
def test_fid_of_a_set_with_itself_is_zero(n, d):
    mu, sigma = feature_stats(gaussian(n, d, seed=1) @ gaussian(d, d, seed=2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_of_diagonal_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_a_scipy_sqrtm_reference_on_random_features():
    a = gaussian(300, 24, seed=3) @ gaussian(24, 24, seed=4)
    b = gaussian(300, 24, seed=5, shift=0.3) @ gaussian(24, 24, seed=6)
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_streamed_and_merged_stats_equal_numpy():
    x = gaussian(103, 5, seed=7, shift=2.0)
    one, two = FeatureStats(5), FeatureStats(5)
    for start in range(0, 60, 16):  # uneven batches, split over two accumulators ("ranks")
        one.update(x[start:min(start + 16, 60)])
    two.update(torch.from_numpy(x[60:]))  # tensors and arrays alike
    mu, sigma = one.merge(two).mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(5).mean_cov()


def test_fid_of_non_commuting_2x2_covariances_equals_the_hand_computed_value():
    """Σ₁Σ₂ not symmetric: for a 2x2 M with eigenvalues λ ≥ 0, Tr √M = √(Tr M + 2√det M) (= √λ₁ + √λ₂).

    Pins the factor 2 in front of Tr((Σ₁Σ₂)^{1/2}) and the square root of the product's eigenvalues
    (not of their sum), independently of scipy.
    """
    s1, s2 = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[1.0, -0.5], [-0.5, 2.0]])
    m = s1 @ s2  # [[1.5, 1], [-0.5, 5.5]]: Tr 7, det 5 * 1.75 = 8.75
    assert np.trace(m) == 7.0 and np.linalg.det(m) == pytest.approx(8.75, rel=1e-14)
    expected = (1.0**2 + 1.5**2) + 5.0 + 3.0 - 2 * np.sqrt(7.0 + 2 * np.sqrt(8.75))
    assert frechet_distance(np.array([1.0, 2.0]), s1, np.array([0.0, 0.5]), s2) == pytest.approx(expected, rel=1e-12)


def test_fid_of_singular_covariances_equals_the_nuclear_norm_form():
    """Σ₁ = UUᵀ, Σ₂ = VVᵀ of rank 3 in D = 16 (N < D, as with few images): the eigenvalues of Σ₁Σ₂ are the
    squared singular values of UᵀV, so Tr((Σ₁Σ₂)^{1/2}) = ‖UᵀV‖_* exactly. The 13 null-space eigenvalues must
    count as 0: taking |λ| (or the real part of a complex sqrtm) of their rounding noise adds ~1e-7 each."""
    u, v = gaussian(16, 3, seed=11), gaussian(16, 3, seed=12)
    mu1, mu2 = gaussian(1, 16, seed=13)[0], gaussian(1, 16, seed=14)[0]
    nuclear = np.linalg.svd(u.T @ v, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(u**2) + np.sum(v**2) - 2 * nuclear
    assert frechet_distance(mu1, u @ u.T, mu2, v @ v.T) == pytest.approx(expected, rel=1e-11, abs=1e-11)


def test_feature_stats_are_float64_for_float32_features_with_a_large_offset():
    """float32 features with mean 1e3 and spread 1: Σxxᵀ − nμμᵀ cancels ~6 digits, so the sums must be float64
    (documented: "accumulated in float64"); numpy's float64 covariance of the same float32 values is the reference."""
    x = (gaussian(64, 4, seed=15) + 1e3).astype(np.float32)
    stats = FeatureStats(4)
    stats.update(torch.from_numpy(x[:40]))
    stats.update(torch.from_numpy(x[40:]))
    mu, sigma = stats.mean_cov()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ---------------------------------------------------------------------------------------------
# KID, precision / recall.


def test_kid_is_unbiased_on_identical_distributions_and_positive_on_shifted_ones():
    same = [kid(gaussian(60, 8, seed=s), gaussian(60, 8, seed=1000 + s), subsets=5, subset_size=50, seed=s)[0] for s in range(30)]
    shifted, _ = kid(gaussian(60, 8, seed=1), gaussian(60, 8, seed=2, shift=1.0), subsets=5, subset_size=50)
    assert min(same) < 0 < max(same)  # unbiased: no clamping, negative values happen
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert shifted > 10 * np.std(same)


def test_precision_recall_on_identical_disjoint_and_half_covered_sets():
    real = gaussian(200, 6, seed=1)
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, gaussian(200, 6, seed=2, shift=50.0), k=3) == (0.0, 0.0)
    half = np.concatenate([gaussian(100, 6, seed=3), gaussian(100, 6, seed=4, shift=50.0)])
    precision, recall = precision_recall(real, half, k=3)
    assert 0.4 <= precision <= 0.5 and recall > 0.5


def test_mmd2_of_a_hand_computed_one_dimensional_case():
    """x = {0, 1}, y = {0, 2}, D = 1: k(a, b) = (ab + 1)³. Off-diagonal k_xx = k_yy = 1, so both within-set terms
    are 1; k_xy = 1, 1, 1, 27 with mean 7.5; unbiased MMD² = 1 + 1 − 2·7.5 = −13. Pins the degree 3, the /D,
    the left-out diagonal and the factor 2."""
    x, y = torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    assert mmd2_unbiased(x, y) == -13.0
    assert kid(x, y, subsets=3, subset_size=2) == (-13.0, 0.0)


def test_mmd2_and_kid_match_a_numpy_reference():
    """Unbiased MMD² (Gretton et al. 2012, Eq. 3) with k = (x·y/D + 1)³ written out in numpy, D = 3 ≠ set sizes.
    With subset_size ≥ N every subset is a permutation of the whole set, so each KID estimate equals the full-sample
    value and the std is 0 (subsets drawn with replacement would repeat points and differ)."""

    def mmd2(a, b):
        d = a.shape[1]
        kaa, kbb, kab = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        m, n = len(a), len(b)
        return (kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1)) - 2 * kab.mean()

    a, b = gaussian(7, 3, seed=21), gaussian(5, 3, seed=22, shift=0.5)
    assert mmd2_unbiased(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(mmd2(a, b), rel=1e-12)
    a6, b6 = a[:6], gaussian(6, 3, seed=23, shift=0.5)
    mean, std = kid(a6, b6, subsets=4, subset_size=100, seed=1)
    assert mean == pytest.approx(mmd2(a6, b6), rel=1e-12) and std < 1e-12


def test_knn_radii_exclude_the_point_itself():
    """Points 0, 1, 3, 7 on a line: distances to the others are {1,3,7}, {1,2,6}, {2,3,4}, {4,6,7}."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    assert knn_radii(x, k=2, batch=3).tolist() == [3.0, 2.0, 3.0, 6.0]  # row blocks do not change it


def line(*values):
    """Points on the x axis of R² (exact distances)."""
    return np.array([[v, 0.0] for v in values])


REAL_LINE, FAKE_LINE = line(0, 1, 2, 3, 4), line(0.5, 1, 5, 10, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_recall_of_a_hand_computed_configuration(dtype):
    """k = 1. Real 0..4 all have radius 1: fake 0.5, 1 and 5 (at distance exactly 1 from 4: the ball is closed,
    d <= r) are inside, 10 and 20 are not: precision 3/5. Fake radii are 0.5, 0.5, 4, 5, 10: real 0 (distance
    exactly 0.5 to fake 0.5), 1, and 2, 3, 4 (within 4 of fake 5) are covered: recall 1."""
    assert precision_recall(REAL_LINE, FAKE_LINE, k=1, dtype=dtype) == (0.6, 1.0)
    assert precision_recall(FAKE_LINE, REAL_LINE, k=1, dtype=dtype) == (1.0, 0.6)  # roles swap with the arguments


def test_score_passes_reference_as_real_and_generated_as_fake():
    """`score` against a reference: precision is about the generated points, recall about the reference's."""
    stats = FeatureStats(2)
    stats.update(FAKE_LINE)
    ref = rf.Reference(mu=REAL_LINE.mean(0), sigma=np.cov(REAL_LINE, rowvar=False), n=5, features=REAL_LINE.astype(np.float32),
                       detector="torchscript", detector_sha256="0", source="line", resolution=1, channels=1)
    out = ev.score(stats, FAKE_LINE.astype(np.float32), ref, metrics=("fid", "kid", "pr"), kid_subsets=2, kid_subset_size=5, pr_k=1)
    assert (out["precision"], out["recall"], out["pr_n"]) == (0.6, 1.0, 5)
    mu, sigma = stats.mean_cov()
    assert out["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-12)
    assert out["kid"] == pytest.approx(mmd2_unbiased(torch.from_numpy(FAKE_LINE), torch.from_numpy(REAL_LINE)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Memorization.


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_memorization_flags_planted_copies_and_not_fresh_samples(metric):
    train = torch.rand(300, 1, 8, 8)
    fresh = torch.rand(20, 1, 8, 8)
    copies = train[[5, 77, 123]] + 0.01 * torch.randn(3, 1, 8, 8)
    result = memorization(torch.cat([fresh, copies]), train, metric=metric, top=3)
    assert result.flagged.tolist() == [False] * 20 + [True] * 3
    assert result.rate == pytest.approx(3 / 23)
    assert sorted(result.top.tolist()) == [20, 21, 22]
    assert sorted(j for _, j in result.pairs()) == [5, 77, 123]


def test_memorization_ratio_of_a_hand_computed_configuration():
    """Training items 0, 1, 2, 3, 4, 10 on a line and a sample at 0.25: sorted distances 0.25, 0.75, 1.75, 2.75,
    3.75, 9.75. With m = 2 next neighbours the ratio is 0.25 / mean(0.75, 1.75) = 0.2 (d₁ itself is not in the
    mean); m = 50 is capped at M − 1 = 5: 0.25 / 3.75. A sample at 2.5 (d₁ = 0.5 tied; ratio 0.5 / 1 = 0.5)
    is not flagged."""
    train = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [10.0]])
    samples = torch.tensor([[0.25], [2.5]])
    two = memorization(samples, train, neighbours=2, top=2)
    np.testing.assert_allclose(two.ratio, [0.25 / 1.25, 0.5 / 1.0], rtol=1e-6)
    np.testing.assert_allclose(two.distance, [0.25, 0.5], rtol=1e-6)
    assert two.nearest[0] == 0 and two.flagged.tolist() == [True, False] and two.top.tolist() == [0, 1]
    capped = memorization(samples, train)  # neighbours = 50
    np.testing.assert_allclose(capped.ratio[0], 0.25 / np.mean([0.75, 1.75, 2.75, 3.75, 9.75]), rtol=1e-6)


def test_cosine_distance_is_one_minus_the_cosine_of_rows():
    """1 − cos between rows of different norms: [2, 0] vs [1, 0], [0, 1], [1, 1] gives 0, 1, 1 − 1/√2."""
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0, 1 - 0.5**0.5], [1.0, 0.0, 1 - 0.5**0.5]])
    torch.testing.assert_close(pairwise_distance(x, y, metric="cosine"), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pairwise_distance(x, y, metric="l2"), torch.cdist(x, y))


@pytest.mark.parametrize("k", [2, 7])
def test_inception_score_of_a_perfect_classifier_is_the_class_count_and_one_for_a_single_class(k):
    labels = torch.arange(10 * 3 * k) % k  # every split of 3k images holds each class 3 times
    mean, std = inception_score(torch.nn.functional.one_hot(labels, k))
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    mean, std = inception_score(torch.nn.functional.one_hot(torch.zeros_like(labels), k))
    assert mean == pytest.approx(1, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_matches_the_original_split_protocol_and_streams_in_any_order():
    """Reference: Salimans et al.'s code, part = probs[i*N//10 : (i+1)*N//10], IS_i = exp(mean KL(p ‖ mean p)); mean and std."""
    n = 53  # not a multiple of 10: split sizes 5 and 6
    p = np.random.default_rng(0).dirichlet(np.full(6, 0.3), size=n)
    scores = []
    for i in range(10):
        part = p[i * n // 10:(i + 1) * n // 10]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = inception_score(p)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))  # batches in any order, as ranks' slices arrive
    streamed = ClassProbStats(n=n)
    for chunk in order.split(7):
        streamed.update(torch.from_numpy(p[chunk.numpy()]), chunk)
    assert streamed.score() == pytest.approx((mean, std), rel=1e-12)
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(p[:9])


# ---------------------------------------------------------------------------------------------
# Detectors: a tiny TorchScript network through the real loading code.


class TinyDetector(torch.nn.Module):
    """Two convolutions and mean / max pooling, with the inception convention (pixels in [0, 255], return_features)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x / 127.5 - 1)))
        features = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [N, 16]
        return features if return_features else features.softmax(dim=1)


def save_tiny_detector(path, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x; the standard FID file still uses it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyDetector().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("detectors")
    return {"a": save_tiny_detector(d / "tiny.pt", 0), "b": save_tiny_detector(d / "other.pt", 1)}


def test_detector_loads_from_a_file_path_and_from_the_cache_folder(tiny, tmp_path, monkeypatch):
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    det = load_detector(tiny["a"])
    assert det.spec.name == "torchscript" and det.sha256 == file_sha256(tiny["a"])
    features = det(images)
    torch.manual_seed(0)  # the same weights, run eagerly: grayscale repeated to RGB, pixels in [0, 255], the feature output
    expected = TinyDetector().eval()(images.float().repeat(1, 3, 1, 1), return_features=True)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("EDMKIT_CACHE", str(tmp_path))
    shutil.copy(tiny["a"], tmp_path / INCEPTION.filename)  # stands in for the real file, same code path
    cached = DETECTORS["inception"](allow_download=False)
    assert cached.spec is INCEPTION and cached.path == tmp_path / INCEPTION.filename
    torch.testing.assert_close(cached(images), features)


def test_missing_detector_names_the_file_the_folder_and_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("EDMKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DetectorError) as e:
        load_detector("inception", allow_download=False)
    msg = str(e.value)
    assert INCEPTION.filename in msg and str(tmp_path / "cache" / INCEPTION.filename) in msg and INCEPTION.url in msg
    with pytest.raises(DetectorError, match="export it once"):
        load_detector("dinov2")  # no download source: instructions instead


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DetectorError, match="could not download .* put it at"):
        load_detector("inception", cache=tmp_path)
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_detector_hash_mismatch_and_non_torchscript_files_are_errors(tiny, tmp_path):
    with pytest.raises(DetectorError, match="sha256 .* expected 00ff"):
        load_detector(tiny["a"], sha256="00ff")
    junk = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"w": torch.zeros(2)}, junk)
    with pytest.raises(DetectorError, match="not a loadable TorchScript file.*state dict"):
        load_detector(junk)
    with pytest.raises(DetectorError, match="unknown detector 'nope'"):
        load_detector("nope")


def test_detector_input_conversion():
    gray = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = detector_input(gray, spec=INCEPTION)  # the network resizes to 299 itself: only channels change here
    assert x.shape == (2, 3, 28, 28) and float(x.min()) == 255.0
    y = detector_input(gray, spec=DINOV2)
    assert y.shape == (2, 3, 224, 224)
    torch.testing.assert_close(y[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    with pytest.raises(ValueError, match="uint8"):
        detector_input(gray.float(), spec=generic_spec(Path("x.pt")))


# ---------------------------------------------------------------------------------------------
# Reference files and repeats.


def make_reference(tiny_path, n=40, seed=0):
    images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return ev.compute_reference(images, detector=load_detector(tiny_path), source="random", batch=16, max_features=24)


def test_reference_round_trip_and_corrupt_files(tiny, tmp_path):
    ref = make_reference(tiny["a"])
    assert ref.n == 40 and ref.features.shape == (24, 16) and ref.resolution == 16 and ref.channels == 1
    rf.save_reference(tmp_path / "ref.npz", ref)
    back = rf.load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    assert back.detector_sha256 == ref.detector_sha256 and back.source == "random"
    data = (tmp_path / "ref.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        rf.load_reference(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not an edmkit reference"):
        rf.load_reference(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="hash mismatch"):
        rf.check_detector(ref, load_detector(tiny["b"]))


def test_folder_repeats_score_disjoint_image_chunks(tiny):
    """Repeat r of an image set scores images [r·n, (r+1)·n): each row is the FID of its own chunk, computed here
    straight from the detector's features of that chunk."""
    det, ref = load_detector(tiny["a"]), make_reference(tiny["a"])
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    images[8:] //= 2  # the second chunk is darker: its FID differs
    result = ev.evaluate_images(images, ref=ref, detector=det, repeats=2, metrics=("fid",), batch=5)
    assert [r["images"] for r in result["repeats"]] == ["0-7", "8-15"]
    for r, row in enumerate(result["repeats"]):
        mu, sigma = feature_stats(det(images[8 * r:8 * (r + 1)]))
        assert row["n"] == 8 and row["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-6)
    assert result["repeats"][0]["fid"] != pytest.approx(result["repeats"][1]["fid"], rel=1e-2)


def test_seed_ranges_are_disjoint_and_summaries_use_all_repeats():
    ranges = ev.seed_ranges(list(range(10, 20)), 3)
    assert [ev.describe_seeds(r) for r in ranges] == ["10-19", "20-29", "30-39"]
    s = ev.summarize([{"fid": 1.0, "n": 5}, {"fid": 3.0, "n": 5}])
    assert s == {"fid": {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "min": 1.0, "max": 3.0}}


# ---------------------------------------------------------------------------------------------
# CLI end to end on the tiny preset with the tiny detector.


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_of(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    return res.output


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg)
    ckpt.save_network(d / "net.safetensors", net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    data = np.random.default_rng(0).integers(0, 256, size=(48, 28, 28), dtype=np.uint8)
    np.savez(d / "data.npz", images=data)
    res = run("metrics", "ref", "--data", d / "data.npz", "--out", d / "ref.npz", "--detector", tiny["a"], "--max-features", "32",
              "--batch", "16", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    return d


def test_cli_ref_then_gen_with_repeats(setup, tiny):
    d = setup
    res = run("metrics", "gen", "--checkpoint", d / "net.safetensors", "--ref", d / "ref.npz", "--n", "8", "--repeats", "2", "--steps", "2",
              "--detector", tiny["a"], "--batch", "4", "--device", "cpu", "--quiet", "--out", d / "gen.json")
    assert res.exit_code == 0, res.output
    result = json.loads((d / "gen.json").read_text())
    assert [r["seeds"] for r in result["repeats"]] == ["0-7", "8-15"]
    fids = [r["fid"] for r in result["repeats"]]
    assert all(f > 0 for f in fids) and result["summary"]["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert {"kid", "precision", "recall"} <= set(result["summary"]) and result["detector_sha256"] == file_sha256(tiny["a"])
    assert "note: n = 8" in res.output and "fid" in res.output


def test_cli_folder_scores_images_and_itself_scores_zero(setup, tiny):
    d = setup
    images = torch.from_numpy(np.load(d / "data.npz")["images"])[:, None]
    save_images(images, d / "real")
    res = run("metrics", "folder", "--images", d / "real", "--ref", d / "ref.npz", "--detector", tiny["a"], "--metrics", "fid,pr",
              "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    result = json.loads((d / "real-metrics.json").read_text())["repeats"][0]
    assert result["n"] == 48 and abs(result["fid"]) < 1e-6 and "kid" not in result
    assert "only 48" in error_of("metrics", "folder", "--images", d / "real", "--ref", d / "ref.npz", "--detector", tiny["a"], "--n", "30",
                                 "--repeats", "2", "--device", "cpu")


def test_cli_inception_score_uses_the_detector_class_head_in_the_same_pass(setup, tiny):
    d = setup
    images = torch.from_numpy(np.load(d / "data.npz")["images"])[:, None]
    np.savez(d / "is.npz", images=images[:, 0].numpy())
    res = run("metrics", "folder", "--images", d / "is.npz", "--ref", d / "ref.npz", "--detector", tiny["a"], "--metrics", "fid,is",
              "--repeats", "2", "--batch", "7", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    result = json.loads((d / "is-metrics.json").read_text())
    det = load_detector(tiny["a"])
    for r, row in enumerate(result["repeats"]):  # independent: the tiny network's softmax head on each chunk of 24, in one batch
        assert (row["is"], row["is_std"]) == pytest.approx(inception_score(det.probs(images[24 * r:24 * (r + 1)])), rel=1e-6)
    assert result["summary"]["is"]["mean"] == pytest.approx(np.mean([row["is"] for row in result["repeats"]]))
    assert result["repeats"][0]["is"] > 1 and "is_std" not in "".join(line.split()[0] for line in res.output.splitlines())
    assert "need n >= 10" in error_of("metrics", "folder", "--images", d / "is.npz", "--ref", d / "ref.npz", "--detector", tiny["a"],
                                      "--metrics", "is", "--n", "8", "--device", "cpu")


def test_detectors_without_a_class_head_cannot_give_an_inception_score(tiny):
    det = load_detector(tiny["a"])
    bare = type(det)(module=det.module, spec=DINOV2, path=det.path, sha256=det.sha256, device=det.device)
    with pytest.raises(ValueError, match="no class head"):
        ev.check_metrics(bare, ("fid", "is"), n=100)
    with pytest.raises(ValueError, match="need n >= 10"):
        ev.check_metrics(det, ("is",), n=8)


def test_cli_bad_inputs_give_one_line_errors(setup, tiny):
    d = setup
    (d / "bad.npz").write_bytes((d / "ref.npz").read_bytes()[:200])
    gen = ["metrics", "gen", "--checkpoint", d / "net.safetensors", "--n", "4", "--steps", "2", "--device", "cpu"]
    assert "corrupt" in error_of(*gen, "--ref", d / "bad.npz", "--detector", tiny["a"])
    assert "hash mismatch" in error_of(*gen, "--ref", d / "ref.npz", "--detector", tiny["b"])
    assert "expected 1234" in error_of(*gen, "--ref", d / "ref.npz", "--detector", tiny["a"], "--detector-sha256", "1234")
    assert "user TorchScript detector" in error_of(*gen, "--ref", d / "ref.npz")
    assert "unknown metrics" in error_of(*gen, "--ref", d / "ref.npz", "--detector", tiny["a"], "--metrics", "fid,xyz")


def test_cli_memorization_flags_copied_training_images(setup):
    d = setup
    train = torch.from_numpy(np.load(d / "data.npz")["images"])[:, None]
    save_images(train[:6], d / "copies")
    res = run("metrics", "memorization", "--images", d / "copies", "--data", d / "data.npz", "--n", "6", "--top", "4", "--out", d / "pairs.png",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    info = json.loads((d / "pairs.json").read_text())
    assert info["rate"] == 1.0 and len(info["pairs"]) == 4 and all(p["sample"] == p["train"] for p in info["pairs"])
    assert (d / "pairs.png").stat().st_size > 0


@pytest.mark.parametrize("cmd", [["metrics"], ["metrics", "ref"], ["metrics", "gen"], ["metrics", "folder"], ["metrics", "memorization"]])
def test_metrics_help(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Usage" in res.output
