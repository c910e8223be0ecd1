"""Feature detectors: networks that map images to feature vectors (TorchScript files, and the built-in digit detector), in a small registry.

Registered detectors (``DETECTORS``; each a loader function):
    inception   The standard FID network: Inception-v3 of the 2015-12-05 TensorFlow graph, as the
                widely used TorchScript translation ``inception-2015-12-05.pt`` (the file StyleGAN2-ADA,
                clean-fid and EDM/EDM2 use). Called as ``model(x, return_features=True)`` on float
                pixels in [0, 255], 3 channels, any size: the graph resizes to 299x299 itself
                (bilinear, like TF) and returns the 2048-d pool features. Not to be confused with
                pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, a state dict for its own
                torchvision-based module (not TorchScript, not loadable here).
    dinov2      DINOv2 ViT-L/14 (Stein et al. 2023 use it for FD_DINOv2), as a TorchScript file you
                export once (no official TorchScript release exists; see DINOV2.how_to_get).
                Called as ``model(x)`` on ImageNet-normalised 224x224 images; 1024-d features.
    i3d         The FVD network of the StyleGAN-V / fvd-comparison protocol (Skorokhodov et al. 2022): I3D trained on
                Kinetics-400 (Carreira & Zisserman 2017), as the TorchScript file ``i3d_torchscript.pt`` they distribute.
                Called as ``model(x, rescale=False, resize=False, return_features=True)`` on clips
                [N, 3, T, 224, 224] in [-1, 1] (frames resized here, bicubic); 400-d features (the logits before
                the softmax). FVD/KVD use it (``metrics/video.py``); clips, not images.
    mnist       edmkit's own digit classifier (``mnist_net.DigitNet``), trained on the embedded MNIST
                digits and shipped in the package (``assets/mnist-detector.safetensors``, sha256 pinned):
                no download. 28x28 gray digits; 128-d penultimate features and 10 class probabilities.
                Its FIDs measure digits offline but are not comparable to Inception FIDs.
A path to any other TorchScript file is a "torchscript" detector (``load_detector(..., video=True)``: a
"torchscript-video" detector with the i3d convention at the clips' own size) with the inception convention:
``model(x_float_0_255 [N, 3, H, W], return_features=True) -> [N, D]``, and class probabilities (for the
Inception Score) from ``model(x, return_features=False) -> [N, K]`` (the inception file also takes
``no_output_bias=True``, as the original IS code). dinov2 has no class head.

Files are looked up as ``--detector PATH`` or in the cache folder ($EDMKIT_CACHE, else
~/.cache/edmkit), and downloaded there only when a URL is known and downloading is allowed.
Every loaded file's sha256 is computed: checked against an expected value when one is given, and
recorded in reference files so that features of different networks are never compared.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from edmkit.files import atomic_write, file_sha256
from edmkit.metrics.mnist_net import WEIGHTS_FILE, load_digit_net, packaged_weights

CACHE_ENV = "EDMKIT_CACHE"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorError(ValueError):
    """A detector file is missing, corrupt, of the wrong hash, or not a usable TorchScript network."""


@dataclass(frozen=True)
class DetectorSpec:
    """How to find and call one detector network."""

    name: str                   # registry name, recorded in reference files
    filename: str               # file name in the cache folder
    url: str | None             # download source, or None when the user must provide the file
    sha256: str | None          # expected file hash, or None when not pinned
    pixels: str                 # input scaling: "0-255" (raw pixels), "imagenet" ([0, 1], then (x - mean) / std) or "-1-1" ([-1, 1])
    resolution: int | None      # resize to this square size here; None: the network resizes itself
    return_features: bool       # call as model(x, return_features=True) instead of model(x)
    how_to_get: str             # where the file comes from, for error messages
    probs_kwargs: tuple[tuple[str, bool], ...] | None = None  # call as model(x, **kwargs) for class probabilities [N, K]; None: no class head
    note: str | None = None     # printed with every evaluation and recorded in results (e.g. scores not comparable to Inception's)
    video: bool = False         # takes clips [N, C, T, H, W] (frames resized and scaled one by one) instead of images
    call_kwargs: tuple[tuple[str, bool], ...] = ()  # further keyword arguments of the feature call (i3d: rescale=False, resize=False)


INCEPTION = DetectorSpec(
    name="inception", filename="inception-2015-12-05.pt",
    url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    sha256=None,  # not pinned: no published hash; the computed one is recorded in every reference file
    pixels="0-255", resolution=None, return_features=True,
    how_to_get="download https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt "
               "(TorchScript translation of the TF 2015-12-05 Inception graph)",
    # softmax over the graph's 1008 classes without the output bias, as the original Inception Score code (and StyleGAN2-ADA's)
    probs_kwargs=(("return_features", False), ("no_output_bias", True)))
DINOV2 = DetectorSpec(
    name="dinov2", filename="dinov2-vitl14.pt", url=None, sha256=None, pixels="imagenet", resolution=224, return_features=False,
    how_to_get="export it once where torch.hub can reach GitHub: m = torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14').eval(); "
               "torch.jit.trace(m, torch.zeros(1, 3, 224, 224)).save('dinov2-vitl14.pt')")

I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D = DetectorSpec(
    name="i3d", filename="i3d_torchscript.pt", url=I3D_URL,
    sha256=None,  # not pinned: no published hash; the computed one is recorded with every FVD
    pixels="-1-1", resolution=224, return_features=True, video=True, call_kwargs=(("rescale", False), ("resize", False)),
    how_to_get=f"download {I3D_URL} (the I3D TorchScript file of StyleGAN-V's FVD) and pass --detector PATH or put it in the cache folder")

MNIST = DetectorSpec(
    name="mnist", filename=WEIGHTS_FILE, url=None,
    sha256="456e475c6db2c17afb6f7bf9def40acaa0ca1b9e20eddf82dbe9e9e1489fac5a",
    pixels="0-255", resolution=28, return_features=True,
    how_to_get="it ships with edmkit (edmkit/assets/mnist-detector.safetensors); reinstall edmkit, or rebuild it with "
               "benchmarks/train_mnist_detector.py",
    probs_kwargs=(("return_features", False),),
    note="mnist detector: FID/KID/IS in the feature space of edmkit's digit classifier, not comparable to Inception FIDs")


def generic_spec(path: Path, *, video: bool = False) -> DetectorSpec:
    """Spec of a user-supplied TorchScript file with the inception calling convention (video: the i3d one at the clips' own size)."""
    if video:
        return DetectorSpec(name="torchscript-video", filename=path.name, url=None, sha256=None, pixels="-1-1", resolution=None,
                            return_features=True, video=True, call_kwargs=I3D.call_kwargs,
                            how_to_get="a TorchScript file called as model(x [N, 3, T, H, W] in [-1, 1], rescale=False, resize=False, "
                                       "return_features=True) -> [N, D]")
    return DetectorSpec(name="torchscript", filename=path.name, url=None, sha256=None, pixels="0-255", resolution=None,
                        return_features=True, how_to_get="a TorchScript file called as model(x [N, 3, H, W] in [0, 255], return_features=True)",
                        probs_kwargs=(("return_features", False),))


def cache_dir() -> Path:
    """Folder of downloaded / user-placed detector files: $EDMKIT_CACHE, else ~/.cache/edmkit."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edmkit")


@dataclass(frozen=True, eq=False)
class Detector:
    """A loaded detector: call it on images [N, C, H, W] (clips [N, C, T, H, W] when ``spec.video``; uint8, C = 1 or 3) to get
    float32 features [N, D] on its device."""

    module: torch.nn.Module
    spec: DetectorSpec
    path: Path
    sha256: str
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = detector_input(images.to(self.device), spec=self.spec)
        kwargs = dict(self.spec.call_kwargs, **({"return_features": True} if self.spec.return_features else {}))
        features = self.module(x, **kwargs)
        if features.ndim != 2 or features.shape[0] != x.shape[0]:
            raise DetectorError(f"detector {self.path} returned shape {tuple(features.shape)}, expected [{x.shape[0]}, D]")
        return features.to(torch.float32)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities p(y|x) [N, K] (float32) of uint8 images [N, C, H, W], from the same file's class head.

        A second forward pass: TorchScript detectors return either features or probabilities per call.
        """
        if self.spec.probs_kwargs is None:
            raise DetectorError(f"the {self.spec.name} detector has no class head, so no Inception Score: use --detector inception")
        x = detector_input(images.to(self.device), spec=self.spec)
        p = self.module(x, **dict(self.spec.probs_kwargs)).to(torch.float32)
        if p.ndim != 2 or p.shape[0] != x.shape[0] or not torch.allclose(p.sum(1), torch.ones(len(p), device=p.device), atol=1e-3):
            raise DetectorError(f"detector {self.path} called with {dict(self.spec.probs_kwargs)} returned shape {tuple(p.shape)} "
                                "that is not class probabilities [N, K] summing to 1 (the Inception Score needs them)")
        return p


def detector_input(images: torch.Tensor, *, spec: DetectorSpec) -> torch.Tensor:
    """uint8 images [N, 1|3, H, W] -> the detector's float32 input [N, 3, H', W'] (video: clips [N, 1|3, T, H, W] -> [N, 3, T, H', W']).

    Grayscale is repeated to 3 channels; with ``spec.resolution`` the images are resized bicubically
    (antialiased when shrinking) and clamped to [0, 255]; "imagenet" pixels are then scaled to
    [0, 1] and normalised with the ImageNet mean / std, "-1-1" pixels to [-1, 1]. Clips go frame by frame.
    """
    if spec.video:
        if images.ndim != 5 or images.shape[1] not in (1, 3):
            raise ValueError(f"the {spec.name} detector takes clips [N, 1|3, T, H, W], got shape {tuple(images.shape)}")
        n, t = images.shape[0], images.shape[2]
        frames = detector_input(images.transpose(1, 2).flatten(0, 1), spec=replace(spec, video=False))  # [N·T, 3, H', W']
        return frames.unflatten(0, (n, t)).transpose(1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"detectors take uint8 images, got {images.dtype}")
    x = images.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    size = spec.resolution
    if size is not None and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=x.shape[2] > size).clamp(0, 255)
    if spec.pixels == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x / 255 - mean) / std
    elif spec.pixels == "-1-1":
        x = x / 127.5 - 1
    return x


