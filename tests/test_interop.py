"""``edmkit import``: NVIDIA's EDM / EDM2 network pickles read as data and mapped onto edmkit's networks.

The real files cannot be downloaded here, so the tests write pickles in the published layout themselves (format facts
from the public EDM / EDM2 repositories; none of their code): every network object pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj({type, version, module_src, class_name, state})``, containers as
torch's ``ModuleDict``, tensors through torch's own reduce functions, the whole inside the training loop's dict
(``ema`` beside ``loss_fn`` / ``encoder`` / ``dataset_kwargs``). The stand-in networks are edmkit's own, renamed as
NVIDIA's classes; the comparison against NVIDIA's own forward pass is in the closing note of issue 19 (outside the
repository, as their code's licence requires).
"""

import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edmkit.checkpoint import CheckpointError, build_denoiser, load_network
from edmkit.cli import main
from edmkit.config import ExperimentConfig, NetworkConfig
from edmkit.interop.nvidia import read_network, snapshot_series
from edmkit.interop.pickle_reader import UnsafePickleError, read_pickle


@pytest.fixture()
def persistence(monkeypatch):
    """A module ``torch_utils.persistence`` whose reconstruct function runs the embedded source, as the real one does.

    Writing pickles needs the function to be importable under that name; loading with plain ``pickle`` then shows
    what a file would do outside edmkit (executes its source), which the restricted reader must never do.
    """
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(compile(meta["module_src"], "<pickled source>", "exec"), {})  # what the real mechanism does
        return meta["class_name"]

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


class Persistent:
    """Pickles as NVIDIA's persistent-class record of ``class_name`` with ``state`` (a module's ``__dict__``)."""

    def __init__(self, class_name, state, *, module_src="import torch\n"):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        recon = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return recon, (meta,)


def record(module, class_name, *, kwargs=None, rename=None, extra_buffers=None, module_src="import torch\n"):
    """A module tree as persistent records: parameters and buffers as torch tensors / Parameters, ModuleDicts as torch's."""
    rename = rename or {}

    def convert(m, path):
        children = OrderedDict((rename.get(k, k), convert(c, f"{path}.{k}" if path else k)) for k, c in m._modules.items())
        state = {"training": False, "_parameters": OrderedDict((k, None if v is None else torch.nn.Parameter(v.detach().clone())) for k, v in m._parameters.items()),
                 "_buffers": OrderedDict((k, None if v is None else v.clone()) for k, v in m._buffers.items()), "_non_persistent_buffers_set": set(),
                 "_modules": children, "_init_args": (), "_init_kwargs": {}}
        if isinstance(m, torch.nn.ModuleDict):
            md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
            md.__dict__.update(state)
            return md
        for key, buf in (extra_buffers or {}).get(path, {}).items():
            state["_buffers"][key] = buf
        return Persistent(type(m).__name__, state, module_src=module_src)

    top = convert(module, "")
    top.class_name, top.state["_init_kwargs"] = class_name, dict(kwargs or {})
    return top


