"""Typed, frozen experiment configuration and named presets.

Durations are counted in images (``*_nimg``) so schedules do not change with batch size; strings such
as ``"2Mi"`` / ``"500Ki"`` / ``"64k"`` are accepted wherever a count of images is parsed.
The resolved config is saved as JSON in the run folder and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

LADDER = ("G",)  # EDM2 Table 1 rungs implemented by the network (others: see issue on the config ladder)


def parse_nimg(value: int | float | str) -> int:
    """Parse an image count: ``1000``, ``"64k"``, ``"500Ki"``, ``"2M"``, ``"2Mi"``, ``"1.5G"``."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?)?\s*", str(value))
    if not m:
        raise ValueError(f"cannot parse image count {value!r}; use e.g. 1000, 64k, 500Ki, 2Mi")
    scale = {"": 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20, "g": 10**9, "gi": 2**30}[(m.group(2) or "").lower()]
    return int(float(m.group(1)) * scale)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class NetworkConfig:
    resolution: int = 28                        # image height = width, pixels
    channels: int = 1                           # image channels (1 or 3)
    label_dim: int = 0                          # number of classes for conditioning; 0 = unconditional
    model_channels: int = 32                    # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)   # per-level channel multipliers (one level per entry)
    num_blocks: int = 1                         # residual blocks per level in the encoder (decoder: +1)
    attn_resolutions: tuple[int, ...] = (7,)    # resolutions with self-attention blocks
    channels_per_head: int = 64                 # attention head width
    dropout: float = 0.0                        # dropout inside residual blocks
    ladder: str = "G"                           # EDM2 config-ladder rung (Table 1)
    formulation: str = "edm"                    # preconditioning: edm
    sigma_data: float = 0.5                     # data std in [-1, 1] pixel units
    logvar_channels: int = 128                  # Fourier features of the uncertainty head u(sigma)

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        _check(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        _check(levels >= 1 and self.model_channels >= 1 and self.num_blocks >= 1, "network needs >= 1 level, channel and block")
        _check(self.resolution >= 2 ** (levels - 1) and self.resolution % 2 ** (levels - 1) == 0,
               f"image size {self.resolution} cannot be taken by a {levels}-level U-Net: it must be divisible by {2 ** (levels - 1)}")
        _check(self.ladder in LADDER, f"unknown config {self.ladder!r}; valid: {', '.join(LADDER)}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.sigma_data > 0, "sigma_data must be positive")


@dataclass(frozen=True)
class LossConfig:
    P_mean: float = -1.2                        # mean of ln(sigma) during training
    P_std: float = 1.2                          # std of ln(sigma) during training
    uncertainty: bool = True                    # EDM2 learned uncertainty weighting (Eq. 21)
    stratified: bool = False                    # low-discrepancy sigma sampling within a batch (VDM)

    def __post_init__(self) -> None:
        _check(self.P_std > 0, f"P_std must be positive, got {self.P_std}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.01                            # reference learning rate alpha_ref (Adam)
    lr_ref_nimg: int = 64_000                   # inverse-sqrt decay starts after this many images (t_ref)
    warmup_nimg: int = 2_000                    # linear warm-up length
    beta1: float = 0.9                          # Adam beta1
    beta2: float = 0.99                         # Adam beta2
    eps: float = 1e-8                           # Adam epsilon

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(self.lr_ref_nimg >= 0 and self.warmup_nimg >= 0, "lr_ref_nimg and warmup_nimg must be >= 0")


@dataclass(frozen=True)
class EMAConfig:
    stds: tuple[float, ...] = (0.05, 0.10)      # power-function EMA profiles tracked (sigma_rel)
    sample_std: float = 0.05                    # which one grids and `generate` use by default (0 = raw weights)
    snapshot_nimg: int = 32_000                 # save EMA snapshots (for post-hoc EMA) every this many images

    def __post_init__(self) -> None:
        _check(all(0 < s < 0.28 for s in self.stds), f"EMA stds must be in (0, 0.28), got {self.stds}")
        _check(self.sample_std == 0 or self.sample_std in self.stds, f"sample_std {self.sample_std} must be 0 or one of {self.stds}")


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist5k"                       # dataset source: "mnist5k" (embedded) or a path
    batch: int = 32                             # global batch size
    total_nimg: int = 80_000                    # training length in images
    seed: int = 0                               # seed for init, data order and noise
    status_nimg: int = 2_000                    # stats.jsonl line every this many images
    grid_nimg: int = 16_000                     # sample grid every this many images
    state_nimg: int = 8_000                     # resumable training state every this many images
    grid_n: int = 64                            # images in each sample grid
    sample_steps: int = 18                      # Heun steps for grids (2 * steps - 1 evaluations)

    def __post_init__(self) -> None:
        _check(self.batch >= 1, f"batch must be >= 1, got {self.batch}")
        _check(self.total_nimg >= self.batch, "total_nimg must be at least one batch")
        for name in ("status_nimg", "grid_nimg", "state_nimg"):
            _check(getattr(self, name) > 0, f"{name} must be positive")


@dataclass(frozen=True)
class ExperimentConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        """Rebuild from ``to_dict`` output; unknown sections or fields raise ValueError."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # the section's dataclass
            known = {g.name: g for g in dataclasses.fields(sub_cls)}
            values = d.get(f.name, {})
            unknown = set(values) - set(known)
            _check(not unknown, f"unknown config fields in [{f.name}]: {', '.join(sorted(unknown))}")
            parts[f.name] = sub_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        _check(not set(d) - set(parts), f"unknown config sections: {', '.join(sorted(set(d) - set(parts)))}")
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(text))

    def override(self, section: str, **changes: Any) -> "ExperimentConfig":
        """Return a copy with fields of one section replaced (validated)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Human-readable differences ``section.field: a -> b``."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        for key in da[section]:
            if da[section][key] != db[section][key]:
                out.append(f"{section}.{key}: {da[section][key]!r} -> {db[section][key]!r}")
    return out


def _preset(network: dict | None = None, loss: dict | None = None, optim: dict | None = None, ema: dict | None = None, train: dict | None = None) -> ExperimentConfig:
    return ExperimentConfig(NetworkConfig(**(network or {})), LossConfig(**(loss or {})), OptimConfig(**(optim or {})),
                            EMAConfig(**(ema or {})), TrainConfig(**(train or {})))


PRESETS: dict[str, ExperimentConfig] = {
    # seconds on CPU: tests and smoke runs
    "tiny": _preset(network=dict(model_channels=8, channel_mult=(1, 2), attn_resolutions=(14,), channels_per_head=16, logvar_channels=16),
                    optim=dict(lr_ref_nimg=2000, warmup_nimg=64),
                    ema=dict(snapshot_nimg=256),
                    train=dict(batch=16, total_nimg=640, status_nimg=64, grid_nimg=320, state_nimg=160, grid_n=16, sample_steps=4)),
    # the default: recognisable MNIST digits in about 15 minutes on 2 CPU cores
    "mnist": _preset(),
    # CIFAR-10 32x32 sized for one GPU (EDM2 XS-like width)
    "cifar10": _preset(network=dict(resolution=32, channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=3, attn_resolutions=(16, 8)),
                       loss=dict(P_mean=-0.8, P_std=1.6), optim=dict(lr=0.010, lr_ref_nimg=70_000 * 128, warmup_nimg=10_000_000 // 10),
                       ema=dict(snapshot_nimg=4_000_000, sample_std=0.10),
                       train=dict(data="cifar-10-python.tar.gz", batch=512, total_nimg=200_000_000, status_nimg=128_000, grid_nimg=5_000_000, state_nimg=5_000_000)),
    # CIFAR-10 on a CPU for a first look (hours): small network, short schedule
    "cifar10-small": _preset(network=dict(resolution=32, channels=3, model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)),
                             optim=dict(lr_ref_nimg=200_000, warmup_nimg=5_000),
                             ema=dict(snapshot_nimg=100_000, sample_std=0.05),
                             train=dict(data="cifar-10-python.tar.gz", batch=64, total_nimg=2_000_000, status_nimg=10_000, grid_nimg=100_000, state_nimg=50_000)),
}
DEFAULT_PRESET = "mnist"


def get_preset(name: str) -> ExperimentConfig:
    """Look up a named preset; unknown names raise ValueError listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]
