"""Reference files (``ref.npz``): a dataset's detector statistics, and the checks around them.

A reference holds μ and Σ of the detector features over all images of a dataset, the raw features
of a seeded random subset (for KID and precision / recall), the detector's name and file sha256,
and the images' size. It is a plain .npz (no pickles). Scores are only computed against a
reference made with the very same detector file (same sha256).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edmkit.files import atomic_write
from edmkit.metrics.detectors import DETECTORS, Detector, load_detector

REF_FORMAT = "edmkit-metrics-ref"
REF_VERSION = 1


@dataclass(frozen=True, eq=False)
class Reference:
    """Reference statistics of a dataset for one detector.

    Attributes:
        mu: float64 [D] feature mean over all `n` images.
        sigma: float64 [D, D] feature covariance (divisor n − 1).
        n: number of images behind mu and sigma.
        features: float32 [M, D] raw features of a random subset (M <= n) for KID and precision/recall.
        detector: detector name ("inception", "dinov2", "torchscript").
        detector_sha256: hex sha256 of the detector file.
        source: the dataset it was computed from.
        resolution: image size of the dataset.
        channels: image channels of the dataset.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray
    detector: str
    detector_sha256: str
    source: str
    resolution: int
    channels: int


_REF_KEYS = ("format", "version", "mu", "sigma", "n", "features", "detector", "detector_sha256", "source", "resolution", "channels")


def save_reference(path: str | os.PathLike, ref: Reference) -> None:
    """Write a reference file (.npz, no pickles) atomically."""
    arrays = dict(format=np.array(REF_FORMAT), version=np.array(REF_VERSION), mu=ref.mu, sigma=ref.sigma, n=np.array(ref.n),
                  features=ref.features, detector=np.array(ref.detector), detector_sha256=np.array(ref.detector_sha256),
                  source=np.array(ref.source), resolution=np.array(ref.resolution), channels=np.array(ref.channels))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_reference(path: str | os.PathLike) -> Reference:
    """Read and validate a reference file; a missing, truncated or foreign file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such reference file (make one with: edmkit metrics ref --data SRC --out {path})")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, EOFError, ValueError, OSError, CRC errors ...
        raise ValueError(f"{path}: corrupt or not a reference file ({type(e).__name__}: {e})") from None
    missing = [k for k in _REF_KEYS if k not in data]
    if "format" not in data or str(data["format"]) != REF_FORMAT:
        raise ValueError(f"{path}: not an edmkit reference file (make one with: edmkit metrics ref --data SRC --out {path})")
    if missing:
        raise ValueError(f"{path}: corrupt reference file (missing {', '.join(missing)})")
    if int(data["version"]) > REF_VERSION:
        raise ValueError(f"{path}: reference format version {int(data['version'])} is newer than this edmkit ({REF_VERSION})")
    mu, sigma, features = data["mu"], data["sigma"], data["features"]
    d = mu.shape[0] if mu.ndim == 1 else -1
    if sigma.shape != (d, d) or features.ndim != 2 or features.shape[1] != d:
        raise ValueError(f"{path}: corrupt reference file (mu {mu.shape}, sigma {sigma.shape}, features {features.shape} do not match)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all() and np.isfinite(features).all()):
        raise ValueError(f"{path}: corrupt reference file (NaN or inf statistics)")
    return Reference(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=int(data["n"]), features=features.astype(np.float32),
                     detector=str(data["detector"]), detector_sha256=str(data["detector_sha256"]), source=str(data["source"]),
                     resolution=int(data["resolution"]), channels=int(data["channels"]))


def reference_detector(ref: Reference, name_or_path: str | None = None, *, sha256: str | None = None, device: torch.device | str = "cpu",
                       ref_path: str | os.PathLike = "the reference", log: Callable[[str], None] | None = None) -> Detector:
    """Load the detector to compare against `ref`: `name_or_path`, else the reference's registered one; hashes must match."""
    if name_or_path is None:
        if ref.detector not in DETECTORS:
            raise ValueError(f"{ref_path} was computed with a user TorchScript detector: pass the same file as --detector PATH")
        name_or_path = ref.detector
    detector = load_detector(name_or_path, sha256=sha256, device=device, log=log)
    check_detector(ref, detector, ref_path=ref_path)
    return detector


def check_detector(ref: Reference, detector: Detector, *, ref_path: str | os.PathLike = "the reference") -> None:
    """Refuse to compare features of a detector file other than the reference's (by sha256)."""
    if detector.sha256 != ref.detector_sha256:
        raise ValueError(f"detector hash mismatch: {ref_path} was computed with {ref.detector} (sha256 {ref.detector_sha256[:16]}...), "
                         f"but {detector.path} has sha256 {detector.sha256[:16]}...; features of different networks are not "
                         "comparable: use the same detector file or recompute the reference")


def shape_notice(ref: Reference, *, resolution: int, channels: int) -> str | None:
    """A warning line when evaluated images differ in size or channels from the reference images."""
    if (resolution, channels) == (ref.resolution, ref.channels):
        return None
    return (f"note: images are {resolution}x{resolution}x{channels} but the reference images were "
            f"{ref.resolution}x{ref.resolution}x{ref.channels}; both are converted to the detector's input, but such scores "
            "are not comparable with published ones")

