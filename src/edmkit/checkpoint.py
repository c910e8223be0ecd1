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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from edmkit.config import ExperimentConfig, NetworkConfig
from edmkit.diffusion.classifier import NoisyClassifier, build_classifier
from edmkit.diffusion.precond import Denoiser
from edmkit.files import atomic_write
from edmkit.nn.build import build_network

FORMAT = "edmkit"
FORMAT_VERSION = 1
STATE_GLOB = "state-*.pt"
EMA_CHOICE_DIR = "ema-choice"    # <run>/ema-choice/: the end-of-training EMA choice (training.ema_choice)
EMA_CHOICE_FILE = "choice.json"  # its summary, written last


class CheckpointError(ValueError):
    """A file is missing, truncated, or not an edmkit checkpoint."""


def build_denoiser(cfg: ExperimentConfig) -> Denoiser:
    """The denoiser a config describes: its backbone (``nn.build.build_network``) inside the preconditioning."""
    n = cfg.network
    return Denoiser(build_network(n), sigma_data=n.sigma_data, formulation=n.formulation, logvar_channels=n.logvar_channels)


def save_network(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, cfg: ExperimentConfig, nimg: int, ema_std: float,
                 kind: str = "denoiser", source: str = "") -> None:
    """Write a network (safetensors) whose metadata carries everything needed to rebuild it.

    ``kind`` is ``denoiser`` (read by ``load_network``) or ``classifier`` (:func:`load_classifier`);
    denoiser files leave the ``kind`` entry out, as files written before it existed do. ``source`` says where imported
    weights came from (``edmkit import``). The space the network works in is its config's ``train.encoder``.
    """
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": cfg.to_json(),
                "nimg": str(int(nimg)), "ema_std": repr(float(ema_std))}
    if kind != "denoiser":
        metadata["kind"] = kind
    if source:
        metadata["source"] = source
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_network_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a network file: ``config`` (ExperimentConfig), ``nimg`` (int), ``ema_std`` (float), ``kind`` (str),
    ``source`` (str, "" unless imported), ``encoder`` (dict, or None for pixel space)."""
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
    try:
        _check_version(path, int(meta.get("format_version", -1)))
        cfg = ExperimentConfig.from_json(meta["config"])
        return {"config": cfg, "nimg": int(meta["nimg"]), "ema_std": float(meta["ema_std"]), "kind": meta.get("kind", "denoiser"),
                "source": meta.get("source", ""), "encoder": json.loads(cfg.train.encoder) if cfg.train.encoder else None}
    except KeyError as e:
        raise CheckpointError(f"{path}: edmkit metadata without its {e.args[0]!r} entry (a damaged or hand-made file); use another file") from None
    except ValueError as e:  # CheckpointError included: its message already names the file
        raise e if isinstance(e, CheckpointError) else CheckpointError(f"{path}: damaged edmkit metadata ({e}); use another file") from None


def _check_version(path: str | os.PathLike, version: int) -> None:
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this edmkit ({FORMAT_VERSION}); upgrade edmkit to read it")


def load_network(path: str | os.PathLike, *, device: torch.device | str = "cpu", latent: bool = False) -> tuple[Denoiser, dict[str, Any]]:
    """Rebuild the denoiser from a network file's config and load its weights strictly; returns (net in eval mode, metadata).

    A network of a latent space (``meta["encoder"]``, e.g. an imported EDM2 ImageNet-512 file) is refused unless
    ``latent``: its samples are latents, to be decoded with ``edmkit.latent.encoder.encoder_from_spec(meta["encoder"])``.
    """
    meta = read_network_metadata(path)
    if meta["kind"] != "denoiser":
        raise CheckpointError(f"{path}: a {meta['kind']} file, not a denoiser (load a classifier with edmkit.checkpoint.load_classifier)")
    if not latent and meta["encoder"] is not None and meta["encoder"].get("kind") != "pixels":
        raise CheckpointError(f"{path}: a latent-space network ({meta['encoder'].get('kind')}): this works on pixel-space networks only "
                              f"(edmkit generate samples and decodes latent networks: --vae DIR)")
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
    _check_version(path, int(state.get("format_version", -1)))
    return state


def state_path(run_dir: str | os.PathLike, nimg: int) -> Path:
    return Path(run_dir) / f"state-{nimg:012d}.pt"


def list_states(run_dir: str | os.PathLike) -> list[Path]:
    """Training states in a run folder, oldest first (by the image count in the name)."""
    return sorted(Path(run_dir).glob(STATE_GLOB))


def network_path(run_dir: str | os.PathLike, nimg: int, ema_std: float) -> Path:
    return Path(run_dir) / f"network-{nimg:012d}-{ema_std:.3f}.safetensors"


def chosen_network(run_dir: str | os.PathLike) -> Path | None:
    """The network of the run's end-of-training EMA choice (``training.ema_choice``) when it was made at the run's newest
    snapshot; None otherwise (no choice, or training went on after it)."""
    run_dir = Path(run_dir)
    summary = run_dir / EMA_CHOICE_DIR / EMA_CHOICE_FILE
    files = sorted(run_dir.glob("network-*.safetensors"))
    if not summary.is_file() or not files:
        return None
    try:
        choice = json.loads(summary.read_text())
        path, nimg = run_dir / EMA_CHOICE_DIR / choice["network"], int(choice["nimg"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{summary}: damaged EMA-choice summary; delete the folder {summary.parent} to choose again") from None
    return path if path.is_file() and nimg == read_network_metadata(files[-1])["nimg"] else None


def find_network(source: str | os.PathLike, *, ema_std: float | None = None) -> Path:
    """Resolve ``--checkpoint``: a network file, or a run folder: its EMA choice (``chosen_network``), else its newest
    network file with the run's sampling EMA; ``ema_std`` asks for that EMA instead."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint file or run folder")
    files = sorted(source.glob("network-*.safetensors"))
    if not files:
        raise CheckpointError(f"{source}: run folder has no network-*.safetensors files yet")
    if ema_std is None and (chosen := chosen_network(source)) is not None:
        return chosen
    if ema_std is None:
        cfg_file = source / "config.json"
        ema_std = ExperimentConfig.from_json(cfg_file.read_text()).ema.sample_std if cfg_file.is_file() else None
    if ema_std is not None:
        matching = [f for f in files if f.stem.endswith(f"-{ema_std:.3f}")]
        files = matching or files
    return files[-1]


