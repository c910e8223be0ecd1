"""CIFAR python tarballs as distributed (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``): the training
batches only (CIFAR-100: the 100 fine labels), class names from the meta file (CIFAR-10: the published names when
``batches.meta`` is missing). Pickles are read with an unpickler that builds only numpy arrays and plain containers."""

from __future__ import annotations

import codecs
import io
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from edmkit.data.raw import Raw, check_labels

# The published CIFAR-10 class names (batches.meta label_names), for tarballs that lack the meta file.
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and nothing else: arbitrary pickles can run code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        reconstruct = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module path
        allowed = {("numpy.core.multiarray", "_reconstruct"): reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed[(module, name)]


def _unpickle_dict(data: bytes, *, where: str) -> dict:
    """A (Python 2) pickled dict with bytes keys, as in the CIFAR batches; keys decoded to str."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean the same here
        raise ValueError(f"{where}: unreadable pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _tar_files(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular files in a tar(.gz) whose 'folder/name' key passes ``wanted``."""
    try:
        with tarfile.open(path, "r:*") as tar:
            files = {}
            for member in tar:
                key = "/".join(PurePosixPath(member.name).parts[-2:])
                if member.isfile() and wanted(key):
                    files[key] = tar.extractfile(member).read()
            return files
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated tar archive ({e})") from e


def read_cifar(path: Path) -> Raw:
    """CIFAR-10/100 python tarball: training batches, rows of 3072 bytes = R, G, B planes of 32x32."""
    pattern = r"cifar-10-batches-py/(data_batch_\d+|batches\.meta)|cifar-100-python/(train|meta)"
    files = _tar_files(path, lambda key: re.fullmatch(pattern, key) is not None)
    batches = sorted((k for k in files if "data_batch_" in k), key=lambda k: int(k.rsplit("_", 1)[1]))
    if batches:
        meta_key, label_key, names_key, num_classes = "cifar-10-batches-py/batches.meta", "labels", "label_names", 10
    elif "cifar-100-python/train" in files:
        batches, meta_key, label_key, names_key, num_classes = (
            ["cifar-100-python/train"], "cifar-100-python/meta", "fine_labels", "fine_label_names", 100)
    else:
        raise ValueError(f"{path}: not a CIFAR-10/100 python tarball (no data_batch_* or train inside)")
    data, labels = [], []
    for key in batches:
        batch = _unpickle_dict(files[key], where=f"{path}:{key}")
        rows = batch.get("data")
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
            raise ValueError(f"{path}:{key}: 'data' must be uint8 [N, 3072]")
        data.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # [n, 32, 32, 3]
        labels.append(np.asarray(batch.get(label_key, [])))
    images = np.concatenate(data)
    labels, num_classes = check_labels(np.concatenate(labels), len(images), where=str(path), num_classes=num_classes)
    meta = _unpickle_dict(files[meta_key], where=f"{path}:{meta_key}") if meta_key in files else {}
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, []))
    if len(names) != num_classes:
        names = CIFAR10_CLASS_NAMES if num_classes == 10 else ()
    return Raw(images, labels, num_classes, names, None)
