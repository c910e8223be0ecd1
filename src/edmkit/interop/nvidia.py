"""NVIDIA's published EDM and EDM2 networks as edmkit network files (``edmkit import``), read without executing them.

Format facts (from the public EDM / EDM2 repositories, read to learn the layout; none of their code is used here):

- A file is a pickled dict written by the training loops: ``ema`` (the network) beside ``loss_fn``,
  ``augment_pipe`` / ``encoder`` and ``dataset_kwargs``. :mod:`edmkit.interop.pickle_reader` reads it as data.
- EDM2 (``training.networks_edm2``): ``Precond`` holding ``unet`` (``UNet``) and the uncertainty head
  ``logvar_fourier`` / ``logvar_linear``; preconditioning EDM's with c_noise = ln(sigma) / 4. Its parameter names are
  edmkit's EDM2 U-Net's (config G) one to one. EDM2 names files ``<name>-<kimg>-<sigma_rel>.pkl``; the image count is
  the kimg rounded up to a multiple of 1024 (the granularity of its snapshots).
- EDM (``training.networks``): ``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` / ``iDDPMPrecond`` holding ``model``
  (``SongUNet``: DDPM++ / NCSN++, or ``DhariwalUNet``: ADM), mapped onto edmkit's ``ddpmpp`` / ``ncsnpp`` / ``adm``
  backbones and the ``edm`` / ``vp`` / ``ve`` / ``iddpm`` formulations. Their fixed ``resample_filter`` buffers and
  iDDPM's sigma table ``u`` are recomputed here, not stored; iDDPM's ADM predicts [eps, variance] and only eps is
  used (EDM does the same), so its output conv keeps its first C rows. EDM files have no uncertainty head; edmkit's is
  initialised fresh (it only weights the training loss).

Every constructor option of the file is compared with what edmkit's class implements; any other value is an error
naming the option, never a silently different network.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edmkit.checkpoint import CheckpointError, build_denoiser
from edmkit.config import EMAConfig, ExperimentConfig, NetworkConfig, TrainConfig
from edmkit.diffusion import precond as pc
from edmkit.interop.pickle_reader import ModuleRecord, PersistentRecord, UnsafePickleError, children, named_tensors, read_pickle

# Constructor defaults of the published classes (their signatures), so options left at default compare too.
EDM2_UNET_DEFAULTS = {"model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_noise": None, "channel_mult_emb": None,
                      "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5, "concat_balance": 0.5,
                      "resample_filter": [1, 1], "channels_per_head": 64, "dropout": 0.0, "res_balance": 0.3, "attn_balance": 0.3,
                      "clip_act": 256}
SONGUNET_DEFAULTS = {"label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
                     "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0, "embedding_type": "positional",
                     "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}
DHARIWAL_DEFAULTS = {"label_dim": 0, "augment_dim": 0, "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_emb": 4,
                     "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.10, "label_dropout": 0}
# options that only act in training (or precision) and so do not change the imported network's function
TRAINING_ONLY = {"dropout", "label_dropout", "use_fp16"}

# EDM's preconditioning classes -> edmkit formulation, and the constants edmkit's formulation fixes
EDM_PRECONDS = {
    "EDMPrecond": ("edm", {}),
    "VPPrecond": ("vp", {"beta_d": pc.VP_BETA_D, "beta_min": pc.VP_BETA_MIN, "M": pc.VP_M}),
    "VEPrecond": ("ve", {}),
    "iDDPMPrecond": ("iddpm", {"C_1": pc.IDDPM_C1, "C_2": pc.IDDPM_C2, "M": pc.IDDPM_M}),
}
SNAPSHOT_NAME = re.compile(r"(?P<stem>.*)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)\.pkl")


@dataclass
class Imported:
    """An EDM / EDM2 network mapped onto edmkit: config, denoiser state dict and what was read."""

    cfg: ExperimentConfig
    state: dict[str, torch.Tensor]
    source: str                      # e.g. "EDM2 Precond/UNet"
    nimg: int = 0                    # training images, where the file name tells (EDM2)
    ema_std: float = 0.0             # EMA length sigma_rel, where the file name tells (EDM2); 0 = unknown
    encoder: dict[str, Any] | None = None  # EDM2's encoder record (kind + constants); None or kind "pixels" = pixel space
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = self.cfg.network
        return {"source": self.source, "arch": n.arch, "formulation": n.formulation, "parameters": sum(v.numel() for k, v in self.state.items()
                if not k.startswith("logvar_")), "resolution": n.resolution, "channels": n.channels, "label_dim": n.label_dim,
                "sigma_data": n.sigma_data, "nimg": self.nimg, "ema_std": self.ema_std,
                "space": "pixels" if self.encoder is None or self.encoder["kind"] == "pixels" else "latent"}


def _merged(record: PersistentRecord, defaults: dict[str, Any], *, names: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's constructor options with the class defaults filled in (positional arguments named by ``names``)."""
    kw = dict(defaults)
    kw.update(dict(zip(names, record.init_args)))
    kw.update(record.init_kwargs)
    return kw


