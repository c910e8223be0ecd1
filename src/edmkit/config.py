"""Typed, frozen experiment configuration (named presets and resolving flags against them: ``presets.py``).

Durations are counted in images (``*_nimg``) so schedules do not change with batch size; strings such
as ``"2Mi"`` / ``"500Ki"`` / ``"64k"`` are accepted wherever a count of images is parsed.
The resolved config is saved as JSON in the run folder and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any


def parse_nimg(value: int | float | str) -> int:
    """Parse an image count: ``1000``, ``"64k"``, ``"500Ki"``, ``"2M"``, ``"2Mi"``, ``"1.5G"``."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?)?\s*", str(value))
    if not m:
        raise ValueError(f"cannot parse image count {value!r}; use e.g. 1000, 64k, 500Ki, 2Mi")
    scale = {"": 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20, "g": 10**9, "gi": 2**30}[(m.group(2) or "").lower()]
    return int(float(m.group(1)) * scale)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class LadderSwitches:
    """One rung of the EDM2 config ladder (EDM2 Table 1, Sec. 2): switches on the one U-Net, its loss and optimizer.

    Each switch is implemented once, in ``nn/unet.py`` / ``nn/mp.py`` (network) or ``resolve_ladder`` (loss, lr).
    """

    adm_attention: bool       # A: also self-attention at resolution/2 (ADM's 32x32 of 64x64; B turns it off)
    uncertainty_loss: bool    # B+: learned uncertainty loss weighting (EDM2 Eq. 21); A: plain EDM loss
    biases: bool              # A-B: additive biases in conv/linear layers; C+: none, a constant-ones input channel instead
    he_init: bool             # C+: every weight from He's uniform init, no zero-init layers; A-B: ADM init (C only: D+ normalizes)
    fourier_embedding: bool   # C+: Fourier features + one linear layer; A-B: sinusoidal positional embedding + 2-layer MLP
    groupnorm_affine: bool    # A-B: GroupNorm with mean subtraction and learned scale/shift; C-E: RMS over groups only
    cosine_attention: bool    # C+: q, k, v normalized per head before the dot product; A-B: plain dot product
    weight_norm: bool         # D+: magnitude-preserving learned layers, w / ||w|| * 1/sqrt(fan_in) (EDM2 Eq. 47)
    forced_weight_norm: bool  # E+: stored weights re-normalized before each training use (EDM2 Sec. 2.3)
    lr_decay: bool            # E+: inverse-square-root learning-rate decay (EDM2 Eq. 67); A-D: constant
    pixel_norm: bool          # F+: no group norms; pixel norm at encoder block inputs, normalization-free main path
    mp_fixed: bool            # G: MP-SiLU, MP sum, MP concat, learned zero-initialized gains (output, embedding)
    lr: float | None          # Adam alpha_ref of the rung; None keeps the preset's (tuned for weight-normalized layers)

    def __post_init__(self) -> None:
        _check(not self.forced_weight_norm or self.weight_norm, "forced weight normalization needs weight_norm (it re-normalizes normalized layers)")
        _check(not self.mp_fixed or self.weight_norm, "MP fixed-function layers need weight-normalized learned layers (magnitudes are only preserved end to end then)")
        _check(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")


# Rung lr for A-C: raw weights there have per-element magnitude ~1/sqrt(fan_in), so the weight-normalized rungs'
# alpha_ref ~ 0.01 would be ~20x too large; EDM's pixel-space setting (EDM Table 7, CIFAR-10: Adam lr 1e-3) instead.
LADDER: dict[str, LadderSwitches] = {
    #                  attn/2 uncert biases he_init fourier gn_aff cosine wnorm  forced lrdecay pixnorm mpfixed lr
    "A": LadderSwitches(True,  False, True,  False, False,  True,  False, False, False, False,  False,  False,  1e-3),  # EDM / ADM baseline
    "B": LadderSwitches(False, True,  True,  False, False,  True,  False, False, False, False,  False,  False,  1e-3),  # minor improvements
    "C": LadderSwitches(False, True,  False, True,  True,   False, True,  False, False, False,  False,  False,  1e-3),  # architectural streamlining
    "D": LadderSwitches(False, True,  False, True,  True,   False, True,  True,  False, False,  False,  False,  None),  # MP learned layers
    "E": LadderSwitches(False, True,  False, True,  True,   False, True,  True,  True,  True,   False,  False,  None),  # control effective lr
    "F": LadderSwitches(False, True,  False, True,  True,   False, True,  True,  True,  True,   True,   False,  None),  # remove group norms
    "G": LadderSwitches(False, True,  False, True,  True,   False, True,  True,  True,  True,   True,   True,   None),  # MP fixed-function layers
}
FORMULATIONS = ("edm", "ddpm", "flow", "vp", "ve", "iddpm")  # names registered in precond.FORMULATIONS (kept here so configs validate without torch)
UNETS = ("edm2-unet", "ddpmpp", "ncsnpp", "adm", "video-unet")  # the backbones with levels (channel_mult) and attn_resolutions
ARCHS = (*UNETS, "dit", "hdit")  # backbones of nn.build.NETWORKS (kept here so configs validate without torch)
VIDEO_ARCHS = ("video-unet",)  # backbones of clips [N, C, T, H, W] (network.frames > 0); the others take images
CONTEXT_ARCHS = ("edm2-unet", "ddpmpp", "ncsnpp", "adm", "dit", "hdit")  # backbones with cross-attention to a context token sequence (context_dim > 0)
HDIT_ATTENTION = ("global", "window", "neighborhood")  # HDiT attention kinds per level (nn.hdit.ATTENTION)
PRECISIONS = ("fp32", "bf16", "fp16")  # backbone autocast dtypes (train.AUTOCAST_DTYPES)
SIGMA_SAMPLINGS = ("lognormal", "stratified", "importance", "adaptive")  # loss.sigma_sampling (diffusion.loss)
SAMPLER_NAMES = ("euler", "heun", "ddim", "ddpm", "dpmpp-2m", "dpmpp-3m")  # diffusion.samplers.SAMPLERS (kept here so configs validate without torch)
ETA_SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-3m")  # samplers with a stochasticity eta (TrainConfig.sample_eta)
SCHEDULE_NAMES = ("karras", "loglinear", "vp")  # diffusion.schedules.SIGMA_SCHEDULES (kept here so configs validate without torch)
EVAL_METRICS = ("fid", "kid", "pr", "is")  # scores of metrics.evaluate.score (defined here so configs validate without torch)


def ladder_switches(name: str) -> LadderSwitches:
    """The switches of an EDM2 rung ``"A"`` ... ``"G"``; unknown names raise ValueError listing the valid ones."""
    if name not in LADDER:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(LADDER)}")
    return LADDER[name]


