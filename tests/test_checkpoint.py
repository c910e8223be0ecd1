"""Network files and training states: bit-exact round trips, metadata, and clear errors for bad files."""

import pytest
import torch

from edmkit import checkpoint as ckpt
from edmkit.config import ExperimentConfig
from edmkit.files import atomic_write, write_json
from edmkit.presets import get_preset


@pytest.fixture
def cfg():
    return get_preset("tiny")


def test_network_round_trip_bit_exact_with_metadata(tmp_path, cfg):
    net = ckpt.build_denoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "net.safetensors"
    ckpt.save_network(path, net.state_dict(), cfg=cfg, nimg=1234, ema_std=0.05)
    loaded, meta = ckpt.load_network(path)
    assert meta["nimg"] == 1234 and meta["ema_std"] == 0.05
    assert meta["config"] == cfg
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_config_json_round_trip(cfg):
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


def test_state_loads_with_weights_only(tmp_path, cfg):
    net = ckpt.build_denoiser(cfg)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 1, 28, 28), torch.ones(2)).sum().backward()
    opt.step()
    state = {"format": ckpt.FORMAT, "net": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "nimg": 5}
    path = tmp_path / "state.pt"
    ckpt.save_state(path, state)
    back = torch.load(path, weights_only=True)
    assert back["nimg"] == 5
    for k, v in state["net"].items():
        assert torch.equal(v, back["net"][k])
    assert ckpt.load_state(path)["nimg"] == 5


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, cfg):
    path = tmp_path / "net.safetensors"
    ckpt.save_network(path, ckpt.build_denoiser(cfg).state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.safetensors"):
        ckpt.load_network(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="junk.safetensors"):
        ckpt.load_network(tmp_path / "junk.safetensors")
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ckpt.CheckpointError, match="cut.pt"):
        ckpt.load_state(tmp_path / "cut.pt")
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.load_network(tmp_path / "missing.safetensors")


def test_foreign_safetensors_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="not an edmkit checkpoint"):
        ckpt.load_network(tmp_path / "other.safetensors")


def test_failed_write_leaves_existing_file_intact(tmp_path):
    path = tmp_path / "f.json"
    write_json(path, {"a": 1})

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "other width"])
def test_weights_that_do_not_match_their_config_are_refused(tmp_path, cfg, damage):
    """A network file is rebuilt from its config and loaded strictly: a missing or extra tensor, or one of another shape
    (here: weights of a wider network under the tiny config), is a CheckpointError naming the file, never a silent
    partial load that leaves freshly initialized layers in a 'trained' network."""
    sd = dict(ckpt.build_denoiser(cfg).state_dict())
    if damage == "missing":
        del sd["logvar_linear.weight"]
    elif damage == "extra":
        sd["logvar_linear.bias"] = torch.zeros(1)
    elif damage == "shape":
        sd["logvar_linear.weight"] = torch.zeros(2, *sd["logvar_linear.weight"].shape[1:])
    else:
        sd = ckpt.build_denoiser(cfg.override("network", model_channels=16)).state_dict()
    path = tmp_path / "bad.safetensors"
    ckpt.save_network(path, sd, cfg=cfg, nimg=0, ema_std=0.0)
    with pytest.raises(ckpt.CheckpointError, match=r"bad\.safetensors: weights do not match its config"):
        ckpt.load_network(path)
    fresh = ckpt.build_denoiser(cfg).state_dict()
    ckpt.save_network(tmp_path / "good.safetensors", fresh, cfg=cfg, nimg=0, ema_std=0.0)  # the same file, undamaged, loads
    loaded = ckpt.load_network(tmp_path / "good.safetensors")[0].state_dict()
    assert loaded.keys() == fresh.keys() and all(torch.equal(v, loaded[k]) for k, v in fresh.items())
