"""Turn a denoiser and a list of seeds into images, batch by batch.

Image k depends only on ``seeds[k]`` (per-sample seeded noise), never on the batch size or on how
the seeds are split across processes.

Guidance options (weight, guide model, interval, oscillation, thresholding) become one sampling
denoiser in :func:`guided_denoiser`, shared by ``edmkit generate`` and the Python API.
"""

from __future__ import annotations

import functools
import inspect
import re
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edmkit.checkpoint import find_network, load_network, read_network_metadata
from edmkit.config import ExperimentConfig, NetworkConfig
from edmkit.diffusion.guidance import (
    classifier_free,
    classifier_guided,
    dynamic_threshold,
    guidance_interval,
    guided,
    oscillating,
)
from edmkit.diffusion.samplers import Denoiser, SeededRandn, get_sampler
from edmkit.diffusion.schedules import sigma_schedule


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-63"``, ``"1,5,9"`` or ``"0-9,20-29"`` into a list of non-negative seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"cannot parse seeds {text!r}; use e.g. 0-63 or 1,5,9")
        seeds.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return seeds


def parse_pair(text: str, *, name: str) -> tuple[float, float]:
    """Parse ``"LO,HI"`` (two numbers separated by a comma) for options such as ``--interval``."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"cannot parse {name} {text!r}; give two numbers as A,B") from None


def sampling_sigmas(
    schedule: str, steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The σ grid of a named schedule: ``karras`` (EDM Eq. 5), ``loglinear`` or ``vp`` (DDPM timesteps).

    ``vp`` has its own σ range (set by the DDPM β schedule) and ignores sigma_min, sigma_max and rho.

    Returns:
        [steps + 1] float32, decreasing, ending in 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    kw: dict = {}
    if schedule in ("karras", "loglinear"):
        kw = dict(sigma_min=sigma_min, sigma_max=sigma_max)
    if schedule == "karras":
        kw["rho"] = rho
    return sigma_schedule(schedule, steps, device=device, **kw)


def _describe(c: NetworkConfig) -> str:
    return f"{c.resolution}x{c.resolution}x{c.channels}, {c.label_dim or 'no'} classes"


def check_guide(main: NetworkConfig, guide: NetworkConfig, *, name: str = "guide") -> None:
    """Refuse a guide network that does not denoise the same images (or clips): resolution, channels, classes."""
    if bool(main.frames) != bool(guide.frames):  # a video model's guide denoises clips too (any training length)
        raise ValueError(f"{name} denoises {'clips' if guide.frames else 'images'} but the model {'clips' if main.frames else 'images'}")
    if (main.resolution, main.channels, main.label_dim) != (guide.resolution, guide.channels, guide.label_dim):
        raise ValueError(f"{name} is {_describe(guide)} but the model is {_describe(main)}: "
                         "a guide must match the model's resolution, channels and classes")


def load_guide(source: str | Path, *, like: NetworkConfig, ema_std: float | None = None,
               device: torch.device | str = "cpu", encoder: dict | None = None) -> Denoiser:
    """Load an autoguidance guide (a network file or run folder), checked against the main model's config.

    Args:
        source: network .safetensors file, or a run folder (its newest network with ``ema_std``).
        like: network config of the model being guided.
        ema_std: with a run folder, the EMA profile to use (default: the run's sampling EMA).
        device: where to load it.
        encoder: the main model's encoder spec (None: pixels); the guide must work in the same space.

    Returns:
        The guide denoiser in eval mode.
    """
    path = find_network(source, ema_std=ema_std)
    meta = read_network_metadata(path)
    check_guide(like, meta["config"].network, name=f"guide {path}")
    if same_space(meta["encoder"]) != same_space(encoder):
        raise ValueError(f"guide {path} works in another space than the model ({(meta['encoder'] or {}).get('kind', 'pixels')} vs "
                         f"{(encoder or {}).get('kind', 'pixels')}): a guide must denoise the same latents")
    return load_network(path, device=device, latent=True)[0]


def same_space(spec: dict | None) -> tuple:
    """What identifies an encoder's space (kind and constants; not where its files lie)."""
    if spec is None or spec.get("kind") == "pixels":
        return ("pixels",)
    return tuple(sorted((k, str(v)) for k, v in spec.items() if k not in ("path", "batch_size")))


def guided_denoiser(
    denoiser: Denoiser,
    *,
    sigmas: torch.Tensor,
    label_dim: int,
    guide: Denoiser | None = None,
    guidance: float = 1.0,
    interval: tuple[float, float] | None = None,
    oscillate: tuple[float, float] | None = None,
    oscillate_warmup: int = 0,
    threshold: float | None = None,
    classifier: Callable | None = None,
    classifier_scale: float = 0.0,
    classifier_class: int | None = None,
    context: torch.Tensor | None = None,
) -> Denoiser:
    """The denoiser a sampler runs, built from the guidance options (the one place they are combined).

    D_w = D_guide + w·(D_main − D_guide) (see :mod:`edmkit.diffusion.guidance`), where the guide is `guide`
    (autoguidance, Karras et al. 2024) or, without one, the model's own unconditional branch with
    zero labels (classifier-free guidance, Ho & Salimans 2022; needs a class-conditional model).
    w is `guidance`, or the Imagen Video schedule `oscillate` = (high, low) cycled per step after
    `oscillate_warmup` steps at the higher one; `interval` = (σ_lo, σ_hi] restricts it to those
    noise levels (Kynkäänniemi et al. 2024). `threshold` applies dynamic thresholding (Imagen) to
    the result. Without guidance (w = 1, no oscillation) the model itself is used, bit-exactly.
    `classifier` adds classifier guidance D + s·σ²·∇_x log p(y | x, σ) (Dhariwal & Nichol 2021) on top
    of the (CFG / autoguided) denoiser, before thresholding; s = `classifier_scale`, y = `classifier_class`
    or the labels' class.

    Args:
        denoiser: the model D(x; σ, labels).
        sigmas: [steps + 1] the sampler's σ grid (the oscillation counts its steps).
        label_dim: number of classes of the model (0 = unconditional).
        guide: weaker model of the same images for autoguidance, or None.
        guidance: weight w >= 0; 1 = unguided.
        interval: (σ_lo, σ_hi) or None for all noise levels.
        oscillate: (w_high, w_low) or None; excludes `guidance`.
        oscillate_warmup: number of initial steps at max(oscillate).
        threshold: dynamic-thresholding percentile p in (0, 1], or None.
        classifier: (x, sigma) -> logits [N, K] of a noise-aware classifier, or None.
        classifier_scale: s >= 0 (0 = no classifier guidance).
        classifier_class: class y of every image; None = the labels' class (needs a conditional model).
        context: [N, L, D] cross-attention tokens of the images (the model's, and an autoguidance guide's); CFG's
            unconditional branch gets the null context. None: no context.

    Returns:
        Denoiser ``(x [N,C,H,W], sigma [N], labels [N,L] | None) -> [N,C,H,W]``.
    """
    if oscillate is not None and guidance != 1:
        raise ValueError("give a guidance weight or an oscillating schedule, not both")
    if oscillate is None and oscillate_warmup:
        raise ValueError("oscillate_warmup needs an oscillating schedule (oscillate=(high, low))")
    weight = guidance
    if oscillate is not None:
        weight = oscillating(tuple(oscillate), sigmas=sigmas, warmup_steps=oscillate_warmup)
    if interval is not None:
        weight = guidance_interval(weight, sigma_lo=interval[0], sigma_hi=interval[1])
    guiding = oscillate is not None or guidance != 1
    if guiding and guide is None and not label_dim and context is None:
        raise ValueError("guidance needs a class-conditional model or a context (for its unconditional branch), or a guide model (autoguidance)")
    if guiding and guide is None:
        denoiser = classifier_free(denoiser, weight, context=context)
    elif context is not None:
        denoiser, guide = (None if d is None else functools.partial(d, context=context) for d in (denoiser, guide))
    if guiding and guide is not None:
        denoiser = guided(denoiser, guide, weight)
    if classifier_scale < 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {classifier_scale}")
    if classifier_scale > 0:
        if classifier is None:
            raise ValueError("classifier guidance (classifier_scale > 0) needs a classifier")
        if classifier_class is None and not label_dim:
            raise ValueError("classifier guidance of an unconditional model needs a class (classifier_class / --class)")
        denoiser = classifier_guided(denoiser, classifier, scale=classifier_scale, class_idx=classifier_class)
    if threshold is not None:
        denoiser = dynamic_threshold(denoiser, percentile=threshold)
    return denoiser


GUIDANCE_OPTIONS = frozenset(inspect.signature(guided_denoiser).parameters) - {"denoiser", "sigmas", "label_dim", "context"}


def load_context(path: str | Path, *, num_images: int, context_dim: int) -> torch.Tensor:
    """Cross-attention context for ``generate --context``: a .npy array, or an .npz's ``context`` array, of [L, D]
    (the same tokens for every image) or [num_images, L, D] (one sequence per seed, in seed order). Returns float32."""
    path = Path(path)
    if not context_dim:
        raise ValueError(f"--context {path}: this model has no cross-attention (context_dim = 0)")
    try:
        array = np.load(path, allow_pickle=False)
        if isinstance(array, np.lib.npyio.NpzFile):
            with array as npz:
                if "context" not in npz.files:
                    raise ValueError(f"arrays {', '.join(npz.files)}")
                array = npz["context"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"--context {path}: not a readable .npy, or .npz with a 'context' array ({e})") from None
    if array.ndim not in (2, 3) or array.shape[-1] != context_dim or (array.ndim == 3 and len(array) != num_images):
        raise ValueError(f"--context {path}: shape {array.shape} is neither [L, {context_dim}] nor [{num_images} images, L, {context_dim}]")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)) or not np.isfinite(array).all():
        raise ValueError(f"--context {path}: context must be finite real numbers, got {array.dtype}")
    return torch.from_numpy(array.astype(np.float32))


