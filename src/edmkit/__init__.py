"""edmkit: train, sample and evaluate EDM / EDM2 diffusion models (Karras et al. 2022, 2024).

The public Python API, importable from the package (``from edmkit import load_network``). Each name lives in the
module listed below; it is loaded on first use, so ``import edmkit`` (and the ``edmkit`` command) stays fast.

    networks     build_network, build_denoiser, load_network, save_network, find_network, Denoiser
    sampling     generate_images, get_sampler, sigma_schedule, guided, classifier_free
    restoration  restore
    data         load_dataset
    training     ExperimentConfig, get_preset, resolve_config, load_config_file, train
    metrics      load_detector, compute_reference, load_reference, save_reference, evaluate_generator

Example (samples from a saved network; nothing is trained):

    from edmkit import find_network, generate_images, load_network
    denoiser, meta = load_network(find_network("runs/mnist"))
    n = meta["config"].network
    images = generate_images(denoiser, seeds=range(16), resolution=n.resolution, channels=n.channels,
                             label_dim=n.label_dim, steps=18)  # float [16, C, H, W] in [-1, 1]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {  # name -> the module that defines it (one line each; tests/test_api.py checks every entry resolves)
    "build_network": "edmkit.nn.build",
    "build_denoiser": "edmkit.checkpoint",
    "load_network": "edmkit.checkpoint",
    "save_network": "edmkit.checkpoint",
    "find_network": "edmkit.checkpoint",
    "Denoiser": "edmkit.diffusion.precond",
    "generate_images": "edmkit.sampling.generate",
    "get_sampler": "edmkit.diffusion.samplers",
    "sigma_schedule": "edmkit.diffusion.schedules",
    "guided": "edmkit.diffusion.guidance",
    "classifier_free": "edmkit.diffusion.guidance",
    "restore": "edmkit.diffusion.inverse",
    "load_dataset": "edmkit.data.dataset",
    "ExperimentConfig": "edmkit.config",
    "get_preset": "edmkit.presets",
    "resolve_config": "edmkit.presets",
    "load_config_file": "edmkit.presets",
    "train": "edmkit.training.loop",
    "load_detector": "edmkit.metrics.detectors",
    "compute_reference": "edmkit.metrics.evaluate",
    "load_reference": "edmkit.metrics.reference",
    "save_reference": "edmkit.metrics.reference",
    "evaluate_generator": "edmkit.metrics.evaluate",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'edmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
