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
Video sources (``data/videos.py``) load as clips, uint8 [N, C, T, H, W] with T the ``frames`` asked for:
    "movingmnist[-SIZE][:opts]"   Moving MNIST synthesised from the embedded digits (``data/movingmnist.py``)
    *.npz with ``videos``         uint8 [N, T, H, W(, C)]; longer clips are cut into windows of T frames
    folder/ of *.gif              one clip per GIF (sorted paths), cut the same way
One module per source format reads it (npz, idx, cifar, folder); augmentation and ``edmkit dataset convert`` sit beside
them in this package.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from edmkit.data.cifar import read_cifar
from edmkit.data.folder import read_folder, read_zip
from edmkit.data.idx import read_mnist_idx
from edmkit.data.images import images_to_float
from edmkit.data.latents import LatentDataset, is_latent_file, read_latents
from edmkit.data.npz import read_npz
from edmkit.data.raw import Raw, index_names
from edmkit.data.videos import clip_windows, is_video_source, read_clips

if TYPE_CHECKING:
    from edmkit.config import ExperimentConfig


EMBEDDED = "mnist5k"


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class ImageDataset:
    """An in-memory image (or clip) dataset.

    Attributes:
        images: uint8 [N, C, H, W], contiguous, H == W, C = 1 or 3; clips: uint8 [N, C, T, H, W].
        labels: int64 [N] class indices in [0, num_classes), or None when unlabelled.
        num_classes: Number of classes; 0 when unlabelled.
        name: Human-readable source.
        class_names: One name per class (index order) when known (dataset.json, class folders, CIFAR,
            MNIST digits), else empty; ``classes=`` subsetting keeps them in the relabelled order.
        context: float32 [N, L, D] token sequence per image (cross-attention conditioning, an npz ``context``), or None.
        joint_images: clips only: uint8 [M, C, H, W] images that joint image-video training appends to the clips
            (``train.image_data``), or None (it appends frames of other clips).
    """

    images: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = field(repr=False)
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()
    context: torch.Tensor | None = field(default=None, repr=False)
    joint_images: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if self.context is not None and (self.context.dtype != torch.float32 or self.context.ndim != 3 or len(self.context) != len(x)):
            raise ValueError(f"{self.name}: context must be float32 [{len(x)}, L, D], got {self.context.dtype} {tuple(self.context.shape)}")
        if x.dtype != torch.uint8 or x.ndim not in (4, 5) or x.shape[1] not in (1, 3) or x.shape[-2] != x.shape[-1]:
            raise ValueError(f"{self.name}: images must be uint8 [N, 1|3, H, H] (clips [N, 1|3, T, H, H]), got {x.dtype} {tuple(x.shape)}")
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

    def float_batch(self, idx: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the network sees of items ``idx``: pixels in [-1, 1] (``generator`` unused; latent datasets draw posterior samples)."""
        return images_to_float(self.images[idx])

    @property
    def resolution(self) -> int:
        """Image height = width in pixels."""
        return self.images.shape[-1]

    @property
    def frames(self) -> int:
        """Frames per clip; 0 for images."""
        return self.images.shape[2] if self.images.ndim == 5 else 0

    @property
    def channels(self) -> int:
        """1 (grayscale) or 3 (RGB)."""
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """The images (and labels, context) at ``indices``, in that order; classes and the joint images are unchanged."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[index]
        context = None if self.context is None else self.context[index]
        return dataclasses.replace(self, images=self.images[index].contiguous(), labels=labels, context=context)


def load_dataset(
    source: str | Path = EMBEDDED,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    classes: Sequence[int] | None = None,
    center_crop: bool = False,
    skip_bad: bool = False,
    frames: int = 0,
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
        frames: Frames per clip of a video source (0: Moving MNIST's 20, a file's own length); images refuse it.

    Returns:
        The dataset: images uint8 [N, C, R, R], labels int64 [N] or None, context float32 [N, L, D] or None.

    Raises:
        ValueError: unknown source, corrupt file, bad or missing labels, non-square or mixed sizes.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if is_video_source(source):
        return _load_clips(source, resolution=resolution, channels=channels, classes=classes, center_crop=center_crop, frames=frames)
    if frames:
        raise ValueError(f"{source}: images, but the network takes clips of {frames} frames: give a video source "
                         "(movingmnist, an npz with 'videos', a folder of GIFs)")
    raw, name = _read_source(source, skip_bad=skip_bad)
    if classes is not None:
        raw = _filter_classes(raw, classes, name=name)
    if len(raw.images) == 0:
        raise ValueError(f"{name}: no images")
    images = _uniform_images(raw, resolution=resolution, channels=channels, center_crop=center_crop, name=name)
    images = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C"))  # [N, C, H, W], own copy
    labels = None if raw.labels is None else torch.from_numpy(raw.labels.astype(np.int64))
    num_classes = 0 if labels is None else raw.num_classes
    context = None if raw.context is None else torch.from_numpy(raw.context)
    return ImageDataset(images, labels, num_classes, name, raw.class_names if labels is not None else (), context)


def _load_clips(source: str | Path, *, resolution: int | None, channels: int | None, classes: Sequence[int] | None,
                center_crop: bool, frames: int) -> ImageDataset:
    """A video source as clips uint8 [N, C, T, H, W]: frames fitted like images, clips cut into windows of ``frames``."""
    clips, labels, name = read_clips(source, size=resolution, frames=frames or None)
    if frames:
        labels = None if labels is None else np.repeat(labels, clips.shape[1] // frames)
        clips = clip_windows(clips, frames, where=name)
    n, t = clips.shape[:2]
    labels, num_classes = (None, 0) if labels is None else (labels, int(labels.max()) + 1)
    raw = Raw(clips.reshape(n * t, *clips.shape[2:]), None if labels is None else np.repeat(labels, t), num_classes, (), None)
    if classes is not None:
        raw = _filter_classes(raw, classes, name=name)
        n, num_classes = len(raw.images) // t, len(classes)
    if n == 0:
        raise ValueError(f"{name}: no clips")
    flat = _uniform_images(raw, resolution=resolution, channels=channels, center_crop=center_crop, name=name)  # [n T, R, R, C]
    images = torch.from_numpy(np.array(flat.reshape(n, t, *flat.shape[1:]).transpose(0, 4, 1, 2, 3), order="C"))  # [N, C, T, R, R]
    labels = None if raw.labels is None else torch.from_numpy(raw.labels[::t].astype(np.int64))
    return ImageDataset(images, labels, num_classes, name)


def _read_source(source: str | Path, *, skip_bad: bool) -> tuple[Raw, str]:
    """Dispatch on the source string; returns the decoded data and a human-readable name."""
    if str(source) == EMBEDDED:
        with resources.files("edmkit").joinpath("assets", "mnist5k.npz").open("rb") as f:
            raw = read_npz(f, where="mnist5k")
        return raw._replace(class_names=index_names(raw.num_classes)), "mnist5k (embedded MNIST subset)"
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"unknown dataset {source!r}: neither {EMBEDDED!r} nor an existing file or folder")
    lower = path.name.lower()
    if path.is_dir():
        return read_folder(path, skip_bad=skip_bad), str(path)
    if lower.endswith(".zip"):
        return read_zip(path, skip_bad=skip_bad), str(path)
    if lower.endswith(".npz"):
        with path.open("rb") as f:  # np.load(path) leaks its handle when the archive is corrupt
            return read_npz(f, where=str(path)), str(path)
    if re.search(r"idx3-ubyte(\.gz)?$", lower):
        return read_mnist_idx(path), str(path)
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return read_cifar(path), str(path)
    hint = " (a labels file: pass the matching *-images-idx3-ubyte file)" if "idx1-ubyte" in lower else ""
    raise ValueError(f"{path}: unrecognised dataset file{hint}; expected a folder, .zip, .npz, "
                     "*-images-idx3-ubyte[.gz] or a CIFAR python .tar.gz")


def _filter_classes(raw: Raw, classes: Sequence[int], *, name: str) -> Raw:
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
    context = None if raw.context is None else raw.context[keep]
    return Raw(images, remap[raw.labels[keep]], len(classes), class_names, item_names, context)


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


def _uniform_images(raw: Raw, *, resolution: int | None, channels: int | None, center_crop: bool,
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


def dataset_of(cfg: ExperimentConfig, source: str | None = None) -> ImageDataset | LatentDataset:
    """The images a config trains on (or ``source`` prepared the same way): resolution, channels, classes, crop.

    A latent dataset (``edmkit.data.latents``) must match the config's shape and the encoder it names (``train.encoder``).
    """
    n, t = cfg.network, cfg.train
    if is_latent_file(source or t.data):
        data = read_latents(source or t.data)
        if t.classes:
            if data.labels is None:
                raise ValueError(f"{data.name}: --classes needs labels, and this latent dataset has none")
            keep = [int(i) for i in torch.nonzero(torch.isin(data.labels, torch.tensor(t.classes))).flatten()]
            relabel = {c: i for i, c in enumerate(t.classes)}
            data = data.subset(keep)
            data = dataclasses.replace(data, labels=torch.tensor([relabel[int(v)] for v in data.labels]), num_classes=len(t.classes),
                                       class_names=tuple(data.class_names[c] for c in t.classes) if data.class_names else ())
        if (data.resolution, data.channels) != (n.resolution, n.channels):
            raise ValueError(f"{data.name}: latents are {data.channels}x{data.resolution}x{data.resolution}, the network takes "
                             f"{n.channels}x{n.resolution}x{n.resolution}")
        if not t.encoder or json.loads(t.encoder) != data.encoder:
            raise ValueError(f"{data.name}: latents of another encoder than the config names ({data.encoder.get('kind')}, "
                             f"{str(data.encoder.get('sha256', ''))[:12]}): convert the images again with the encoder of this run")
        return data
    if t.encoder:
        raise ValueError(f"{source or t.data}: pixel images, but this config trains on latents of a {json.loads(t.encoder).get('kind')}: "
                         "give the latent dataset (edmkit dataset convert SRC OUT.npz --vae DIR)")
    return load_dataset(source or t.data, resolution=n.resolution, channels=n.channels, classes=t.classes or None, center_crop=t.center_crop,
                        frames=n.frames)