def write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def open_gains(net, seed=0):
    """Random nonzero values everywhere (zero-initialised output layers and gains too), so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.5 if p.ndim == 0 else 0))
    return net


EDM2_KW = dict(img_resolution=16, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[8])


def edm2_file(tmp_path, *, name="edm2-tiny-0000512-0.100.pkl", seed=0, unet_kw=None, encoder=None, module_src="import torch\n"):
    """A tiny EDM2 ``Precond`` pickle and the edmkit denoiser holding the same weights."""
    kw = {**EDM2_KW, **(unet_kw or {})}
    n = NetworkConfig(resolution=16, channels=3, label_dim=4, model_channels=16, channel_mult=(1, 4), num_blocks=1, attn_resolutions=(8,))
    torch.manual_seed(seed)
    net = open_gains(build_denoiser(ExperimentConfig(network=n)), seed).eval()
    top = record(net, "Precond", kwargs={"use_fp16": True, "logvar_channels": 128}, rename={"net": "unet"}, module_src=module_src)
    top.state["_modules"]["unet"].class_name = "UNet"
    top.state["_modules"]["unet"].state["_init_kwargs"] = kw
    top.state["sigma_data"] = 0.5
    data = {"ema": top, "loss_fn": None, "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset"}}
    if encoder is not None:
        data["encoder"] = encoder
    return write(tmp_path / name, data), net


SONG = {"ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]),
        "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])}
PRECOND = {"edm": "EDMPrecond", "vp": "VPPrecond", "ve": "VEPrecond", "iddpm": "iDDPMPrecond"}


def edm_file(tmp_path, arch, formulation, *, seed=0, precond_attrs=None, model_kw=None):
    """A tiny EDM pickle (``EDMPrecond`` / ``VPPrecond`` ... around ``SongUNet`` / ``DhariwalUNet``) and the edmkit
    denoiser with the same weights. Resampling blocks carry EDM's fixed ``resample_filter`` buffers, iDDPM its sigma
    table ``u`` and an ADM output of 2 C channels (eps, variance), all of which the import must drop."""
    label_dim, augment = 4, (0 if formulation == "iddpm" else 9)
    n = NetworkConfig(arch=arch, resolution=16, channels=3, label_dim=label_dim, model_channels=64 if arch == "adm" else 16,
                      channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), formulation=formulation, augment_dim=augment)
    torch.manual_seed(seed)
    net = open_gains(build_denoiser(ExperimentConfig(network=n)), seed).eval()
    filt = {name: {"resample_filter": torch.ones(1, 2)} for name, m in net.net.named_modules() if getattr(m, "resample_mode", "keep") != "keep"
            or getattr(m, "mode", "keep") != "keep"}
    top = record(net, PRECOND[formulation], rename={"net": "model"}, extra_buffers={f"net.{k}": v for k, v in filt.items()})
    model = top.state["_modules"]["model"]
    model.class_name = "DhariwalUNet" if arch == "adm" else "SongUNet"
    kw = dict(img_resolution=16, in_channels=3, out_channels=3 * (2 if formulation == "iddpm" else 1), label_dim=label_dim,
              augment_dim=augment, model_channels=n.model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
              dropout=0.1, **(SONG[arch] if arch in SONG else {}))
    model.state["_init_kwargs"] = {**kw, **(model_kw or {})}
    if formulation == "iddpm":  # [eps, variance]: 2 C output channels; the import keeps the first C
        out = model.state["_modules"]["out_conv"].state["_parameters"]
        for k in ("weight", "bias"):
            out[k] = torch.nn.Parameter(torch.cat([out[k].data, torch.randn_like(out[k].data) * 10]))
        top.state["_buffers"]["u"] = torch.linspace(80, 0, 1001)
    top.state.update({"sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1, "M": 1000, "C_1": 0.001, "C_2": 0.008, **(precond_attrs or {})})
    for key in ("logvar_fourier", "logvar_linear"):  # EDM has no uncertainty head
        del top.state["_modules"][key]
    return write(tmp_path / f"edm-{arch}-{formulation}.pkl", {"ema": top, "loss_fn": None, "augment_pipe": None}), net


def outputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.02, 0.7, 30.0])
    labels = torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        return net(x * (1 + sigma.reshape(-1, 1, 1, 1)), sigma, labels)


def test_edm2_import_equals_the_stand_in(tmp_path, persistence):
    path, net = edm2_file(tmp_path)
    imp = read_network(path)
    assert imp.cfg.network.arch == "edm2-unet" and imp.cfg.network.formulation == "edm"
    assert (imp.nimg, imp.ema_std) == (512_000, 0.1)  # kimg 512: the multiple of 1024 images whose // 1000 is 512
    ours = build_denoiser(imp.cfg).eval()
    ours.load_state_dict(imp.state)
    assert torch.equal(outputs(ours), outputs(net))
    assert torch.equal(ours.logvar_linear.weight, net.logvar_linear.weight)  # EDM2's uncertainty head comes along


@pytest.mark.parametrize("arch, formulation", [("ddpmpp", "vp"), ("ncsnpp", "ve"), ("adm", "iddpm"), ("ddpmpp", "edm")])
def test_edm_import_equals_the_stand_in(tmp_path, persistence, arch, formulation):
    path, net = edm_file(tmp_path, arch, formulation)
    imp = read_network(path)
    n = imp.cfg.network
    assert (n.arch, n.formulation, n.augment_dim) == (arch, formulation, 0 if formulation == "iddpm" else 9)
    ours = build_denoiser(imp.cfg).eval()
    ours.load_state_dict(imp.state)
    assert torch.equal(outputs(ours), outputs(net))


def test_cli_import_then_generate_with_cfg_and_an_imported_guide(tmp_path, persistence):
    """The written file is safetensors (weights-only by construction) and every command takes it."""
    main_pkl, _ = edm2_file(tmp_path, seed=0)
    guide_pkl, _ = edm2_file(tmp_path, name="guide-0000512-0.100.pkl", seed=1)
    r = CliRunner()
    res = r.invoke(main, ["import", str(main_pkl), "--out", str(tmp_path / "main.safetensors")])
    assert res.exit_code == 0, res.output
    assert "edm2-unet" in res.output and "label_dim 4" in res.output and "EMA sigma_rel 0.1 at 512000 images" in res.output
    assert r.invoke(main, ["import", str(guide_pkl), "--out", str(tmp_path / "guide.safetensors")]).exit_code == 0
    assert set(load_file(str(tmp_path / "main.safetensors"))) == set(build_denoiser(read_network(main_pkl).cfg).state_dict())
    res = r.invoke(main, ["import", str(main_pkl), "--out", str(tmp_path / "main.safetensors")])
    assert res.exit_code != 0 and "--force" in res.output
    for extra in (["--guidance", "2"], ["--guidance", "2", "--guide-checkpoint", str(tmp_path / "guide.safetensors")]):
        res = r.invoke(main, ["generate", "--checkpoint", str(tmp_path / "main.safetensors"), "--n", "2", "--steps", "2", "--class", "1",
                              "--out", str(tmp_path / "g.png"), "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "g.png").is_file()


def test_snapshot_series_imports_as_a_run_phema_reconstructs(tmp_path, persistence):
    src = tmp_path / "snaps"
    src.mkdir()
    for i, kimg in enumerate((512, 1048)):
        for std in ("0.050", "0.100"):
            edm2_file(src, name=f"edm2-tiny-{kimg:07d}-{std}.pkl", seed=i * 2 + (std == "0.100"))
    assert [(nimg, std) for _, nimg, std in snapshot_series(src)] == [(512_000, 0.05), (512_000, 0.1), (1_048_576, 0.05), (1_048_576, 0.1)]
    r = CliRunner()
    res = r.invoke(main, ["import", str(src), "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4 snapshots (2 EMA lengths: 0.05, 0.1)" in res.output
    res = r.invoke(main, ["phema", "--run", str(tmp_path / "run"), "--sigma-rel", "0.07", "--out", str(tmp_path / "ph"), "--quiet"])
    assert res.exit_code == 0, res.output
    net, meta = load_network(next((tmp_path / "ph").glob("*.safetensors")))
    assert meta["nimg"] == 1_048_576 and meta["ema_std"] == pytest.approx(0.07)


def test_latent_network_imports_and_says_what_it_needs(tmp_path, persistence):
    vae = Persistent("StabilityVAEEncoder", {"_init_kwargs": {"vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
                                                              "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5}})
    path, _ = edm2_file(tmp_path, encoder=vae)
    r = CliRunner()
    res = r.invoke(main, ["import", str(path), "--out", str(tmp_path / "lat.safetensors")])
    assert res.exit_code == 0 and "latent" in res.output, res.output
    res = r.invoke(main, ["generate", "--checkpoint", str(tmp_path / "lat.safetensors"), "--n", "1", "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "--vae DIR" in res.output and "Traceback" not in res.output  # sampling: tests/test_latent.py
    with pytest.raises(CheckpointError, match="latent-space network"):  # metrics, restore: pixel-space networks only
        load_network(tmp_path / "lat.safetensors")
    net, meta = load_network(tmp_path / "lat.safetensors", latent=True)
    assert meta["encoder"]["raw_mean"] == [5.81, 3.25, 0.12, -2.15] and meta["encoder"]["kind"] == "stability-vae"


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def malicious(tmp_path, how):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('x')"
    if how == "source":  # embedded module source that writes a file when executed
        return edm2_file(tmp_path, name="evil.pkl", module_src=f"import torch\n{code}\n")[0], marker
    payload = {"system": Evil(os.system, f"touch {marker}"), "eval": Evil(eval, code),
               "import": Evil(__import__("importlib").import_module, "this"),
               "nested": Evil(torch.storage._load_from_bytes, pickle.dumps(Evil(os.system, f"touch {marker}")))}[how]
    return write(tmp_path / "evil.pkl", {"ema": None, "dataset_kwargs": payload}), marker


@pytest.mark.parametrize("how", ["source", "system", "eval", "import", "nested"])
def test_malicious_files_run_nothing(tmp_path, persistence, how):
    path, marker = malicious(tmp_path, how)
    if how == "source":
        read_network(path)  # a valid network: imported, its source never run
    else:
        with pytest.raises(UnsafePickleError, match=r"refused") as e:
            read_pickle(path)
        assert str(path) in str(e.value)
        res = CliRunner().invoke(main, ["import", str(path), "--out", str(tmp_path / "o.safetensors")])
        assert res.exit_code != 0 and "refused" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "o.safetensors").exists()
    assert not marker.exists()
    if how in ("source", "system", "eval"):  # the file really is malicious: plain pickle would run it
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated or damaged"),
    ("numpy-array", "refused global numpy"),
    ("newer-version", "persistence format version 7"),
    ("unknown-class", "unknown network class 'Foo'"),
    ("extra-weight", "unexpected: net.extra"),
    ("new-option", "UNet option label_balance=0.3 is not supported"),
    ("unknown-option", "options this edmkit does not know (shiny)"),
    ("vp-constants", "VPPrecond with beta_d=18"),
    ("no-ema", "no EDM / EDM2 network under 'ema'"),
    ("torch-save", "a torch.save archive"),
])
def test_foreign_or_damaged_files_are_one_line_errors(tmp_path, persistence, damage, message):
    if damage == "vp-constants":
        path, _ = edm_file(tmp_path, "ddpmpp", "vp", precond_attrs={"beta_d": 18.0})
    else:
        path, _ = edm2_file(tmp_path, unet_kw={"label_balance": 0.3} if damage == "new-option" else {"shiny": 1} if damage == "unknown-option" else None)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "numpy-array":
        import numpy as np

        write(path, {"ema": None, "dataset_kwargs": np.zeros(3)})
    elif damage in ("newer-version", "unknown-class", "extra-weight", "no-ema"):
        top = record(torch.nn.Linear(2, 2), "Foo") if damage == "unknown-class" else None
        if damage == "newer-version":
            class V7(Persistent):
                def __reduce__(self):
                    fn, (meta,) = super().__reduce__()
                    return fn, ({**meta, "version": 7},)
            top = V7("Precond", {})
        if damage == "extra-weight":
            top = _top_of(path)
            top.state["_modules"]["unet"].state["_parameters"]["extra"] = torch.nn.Parameter(torch.zeros(2))
        write(path, {"loss_fn": None} if damage == "no-ema" else {"ema": top})
    elif damage == "torch-save":
        torch.save({"x": torch.zeros(1)}, path)
    res = CliRunner().invoke(main, ["import", str(path), "--out", str(tmp_path / "o.safetensors")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert message in res.output and str(path) in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def _top_of(path):
    """The stand-in record tree of a test file, read back to be edited and written again."""
    class Keep(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return lambda meta: Persistent(meta["class_name"], meta["state"], module_src=meta["module_src"])
            return super().find_class(module, name)

    with open(path, "rb") as f:
        return Keep(f).load()["ema"]
