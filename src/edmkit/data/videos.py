"""Clips in and out: video npz files, folders of GIFs, Moving MNIST (``movingmnist.py``); GIF grids and npz of clips.

Convention: float clips [N, C, T, H, W] in [-1, 1] as the model sees them; uint8 [N, T, H, W(, C)] on disk and in an
npz's ``videos`` array (optional integer ``labels`` [N]). ``read_clips`` returns uint8 [N, T, H, W, C] before the
dataset's resizing; ``data.dataset.load_dataset`` fits the frames to the network and cuts clips of its frame count.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from edmkit.data.images import float_to_images, image_grid, save_image_grid
from edmkit.data.movingmnist import is_moving_mnist, moving_mnist, parse_source
from edmkit.data.raw import check_labels
from edmkit.files import atomic_write


def is_video_source(source: str | Path) -> bool:
    """Moving MNIST, an npz with a ``videos`` array, or a folder holding GIFs."""
    if is_moving_mnist(str(source)):
        return True
    path = Path(source).expanduser()
    if path.is_dir():
        return any(path.rglob("*.gif"))
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return "videos" in npz.files
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error):
            return False  # read_npz reports the corrupt file
    return False


def read_clips(source: str | Path, *, size: int | None = None, frames: int | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 clips [N, T, H, W, C], int64 labels [N] or None, name) of a video source; Moving MNIST is synthesised at
    ``size`` x ``size`` with ``frames`` frames unless its string says otherwise."""
    if is_moving_mnist(str(source)):
        spec = parse_source(str(source), size=size, frames=frames)
        return moving_mnist(spec), None, f"{source} (synthesised Moving MNIST, {spec.clips} clips of {spec.frames} frames)"
    path = Path(source).expanduser()
    if not path.exists():
        raise OSError(f"{path} does not exist")
    if path.is_dir() or path.suffix.lower() == ".gif":
        return read_gifs(path), None, str(path)
    return (*read_video_npz(path), str(path))


def read_video_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``videos`` uint8 [N, T, H, W] or [N, T, H, W, C] (C = 1 or 3) and optional integer ``labels`` [N]."""
    with np.load(path, allow_pickle=False) as npz:
        if "videos" not in npz.files:
            raise ValueError(f"{path} has no 'videos' array (has: {', '.join(npz.files) or 'nothing'})")
        videos, labels = npz["videos"], npz["labels"] if "labels" in npz.files else None
    if videos.dtype != np.uint8 or videos.ndim not in (4, 5) or (videos.ndim == 5 and videos.shape[-1] not in (1, 3)):
        raise ValueError(f"{path}: videos must be uint8 [N, T, H, W] or [N, T, H, W, C] with C = 1 or 3, got {videos.dtype} {videos.shape}")
    labels, _ = check_labels(labels, len(videos), where=str(path))
    return (videos[..., None] if videos.ndim == 4 else videos), labels


def read_gifs(path: Path) -> np.ndarray:
    """A .gif file, or every ``*.gif`` below a folder (sorted), one clip each; all must share size and frame count (RGB
    if any is colour)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.gif"))
    if not files:
        raise ValueError(f"{path}: no .gif files (clips are an .npz with 'videos', a .gif or a folder of .gif files)")
    clips = []
    for file in files:
        with Image.open(file) as gif:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
        clips.append(np.stack(frames))
    shapes = {c.shape for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"{path}: GIFs of different sizes or frame counts {sorted(shapes)}; make them equal")
    out = np.stack(clips)  # [N, T, H, W, 3]
    gray = (out == out[..., :1]).all()
    return out[..., :1] if gray else out


def clip_windows(clips: np.ndarray, frames: int, *, where: str) -> np.ndarray:
    """Cut [N, T, ...] clips into non-overlapping windows of ``frames``: [N * (T // frames), frames, ...]."""
    n, t = clips.shape[:2]
    if t < frames:
        raise ValueError(f"{where}: clips of {t} frames are shorter than the network's {frames}")
    k = t // frames
    return clips[:, :k * frames].reshape(n * k, frames, *clips.shape[2:])


def joint_segments(frames: int, image_frames: int) -> torch.Tensor:
    """Segment ids [T + K] of a clip of T frames with K appended images (Ho et al. 2022, joint training): 0 for the clip's
    frames, 1..K for the images, so temporal attention keeps each image to itself (``nn.video.segment_mask``)."""
    return torch.cat([torch.zeros(frames, dtype=torch.int64), torch.arange(1, image_frames + 1)])


def random_frames(data_clips: torch.Tensor, count: int, *, generator: torch.Generator) -> torch.Tensor:
    """``count`` independent images: frame t of clip i, (i, t) uniform, of ``data_clips`` uint8 [N, C, T, H, W].
    Returns uint8 [count, C, H, W]."""
    N, _, T = data_clips.shape[:3]
    clip = torch.randint(N, (count,), generator=generator)
    frame = torch.randint(T, (count,), generator=generator)
    return data_clips[clip, :, frame]  # [count, C, H, W]


def clips_uint8(x: torch.Tensor) -> torch.Tensor:
    """float clips [N, C, T, H, W] in [-1, 1] (or uint8) -> uint8 [N, C, T, H, W] on the CPU."""
    if x.ndim != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected clips [N, 1|3, T, H, W], got shape {tuple(x.shape)}")
    return x.detach().cpu() if x.dtype == torch.uint8 else float_to_images(x.cpu())


def save_clip_grid_gif(x: torch.Tensor, path: str | Path, *, nrow: int | None = None, fps: float = 8.0) -> None:
    """Save clips [N, C, T, H, W] (float in [-1, 1] or uint8) as one looping GIF: frame t is the grid of every clip's frame t."""
    clips = clips_uint8(x)
    grids = [image_grid(clips[:, :, t], nrow=nrow).permute(1, 2, 0).numpy() for t in range(clips.shape[2])]
    frames = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g) for g in grids]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0))


def save_clip_strip(x: torch.Tensor, path: str | Path) -> None:
    """Save clips [N, C, T, H, W] as one PNG: a row of frames per clip (frames left to right)."""
    clips = clips_uint8(x)
    N, C, T, H, W = clips.shape
    save_image_grid(clips.transpose(1, 2).reshape(N * T, C, H, W), path, nrow=T)


def save_clip_npz(x: torch.Tensor, path: str | Path, **arrays: np.ndarray) -> None:
    """Save clips [N, C, T, H, W] as an npz with ``videos`` uint8 [N, T, H, W] (one channel) or [N, T, H, W, 3] (and ``arrays``)."""
    clips = clips_uint8(x).permute(0, 2, 3, 4, 1).numpy()  # [N, T, H, W, C]
    videos = clips[..., 0] if clips.shape[-1] == 1 else clips
    buffer = io.BytesIO()
    np.savez_compressed(buffer, videos=videos, **arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
