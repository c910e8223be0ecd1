"""``edmkit dataset convert``: any supported source -> the one checked format, a zip of PNGs + ``dataset.json``.

The zip holds ``00000000.png, 00000001.png, ...`` (lossless, stored uncompressed: PNG is already
compressed) and ``dataset.json`` = ``{"labels": [["00000000.png", label], ...] | null, "class_names": [...]}``,
which ``data.load_dataset`` reads back to the identical images and labels. Every written archive is
read back and compared before the command reports success ("checked").
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from edmkit.data.dataset import ImageDataset, load_dataset
from edmkit.data.images import save_image_grid
from edmkit.files import atomic_write


def dataset_summary(data: ImageDataset) -> dict[str, Any]:
    """Count, resolution, channels and per-class counts of a dataset (plain JSON-able values)."""
    counts = [] if data.labels is None else torch.bincount(data.labels, minlength=data.num_classes).tolist()
    names = list(data.class_names) or [str(c) for c in range(data.num_classes)]
    return dict(name=data.name, count=len(data), resolution=data.resolution, channels=data.channels,
                num_classes=data.num_classes, class_counts=dict(zip(names, counts)))


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines of ``dataset_summary``."""
    classes = "none (unlabelled)"
    if summary["num_classes"]:
        shown = ", ".join(f"{k}: {v}" for k, v in list(summary["class_counts"].items())[:10])
        more = ", ..." if summary["num_classes"] > 10 else ""
        classes = f"{summary['num_classes']} ({shown}{more})"
    return "\n".join([f"images:     {summary['count']}", f"resolution: {summary['resolution']}x{summary['resolution']}",
                      f"channels:   {summary['channels']}", f"classes:    {classes}"])


def _png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [C, H, W] -> PNG file bytes (mode L or RGB)."""
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset_zip(data: ImageDataset, path: str | Path) -> None:
    """Write ``data`` as a zip of PNGs + dataset.json (module docstring), atomically (temp file, then rename)."""
    width = max(8, len(str(len(data) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(len(data))]
    labels = None if data.labels is None else [[n, int(c)] for n, c in zip(names, data.labels.tolist())]
    meta = json.dumps({"labels": labels, "class_names": list(data.class_names)})

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, image in zip(names, data.images):
                archive.writestr(name, _png_bytes(image))
            archive.writestr("dataset.json", meta)

    atomic_write(path, write)


def check_round_trip(data: ImageDataset, path: str | Path) -> None:
    """Read ``path`` back with ``load_dataset``; ValueError unless images, labels and class names are identical to ``data``."""
    back = load_dataset(path)
    if back.images.shape != data.images.shape or not torch.equal(back.images, data.images):
        raise ValueError(f"{path}: images read back differ from those written")
    if (back.labels is None) != (data.labels is None) or (data.labels is not None and not torch.equal(back.labels, data.labels)):
        raise ValueError(f"{path}: labels read back differ from those written")
    if back.class_names != data.class_names:
        raise ValueError(f"{path}: class names read back differ from those written")


def preview_path(dest: str | Path) -> Path:
    """Where ``convert_dataset`` puts the preview grid: ``DEST-preview.png`` beside ``DEST``."""
    dest = Path(dest)
    return dest.with_name(f"{dest.stem}-preview.png")


def convert_dataset(source: str | Path, dest: str | Path, *, resolution: int | None = None, channels: int | None = None,
                    classes: Sequence[int] | None = None, center_crop: bool = False, skip_bad: bool = False,
                    preview_n: int = 64) -> dict[str, Any]:
    """Convert a dataset to the checked zip format, with a preview grid beside it.

    Args:
        source: anything ``load_dataset`` reads (folder, zip, npz, MNIST idx, CIFAR tarball, "mnist5k").
        dest: the ``.zip`` to write (replaced if it exists; never the source itself).
        resolution, channels, classes, center_crop, skip_bad: as in ``load_dataset``.
        preview_n: images in the preview grid (the first ones).

    Returns:
        ``dataset_summary`` of the written data plus ``dest`` and ``preview`` paths (str).

    Raises:
        ValueError: a bad source or option (from ``load_dataset``), a destination that is not a new ``.zip``, or
            an archive that does not read back identically.
    """
    dest = Path(dest)
    if dest.suffix.lower() != ".zip":
        raise ValueError(f"{dest}: the destination must be a .zip file")
    if dest.exists() and Path(source).exists() and dest.resolve() == Path(source).resolve():
        raise ValueError(f"{dest}: the destination is the source; choose another file name")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest}: folder {dest.parent} does not exist")
    data = load_dataset(source, resolution=resolution, channels=channels, classes=classes, center_crop=center_crop, skip_bad=skip_bad)
    write_dataset_zip(data, dest)
    check_round_trip(data, dest)
    preview = preview_path(dest)
    save_image_grid(data.images[:preview_n], preview)
    return {**dataset_summary(data), "dest": str(dest), "preview": str(preview)}
