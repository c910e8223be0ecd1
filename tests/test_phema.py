"""Post-hoc EMA of run folders: metadata-only snapshot discovery, exact tracked reconstruction, time
cut-off, clear errors for bad folders and sigma_rel, network files `generate` can load, the sweep,
and the snapshot dtype / disk estimate options.

Runs are built by writing snapshot files directly (tiny preset, perturbed weights), not by training,
except for one short end-to-end run that checks float16 snapshots and the disk-use log line.
"""

import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.integrate import quad

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import EMAConfig, snapshot_disk_estimate
from edmkit.presets import get_preset
from edmkit.training import phema as ph
from edmkit.training import phema_sweep as phs
from edmkit.training.ema import STD_MAX, std_to_exp

TIMES = (64, 128, 192, 256)


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


def write_run(run_dir, cfg, *, times=TIMES, seed=0, nan_after=None):
    """Snapshot files (one per tracked std, plus raw weights) with random weights; returns {(nimg, std): state}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    base = ckpt.build_denoiser(cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for t in times:
        for std in (0.0, *cfg.ema.stds):
            state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
            if nan_after is not None and t > nan_after:
                state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
            ckpt.save_network(ckpt.network_path(run_dir, t, std), state, cfg=cfg, nimg=t, ema_std=std)
            states[(t, std)] = state
    return states


def assert_states_close(a, b, *, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol), k


def test_collect_reads_metadata_not_file_names(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    for i, path in enumerate(sorted((tmp_path / "run").glob("*.safetensors"))):
        path.rename(tmp_path / "run" / f"x{(i * 7) % 12:02d}.safetensors")  # names now say nothing
    snaps = ph.collect_snapshots(tmp_path / "run")
    assert [(s.nimg, s.std) for s in snaps] == [(t, s) for t in TIMES for s in cfg.ema.stds]  # raw files skipped
    assert all(s.config == cfg for s in snaps)


def test_tracked_snapshot_comes_back_exactly(tmp_path, cfg):
    states = write_run(tmp_path / "run", cfg)
    (std, state, info), = ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.05], at_nimg=192)
    assert std == 0.05 and info["nimg"] == 192 and info["used"] == 6 and info["warnings"] == []
    assert_states_close(state, states[(192, 0.05)])
    # default time: the last snapshot; the other tracked EMA
    (_, state, info), = ph.reconstruct_run(tmp_path / "run", sigma_rels=[cfg.ema.stds[1]])
    assert info["nimg"] == TIMES[-1] and info["fit_error"] < 1e-6
    assert_states_close(state, states[(TIMES[-1], cfg.ema.stds[1])])


def test_earlier_nimg_ignores_later_files(tmp_path, cfg):
    write_run(tmp_path / "full", cfg, nan_after=128)  # later snapshots hold NaN: any use would show
    (tmp_path / "trimmed").mkdir()
    for s in ph.collect_snapshots(tmp_path / "full"):
        if s.nimg <= 128:
            shutil.copy(s.path, tmp_path / "trimmed" / s.path.name)
    (_, a, info), = ph.reconstruct_run(tmp_path / "full", sigma_rels=[0.07], at_nimg=128)
    (_, b, _), = ph.reconstruct_run(tmp_path / "trimmed", sigma_rels=[0.07], at_nimg=128)
    assert info["used"] == 4 and all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a)
    (_, late, _), = ph.reconstruct_run(tmp_path / "full", sigma_rels=[0.07], at_nimg=256)  # the cut-off matters
    assert not all(torch.isfinite(v).all() for v in late.values() if v.is_floating_point())


def test_bad_run_folders_are_refused(tmp_path, cfg):
    with pytest.raises(ValueError, match="no such run folder"):
        ph.collect_snapshots(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty run folder"):
        ph.collect_snapshots(tmp_path / "empty")
    raw_only = tmp_path / "raw"
    raw_only.mkdir()
    ckpt.save_network(raw_only / "a.safetensors", ckpt.build_denoiser(cfg).state_dict(), cfg=cfg, nimg=64, ema_std=0.0)
    with pytest.raises(ValueError, match="no EMA snapshots"):
        ph.collect_snapshots(raw_only)

    other_net = cfg.override("network", dropout=0.1)  # same shapes, different network config
    write_run(tmp_path / "mixed", cfg)
    ckpt.save_network(tmp_path / "mixed" / "z.safetensors", ckpt.build_denoiser(other_net).state_dict(), cfg=other_net, nimg=320, ema_std=0.05)
    with pytest.raises(ValueError, match="different network configs.*network.dropout"):
        ph.collect_snapshots(tmp_path / "mixed")

    other_seed = cfg.override("train", seed=1)
    write_run(tmp_path / "two-runs", cfg)
    write_run(tmp_path / "two-runs" / "b", other_seed)
    for f in (tmp_path / "two-runs" / "b").glob("*"):
        f.rename(tmp_path / "two-runs" / f"b-{f.name}")
    with pytest.raises(ValueError, match="different seeds"):
        ph.collect_snapshots(tmp_path / "two-runs")

    write_run(tmp_path / "dup", cfg)
    shutil.copy(ckpt.network_path(tmp_path / "dup", 64, 0.05), tmp_path / "dup" / "copy.safetensors")
    with pytest.raises(ValueError, match="both the std 0.05 snapshot at 64"):
        ph.collect_snapshots(tmp_path / "dup")


def test_bad_sigma_rel_and_time_are_refused(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    for bad in (0.0, -0.01, STD_MAX + 1e-3, 0.5, float("nan")):
        with pytest.raises(ValueError, match="out of range"):
            ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.05, bad])
    with pytest.raises(ValueError, match="no sigma_rel"):
        ph.reconstruct_run(tmp_path / "run", sigma_rels=[])
    with pytest.raises(ValueError, match="before the first snapshot"):
        ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.05], at_nimg=63)
    with pytest.raises(ValueError, match="after the last snapshot"):
        ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.05], at_nimg=257)
    with pytest.raises(ValueError, match="is the run folder"):
        ph.save_reconstructions(tmp_path / "run", sigma_rels=[0.05], out_dir=tmp_path / "run" / ".")


def test_extrapolation_warns_and_interpolation_does_not(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.07, 0.02, 0.25])
    messages = [str(w.message) for w in caught if issubclass(w.category, ph.PosthocEMAWarning)]
    assert results[0][2]["warnings"] == []
    assert any("0.02 is outside the tracked range" in m for m in messages)
    assert any("0.25 is outside the tracked range" in m for m in messages)
    assert not any("sigma_rel 0.07" in m for m in messages)
    assert results[1][2]["fit_error"] > results[0][2]["fit_error"]  # extrapolation fits worse


def quad_fit_error(times, stds, x, *, out_nimg, out_std):
    """||sum_i x_i p_i - p_r|| / ||p_r|| by quadrature of the profiles p_{γ,t}(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]."""
    def p(tau, t, std):
        g = std_to_exp(std)
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    def sq(f):
        return quad(lambda u: f(u) ** 2, 0, out_nimg, points=sorted(set(times)), epsabs=0, epsrel=1e-11, limit=200)[0]

    residual = sq(lambda u: sum(xi * p(u, t, s) for xi, t, s in zip(x, times, stds)) - p(u, out_nimg, out_std))
    return np.sqrt(residual / sq(lambda u: p(u, out_nimg, out_std)))


def test_fit_error_and_gain_match_quadrature_and_the_coefficients():
    """fit_error is the *relative* L2 profile error (times in images, any scale) and gain = sum |x_i|, checked on
    hand-picked coefficients (one negative) rather than solved ones, so neither can hide behind an exact fit."""
    times, stds, x = [600, 1000], [0.05, 0.10], np.array([1.5, -0.5])
    for tt, ss, xx in [(times[:1], stds[:1], x[:1] / 1.5), (times, stds, x)]:
        got = ph.profile_fit_error(np.array(tt, float), np.array(ss), xx, out_nimg=1000, out_std=0.07)
        assert got == pytest.approx(quad_fit_error(tt, ss, xx, out_nimg=1000, out_std=0.07), rel=1e-6)
    snaps = [ph.SnapshotInfo(path=None, nimg=t, std=s, config=None) for t, s in zip(times, stds)]
    info = ph._diagnose(snaps, x, 1.0, at_nimg=1000, sigma_rel=0.07)
    assert info["gain"] == 2.0
    assert info["fit_error"] == pytest.approx(quad_fit_error(times, stds, x, out_nimg=1000, out_std=0.07), rel=1e-6)
    assert info["fit_error"] > ph.FIT_WARN and "represent this profile poorly" in info["warnings"][0]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_writes_networks_that_generate_loads(tmp_path, cfg):
    states = write_run(tmp_path / "run", cfg)
    res = run_cli("phema", "--run", tmp_path / "run", "--sigma-rel", "0.05,0.08", "--at-nimg", "128", "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.count("cond(A)") == 2 and "warning" not in res.output
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert [f.name for f in files] == ["network-000000000128-0.050.safetensors", "network-000000000128-0.080.safetensors"]
    net, meta = ckpt.load_network(files[0])
    assert meta["nimg"] == 128 and meta["ema_std"] == 0.05 and meta["config"] == cfg
    assert_states_close(net.state_dict(), states[(128, 0.05)])
    res = run_cli("generate", "--checkpoint", files[1], "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "g.png").size[1] == 29 + 1
    res = run_cli("phema", "--run", tmp_path / "run", "--sigma-rel", "0.02", "--out", tmp_path / "out2", "--quiet")
    assert res.exit_code == 0 and "warning: sigma_rel 0.02 is outside the tracked range" in res.output


def test_cli_errors_are_one_line(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    (tmp_path / "empty").mkdir()
    other = cfg.override("network", dropout=0.1)
    write_run(tmp_path / "mixed", cfg)
    ckpt.save_network(tmp_path / "mixed" / "z.safetensors", ckpt.build_denoiser(other).state_dict(), cfg=other, nimg=64, ema_std=0.1)
    cases = [(("--run", tmp_path / "empty", "--sigma-rel", "0.05"), "empty run folder"),
             (("--run", tmp_path / "mixed", "--sigma-rel", "0.05"), "different network configs"),
             (("--run", tmp_path / "run", "--sigma-rel", "0.5"), "out of range"),
             (("--run", tmp_path / "run", "--sigma-rel", "0,0.05"), "out of range"),
             (("--run", tmp_path / "run", "--sigma-rel", "abc"), "cannot parse --sigma-rel"),
             (("--run", tmp_path / "run", "--sigma-rel", "0.05", "--at-nimg", "10"), "before the first snapshot"),
             (("--run", tmp_path / "run"), "give --sigma-rel")]
    for args, message in cases:
        res = run_cli("phema", *args, "--out", tmp_path / "o", "--quiet")
        assert res.exit_code != 0 and "Traceback" not in res.output and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.filterwarnings("ignore::edmkit.training.phema.PosthocEMAWarning")  # 0.04 and 0.13 are extrapolated on purpose
def test_sweep_writes_table_plot_and_names_the_best(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    (_, target, _), = ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.07])

    def distance_to_007(net):  # minimal exactly at sigma_rel 0.07
        return sum(float(((v - target[k]) ** 2).sum()) for k, v in net.state_dict().items() if v.is_floating_point())

    grid = (0.04, 0.07, 0.1, 0.13)
    result = phs.sweep(tmp_path / "run", out_dir=tmp_path / "sweep", sigma_rels=grid, score_fn=distance_to_007)
    assert result["best"]["sigma_rel"] == 0.07 and result["best"]["score"] < 1e-6
    assert [r["sigma_rel"] for r in result["rows"]] == list(grid) and all(r["score"] > 1e-3 for r in result["rows"] if r["sigma_rel"] != 0.07)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [float(r["sigma_rel"]) for r in rows] == list(grid)
    assert min(rows, key=lambda r: float(r["score"]))["sigma_rel"] == "0.07"
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["best"]["sigma_rel"] == 0.07 and saved["lower_is_better"] and len(saved["rows"]) == 4
    assert Image.open(tmp_path / "sweep" / "sweep.png").size == (600, 400)
    net, meta = ckpt.load_network(result["network"])
    assert meta["ema_std"] == 0.07 and distance_to_007(net) < 1e-6


def test_default_score_is_fixed_and_cli_sweep_runs(tmp_path, cfg):
    write_run(tmp_path / "run", cfg)
    score = phs.denoising_score(cfg, n_images=4, n_sigmas=1)
    a, b = ckpt.build_denoiser(cfg).eval(), ckpt.load_network(ckpt.network_path(tmp_path / "run", 64, 0.05))[0]
    assert score(a) == score(a) and score(a) != score(b) and score(b) > 0
    res = run_cli("phema", "--run", tmp_path / "run", "--sweep", "--sigma-rel", "0.05,0.1", "--score-images", "2", "--score-sigmas", "1",
                  "--device", "cpu", "--out", tmp_path / "sweep", "--quiet")
    assert res.exit_code == 0, res.output
    assert "best: sigma_rel" in res.output and (tmp_path / "sweep" / "sweep.png").is_file()
    best = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]
    assert best["score"] == min(r["score"] for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"])


def test_snapshot_dtype_option_and_disk_estimate():
    assert snapshot_disk_estimate(n_params=1000, n_stds=2, snapshot_nimg=256, total_nimg=640) == (9, 9 * 4000)  # 256, 512, 640
    assert snapshot_disk_estimate(n_params=1000, n_stds=2, snapshot_nimg=256, total_nimg=512, dtype="float16") == (6, 6 * 2000)
    assert EMAConfig().snapshot_dtype == "float32" and get_preset("mnist").ema.snapshot_dtype == "float32"
    with pytest.raises(ValueError, match="snapshot_dtype"):
        EMAConfig(snapshot_dtype="bfloat16")


def test_float16_snapshots_from_a_short_run(tmp_path, cfg):
    from edmkit.training.loop import train

    run_cfg = cfg.override("ema", snapshot_nimg=4, snapshot_dtype="float16").override("train", batch=4, total_nimg=8, grid_nimg=10**9,
                                                                                      grid_n=2, sample_steps=2)
    lines = []
    train(run_cfg, tmp_path / "run", progress=False, log=lines.append)  # 2 steps of 4 images
    n_params = sum(v.numel() for v in ckpt.build_denoiser(run_cfg).state_dict().values() if v.is_floating_point())
    assert f"EMA snapshots: 6 files, ~{6 * 2 * n_params / 1e6:.1f} MB" in "\n".join(lines)
    files = sorted((tmp_path / "run").glob("network-*.safetensors"))
    assert len(files) == 6 and sum(f.stat().st_size for f in files) < 6 * 2 * n_params + 6 * 20_000
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(files[-1])).values() if v.is_floating_point())
    (_, state, info), = ph.reconstruct_run(tmp_path / "run", sigma_rels=[0.05])
    assert info["nimg"] == 8 and state[next(iter(state))].dtype == torch.float32