def conversion_notice(spec: DetectorSpec, *, channels: int, resolution: int) -> str | None:
    """One line telling how images of this shape reach the detector (None when nothing changes)."""
    steps = []
    if channels == 1:
        steps.append("grayscale repeated to 3 channels")
    if spec.resolution is not None and resolution != spec.resolution:
        steps.append(f"{resolution}x{resolution} resized to {spec.resolution}x{spec.resolution} (bicubic)")
    elif spec.name == "inception" and resolution != 299:
        steps.append(f"{resolution}x{resolution} resized to 299x299 by the network itself (bilinear, as the TF graph)")
    return f"{spec.name} detector: {', '.join(steps)}" if steps else None


# ---------------------------------------------------------------------------------------------
# Finding, downloading and loading files.


def _missing_message(spec: DetectorSpec, path: Path) -> str:
    return (f"detector file {spec.filename} not found at {path}: put it there (the cache folder is ${CACHE_ENV}, "
            f"else ~/.cache/edmkit) or pass --detector PATH; to get it: {spec.how_to_get}")


def download(url: str, path: Path, *, timeout_sec: float = 60.0, log: Callable[[str], None] | None = None) -> None:
    """Download `url` to `path` atomically (a temp file renamed on success)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading {url} -> {path}")
    with urllib.request.urlopen(url, timeout=timeout_sec) as response:
        atomic_write(path, lambda f: shutil.copyfileobj(response, f, 1 << 20))


def resolve_detector_file(spec: DetectorSpec, *, cache: str | os.PathLike | None = None, allow_download: bool = True,
                          log: Callable[[str], None] | None = None) -> Path:
    """The cache-folder path of a registered detector, downloading it first when allowed and possible."""
    path = Path(cache or cache_dir()) / spec.filename
    if path.is_file():
        return path
    if not (allow_download and spec.url):
        raise DetectorError(_missing_message(spec, path))
    try:
        download(spec.url, path, log=log)
    except OSError as e:  # URLError, timeouts, HTTP errors and disk errors are all OSErrors
        raise DetectorError(f"could not download {spec.filename} from {spec.url} ({e}). "
                            f"Download it where the network allows and put it at {path}, or pass --detector PATH") from None
    return path


def load_torchscript(path: str | os.PathLike, *, spec: DetectorSpec, sha256: str | None = None,
                     device: torch.device | str = "cpu") -> Detector:
    """Load a TorchScript detector file, checking its sha256 against `sha256` (else the spec's) when given.

    Raises:
        DetectorError: missing file, hash mismatch, or not a TorchScript file.
    """
    path = Path(path)
    if not path.is_file():
        raise DetectorError(_missing_message(spec, path))
    digest = file_sha256(path)
    expected = (sha256 or spec.sha256 or "").lower()
    if expected and digest != expected:
        raise DetectorError(f"detector {path} has sha256 {digest}, expected {expected}: the file is damaged or a different "
                            f"network; delete it and get it again ({spec.how_to_get})")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, but it is the format the standard file uses
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # torch raises RuntimeError / ValueError / pickle errors for non-TorchScript files
        hint = (" (pytorch-fid's pt_inception-*.pth is a state dict, not TorchScript: use inception-2015-12-05.pt)"
                if path.suffix == ".pth" else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DetectorError(f"detector {path} is not a loadable TorchScript file ({first}){hint}") from None
    module.eval()  # calls run under torch.no_grad (Detector.__call__); ScriptModules have no requires_grad_
    return Detector(module=module, spec=spec, path=path, sha256=digest, device=torch.device(device))


def _registered_loader(spec: DetectorSpec) -> Callable[..., Detector]:
    def load(path: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None, sha256: str | None = None,
             allow_download: bool = True, device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> Detector:
        file = Path(path) if path else resolve_detector_file(spec, cache=cache, allow_download=allow_download, log=log)
        return load_torchscript(file, spec=spec, sha256=sha256, device=device)

    load.__name__ = f"load_{spec.name}"
    load.__doc__ = f"Load the {spec.name} detector from `path`, else from the cache folder (downloading when allowed)."
    return load


def load_mnist(path: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None, sha256: str | None = None,
               allow_download: bool = True, device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> Detector:
    """Load the built-in mnist detector from `path`, else from the package (never downloaded; `cache` is not used).

    Raises:
        DetectorError: missing file, hash mismatch, or not a digit-detector file.
    """
    file = Path(path) if path else packaged_weights()
    if not file.is_file():
        raise DetectorError(_missing_message(MNIST, file))
    digest = file_sha256(file)
    expected = (sha256 or MNIST.sha256 or "").lower()
    if digest != expected:
        raise DetectorError(f"detector {file} has sha256 {digest}, expected {expected}: the file is damaged or a different "
                            f"network ({MNIST.how_to_get})")
    try:
        module = load_digit_net(file, device=device)
    except ValueError as e:
        raise DetectorError(str(e)) from None
    return Detector(module=module, spec=MNIST, path=file, sha256=digest, device=torch.device(device))


DETECTORS: dict[str, Callable[..., Detector]] = {
    **{spec.name: _registered_loader(spec) for spec in (INCEPTION, DINOV2, I3D)}, MNIST.name: load_mnist}
SPECS: dict[str, DetectorSpec] = {spec.name: spec for spec in (INCEPTION, DINOV2, I3D, MNIST)}


def load_detector(name_or_path: str | os.PathLike = "inception", *, cache: str | os.PathLike | None = None, sha256: str | None = None,
                  allow_download: bool = True, device: torch.device | str = "cpu", log: Callable[[str], None] | None = None,
                  video: bool = False) -> Detector:
    """Load a detector by registry name or file path.

    A path whose file name is a registered detector's (e.g. ``.../inception-2015-12-05.pt``) is
    loaded as that detector; any other path as a generic TorchScript detector (inception calling
    convention).

    Args:
        name_or_path: "inception", "dinov2", "mnist", or a path to a TorchScript file.
        cache: cache folder for registered detectors (default :func:`cache_dir`).
        sha256: expected hex sha256 of the file; a mismatch raises DetectorError.
        allow_download: download a missing registered detector when it has a URL.
        device: where the network runs.
        log: receives a line before a download.
        video: the caller scores clips (FVD): refuse image detectors, and load an unregistered file as "torchscript-video".
    """
    name = str(name_or_path)
    path = Path(name)
    spec = SPECS.get(name) or next((s for s in SPECS.values() if s.filename == path.name), None)
    if spec is None and not path.suffix and not path.exists():
        raise DetectorError(f"unknown detector {name!r}: give one of {', '.join(DETECTORS)} or a TorchScript file path")
    if spec is not None and spec.video != video:
        raise DetectorError(f"the {spec.name} detector takes {'clips' if spec.video else 'images'}: "
                            + ("use --detector i3d (or a video TorchScript file) for FVD" if video else "use it for FVD / KVD (edmkit metrics video)"))
    if name in DETECTORS:
        return DETECTORS[name](None, cache=cache, sha256=sha256, allow_download=allow_download, device=device, log=log)
    if spec is not None:
        return DETECTORS[spec.name](path, sha256=sha256, device=device)
    return load_torchscript(path, spec=generic_spec(path, video=video), sha256=sha256, device=device)
