"""What every source reader returns (``Raw``: decoded images before geometry and channels), and the checks they share."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Raw(NamedTuple):
    """Decoded images before class filtering, geometry and channel conversion."""

    images: np.ndarray | list[np.ndarray]  # uint8 [N, H, W, C], or N arrays [H, W, C]; C = 1 or 3
    labels: np.ndarray | None  # int64 [N]
    num_classes: int
    class_names: tuple[str, ...]
    item_names: list[str] | None  # per-image file names for messages
    context: np.ndarray | None = None  # float32 [N, L, D] per-image token sequence for cross-attention, or None


def check_context(context: np.ndarray | None, n: int, *, where: str) -> np.ndarray | None:
    """Validate a per-image context [n, L, D] of real numbers (cross-attention conditioning); returns it as float32."""
    if context is None:
        return None
    context = np.asarray(context)
    if context.ndim != 3 or context.shape[0] != n or not (np.issubdtype(context.dtype, np.floating) or np.issubdtype(context.dtype, np.integer)):
        raise ValueError(f"{where}: context must be a real array [N={n}, L, D] (L tokens of width D per image), "
                         f"got {context.dtype} {context.shape}")
    context = context.astype(np.float32)
    if not np.isfinite(context).all():
        raise ValueError(f"{where}: context has non-finite values")
    return context


def check_labels(labels: np.ndarray | None, n: int, *, where: str,
                  num_classes: int | None = None) -> tuple[np.ndarray | None, int]:
    """Validate integer labels [n]; returns them as int64 and the class count (max + 1 if not given)."""
    if labels is None:
        return None, 0
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{where}: {labels.size} labels for {n} images (labels missing or extra)")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
    num_classes = num_classes or (int(labels.max()) + 1 if n else 0)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"{where}: class index {int(bad[0])} out of range [0, {num_classes})")
    return labels.astype(np.int64), num_classes


def index_names(num_classes: int) -> tuple[str, ...]:
    """Class names "0", "1", ..., "K-1" (MNIST's classes are the digits themselves)."""
    return tuple(str(c) for c in range(num_classes))


def nhwc(images: np.ndarray, *, where: str) -> np.ndarray:
    """[N, H, W], [N, H, W, C] or [N, C, H, W] uint8 -> [N, H, W, C] (C = 1 or 3)."""
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        return images.transpose(0, 2, 3, 1)
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images
    raise ValueError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C = 1 or 3, "
                     f"got shape {images.shape}")
