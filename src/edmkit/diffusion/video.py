"""Conditional video sampling: temporal extension, frame interpolation, per-frame super-resolution, long videos.

Clips are float tensors [N, C, T, H, W] in [-1, 1]; a denoiser is any callable D(x [N,C,T,H,W], σ [N], labels) -> same shape.
Everything is built from :mod:`edmkit.diffusion.inverse`'s combinators (:func:`~edmkit.diffusion.inverse.projected`,
:func:`~edmkit.diffusion.inverse.manifold_constrained`, :func:`~edmkit.diffusion.inverse.measurement_noise`) and the
operators of :mod:`edmkit.diffusion.operators`, so every sampler works unchanged.

Symbols (Video Diffusion Models, Ho et al. 2022, Sec. 3.1; EDM's pixel scale x = y + σ·n):
    a, b          the known ("conditioning") and the new frames; m = 1 on a, 0 on b.
    x^a           the measurement: the known frames (extension, interpolation) or their low-res versions (per-frame SR).
    A, A⁺, P      measurement operator, its pseudo-inverse and P = A⁺A: the frame mask (A = A⁺ = P = m·), or the
                  per-frame box downsample / nearest upsample / box low-pass.
    w_r           VDM's reconstruction-guidance weight.

VDM Eq. 7 in EDM space. VDM writes z_t = α_t·x + σ_t·ε and guides the new frames with
    x̃^b = x̂^b(z_t) − (w_r·α_t/2)·∇_{z^b}‖x^a − x̂^a(z_t)‖².
EDM's variable is x = z/α (σ = σ_t/α_t), so ∇_z = ∇_x/α and the α's cancel: in EDM's σ-parametrisation (α = 1)
    D'^b(x; σ) = D^b(x; σ) − (w_r/2)·∇_{x^b}‖x^a − A(D(x; σ))‖²,
at every σ: :func:`~edmkit.diffusion.inverse.reconstruction_guided` with ζ = w_r/2. On the known frames the
output is replaced by the measurement (D'^a = x^a: :func:`~edmkit.diffusion.inverse.projected`), so the gradient
moves only the new frames; the two composed are :func:`~edmkit.diffusion.inverse.manifold_constrained`
(:func:`frames_guided`). w_r = 0 is plain replacement ("conditional sampling by imputation", VDM's baseline).

Autoregressive long videos (:func:`sample_long`): the first window is sampled freely, each next window is a
temporal extension whose first k frames are the previous window's last k.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from edmkit.diffusion.inverse import manifold_constrained, measurement_noise, projected
from edmkit.diffusion.operators import Operator, check_scale, downsample, mask_operator, upsample
from edmkit.diffusion.samplers import Callback, Denoiser, Randn, with_randn


def check_clip(x: Tensor, *, name: str = "clip") -> Tensor:
    """Raise ValueError unless `x` is a 5-D clip tensor [N, C, T, H, W]; returns it."""
    if x.ndim != 5:
        raise ValueError(f"{name} must be [N, C, T, H, W] (5-D), got shape {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class Measurement:
    """What a conditioning task knows about a clip, in the form :mod:`edmkit.diffusion.inverse` uses.

    ``y`` is A's output (the measurement), ``y_full`` = A⁺(y) shaped like the clip, ``operator`` = A, ``project`` = A⁺A.
    """

    y: Tensor
    y_full: Tensor
    operator: Operator
    project: Operator


def frame_mask(frames: int, known: list[int] | tuple[int, ...] | range) -> Tensor:
    """0/1 mask [1, 1, T, 1, 1] of the known frames (1 = known).

    Args:
        frames: T, the clip length.
        known: indices of the known frames, each in [0, T).
    """
    idx = sorted({int(i) for i in known})
    if not idx:
        raise ValueError("no known frames: nothing to condition on")
    if idx[0] < 0 or idx[-1] >= frames:
        raise ValueError(f"known frame indices must be in [0, {frames}), got {idx}")
    if len(idx) == frames:
        raise ValueError(f"all {frames} frames are known: nothing to sample")
    m = torch.zeros(1, 1, frames, 1, 1)
    m[:, :, idx] = 1.0
    return m


def extension(clip: Tensor, *, frames: int) -> Measurement:
    """Temporal extension: the k frames of `clip` [N, C, k, H, W] are the first k of a clip of `frames` frames."""
    k = check_clip(clip).shape[2]
    if frames <= k:
        raise ValueError(f"extension needs more frames ({frames}) than the known clip has ({k})")
    return masked(clip, frame_mask(frames, range(k)), at=list(range(k)))


def interpolation(clip: Tensor, *, every: int) -> Measurement:
    """Frame interpolation: `clip` [N, C, K, H, W] holds frames 0, s, 2s, … of a clip of (K − 1)·s + 1 frames (s = `every`)."""
    k = check_clip(clip).shape[2]
    if not isinstance(every, int) or every < 2:
        raise ValueError(f"interpolation needs every >= 2 (known frames s apart), got {every!r}")
    if k < 2:
        raise ValueError(f"interpolation needs at least 2 known frames, got {k}")
    at = list(range(0, (k - 1) * every + 1, every))
    return masked(clip, frame_mask(at[-1] + 1, at), at=at)


def masked(clip: Tensor, mask: Tensor, *, at: list[int]) -> Measurement:
    """The measurement A(x) = m ⊙ x of known frames `clip` [N, C, K, H, W] placed at indices `at` of a masked clip."""
    n, c, _, h, w = clip.shape
    y_full = clip.new_zeros(n, c, mask.shape[2], h, w)
    y_full[:, :, at] = clip.to(y_full)
    mask = mask.to(clip)
    return Measurement(y=y_full, y_full=y_full, operator=mask_operator(mask), project=mask_operator(mask))


def per_frame(op: Operator) -> Operator:
    """Lift an image operator [N, C, H, W] -> [N, C, h, w] to clips [N, C, T, H, W] -> [N, C, T, h, w] (frames into the batch)."""

    def apply(x: Tensor) -> Tensor:
        n, t = x.shape[0], x.shape[2]
        y = op(x.transpose(1, 2).flatten(0, 1))  # [N·T, C, h, w]
        return y.unflatten(0, (n, t)).transpose(1, 2)

    return apply


def frame_super_resolution(low_res: Tensor, *, scale: int) -> Measurement:
    """Per-frame super-resolution: every frame of `low_res` [N, C, T, h, w] is the s×s box average of the clip's frame."""
    check_clip(low_res, name="low-res clip")
    check_scale(low_res.shape[-1] * scale, scale)
    down = per_frame(partial(downsample, scale=scale))
    return Measurement(y=low_res, y_full=upsample(low_res, scale=scale), operator=down,
                       project=lambda x: upsample(down(x), scale=scale))