def class_labels(seeds: Sequence[int], *, label_dim: int, class_idx: int | None, device: torch.device | str) -> torch.Tensor:
    """One-hot labels [N, label_dim]: `class_idx` for all, or a class drawn from each image's own seed."""
    if class_idx is None:  # drawn from the image's own seed, so it too is batch-independent
        idx = torch.tensor([int(np.random.default_rng([int(s), 1]).integers(label_dim)) for s in seeds])
    else:
        idx = torch.full([len(seeds)], class_idx)
    return F.one_hot(idx, label_dim).to(device=device, dtype=torch.float32)


def _check_sampler_options(sample: Callable, name: str, options: dict) -> None:
    """Turn an option that is neither a guidance option nor one the chosen sampler takes into a ValueError (not a TypeError)."""
    params = set(inspect.signature(sample).parameters) - {"denoiser", "noise", "sigmas", "labels", "callback"}
    unknown = sorted(set(options) - params)
    if unknown:
        valid = ", ".join(sorted(params - {"randn"})) or "no options"
        raise ValueError(f"sampler {name!r} does not take {', '.join(unknown)} (it takes: {valid}; guidance options: "
                         f"{', '.join(sorted(GUIDANCE_OPTIONS))})")


STOCHASTICITY = ("S_churn", "S_tmin", "S_tmax", "S_noise", "eta")  # the options TrainConfig.sampler_options sets


