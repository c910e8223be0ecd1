"""Video metrics: FVD and KVD with a video detector, per-frame FID / KID, and detector-free Moving-MNIST motion checks.

Clips here are uint8 [N, C, T, H, W] (C = 1 or 3); files hold uint8 ``videos`` [N, T, H, W(, C)] (npz) or one clip per GIF.

FVD (Unterthiner et al. 2018, "Towards Accurate Generative Models of Video") is the Fréchet distance
(:func:`edmkit.metrics.stats.frechet_distance`) between Gaussians fitted to the I3D features of real and generated clips;
KVD is the KID of the same features (:func:`edmkit.metrics.stats.kid`). The numbers depend on the protocol, so it is
part of every result: the clips scored per set, the frames per clip (the first `frames`; 16 by default), the frame size,
and the detector file's sha256. StyleGAN-V (Skorokhodov et al. 2022) scores 2,048 clips of 16 frames; with fewer clips
FVD is biased upward, and a notice says so.

Per-frame FID / KID fold the frames into the batch and use an image detector (:mod:`edmkit.metrics.detectors`).

Motion checks (no detector; bouncing digits on black, Srivastava et al. 2015) catch what per-frame scores cannot: flicker.
Per clip, over its frames:
    mass        Σ pixels in [0, 1] per frame; ``mass_cv`` = std/mean over time (digits do not appear or fade).
    blobs       connected components above half intensity per frame; ``count_changes`` = share of frame steps
                where the count changes (overlapping digits merge, so real clips are not exactly 0).
    centroid    mass-weighted (row, col) per frame; ``acceleration`` = median over steps of ‖c_{t+1} − 2c_t + c_{t−1}‖
                in pixels / frame²: 0 between bounces (constant speed), bounces are rare steps the median ignores.
    identity    each blob cropped, classified by edmkit's digit classifier (the ``mnist`` detector); ``identity`` =
                share of frames whose sorted label list equals the clip's most common one (digits keep their class).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from edmkit.data.videos import read_clips
from edmkit.metrics.detectors import Detector
from edmkit.metrics.evaluate import accumulate_features, image_batches
from edmkit.metrics.stats import frechet_distance, kid

FVD_FRAMES = 16     # frames per clip of the standard protocol
FVD_CLIPS = 2048    # clips per set of the standard protocol (StyleGAN-V)


def check_clips(clips: torch.Tensor, *, name: str = "clips") -> torch.Tensor:
    """Raise ValueError unless `clips` is uint8 [N, 1|3, T, H, W]; returns it."""
    if clips.ndim != 5 or clips.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [N, C, T, H, W] with C = 1 or 3 (5-D), got shape {tuple(clips.shape)}")
    if clips.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8, got {clips.dtype}")
    return clips


# ---------------------------------------------------------------------------------------------
# Reading clips (a minimal private reader: npz `videos` or a folder of GIFs).


def read_videos(path: str | Path) -> torch.Tensor:
    """Clips uint8 [N, C, T, H, W] from an .npz with ``videos`` [N, T, H, W(, C)], a .gif (one clip) or a folder of .gif files
    (``data.videos.read_clips``, which training reads them with).

    Raises:
        OSError: missing path. ValueError: no ``videos`` array, wrong rank, no GIFs, or GIFs of different shapes.
    """
    clips, _, _ = read_clips(path)  # [N, T, H, W, C]
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# FVD / KVD and per-frame FID / KID.


def protocol_clips(clips: torch.Tensor, *, frames: int, n: int | None, name: str) -> tuple[torch.Tensor, list[str]]:
    """The first `n` clips' first `frames` frames (the FVD protocol), and notices where it departs from 2,048 × 16.

    Raises:
        ValueError: clips shorter than `frames`, or fewer than 2 clips.
    """
    check_clips(clips, name=name)
    if frames < 1 or clips.shape[2] < frames:
        raise ValueError(f"{name} have {clips.shape[2]} frames; the protocol scores the first {frames}: pass --frames {clips.shape[2]} "
                         f"(FVDs are comparable only at equal frame counts)")
    n = min(FVD_CLIPS, len(clips)) if n is None else n
    if n < 2 or n > len(clips):
        raise ValueError(f"need 2 <= n <= {len(clips)} {name}, got n = {n}")
    notices = []
    if n < FVD_CLIPS:
        notices.append(f"note: {n} {name} (the protocol uses {FVD_CLIPS:,}); FVD is biased upward at small n, compare only at the same n")
    if frames != FVD_FRAMES:
        notices.append(f"note: {frames} frames per clip (the protocol uses {FVD_FRAMES}); compare only at the same length")
    return clips[:n, :, :frames], notices


def _fit(clips: torch.Tensor, detector: Detector, *, batch: int, progress: bool, desc: str) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(μ, Σ) and all raw features [N, D] of clips (or images) through `detector`."""
    stats, features = accumulate_features(image_batches(clips, batch=batch), detector=detector, keep=len(clips), total=len(clips),
                                          progress=progress, desc=desc)
    return stats.mean_cov(), features


