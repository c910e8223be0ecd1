"""Post-hoc EMA sweep scored by FID (EDM2 Fig. 5): each row's score is the FID that
``evaluate_generator`` gives the reconstructed network saved for that sigma_rel (same fixed seeds),
the best is the argmin, notices are printed once, and bad references / detectors fail in one line
before anything is written.

The run is built by writing snapshot files directly (``write_run`` of test_phema: tiny preset,
perturbed weights, so every sigma_rel gives a visibly different network); the detector is the tiny
TorchScript network of test_metrics, the reference its statistics of random images.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from test_metrics import save_tiny_detector
from test_phema import write_run

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.metrics.detectors import load_detector
from edmkit.metrics.evaluate import compute_reference, evaluate_generator
from edmkit.metrics.reference import save_reference
from edmkit.presets import get_preset
from edmkit.training import phema as ph
from edmkit.training import phema_sweep as phs

N, STEPS, BATCH = 6, 2, 4
GRID = (0.05, 0.08, 0.1)  # inside the tracked range [0.05, 0.1]: no extrapolation warnings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("phema_fid")
    cfg = get_preset("tiny")
    write_run(root / "run", cfg)
    paths = {"tiny": save_tiny_detector(root / "tiny.pt", 0), "other": save_tiny_detector(root / "other.pt", 1)}
    det = load_detector(paths["tiny"])
    images = torch.randint(0, 256, (32, cfg.network.channels, cfg.network.resolution, cfg.network.resolution),
                           generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ref = compute_reference(images, detector=det, source="random", batch=16)
    save_reference(root / "ref.npz", ref)
    return dict(root=root, cfg=cfg, run=root / "run", det=det, ref=ref, ref_path=root / "ref.npz", paths=paths)


def shape_kw(cfg):
    n = cfg.network
    return dict(resolution=n.resolution, channels=n.channels, label_dim=n.label_dim)


def direct_fid(net, s, *, seeds):
    """FID of `net` computed straight with the metrics code, bypassing phema."""
    result = evaluate_generator(net, ref=s["ref"], detector=s["det"], seeds=list(seeds), metrics=("fid",), batch=BATCH,
                                generate_kw=dict(steps=STEPS, **shape_kw(s["cfg"])))
    return result["repeats"][0]["fid"]


def test_sweep_rows_are_the_fid_of_each_saved_reconstruction(setup, tmp_path):
    s = setup
    notices = []
    score = phs.fid_score(s["ref"], s["det"], n=N, steps=STEPS, batch=BATCH, log=notices.append, **shape_kw(s["cfg"]))
    assert score.__name__ == f"FID (n={N})"
    result = phs.sweep(s["run"], out_dir=tmp_path / "sweep", sigma_rels=GRID, score_fn=score)
    assert sum("FID is biased" in line for line in notices) == 1  # once, not once per sigma_rel
    assert result["score_name"] == f"FID (n={N})" and [r["sigma_rel"] for r in result["rows"]] == list(GRID)

    saved = ph.save_reconstructions(s["run"], sigma_rels=GRID, out_dir=tmp_path / "nets")
    for row, (path, _) in zip(result["rows"], saved):
        net, meta = ckpt.load_network(path)
        assert meta["ema_std"] == row["sigma_rel"]
        assert row["score"] == pytest.approx(direct_fid(net, s, seeds=range(N)), rel=1e-9, abs=1e-12)
    scores = [r["score"] for r in result["rows"]]
    assert len(set(scores)) == len(GRID)  # the networks differ, and so do their FIDs
    # the seeds are fixed: scoring again gives the same number, other seeds a different one
    net, _ = ckpt.load_network(saved[0][0])
    assert score(net) == scores[0] and direct_fid(net, s, seeds=range(N, 2 * N)) != pytest.approx(scores[0], rel=1e-6)

    best = min(result["rows"], key=lambda r: r["score"])
    assert result["best"] == best
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["score"] == f"FID (n={N})" and table["best"]["sigma_rel"] == best["sigma_rel"]
    assert [r["score"] for r in table["rows"]] == scores
    _, meta = ckpt.load_network(result["network"])
    assert meta["ema_std"] == best["sigma_rel"]


def test_fid_score_checks_its_inputs(setup):
    s = setup
    kw = dict(steps=STEPS, batch=BATCH, **shape_kw(s["cfg"]))
    with pytest.raises(ValueError, match="detector hash mismatch"):
        phs.fid_score(s["ref"], load_detector(s["paths"]["other"]), n=N, **kw)
    with pytest.raises(ValueError, match="n >= 2"):
        phs.fid_score(s["ref"], s["det"], n=1, **kw)
    with pytest.raises(ValueError, match="distinct seeds"):
        phs.fid_score(s["ref"], s["det"], n=3, seeds=[0, 1, 1], **kw)
    with pytest.raises(ValueError, match="unknown sampler"):
        phs.fid_score(s["ref"], s["det"], n=N, sampler="nope", **kw)
    notices = []
    phs.fid_score(s["ref"], s["det"], n=N, seeds=range(10, 10 + N), log=notices.append, **kw)
    assert any(f"n = {N}" in line for line in notices) and any("grayscale" in line for line in notices)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_fid_sweep_matches_the_library(setup, tmp_path):
    s = setup
    args = ("--sigma-rel", "0.05,0.1", "--device", "cpu", "--quiet")
    res = run_cli("phema", "--run", s["run"], "--sweep", "--score", "fid", "--ref", s["ref_path"], "--detector", s["paths"]["tiny"],
                  "--score-n", 4, "--score-steps", STEPS, "--batch", 3, "--out", tmp_path / "cli", *args)
    assert res.exit_code == 0, res.output
    assert res.output.count("FID is biased") == 1 and "best: sigma_rel" in res.output and "FID (n=4)" in res.output
    table = json.loads((tmp_path / "cli" / "sweep.json").read_text())
    score = phs.fid_score(s["ref"], s["det"], n=4, steps=STEPS, batch=3, **shape_kw(s["cfg"]))
    lib = phs.sweep(s["run"], out_dir=tmp_path / "lib", sigma_rels=(0.05, 0.1), score_fn=score, save_best=False)
    assert table["score"] == "FID (n=4)" and [r["score"] for r in table["rows"]] == [r["score"] for r in lib["rows"]]
    assert table["best"]["score"] == min(r["score"] for r in table["rows"])


def test_cli_fid_errors_are_one_line_and_write_nothing(setup, tmp_path):
    s = setup
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    tiny, other = s["paths"]["tiny"], s["paths"]["other"]
    base = ("--run", s["run"], "--sweep", "--sigma-rel", "0.05,0.1", "--device", "cpu", "--quiet")
    cases = [((*base, "--score", "fid"), "--score fid needs --ref"),
             ((*base, "--score", "fid", "--ref", tmp_path / "corrupt.npz", "--detector", tiny), "corrupt or not a reference file"),
             ((*base, "--score", "fid", "--ref", tmp_path / "missing.npz", "--detector", tiny), "no such reference file"),
             ((*base, "--score", "fid", "--ref", s["ref_path"], "--detector", other), "detector hash mismatch"),
             ((*base, "--score", "fid", "--ref", s["ref_path"]), "user TorchScript detector"),
             ((*base, "--ref", s["ref_path"]), "--ref and --detector are for --score fid"),
             (("--run", s["run"], "--sigma-rel", "0.05", "--score", "fid", "--ref", s["ref_path"]), "add --sweep")]
    for args, message in cases:
        res = run_cli("phema", *args, "--out", tmp_path / "o")
        assert res.exit_code != 0 and "Traceback" not in res.output and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()  # refused before anything is written
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "sweep.csv").write_text("old table\n")
    res = run_cli("phema", *cases[1][0], "--out", tmp_path / "kept")
    assert res.exit_code != 0 and [p.name for p in (tmp_path / "kept").iterdir()] == ["sweep.csv"]
    assert (tmp_path / "kept" / "sweep.csv").read_text() == "old table\n"
