"""Encoders: what turns images into what the network sees, and back (latent diffusion; EDM2 Sec. 5, App. C).

``Encoder`` is the one seam: ``decode(latents) -> images in [-1, 1]``, ``encode(images) -> moments`` (the posterior
mean and std of a VAE; pixels have std 0), ``latents(moments, noise)`` (a posterior sample, standardised), and a JSON
``spec`` that network files and latent datasets carry (``checkpoint.save_network(encoder=...)``).

Kinds (``encoder_from_spec``):

- ``pixels``: today's pipeline, x / 127.5 - 1; ``decode`` is the identity (bit-identical to the pixel path).
- ``diffusers-vae``: a diffusers ``AutoencoderKL`` (or ``AutoencoderTiny``) from a local folder (``save_pretrained``
  layout), loaded with networking off. Latents are standardised per channel to std sigma_data:
  final = (raw - raw_mean) * sigma_data / raw_std (EDM2's convention, with final_mean 0).
- ``stability-vae``: the spec of EDM2's published latent networks (``edmkit import`` of ``edm2-img512-*``): the same
  arithmetic with EDM2's constants and its [0, 1] VAE input range; the VAE itself (``stabilityai/sd-vae-ft-mse``)
  comes from a local folder (``--vae``), never from the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edmkit.data.images import images_to_float
from edmkit.files import file_sha256

INPUT_RANGES = ("[-1,1]", "[0,1]")  # what the VAE takes: diffusers' usual [-1, 1], or EDM2's [0, 1]


class Encoder:
    """Images <-> what the network sees. Subclasses set ``kind``, ``channels`` (latent), ``factor`` (downsampling)."""

    kind = "pixels"
    channels: int
    factor: int = 1

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [N, C, H, W] -> (mean, std) of the final latents, each [N, c, H / f, W / f] float32."""
        raise NotImplementedError

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A sample of the posterior: mean + std * noise (the mean when noise is None)."""
        return mean if noise is None else mean + std * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents [N, c, h, w] -> images [N, C, H, W] in [-1, 1] (float32)."""
        raise NotImplementedError

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def to(self, device: torch.device | str) -> "Encoder":
        """Run the encoder's own network (if any) on ``device``."""
        return self


