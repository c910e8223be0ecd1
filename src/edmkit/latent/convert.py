"""``edmkit dataset convert SRC DEST.npz --vae DIR``: an image dataset encoded once into a latent dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edmkit.data.dataset import load_dataset
from edmkit.data.latents import read_latents, write_latents
from edmkit.latent.encoder import encode_measured


def convert_to_latents(source: str | os.PathLike, dest: str | os.PathLike, *, vae: str | os.PathLike, resolution: int | None = None,
                       channels: int | None = None, classes: Sequence[int] | None = None, center_crop: bool = False,
                       skip_bad: bool = False, input_range: str = "[-1,1]", final_std: float = 0.5, batch: int = 8,
                       xflip: bool = False, progress: bool = False) -> str:
    """Encode every image of ``source`` (prepared as ``load_dataset`` does) and write the latent dataset ``dest``;
    returns a one-line summary. ``xflip`` also stores the moments of the mirrored images (training then takes either at
    random). The file is read back before this returns."""
    dest = Path(dest)
    if dest.suffix.lower() != ".npz":
        raise ValueError(f"{dest}: latent datasets are .npz files (name it {dest.with_suffix('.npz').name})")
    if final_std <= 0:
        raise ValueError(f"--sigma-data must be positive, got {final_std}")
    data = load_dataset(source, resolution=resolution, channels=channels, classes=classes, center_crop=center_crop, skip_bad=skip_bad)
    enc, mean, std = encode_measured(vae, data.images, final_std=final_std, input_range=input_range, batch_size=batch, progress=progress)
    flipped = enc.encode(data.images.flip(-1), progress=progress) if xflip else None  # the same constants as the originals'
    write_latents(dest, mean=mean, std=std, encoder=enc.spec, labels=data.labels, class_names=data.class_names, flipped=flipped)
    back = read_latents(dest)
    return (f"wrote {dest} (checked): {len(back)} latents {back.channels}x{back.resolution}x{back.resolution} of "
            f"{data.resolution}x{data.resolution}x{data.channels} images ({enc.factor}x downsampling), {back.num_classes} classes{', with mirrored images' if xflip else ''}; "
            f"per-channel raw mean {', '.join(f'{v:.3g}' for v in enc.raw_mean)}, std {', '.join(f'{v:.3g}' for v in enc.raw_std)}")
