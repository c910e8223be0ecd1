"""edmkit's own autoencoder as a file: its configuration (``AEConfig``) and weights in one .safetensors file.

Metadata: ``format`` edmkit, ``kind`` autoencoder, ``config`` (AEConfig JSON), ``nimg``. Written by
``edmkit train-autoencoder`` (``edmkit.training.autoencoder``), read as an encoder by ``edmkit.latent.encoder.EdmkitAE``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from edmkit.files import atomic_write
from edmkit.nn.autoencoder import KLAutoencoder

LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class AEConfig:
    data: str = "mnist5k"                       # dataset source (as edmkit train --data)
    resolution: int = 28                        # image size (the data is resized to it); divisible by the factor
    channels: int = 1                           # image channels (1 or 3)
    classes: tuple[int, ...] = ()               # these classes only; () = all
    latent_channels: int = 4                    # c of the latents [c, H/f, W/f]
    model_channels: int = 32                    # width at the first level
    channel_mult: tuple[int, ...] = (1, 2)      # per-level width multipliers; factor f = 2^(levels - 1)
    num_blocks: int = 1                         # residual blocks per level
    loss: str = "l1"                            # reconstruction loss: l1 or l2 (no perceptual or adversarial term)
    kl_weight: float = 1e-4                     # weight of KL(posterior || N(0, I)), per latent element
    lr: float = 1e-3                            # Adam learning rate
    batch: int = 32                             # images per step
    total_nimg: int = 20_000                    # training length in images
    state_nimg: int = 5_000                     # resumable state, weights and report every this many images
    seed: int = 0                               # data order and posterior noise
    val_n: int = 256                            # held-out images for the reported PSNR (not trained on)

    def __post_init__(self) -> None:
        f = 2 ** (len(self.channel_mult) - 1)
        checks = [(self.resolution % f == 0, f"image size {self.resolution} is not divisible by the factor {f} of {len(self.channel_mult)} levels"),
                  (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
                  (self.loss in LOSSES, f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}"),
                  (self.kl_weight >= 0 and self.lr > 0, "need kl_weight >= 0 and lr > 0"),
                  (self.batch >= 1 and self.total_nimg >= self.batch and self.state_nimg > 0 and self.val_n >= 1,
                   "need batch >= 1, total_nimg >= batch, state_nimg > 0, val_n >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def build(self) -> KLAutoencoder:
        return KLAutoencoder(channels=self.channels, latent_channels=self.latent_channels, model_channels=self.model_channels,
                             channel_mult=self.channel_mult, num_blocks=self.num_blocks)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AEConfig:
        d = json.loads(text)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown autoencoder config fields: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_autoencoder(path: str | os.PathLike, model: KLAutoencoder, cfg: AEConfig, *, nimg: int) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors, metadata={"format": "edmkit", "kind": "autoencoder", "config": cfg.to_json(), "nimg": str(int(nimg))})
    atomic_write(path, lambda f: f.write(data))


def read_autoencoder_config(path: str | os.PathLike) -> AEConfig:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable autoencoder file ({e})") from None
    if meta.get("kind") != "autoencoder" or "config" not in meta:
        raise ValueError(f"{path}: not an edmkit autoencoder file (make one with edmkit train-autoencoder)")
    return AEConfig.from_json(meta["config"])


def load_autoencoder(path: str | os.PathLike) -> tuple[KLAutoencoder, AEConfig]:
    """The autoencoder of a file (eval mode, no gradients) and its config; a damaged file is a ValueError naming it."""
    cfg = read_autoencoder_config(path)
    model = cfg.build()
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, SafetensorError, OSError) as e:
        raise ValueError(f"{path}: autoencoder weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False), cfg
