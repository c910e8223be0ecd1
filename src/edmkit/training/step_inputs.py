"""The random inputs of one training step and the rows each process trains on.

Every random number of step ``k`` comes from generators seeded by ``(seed, k)`` (``step_seed``): sigma, noise and label
dropout from the step's generator, augmentation and cascade SR conditioning from generators of their own, so turning one
on leaves the others' draws unchanged and a resumed run retraces an uninterrupted one bit for bit. Draws are made for
the whole global batch and each process keeps its rows (``Shard``): what is trained on does not depend on the number of
processes or accumulation rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from edmkit.config import ExperimentConfig
from edmkit.data.augment import apply_augment, augment_params
from edmkit.diffusion.loss import IMPORTANCE_BINS, EDMLoss, SigmaLossHistory, adaptive_probs, sample_binned
from edmkit.diffusion.precond import Denoiser
from edmkit.sampling.cascade import training_condition


def step_seed(seed: int, step: int, chunk: int = 0) -> int:
    """Seed of training step ``step`` (and of micro-batch ``chunk`` of its global batch, for the global RNG)."""
    return (seed * 1_000_003 + step + (chunk << 40)) % 2**63


def step_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator for all noise of one training step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


@dataclass(frozen=True)
class Shard:
    """This process's rows of the global batch, and how they are split into accumulation rounds.

    The global batch of ``batch`` images is cut into ``rounds * world`` micro-batches of ``size`` rows; in round r,
    rank k trains on rows [(r * world + k) * size, ... + size). Every rank draws the noise of the whole global batch
    from the step's generator and keeps its rows, so what is trained on does not depend on the number of processes.
    """

    batch: int     # global batch (images per optimizer step)
    size: int      # micro-batch: images per process per forward/backward
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or self.batch % (self.size * self.world):
            raise ValueError(f"the batch of {self.batch} images cannot be split into micro-batches of {self.size} on {self.world} "
                             f"process(es): it must be a multiple of batch_per_device x processes")

    @property
    def rounds(self) -> int:
        """Micro-batches per process per step (gradient accumulation)."""
        return self.batch // (self.size * self.world)

    def rows(self) -> torch.Tensor:
        """Global-batch rows this rank trains on, round after round: int64 [rounds * size]."""
        return torch.cat([torch.arange(self.size) + (r * self.world + self.rank) * self.size for r in range(self.rounds)])


def make_shard(cfg: ExperimentConfig, *, rank: int, world: int) -> Shard:
    """The Shard of ``rank`` of ``world``: micro-batches of ``train.batch_per_device`` (0: batch / world, no accumulation)."""
    t = cfg.train
    if not t.batch_per_device and t.batch % world:
        raise ValueError(f"--batch {t.batch} cannot be split evenly over {world} processes; use a multiple of {world}")
    return Shard(batch=t.batch, size=t.batch_per_device or t.batch // world, rank=rank, world=world)


def drop_labels(labels: torch.Tensor, *, p_uncond: float, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): zero each row with probability p_uncond.

    Args:
        labels: [B, L] one-hot labels.
        p_uncond: probability in [0, 1] that a row becomes all zeros (the unconditional label).
        generator: source of the B uniform draws (the step's generator, so resume stays bit-exact).

    Returns:
        [B, L] labels with the dropped rows zeroed.
    """
    return labels * label_keep_mask(labels.shape[0], p_uncond=p_uncond, generator=generator, device=labels.device)[:, None].to(labels.dtype)


def label_keep_mask(n: int, *, p_uncond: float, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] bool: which label rows survive label dropout (u >= p_uncond, u ~ U[0, 1))."""
    return torch.rand(n, generator=generator, device=device) >= p_uncond


class StepNoise(NamedTuple):
    """The noise draws of one step for this rank's rows (``weight`` and ``bins`` only with importance-sampled sigma)."""

    sigma: torch.Tensor                  # [n] noise levels
    noise: torch.Tensor                  # [n, C, H, W] unit Gaussian noise
    labels: torch.Tensor | None          # [n, L] labels after dropout
    weight: torch.Tensor | None = None   # [n] importance loss weights p_base / p (``sample_binned``)
    bins: torch.Tensor | None = None     # [batch] sigma bin of every row of the global batch, for the history update
    context: torch.Tensor | None = None  # [n, L, D] context tokens after dropout (dropped rows: zeros, the null context)


