"""Held-out split and the fixed-protocol denoising loss (validation loss, post-hoc EMA score).

A *probe* is a fixed set of images (and labels), fixed noise levels sigma_k and fixed unit noise n_k
per level; its loss is the lambda(sigma)-weighted denoising error (EDM Eq. 2 with Table 1's weight, or
the formulation's own weight) of the network on x = y + sigma_k n_k, averaged per level:

    L_k = mean_i lambda(sigma_k) ||D(y_i + sigma_k n_ik; sigma_k) - y_i||^2.

The noise of level k is drawn from a generator seeded by (noise_seed, k), never from the global RNG,
so a probe returns the same numbers for the same weights and does not disturb the training stream.
The sigma_k are the midpoint quantiles of the training density (``loss_fn.sigma_quantiles``), so the
mean over k approximates the training objective and each L_k is the loss in one equal-mass sigma bin.

Memorization signal (Carlini et al. 2023; the seed notes): a validation loss that rises while the
training loss falls is a necessary condition for memorizing the training set.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edmkit.data.dataset import ImageDataset
from edmkit.diffusion.loss import EDMLoss

if TYPE_CHECKING:
    from edmkit.config import ExperimentConfig


def split_indices(n: int, *, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split of ``n`` items: (train, val) index sets, disjoint, each sorted, a pure function of (n, fraction, seed).

    ``round(fraction * n)`` items (at least one when fraction > 0) are held out; fraction 0 holds out none.

    Returns:
        (train [n - m] int64, val [m] int64).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    m = 0 if fraction == 0 else max(1, round(fraction * n))
    if m >= n:
        raise ValueError(f"val_fraction {fraction} of {n} images leaves none to train on")
    # its own stream (not the data order's seed * 1_000_003 + epoch), so the split is independent of the order
    perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + 2**40) % 2**63))
    return perm[m:].sort().values, perm[:m].sort().values


def split_dataset(data: ImageDataset, *, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """(training images, held-out images or None); fraction 0 returns ``data`` itself, so the training stream is unchanged."""
    if fraction == 0:
        return data, None
    train_idx, val_idx = split_indices(len(data), fraction=fraction, seed=seed)
    return data.subset(train_idx), data.subset(val_idx)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class DenoisingProbe:
    """Fixed images, labels, noise levels and noise seed of a denoising loss that is comparable over time."""

    y: torch.Tensor                             # [N, C, H, W] float32 images in [-1, 1]
    labels: torch.Tensor | None                 # [N, L] one-hot float32, or None
    sigmas: tuple[float, ...]                   # the K fixed noise levels
    noise_seed: int                             # level k's noise [N, C, H, W] comes from seed (noise_seed, k)
    context: torch.Tensor | None = None         # [N, L, D] cross-attention tokens of the images, or None

    def noise(self, k: int) -> torch.Tensor:
        """Unit noise [N, C, H, W] of level k, drawn on the CPU (the same on every device)."""
        g = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + k) % 2**63)
        return torch.randn(self.y.shape, generator=g)


def make_probe(data: ImageDataset, indices: Sequence[int] | torch.Tensor, *, label_dim: int, sigmas: Sequence[float] | torch.Tensor,
               noise_seed: int, context_dim: int = 0) -> DenoisingProbe:
    """A probe of the images ``data[indices]`` at ``sigmas``; labels one-hot to ``label_dim`` classes (0: unconditional);
    with ``context_dim`` the images' context tokens too."""
    index = torch.as_tensor(indices, dtype=torch.int64)
    if len(index) == 0 or len(sigmas) == 0:
        raise ValueError("a denoising probe needs at least one image and one noise level")
    labels = None
    if label_dim:
        if data.labels is None:
            raise ValueError(f"the network is class-conditional but {data.name} has no labels")
        labels = F.one_hot(data.labels[index], label_dim).to(torch.float32)  # [N, L]
    context = data.context[index] if context_dim else None
    return DenoisingProbe(data.float_batch(index), labels, tuple(float(s) for s in sigmas), noise_seed, context)  # latents: posterior means


