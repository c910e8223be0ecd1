"""Distances between feature distributions: Fréchet distance (FID), KID, precision / recall.

Pure math on detector features, no I/O. Implemented from the papers; no code copied.

Symbols:
    μ, Σ     mean [D] and covariance [D, D] of a set of D-dimensional features (float64).
    FID      Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...":
             ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}).
    KID      Bińkowski et al. 2018, "Demystifying MMD GANs": unbiased MMD² with the cubic
             polynomial kernel k(x, y) = (x·y/D + 1)³, averaged over random subsets.
    P / R    Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric ...": a set's manifold
             is the union of balls around its points with radius = distance to the k-th nearest
             neighbour; precision = share of generated points inside the real manifold, recall =
             share of real points inside the generated one.
    IS       Salimans et al. 2016, "Improved Techniques for Training GANs": exp(E_x KL(p(y|x) ‖ p(y))) of a
             classifier's class probabilities p(y|x), with p(y) the marginal over the images scored. Split
             protocol of the paper's code (and StyleGAN2-ADA's): the N images, in order, are cut into 10
             contiguous splits of ⌊N/10⌋-ish images; IS is computed per split (its own p(y)) and reported as
             mean ± std (divisor n) over the splits.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_features(x: np.ndarray | torch.Tensor, *, name: str, min_rows: int = 1) -> None:
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected features [N >= {min_rows}, D], got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Mean and covariance, accumulated in float64.


class FeatureStats:
    """Running sums Σx and Σxxᵀ in float64, for μ and Σ of a feature stream.

    Sums (not running means) so that batches and ranks merge by addition: ``merge`` for objects
    in one process, ``all_reduce`` across torch.distributed ranks.

    Args:
        dim: feature dimension D.
        device: where the sums live (the detector's device avoids copies).
    """

    def __init__(self, dim: int, *, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [N, D]."""
        x = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got shape {tuple(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's sums to this one (returns self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge features of dimension {other.dim} into {self.dim}")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the accumulators of all torch.distributed ranks in float64 (no-op without a process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.sum_outer):
            torch.distributed.all_reduce(t)
        self.n = int(n.item())
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ [D] and unbiased Σ [D, D] (divisor N − 1, as numpy.cov) in float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry despite rounding
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ [D] and unbiased covariance Σ [D, D] of features [N, D], in float64."""
    x = _as_float64(features)
    _check_features(x, name="features", min_rows=2)
    stats = FeatureStats(x.shape[1])
    stats.update(x)
    return stats.mean_cov()


# ---------------------------------------------------------------------------------------------
# Fréchet distance.


def _nonnegative_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0.

    eigh returns the null space's eigenvalues as ±(D·eps·λ_max)-sized noise; their square roots
    (≈ 1e-7·√λ_max each) would add up to a visible error for singular (N < D) covariances, so
    values below that level are treated as exact zeros (the cut-off of numpy's matrix_rank).
    """
    cutoff = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > cutoff, w, 0.0)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(_nonnegative_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^{1/2}) via the symmetric form Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}).

    Σ₁Σ₂ is similar to the symmetric PSD matrix Σ₁^{1/2}Σ₂Σ₁^{1/2} (same eigenvalues λᵢ ≥ 0), so
    the trace of its principal square root is Σᵢ √λᵢ. Unlike ``scipy.linalg.sqrtm(Σ₁ @ Σ₂)`` this
    never returns complex values for singular (N < D) covariances; eigenvalues at rounding level
    are set to 0.
    """
    root1 = _sqrt_psd(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_nonnegative_eigenvalues(eig)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians, ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) (FID; Heusel et al. 2017).

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D] (symmetric PSD).

    Returns:
        The distance in float64 (0 up to rounding for identical inputs).
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, shape, want in (("mu1", mu1.shape, (d,)), ("mu2", mu2.shape, (d,)), ("sigma1", sigma1.shape, (d, d)), ("sigma2", sigma2.shape, (d, d))):
        if shape != want:
            raise ValueError(f"frechet_distance: {name} has shape {shape}, expected {want} (mu1 is {mu1.shape})")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: mean or covariance has NaN/inf entries")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


# ---------------------------------------------------------------------------------------------
# Kernel inception distance.


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel k(x, y) = (x·y/D + 1)³ (Bińkowski et al. 2018): [N, D], [M, D] -> [N, M]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² estimate between samples x [m, D] and y [n, D] (Gretton et al. 2012, Eq. 3).

    Within-set sums leave out the diagonal k(xᵢ, xᵢ); the estimate can be negative when the two
    distributions are equal.
    """
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * k_xy.mean())