def sigma_bin_probs(cfg: ExperimentConfig, loss_fn: EDMLoss, net: Denoiser, history: SigmaLossHistory | None) -> torch.Tensor | None:
    """[K] probabilities of the sigma bins this step draws from: ``importance`` the loss history's, ``adaptive`` fitted
    from the network's u(sigma) at the bin midpoints; None for independent / stratified draws. The same on every rank
    (same history, same weights)."""
    if cfg.loss.sigma_sampling == "importance":
        return history.probs()
    if cfg.loss.sigma_sampling == "adaptive":
        return adaptive_probs(net.logvar_at(loss_fn.sigma_quantiles(IMPORTANCE_BINS)))
    return None


def step_noise(loss_fn: EDMLoss, cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor,
               labels: torch.Tensor | None, *, bin_probs: torch.Tensor | None = None, context: torch.Tensor | None = None) -> StepNoise:
    """Sigma [n], unit noise [n, C, H, W], dropped-out labels [n, L] and context [n, L_ctx, D] for this rank's rows ``y``.

    Dropout (``p_uncond``, for classifier-free guidance) zeroes the same rows of the labels and the context: a dropped
    row is the fully unconditional input, the branch CFG guides away from.

    Drawn for the whole global batch from the step's generator, then this rank's rows are kept: the same numbers
    whatever the number of processes or accumulation rounds. With ``bin_probs`` (:func:`sigma_bin_probs`) sigma comes
    from those bins of the base density, with the loss weights that keep the objective (``sample_binned``).
    """
    g = step_generator(cfg.train.seed, step, y.device)
    rows = shard.rows().to(y.device)
    weight = bins = None
    if bin_probs is None:
        sigma = loss_fn.sample_sigma(shard.batch, generator=g, device=y.device)[rows]
    else:
        sigma, weight, bins = sample_binned(bin_probs, shard.batch, sigma_at=loss_fn.sigma_at, generator=g, device=y.device)
        sigma, weight = sigma[rows], weight[rows]
    noise = torch.randn((shard.batch, *y.shape[1:]), generator=g, device=y.device)[rows]
    if (labels is not None or context is not None) and cfg.loss.p_uncond > 0:  # drawn after sigma and noise: runs without dropout are unchanged
        keep = label_keep_mask(shard.batch, p_uncond=cfg.loss.p_uncond, generator=g, device=y.device)[rows]
        labels = None if labels is None else labels * keep[:, None].to(labels.dtype)
        context = None if context is None else context * keep[:, None, None].to(context.dtype)
    return StepNoise(sigma, noise, labels, weight, bins, context)


AUGMENT_CHUNK = 2**22 - 1  # step_seed chunk of the augmentation generator: far above any micro-batch index


def step_augment(cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-leaky augmentation of this rank's rows ``y`` [n, C, H, W] (EDM App. C): (augmented y, augment labels [n, A]).

    The parameters are drawn for the whole global batch from their own generator of (seed, step), so the sigma, noise
    and label-dropout draws are the same with or without augmentation and resume stays exact. p = 0: (y, None).
    """
    if cfg.train.augment_p <= 0:
        return y, None
    g = torch.Generator(device=y.device).manual_seed(step_seed(cfg.train.seed, step, AUGMENT_CHUNK))
    params = augment_params(shard.batch, p=cfg.train.augment_p, generator=g, device=y.device, resolution=y.shape[-1])
    params = params[shard.rows().to(y.device)]
    return apply_augment(y, params), params


SR_CHUNK = AUGMENT_CHUNK - 1  # step_seed chunk of the cascade SR generator (noise-conditioning augmentation)


def step_sr_condition(cfg: ExperimentConfig, step: int, shard: Shard, y: torch.Tensor,
                      augment_labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Cascade SR (``train.task == "sr"``): the noise-augmented low-res conditioning image [n, C, H, W] of this rank's rows
    ``y`` and the augment labels with the sigma_aug column appended (``cascade.training_condition``), from their own generator
    of (seed, step) so the other draws are unchanged and resume stays exact. Task generate: (None, augment_labels)."""
    if cfg.train.task != "sr":
        return None, augment_labels
    g = torch.Generator(device=y.device).manual_seed(step_seed(cfg.train.seed, step, SR_CHUNK))
    return training_condition(y, scale=cfg.train.sr_scale, sigma_max=cfg.train.sr_aug_max, generator=g, batch=shard.batch,
                              rows=shard.rows().to(y.device), augment_labels=augment_labels)
