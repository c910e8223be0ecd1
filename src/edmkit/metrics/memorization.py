"""Memorization check: nearest training neighbours of generated samples.

A sample is a near-copy when its nearest training neighbour is much closer than the training
images around it (Carlini et al. 2023, "Extracting Training Data from Diffusion Models", Sec. 4):
with d₁ ≤ d₂ ≤ … the distances from a sample to the training set, it is flagged when

    d₁ < ratio · mean(d₂, …, d_{1+m}),   ratio = 1/3 (PAPERS.md, "Evaluation").

Carlini et al. normalise by α·mean over the n closest (α = 0.5, n = 50) and threshold at 1/3;
this module uses the PAPERS.md form (mean over the m next neighbours, m = 50 by default). The
relative test adapts to dense regions of the data, where an absolute distance threshold would flag
ordinary samples. Distances are ℓ2 in pixel space or cosine distances (1 − cos) of features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edmkit.data.images import float_to_images, save_image_grid

METRICS = ("l2", "cosine")


@dataclass(frozen=True, eq=False)
class Memorization:
    """Result of :func:`memorization` for N samples.

    Attributes:
        rate: share of flagged samples.
        flagged: bool [N], near-copies.
        nearest: int64 [N], index of each sample's nearest training item.
        distance: float64 [N], distance d₁ to it.
        ratio: float64 [N], d₁ / mean(d₂ … d_{1+m}); small = copy-like.
        top: int64 [T], sample indices ordered from most to least copy-like (smallest ratio).
    """

    rate: float
    flagged: np.ndarray
    nearest: np.ndarray
    distance: np.ndarray
    ratio: np.ndarray
    top: np.ndarray

    def pairs(self) -> list[tuple[int, int]]:
        """(sample index, nearest training index) for ``top``, most copy-like first."""
        return [(int(i), int(self.nearest[i])) for i in self.top]


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, *, metric: str) -> torch.Tensor:
    """ℓ2 or cosine (1 − cos) distances between rows: [N, D], [M, D] -> [N, M]."""
    if metric == "l2":
        return torch.cdist(x, y)
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    raise ValueError(f"unknown distance {metric!r}; valid: {', '.join(METRICS)}")


def nearest_neighbours(x: torch.Tensor, y: torch.Tensor, *, count: int, metric: str, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` nearest rows of y for each row of x: ([N, count] distances ascending, [N, count] indices)."""
    dists, idx = [], []
    for i in range(0, len(x), batch):
        d, j = pairwise_distance(x[i:i + batch], y, metric=metric).topk(count, dim=1, largest=False)
        dists.append(d)
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def memorization(
    samples: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    *,
    metric: str = "l2",
    ratio: float = 1 / 3,
    neighbours: int = 50,
    top: int = 16,
    batch: int = 256,
    device: torch.device | str = "cpu",
) -> Memorization:
    """Flag near-copies of training items: d₁ < ratio · mean(d₂ … d_{1+m}) (Carlini et al. 2023 style; PAPERS.md).

    Args:
        samples: generated items [N, ...] (images or features; flattened to [N, D]).
        train: training items [M, ...] of the same size D.
        metric: "l2" (pixels) or "cosine" (features).
        ratio: threshold on d₁ / mean of the next neighbours' distances.
        neighbours: m, the next neighbours averaged (capped at M − 1).
        top: number of most copy-like samples listed in the result.
        batch: samples per block of the distance computation.
        device: where distances are computed.

    Returns:
        A :class:`Memorization` with the flags, nearest indices, distances, ratios and the top samples.
    """
    x = torch.as_tensor(samples).to(device, torch.float32).flatten(1)
    y = torch.as_tensor(train).to(device, torch.float32).flatten(1)
    if len(y) < 2 or len(x) < 1:
        raise ValueError(f"memorization needs >= 1 sample and >= 2 training items, got {len(x)} and {len(y)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} values each but training items {y.shape[1]}: "
                         "compare at the same resolution and channels")
    if not 0 < ratio < 1 or neighbours < 1:
        raise ValueError(f"need 0 < ratio < 1 and neighbours >= 1, got {ratio}, {neighbours}")
    m = min(neighbours, len(y) - 1)
    dist, idx = nearest_neighbours(x, y, count=1 + m, metric=metric, batch=batch)
    dist = dist.double().clamp_min(0)
    rel = (dist[:, 0] / dist[:, 1:].mean(dim=1).clamp_min(1e-12)).cpu().numpy()
    flagged = rel < ratio
    return Memorization(rate=float(flagged.mean()), flagged=flagged, nearest=idx[:, 0].cpu().numpy(),
                        distance=dist[:, 0].cpu().numpy(), ratio=rel, top=np.argsort(rel, kind="stable")[:top])


def save_pairs(path: str | Path, samples: torch.Tensor, train: torch.Tensor, pairs: list[tuple[int, int]], *, per_row: int = 4) -> None:
    """Write a PNG of (sample | nearest training image) pairs, `per_row` pairs per row.

    Args:
        path: output .png.
        samples: generated images [N, C, H, W] (uint8, or float in [-1, 1]).
        train: training images [M, C, H, W] of the same size.
        pairs: (sample index, training index) pairs, e.g. ``Memorization.pairs()``.
        per_row: pairs per grid row.
    """
    if not pairs:
        raise ValueError("no pairs to draw")
    samples, train = (t if t.dtype == torch.uint8 else float_to_images(t) for t in (samples, train))
    images = torch.stack([img for i, j in pairs for img in (samples[i], train[j])])  # [2P, C, H, W]
    save_image_grid(images, path, nrow=2 * min(per_row, len(pairs)))
