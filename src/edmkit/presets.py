"""Named presets, and the one function that turns a preset (or a config file) plus overrides into a resolved config.

``resolve_config(base, **overrides)`` is what ``edmkit train`` calls with its flags (``None`` = keep the base's
value) and what Python users call for the same result. It applies, in this order, so that derived values yield to
explicit ones: the EDM2 rung (``ladder``) and the ``formulation`` with the values they derive; the plain field
overrides of :data:`FIELDS`; ``cond`` (class count read from the data), ``context`` (token width read from the data)
and ``p_uncond``; ``augment_p`` with the
augment-label width it needs; the cascade ``task``; the in-training evaluation. The super-resolution stage's
config rules (:func:`resolve_sr`, :func:`check_sr_config`) live here too, being pure config.

This module sits above ``data`` (``cond`` counts the dataset's classes, ``augment_p`` needs the augment-label width).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edmkit.config import (
    FORMULATIONS,
    EMAConfig,
    ExperimentConfig,
    LossConfig,
    NetworkConfig,
    OptimConfig,
    TrainConfig,
    ladder_switches,
    parse_metrics,
)


def _preset(network: dict | None = None, loss: dict | None = None, optim: dict | None = None, ema: dict | None = None, train: dict | None = None) -> ExperimentConfig:
    return ExperimentConfig(NetworkConfig(**(network or {})), LossConfig(**(loss or {})), OptimConfig(**(optim or {})),
                            EMAConfig(**(ema or {})), TrainConfig(**(train or {})))


PRESETS: dict[str, ExperimentConfig] = {
    # seconds on CPU: tests and smoke runs
    "tiny": _preset(network=dict(model_channels=8, channel_mult=(1, 2), attn_resolutions=(14,), channels_per_head=16, logvar_channels=16),
                    optim=dict(lr_ref_nimg=2000, warmup_nimg=64),
                    ema=dict(snapshot_nimg=256),
                    train=dict(batch=16, total_nimg=640, status_nimg=64, grid_nimg=320, state_nimg=160, grid_n=16, sample_steps=4)),
    # the default: recognisable MNIST digits in about 15 minutes on 2 CPU cores (trials: benchmarks/mnist_recipe.py)
    # sampling (docs/trials/README.md, digit-detector FID at n = 2,000): the EMA length chosen at the end of training;
    # class-conditional (classes drawn per seed when sampling): digit FID 1.41 vs 6.6 unconditional (Heun 18 with churn),
    # same training time; DPM-Solver++(2M) SDE with 11 steps: 0.81 at a third of Heun 18's 35 network evaluations, 0.61
    # on log-linear sigmas; Adam lr 0.02 (one-knob screening at 36k images, confirmed at 108k): 0.49 vs 0.66 at lr 0.01
    "mnist": _preset(network=dict(model_channels=16, channel_mult=(1, 2, 4), channels_per_head=32, label_dim=10), loss=dict(P_mean=-0.8, P_std=1.6),
                     optim=dict(lr=0.02, lr_ref_nimg=20_000), ema=dict(sample_std=0.05, snapshot_nimg=20_000),
                     train=dict(total_nimg=108_000, grid_nimg=20_000, state_nimg=10_000, sample_sampler="dpmpp-2m", sample_steps=11, sample_eta=1.0,
                                sample_schedule="loglinear")),
    # CIFAR-10 32x32 sized for one GPU (EDM2 XS-like width)
    "cifar10": _preset(network=dict(resolution=32, channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=3, attn_resolutions=(16, 8)),
                       loss=dict(P_mean=-0.8, P_std=1.6), optim=dict(lr=0.010, lr_ref_nimg=70_000 * 128, warmup_nimg=10_000_000 // 10),
                       ema=dict(snapshot_nimg=4_000_000, sample_std=0.10),
                       train=dict(data="cifar-10-python.tar.gz", batch=512, total_nimg=200_000_000, status_nimg=128_000, grid_nimg=5_000_000, state_nimg=5_000_000)),
    # CIFAR-10 on a CPU for a first look (hours): small network, short schedule
    "cifar10-small": _preset(network=dict(resolution=32, channels=3, model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)),
                             optim=dict(lr_ref_nimg=200_000, warmup_nimg=5_000),
                             ema=dict(snapshot_nimg=100_000, sample_std=0.05),
                             train=dict(data="cifar-10-python.tar.gz", batch=64, total_nimg=2_000_000, status_nimg=10_000, grid_nimg=100_000, state_nimg=50_000)),
    # EDM's CIFAR-10 networks (EDM App. F, Table 7): DDPM++ ~55.7M / NCSN++ ~56.4M parameters, EDM preconditioning and loss
    # (no learned uncertainty), Adam lr 1e-3 constant after a 10 Mimg ramp, dropout 0.13, augmentation 0.12, 200 Mimg
    "ddpmpp-cifar10": _preset(network=dict(arch="ddpmpp", resolution=32, channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                                           attn_resolutions=(16,), dropout=0.13, augment_dim=7),  # data.augment.AUGMENT_DIM
                              loss=dict(P_mean=-1.2, P_std=1.2, uncertainty=False), optim=dict(lr=1e-3, lr_ref_nimg=0, warmup_nimg=10_000_000),
                              ema=dict(snapshot_nimg=4_000_000),
                              train=dict(data="cifar-10-python.tar.gz", batch=512, total_nimg=200_000_000, augment_p=0.12, status_nimg=128_000,
                                         grid_nimg=5_000_000, state_nimg=5_000_000)),
    # ADM as EDM trains it on ImageNet-64 (EDM App. F): ~296M parameters, class-conditional, dropout 0.1, lr 2e-4, batch 4096
    "adm-imagenet64": _preset(network=dict(arch="adm", resolution=64, channels=3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                                           num_blocks=3, attn_resolutions=(32, 16, 8), channels_per_head=64, dropout=0.1),
                              loss=dict(P_mean=-1.2, P_std=1.2, uncertainty=False), optim=dict(lr=2e-4, lr_ref_nimg=0, warmup_nimg=10_000_000),
                              ema=dict(snapshot_nimg=20_000_000),
                              train=dict(data="imagenet-64x64.zip", batch=4096, total_nimg=2_500_000_000, status_nimg=1_000_000,
                                         grid_nimg=50_000_000, state_nimg=50_000_000)),
}
PRESETS["ncsnpp-cifar10"] = PRESETS["ddpmpp-cifar10"].override("network", arch="ncsnpp")
# seconds on CPU: tests and smoke runs of each backbone; Adam lr 1e-3 as EDM trains these non-normalized networks (0.01 is for EDM2's)
PRESETS.update({f"tiny-{arch}": PRESETS["tiny"].override("network", arch=arch, model_channels=16, channels_per_head=8).override("optim", lr=1e-3)
                for arch in ("ddpmpp", "ncsnpp", "adm")})
# DiT-S/2 (Peebles & Xie 2023, Table 4: width 384, 12 blocks, 6 heads, patch 2; ~33M at 32x32x3) in pixel space on
# CIFAR-10, trained as DiT is: AdamW without weight decay (= Adam) at a constant lr 1e-4, betas (0.9, 0.999), batch 256,
# no warm-up, ~400k steps; EDM preconditioning and loss around it
PRESETS["dit-s2"] = _preset(network=dict(arch="dit", resolution=32, channels=3, model_channels=384, num_blocks=12, channels_per_head=64,
                                         patch_size=2, channel_mult=(1,), attn_resolutions=()),
                            optim=dict(lr=1e-4, beta2=0.999, lr_ref_nimg=0, warmup_nimg=0), ema=dict(snapshot_nimg=4_000_000),
                            train=dict(data="cifar-10-python.tar.gz", batch=256, total_nimg=102_400_000, status_nimg=128_000,
                                       grid_nimg=5_000_000, state_nimg=5_000_000))
# seconds on CPU: a 4-block, 32-wide DiT on 2x2 patches; Adam lr 1e-3 (DiT's 1e-4 barely moves a tiny run)
PRESETS["tiny-dit"] = PRESETS["tiny"].override("network", arch="dit", model_channels=32, num_blocks=4, channels_per_head=8, patch_size=2,
                                               channel_mult=(1,), attn_resolutions=()).override("optim", lr=1e-3)

# HDiT (Crowson et al. 2024) at the sizes of k-diffusion's configs/config_{mnist,cifar10}_transformer.json (~9M, ~21M
# parameters): its widths, depths, patch sizes, global attention, 64-channel heads, 256-wide mapping network, dropout
# 0.05, augmentation 0.12 and constant lr 5e-4 with betas (0.9, 0.95) (AdamW there; Adam, no weight decay, here)
_HDIT = dict(arch="hdit", channels_per_head=64, mapping_channels=256, dropout=0.05, augment_dim=7, attn_resolutions=())  # data.augment.AUGMENT_DIM
PRESETS["hdit-mnist"] = PRESETS["mnist"].override("network", **_HDIT, label_dim=0, model_channels=256, channel_mult=(1,), depths=(8,), patch_size=4,
                                                   sigma_data=0.6162).override("optim", lr=5e-4, beta2=0.95, lr_ref_nimg=0).override("train", augment_p=0.12, sample_sampler="heun", sample_steps=18, sample_eta=0.0,
                                                                                        sample_schedule="karras")
PRESETS["hdit-cifar10"] = PRESETS["cifar10"].override("network", **_HDIT, model_channels=256, channel_mult=(1, 2), depths=(2, 4),
                                                       patch_size=2).override("optim", lr=5e-4, beta2=0.95, lr_ref_nimg=0).override("train", augment_p=0.12)
# seconds on CPU: 14x14 then 7x7 tokens, one layer per level, 8-channel heads
PRESETS["tiny-hdit"] = PRESETS["tiny"].override("network", arch="hdit", model_channels=16, channels_per_head=8, patch_size=2,
                                                mapping_channels=32).override("optim", lr=2e-3)  # best of 5e-4..4e-3 (digits loss, 2k images)

# Video (issue 22): the space-time U-Net on Moving MNIST synthesised from the embedded digits; counts are in clips.
# seconds on CPU: 16x16 frames, 4 per clip, one digit
PRESETS["movingmnist-tiny"] = _preset(
    network=dict(arch="video-unet", resolution=16, frames=4, model_channels=8, channel_mult=(1, 2), attn_resolutions=(8,),
                 channels_per_head=8, logvar_channels=16),
    optim=dict(lr_ref_nimg=2000, warmup_nimg=16), ema=dict(snapshot_nimg=64),
    train=dict(data="movingmnist:clips=64,digits=1", batch=4, total_nimg=64, status_nimg=16, grid_nimg=64, state_nimg=32, grid_n=4, sample_steps=4))
# CPU, ~14 minutes on 2 cores at the ~17 clips/s of a probe run alone (the measured run, docs/video/preset.json, shared
# the machine: 9.2 clips/s on one thread): 32x32 frames, 8 per clip, 2 digits of 14 px (the standard's proportions at
# half size), 14,000 clips in 1,750 steps of 8; what it learns (the motion, not yet legible digits): README "Video"
PRESETS["movingmnist"] = _preset(
    network=dict(arch="video-unet", resolution=32, frames=8, model_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8,),
                 channels_per_head=16),
    loss=dict(P_mean=-0.8, P_std=1.6), optim=dict(lr_ref_nimg=4_000, warmup_nimg=400), ema=dict(sample_std=0.10, snapshot_nimg=2_000),
    train=dict(data="movingmnist:clips=10000", batch=8, total_nimg=14_000, status_nimg=400, grid_nimg=2_000, state_nimg=2_000, grid_n=16))
# one GPU: the standard 64x64, 20 frames, 2 digits of 28 px; joint training with 4 images per clip
PRESETS["movingmnist-gpu"] = _preset(
    network=dict(arch="video-unet", resolution=64, frames=20, model_channels=64, channel_mult=(1, 2, 2, 2), num_blocks=2,
                 attn_resolutions=(16, 8), channels_per_head=64),
    loss=dict(P_mean=-0.8, P_std=1.6), optim=dict(lr_ref_nimg=100_000), ema=dict(sample_std=0.10, snapshot_nimg=100_000),
    train=dict(data="movingmnist:clips=10000", batch=32, total_nimg=2_000_000, status_nimg=10_000, grid_nimg=100_000,
               state_nimg=100_000, grid_n=16, image_frames=4))


DEFAULT_PRESET = "mnist"


def get_preset(name: str) -> ExperimentConfig:
    """Look up a named preset; unknown names raise ValueError listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_ladder(cfg: ExperimentConfig, rung: str) -> ExperimentConfig:
    """Select EDM2 rung ``rung`` and derive its loss / optimizer parts (EDM2 Table 1).

    Sets ``network.ladder``; ``loss.uncertainty`` (B+ on, A off); constant lr for A-D (``optim.lr_ref_nimg = 0``;
    E+ keep the preset's decay); and the rung's ``lr`` where it has one (A-C). Apply it to a preset *before*
    any explicit override (the CLI does: preset -> ``--config`` -> ``--formulation`` -> other flags), so an
    explicit value always wins over the derived one.
    """
    s = ladder_switches(rung)
    cfg = cfg.override("network", ladder=rung).override("loss", uncertainty=s.uncertainty_loss)
    if not s.lr_decay:
        cfg = cfg.override("optim", lr_ref_nimg=0)
    if s.lr is not None:
        cfg = cfg.override("optim", lr=s.lr)
    return cfg