@dataclass(frozen=True)
class NetworkConfig:
    arch: str = "edm2-unet"                     # backbone: edm2-unet, ddpmpp, ncsnpp (Song et al. 2021, EDM App. F), adm, dit (Peebles & Xie 2023), hdit (Crowson et al. 2024)
    resolution: int = 28                        # image height = width, pixels
    channels: int = 1                           # image channels (1 or 3; latent networks: the latent channels, e.g. 4)
    label_dim: int = 0                          # number of classes for conditioning; 0 = unconditional
    model_channels: int = 32                    # channels at the first level (dit: the token width)
    channel_mult: tuple[int, ...] = (1, 2, 2)   # per-level channel multipliers (one level per entry); U-Nets and hdit
    num_blocks: int = 1                         # residual blocks per level in the encoder (decoder: +1); dit: transformer blocks (depth)
    attn_resolutions: tuple[int, ...] = (7,)    # resolutions with self-attention blocks; U-Nets only (dit attends at every block, hdit: attn_kinds)
    channels_per_head: int = 64                 # attention head width (dit: model_channels / channels_per_head heads)
    dropout: float = 0.0                        # dropout inside residual blocks
    ladder: str = "G"                           # EDM2 config-ladder rung (Table 1); edm2-unet only
    formulation: str = "edm"                    # preconditioning + loss (EDM Table 1): edm, ddpm (eps, 1000-step), flow, vp, ve, iddpm
    sigma_data: float = 0.5                     # data std in [-1, 1] pixel units
    logvar_channels: int = 128                  # Fourier features of the uncertainty head u(sigma)
    augment_dim: int = 0                        # augment-label conditioning width (EDM App. C; augment.AUGMENT_DIM = 7); 0 = none
    cond_channels: int = 0                      # conditioning-image channels concatenated to the input (cascade SR, SR3); 0 = none
    patch_size: int = 2                         # dit: side of the square patches that become tokens (DiT's p); hdit: pixels per token side at the first level
    depths: tuple[int, ...] = ()                # hdit: layers per level, down and up each (the last level: the middle); () = num_blocks each
    attn_kinds: tuple[str, ...] = ()            # hdit: attention per level: global, window (shifted), neighborhood; () = global each
    window_size: int = 7                        # hdit: window side (window) or kernel size (neighborhood), in tokens
    mapping_channels: int = 256                 # hdit: width of the mapping network (noise level, labels, augment labels)
    context_dim: int = 0                        # cross-attention context token width (tokens [N, L, context_dim] per image); 0 = none; CONTEXT_ARCHS
    frames: int = 0                             # video-unet: frames per clip T (inputs [N, C, T, H, W]; any T works at sampling); 0 = images

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        _check(self.channels >= 1, f"channels must be >= 1 (1 or 3 for images), got {self.channels}")
        _check(levels >= 1 and self.model_channels >= 1 and self.num_blocks >= 1, "network needs >= 1 level, channel and block")
        _check(self.arch in ARCHS, f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        {"hdit": self._check_hdit, "dit": self._check_dit, **dict.fromkeys(VIDEO_ARCHS, self._check_video)}.get(self.arch, self._check_unet)()
        ladder_switches(self.ladder)  # unknown rung -> ValueError listing A..G
        _check(self.arch == "edm2-unet" or self.ladder == "G",
               f"the EDM2 config ladder (--config {self.ladder}) applies to the edm2-unet backbone only, not to {self.arch}")
        _check(self.formulation in FORMULATIONS, f"unknown formulation {self.formulation!r}; valid: {', '.join(FORMULATIONS)}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.sigma_data > 0, "sigma_data must be positive")
        _check(self.augment_dim >= 0, f"augment_dim must be >= 0 (0 = no augment conditioning), got {self.augment_dim}")
        _check(self.cond_channels >= 0, f"cond_channels must be >= 0 (0 = no conditioning image), got {self.cond_channels}")
        _check(self.context_dim >= 0, f"context_dim must be >= 0 (0 = no context), got {self.context_dim}")
        _check(self.arch in VIDEO_ARCHS or not self.frames, f"{self.arch} takes images, not clips: frames must be 0 (or --arch video-unet)")
        _check(not self.context_dim or self.arch in CONTEXT_ARCHS,
               f"cross-attention context (context_dim > 0) is supported by {', '.join(CONTEXT_ARCHS)} only, not {self.arch}")

    def _check_unet(self) -> None:
        """The U-Nets' geometry: resolution halved per level, attention resolutions among the levels' sizes."""
        levels = len(self.channel_mult)
        _check(self.resolution >= 2 ** (levels - 1) and self.resolution % 2 ** (levels - 1) == 0,
               f"image size {self.resolution} cannot be taken by a {levels}-level U-Net: it must be divisible by {2 ** (levels - 1)}")
        sizes = [self.resolution >> level for level in range(levels)]  # image size at each level
        for r in self.attn_resolutions:
            if r not in sizes and self.arch == "edm2-unet":
                continue  # the EDM2 U-Net has always skipped such entries; configs in files written before this check keep loading
            _check(r in sizes, f"attention at {r}x{r} does not occur in a {levels}-level network on {self.resolution}x{self.resolution} "
                               f"images: choose attention resolutions among {', '.join(map(str, sizes))} (--attn)")
            width = self.model_channels * self.channel_mult[sizes.index(r)]
            _check(self.arch == "ncsnpp" or self.arch == "ddpmpp" or width % self.channels_per_head == 0,
                   f"attention at {r}x{r} has {width} channels, not a multiple of channels_per_head {self.channels_per_head}: "
                   f"change model_channels or channels_per_head")

    def _check_video(self) -> None:
        """The space-time U-Net: the U-Net's geometry on every frame, a clip length, and no per-image conditioning inputs."""
        self._check_unet()
        _check(self.frames >= 1, f"video-unet takes clips: frames must be >= 1 (--frames), got {self.frames}")
        _check(not self.cond_channels and not self.augment_dim,
               "video-unet has no conditioning image or augment labels (cond_channels = augment_dim = 0)")

    def _check_dit(self) -> None:
        """DiT's geometry: p x p patches of the image; a width the heads and the 2-D positions divide."""
        _check(self.patch_size >= 1 and self.resolution % self.patch_size == 0,
               f"image size {self.resolution} cannot be cut into {self.patch_size}x{self.patch_size} patches: "
               f"use a resolution divisible by {self.patch_size} (--resolution) or a network.patch_size dividing {self.resolution}")
        _check(self.model_channels % self.channels_per_head == 0 and self.model_channels % 4 == 0,
               f"transformer width model_channels {self.model_channels} must be a multiple of 4 (2-D positions) and of channels_per_head {self.channels_per_head}")

    def _check_hdit(self) -> None:
        """HDiT's geometry: p x p patches, then 2x2 token merges per level; head widths RoPE can rotate; windows that tile."""
        levels, p, d = len(self.channel_mult), self.patch_size, self.channels_per_head
        _check(p >= 1, f"patch_size must be >= 1, got {p}")
        step = p * 2 ** (levels - 1)
        _check(self.resolution % step == 0, f"image size {self.resolution} cannot be taken by HDiT with patch size {p} and {levels} levels: "
                                            f"it must be divisible by {step} (change the resolution, patch_size or the levels in channel_mult)")
        _check(not self.depths or (len(self.depths) == levels and min(self.depths) >= 1),
               f"depths {self.depths} must give >= 1 layer to each of the {levels} levels (channel_mult)")
        _check(not self.attn_kinds or len(self.attn_kinds) == levels, f"attn_kinds {self.attn_kinds} must name one attention per level ({levels})")
        _check(set(self.attn_kinds) <= set(HDIT_ATTENTION), f"unknown attn_kinds {self.attn_kinds}; valid: {', '.join(HDIT_ATTENTION)}")
        _check(d >= 8 and d % 8 == 0, f"HDiT heads of {d} channels: channels_per_head must be a multiple of 8 (axial RoPE rotates d/8 frequencies per axis)")
        _check(self.mapping_channels >= 1 and self.window_size >= 1, "mapping_channels and window_size must be >= 1")
        for level, kind in enumerate(self.attn_kinds or ("global",) * levels):
            width, grid = self.model_channels * self.channel_mult[level], self.resolution // p >> level
            _check(width % d == 0, f"HDiT level {level} has {width} channels, not a multiple of channels_per_head {d}: change model_channels or channels_per_head")
            _check(kind != "window" or grid % self.window_size == 0,
                   f"shifted-window attention at level {level} tiles its {grid}x{grid} tokens: window_size {self.window_size} must divide {grid}")
            _check(kind != "neighborhood" or (self.window_size <= grid and self.window_size % 2 == 1),
                   f"neighborhood attention at level {level} ({grid}x{grid} tokens) needs an odd window_size <= {grid}, got {self.window_size}")


@dataclass(frozen=True)
class LossConfig:
    P_mean: float = -1.2                        # mean of ln(sigma) during training
    P_std: float = 1.2                          # std of ln(sigma) during training
    uncertainty: bool = True                    # EDM2 learned uncertainty weighting (Eq. 21)
    sigma_sampling: str = "lognormal"           # training sigma draws: lognormal (independent, the formulation's density), stratified (VDM low discrepancy), importance (iDDPM loss-aware), adaptive (fitted from u(sigma))
    p_uncond: float = 0.0                       # label dropout: probability a label row is zeroed (for CFG)
    uniform_t: bool = False                     # flow only: t ~ U(0, 1) instead of logit-normal(P_mean, P_std)

    def __post_init__(self) -> None:
        _check(self.P_std > 0, f"P_std must be positive, got {self.P_std}")
        _check(0 <= self.p_uncond <= 1, f"p_uncond must be in [0, 1], got {self.p_uncond}")
        _check(self.sigma_sampling in SIGMA_SAMPLINGS, f"unknown sigma_sampling {self.sigma_sampling!r}; valid: {', '.join(SIGMA_SAMPLINGS)}")
        _check(self.sigma_sampling != "adaptive" or self.uncertainty,
               "sigma_sampling 'adaptive' fits the density from the learned uncertainty u(sigma): it needs loss.uncertainty (EDM2 config B+)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.01                            # reference learning rate alpha_ref (Adam)
    lr_ref_nimg: int = 64_000                   # inverse-sqrt decay starts after this many images (t_ref)
    warmup_nimg: int = 2_000                    # linear warm-up length
    beta1: float = 0.9                          # Adam beta1
    beta2: float = 0.99                         # Adam beta2
    eps: float = 1e-8                           # Adam epsilon
    grad_clip: float = 0.0                      # clip the global L2 gradient norm to this; 0 = off (as in EDM)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(self.lr_ref_nimg >= 0 and self.warmup_nimg >= 0, "lr_ref_nimg and warmup_nimg must be >= 0")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


# the end-of-training EMA choice (EMAConfig.choose): "fid" scores with the in-training evaluation's reference (eval_ref) or,
# on the embedded digits, the built-in digit detector; "auto" is "fid" where one of those fits the data, else "loss"
# (the denoising loss on fixed images and noise); "off" keeps sample_std
EMA_CHOICES = ("off", "auto", "fid", "loss")


@dataclass(frozen=True)
class EMAConfig:
    stds: tuple[float, ...] = (0.05, 0.10)      # power-function EMA profiles tracked (sigma_rel)
    sample_std: float = 0.05                    # which one grids and `generate` use by default (0 = raw weights)
    snapshot_nimg: int = 32_000                 # save EMA snapshots (for post-hoc EMA) every this many images
    snapshot_dtype: str = "float32"             # storage dtype of snapshot files: "float32" or "float16" (half the disk)
    snapshot_budget_mb: float = 0.0             # refuse to start when the expected snapshot disk use exceeds this (0 = no limit)
    choose: str = "off"                         # at the end of training, pick the sampling EMA length by a post-hoc sweep (EMA_CHOICES)
    choose_stds: tuple[float, ...] = (0.02, 0.03, 0.05, 0.07, 0.10)  # the sigma_rel grid of that sweep
    choose_n: int = 256                         # with an FID score: images per sigma_rel, seeds 0..n-1 (the same noise for each)

    def __post_init__(self) -> None:
        _check(all(0 < s < 0.28 for s in self.stds), f"EMA stds must be in (0, 0.28), got {self.stds}")
        _check(self.sample_std == 0 or self.sample_std in self.stds, f"sample_std {self.sample_std} must be 0 or one of {self.stds}")
        _check(self.snapshot_nimg > 0, f"snapshot_nimg must be positive, got {self.snapshot_nimg}")
        _check(self.snapshot_dtype in ("float32", "float16"), f"snapshot_dtype must be 'float32' or 'float16', got {self.snapshot_dtype!r}")
        _check(self.snapshot_budget_mb >= 0, f"snapshot_budget_mb must be >= 0 (0 = no limit), got {self.snapshot_budget_mb}")
        _check(self.choose in EMA_CHOICES, f"unknown EMA choice {self.choose!r}; valid: {', '.join(EMA_CHOICES)}")
        _check(len(self.choose_stds) > 0 and all(0 < s < 0.28 for s in self.choose_stds), f"choose_stds must be in (0, 0.28), got {self.choose_stds}")
        _check(self.choose_n >= 2, f"choose_n must be >= 2, got {self.choose_n}")


def snapshot_disk_estimate(*, n_params: int, n_stds: int, snapshot_nimg: int, total_nimg: int, dtype: str = "float32") -> tuple[int, int]:
    """Expected (files, bytes) of a run's snapshots: one file per tracked EMA plus the raw weights, every
    ``snapshot_nimg`` images and at the end; tensor bytes only (the header with the config adds a few KB per file)."""
    bytes_per_value = {"float32": 4, "float16": 2}[dtype]
    n_snapshots = -(-total_nimg // snapshot_nimg)  # ceil: every multiple in (0, total], plus the final one
    n_files = n_snapshots * (n_stds + 1)
    return n_files, n_files * n_params * bytes_per_value


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist5k"                       # dataset source: "mnist5k" (embedded) or a path
    encoder: str = ""                           # JSON spec of the encoder of latent data (edmkit.latent.encoder); "" = pixels
    classes: tuple[int, ...] = ()               # train on these classes only (relabelled 0..k-1 in this order); () = all
    center_crop: bool = False                   # crop non-square images to a centred square before resizing
    batch: int = 32                             # global batch size
    total_nimg: int = 80_000                    # training length in images
    seed: int = 0                               # seed for init, data order and noise
    status_nimg: int = 2_000                    # stats.jsonl line every this many images
    grid_nimg: int = 16_000                     # sample grid every this many images
    state_nimg: int = 8_000                     # resumable training state every this many images
    grid_n: int = 64                            # images in each sample grid
    sample_sampler: str = "heun"                # the run's sampler (SAMPLER_NAMES): grids, evaluations, the EMA choice, `generate`'s and `metrics gen`'s default
    sample_steps: int = 18                      # its steps (Heun: 2 * steps - 1 evaluations; the others: steps)
    sample_schedule: str = "karras"             # its noise levels (SCHEDULE_NAMES): karras (EDM rho = 7), loglinear (uniform in log sigma), vp
    sample_churn: float = 0.0                   # Heun: S_churn (EDM Alg. 2) of the run's samples; 0 = deterministic
    sample_churn_sigmas: tuple[float, float] = (0.05, 10.0)  # Heun: [S_tmin, S_tmax], churn only at these noise levels
    sample_s_noise: float = 1.003               # Heun: S_noise, scale of the churn noise
    sample_eta: float = 0.0                     # ddim, dpmpp-2m, dpmpp-3m: eta of the run's samples (dpmpp 1 = the SDE solver); 0 = deterministic
    val_fraction: float = 0.0                   # held-out fraction of the data for the validation loss (0 = none, all images train)
    val_nimg: int = 16_000                      # validation loss every this many images (with val_fraction > 0)
    val_sigmas: int = 8                         # fixed noise levels of the validation loss (quantiles of the training density)
    val_patience: int = 3                       # memorization warning after this many rises of the validation loss
    batch_per_device: int = 0                   # images per process per forward/backward (gradient accumulation below batch / processes); 0 = batch / processes
    precision: str = "fp32"                     # backbone autocast: fp32, bf16 or fp16 (fp16 adds loss scaling); norms, preconditioning and loss stay fp32
    compile: bool = False                       # torch.compile the backbone (same weights and file keys; the first steps are slow)
    max_bad_steps: int = 20                     # stop after this many steps in a row with a non-finite loss or gradient (each is skipped)
    keep_states: int = 2                        # resumable training states kept in the run folder (the newest)
    augment_p: float = 0.0                      # non-leaky augmentation: probability of each transform (EDM App. C); 0 = off
    task: str = "generate"                      # "generate" (p(y)) or "sr": cascade super-resolution stage p(y | low-res y), edmkit.sampling.cascade
    sr_scale: int = 2                           # sr: the low-res input is y box-downsampled by this factor (then nearest-upsampled)
    sr_aug_max: float = 0.5                     # sr: noise-conditioning augmentation sigma_aug ~ U[0, sr_aug_max] in training (pixel units)
    sr_aug_sample: float = 0.1                  # sr: the fixed sigma_aug of the conditioning image at sampling (grids, restore default)
    eval_nimg: int = 0                          # in-training FID / KID of the sampling EMA every this many images and at the end; 0 = off
    eval_ref: str = ""                          # reference statistics file of the evaluation (edmkit metrics ref); needed with eval_nimg
    eval_n: int = 1000                          # generated images per evaluation, seeds 0..eval_n-1 (small n: FID biased upward vs 50k)
    eval_steps: int = 18                        # steps of the run's sampler (sample_sampler, its schedule and options) for the evaluation images
    eval_detector: str = ""                     # detector name or TorchScript path; "" = the one the reference was made with
    eval_metrics: tuple[str, ...] = ("fid", "kid")  # scores of each evaluation: fid, kid, pr, is (EVAL_METRICS)
    image_frames: int = 0                       # joint image-video training (video-unet): K independent images (frames of other clips) appended to each clip; 0 = clips only
    image_data: str = ""                        # joint training: draw the appended images from this image dataset (a --data source) instead of other clips' frames
    stop_when_flat: int = 0                     # stop after this many evaluations without improvement of the first eval metric (else the validation loss); 0 = off

    def __post_init__(self) -> None:
        _check(self.sample_churn >= 0 and self.sample_s_noise > 0 and 0 <= self.sample_churn_sigmas[0] <= self.sample_churn_sigmas[1],
               f"sample churn needs S_churn >= 0, S_noise > 0 and 0 <= S_tmin <= S_tmax, got {self.sample_churn}, {self.sample_s_noise}, "
               f"{self.sample_churn_sigmas}")
        _check(self.batch >= 1, f"batch must be >= 1, got {self.batch}")
        _check(self.total_nimg >= self.batch, "total_nimg must be at least one batch")
        for name in ("status_nimg", "grid_nimg", "state_nimg", "val_nimg", "val_sigmas", "val_patience"):
            _check(getattr(self, name) > 0, f"{name} must be positive")
        _check(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _check(self.batch_per_device >= 0, f"batch_per_device must be >= 0 (0 = batch / processes), got {self.batch_per_device}")
        _check(self.batch_per_device == 0 or self.batch % self.batch_per_device == 0,
               f"batch {self.batch} is not a multiple of batch_per_device {self.batch_per_device}")
        _check(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        _check(self.max_bad_steps >= 1 and self.keep_states >= 1, "max_bad_steps and keep_states must be >= 1")
        _check(0 <= self.augment_p <= 1, f"augment_p must be in [0, 1], got {self.augment_p}")
        _check(self.task in ("generate", "sr"), f"unknown task {self.task!r}; valid: generate, sr")
        _check(self.sr_scale >= 1, f"sr_scale must be an integer >= 1, got {self.sr_scale}")
        _check(self.sr_aug_max >= 0 and 0 <= self.sr_aug_sample <= max(self.sr_aug_max, 0),
               f"need 0 <= sr_aug_sample <= sr_aug_max, got {self.sr_aug_sample}, {self.sr_aug_max}")
        _check(self.eval_nimg >= 0, f"eval_nimg must be >= 0 (0 = no in-training evaluation), got {self.eval_nimg}")
        _check(not self.eval_nimg or self.eval_ref, "in-training evaluation (eval_nimg > 0) needs a reference file: eval_ref (--eval-ref)")
        _check(self.eval_n >= 2 and self.eval_steps >= 1, f"need eval_n >= 2 and eval_steps >= 1, got {self.eval_n}, {self.eval_steps}")
        _check(bool(self.eval_metrics) and set(self.eval_metrics) <= set(EVAL_METRICS),
               f"unknown eval_metrics {self.eval_metrics}; valid: {', '.join(EVAL_METRICS)}")
        _check(self.image_frames >= 0, f"image_frames must be >= 0 (0 = clips only), got {self.image_frames}")
        _check(self.sample_schedule in SCHEDULE_NAMES, f"unknown sample_schedule {self.sample_schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}")
        _check(self.sample_sampler in SAMPLER_NAMES, f"unknown sample_sampler {self.sample_sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
        _check(self.sample_steps >= 1 and self.sample_eta >= 0, f"need sample_steps >= 1 and sample_eta >= 0, got {self.sample_steps}, {self.sample_eta}")
        _check(not self.sample_eta or self.sample_sampler in ETA_SAMPLERS,
               f"sample_eta is an option of {', '.join(ETA_SAMPLERS)}, not of {self.sample_sampler}")
        _check(not self.image_data or self.image_frames, "--image-data is where joint training's appended images come from: give --image-frames K too")
        _check(self.stop_when_flat >= 0, f"stop_when_flat must be >= 0 (0 = off), got {self.stop_when_flat}")
        _check(not self.stop_when_flat or self.eval_nimg or self.val_fraction,
               "--stop-when-flat watches the in-training metric (--eval-every with --eval-ref) or the validation loss (--val-fraction): give one")

    def sampler_options(self) -> dict[str, float]:
        """Keywords of the run's sampler for its samples: Heun's churn with its range and noise, or eta; {} = deterministic."""
        if self.sample_sampler == "heun" and self.sample_churn:
            return dict(S_churn=self.sample_churn, S_tmin=self.sample_churn_sigmas[0], S_tmax=self.sample_churn_sigmas[1], S_noise=self.sample_s_noise)
        if self.sample_sampler in ETA_SAMPLERS and self.sample_eta:
            return dict(eta=self.sample_eta)
        return {}

    def sampling(self) -> dict:
        """The run's sampling setting as ``generate_images`` keywords: sampler, steps, schedule and the sampler's options."""
        return dict(sampler=self.sample_sampler, steps=self.sample_steps, schedule=self.sample_schedule, **self.sampler_options())


@dataclass(frozen=True)
class ExperimentConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        """Rebuild from ``to_dict`` output; unknown sections or fields raise ValueError."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # the section's dataclass
            known = {g.name: g for g in dataclasses.fields(sub_cls)}
            values = legacy_fields(f.name, d.get(f.name, {}))
            unknown = set(values) - set(known)
            _check(not unknown, f"unknown config fields in [{f.name}]: {', '.join(sorted(unknown))}")
            parts[f.name] = sub_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        _check(not set(d) - set(parts), f"unknown config sections: {', '.join(sorted(set(d) - set(parts)))}")
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(text))

    def override(self, section: str, **changes: Any) -> "ExperimentConfig":
        """Return a copy with fields of one section replaced (validated)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def legacy_fields(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Fields of older config files in today's names: ``loss.stratified`` (bool) is ``loss.sigma_sampling``."""
    if section != "loss" or "stratified" not in values:
        return values
    values = dict(values)
    stratified = values.pop("stratified")
    _check(isinstance(stratified, bool), f"loss.stratified must be true or false, got {stratified!r}")
    values.setdefault("sigma_sampling", "stratified" if stratified else "lognormal")
    return values


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Human-readable differences ``section.field: a -> b``."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        for key in da[section]:
            if da[section][key] != db[section][key]:
                out.append(f"{section}.{key}: {da[section][key]!r} -> {db[section][key]!r}")
    return out


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"fid,kid,pr"`` -> ("fid", "kid", "pr"); unknown names raise ValueError."""
    names = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metrics {', '.join(unknown) or text!r}; valid: {', '.join(EVAL_METRICS)}")
    return names
