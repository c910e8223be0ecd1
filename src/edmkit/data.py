"""Image datasets: the embedded default, image folders and zips, MNIST idx, CIFAR tarballs, npz.

Every source loads fully into memory as one ``ImageDataset``: uint8 images [N, C, H, W] (square,
C = 1 or 3) and optional int64 labels [N]. The model sees pixels in [-1, 1] (``images_to_float``;
EDM's sigma_data = 0.5 assumes that range). ``sample_order`` defines the seeded global stream of
dataset indices that makes resume exact and DDP sharding independent of the world size.

Sources accepted by ``load_dataset``:
    "mnist5k"                     embedded 5k-digit MNIST subset (assets/README.md), the default
    folder/ or archive.zip        images found recursively, in sorted path order. Labels come from a
                                  root dataset.json {"labels": [[relpath, label], ...], "class_names":
                                  [...]} ("labels": null means unlabelled; "class_names" is optional) or
                                  else from class subfolders: the first folder below the deepest folder
                                  common to all images; class indices follow the sorted folder names
                                  (numeric order when names are digits), which are the class names.
    *-images-idx3-ubyte[.gz]      MNIST-style idx; labels from the matching *-labels-idx1-ubyte[.gz]
                                  (class names "0", "1", ...: the digits for MNIST)
    cifar-10-python.tar.gz,       CIFAR python tarballs as distributed: the training batches only
    cifar-100-python.tar.gz       (CIFAR-100 uses the 100 fine labels); class names from the meta file
                                  (CIFAR-10: the published names when batches.meta is missing)
    *.npz                         ``images`` uint8 [N, H, W], [N, H, W, C] or [N, C, H, W]; optional
                                  integer ``labels`` [N]
Augmentation and the ``edmkit dataset convert`` command live elsewhere (not in this module).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import math
import pickle
import re
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image

EMBEDDED = "mnist5k"
# The published CIFAR-10 class names (batches.meta label_names), for tarballs that lack the meta file.
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class ImageDataset:
    """An in-memory image dataset.

    Attributes:
        images: uint8 [N, C, H, W], contiguous, H == W, C = 1 or 3.
        labels: int64 [N] class indices in [0, num_classes), or None when unlabelled.
        num_classes: Number of classes; 0 when unlabelled.
        name: Human-readable source.
        class_names: One name per class (index order) when known (dataset.json, class folders, CIFAR,
            MNIST digits), else empty; ``classes=`` subsetting keeps them in the relabelled order.
    """

    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = field(repr=False)
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
            raise ValueError(f"{self.name}: images must be uint8 [N, 1|3, H, H], got {x.dtype} {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"{self.name}: images must be contiguous")
        if y is None:
            if self.num_classes != 0 or self.class_names:
                raise ValueError(f"{self.name}: unlabelled dataset must have num_classes 0 and no class names")
            return
        if y.dtype != torch.int64 or tuple(y.shape) != (len(x),) or self.num_classes < 1:
            raise ValueError(f"{self.name}: labels must be int64 [{len(x)}] with num_classes >= 1")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.name}: labels out of range [0, {self.num_classes})")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def resolution(self) -> int:
        """Image height = width in pixels."""
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        """1 (grayscale) or 3 (RGB)."""
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """The images (and labels) at ``indices``, in that order; classes are unchanged."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(self.images[index].contiguous(), labels, self.num_classes, self.name, self.class_names)


class _Raw(NamedTuple):
    """Decoded images before class filtering, geometry and channel conversion."""

    images: np.ndarray | list[np.ndarray]  # uint8 [N, H, W, C], or N arrays [H, W, C]; C = 1 or 3
    labels: np.ndarray | None  # int64 [N]
    num_classes: int
    class_names: tuple[str, ...]
    item_names: list[str] | None  # per-image file names for messages