# The default training density of each formulation's time variable, where it differs from the preset's:
# rectified flow samples t ~ logit-normal(0, 1) (Esser et al. 2024, SD3), i.e. ln sigma ~ N(0, 1). ddpm, vp, ve and
# iddpm fix their own density in their loss class (EDM Table 1) and ignore P_mean / P_std.
FORMULATION_LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "edm": {}, "ddpm": {}, "flow": {"P_mean": 0.0, "P_std": 1.0}, "vp": {}, "ve": {}, "iddpm": {},
}


def resolve_formulation(cfg: ExperimentConfig, formulation: str) -> ExperimentConfig:
    """Select a formulation (``edm``, ``ddpm``, ``flow``) and its default time density; apply before explicit overrides."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; valid: {', '.join(FORMULATIONS)}")
    cfg = cfg.override("network", formulation=formulation)
    loss_kw = FORMULATION_LOSS_DEFAULTS[formulation]
    return cfg.override("loss", **loss_kw) if loss_kw else cfg


SR_AUGMENT_DIM = 1  # augment-label columns the cascade stage adds: sigma_aug / sigma_aug_max


def sr_augment_dim(*, augment_p: float) -> int:
    """augment_dim of an SR network: the non-leaky augmentation's columns (if on) plus the σ_aug column."""
    from edmkit.data.augment import AUGMENT_DIM  # torch only when a config asks for augmentation

    return (AUGMENT_DIM if augment_p > 0 else 0) + SR_AUGMENT_DIM