def _require(path: Path, cls: str, kw: dict[str, Any], supported: dict[str, Any]) -> None:
    """Refuse an option edmkit's class does not implement (by name and value)."""
    for k, want in supported.items():
        got = kw.get(k, want)
        same = list(got) == list(want) if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)) else got == want
        if not same:
            raise CheckpointError(f"{path}: {cls} option {k}={got!r} is not supported by edmkit (it implements {k}={want!r})")
    unknown = set(kw) - set(supported) - TRAINING_ONLY - {"img_resolution", "img_channels", "in_channels", "out_channels", "label_dim",
                                                         "augment_dim", "model_channels", "channel_mult", "num_blocks", "attn_resolutions"}
    if unknown:
        raise CheckpointError(f"{path}: {cls} has options this edmkit does not know ({', '.join(sorted(unknown))}): a newer layout")


def _child(path: Path, record: PersistentRecord, name: str, classes: tuple[str, ...]) -> PersistentRecord:
    sub = children(record).get(name)
    if not isinstance(sub, PersistentRecord) or sub.class_name not in classes:
        found = sub.class_name if isinstance(sub, (PersistentRecord, ModuleRecord)) else type(sub).__name__
        raise CheckpointError(f"{path}: {record.class_name}.{name} is {found}, expected {' or '.join(classes)}")
    return sub


