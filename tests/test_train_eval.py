"""In-training evaluation (``edmkit train --eval-every K --eval-ref REF``): small-n FID / KID records of the sampling EMA,
weights unchanged by it, bad files refused before the run folder is touched, labelled curves in the report.

A tiny TorchScript detector and a reference of 64 embedded MNIST digits stand in for Inception (nothing is downloaded)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from test_metrics import save_tiny_detector  # the same tiny TorchScript detector as the metrics tests

from edmkit import checkpoint as ckpt
from edmkit import report
from edmkit.cli import main
from edmkit.data.dataset import load_dataset
from edmkit.metrics import evaluate as ev
from edmkit.metrics import reference as rf
from edmkit.metrics.detectors import load_detector
from edmkit.presets import get_preset
from edmkit.training.loop import train
from edmkit.training.monitor import preserved_rng
from edmkit.training.run_state import RunError

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    det, other = save_tiny_detector(d / "tiny.pt", 0), save_tiny_detector(d / "other.pt", 1)
    ref = ev.compute_reference(load_dataset("mnist5k").images[:64], detector=load_detector(det), source="mnist5k[:64]")
    rf.save_reference(d / "ref.npz", ref)
    return {"dir": d, "detector": det, "other": other, "ref": d / "ref.npz"}


def tiny_cfg(files, **train):
    # dropout on: it draws from the global RNG, so an evaluation that disturbed that RNG would change the weights
    cfg = get_preset("tiny").override("network", dropout=0.1)
    return cfg.override("train", **{**dict(grid_nimg=10**9, total_nimg=80), **train})


def eval_cfg(files, **train):
    return tiny_cfg(files, **{**dict(eval_nimg=32, eval_ref=str(files["ref"]), eval_n=8, eval_steps=2, eval_detector=str(files["detector"])), **train})


def records(run, kind):
    return [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def eval_run(files):
    """A run with evaluation every 32 images: stopped at 48, resumed to 80 with another eval_n (allowed on resume)."""
    run = files["dir"] / "run"
    train(eval_cfg(files), run, stop_nimg=48, **QUIET)
    state = train(eval_cfg(files).override("train", eval_n=6), run, **QUIET)
    return run, state


def test_metric_records_at_the_right_nimg_finite_and_labelled_small_n(eval_run):
    run, state = eval_run
    recs = records(run, "metric")
    assert [r["nimg"] for r in recs] == [32, 48, 64, 80]  # every 32 images and at the end of each leg
    assert [r["n"] for r in recs] == [8, 8, 6, 6]  # eval_n changed on resume at 48
    for r in recs:
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and math.isfinite(r["kid"])
        assert "small-n" in r["label"] and set(r["labels"]) == {"fid", "kid"}
        assert r["labels"]["fid"] == f"fid (n={r['n']}, small-n estimate, biased upward vs 50k)"
    assert len({r["fid"] for r in recs}) == len(recs)  # the network changes between evaluations


def test_evaluated_network_is_the_one_generate_uses(eval_run, files):
    run, _ = eval_run
    last = records(run, "metric")[-1]
    net, meta = ckpt.load_network(ckpt.find_network(run), device="cpu")  # edmkit generate --checkpoint RUN
    assert meta["nimg"] == last["nimg"] and meta["ema_std"] == get_preset("tiny").ema.sample_std
    ref = rf.load_reference(files["ref"])
    c = meta["config"].network
    result = ev.evaluate_generator(net, ref=ref, detector=load_detector(files["detector"]), seeds=list(range(6)), metrics=("fid",),
                                   generate_kw=dict(resolution=c.resolution, channels=c.channels, steps=2))
    assert result["repeats"][0]["fid"] == pytest.approx(last["fid"], rel=1e-6)


def test_weights_are_bit_identical_with_and_without_evaluation(eval_run, tmp_path, files):
    _, with_eval = eval_run
    without = train(tiny_cfg(files), tmp_path / "plain", **QUIET)
    assert without.nimg == with_eval.nimg == 80 and not records(tmp_path / "plain", "metric")
    for k, v in without.net.state_dict().items():
        assert torch.equal(v, with_eval.net.state_dict()[k]), k
    for i in range(len(without.ema.stds)):
        for k, v in without.ema.averaged(i).items():
            assert torch.equal(v, with_eval.ema.averaged(i)[k]), k
    # the global RNG the resumable state carries is the one of a run without evaluation
    saved = [ckpt.load_state(ckpt.list_states(run)[-1]) for run in (eval_run[0], tmp_path / "plain")]
    assert saved[0]["nimg"] == saved[1]["nimg"] == 80 and torch.equal(saved[0]["torch_rng"], saved[1]["torch_rng"])


def test_evaluating_the_raw_training_weights_leaves_them_alone(tmp_path, files):
    # ema.sample_std = 0: the evaluation samples with the training network itself (eval mode: no forced weight normalization)
    raw = dict(total_nimg=48)
    states = [train(make(files, **raw).override("ema", sample_std=0.0), tmp_path / name, **QUIET)
              for make, name in ((eval_cfg, "eval"), (tiny_cfg, "plain"))]
    assert len(records(tmp_path / "eval", "metric")) == 2 and states[0].net.training
    for k, v in states[1].net.state_dict().items():
        assert torch.equal(v, states[0].net.state_dict()[k]), k


def test_preserved_rng_restores_the_global_stream():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with preserved_rng(torch.device("cpu")):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("change, match", [
    (dict(eval_ref="missing.npz"), "no such reference file"),
    (dict(eval_ref="corrupt"), "corrupt or not a reference file"),
    (dict(eval_detector="other"), "detector hash mismatch"),
    (dict(eval_detector="no-such.pt"), "not found"),
    (dict(eval_n=3), "at least 4 images"),
])
def test_bad_eval_files_fail_before_the_run_folder_is_touched(tmp_path, files, change, match):
    paths = {"missing.npz": tmp_path / "missing.npz", "corrupt": tmp_path / "corrupt.npz", "other": files["other"], "no-such.pt": tmp_path / "no-such.pt"}
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    change = {k: str(paths.get(v, v)) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(RunError, match=match):
        train(eval_cfg(files, **change), tmp_path / "new", **QUIET)
    assert not (tmp_path / "new").exists()


def test_bad_eval_file_leaves_an_existing_run_unchanged(tmp_path, files):
    run = tmp_path / "run"
    train(tiny_cfg(files), run, stop_nimg=16, **QUIET)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunError, match="no such reference file"):
        train(eval_cfg(files, eval_ref=str(tmp_path / "missing.npz")), run, **QUIET)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_cli_eval_flags(tmp_path, files):
    runner = CliRunner()
    args = ["train", "--preset", "tiny", "--run", str(tmp_path / "run"), "--eval-every", "32", "--eval-n", "8", "--eval-steps", "2",
            "--eval-metrics", "fid", "--eval-detector", str(files["detector"])]
    res = runner.invoke(main, args + ["--eval-ref", str(files["ref"]), "--dry-run"])
    assert res.exit_code == 0, res.output
    t = json.loads(res.stdout)["train"]  # stderr: params, GFLOPs
    assert (t["eval_nimg"], t["eval_n"], t["eval_steps"], t["eval_metrics"], t["eval_ref"]) == (32, 8, 2, ["fid"], str(files["ref"]))
    res = runner.invoke(main, args + ["--eval-ref", str(tmp_path / "missing.npz"), "--quiet"])
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1 and "no such reference file" in res.output, res.output
    assert not (tmp_path / "run").exists()
    for bad, match in ((["--eval-every", "32"], "needs a reference file"), (["--eval-ref", str(files["ref"])], "take effect with --eval-every"),
                       (["--eval-every", "32", "--eval-ref", str(files["ref"]), "--eval-metrics", "fid,nope"], "unknown metrics")):
        res = runner.invoke(main, ["train", "--preset", "tiny", "--dry-run"] + bad)
        assert res.exit_code != 0 and match in res.output, res.output


def test_report_renders_the_labelled_metric_curves(eval_run, tmp_path, monkeypatch):
    run, _ = eval_run
    drawn = {}
    original = report.plot_series

    def spy(path, series, **kw):
        drawn[path.name] = (kw["title"], {name: xs for name, (xs, ys) in series.items()})
        original(path, series, **kw)

    monkeypatch.setattr(report, "plot_series", spy)
    page = report.write_report(run, tmp_path / "rep", gif_n=0)
    assert {"metric_metric_fid.png", "metric_metric_kid.png"} <= set(drawn)
    assert not any(name in drawn for name in ("metric_metric_n.png", "metric_metric_eval_sec.png", "metric_metric_kid_std.png"))
    title, series = drawn["metric_metric_fid.png"]
    # two sample sizes are two curves, each named by its small-n label
    assert series == {"fid (n=8, small-n estimate, biased upward vs 50k)": [32, 48], "fid (n=6, small-n estimate, biased upward vs 50k)": [64, 80]}
    assert (tmp_path / "rep" / "metric_metric_fid.png").stat().st_size > 0 and 'src="metric_metric_fid.png"' in page.read_text()
    single = tmp_path / "single"
    single.mkdir()
    (single / "stats.jsonl").write_text("\n".join(json.dumps(r) for r in records(run, "metric")[:2]) + "\n")
    text = report.write_report(single, gif_n=0).read_text()
    assert "metric: fid (n=8, small-n estimate, biased upward vs 50k)" in text  # the label is the caption of a one-curve plot