def load_dataset(
    source: str | Path = EMBEDDED,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    classes: Sequence[int] | None = None,
    center_crop: bool = False,
    skip_bad: bool = False,
) -> ImageDataset:
    """Load a dataset fully into memory (formats: see the module docstring).

    Args:
        source: "mnist5k" (embedded) or a path to a folder, .zip, .npz, MNIST idx images file or
            CIFAR python tarball.
        resolution: Resize to resolution x resolution (PIL: box filter for integer downscales,
            Lanczos otherwise). None keeps the native size, which must then be the same for all.
        channels: 1 or 3 (grayscale <-> RGB; RGB -> gray uses PIL's ITU-R 601-2 luma). None keeps
            the native count (3 for a folder mixing grayscale and colour images).
        classes: Keep only these classes; labels are remapped to their position in this list, so
            classes=[7, 3] gives label 0 for class 7 and 1 for class 3.
        center_crop: Crop non-square images to their central square first (else they are an error).
        skip_bad: Skip unreadable files in folders/zips with a warning instead of raising.

    Returns:
        The dataset: images uint8 [N, C, R, R], labels int64 [N] or None.

    Raises:
        ValueError: unknown source, corrupt file, bad or missing labels, non-square or mixed sizes.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    raw, name = _read_source(source, skip_bad=skip_bad)
    if classes is not None:
        raw = _filter_classes(raw, classes, name=name)
    if len(raw.images) == 0:
        raise ValueError(f"{name}: no images")
    images = _uniform_images(raw, resolution=resolution, channels=channels, center_crop=center_crop, name=name)
    images = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C"))  # [N, C, H, W], own copy
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    num_classes = 0 if labels is None else raw.num_classes
    return ImageDataset(images, labels, num_classes, name, raw.class_names if labels is not None else ())


# ---------------------------------------------------------------------------------------------
# Source readers: each returns a _Raw with native sizes and channels.


def _read_source(source: str | Path, *, skip_bad: bool) -> tuple[_Raw, str]:
    """Dispatch on the source string; returns the decoded data and a human-readable name."""
    if str(source) == EMBEDDED:
        with resources.files("edmkit").joinpath("assets", "mnist5k.npz").open("rb") as f:
            raw = _read_npz(f, where="mnist5k")
        return raw._replace(class_names=_index_names(raw.num_classes)), "mnist5k (embedded MNIST subset)"
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"unknown dataset {source!r}: neither {EMBEDDED!r} nor an existing file or folder")
    lower = path.name.lower()
    if path.is_dir():
        return _read_folder(path, skip_bad=skip_bad), str(path)
    if lower.endswith(".zip"):
        return _read_zip(path, skip_bad=skip_bad), str(path)
    if lower.endswith(".npz"):
        with path.open("rb") as f:  # np.load(path) leaks its handle when the archive is corrupt
            return _read_npz(f, where=str(path)), str(path)
    if re.search(r"idx3-ubyte(\.gz)?$", lower):
        return _read_mnist_idx(path), str(path)
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return _read_cifar(path), str(path)
    hint = " (a labels file: pass the matching *-images-idx3-ubyte file)" if "idx1-ubyte" in lower else ""
    raise ValueError(f"{path}: unrecognised dataset file{hint}; expected a folder, .zip, .npz, "
                     "*-images-idx3-ubyte[.gz] or a CIFAR python .tar.gz")


def _check_labels(labels: np.ndarray | None, n: int, *, where: str,
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


def _index_names(num_classes: int) -> tuple[str, ...]:
    """Class names "0", "1", ..., "K-1" (MNIST's classes are the digits themselves)."""
    return tuple(str(c) for c in range(num_classes))


def _nhwc(images: np.ndarray, *, where: str) -> np.ndarray:
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


def _read_npz(file: BinaryIO, *, where: str) -> _Raw:
    """An .npz with ``images`` and optional ``labels`` (the embedded dataset uses this too)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in ("images", "labels")}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{where}: corrupt or truncated .npz ({e})") from e
    if "images" not in arrays:
        raise ValueError(f"{where}: no 'images' array in the .npz")
    images = _nhwc(arrays["images"], where=where)
    labels, num_classes = _check_labels(arrays.get("labels"), len(images), where=where)
    return _Raw(images, labels, num_classes, (), None)


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


def _read_mnist_idx(path: Path) -> _Raw:
    """MNIST idx images [N, H, W], with labels from the matching labels file when it exists."""
    images = _read_idx(path, ndim=3)
    label_path = path.with_name(re.sub(r"images([-.])idx3", r"labels\1idx1", path.name, flags=re.IGNORECASE))
    raw_labels = _read_idx(label_path, ndim=1) if label_path != path and label_path.exists() else None
    labels, num_classes = _check_labels(raw_labels, len(images), where=str(label_path))
    return _Raw(images[..., None], labels, num_classes, _index_names(num_classes), None)


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


def _read_cifar(path: Path) -> _Raw:
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
    labels, num_classes = _check_labels(np.concatenate(labels), len(images), where=str(path), num_classes=num_classes)
    meta = _unpickle_dict(files[meta_key], where=f"{path}:{meta_key}") if meta_key in files else {}
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, []))
    if len(names) != num_classes:
        names = CIFAR10_CLASS_NAMES if num_classes == 10 else ()
    return _Raw(images, labels, num_classes, names, None)


def _read_folder(root: Path, *, skip_bad: bool) -> _Raw:
    """All files below ``root`` (recursive)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return _read_collection(files, lambda name: (root / name).read_bytes(), where=str(root), skip_bad=skip_bad)


def _read_zip(path: Path, *, skip_bad: bool) -> _Raw:
    """All files in a zip archive, with the same rules as a folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = sorted(info.filename for info in archive.infolist() if not info.is_dir())
            return _read_collection(files, archive.read, where=str(path), skip_bad=skip_bad)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path}: corrupt or truncated zip archive ({e})") from e


def _is_data_file(name: str) -> bool:
    """False for dataset.json, hidden files and OS metadata folders (.DS_Store, __MACOSX)."""
    parts = PurePosixPath(name).parts
    return name != "dataset.json" and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _decode_image(data: bytes, *, where: str) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 1] (grayscale modes) or [H, W, 3] (everything else)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
            array = np.asarray(img.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: not a readable image ({e}); skip_bad=True skips such files") from e
    return array[..., None] if array.ndim == 2 else array


def _read_collection(files: list[str], read: Callable[[str], bytes], *, where: str, skip_bad: bool) -> _Raw:
    """Decode the image files of a folder or zip and attach their labels."""
    images, kept, bad = [], [], []
    for name in filter(_is_data_file, files):
        try:
            images.append(_decode_image(read(name), where=f"{where}/{name}"))
            kept.append(name)
        except ValueError:
            if not skip_bad:
                raise
            bad.append(name)
    if bad:
        warnings.warn(f"{where}: skipped {len(bad)} unreadable file(s), e.g. {bad[0]}", stacklevel=5)  # points at the caller of load_dataset
    if not kept:
        raise ValueError(f"{where}: no images found")
    if "dataset.json" in files:
        labels, num_classes, names = _json_labels(kept, read("dataset.json"), where=f"{where}/dataset.json")
    else:
        labels, num_classes, names = _subfolder_labels(kept)
    return _Raw(images, labels, num_classes, names, [f"{where}/{n}" for n in kept])


def _json_labels(names: list[str], text: bytes, *, where: str) -> tuple[np.ndarray | None, int, tuple[str, ...]]:
    """Labels from dataset.json {"labels": [[relpath, label], ...] | null, "class_names": [...]} for each of ``names``.

    The optional "class_names" (one string per class, index order) also fixes the class count, so
    classes without images keep their index; an empty list means no names.
    """
    try:
        meta = json.loads(text)
        entries, class_names = meta.get("labels"), meta.get("class_names") or []
        table = None if entries is None else {str(p).replace("\\", "/"): int(c) for p, c in entries}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f'{where}: expected {{"labels": [[relpath, label], ...]}} ({e})') from e
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f'{where}: "class_names" must be a list of strings, got {class_names!r:.80}')
    if table is None:
        return None, 0, ()
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where}: no label for {len(missing)} of {len(names)} images, e.g. {missing[0]}")
    labels, num_classes = _check_labels(np.array([table[n] for n in names]), len(names), where=where,
                                        num_classes=len(class_names) or None)
    return labels, num_classes, tuple(class_names)


def _natural_key(name: str) -> tuple[int, int, str]:
    """Sort key: digit-only names numerically ("2" < "10"), before the others alphabetically."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _subfolder_labels(names: list[str]) -> tuple[np.ndarray | None, int, tuple[str, ...]]:
    """Class = first folder below the deepest folder common to all images; unlabelled if some lie in it."""
    folders = [PurePosixPath(n).parts[:-1] for n in names]
    depth = 0
    while all(len(f) > depth for f in folders) and len({f[depth] for f in folders}) == 1:
        depth += 1  # strip wrapper folders shared by every image (e.g. a zip's top folder)
    if not all(len(f) > depth for f in folders):
        return None, 0, ()
    class_names = sorted({f[depth] for f in folders}, key=_natural_key)
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[f[depth]] for f in folders], dtype=np.int64), len(class_names), tuple(class_names)


