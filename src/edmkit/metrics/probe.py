"""Linear probe: how linearly separable the classes are in a frozen denoiser's features.

Recipe (the representation-quality number of diffusion papers' "linear probe acc."): noise each
labelled image to a fixed σ with fixed per-image noise (x = y + σ·n, EDM Eq. 1 notation), run the
frozen denoiser D(x; σ) once, read one U-Net block's output through a forward hook, average it
over space (global average pooling), and fit a linear classifier on a train split; the score is
the accuracy on the held-out test split.

The classifier is closed-form ridge regression onto one-hot targets (features standardized with
train-split statistics; float64 normal equations): deterministic, no learning rate or epochs.
Class-conditional models get zero labels (their unconditional branch), so labels never leak
into the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from edmkit.data.dataset import ImageDataset
from edmkit.data.images import images_to_float
from edmkit.diffusion.samplers import SeededRandn


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`linear_probe`."""

    test_accuracy: float  # fraction of test images classified correctly
    train_accuracy: float  # same on the training split (a large gap means the probe overfits)
    chance: float  # accuracy of always predicting the most frequent test class
    block: str  # feature block, e.g. "dec.7x7_in0"
    sigma: float  # noise level the features were taken at
    feature_dim: int  # channels of the pooled features
    n_train: int
    n_test: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def block_names(denoiser: torch.nn.Module) -> list[str]:
    """Names of the U-Net's encoder and decoder blocks, ``enc.<name>`` / ``dec.<name>``, in forward order."""
    net = getattr(denoiser, "net", denoiser)
    if not (isinstance(getattr(net, "enc", None), torch.nn.ModuleDict) and isinstance(getattr(net, "dec", None), torch.nn.ModuleDict)):
        raise ValueError("the network has no encoder/decoder blocks (net.enc / net.dec) to probe")
    return [f"enc.{k}" for k in net.enc] + [f"dec.{k}" for k in net.dec]


def default_block(denoiser: torch.nn.Module) -> str:
    """The first decoder block: the lowest-resolution decoder input (``dec.<R>x<R>_in0``)."""
    return next(name for name in block_names(denoiser) if name.startswith("dec."))


def resolve_block(denoiser: torch.nn.Module, name: str | None) -> tuple[str, torch.nn.Module]:
    """Find a block by ``enc.X`` / ``dec.X`` (or a bare ``X`` that names only one block); errors list the valid names."""
    names = block_names(denoiser)
    if name is None:
        name = default_block(denoiser)
    matches = [n for n in names if n == name or n.split(".", 1)[1] == name]
    if len(matches) != 1:
        why = "is ambiguous" if matches else "is not a block of this network"
        raise ValueError(f"block {name!r} {why}; valid: {', '.join(names)}")
    part, key = matches[0].split(".", 1)
    net = getattr(denoiser, "net", denoiser)
    return matches[0], getattr(net, part)[key]


@torch.no_grad()
def pooled_features(
    denoiser: torch.nn.Module, images: torch.Tensor, *, block: torch.nn.Module, sigma: float, seeds: torch.Tensor,
    label_dim: int = 0, batch: int = 256,
) -> torch.Tensor:
    """Globally average-pooled output of `block` for images noised to σ with per-image seeded noise.

    Args:
        denoiser: frozen D(x; σ, labels) containing `block`.
        images: uint8 [N, C, H, W].
        block: the submodule whose output is read (forward hook).
        sigma: noise level σ >= 0.
        seeds: int64 [N] noise seed of each image (image k's noise depends only on seeds[k]).
        label_dim: classes of the model; > 0 passes zero labels (the unconditional branch).
        batch: images per forward pass (does not change the result).

    Returns:
        float32 [N, C_block] on the CPU.
    """
    device = next(denoiser.parameters()).device
    captured: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda module, args, out: captured.append(out.float().mean(dim=(2, 3)).cpu()))
    try:
        for start in range(0, len(images), batch):
            y = images_to_float(images[start:start + batch]).to(device)  # [B, C, H, W] in [-1, 1]
            noise = SeededRandn(seeds[start:start + batch].tolist(), device=device).randn(y.shape[1:])
            labels = torch.zeros(len(y), label_dim, device=device) if label_dim else None
            denoiser(y + sigma * noise, torch.full([len(y)], float(sigma), device=device), labels)
    finally:
        handle.remove()
    return torch.cat(captured)  # [N, C_block]


