"""The built-in digit detector: a small CNN classifier of 28x28 MNIST digits, shipped as package data.

Trained on the embedded ``mnist5k`` digits by ``benchmarks/train_mnist_detector.py`` (held-out split:
:func:`heldout_mask`); its weights file ``assets/mnist-detector.safetensors`` (float16, with the
architecture in its metadata) is built into :class:`DigitNet` here, so nothing is downloaded and no code
is unpickled. It follows the detector calling convention of ``metrics/detectors.py``: float pixels in
[0, 255], 3 channels (averaged back to gray), 28x28; ``return_features=True`` gives the 128-d penultimate
features (the "mnist" detector's FID space), ``return_features=False`` the class probabilities [N, 10].
Its FIDs are digit-detector FIDs, not comparable to Inception FIDs.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from edmkit.files import atomic_write

WEIGHTS_FILE = "mnist-detector.safetensors"
FORMAT = "edmkit-mnist-detector"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel statistics of MNIST in [0, 1] (the usual input normalisation)
HELDOUT_EVERY = 5                      # every 5th embedded digit (index % 5 == 0) is held out of training


class DigitNet(torch.nn.Module):
    """Three conv stages (28 -> 14 -> 7 -> global mean) and a 128-d feature layer before a 10-way linear head."""

    def __init__(self, *, width: int = 32, features: int = 128, classes: int = 10):
        super().__init__()
        self.config = dict(width=width, features=features, classes=classes)
        w = width
        chans = [(1, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in chans)
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(b) for _, b in chans)
        self.fc = torch.nn.Linear(4 * w, features)
        self.head = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        """Float pixels [N, 1|3, 28, 28] in [0, 255] -> features [N, 128] (or class probabilities [N, 10])."""
        x = self.logits_or_features(x, features=return_features)
        return x if return_features else x.softmax(dim=1)

    def logits_or_features(self, x: torch.Tensor, *, features: bool) -> torch.Tensor:
        x = (x.mean(dim=1, keepdim=True) / 255 - MNIST_MEAN) / MNIST_STD  # [N, 1, 28, 28]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i in (1, 3):
                x = F.max_pool2d(x, 2)                                     # 28 -> 14 -> 7
        x = F.relu(self.fc(x.mean(dim=(2, 3))))                            # [N, 128]: the detector's features
        return x if features else self.head(x)                             # [N, 10] logits


def heldout_mask(n: int) -> np.ndarray:
    """Boolean [n]: the embedded digits held out of the detector's training (every HELDOUT_EVERY-th, from index 0)."""
    return np.arange(n) % HELDOUT_EVERY == 0


def packaged_weights() -> Path:
    """Path of the shipped weights file inside the installed package."""
    return Path(str(resources.files("edmkit").joinpath("assets", WEIGHTS_FILE)))


def save_digit_net(net: DigitNet, path: str | os.PathLike, *, info: dict) -> None:
    """Write the weights as float16 safetensors (BatchNorm buffers included), the architecture and `info` in its metadata."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(net.config), "info": json.dumps(info, sort_keys=True)}
    data = safetensors_bytes(tensors, metadata=meta)
    atomic_write(Path(path), lambda f: f.write(data))


def load_digit_net(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> DigitNet:
    """Build a DigitNet from its weights file (float32, eval mode). Raises ValueError on a file that is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an edmkit MNIST detector file (format {meta.get('format')!r})")
    net = DigitNet(**json.loads(meta["config"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return net.to(device).eval().requires_grad_(False)
