"""The public Python API of ``edmkit/__init__.py``: every name resolves to its defining module, lazily."""

import subprocess
import sys

import pytest

import edmkit


@pytest.mark.parametrize("name", edmkit.__all__)
def test_every_public_name_comes_from_the_module_listed(name):
    import importlib

    module = importlib.import_module(edmkit._API[name])
    assert getattr(edmkit, name) is getattr(module, name)
    assert name in module.__dict__  # defined (or assigned) there, listed under its real home


def test_importing_edmkit_loads_no_torch_and_unknown_names_fail():
    code = "import sys, edmkit; assert 'torch' not in sys.modules, 'import edmkit pulled in torch'; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edmkit.nope  # noqa: B018


def test_readme_example_samples_from_a_saved_network(tmp_path):
    """The README's 10-line example, on a freshly built (untrained) tiny network saved to disk."""
    from edmkit import build_denoiser, find_network, generate_images, get_preset, load_network, save_network

    cfg = get_preset("tiny")
    save_network(tmp_path / "network-000000000000-0.000.safetensors", build_denoiser(cfg).state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    denoiser, meta = load_network(find_network(tmp_path))
    n = meta["config"].network
    images = generate_images(denoiser, seeds=range(2), resolution=n.resolution, channels=n.channels, label_dim=n.label_dim, steps=2)
    assert images.shape == (2, n.channels, n.resolution, n.resolution)
