"""Persistence: safetensors network files with config metadata, and resumable training states.

- Network files (``*.safetensors``): the denoiser's state dict plus metadata ``format`` (``edmkit``),
  ``format_version``, ``config`` (the resolved ExperimentConfig JSON), ``nimg`` and ``ema_std``
  (0 for raw weights). Loading rebuilds the network from the config and loads strictly.
- Training states (``state-*.pt``): only tensors and plain containers, so
  ``torch.load(weights_only=True)`` reads them; no pickled code or classes.
- Every write goes to a temporary file in the same folder, is flushed to disk and then renamed over
  the target, so a crash or a full disk never leaves a damaged file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes, safe_open

from edmkit.config import ExperimentConfig
from edmkit.nn.unet import UNet
from edmkit.precond import Denoiser

FORMAT = "edmkit"
FORMAT_VERSION = 1
STATE_GLOB = "state-*.pt"


class CheckpointError(ValueError):
    """A file is missing, truncated, or not an edmkit checkpoint."""


def build_denoiser(cfg: ExperimentConfig) -> Denoiser:
    """Build the network a config describes (the only place networks are constructed from configs)."""
    n = cfg.network
    net = UNet(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, model_channels=n.model_channels,
               channel_mult=n.channel_mult, num_blocks=n.num_blocks, attn_resolutions=n.attn_resolutions,
               channels_per_head=n.channels_per_head, dropout=n.dropout, ladder=n.ladder, augment_dim=n.augment_dim,
               cond_channels=n.cond_channels)
    return Denoiser(net, sigma_data=n.sigma_data, formulation=n.formulation, logvar_channels=n.logvar_channels)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_network(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, cfg: ExperimentConfig, nimg: int, ema_std: float,
                 kind: str = "denoiser") -> None:
    """Write a network (safetensors) whose metadata carries everything needed to rebuild it.

    ``kind`` is ``denoiser`` (read by ``load_network``) or ``classifier`` (``edmkit.classifier.load_classifier``);
    denoiser files leave the ``kind`` entry out, as files written before it existed do.
    """
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": cfg.to_json(),
                "nimg": str(int(nimg)), "ema_std": repr(float(ema_std))}
    if kind != "denoiser":
        metadata["kind"] = kind
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_network_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a network file: ``config`` (ExperimentConfig), ``nimg`` (int), ``ema_std`` (float), ``kind`` (str)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an edmkit checkpoint (no edmkit metadata)")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this edmkit ({FORMAT_VERSION})")
    return {"config": ExperimentConfig.from_json(meta["config"]), "nimg": int(meta["nimg"]), "ema_std": float(meta["ema_std"]),
            "kind": meta.get("kind", "denoiser")}


def load_network(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> tuple[Denoiser, dict[str, Any]]:
    """Rebuild the denoiser from a network file's config and load its weights strictly; returns (net in eval mode, metadata)."""
    meta = read_network_metadata(path)
    if meta["kind"] != "denoiser":
        raise CheckpointError(f"{path}: a {meta['kind']} file, not a denoiser (load a classifier with edmkit.classifier.load_classifier)")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt weights ({e})") from None
    net = build_denoiser(meta["config"]).to(device)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return net.eval().requires_grad_(False), meta


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a resumable training state atomically (tensors and plain containers only)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``; a truncated or foreign file raises CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an edmkit training state")
    return state


def state_path(run_dir: str | os.PathLike, nimg: int) -> Path:
    return Path(run_dir) / f"state-{nimg:012d}.pt"


def list_states(run_dir: str | os.PathLike) -> list[Path]:
    """Training states in a run folder, oldest first (by the image count in the name)."""
    return sorted(Path(run_dir).glob(STATE_GLOB))


def network_path(run_dir: str | os.PathLike, nimg: int, ema_std: float) -> Path:
    return Path(run_dir) / f"network-{nimg:012d}-{ema_std:.3f}.safetensors"


def find_network(source: str | os.PathLike, *, ema_std: float | None = None) -> Path:
    """Resolve ``--checkpoint``: a network file, or a run folder (newest network file with the run's sampling EMA)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint file or run folder")
    files = sorted(source.glob("network-*.safetensors"))
    if not files:
        raise CheckpointError(f"{source}: run folder has no network-*.safetensors files yet")
    if ema_std is None:
        cfg_file = source / "config.json"
        ema_std = ExperimentConfig.from_json(cfg_file.read_text()).ema.sample_std if cfg_file.is_file() else None
    if ema_std is not None:
        matching = [f for f in files if f.stem.endswith(f"-{ema_std:.3f}")]
        files = matching or files
    return files[-1]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write a JSON file."""
    text = json.dumps(obj, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(text))