# ---------------------------------------------------------------------------------------------
# Class selection, geometry and channels.


def _filter_classes(raw: _Raw, classes: Sequence[int], *, name: str) -> _Raw:
    """Keep the images of ``classes``; label c becomes classes.index(c)."""
    classes = [int(c) for c in classes]
    if raw.labels is None:
        raise ValueError(f"{name}: dataset has no labels, cannot select classes {classes}")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"{name}: classes must be non-empty without repeats, got {classes}")
    out_of_range = [c for c in classes if not 0 <= c < raw.num_classes]
    if out_of_range:
        raise ValueError(f"{name}: class index {out_of_range[0]} out of range [0, {raw.num_classes})")
    remap = np.full(raw.num_classes, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    keep = np.flatnonzero(remap[raw.labels] >= 0)
    images = raw.images[keep] if isinstance(raw.images, np.ndarray) else [raw.images[i] for i in keep]
    class_names = tuple(raw.class_names[c] for c in classes) if raw.class_names else ()
    item_names = None if raw.item_names is None else [raw.item_names[i] for i in keep]
    return _Raw(images, remap[raw.labels[keep]], len(classes), class_names, item_names)


def _square(image: np.ndarray, *, center_crop: bool, where: str) -> np.ndarray:
    """[H, W, C] -> its central [S, S, C], S = min(H, W); non-square without center_crop is an error."""
    h, w = image.shape[:2]
    if h == w:
        return image
    if not center_crop:
        raise ValueError(f"{where}: image is {w}x{h}, not square; use center_crop=True (--center-crop)")
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


def _resize(image: np.ndarray, resolution: int | None) -> np.ndarray:
    """Square [S, S, C] -> [R, R, C] with PIL: box filter for integer downscales, else Lanczos."""
    size = image.shape[0]
    if resolution is None or size == resolution:
        return image
    resample = Image.Resampling.BOX if size % resolution == 0 else Image.Resampling.LANCZOS
    out = np.asarray(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).resize(
        (resolution, resolution), resample=resample))
    return out[..., None] if out.ndim == 2 else out


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [..., C] -> [..., channels]: gray is repeated; RGB -> gray uses ITU-R 601-2 luma."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    r, g, b = (images[..., i].astype(np.uint32) for i in range(3))
    # PIL's fixed-point form of L = 0.299 R + 0.587 G + 0.114 B, so results equal Image.convert("L").
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def _uniform_images(raw: _Raw, *, resolution: int | None, channels: int | None, center_crop: bool,
                    name: str) -> np.ndarray:
    """Crop, resize and convert every image; returns uint8 [N, R, R, channels]."""
    images = raw.images
    if isinstance(images, np.ndarray) and images.shape[1] == images.shape[2] and resolution in (None, images.shape[1]):
        return _convert_channels(images, channels or images.shape[-1])  # fast path: already uniform
    where = (lambda i: raw.item_names[i]) if raw.item_names else (lambda i: f"{name} image #{i}")
    out = [_resize(_square(img, center_crop=center_crop, where=where(i)), resolution) for i, img in enumerate(images)]
    first_of_size: dict[tuple[int, ...], int] = {}
    for i, img in enumerate(out):
        first_of_size.setdefault(img.shape[:2], i)
    if len(first_of_size) > 1:
        (a, i), (b, j) = list(first_of_size.items())[:2]
        raise ValueError(f"{name}: mixed image sizes ({a[1]}x{a[0]} in {where(i)}, {b[1]}x{b[0]} in {where(j)}); "
                         "pass resolution=... (--resolution) to resize")
    channels = channels or max(img.shape[-1] for img in out)
    return np.stack([_convert_channels(img, channels) for img in out])