def fvd_kvd(
    real: torch.Tensor, gen: torch.Tensor, *, detector: Detector, frames: int = FVD_FRAMES, n: int | None = None, batch: int = 16,
    kid_subsets: int = 100, kid_subset_size: int = 1000, progress: bool = False,
) -> dict:
    """FVD and KVD of generated against real clips, with the protocol that produced them.

    Args:
        real, gen: uint8 clips [N, C, T, H, W] (T >= `frames`).
        detector: a video detector (``spec.video``; e.g. ``load_detector("i3d", video=True)``).
        frames: first frames of each clip scored (16 in the standard protocol).
        n: clips per set (default: min(2,048, available), per set).
        batch: clips per detector call (does not change the result).
        kid_subsets, kid_subset_size: KVD's subsets (as KID).

    Returns:
        dict(fvd, kvd, kvd_std, protocol=dict(real_clips, gen_clips, frames, size, detector, detector_sha256), notices=[...]).
    """
    if not detector.spec.video:
        raise ValueError(f"the {detector.spec.name} detector takes images; FVD needs a video detector (i3d or a video TorchScript file)")
    real, notes_real = protocol_clips(real, frames=frames, n=n, name="real clips")
    gen, notes_gen = protocol_clips(gen, frames=frames, n=n, name="generated clips")
    if real.shape[1:] != gen.shape[1:]:
        raise ValueError(f"real clips {tuple(real.shape[1:])} and generated clips {tuple(gen.shape[1:])} differ in (C, T, H, W)")
    (mu_r, sigma_r), f_r = _fit(real, detector, batch=batch, progress=progress, desc="real clips")
    (mu_g, sigma_g), f_g = _fit(gen, detector, batch=batch, progress=progress, desc="generated clips")
    kvd, kvd_std = kid(f_g, f_r, subsets=kid_subsets, subset_size=kid_subset_size, device=detector.device)
    protocol = dict(real_clips=len(real), gen_clips=len(gen), frames=frames, size=f"{real.shape[-1]}x{real.shape[-2]}",
                    detector=detector.spec.name, detector_path=str(detector.path), detector_sha256=detector.sha256)
    return dict(fvd=frechet_distance(mu_g, sigma_g, mu_r, sigma_r), kvd=kvd, kvd_std=kvd_std, protocol=protocol,
                notices=notes_real + notes_gen)


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """Fold frames into the batch: [N, C, T, H, W] -> [N·T, C, H, W] (per-frame metrics through the image path)."""
    return check_clips(clips).transpose(1, 2).flatten(0, 1)


def frame_fid_kid(real: torch.Tensor, gen: torch.Tensor, *, detector: Detector, batch: int = 64, kid_subsets: int = 100,
                  kid_subset_size: int = 1000, progress: bool = False) -> dict:
    """Per-frame FID and KID: every frame of every clip an image, scored by an image detector."""
    a, b = frames_of(real), frames_of(gen)
    (mu_r, sigma_r), f_r = _fit(a, detector, batch=batch, progress=progress, desc="real frames")
    (mu_g, sigma_g), f_g = _fit(b, detector, batch=batch, progress=progress, desc="generated frames")
    k, k_std = kid(f_g, f_r, subsets=kid_subsets, subset_size=kid_subset_size, device=detector.device)
    return dict(frame_fid=frechet_distance(mu_g, sigma_g, mu_r, sigma_r), frame_kid=k, frame_kid_std=k_std, real_frames=len(a),
                gen_frames=len(b), frame_detector=detector.spec.name, frame_detector_sha256=detector.sha256)


# ---------------------------------------------------------------------------------------------
# Motion checks for Moving MNIST (no detector, except the digit classifier for identity).


def intensity(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips [N, C, T, H, W] -> float64 gray intensity [N, T, H, W] in [0, 1]."""
    return check_clips(clips).double().mean(1) / 255


def mass(x: torch.Tensor) -> torch.Tensor:
    """Digit mass Σ pixels per frame: [N, T, H, W] -> [N, T]."""
    return x.sum((-2, -1))


def centroid(x: torch.Tensor) -> torch.Tensor:
    """Mass-weighted centroid (row, col) per frame: [N, T, H, W] -> [N, T, 2] (NaN for an empty frame)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, dtype=x.dtype).view(h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, w)
    m = mass(x)
    return torch.stack([(x * rows).sum((-2, -1)) / m, (x * cols).sum((-2, -1)) / m], dim=-1)


