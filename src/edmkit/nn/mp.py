"""Magnitude-preserving primitives of EDM2 (Karras et al. 2024, arXiv 2312.02696, Sec. 2.3-2.5, App. B).

Symbols: ``t`` is a blend (balance) factor in [0, 1]; ``fan_in`` is the number of inputs of one
output unit (in_channels * kernel area); ``eps`` = 1e-4.

Eps convention (used everywhere in edmkit): the norm is rescaled to an RMS first and the eps is
added to it, ``x / (eps + ||x|| / sqrt(n))`` — EDM2's choice. It keeps near-zero vectors finite
and makes unit-RMS inputs pass through unchanged to within 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-4
SILU_RMS = 0.596  # E[silu(x)^2]^(1/2) for x ~ N(0, 1) (EDM2 Eq. 81)


def normalize(x: torch.Tensor, *, dim: int | tuple[int, ...] | None = None, eps: float = EPS) -> torch.Tensor:
    """Scale to unit RMS along ``dim`` (EDM2 Eq. 47 / App. B.2, forced weight normalization).

    Args:
        x: any tensor; with ``dim=None`` every slice ``x[i]`` (one output unit of a weight) is normalized.
        dim: dimensions to take the RMS over; ``1`` gives pixel norm over channels of ``[N, C, H, W]``.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = math.prod([x.shape[d] for d in dims])
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = norm * (1.0 / math.sqrt(n)) + eps  # written as plain ops so torch.compile traces it without a graph break
    return x / norm.to(x.dtype)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """Pixel normalization over channels of ``[N, C, H, W]`` (EDM2 config F, replaces group norm)."""
    return normalize(x, dim=1)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 Eq. 81): silu(x) / 0.596."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, *, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum (EDM2 Eq. 88): ((1-t) a + t b) / sqrt((1-t)^2 + t^2); t may be a learned 0-dim tensor."""
    if isinstance(t, torch.Tensor):
        t = t.to(a.dtype)
        return a.lerp(b, t) / ((1 - t) ** 2 + t**2).sqrt()
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, *, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (EDM2 Eq. 103), ``a`` weighted by 1-t and ``b`` by t."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    C = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    w_a = C / math.sqrt(n_a) * (1 - t)
    w_b = C / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


def resample(x: torch.Tensor, *, mode: str) -> torch.Tensor:
    """Box-filter resampling by 2x: ``'down'`` averages 2x2 blocks, ``'up'`` repeats pixels, ``'keep'`` is identity."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)  # [N, C, H/2, W/2]
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")  # [N, C, 2H, 2W]
    raise ValueError(f"unknown resample mode {mode!r}; valid: keep, down, up")


INITS = ("randn", "he", "adm", "zero")


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution / linear layer with forced weight normalization (EDM2 Eq. 47, config E+).

    The effective weight is ``normalize(w) * gain / sqrt(fan_in)`` so unit-RMS inputs give unit-RMS outputs.
    Side effect, on purpose and only here: in training mode the stored parameter itself is replaced by
    ``normalize(w)`` before use (no gradient flows through that copy), so the raw weight norm cannot grow
    and Adam's effective learning rate stays controlled. The EMA therefore averages the post-step raw
    weights, as in EDM2. Eval mode never mutates the weights.

    The flags give the earlier rungs of the EDM2 ladder (Table 1) with the same layer: ``weight_norm=False``
    is a plain conv / linear layer using ``weight`` as stored (configs A-C), ``forced=False`` keeps the
    weight normalization but never touches the stored weight (config D), ``bias=True`` adds a learned
    bias (configs A-B). ``init``: ``"randn"`` N(0, 1) (weight-normalized layers, EDM2 D+), ``"he"``
    He-uniform U(+-sqrt(6 / fan_in)) (EDM2 config C), ``"adm"`` PyTorch's default U(+-1 / sqrt(fan_in)) for
    weight and bias (ADM / EDM, configs A-B), ``"zero"`` all zeros (ADM's zero-initialized output layers).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = (), *, bias: bool = False,
                 weight_norm: bool = True, forced: bool = True, init: str = "randn") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        if forced and not weight_norm:
            raise ValueError("forced weight normalization needs weight_norm=True")
        if weight_norm and init == "zero":
            raise ValueError("a weight-normalized layer cannot start at zero (normalize(0) has no direction); use a zero gain")
        self.out_channels = out_channels
        self.weight_norm, self.forced = weight_norm, forced
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel) if init == "randn" else torch.zeros(out_channels, in_channels, *kernel))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if bias else None
        with torch.no_grad():
            bound = {"he": math.sqrt(6 / self.fan_in), "adm": 1 / math.sqrt(self.fan_in)}.get(init)
            if bound is not None:
                self.weight.uniform_(-bound, bound)
                if self.bias is not None and init == "adm":
                    self.bias.uniform_(-bound, bound)

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def effective_weight(self, *, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The weight actually applied, in float32; also performs the forced normalization in training."""
        w = self.weight.to(torch.float32)
        if not self.weight_norm:
            return w * gain  # configs A-C: the stored weight as is
        if self.training and self.forced:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization (EDM2 Sec. 2.5)
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            w = normalize(w) * (1.0 / math.sqrt(self.fan_in))
        else:
            w = self._inference_weight()
        return w if isinstance(gain, float) and gain == 1.0 else w * gain

    def _inference_weight(self) -> torch.Tensor:
        """``normalize(w) / sqrt(fan_in)``, computed once per weight version when sampling (no autograd, eval mode).

        Sampling calls every layer tens of times with the same weights; the key (version counter, storage, device)
        changes with any in-place update (optimizer step, EMA copy, ``load_state_dict``), so a stale weight is never used.
        """
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            cached = (key, normalize(self.weight.to(torch.float32)) * (1.0 / math.sqrt(self.fan_in)))
            self.__dict__["_weight_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, *, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.effective_weight(gain=gain).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if w.ndim == 2:
            y = x @ w.t()  # [N, in] -> [N, out]
            return y if b is None else y + b
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)  # [N, in, H, W] -> [N, out, H, W]


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features (EDM2 App. B): sqrt(2) cos(2 pi (f c + phi)), f ~ N(0, 1), phi ~ U(0, 1).

    The frequencies and phases are fixed buffers drawn from a private generator seeded by ``seed``,
    so building the same network twice gives the same features.
    """

    def __init__(self, num_channels: int, *, bandwidth: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        freqs = rng.standard_normal(num_channels) * bandwidth
        phases = rng.random(num_channels)
        self.register_buffer("freqs", torch.tensor(2 * np.pi * freqs, dtype=torch.float32))
        self.register_buffer("phases", torch.tensor(2 * np.pi * phases, dtype=torch.float32))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        y = c.to(torch.float32).outer(self.freqs) + self.phases  # [N] -> [N, C]
        return (y.cos() * math.sqrt(2)).to(c.dtype)
