"""FVD / KVD plumbing with a tiny TorchScript 3-D conv detector built here, per-frame scores, motion checks, ``metrics video``."""

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edmkit.cli import main
from edmkit.data.dataset import load_dataset
from edmkit.files import file_sha256
from edmkit.metrics.detectors import DetectorError, load_detector
from edmkit.metrics.video import (
    FVD_CLIPS,
    flicker_failures,
    frame_fid_kid,
    fvd_kvd,
    identity_consistency,
    intensity,
    motion_checks,
    read_videos,
)

T, S = 8, 16


class TinyI3D(torch.nn.Module):
    """Space-time conv features with the i3d calling convention: order-sensitive through the temporal kernel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=(3, 3, 3), padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [N, 8, T, H, W]
        return torch.cat([h.mean((2, 3, 4)), h.square().mean((2, 3, 4))], dim=1)  # [N, 16]


@pytest.fixture(scope="module")
def video_detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "tiny-i3d.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format of the standard I3D file
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyI3D()).save(str(path))
    return load_detector(path, video=True)


def moving_squares(n, *, seed, frames=T, size=S, side=4, flicker=False):
    """uint8 [n, 1, T, S, S]: a bright square moving at constant velocity, bouncing off the borders (flicker: off every other frame)."""
    g = np.random.default_rng(seed)
    out = np.zeros((n, 1, frames, size, size), np.uint8)
    for i in range(n):
        pos, vel = g.integers(0, size - side, 2), g.choice([-2, -1, 1, 2], 2)
        for t in range(frames):
            if not (flicker and t % 2):
                out[i, 0, t, pos[0]:pos[0] + side, pos[1]:pos[1] + side] = 255
            pos = pos + vel
            for d in range(2):  # reflect at the borders
                if pos[d] < 0 or pos[d] > size - side:
                    pos[d] = -pos[d] if pos[d] < 0 else 2 * (size - side) - pos[d]
                    vel[d] = -vel[d]
    return torch.from_numpy(out)


def test_fvd_of_a_set_with_itself_is_zero_and_grows_when_frames_are_shuffled(video_detector):
    real, fresh = moving_squares(48, seed=0), moving_squares(48, seed=1)
    shuffled = real[:, :, torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    same = fvd_kvd(real, real, detector=video_detector, frames=T)
    assert abs(same["fvd"]) < 1e-6
    fvd_fresh = fvd_kvd(real, fresh, detector=video_detector, frames=T)["fvd"]
    fvd_shuffled = fvd_kvd(real, shuffled, detector=video_detector, frames=T)["fvd"]
    assert fvd_shuffled > 3 * fvd_fresh  # the same frames in another order: only the motion differs
    p = same["protocol"]
    assert p == dict(real_clips=48, gen_clips=48, frames=T, size=f"{S}x{S}", detector="torchscript-video",
                     detector_path=str(video_detector.path), detector_sha256=file_sha256(video_detector.path))
    assert any(f"{FVD_CLIPS:,}" in line for line in same["notices"]) and any("16" in line for line in same["notices"])


def test_wrong_rank_and_wrong_detector_are_clear_errors(video_detector):
    clips = moving_squares(4, seed=0)
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        fvd_kvd(clips[:, :, 0], clips, detector=video_detector, frames=T)
    with pytest.raises(ValueError, match="--frames 8"):
        fvd_kvd(clips, clips, detector=video_detector)  # 8 frames < the protocol's 16
    with pytest.raises(ValueError, match=r"clips \[N, 1\|3, T, H, W\]"):
        video_detector(clips[:, :, 0])
    with pytest.raises(DetectorError, match="takes images"):
        load_detector("inception", video=True)
    with pytest.raises(DetectorError, match="takes clips"):
        load_detector("i3d")
    with pytest.raises(ValueError, match="video detector"):
        fvd_kvd(clips, clips, detector=load_detector("mnist"), frames=T)


def test_per_frame_scores_fold_frames_into_the_image_path():
    digits = load_dataset("mnist5k").images[:64]
    clips = digits.reshape(16, 4, 1, 28, 28).transpose(1, 2)  # [16, 1, 4, 28, 28]
    mnist = load_detector("mnist")
    same = frame_fid_kid(clips, clips, detector=mnist)
    assert abs(same["frame_fid"]) < 1e-6 and same["real_frames"] == 64
    other = load_dataset("mnist5k").images[64:128].reshape(16, 4, 1, 28, 28).transpose(1, 2)
    assert frame_fid_kid(clips, other, detector=mnist)["frame_fid"] > 1.0


def test_motion_checks_pass_constant_speed_and_catch_flicker():
    smooth = motion_checks(moving_squares(8, seed=0, frames=12))
    assert smooth["mass_cv"] < 1e-9 and smooth["count_changes"] == 0 and smooth["acceleration"] < 1  # bounces are the only non-zero steps
    assert flicker_failures(smooth) == []
    flicker = motion_checks(moving_squares(8, seed=0, frames=12, flicker=True))
    assert set(flicker_failures(flicker)) == {"mass_cv", "count_changes", "acceleration"}


def test_digit_identity_holds_for_a_moving_digit_and_drops_when_it_changes():
    ds = load_dataset("mnist5k")
    labels = ds.labels.tolist()
    a, b = labels.index(1), labels.index(0)
    frames = torch.zeros(2, 1, 6, 48, 48, dtype=torch.uint8)
    for t in range(6):
        frames[:, 0, t, 2 + 3 * t:30 + 3 * t, 4 + 2 * t:32 + 2 * t] = ds.images[a, 0]
        if t % 2:
            frames[1, 0, t, 2 + 3 * t:30 + 3 * t, 4 + 2 * t:32 + 2 * t] = ds.images[b, 0]
    same = identity_consistency(intensity(frames), classifier=load_detector("mnist"))
    assert same[0].item() == 1.0 and same[1].item() == 0.5


def test_read_videos_from_npz_and_gifs(tmp_path):
    clips = moving_squares(3, seed=2)  # [3, 1, T, S, S]
    np.savez(tmp_path / "v.npz", videos=clips[:, 0].numpy())  # [N, T, H, W]
    assert torch.equal(read_videos(tmp_path / "v.npz"), clips)
    folder = tmp_path / "gifs"
    folder.mkdir()
    for i, c in enumerate(clips):
        frames = [Image.fromarray(f.numpy()) for f in c[0]]
        frames[0].save(folder / f"{i}.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert torch.equal(read_videos(folder), clips)
    np.savez(tmp_path / "bad.npz", images=clips.numpy())
    with pytest.raises(ValueError, match="no 'videos'"):
        read_videos(tmp_path / "bad.npz")


def test_metrics_video_command_writes_scores_and_protocol(tmp_path, video_detector):
    for name, seed in (("real", 0), ("gen", 1)):
        np.savez(tmp_path / f"{name}.npz", videos=moving_squares(16, seed=seed)[:, 0].numpy())
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, ["metrics", "video", str(tmp_path / "real.npz"), str(tmp_path / "gen.npz"), "--detector", str(video_detector.path),
                                    "--frames", str(T), "--motion", "--device", "cpu", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["protocol"]["frames"] == T and result["protocol"]["detector_sha256"] == file_sha256(video_detector.path)
    assert result["fvd"] > 0 and result["motion"]["gen"]["flicker"] == []
    assert "FVD" in res.output and "note: 16 real clips" in res.output
    res = CliRunner().invoke(main, ["metrics", "video", str(tmp_path / "real.npz"), str(tmp_path / "gen.npz"), "--detector", str(video_detector.path)])
    assert res.exit_code != 0 and "Error: " in res.output and "--frames 8" in res.output