class PixelEncoder(Encoder):
    """The identity: the network sees pixels in [-1, 1] (``images_to_float``)."""

    kind = "pixels"

    def __init__(self, channels: int = 3) -> None:
        self.channels = self.image_channels = channels

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_to_float(images)
        return x, torch.zeros_like(x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def vae_weights_file(folder: Path) -> Path:
    """The weights file of a diffusers model folder (safetensors preferred)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: no VAE weights (diffusion_pytorch_model.safetensors or .bin) in the folder")


def load_diffusers_vae(folder: str | os.PathLike) -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` / ``AutoencoderTiny`` from a local ``save_pretrained`` folder, no network access."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such VAE folder (a diffusers save_pretrained folder with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json: not a diffusers model folder")
    vae_weights_file(folder)
    try:
        import diffusers
    except ImportError:
        raise ValueError("latent networks need diffusers for the VAE: pip install -e \".[latent]\"") from None
    import json

    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ValueError(f"{folder}: a {class_name}, not an AutoencoderKL or AutoencoderTiny")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        vae = getattr(diffusers, class_name).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: cannot load the VAE ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False)


class StandardisedEncoder(Encoder):
    """An autoencoder's posterior, standardised per channel: final = (raw - raw_mean) * final_std / raw_std + final_mean
    (EDM2's recipe; final_std is the network's sigma_data). Subclasses run their model (``_encode_batch`` on images in
    the model's input range -> raw (mean, std); ``_decode_batch`` raw latents -> images in that range).

    Args:
        source: the model's folder or file (recorded in the spec with its weights' sha256).
        raw_mean, raw_std: per-channel mean / std of the raw latents (measured on the data, or EDM2's constants);
            None: the raw latents unchanged (to measure them).
        final_std, final_mean: of the standardised latents.
        input_range: "[-1,1]" or "[0,1]" (EDM2 feeds Stable Diffusion's VAE [0, 1]).
    """

    def __init__(self, source: str | os.PathLike, model: torch.nn.Module, *, kind: str, channels: int, image_channels: int, factor: int,
                 sha256: str, raw_mean: list[float] | None = None, raw_std: list[float] | None = None, final_std: float = 0.5,
                 final_mean: float = 0.0, input_range: str = "[-1,1]", batch_size: int = 8) -> None:
        if raw_mean is None or raw_std is None:  # no constants yet: final = raw (scale 1, bias 0), to measure them
            raw_mean, raw_std = [final_mean] * channels, [final_std] * channels
        if input_range not in INPUT_RANGES:
            raise ValueError(f"unknown input range {input_range!r}; valid: {', '.join(INPUT_RANGES)}")
        if len(raw_mean) != channels or len(raw_std) != channels:
            raise ValueError(f"{source}: the autoencoder has {channels} latent channels but the constants give {len(raw_mean)} / {len(raw_std)}")
        self.folder, self.model, self.kind, self.sha256 = Path(source), model, kind, sha256
        self.channels, self.image_channels, self.factor = channels, image_channels, factor
        self.input_range, self.batch_size = input_range, int(batch_size)
        self.raw_mean, self.raw_std = [float(v) for v in raw_mean], [float(v) for v in raw_std]
        self.final_mean, self.final_std = float(final_mean), float(final_std)

    def _encode_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _constants(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) [1, c, 1, 1] with final = raw * scale + bias."""
        scale = torch.tensor([self.final_std / s for s in self.raw_std], dtype=torch.float32, device=like.device)
        bias = self.final_mean - torch.tensor(self.raw_mean, dtype=torch.float32, device=like.device) * scale
        return scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)

    def encode(self, images: torch.Tensor, *, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        if images.shape[1] != self.image_channels:
            raise ValueError(f"{self.folder}: the autoencoder takes {self.image_channels}-channel images, got {images.shape[1]} (convert with --channels)")
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"{self.folder}: image size {images.shape[-1]} is not divisible by the autoencoder's factor {self.factor} (use --resolution)")
        means, stds = [], []
        with torch.no_grad():
            for batch in tqdm(images.split(self.batch_size), desc="encode", unit="batch", disable=not progress, dynamic_ncols=True):
                x = images_to_float(batch).to(device)
                mean, std = self._encode_batch((x + 1) / 2 if self.input_range == "[0,1]" else x)
                means.append(mean.float().cpu())
                stds.append(std.float().cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        scale, bias = self._constants(mean)
        return mean * scale + bias, std * scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scale, bias = self._constants(latents)
        raw = ((latents.to(torch.float32) - bias) / scale).to(device)
        with torch.no_grad():
            x = torch.cat([self._decode_batch(batch).float() for batch in raw.split(self.batch_size)])
        if self.input_range == "[0,1]":
            x = x * 2 - 1
        return x.clamp(-1, 1).to(latents.device)

    def to(self, device: torch.device | str) -> StandardisedEncoder:
        self.model.to(device)
        return self

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.folder), "sha256": self.sha256, "input_range": self.input_range,
                "raw_mean": self.raw_mean, "raw_std": self.raw_std, "final_mean": self.final_mean, "final_std": self.final_std,
                "latent_channels": self.channels, "factor": self.factor, "batch_size": self.batch_size}

    def with_constants(self, raw_mean: list[float], raw_std: list[float]) -> StandardisedEncoder:
        """The same encoder (same loaded model) with other constants."""
        import copy

        other = copy.copy(self)
        other.raw_mean, other.raw_std = [float(v) for v in raw_mean], [float(v) for v in raw_std]
        return other


class DiffusersVAE(StandardisedEncoder):
    """A diffusers ``AutoencoderKL`` / ``AutoencoderTiny`` from a local folder (kind ``diffusers-vae``, or
    ``stability-vae``: the spec of an imported EDM2 network, [0, 1] input)."""

    def __init__(self, folder: str | os.PathLike, *, kind: str = "diffusers-vae", vae: torch.nn.Module | None = None, **kw: Any) -> None:
        folder = Path(folder)
        vae = vae if vae is not None else load_diffusers_vae(folder)
        cfg = vae.config
        super().__init__(folder, vae, kind=kind, channels=int(cfg.latent_channels), image_channels=int(cfg.in_channels),
                         factor=2 ** (len(cfg.block_out_channels) - 1), sha256=file_sha256(vae_weights_file(folder)), **kw)

    def _encode_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode(x)
        dist = getattr(out, "latent_dist", None)
        return (dist.mean, dist.std) if dist is not None else (out.latents, torch.zeros_like(out.latents))

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


class EdmkitAE(StandardisedEncoder):
    """edmkit's own KL autoencoder (``edmkit train-autoencoder``) from its .safetensors file (kind ``edmkit-ae``)."""

    def __init__(self, path: str | os.PathLike, **kw: Any) -> None:
        from edmkit.latent.autoencoder import load_autoencoder

        model, cfg = load_autoencoder(path)
        super().__init__(path, model, kind="edmkit-ae", channels=cfg.latent_channels, image_channels=cfg.channels, factor=model.factor,
                         sha256=file_sha256(path), **kw)

    def _encode_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.model.encode(x)
        return mean, (0.5 * logvar).exp()

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)


def open_autoencoder(source: str | os.PathLike, **kw: Any) -> StandardisedEncoder:
    """A diffusers VAE folder, or an edmkit autoencoder file (.safetensors), with the given constants."""
    source = Path(source)
    if source.is_file():
        return EdmkitAE(source, **kw)
    return DiffusersVAE(source, **kw)