@torch.no_grad()
def probe_loss(net: torch.nn.Module, loss_fn: EDMLoss, probe: DenoisingProbe, *, batch: int = 256,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Weighted denoising error per noise level of ``probe`` (module docstring), in eval mode (no dropout, no weight update).

    Uses the loss's ``weighted_mse`` (lambda(sigma)-weighted, never the uncertainty-weighted loss), so it
    is comparable with the training statistic ``mse``. The net's train/eval mode is restored.

    Returns:
        [K] float64, mean over images for each sigma_k.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    was_training = net.training
    net.eval()  # forced weight normalization must not touch the weights; dropout off
    try:
        out = torch.zeros(len(probe.sigmas), dtype=torch.float64)
        for k, sigma in enumerate(probe.sigmas):
            noise = probe.noise(k)
            for i in range(0, len(probe.y), batch):
                yb, nb = probe.y[i:i + batch].to(device), noise[i:i + batch].to(device)
                lb = None if probe.labels is None else probe.labels[i:i + batch].to(device)
                model = net if probe.context is None else functools.partial(net, context=probe.context[i:i + batch].to(device))
                _, mse = loss_fn(model, yb, lb, sigma=torch.full((len(yb),), sigma, device=device), noise=nb)
                out[k] += mse.double().sum().item()
        return out / len(probe.y)
    finally:
        net.train(was_training)


def memorization_signal(val_losses: Sequence[float], train_losses: Sequence[float], *, patience: int) -> bool:
    """True when the validation loss rose at each of the last ``patience`` evaluations while the training loss fell over them.

    Args:
        val_losses, train_losses: one value per evaluation, oldest first (the same length).
        patience: number of consecutive rises required (>= 1).
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(val_losses) != len(train_losses):
        raise ValueError(f"{len(val_losses)} validation but {len(train_losses)} training values")
    if len(val_losses) <= patience:
        return False
    v, t = val_losses[-patience - 1:], train_losses[-patience - 1:]
    return all(b > a for a, b in zip(v, v[1:])) and t[-1] < t[0]


def evaluations_since_best(values: Sequence[float], *, higher_is_better: bool = False) -> int:
    """Evaluations after the best one (0 when the newest is the best; ties do not count as improvements).

    ``--stop-when-flat P`` stops once this reaches P: P evaluations in a row without a new best.
    """
    if not values:
        return 0
    sign = -1.0 if higher_is_better else 1.0
    best = min(range(len(values)), key=lambda i: (sign * values[i], i))  # the first occurrence of the best value
    return len(values) - 1 - best


class Validator:
    """The validation loss of a run: one probe on held-out images, the same protocol on as many training images.

    Both probes share the noise levels and the noise, so their difference is the generalisation gap
    at each sigma. ``history`` holds (validation, training) mean losses of past evaluations, oldest first,
    for ``memorization_signal``; a resumed run passes in those read back from ``stats.jsonl``.
    """

    def __init__(self, val_probe: DenoisingProbe, train_probe: DenoisingProbe, loss_fn: EDMLoss, *, patience: int, batch: int,
                 device: torch.device | str = "cpu", history: Sequence[tuple[float, float]] = ()) -> None:
        self.val_probe, self.train_probe, self.loss_fn = val_probe, train_probe, loss_fn
        self.patience, self.batch, self.device = patience, batch, device
        self.history = list(history)

    def evaluate(self, net: torch.nn.Module) -> dict[str, float | bool | int | list[float]]:
        """Losses of ``net`` on both probes, appended to the history; the fields of a ``"val"`` stats record (README)."""
        val = probe_loss(net, self.loss_fn, self.val_probe, batch=self.batch, device=self.device)  # [K]
        train = probe_loss(net, self.loss_fn, self.train_probe, batch=self.batch, device=self.device)  # [K]
        self.history.append((val.mean().item(), train.mean().item()))
        flag = memorization_signal([v for v, _ in self.history], [t for _, t in self.history], patience=self.patience)
        return {"loss": self.history[-1][0], "train_loss": self.history[-1][1], "sigma": list(self.val_probe.sigmas),
                "loss_per_sigma": val.tolist(), "train_loss_per_sigma": train.tolist(), "n_images": len(self.val_probe.y),
                "memorization": flag}


def make_validator(cfg: ExperimentConfig, train_data: ImageDataset, val_data: ImageDataset, loss_fn: EDMLoss, *,
                   device: torch.device | str = "cpu", history: Sequence[tuple[float, float]] = ()) -> Validator:
    """The validator of a run: all held-out images, an equal number of fixed training picks, ``train.val_sigmas`` levels."""
    t = cfg.train
    n = min(len(val_data), len(train_data))
    train_pick = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(t.seed))[:n]
    sigmas = loss_fn.sigma_quantiles(t.val_sigmas)
    probes = [make_probe(d, idx, label_dim=cfg.network.label_dim, sigmas=sigmas, noise_seed=t.seed, context_dim=cfg.network.context_dim)
              for d, idx in ((val_data, torch.arange(len(val_data))), (train_data, train_pick))]
    return Validator(*probes, loss_fn, patience=t.val_patience, batch=t.batch, device=device, history=history)