def frames_guided(denoiser: Denoiser, measurement: Measurement, *, w_r: float) -> Denoiser:
    """Reconstruction guidance in EDM space (VDM, Ho et al. 2022, Eq. 7 with α = 1) plus replacement of the known part.

    D'(x) = Π(D(x) − (w_r/2)·∇_x‖A(D(x)) − x^a‖²), Π(v) = v − P(v) + A⁺(x^a): on the new frames the Eq. 7
    estimate x̃^b, on the known ones (P's range) the measurement itself. VDM's α_t cancels against
    ∇_z = ∇_x/α (module docstring), so ζ = w_r/2 at every σ. w_r = 0 is plain replacement.

    Args:
        denoiser: D(x; σ) on clips [N, C, T, H, W] (differentiable in x when w_r > 0).
        measurement: from :func:`extension`, :func:`interpolation` or :func:`frame_super_resolution`.
        w_r: guidance weight >= 0.

    Returns:
        Denoiser returning float32 [N, C, T, H, W].
    """
    if w_r < 0:
        raise ValueError(f"w_r must be >= 0, got {w_r}")
    m = measurement
    if w_r == 0:  # no gradient needed: plain replacement, usable under torch.inference_mode()
        return projected(denoiser, y_full=m.y_full, project=m.project)
    return manifold_constrained(denoiser, y=m.y, operator=m.operator, y_full=m.y_full, project=m.project, alpha=w_r / 2)