def posterior_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior samples z = mean + std * eps over a dataset ([N, c, h, w] each):
    E[z] = E[mean], Var[z] = Var[mean] + E[std^2] (the law of total variance)."""
    m = mean.to(torch.float64).transpose(0, 1).reshape(mean.shape[1], -1)
    s2 = std.to(torch.float64).transpose(0, 1).reshape(std.shape[1], -1) ** 2
    var = m.var(dim=1, unbiased=False) + s2.mean(dim=1)
    return m.mean(dim=1).tolist(), var.sqrt().tolist()


def encode_measured(source: str | os.PathLike, images: torch.Tensor, *, final_std: float = 0.5, input_range: str = "[-1,1]",
                    batch_size: int = 8, progress: bool = False) -> tuple[StandardisedEncoder, torch.Tensor, torch.Tensor]:
    """Encode ``images`` (uint8 [N, C, H, W]) once with the autoencoder ``source`` (a diffusers VAE folder or an edmkit
    autoencoder file), measuring its per-channel constants on them, so that the dataset's latents have mean 0 and std
    ``final_std`` per channel (EDM2's standardisation).

    Returns (the encoder with those constants, standardised posterior mean, std), each latent [N, c, h, w].
    """
    enc = open_autoencoder(source, final_std=final_std, input_range=input_range, batch_size=batch_size)  # no constants: raw latents
    mean, std = enc.encode(images, progress=progress)
    enc = enc.with_constants(*posterior_moments(mean, std))
    scale, bias = enc._constants(mean)
    return enc, mean * scale + bias, std * scale


def reconstruct(source: str | os.PathLike, images: torch.Tensor, *, input_range: str = "[-1,1]", batch_size: int = 8,
                progress: bool = False) -> torch.Tensor:
    """decode(posterior mean of encode(images)) as uint8 [N, C, H, W]: what the autoencoder keeps of the images, whose FID
    against the images' own reference is the floor a latent model's FID cannot beat."""
    from edmkit.data.images import float_to_images

    enc = open_autoencoder(source, input_range=input_range, batch_size=batch_size)
    mean, _ = enc.encode(images, progress=progress)
    return torch.cat([float_to_images(enc.decode(chunk)) for chunk in mean.split(256)])


def measured_vae(folder: str | os.PathLike, images: torch.Tensor, **kw: Any) -> StandardisedEncoder:
    """The encoder of :func:`encode_measured` alone."""
    return encode_measured(folder, images, **kw)[0]


def encoder_from_spec(spec: dict[str, Any] | None, *, vae: str | os.PathLike | None = None, channels: int = 3) -> Encoder:
    """The encoder a network file or latent dataset names. ``vae``: a local VAE folder (needed for the imported EDM2
    spec, whose VAE is a hub name; otherwise overrides the recorded path, which must hold the same weights)."""
    if spec is None or spec.get("kind") == "pixels":
        return PixelEncoder(channels)
    kind = spec.get("kind")
    if kind == "stability-vae":
        if vae is None:
            raise ValueError(f"this network works in the latent space of {spec.get('vae_name', 'a Stability AI VAE')}: give its local "
                             f"diffusers folder with --vae DIR (edmkit downloads nothing)")
        return DiffusersVAE(vae, raw_mean=spec["raw_mean"], raw_std=spec["raw_std"], final_mean=float(spec.get("final_mean", 0)),
                            final_std=float(spec.get("final_std", 0.5)), input_range="[0,1]", kind=kind,
                            batch_size=int(spec.get("batch_size", 8)))
    if kind in ("diffusers-vae", "edmkit-ae"):
        source = Path(vae if vae is not None else spec["path"])
        kw = dict(raw_mean=spec["raw_mean"], raw_std=spec["raw_std"], final_mean=float(spec.get("final_mean", 0)), final_std=float(spec["final_std"]),
                  input_range=spec.get("input_range", "[-1,1]"), batch_size=int(spec.get("batch_size", 8)))
        if kind == "edmkit-ae" and not source.is_file():
            raise ValueError(f"{source}: no such autoencoder file (this network's latents are of edmkit's autoencoder {spec['path']})")
        enc = EdmkitAE(source, **kw) if kind == "edmkit-ae" else DiffusersVAE(source, **kw)
        if spec.get("sha256") and enc.sha256 != spec["sha256"]:
            raise ValueError(f"{source}: autoencoder weights differ from the ones recorded (sha256 {enc.sha256[:12]} vs {spec['sha256'][:12]}): "
                             "latents of one encoder cannot be decoded by another")
        return enc
    raise ValueError(f"unknown encoder kind {kind!r} (this edmkit knows pixels, diffusers-vae, stability-vae, edmkit-ae)")
