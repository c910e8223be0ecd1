"""Moving MNIST (Srivastava et al. 2015) synthesised from the embedded digits: no download, seeded per clip.

Each clip: ``digits`` digits of ``assets/mnist5k.npz`` (resized to ``digit_size``), each starting at a uniform
position in the free square [0, size - digit_size]^2 and moving in a uniform direction at ``speed`` pixels per frame,
reflecting off the borders (``bounce``); overlapping digits combine by max. Clip i depends only on (seed, i): its
random numbers come from ``np.random.default_rng([seed, i])``, so any subset of clips is reproducible on its own.

The standard setting: 2 digits of 28 px on 64x64, 20 frames. A source string picks it and its options:
``movingmnist`` (the network's size and frames), ``movingmnist-32`` (synthesised at 32x32),
``movingmnist:digits=1,digit_size=10,clips=5000,speed=2,seed=0`` (options after a colon, comma separated).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from importlib import resources

import numpy as np
from PIL import Image

from edmkit.data.npz import read_npz

PREFIX = "movingmnist"


@dataclass(frozen=True)
class MovingMNIST:
    size: int = 64              # frame height = width, pixels
    frames: int = 20            # frames per clip
    digits: int = 2             # digits per clip
    digit_size: int = 0         # digit side in pixels; 0 = 28 * size / 64 (the standard's proportion)
    speed: float = 0.0          # pixels per frame; 0 = 0.1 * (size - digit_size) (3.6 at 64x64, as the standard)
    clips: int = 10_000         # clips in the dataset
    seed: int = 0               # clip i comes from default_rng([seed, i])

    def __post_init__(self) -> None:
        if self.size < 4 or self.frames < 1 or self.digits < 1 or self.clips < 1 or self.digit_size < 0 or self.speed < 0:
            raise ValueError(f"moving mnist: need size >= 4 and frames, digits, clips >= 1 (got {self})")
        if self.digit_px >= self.size:
            raise ValueError(f"moving mnist: digits of {self.digit_px} px do not move in a {self.size} px frame")

    @property
    def digit_px(self) -> int:
        return self.digit_size or max(1, round(28 * self.size / 64))

    @property
    def pixels_per_frame(self) -> float:
        return self.speed or 0.1 * (self.size - self.digit_px)


def is_moving_mnist(source: str) -> bool:
    return re.fullmatch(rf"{PREFIX}(-\d+)?(:.*)?", str(source)) is not None


def parse_source(source: str, *, size: int | None = None, frames: int | None = None) -> MovingMNIST:
    """``movingmnist[-SIZE][:key=value,...]`` -> its settings; ``size`` / ``frames`` are the defaults (the network's)."""
    m = re.fullmatch(rf"{PREFIX}(?:-(\d+))?(?::(.*))?", str(source))
    if m is None:
        raise ValueError(f"not a moving mnist source: {source!r}; use e.g. movingmnist, movingmnist-32, movingmnist:digits=1")
    kinds = {f.name: f.type for f in fields(MovingMNIST)}
    options: dict[str, int | float] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in kinds or not value:
            raise ValueError(f"moving mnist option {item!r}: use key=value with keys {', '.join(kinds)}")
        try:
            options[key] = float(value) if kinds[key] == "float" else int(value)
        except ValueError:
            raise ValueError(f"moving mnist option {item!r}: {value!r} is not a number") from None
    if m.group(1):
        options.setdefault("size", int(m.group(1)))
    defaults = {k: v for k, v in (("size", size), ("frames", frames)) if v}
    return MovingMNIST(**{**defaults, **options})


def bounce(p0: np.ndarray, v: np.ndarray, t: np.ndarray, length: float) -> np.ndarray:
    """Position at time t of a point moving at velocity v from p0 between walls at 0 and ``length``, reflecting off both.

    Reflection unfolds to free motion on a circle of circumference 2L folded in half: u = (p0 + v t) mod 2L,
    p = u if u <= L else 2L - u (a triangle wave). Broadcasts over its arguments.
    """
    u = np.mod(p0 + v * t, 2 * length)
    return np.where(u <= length, u, 2 * length - u)


def embedded_digits(digit_size: int = 28) -> np.ndarray:
    """The 5,000 embedded MNIST digits as uint8 [5000, digit_size, digit_size] (box / Lanczos resize from 28 px)."""
    with resources.files("edmkit").joinpath("assets", "mnist5k.npz").open("rb") as f:
        digits = read_npz(f, where="mnist5k").images[..., 0]  # [5000, 28, 28]
    if digit_size == 28:
        return digits
    resample = Image.Resampling.BOX if 28 % digit_size == 0 else Image.Resampling.LANCZOS
    return np.stack([np.asarray(Image.fromarray(d).resize((digit_size, digit_size), resample=resample)) for d in digits])


def trajectories(spec: MovingMNIST, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``index``'s digit picks [digits] and top-left positions float [digits, frames, 2] (y, x), from (seed, index)."""
    rng = np.random.default_rng([spec.seed, index])
    picks = rng.integers(5000, size=spec.digits)
    length = spec.size - spec.digit_px
    p0 = rng.uniform(0, length, size=(spec.digits, 1, 2))
    angle = rng.uniform(0, 2 * math.pi, size=(spec.digits, 1, 1))
    v = spec.pixels_per_frame * np.concatenate([np.sin(angle), np.cos(angle)], axis=2)  # [digits, 1, 2]
    t = np.arange(spec.frames, dtype=np.float64)[None, :, None]  # [1, frames, 1]
    return picks, bounce(p0, v, t, length)


def render_clip(spec: MovingMNIST, index: int, digits: np.ndarray) -> np.ndarray:
    """Clip ``index`` as uint8 [frames, size, size]; ``digits`` from ``embedded_digits(spec.digit_px)``."""
    picks, pos = trajectories(spec, index)
    pos = np.rint(pos).astype(np.int64)
    s = spec.digit_px
    clip = np.zeros((spec.frames, spec.size, spec.size), dtype=np.uint8)
    for d, pick in enumerate(picks):
        for f in range(spec.frames):
            y, x = pos[d, f]
            np.maximum(clip[f, y:y + s, x:x + s], digits[pick], out=clip[f, y:y + s, x:x + s])  # overlaps by max
    return clip


def moving_mnist(spec: MovingMNIST) -> np.ndarray:
    """All ``spec.clips`` clips as uint8 [clips, frames, size, size, 1]."""
    digits = embedded_digits(spec.digit_px)
    return np.stack([render_clip(spec, i, digits) for i in range(spec.clips)])[..., None]