def sample_conditioned(
    sample: Callable[..., Tensor],
    denoiser: Denoiser,
    measurement: Measurement,
    *,
    noise: Tensor,
    sigmas: Tensor,
    w_r: float = 0.0,
    labels: Tensor | None = None,
    randn: Randn | None = None,
    callback: Callback | None = None,
    **sampler_kw,
) -> Tensor:
    """Sample the new frames of a clip given a measurement, with any sampler (replacement + w_r guidance).

    The start is :func:`~edmkit.diffusion.inverse.measurement_noise`, so the known part follows x^a + σ·ε at
    every step and equals the measurement exactly at σ = 0 (extension / interpolation: the known frames bit-exact).

    Args:
        sample: a sampler of the :mod:`edmkit.diffusion.samplers` contract.
        denoiser: D(x; σ) on clips.
        measurement: what is known (see :func:`frames_guided`).
        noise: [N, C, T, H, W] unit Gaussian noise; sets the output shape.
        sigmas: [steps + 1] decreasing grid ending in 0.
        w_r: reconstruction-guidance weight (0: replacement only; no gradients needed).
        labels, randn, callback, **sampler_kw: passed to `sample` (randn only to samplers that take it).

    Returns:
        [N, C, T, H, W] float32 clips.
    """
    check_clip(noise, name="noise")
    if measurement.y_full.shape[1:] != noise.shape[1:] or measurement.y_full.shape[0] not in (1, noise.shape[0]):
        raise ValueError(f"the measurement describes clips {tuple(measurement.y_full.shape)}, the noise is {tuple(noise.shape)} "
                         "(N, C, T, H, W must agree)")
    sampler_kw = with_randn(sample, sampler_kw, randn)
    conditioned = frames_guided(denoiser, measurement, w_r=w_r)
    start = measurement_noise(noise, y_full=measurement.y_full, sigma_start=float(sigmas[0]))
    with torch.no_grad():  # the guidance turns grad on inside its denoiser
        return sample(conditioned, start, sigmas, labels=labels, callback=callback, **sampler_kw)


def window_starts(total: int, *, window: int, overlap: int) -> list[int]:
    """First frame of each window of autoregressive sampling: 0, then steps of window − overlap, the last one ending at `total`."""
    if not 0 < overlap < window:
        raise ValueError(f"overlap must be in [1, window - 1] = [1, {window - 1}], got {overlap}")
    if total < window:
        raise ValueError(f"total frames ({total}) must be at least one window ({window})")
    starts = list(range(0, total - window + 1, window - overlap))
    if starts[-1] + window < total:  # a last window aligned to the end overlaps the previous one by more than k
        starts.append(total - window)
    return starts


def sample_long(
    sample: Callable[..., Tensor],
    denoiser: Denoiser,
    *,
    shape: tuple[int, ...],
    total: int,
    overlap: int,
    sigmas: Tensor,
    w_r: float = 0.0,
    labels: Tensor | None = None,
    randn: Randn | None = None,
    device: torch.device | str = "cpu",
    **sampler_kw,
) -> Tensor:
    """Autoregressive long video (VDM Sec. 3.1): windows of T frames, each an extension of the previous one's last frames.

    Window j starts at :func:`window_starts`' s_j; its frames that earlier windows produced (at least `overlap` = k)
    are known, sampled with :func:`sample_conditioned` (replacement + w_r guidance); the first window is unconditional.

    Args:
        sample: a sampler of the :mod:`edmkit.diffusion.samplers` contract.
        denoiser: D(x; σ) on clips of T frames.
        shape: (N, C, T, H, W) of one window.
        total: frames of the long clip (>= T).
        overlap: k, frames each window shares with the previous one (1 <= k < T).
        sigmas: [steps + 1] grid ending in 0.
        w_r: reconstruction-guidance weight of the new frames.
        labels: [N, L] conditioning or None.
        randn: noise source ``randn(x) -> ε`` shaped like x (e.g. ``SeededRandn``: clip k reproducible); default torch.randn_like.
        device: where the clips live (the denoiser's device).
        **sampler_kw: passed to `sample`.

    Returns:
        [N, C, total, H, W] float32 clips.
    """
    if len(shape) != 5:
        raise ValueError(f"shape must be (N, C, T, H, W), got {tuple(shape)}")
    n, c, t, h, w = shape
    noise_fn = torch.randn_like if randn is None else randn
    template = torch.zeros(shape, device=device)
    out = template.new_zeros(n, c, total, h, w)
    done = 0
    for s in window_starts(total, window=t, overlap=overlap):
        noise = noise_fn(template)
        if done == 0:
            with torch.no_grad():
                clip = sample(denoiser, noise, sigmas, labels=labels, **with_randn(sample, sampler_kw, randn))
        else:
            clip = sample_conditioned(sample, denoiser, extension(out[:, :, s:done], frames=t), noise=noise, sigmas=sigmas, w_r=w_r,
                                      labels=labels, randn=randn, **sampler_kw)
        out[:, :, done:s + t] = clip[:, :, done - s:]
        done = s + t
    return out