def resolve_sr(cfg: ExperimentConfig, *, scale: int) -> ExperimentConfig:
    """``--task sr --sr-scale s``: the SR task and the network inputs it needs (conditioning channels, σ_aug label)."""
    cfg = cfg.override("train", task="sr", sr_scale=scale)
    cfg = cfg.override("network", cond_channels=cfg.network.channels, augment_dim=sr_augment_dim(augment_p=cfg.train.augment_p))
    check_sr_config(cfg)
    return cfg


def check_sr_config(cfg: ExperimentConfig) -> None:
    """Raise ValueError unless an ``sr`` config is consistent (no-op for ``generate``)."""
    t, n = cfg.train, cfg.network
    if t.task != "sr":
        if n.cond_channels:
            raise ValueError(f"network.cond_channels = {n.cond_channels} needs train.task = 'sr'")
        return
    if t.sr_scale < 2:
        raise ValueError(f"super-resolution scale must be >= 2, got {t.sr_scale}")
    if n.resolution % t.sr_scale:
        raise ValueError(f"--sr-scale {t.sr_scale} does not divide the image size {n.resolution}: use a divisor of {n.resolution}")
    if n.cond_channels != n.channels:
        raise ValueError(f"task sr needs network.cond_channels = channels = {n.channels} (got {n.cond_channels})")
    if n.augment_dim != sr_augment_dim(augment_p=t.augment_p):
        raise ValueError(f"task sr needs network.augment_dim = {sr_augment_dim(augment_p=t.augment_p)} (got {n.augment_dim})")