def kid(
    feat_a: torch.Tensor | np.ndarray,
    feat_b: torch.Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD² over random subsets (Bińkowski et al. 2018).

    Args:
        feat_a: features [N_a, D] (e.g. generated).
        feat_b: features [N_b, D] (e.g. reference).
        subsets: number of random subset pairs.
        subset_size: points per subset, capped at min(N_a, N_b); drawn without replacement.
        seed: seed of the subset draws.
        device: where the kernels are computed (float64).

    Returns:
        (mean, std) of the per-subset MMD² estimates.
    """
    a, b = _as_float64(feat_a), _as_float64(feat_b)
    _check_features(a, name="kid feat_a", min_rows=2)
    _check_features(b, name="kid feat_b", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid: need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    values = []
    for _ in range(subsets):
        ia, ib = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        values.append(mmd2_unbiased(ta[torch.from_numpy(ia).to(device)], tb[torch.from_numpy(ib).to(device)]))
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds).


def knn_radii(x: torch.Tensor, *, k: int = 3, batch: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, self excluded: [N, D] -> [N]."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k-NN radii need 1 <= k < N, got k = {k} with N = {x.shape[0]}")
    out = [torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)]  # +1: the point itself
    return torch.cat(out)


def manifold_coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, *, batch: int = 1024) -> torch.Tensor:
    """Whether each point lies in at least one ball (center, radius): [N, D], [M, D], [M] -> bool [N]."""
    out = [(torch.cdist(points[i:i + batch], centers) <= radii).any(dim=1) for i in range(0, len(points), batch)]
    return torch.cat(out)


def precision_recall(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    k: int = 3,
    batch: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019).

    Both sets should have the same size: radii shrink as a set grows, so the numbers depend on it.

    Args:
        real: reference features [N, D].
        fake: generated features [M, D].
        k: neighbour whose distance sets a ball's radius (paper: 3).
        batch: rows per block of the pairwise-distance computation.
        device: where distances are computed.
        dtype: float type of the distances.

    Returns:
        (precision, recall), each in [0, 1].
    """
    r, f = (torch.as_tensor(_as_float64(x)).to(device, dtype) for x in (real, fake))
    _check_features(r, name="precision_recall real", min_rows=k + 1)
    _check_features(f, name="precision_recall fake", min_rows=k + 1)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall: feature dimensions differ ({r.shape[1]} vs {f.shape[1]})")
    precision = manifold_coverage(f, r, knn_radii(r, k=k, batch=batch), batch=batch).double().mean()
    recall = manifold_coverage(r, f, knn_radii(f, k=k, batch=batch), batch=batch).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Inception score.

IS_SPLITS = 10  # splits of Salimans et al. 2016's protocol


def split_of(index: torch.Tensor, *, n: int, splits: int) -> torch.Tensor:
    """Split of each image index j in [0, n): split s holds [⌊s·n/splits⌋, ⌊(s+1)·n/splits⌋), the chunks of the paper's code."""
    return torch.div((index + 1) * splits - 1, n, rounding_mode="floor")


class ClassProbStats:
    """Per-split sums Σ p(y|x) [splits, K] and Σ Σ_y p log p [splits] in float64, for the inception score of a stream.

    Sums so that batches and ranks merge by addition (as :class:`FeatureStats`); each image is assigned to its split by
    its index in the scored set (:func:`split_of`), so the result does not depend on batching or the rank count.

    Args:
        n: images in the scored set (fixes the splits).
        splits: number of splits (Salimans et al.: 10).
    """

    def __init__(self, *, n: int, splits: int = IS_SPLITS) -> None:
        if splits < 1 or n < splits:
            raise ValueError(f"the inception score needs at least {splits} images (one per split), got {n}")
        self.n, self.splits = n, splits
        self.count = self.sum_p = self.sum_plogp = None  # allocated at the first batch, which fixes K and the device

    def update(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """Add class probabilities [B, K] of the images with indices [B] (in [0, n))."""
        p = torch.as_tensor(probs).to(torch.float64)
        if self.sum_p is None:
            self.count = torch.zeros(self.splits, dtype=torch.float64, device=p.device)
            self.sum_p = torch.zeros(self.splits, p.shape[-1], dtype=torch.float64, device=p.device)
            self.sum_plogp = torch.zeros(self.splits, dtype=torch.float64, device=p.device)
        p = p.to(self.sum_p.device)
        if p.ndim != 2 or p.shape[1] != self.sum_p.shape[1] or len(index) != len(p):
            raise ValueError(f"expected probabilities [B, {self.sum_p.shape[1]}] and B indices, got {tuple(p.shape)} and {len(index)}")
        s = split_of(torch.as_tensor(index, device=p.device), n=self.n, splits=self.splits)
        self.count.index_add_(0, s, torch.ones_like(s, dtype=torch.float64))
        self.sum_p.index_add_(0, s, p)
        self.sum_plogp.index_add_(0, s, torch.xlogy(p, p).sum(1))  # 0 log 0 = 0

    def all_reduce(self) -> ClassProbStats:
        """Sum the accumulators of all torch.distributed ranks (no-op without a process group)."""
        if self.count is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.count, self.sum_p, self.sum_plogp):
                torch.distributed.all_reduce(t)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of IS = exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016, Sec. 4).

        E_x KL(p(y|x) ‖ p(y)) = E_x Σ_y p log p − Σ_y p(y) log p(y), with p(y) = E_x p(y|x) over the split.
        """
        if self.count is None or bool((self.count == 0).any()):
            raise ValueError(f"inception score: some of the {self.splits} splits received no images")
        marginal = self.sum_p / self.count[:, None]  # [splits, K]
        kl = self.sum_plogp / self.count - torch.xlogy(marginal, marginal).sum(1)  # [splits]
        per_split = kl.exp().cpu().numpy()
        return float(per_split.mean()), float(per_split.std())


def inception_score(probs: torch.Tensor | np.ndarray, *, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception score (Salimans et al. 2016) of class probabilities [N, K] in image order: (mean, std) over `splits` splits."""
    p = torch.as_tensor(_as_float64(probs))
    _check_features(p, name="inception_score probs")
    stats = ClassProbStats(n=len(p), splits=splits)
    stats.update(p, torch.arange(len(p)))
    return stats.score()