def load_classifier(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> tuple[NoisyClassifier, dict[str, Any]]:
    """Rebuild a classifier from its file's config and load its weights strictly; returns (classifier in eval mode, metadata)."""
    meta = read_network_metadata(path)
    if meta["kind"] != "classifier":
        raise CheckpointError(f"{path}: a {meta['kind']} file, not a classifier (train one with edmkit train-classifier)")
    clf = build_classifier(meta["config"]).to(device)
    try:
        clf.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: classifier weights do not match its config ({str(e).splitlines()[0]})") from None
    return clf.eval().requires_grad_(False), meta


def check_classifier(model: NetworkConfig, classifier: NetworkConfig, *, class_idx: int | None = None) -> None:
    """Refuse a classifier of other images than the model's: resolution, channels, class count, class index."""
    if (model.resolution, model.channels) != (classifier.resolution, classifier.channels):
        raise ValueError(f"classifier takes {classifier.resolution}x{classifier.resolution}x{classifier.channels} images "
                         f"but the model makes {model.resolution}x{model.resolution}x{model.channels}")
    if model.label_dim and model.label_dim != classifier.label_dim:
        raise ValueError(f"classifier has {classifier.label_dim} classes but the model has {model.label_dim}")
    if class_idx is not None and not 0 <= class_idx < classifier.label_dim:
        raise ValueError(f"class {class_idx} out of range: the classifier has {classifier.label_dim} classes (0-{classifier.label_dim - 1})")
