"""Turn a denoiser and a list of seeds into images, batch by batch.

Image k depends only on ``seeds[k]`` (per-sample seeded noise), never on the batch size or on how
the seeds are split across processes.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit.samplers import SeededRandn, get_sampler
from edmkit.schedules import karras_sigmas


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-63"``, ``"1,5,9"`` or ``"0-9,20-29"`` into a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"cannot parse seeds {text!r}; use e.g. 0-63 or 1,5,9") from None
    if not seeds:
        raise ValueError("no seeds given")
    return seeds


@torch.no_grad()
def generate_images(
    denoiser: Callable,
    *,
    seeds: Sequence[int],
    resolution: int,
    channels: int,
    label_dim: int = 0,
    class_idx: int | None = None,
    sampler: str = "heun",
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    batch: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Callable | None = None,
    **sampler_kw,
) -> torch.Tensor:
    """Sample one image per seed; returns float32 [len(seeds), C, H, W] in roughly [-1, 1] on the CPU.

    Labels: with ``label_dim > 0`` and ``class_idx=None`` each image draws its class from its own seed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if class_idx is not None and not (label_dim and 0 <= class_idx < label_dim):
        raise ValueError(f"class {class_idx} out of range: the model has {label_dim} classes" if label_dim else "the model is unconditional; it takes no class")
    sample = get_sampler(sampler)
    sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device)
    out = []
    for start in tqdm(range(0, len(seeds), batch), disable=not progress, desc="generate", unit="batch"):
        batch_seeds = list(seeds[start:start + batch])
        rnd = SeededRandn(batch_seeds, device=device)
        noise = rnd.randn([channels, resolution, resolution])
        labels = None
        if label_dim:
            if class_idx is None:  # class drawn from the image's own seed, so it too is batch-independent
                idx = torch.tensor([int(np.random.default_rng([int(s), 1]).integers(label_dim)) for s in batch_seeds])
            else:
                idx = torch.full([len(batch_seeds)], class_idx)
            labels = F.one_hot(idx, label_dim).to(device=device, dtype=torch.float32)
        kw = dict(sampler_kw)
        if "randn" in inspect.signature(sample).parameters:
            kw.setdefault("randn", rnd)  # stochastic samplers draw per-sample seeded noise too
        x = sample(denoiser, noise, sigmas, labels=labels, callback=callback, **kw)
        out.append(x.to("cpu", torch.float32))
    return torch.cat(out)