def run_sampling(cfg: ExperimentConfig, sampler: str | None = None, steps: int | None = None, given: dict[str, float] | None = None,
                 schedule: str | None = None) -> dict:
    """Sampler, steps, schedule and options of a sampling command (``generate_images`` keywords): the run's own setting
    (``TrainConfig.sampling``: what its preset measured best) for what is not given. Another sampler than the run's
    takes only the ``given`` options (and 18 steps on the Karras grid unless given); any stochasticity option given
    replaces the run's."""
    t, given = cfg.train, dict(given or {})
    if sampler is not None and sampler != t.sample_sampler:
        return dict(sampler=sampler, steps=18 if steps is None else steps, schedule=schedule or "karras", **given)
    own = {} if any(k in given for k in STOCHASTICITY) else t.sampler_options()
    return dict(sampler=t.sample_sampler, steps=t.sample_steps if steps is None else steps, schedule=schedule or t.sample_schedule,
                **{**own, **given})


def describe_sampling(setting: dict) -> str:
    """One line for a sampling setting, e.g. 'dpmpp-2m, 11 steps, eta 1' or 'heun, 18 steps, S_churn 10 in [0.05, 10], S_noise 1.003'."""
    parts = [setting["sampler"], f"{setting['steps']} steps"]
    if setting.get("schedule", "karras") != "karras":
        parts.append(f"{setting['schedule']} sigmas")
    if setting.get("S_churn"):
        parts.append(f"S_churn {setting['S_churn']:g} in [{setting.get('S_tmin', 0):g}, {setting.get('S_tmax', float('inf')):g}], "
                     f"S_noise {setting.get('S_noise', 1):g}")
    if setting.get("eta"):
        parts.append(f"eta {setting['eta']:g}")
    return ", ".join(parts)


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
    schedule: str = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    batch: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Callable | None = None,
    context: torch.Tensor | None = None,
    frames: int = 0,
    **options,
) -> torch.Tensor:
    """Sample one image per seed; returns float32 [len(seeds), C, H, W] in roughly [-1, 1] on the CPU.

    Video networks: ``frames`` > 0 samples one clip per seed, [len(seeds), C, frames, H, W] (any length the network takes).

    Labels: with ``label_dim > 0`` and ``class_idx=None`` each image draws its class from its own seed.
    Context (cross-attention models): [L, D] tokens for every image or [len(seeds), L, D] one sequence per seed.
    `options` are guidance options — the keywords of :func:`guided_denoiser` (guidance, guide, interval,
    oscillate, oscillate_warmup, threshold, classifier, classifier_scale, classifier_class) — and options of
    the chosen sampler (heun: S_churn, S_tmin, S_tmax, S_noise; ddim: eta). A `guide` passed here is not checked
    against the model (use :func:`load_guide`, which is), nor is a `classifier` (use
    ``edmkit.checkpoint.check_classifier``). `callback` gets the sampler's step dict
    plus ``start``, the index of the batch's first image in `seeds`.
    """
    if class_idx is not None and not (label_dim and 0 <= class_idx < label_dim):
        raise ValueError(f"class {class_idx} out of range: the model has {label_dim} classes (0-{label_dim - 1})"
                         if label_dim else "the model is unconditional; it takes no class")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    guidance_kw = {k: v for k, v in options.items() if k in GUIDANCE_OPTIONS}
    sampler_kw = {k: v for k, v in options.items() if k not in GUIDANCE_OPTIONS}
    sample = get_sampler(sampler)
    _check_sampler_options(sample, sampler, sampler_kw)
    sigmas = sampling_sigmas(schedule, steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device)
    if context is not None and context.ndim == 3 and len(context) != len(seeds):
        raise ValueError(f"context has {len(context)} sequences for {len(seeds)} seeds: give [L, D] or one [L, D] per seed")
    denoise = guided_denoiser(denoiser, sigmas=sigmas, label_dim=label_dim, **guidance_kw) if context is None else None
    out = []
    for start in tqdm(range(0, len(seeds), batch), disable=not progress, desc="generate", unit="batch"):
        batch_seeds = list(seeds[start:start + batch])
        rnd = SeededRandn(batch_seeds, device=device)
        noise = rnd.randn([channels, *((frames,) if frames else ()), resolution, resolution])
        labels = class_labels(batch_seeds, label_dim=label_dim, class_idx=class_idx, device=device) if label_dim else None
        if context is not None:  # the batch's tokens bound into the denoiser (CFG: the null context in its other branch)
            tokens = context.expand(len(batch_seeds), *context.shape) if context.ndim == 2 else context[start:start + batch]
            denoise = guided_denoiser(denoiser, sigmas=sigmas, label_dim=label_dim, context=tokens.to(device), **guidance_kw)
        kw = dict(sampler_kw)
        if "randn" in inspect.signature(sample).parameters:
            kw.setdefault("randn", rnd)  # stochastic samplers draw per-sample seeded noise too
        step_callback = None if callback is None else functools.partial(_with_start, callback, start)
        x = sample(denoise, noise, sigmas, labels=labels, callback=step_callback, **kw)
        out.append(x.to("cpu", torch.float32))
    return torch.cat(out)


def _with_start(callback: Callable[[dict], None], start: int, info: dict) -> None:
    callback({**info, "start": start})