def acceleration(c: torch.Tensor) -> torch.Tensor:
    """Second difference of a path, c_{t+1} − 2c_t + c_{t−1}: [N, T, 2] -> [N, T − 2] norms (pixels / frame²)."""
    return (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)


def blob_labels(frame: np.ndarray, *, threshold: float = 0.5) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood) of pixels above `threshold`: [H, W] -> (labels [H, W], count)."""
    labels, count = ndimage.label(frame > threshold, structure=np.ones((3, 3)))
    return labels, int(count)


def blob_counts(x: torch.Tensor, *, threshold: float = 0.5) -> torch.Tensor:
    """Blobs per frame: [N, T, H, W] -> int64 [N, T]."""
    a = x.numpy()
    return torch.tensor([[blob_labels(f, threshold=threshold)[1] for f in clip] for clip in a], dtype=torch.int64)


def digit_crops(frame: np.ndarray, *, threshold: float = 0.5) -> list[torch.Tensor]:
    """Each blob's bounding box, padded to a square with MNIST's margin (20 -> 28 pixels), as uint8 [1, 28, 28]."""
    labels, count = blob_labels(frame, threshold=threshold)
    crops = []
    for sl in ndimage.find_objects(labels):
        rows, cols = sl
        side = max(rows.stop - rows.start, cols.stop - cols.start)
        pad = round(side * 4 / 20)  # MNIST digits are 20x20 in a 28x28 frame
        r0, c0 = (rows.start + rows.stop - side) // 2 - pad, (cols.start + cols.stop - side) // 2 - pad
        size = side + 2 * pad
        big = np.pad(frame, size)  # zero border so every window is inside
        crop = torch.from_numpy(big[r0 + size:r0 + 2 * size, c0 + size:c0 + 2 * size].copy())
        crop = F.interpolate(crop[None, None].float(), size=(28, 28), mode="bilinear", align_corners=False, antialias=size > 28)
        crops.append((crop[0] * 255).round().clamp(0, 255).to(torch.uint8))
    return crops


def identity_consistency(x: torch.Tensor, *, classifier: Detector, threshold: float = 0.5) -> torch.Tensor:
    """Share of frames whose sorted digit labels equal the clip's most common labels: [N, T, H, W] -> [N]."""
    out = []
    for clip in x.numpy():
        per_frame = [digit_crops(f, threshold=threshold) for f in clip]
        flat = [c for crops in per_frame for c in crops]
        labels = classifier.probs(torch.stack(flat)).argmax(1).tolist() if flat else []
        sets, i = [], 0
        for crops in per_frame:
            sets.append(tuple(sorted(labels[i:i + len(crops)])))
            i += len(crops)
        out.append(Counter(sets).most_common(1)[0][1] / len(sets))
    return torch.tensor(out, dtype=torch.float64)


def motion_checks(clips: torch.Tensor, *, classifier: Detector | None = None, threshold: float = 0.5) -> dict[str, float]:
    """Flicker statistics of clips (module docstring), each the mean over clips; ``identity`` only with a classifier.

    Args:
        clips: uint8 [N, C, T, H, W], T >= 3.
        classifier: the ``mnist`` detector (``load_detector("mnist")``) for digit identity.
        threshold: blob threshold on intensity in [0, 1].
    """
    if check_clips(clips).shape[2] < 3:
        raise ValueError(f"motion checks need clips of at least 3 frames, got {clips.shape[2]}")
    x = intensity(clips)
    m = mass(x)
    counts = blob_counts(x, threshold=threshold)
    accel = acceleration(centroid(x)).nan_to_num(nan=float(max(x.shape[-2:])))  # an empty frame counts as a jump
    out = dict(mass_cv=float((m.std(1) / m.mean(1).clamp(min=1e-12)).mean()),
               count_changes=float((counts[:, 1:] != counts[:, :-1]).double().mean()),
               acceleration=float(accel.median(1).values.mean()))
    if classifier is not None:
        out["identity"] = float(identity_consistency(x, classifier=classifier, threshold=threshold).mean())
    return out


# Limits of the flicker flags, measured on bouncing-digit clips (2 MNIST digits, 64x64, 20 frames, 2.5 px/frame): real
# clips give mass_cv ≈ 0.03, count_changes ≈ 0.10 (digits overlap), acceleration ≈ 0.7 (integer positions); frames of
# shuffled or independent clips give ≥ 0.33 count changes and ≥ 13 px/frame² (benchmarks/video_metrics.py, 64 clips).
FLICKER_LIMITS = dict(mass_cv=0.1, count_changes=0.2, acceleration=2.0)


def flicker_failures(checks: dict[str, float], *, limits: dict[str, float] | None = None) -> list[str]:
    """Names of the :func:`motion_checks` values above their limit (empty: no flicker detected)."""
    limits = FLICKER_LIMITS if limits is None else limits
    return [k for k, limit in limits.items() if checks[k] > limit]
