"""Pixels as the model sees them ([-1, 1], EDM's σ_data = 0.5 assumes that range) and image files: grids, PNG folders,
single images for restoration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edmkit.files import atomic_write


def images_to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in [0, 255] -> float32 in [-1, 1]: x / 127.5 - 1."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"images_to_float expects uint8, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1


def float_to_images(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] in [-1, 1] -> uint8 in [0, 255]: round((x + 1) * 127.5), clamped."""
    return ((x.detach().to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 or float-in-[-1, 1] [N, C, H, W] (C = 1 or 3) -> uint8 on the CPU."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.detach().cpu()
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {x.dtype}")
    return float_to_images(x.cpu())


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] -> PIL image ("L" or "RGB")."""
    array = image.permute(1, 2, 0).numpy()  # [H, W, C]
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def image_grid(x: torch.Tensor, *, nrow: int | None = None, padding: int = 1) -> torch.Tensor:
    """Tile images row by row: [N, C, H, W] -> uint8 [C, rows*(H+p)+p, nrow*(W+p)+p], black padding.

    Args:
        x: uint8 or float in [-1, 1] images [N, C, H, W].
        nrow: Images per row; default ceil(sqrt(N)).
        padding: Pixels between images and around the border.
    """
    images = _as_uint8(x)
    n, c, h, w = images.shape
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / ncol))
    grid = torch.zeros(c, rows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_image_grid(x: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> None:
    """Save images [N, C, H, W] (uint8 or float in [-1, 1]) as one PNG grid with 1 px padding."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = _to_pil(image_grid(x, nrow=nrow))
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_images(x: torch.Tensor, folder: str | Path, *, start_index: int = 0) -> None:
    """Save images [N, C, H, W] (uint8 or float in [-1, 1]) as folder/000000.png, 000001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_as_uint8(x)):
        pil = _to_pil(image)
        atomic_write(folder / f"{start_index + i:06d}.png", lambda f, pil=pil: pil.save(f, format="PNG"))


def read_image_file(path: str, *, channels: int | None = None) -> torch.Tensor:
    """Read a PNG/JPEG/... as uint8 [1, C, H, W]; channels 1 or 3 converts, None keeps gray as 1 and colour as 3."""
    with Image.open(path) as image:
        if channels is None:
            channels = 3 if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV") else 1
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        array = torch.from_numpy(np.asarray(image.convert("L" if channels == 1 else "RGB")).copy())
    return (array[None] if channels == 1 else array.permute(2, 0, 1))[None]  # [1, C, H, W]


def write_image_file(x: torch.Tensor, path: str) -> None:
    """Write one image [1, C, H, W] (float in [−1, 1], C = 1 or 3) as a PNG without padding."""
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected one image [1, 1|3, H, W], got shape {tuple(x.shape)}")
    array = float_to_images(x.cpu())[0].permute(1, 2, 0).numpy()  # [H, W, C]
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
