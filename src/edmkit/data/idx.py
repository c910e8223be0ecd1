"""MNIST-style idx files: ``*-images-idx3-ubyte[.gz]`` with the matching ``*-labels-idx1-ubyte[.gz]`` (class names "0", "1", ...)."""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from edmkit.data.raw import Raw, check_labels, index_names


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An idx ubyte file (MNIST format: magic 0x0000 08 ndim, big-endian uint32 dims, bytes)."""
    try:
        data = path.read_bytes()
        data = gzip.decompress(data) if path.name.lower().endswith(".gz") else data
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise ValueError(f"{path}: not an idx ubyte file with {ndim} dimension(s)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise ValueError(f"{path}: truncated idx data ({len(data) - header} bytes, header says {math.prod(dims)})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_idx(path: Path) -> Raw:
    """MNIST idx images [N, H, W], with labels from the matching labels file when it exists."""
    images = _read_idx(path, ndim=3)
    label_path = path.with_name(re.sub(r"images([-.])idx3", r"labels\1idx1", path.name, flags=re.IGNORECASE))
    raw_labels = _read_idx(label_path, ndim=1) if label_path != path and label_path.exists() else None
    labels, num_classes = check_labels(raw_labels, len(images), where=str(label_path))
    return Raw(images[..., None], labels, num_classes, index_names(num_classes), None)
