"""``*.npz`` datasets: ``images`` uint8 [N, H, W], [N, H, W, C] or [N, C, H, W]; optional integer ``labels`` [N];
optional ``context`` [N, L, D] real (a token sequence per image, for cross-attention conditioning)."""

from __future__ import annotations

import zipfile
import zlib
from typing import BinaryIO

import numpy as np

from edmkit.data.raw import Raw, check_context, check_labels, nhwc


def read_npz(file: BinaryIO, *, where: str) -> Raw:
    """An .npz with ``images`` and optional ``labels`` and ``context`` (the embedded dataset uses this too)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in ("images", "labels", "context")}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{where}: corrupt or truncated .npz ({e})") from e
    if "images" not in arrays:
        raise ValueError(f"{where}: no 'images' array in the .npz")
    images = nhwc(arrays["images"], where=where)
    labels, num_classes = check_labels(arrays.get("labels"), len(images), where=where)
    context = check_context(arrays.get("context"), len(images), where=where)
    return Raw(images, labels, num_classes, (), None, context)