def _attr(record: PersistentRecord, name: str, default: Any) -> Any:
    """A plain attribute of a record's state (e.g. sigma_data), falling back to the class default."""
    value = record.state.get(name, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _edm2(path: Path, top: PersistentRecord) -> tuple[NetworkConfig, dict[str, torch.Tensor], str]:
    unet = _child(path, top, "unet", ("UNet",))
    kw = _merged(unet, EDM2_UNET_DEFAULTS)
    fixed = ("label_balance", "concat_balance", "resample_filter", "channels_per_head", "res_balance", "attn_balance", "clip_act")
    _require(path, "UNet", kw, {k: EDM2_UNET_DEFAULTS[k] for k in fixed} | {k: kw[k] for k in ("channel_mult_noise", "channel_mult_emb")})
    noise_mult, emb_mult = kw["channel_mult_noise"] or kw["channel_mult"][0], kw["channel_mult_emb"] or max(kw["channel_mult"])
    if (noise_mult, emb_mult) != (1, 4):
        raise CheckpointError(f"{path}: UNet noise / embedding widths are {noise_mult} / {emb_mult} x model_channels; edmkit's EDM2 U-Net "
                              f"has 1 / 4 (channel_mult_noise, channel_mult_emb, or channel_mult starting at 1 and peaking at 4)")
    n = NetworkConfig(arch="edm2-unet", resolution=int(kw["img_resolution"]), channels=int(kw["img_channels"]), label_dim=int(kw["label_dim"]),
                      model_channels=int(kw["model_channels"]), channel_mult=tuple(kw["channel_mult"]), num_blocks=int(kw["num_blocks"]),
                      attn_resolutions=tuple(kw["attn_resolutions"]), channels_per_head=64, dropout=float(kw["dropout"]), ladder="G",
                      formulation="edm", sigma_data=_attr(top, "sigma_data", 0.5),
                      logvar_channels=int(_merged(top, {"logvar_channels": 128}).get("logvar_channels", 128)))
    state = {("net." + k[len("unet."):] if k.startswith("unet.") else k): v for k, v in named_tensors(top)}
    return n, state, "EDM2 Precond/UNet"


def _edm(path: Path, top: PersistentRecord) -> tuple[NetworkConfig, dict[str, torch.Tensor], str]:
    formulation, constants = EDM_PRECONDS[top.class_name]
    for k, want in constants.items():
        got = _attr(top, k, want)
        if not math.isclose(float(got), float(want), rel_tol=1e-9):
            raise CheckpointError(f"{path}: {top.class_name} with {k}={got:g}; edmkit's {formulation} formulation fixes {k}={want:g}")
    model = _child(path, top, "model", ("SongUNet", "DhariwalUNet"))
    if model.class_name == "SongUNet":
        from edmkit.nn.songunet import VARIANTS

        kw = _merged(model, SONGUNET_DEFAULTS, names=("img_resolution", "in_channels", "out_channels"))
        switches = ("embedding_type", "encoder_type", "decoder_type", "resample_filter", "channel_mult_noise")
        arch = next((name for name, v in VARIANTS.items() if all(list(kw[s]) == list(v[s]) if isinstance(v[s], tuple) else kw[s] == v[s]
                                                                 for s in switches)), None)
        if arch is None:
            raise CheckpointError(f"{path}: SongUNet with {', '.join(f'{s}={kw[s]!r}' for s in switches)} is neither DDPM++ nor NCSN++ as "
                                  f"edmkit implements them ({'; '.join(f'{a}: {dict(v)}' for a, v in VARIANTS.items())})")
        _require(path, "SongUNet", kw, {**{s: kw[s] for s in switches}, "channel_mult_emb": 4})
    else:
        arch = "adm"
        kw = _merged(model, DHARIWAL_DEFAULTS, names=("img_resolution", "in_channels", "out_channels"))
        _require(path, "DhariwalUNet", kw, {"channel_mult_emb": 4})
    channels = int(kw["in_channels"])
    out = int(kw["out_channels"])
    if out != channels * (2 if formulation == "iddpm" else 1):
        raise CheckpointError(f"{path}: {model.class_name} maps {channels} to {out} channels; {top.class_name} expects {channels * (2 if formulation == 'iddpm' else 1)}")
    n = NetworkConfig(arch=arch, resolution=int(kw["img_resolution"]), channels=channels, label_dim=int(kw["label_dim"]),
                      model_channels=int(kw["model_channels"]), channel_mult=tuple(kw["channel_mult"]), num_blocks=int(kw["num_blocks"]),
                      attn_resolutions=tuple(kw["attn_resolutions"]), channels_per_head=64, dropout=float(kw["dropout"]),
                      formulation=formulation, sigma_data=_attr(top, "sigma_data", 0.5), augment_dim=int(kw["augment_dim"]))
    state = {}
    for k, v in named_tensors(top):
        if k.endswith("resample_filter") or k == "u":
            continue  # fixed filters and iDDPM's sigma table: recomputed by edmkit
        if k.startswith("model."):
            k = "net." + k[len("model."):]
        if out != channels and k.startswith("net.out_conv."):
            v = v[:channels]  # iDDPM: [eps, variance] -> eps (EDM's iDDPMPrecond uses the first C channels only)
        state[k] = v
    return n, state, f"EDM {top.class_name}/{model.class_name}"


def read_network(path: str | os.PathLike, *, stds: tuple[float, ...] | None = None) -> Imported:
    """Map one EDM / EDM2 network pickle onto edmkit (config + state dict, checked by a strict load).

    ``stds``: the EMA lengths of the snapshot series the file belongs to (``snapshot_series``), recorded in the config
    so that ``edmkit phema`` takes the imported files as one run; None for a single file.

    Raises:
        CheckpointError / UnsafePickleError (both ValueError): naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    obj = read_pickle(path)
    top = obj.get("ema") if isinstance(obj, dict) else obj
    if not isinstance(top, PersistentRecord):
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no EDM / EDM2 network under 'ema' (found: {keys})")
    if top.class_name == "Precond":
        n, state, source = _edm2(path, top)
    elif top.class_name in EDM_PRECONDS:
        n, state, source = _edm(path, top)
    else:
        raise CheckpointError(f"{path}: unknown network class {top.class_name!r} (edmkit imports EDM2 Precond and EDM "
                              f"{', '.join(EDM_PRECONDS)})")
    encoder = _encoder(obj.get("encoder") if isinstance(obj, dict) else None)
    nimg, ema_std = _name_facts(path) if top.class_name == "Precond" else (0, 0.0)
    if stds is not None:
        ema = EMAConfig(stds=tuple(stds), sample_std=ema_std if ema_std in stds else stds[0])
    else:
        ema = EMAConfig(stds=(ema_std,), sample_std=ema_std) if ema_std else EMAConfig(sample_std=0.0)
    latent = encoder is not None and encoder["kind"] != "pixels"
    cfg = ExperimentConfig(network=n, ema=ema, train=TrainConfig(data=f"imported:{path.name}",
                                                                encoder=json.dumps(encoder, sort_keys=True) if latent else ""))
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    net = build_denoiser(cfg)
    if top.class_name != "Precond":  # EDM has no uncertainty head: edmkit's init (it weights the training loss only)
        state.update({k: v for k, v in net.state_dict().items() if k.startswith(("logvar_fourier.", "logvar_linear."))})
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        detail = "; ".join(f"{what}: {', '.join(sorted(keys)[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(f"{path}: weights do not match edmkit's {n.arch} ({detail})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match edmkit's {n.arch} ({str(e).splitlines()[-1].strip()})") from None
    notes = [] if top.class_name == "Precond" else ["EDM files carry no uncertainty head: u(sigma) starts fresh (it weights training only)"]
    if encoder is not None and encoder["kind"] != "pixels":
        notes.append(f"latent-space network ({encoder['kind']}, VAE {encoder.get('vae_name', '?')}): edmkit generate decodes its "
                     f"samples with a local copy of that VAE (--vae DIR); metrics and restoration take pixel-space networks only")
    return Imported(cfg=cfg, state=state, source=source, nimg=nimg, ema_std=ema_std, encoder=encoder, notes=notes)


def snapshot_series(folder: str | os.PathLike) -> list[tuple[Path, int, float]]:
    """The EDM2 EMA snapshots of a folder as (file, images, sigma_rel), oldest first, from their names
    ``<name>-<kimg>-<std>.pkl`` (EDM2's ``reconstruct_phema.py`` reads them the same way).

    Raises ValueError: no .pkl files, a .pkl whose name does not tell its time and EMA length, or two files for one
    (time, EMA length).
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.pkl"))
    if not files:
        raise ValueError(f"{folder}: no .pkl files (expected EDM2 snapshots named <name>-<kimg>-<sigma_rel>.pkl)")
    plan, seen = [], {}
    for f in files:
        nimg, std = _name_facts(f)
        if not std:
            raise ValueError(f"{f}: name does not tell the snapshot's time and EMA length (<name>-<kimg>-<sigma_rel>.pkl)")
        if (nimg, std) in seen:
            raise ValueError(f"{f} and {seen[nimg, std].name} are both the sigma_rel {std:g} snapshot at {nimg} images")
        seen[nimg, std] = f
        plan.append((f, nimg, std))
    return sorted(plan, key=lambda p: (p[1], p[2]))


def _name_facts(path: Path) -> tuple[int, float]:
    """(images, sigma_rel) from an EDM2 file name ``<name>-<kimg>-<std>.pkl``; (0, 0.0) when the name does not tell."""
    m = SNAPSHOT_NAME.fullmatch(path.name)
    if not m:
        return 0, 0.0
    kimg, std = int(m["kimg"]), float(m["std"])
    nimg = (kimg * 1000 + 999) // 1024 * 1024  # EDM2 saves every multiple of 1024 images and names the file by nimg // 1000
    return nimg, std if 0 < std < 0.28 else 0.0


def _encoder(record: Any) -> dict[str, Any] | None:
    """EDM2's encoder record as a JSON-able spec: pixels (StandardRGBEncoder) or the Stable Diffusion VAE's constants."""
    if record is None:
        return None
    if not isinstance(record, PersistentRecord):
        raise UnsafePickleError(f"encoder entry of type {type(record).__name__}")
    kw = record.init_kwargs
    if record.class_name == "StandardRGBEncoder":
        return {"kind": "pixels", "class": record.class_name}
    if record.class_name == "StabilityVAEEncoder":
        keys = ("vae_name", "raw_mean", "raw_std", "final_mean", "final_std", "batch_size")
        return {"kind": "stability-vae", "class": record.class_name, **{k: _plain(kw[k]) for k in keys if k in kw}}
    return {"kind": "unknown", "class": record.class_name}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