# ---------------------------------------------------------------------------------------------
# Resolving a base config (preset or file) and overrides.

# Plain replacements: override name -> (section, field). The names are the ``edmkit train`` flags.
FIELDS: dict[str, tuple[str, str]] = {
    "arch": ("network", "arch"), "resolution": ("network", "resolution"), "attn_resolutions": ("network", "attn_resolutions"),
    "data": ("train", "data"), "classes": ("train", "classes"), "center_crop": ("train", "center_crop"),
    "batch": ("train", "batch"), "total_nimg": ("train", "total_nimg"), "seed": ("train", "seed"),
    "lr": ("optim", "lr"), "grad_clip": ("optim", "grad_clip"), "sigma_sampling": ("loss", "sigma_sampling"),
    "val_fraction": ("train", "val_fraction"), "val_nimg": ("train", "val_nimg"),
    "batch_per_device": ("train", "batch_per_device"), "precision": ("train", "precision"), "compile": ("train", "compile"),
    "keep_states": ("train", "keep_states"), "max_bad_steps": ("train", "max_bad_steps"), "stop_when_flat": ("train", "stop_when_flat"),
    "snapshot_nimg": ("ema", "snapshot_nimg"), "snapshot_dtype": ("ema", "snapshot_dtype"), "snapshot_budget_mb": ("ema", "snapshot_budget_mb"),
    "ema_choice": ("ema", "choose"),
    "frames": ("network", "frames"), "image_frames": ("train", "image_frames"),
    "image_data": ("train", "image_data"),
}
EVAL_FIELDS = ("eval_nimg", "eval_ref", "eval_n", "eval_steps", "eval_detector", "eval_metrics")
DERIVED = ("ladder", "formulation", "cond", "context", "p_uncond", "augment_p", "task", "sr_scale", "sr_aug_max")
OVERRIDES = tuple(FIELDS) + DERIVED + EVAL_FIELDS  # every name resolve_config accepts