def probe_split(n: int, *, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic disjoint (train, test) index split of ``range(n)`` from a seeded permutation."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(n * test_fraction)
    if n_test < 1 or n - n_test < 2:
        raise ValueError(f"{n} images are too few for a train/test split with test_fraction {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_test:].sort().values, order[:n_test].sort().values


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, ridge: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closed-form ridge regression onto one-hot targets: W = (XᵀX + λ·n·I)⁻¹ XᵀY on standardized features.

    Args:
        features: [N, D] training features.
        labels: int64 [N] class indices.
        num_classes: K.
        ridge: λ, relative to the number of samples (features are unit-variance, so it is scale-free).

    Returns:
        predict(features [M, D]) -> int64 [M] class indices.
    """
    x = features.to(torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [N, D+1] with a bias column
    y = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)  # [N, K]
    reg = ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0  # the bias is not shrunk
    W = torch.linalg.solve(x.T @ x + reg, x.T @ y)  # [D+1, K]

    def predict(f: torch.Tensor) -> torch.Tensor:
        z = (f.to(torch.float64) - mean) / std
        return (torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], dim=1) @ W).argmax(1)

    return predict


def linear_probe(
    denoiser: torch.nn.Module, data: ImageDataset, *, block: str | None = None, sigma: float = 0.5, test_fraction: float = 0.2,
    seed: int = 0, ridge: float = 1e-3, max_images: int | None = None, label_dim: int = 0, batch: int = 256,
) -> ProbeResult:
    """Linear-probe test accuracy of a frozen denoiser's pooled block features at noise level σ.

    Args:
        denoiser: D(x; σ, labels), e.g. from :func:`edmkit.checkpoint.load_network` (put in eval mode here).
        data: labelled dataset at the network's resolution and channels.
        block: ``enc.<name>`` / ``dec.<name>`` (see :func:`block_names`); default the first decoder block.
        sigma: noise level σ of the features.
        test_fraction: fraction of the images held out for the test accuracy.
        seed: seed of the split and of the per-image noise (image k gets noise seed ``seed * 2**32 + k``).
        ridge: ridge strength λ (see :func:`fit_ridge`).
        max_images: use only this many images, a random subset drawn with `seed` (None: all).
        label_dim: classes of the model (zero labels are passed when > 0).
        batch: images per forward pass.

    Returns:
        The :class:`ProbeResult`.
    """
    if data.labels is None or data.num_classes < 2:
        raise ValueError(f"{data.name}: the linear probe needs a labelled dataset with at least 2 classes")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if max_images is not None and max_images < len(data):  # a seeded random subset: datasets are often sorted by class
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values)
    name, module = resolve_block(denoiser, block)
    train_idx, test_idx = probe_split(len(data), test_fraction=test_fraction, seed=seed)
    denoiser.eval()
    seeds = seed * 2**32 + torch.arange(len(data), dtype=torch.int64)
    feats = pooled_features(denoiser, data.images, block=module, sigma=sigma, seeds=seeds, label_dim=label_dim, batch=batch)
    labels = data.labels
    predict = fit_ridge(feats[train_idx], labels[train_idx], num_classes=data.num_classes, ridge=ridge)
    accuracy = lambda idx: float((predict(feats[idx]) == labels[idx]).double().mean())  # noqa: E731
    chance = float(torch.bincount(labels[test_idx], minlength=data.num_classes).max()) / len(test_idx)
    return ProbeResult(test_accuracy=accuracy(test_idx), train_accuracy=accuracy(train_idx), chance=chance, block=name,
                       sigma=float(sigma), feature_dim=feats.shape[1], n_train=len(train_idx), n_test=len(test_idx))
