"""Latent datasets: an encoder's posterior moments of every image, precomputed (``edmkit dataset convert --vae``).

File: ``.npz`` with ``latent_mean`` and ``latent_std`` float [N, c, h, w] (the *standardised* latents' posterior
mean and std, so a training latent is mean + std * eps), optionally ``latent_mean_xflip`` / ``latent_std_xflip`` (the
moments of the mirrored images: a VAE's latents of a flipped image are not the flipped latents, so flips must be
encoded; training then takes either with probability 1/2), optional ``labels`` int [N] and ``class_names``, and
``encoder``: the JSON spec of the encoder that made them (kind, VAE path and sha256, per-channel constants;
``edmkit.latent.encoder``). Training draws a fresh posterior sample at every step (EDM2's recipe), so the VAE never
runs during training; grids and ``generate`` decode with the recorded encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATENT_KEYS = ("latent_mean", "latent_std", "encoder")


@dataclass(frozen=True, eq=False)
class LatentDataset:
    """Posterior moments of an encoded image dataset (module docstring); the latent counterpart of ``ImageDataset``."""

    mean: torch.Tensor = field(repr=False)     # float32 [N, c, h, w]
    std: torch.Tensor = field(repr=False)      # float32 [N, c, h, w] (0 for a deterministic encoder)
    labels: torch.Tensor | None = field(repr=False)
    num_classes: int
    name: str
    encoder: dict[str, Any]
    class_names: tuple[str, ...] = ()
    flipped: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # (mean, std) of the mirrored images

    def __post_init__(self) -> None:
        if self.flipped is not None and (self.flipped[0].shape != self.mean.shape or self.flipped[1].shape != self.mean.shape):
            raise ValueError(f"{self.name}: the mirrored images' moments must be shaped like latent_mean {tuple(self.mean.shape)}")
        if self.mean.ndim != 4 or self.mean.shape != self.std.shape or self.mean.shape[2] != self.mean.shape[3]:
            raise ValueError(f"{self.name}: latent_mean and latent_std must be [N, c, h, h] alike, got {tuple(self.mean.shape)}, {tuple(self.std.shape)}")
        if self.labels is not None and (tuple(self.labels.shape) != (len(self.mean),) or self.num_classes < 1):
            raise ValueError(f"{self.name}: labels must be [{len(self.mean)}] with num_classes >= 1")

    @property
    def resolution(self) -> int:
        """Latent height = width."""
        return self.mean.shape[-1]

    @property
    def channels(self) -> int:
        """Latent channels."""
        return self.mean.shape[1]

    def __len__(self) -> int:
        return len(self.mean)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> LatentDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return LatentDataset(self.mean[idx], self.std[idx], None if self.labels is None else self.labels[idx], self.num_classes,
                             self.name, self.encoder, self.class_names, None if self.flipped is None else (self.flipped[0][idx], self.flipped[1][idx]))

    @property
    def context(self) -> None:
        """Per-image context tokens: none in latent datasets (yet)."""
        return None

    @property
    def images(self) -> torch.Tensor:
        raise ValueError(f"{self.name} is a latent dataset: this needs images (pixels); use the dataset it was converted from")

    def float_batch(self, idx: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of items ``idx``: a posterior sample mean + std * eps (eps from ``generator``), or the mean without one.
        With mirrored moments and a generator, each item is the mirrored image's with probability 1/2 (drawn first)."""
        mean, std = self.mean[idx], self.std[idx]
        if generator is None:
            return mean.clone()
        if self.flipped is not None:
            flip = (torch.rand(len(idx), generator=generator) < 0.5).reshape(-1, 1, 1, 1)
            mean, std = torch.where(flip, self.flipped[0][idx], mean), torch.where(flip, self.flipped[1][idx], std)
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def is_latent_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a latent dataset (an .npz holding ``latent_mean``); reads only the archive's index."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "latent_mean" in z.files
    except (OSError, ValueError):
        return False


def latent_header(path: str | os.PathLike) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(encoder spec, latent_mean shape) of a latent dataset without reading its arrays."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("latent_mean.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
            with zf.open("encoder.npy") as f:
                encoder = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable latent dataset ({e})") from None
    return encoder, tuple(shape)


def read_latents(path: str | os.PathLike) -> LatentDataset:
    """Load a latent dataset written by :func:`write_latents`; a damaged or incomplete file is a ValueError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in LATENT_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a latent dataset (missing {', '.join(missing)})")
            mean = torch.from_numpy(z["latent_mean"].astype(np.float32))
            std = torch.from_numpy(z["latent_std"].astype(np.float32))
            encoder = json.loads(str(z["encoder"]))
            labels = torch.from_numpy(z["labels"].astype(np.int64)) if "labels" in z.files else None
            flipped = (torch.from_numpy(z["latent_mean_xflip"].astype(np.float32)), torch.from_numpy(z["latent_std_xflip"].astype(np.float32))) \
                if "latent_mean_xflip" in z.files else None
            names = tuple(str(s) for s in z["class_names"]) if "class_names" in z.files else ()
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(e if str(path) in str(e) else f"{path}: unreadable latent dataset ({e})") from None
    num_classes = 0 if labels is None else max(len(names), int(labels.max()) + 1 if len(labels) else 1)
    return LatentDataset(mean, std, labels, num_classes, str(path), encoder, names if labels is not None else (), flipped)


def write_latents(path: str | os.PathLike, *, mean: torch.Tensor, std: torch.Tensor, encoder: dict[str, Any],
                  labels: torch.Tensor | None = None, class_names: Sequence[str] = (),
                  flipped: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write a latent dataset atomically (float16 moments halve the disk; the network trains in float32)."""
    from edmkit.files import atomic_write

    arrays: dict[str, Any] = {"latent_mean": mean.cpu().numpy().astype(np.float16), "latent_std": std.cpu().numpy().astype(np.float16),
                              "encoder": np.asarray(json.dumps(encoder, sort_keys=True))}
    if flipped is not None:
        arrays["latent_mean_xflip"] = flipped[0].cpu().numpy().astype(np.float16)
        arrays["latent_std_xflip"] = flipped[1].cpu().numpy().astype(np.float16)
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
        if class_names:
            arrays["class_names"] = np.asarray(list(class_names))
    atomic_write(path, lambda f: np.savez(f, **arrays))