# ---------------------------------------------------------------------------------------------
# Pixel conversion, sampling order, image files.


def images_to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in [0, 255] -> float32 in [-1, 1]: x / 127.5 - 1."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"images_to_float expects uint8, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1


def float_to_images(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] in [-1, 1] -> uint8 in [0, 255]: round((x + 1) * 127.5), clamped."""
    return ((x.detach().to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def sample_order(*, num_items: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Dataset indices at positions [start, start + count) of the global sampling stream.

    Position i lies in epoch e = i // num_items, which visits every index once in the order of
    ``torch.randperm`` seeded with seed * 1_000_003 + e. A pure function of its arguments, so a
    resumed run continues exactly, and ranks can take disjoint slices whatever the world size.

    Returns:
        int64 [count].
    """
    if num_items < 1 or start < 0 or count < 0:
        raise ValueError(f"need num_items >= 1, start >= 0, count >= 0; got {num_items}, {start}, {count}")
    chunks, position, end = [], start, start + count
    while position < end:
        epoch, offset = divmod(position, num_items)
        take = min(end - position, num_items - offset)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
        chunks.append(torch.randperm(num_items, generator=generator)[offset:offset + take])
        position += take
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


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
    _to_pil(image_grid(x, nrow=nrow)).save(path)


def save_images(x: torch.Tensor, folder: str | Path, *, start_index: int = 0) -> None:
    """Save images [N, C, H, W] (uint8 or float in [-1, 1]) as folder/000000.png, 000001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_as_uint8(x)):
        _to_pil(image).save(folder / f"{start_index + i:06d}.png")