def load_config_file(path: str | Path) -> ExperimentConfig:
    """Read a config file as ``edmkit train --dry-run`` prints it (JSON; any subset of sections and fields)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON config ({e.msg} at line {e.lineno}); write one with edmkit train --dry-run") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: a config file holds one JSON object of sections (network, loss, optim, ema, train), each an object of fields")
    try:
        return ExperimentConfig.from_dict(data)
    except ValueError as e:  # unknown fields, values out of range
        raise ValueError(f"{path}: {e}") from None


def resolve_config(base: str | ExperimentConfig = DEFAULT_PRESET, **overrides: Any) -> ExperimentConfig:
    """A preset name (or a config) with overrides applied; ``None`` values keep the base's.

    Args:
        base: a preset name (:data:`PRESETS`) or an ``ExperimentConfig`` (e.g. from :func:`load_config_file`).
        overrides: any of :data:`OVERRIDES` (the ``edmkit train`` flags): ``ladder`` (EDM2 rung A-G), ``formulation``,
            the plain fields of :data:`FIELDS`, ``cond`` (bool: class-conditional on the data's labels), ``context``
            (bool: cross-attention to the data's per-image context tokens, network.context_dim from them), ``p_uncond``,
            ``augment_p``, ``task`` / ``sr_scale`` / ``sr_aug_max``, ``eval_*`` (``eval_metrics`` as "fid,kid" or a tuple).

    Raises:
        ValueError: an unknown preset or override name, or values that do not fit together.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown config override(s) {', '.join(unknown)}; valid: {', '.join(OVERRIDES)}")
    o = {k: v for k, v in overrides.items() if v is not None}
    cfg = get_preset(base) if isinstance(base, str) else base
    if "ladder" in o:
        cfg = resolve_ladder(cfg, o["ladder"])
    if "formulation" in o:
        cfg = resolve_formulation(cfg, o["formulation"])
    for section in ("network", "train", "optim", "loss", "ema"):
        changes = {FIELDS[k][1]: tuple(v) if k in ("classes", "attn_resolutions") else v for k, v in o.items() if k in FIELDS and FIELDS[k][0] == section}
        cfg = cfg.override(section, **changes) if changes else cfg
    cfg = _resolve_latent(cfg)
    if "cond" in o:
        cfg = cfg.override("network", label_dim=_class_count(cfg) if o["cond"] else 0)
    elif cfg.network.label_dim and {"data", "classes"} & set(o):  # a conditional preset on other data: conditional on its labels, if any
        cfg = cfg.override("network", label_dim=_class_count(cfg, required=False))
    if "context" in o:
        cfg = cfg.override("network", context_dim=_context_width(cfg) if o["context"] else 0)
    if "p_uncond" in o:
        if o["p_uncond"] > 0 and not cfg.network.label_dim and not cfg.network.context_dim:
            raise ValueError("--p-uncond drops class labels and context: it needs a conditional model (--cond or --context)")
        cfg = cfg.override("loss", p_uncond=o["p_uncond"])
    if "augment_p" in o:
        from edmkit.data.augment import AUGMENT_DIM  # torch only when a config asks for augmentation

        cfg = cfg.override("train", augment_p=o["augment_p"])
        cfg = cfg.override("network", augment_dim=AUGMENT_DIM) if o["augment_p"] > 0 else cfg
    cfg = _resolve_task(cfg, task=o.get("task"), sr_scale=o.get("sr_scale"), sr_aug_max=o.get("sr_aug_max"))
    return _resolve_eval(cfg, {k: o[k] for k in EVAL_FIELDS if k in o})


def _resolve_latent(cfg: ExperimentConfig) -> ExperimentConfig:
    """Latent data (``edmkit dataset convert --vae``): the network takes the latents' shape and the encoder's sigma_data
    (its standardised std), and the config records the encoder, so every network file of the run can be decoded."""
    import json

    from edmkit.data.latents import is_latent_file, latent_header  # numpy only: the file's index, not its arrays

    if not is_latent_file(cfg.train.data):
        return cfg.override("train", encoder="") if cfg.train.encoder else cfg
    spec, shape = latent_header(cfg.train.data)
    t = cfg.train
    if t.augment_p > 0 or t.task != "generate" or t.eval_nimg:
        raise ValueError(f"{t.data} holds latents: augmentation (--augment-p), --task sr and in-training evaluation (--eval-every) "
                         "work on pixel data only")
    cfg = cfg.override("network", channels=int(shape[1]), resolution=int(shape[2]),
                       sigma_data=float(spec.get("final_std", cfg.network.sigma_data)))
    return cfg.override("train", encoder=json.dumps(spec, sort_keys=True))


def _class_count(cfg: ExperimentConfig, *, required: bool = True) -> int:
    """``cond``: the class count of the config's dataset (loaded only for this), which must have labels (else, not
    ``required``: 0, unconditional)."""
    from edmkit.data.dataset import dataset_of  # torch and the data only when conditioning asks for them

    label_dim = dataset_of(cfg).num_classes
    if not label_dim and required:
        raise ValueError(f"--cond needs labels, but {cfg.train.data} has none")
    return label_dim


def _context_width(cfg: ExperimentConfig) -> int:
    """``context``: the token width D of the config's dataset's per-image context [N, L, D] (an npz ``context`` array)."""
    from edmkit.data.dataset import dataset_of  # torch and the data only when conditioning asks for them

    context = getattr(dataset_of(cfg), "context", None)
    if context is None:
        raise ValueError(f"--context needs per-image context tokens, but {cfg.train.data} has none (an npz 'context' array [N, L, D] or a dataset.json \"context\" entry per image)")
    return int(context.shape[2])


def _resolve_task(cfg: ExperimentConfig, *, task: str | None, sr_scale: int | None, sr_aug_max: float | None) -> ExperimentConfig:
    """``task="sr"`` with ``sr_scale`` / ``sr_aug_max``: the cascade SR stage and the network inputs it needs (after ``augment_p``)."""
    if task is None and (sr_scale is not None or sr_aug_max is not None):
        raise ValueError("--sr-scale / --sr-aug-max are for --task sr")
    if task != "sr":
        return cfg if task is None else cfg.override("train", task=task)
    if sr_aug_max is not None:
        cfg = cfg.override("train", sr_aug_max=sr_aug_max, sr_aug_sample=min(cfg.train.sr_aug_sample, sr_aug_max))
    return resolve_sr(cfg, scale=cfg.train.sr_scale if sr_scale is None else sr_scale)


def _resolve_eval(cfg: ExperimentConfig, kw: dict[str, Any]) -> ExperimentConfig:
    """The in-training evaluation overrides; ``eval_metrics`` parsed as by ``edmkit metrics gen``."""
    if isinstance(kw.get("eval_metrics"), str):
        kw["eval_metrics"] = parse_metrics(kw["eval_metrics"])
    cfg = cfg.override("train", **kw) if kw else cfg
    if set(kw) - {"eval_nimg"} and not cfg.train.eval_nimg:
        raise ValueError("--eval-ref / --eval-n / --eval-steps / --eval-detector / --eval-metrics take effect with --eval-every K")
    return cfg

# EDM2's ImageNet presets (Karras et al. 2024, Table 2 and train_edm2.py's sizes, read for the numbers): the EDM2 U-Net
# (config G) at 64x64, widths XXS-XXL, class-conditional, batch 2048, lr alpha_ref with inverse-sqrt decay after
# t_ref steps (70k for 512, 35k for 64) and a 10 Mimg warm-up, EMA profiles 0.05 and 0.10 snapshotted every 8 Mi images.
# img512: in Stable Diffusion's VAE latent space (4 x 64 x 64, posterior sampled per step; convert the images with
# `edmkit dataset convert SRC DEST.npz --vae sd-vae-ft-mse/ --vae-input [0,1]`); img64: pixels. GPU-scale runs.
_EDM2_WIDTHS = {"xxs": 64, "xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
_EDM2_512 = {"xxs": (0.0170, 0.0, 2048), "xs": (0.0120, 0.0, 2048), "s": (0.0100, 0.0, 2048), "m": (0.0090, 0.1, 2048),
             "l": (0.0080, 0.1, 1792), "xl": (0.0070, 0.1, 1280), "xxl": (0.0065, 0.1, 896)}  # lr, dropout, duration in Mi images
_EDM2_64 = {"xs": (0.0120, 0.0, 1024), "s": (0.0100, 0.0, 1024), "m": (0.0090, 0.1, 2048), "l": (0.0080, 0.1, 1024), "xl": (0.0070, 0.1, 640)}


def _edm2_imagenet(size: str, *, latent: bool) -> ExperimentConfig:
    lr, dropout, mimg = (_EDM2_512 if latent else _EDM2_64)[size]
    return _preset(network=dict(resolution=64, channels=4 if latent else 3, label_dim=1000, model_channels=_EDM2_WIDTHS[size],
                                channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64, dropout=dropout),
                   loss=dict(P_mean=-0.4, P_std=1.0) if latent else dict(P_mean=-0.8, P_std=1.6),
                   optim=dict(lr=lr, lr_ref_nimg=(70_000 if latent else 35_000) * 2048, warmup_nimg=10_000_000),
                   ema=dict(stds=(0.05, 0.10), sample_std=0.10, snapshot_nimg=8 << 20),
                   train=dict(data="imagenet-512-latents.npz" if latent else "imagenet-64x64.zip", batch=2048, total_nimg=mimg << 20,
                              status_nimg=1 << 20, grid_nimg=32 << 20, state_nimg=32 << 20))


PRESETS.update({f"edm2-img512-{size}": _edm2_imagenet(size, latent=True) for size in _EDM2_512})
PRESETS.update({f"edm2-img64-{size}": _edm2_imagenet(size, latent=False) for size in _EDM2_64})
# every full-size preset ends with the EMA choice (training.ema_choice); the tiny ones (tests, smoke runs) do not
PRESETS.update({name: cfg.override("ema", choose="auto") for name, cfg in PRESETS.items() if not name.startswith("tiny")})
