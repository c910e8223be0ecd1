"""Issue 11, remaining gaps: rejection sampling in the metrics path, and classifier training hygiene (Adam with the
diffusion lr schedule, power-function EMA saved as the classifier, bit-exact resume through train.py's state helpers).

Metrics use the tiny TorchScript detector of test_metrics.py (nothing downloaded). The library tests pair an exact
toy denoiser with a hand-built classifier whose accepted seeds are known (image mean > 0), so the images that must
reach the detector can be computed independently.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_metrics import save_tiny_detector

from edmkit import checkpoint as ckpt
from edmkit import dist
from edmkit.checkpoint import load_classifier
from edmkit.cli import main
from edmkit.data.dataset import ImageDataset, load_dataset
from edmkit.data.images import float_to_images
from edmkit.diffusion.classifier import CLEAN_SIGMA, build_classifier
from edmkit.diffusion.loss import make_loss
from edmkit.diffusion.schedules import learning_rate
from edmkit.metrics import evaluate as ev
from edmkit.metrics import reference as rf
from edmkit.metrics.detectors import load_detector
from edmkit.presets import get_preset
from edmkit.sampling.generate import generate_images
from edmkit.sampling.rejection import Rejection, RejectionTally, accept, candidate_seeds
from edmkit.training import classifier as clf_mod
from edmkit.training.classifier import classifier_state_dir, classifier_step, train_classifier
from edmkit.training.ema import PowerFunctionEMA
from edmkit.training.run_state import RunError, TrainState

RES = 8  # toy image size
GEN_KW = dict(resolution=RES, channels=1, sampler="euler", steps=2)


def toy_denoiser(x, sigma, labels):
    """A fixed smooth denoiser: every seed gives its own image, deterministically."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.8 * x / (1 + s**2).sqrt()


def mean_classifier(x, sigma):
    """2 classes: class 1 when the image mean is positive, confidently (logit gap 400 * mean)."""
    m = x.float().mean(dim=(1, 2, 3))  # [N]
    return torch.stack([-200 * m, 200 * m], dim=1)  # [N, 2]


@pytest.fixture(scope="module")
def det_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    det = load_detector(save_tiny_detector(d / "tiny.pt", 0))
    images = torch.randint(0, 256, (40, 1, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return det, ev.compute_reference(images, detector=det, source="random", batch=16, max_features=24)


def fid_of(x: torch.Tensor, det, ref) -> float:
    """FID of float images x [N, 1, RES, RES] computed directly (the independent check)."""
    stats, _ = ev.accumulate_features([float_to_images(x)], detector=det, keep=0)
    mu, sigma = stats.mean_cov()
    return ev.frechet_distance(mu, sigma, ref.mu, ref.sigma)


# --- rejection in evaluate_generator ---------------------------------------------------------------------------


def test_only_accepted_images_reach_the_detector_and_the_rate_is_reported(det_ref):
    det, ref = det_ref
    n, batch = 6, 4
    rej = Rejection(classifier=mean_classifier, class_idx=1, threshold=0.9, max_tries=40)
    result = ev.evaluate_generator(toy_denoiser, ref=ref, detector=det, seeds=list(range(n)), metrics=("fid",), batch=batch,
                                   generate_kw=GEN_KW, rejection=rej)
    row = result["repeats"][0]
    # independent: all 40 candidates, the accepted mask, the first n accepted
    x = generate_images(toy_denoiser, seeds=range(40), batch=batch, **GEN_KW)
    ok = accept(mean_classifier, x, class_idx=1, threshold=0.9)
    assert ok.any() and not ok.all() and not ok[:n].all()  # a real subset, not a prefix: the check can fail
    last = int(ok.nonzero()[n - 1])  # index of the n-th accepted candidate
    tried = (last // batch + 1) * batch  # whole batches are generated
    assert row["n"] == n and row["tried"] == tried and row["accepted"] == int(ok[:tried].sum())
    assert row["accept_rate"] == pytest.approx(row["accepted"] / tried) and row["seeds"] == f"0-{tried - 1}"
    assert row["fid"] == pytest.approx(fid_of(x[ok][:n], det, ref), rel=1e-6)  # detector batches differ: float32 rounding
    assert row["fid"] != pytest.approx(fid_of(x[:n], det, ref), rel=1e-3)  # the unfiltered first n score differently
    lines = ev.format_results(result)
    assert any(line.startswith("rejection") and f"of {tried} candidates" in line for line in lines), lines
    assert not any(line.startswith("accept_rate") for line in lines)


def test_repeats_draw_candidates_from_disjoint_ranges(det_ref):
    det, ref = det_ref
    rej = Rejection(classifier=mean_classifier, class_idx=0, threshold=0.5, max_tries=20)
    result = ev.evaluate_generator(toy_denoiser, ref=ref, detector=det, seeds=[5, 6, 7], repeats=2, metrics=("fid",), batch=4,
                                   generate_kw=GEN_KW, rejection=rej)
    first, second = (r["seeds"] for r in result["repeats"])
    lo0, hi0 = map(int, first.split("-"))
    lo1, hi1 = map(int, second.split("-"))
    assert lo0 == 5 and lo1 == 25 and hi0 < lo1 and hi1 < 45  # repeat 1: candidates 25-44, none shared with 5-24
    assert "accept_rate" in result["summary"] and all(r["n"] == 3 for r in result["repeats"])
    assert list(candidate_seeds([5, 6, 7])) == list(range(5, 35))  # default: 10 n consecutive seeds from the first


def test_too_few_accepted_is_a_value_error(det_ref):
    det, ref = det_ref
    never = Rejection(classifier=lambda x, s: torch.zeros(len(x), 2), class_idx=1, threshold=0.9, max_tries=8)  # p = 0.5 < 0.9
    with pytest.raises(ValueError, match=r"only 0 of 4 images .* among 8 candidates"):
        ev.evaluate_generator(toy_denoiser, ref=ref, detector=det, seeds=range(4), metrics=("fid",), batch=4, generate_kw=GEN_KW,
                              rejection=never)
    with pytest.raises(ValueError, match="at least the number of images"):
        ev.evaluate_generator(toy_denoiser, ref=ref, detector=det, seeds=range(4), metrics=("fid",), generate_kw=GEN_KW,
                              rejection=Rejection(classifier=mean_classifier, class_idx=1, threshold=0.5, max_tries=3))


def test_rejection_refuses_several_ranks(det_ref, monkeypatch):
    det, ref = det_ref
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="one process"):
        ev.evaluate_generator(toy_denoiser, ref=ref, detector=det, seeds=range(4), metrics=("fid",), generate_kw=GEN_KW,
                              rejection=Rejection(classifier=mean_classifier, class_idx=1, threshold=0.5))


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.01, float("nan")])
def test_rejection_threshold_outside_unit_interval(tau):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Rejection(classifier=mean_classifier, class_idx=1, threshold=tau)


def test_generated_batches_stream_counts(det_ref):
    tally = RejectionTally()
    rej = Rejection(classifier=mean_classifier, class_idx=1, threshold=0.9)
    got = torch.cat(list(ev.generated_batches(toy_denoiser, range(30), batch=4, device="cpu", generate_kw=GEN_KW, rejection=rej, n=5, tally=tally)))
    x = generate_images(toy_denoiser, seeds=range(30), batch=4, **GEN_KW)
    assert torch.equal(got, float_to_images(x[accept(mean_classifier, x, class_idx=1, threshold=0.9)][:5]))
    assert tally.kept == 5 and tally.tried % 4 == 0 and tally.rate == tally.accepted / tally.tried


# --- edmkit metrics gen --classifier ... --reject-threshold ---------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    net = ckpt.build_denoiser(cfg)
    with torch.no_grad():
        net.net.out_gain.fill_(1.0)  # zero at init (images nearly alike); 1 makes each seed's image its own
    ckpt.save_network(d / "net.safetensors", net.state_dict(), cfg=cfg, nimg=0, ema_std=0.0)
    for name, c in [("clf", cfg.override("network", label_dim=2)), ("clf16", cfg.override("network", label_dim=2, resolution=16))]:
        torch.manual_seed(1)
        ckpt.save_network(d / f"{name}.safetensors", build_classifier(c).state_dict(), cfg=c, nimg=0, ema_std=0.0, kind="classifier")
    det_path = save_tiny_detector(d / "tiny.pt", 0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    det = load_detector(det_path)
    rf.save_reference(d / "ref.npz", ev.compute_reference(images, detector=det, source="random", batch=16, max_features=24))
    return d, det_path


def gen_args(d, det_path, *extra):
    return ["metrics", "gen", "--checkpoint", d / "net.safetensors", "--ref", d / "ref.npz", "--detector", det_path, "--steps", "2",
            "--sampler", "euler", "--metrics", "fid", "--batch", "4", "--device", "cpu", "--quiet", *extra]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_metrics_gen_rejection_reports_rate(cli_setup):
    d, det_path = cli_setup
    clf, _ = load_classifier(d / "clf.safetensors")
    cfg = get_preset("tiny").network
    x = generate_images(ckpt.load_network(d / "net.safetensors")[0], seeds=range(12), resolution=cfg.resolution, channels=cfg.channels,
                        class_idx=None, sampler="euler", steps=2, batch=4)
    with torch.no_grad():
        p = clf(x, torch.full([12], CLEAN_SIGMA)).softmax(1)  # [12, 2]
    k = int(p.argmax(1).mode().values)  # the class this (untrained) classifier mostly predicts
    mine = p[p.argmax(1) == k, k].sort().values
    i = int((mine[1:-1] - mine[:-2]).argmax())  # the widest gap leaving >= 2 above it: float rounding cannot move a candidate across
    tau = float(mine[i:i + 2].mean())
    ok = torch.cat([accept(clf, x[i:i + 4], class_idx=k, threshold=tau) for i in range(0, 12, 4)])  # batches as the CLI's
    assert 2 <= int(ok.sum()) < 12
    res = invoke(*gen_args(d, det_path, "--n", "2", "--classifier", d / "clf.safetensors", "--class", k, "--reject-threshold", tau,
                           "--max-tries", "12", "--out", d / "rej.json"))
    assert res.exit_code == 0, res.output
    result = json.loads((d / "rej.json").read_text())
    row = result["repeats"][0]
    last = int(ok.nonzero()[1])
    tried = (last // 4 + 1) * 4
    assert row["n"] == 2 and row["tried"] == tried and row["accepted"] == int(ok[:tried].sum())
    assert row["accept_rate"] == pytest.approx(row["accepted"] / tried)
    assert result["rejection"] == {"class_idx": k, "threshold": tau, "max_tries": 12} and result["classifier"].endswith("clf.safetensors")
    assert "rejection  accepted" in res.output and f"of {tried} candidates" in res.output


def test_cli_metrics_gen_rejection_errors(cli_setup):
    d, det_path = cli_setup
    base = gen_args(d, det_path, "--n", "2", "--out", d / "e.json")
    for extra, msg in [(["--classifier", d / "clf.safetensors", "--class", "0", "--reject-threshold", "0"], "(0, 1]"),
                       (["--classifier", d / "clf.safetensors", "--class", "0", "--reject-threshold", "1.5"], "(0, 1]"),
                       (["--classifier", d / "clf16.safetensors", "--class", "0", "--reject-threshold", "0.5"], "classifier takes 16x16x1"),
                       (["--classifier", d / "clf.safetensors", "--class", "2", "--reject-threshold", "0.5"], "out of range"),
                       (["--classifier", d / "clf.safetensors", "--reject-threshold", "0.5"], "needs --class"),
                       (["--class", "0", "--reject-threshold", "0.5"], "need --classifier"),
                       (["--max-tries", "5"], "--max-tries is for rejection"),
                       (["--classifier", d / "net.safetensors", "--class", "0", "--reject-threshold", "0.5"], "not a classifier"),
                       (["--classifier", d / "clf.safetensors", "--class", "0", "--reject-threshold", "1.0", "--max-tries", "4"],
                        "only 0 of 2 images")]:
        res = invoke(*base, *extra)
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output, (extra, res.output)
        assert len(res.output.strip().splitlines()[-1]) > 0 and res.output.strip().splitlines()[-1].startswith("Error:"), res.output


def test_cli_metrics_gen_classifier_guidance_passes_through(cli_setup):
    d, det_path = cli_setup
    res = invoke(*gen_args(d, det_path, "--n", "2", "--classifier", d / "clf.safetensors", "--class", "1", "--classifier-scale", "0.5",
                           "--out", d / "cg.json"))
    assert res.exit_code == 0, res.output
    result = json.loads((d / "cg.json").read_text())
    assert result["generate"]["classifier_scale"] == 0.5 and result["generate"]["classifier_class"] == 1
    assert result["generate"]["class_idx"] is None and "rejection" not in result  # unconditional model: the class is the classifier's


# --- classifier training: schedule, EMA, resume -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data():
    ds = load_dataset("mnist5k")
    return ImageDataset(images=ds.images[:256].contiguous(), labels=ds.labels[:256].clone(), num_classes=ds.num_classes, name="mnist256")


def tiny_cfg():
    return get_preset("tiny").override("train", state_nimg=64).override("optim", warmup_nimg=48, lr_ref_nimg=96)


def train(out, nimg, data, **kw):
    return train_classifier(tiny_cfg(), out, nimg=nimg, data=data, eval_images=32, num_bins=2, progress=False, log=lambda s: None, **kw)


def test_lr_follows_the_diffusion_schedule(small_data):
    cfg = tiny_cfg().override("network", label_dim=10)
    torch.manual_seed(0)
    net = build_classifier(cfg).train()
    state = TrainState(net=net, optimizer=torch.optim.Adam(net.parameters(), lr=1.0), ema=PowerFunctionEMA(net, stds=(0.05,)))
    lrs = [classifier_step(state, cfg, small_data, torch.arange(200), make_loss(cfg))["lr"] for _ in range(10)]
    o = cfg.optim
    expect = [learning_rate(16 * (k + 1), lr=o.lr, ref_nimg=o.lr_ref_nimg, warmup_nimg=o.warmup_nimg) for k in range(10)]
    assert lrs == expect and state.optimizer.param_groups[0]["lr"] == expect[-1]
    assert lrs[0] < lrs[2] == o.lr and lrs[-1] < o.lr  # warm-up, then inverse-sqrt decay
    assert state.nimg == 160 and state.step == 10


def test_interrupted_and_resumed_training_equals_uninterrupted(small_data, tmp_path, monkeypatch):
    full = train(tmp_path / "full.safetensors", 160, small_data)
    o = tiny_cfg().optim
    assert full["nimg"] == 160 and full["lr"] == learning_rate(160, lr=o.lr, ref_nimg=o.lr_ref_nimg, warmup_nimg=o.warmup_nimg)

    step = clf_mod.classifier_step

    def interrupted_step(state, *args, **kwargs):
        out = step(state, *args, **kwargs)
        if state.step == 5:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during step 5: caught by StopRequest, handled after the step
        return out

    out = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(clf_mod, "classifier_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(out, 160, small_data)
    monkeypatch.setattr(clf_mod, "classifier_step", step)
    states = ckpt.list_states(classifier_state_dir(out))
    assert not out.exists() and states[-1].name == ckpt.state_path(".", 80).name  # saved at the stop, 5 steps x 16 images
    logs = []
    train_classifier(tiny_cfg(), out, nimg=160, data=small_data, eval_images=32, num_bins=2, progress=False, log=logs.append)
    assert any("resuming from state-000000000080.pt" in line for line in logs), logs
    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    sa, sb = (ckpt.load_state(ckpt.list_states(classifier_state_dir(p))[-1]) for p in (tmp_path / "full.safetensors", out))
    assert all(torch.equal(sa["net"][k], sb["net"][k]) for k in sa["net"])

    longer = tmp_path / "longer.safetensors"  # a longer --duration on the same output trains on, as if never stopped
    train(longer, 80, small_data)
    train(longer, 160, small_data)
    c = load_file(str(longer))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_saved_classifier_is_the_ema_not_the_raw_weights(small_data, tmp_path):
    out = tmp_path / "c.safetensors"
    report = train(out, 96, small_data)
    saved = load_file(str(out))
    state = ckpt.load_state(ckpt.list_states(classifier_state_dir(out))[-1])
    ema = state["ema"]["emas"][0]
    assert state["ema"]["stds"] == [0.05] and report["ema_std"] == 0.05
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], state["net"][k]) for k in saved if saved[k].is_floating_point())
    meta = ckpt.read_network_metadata(out)
    assert meta["ema_std"] == 0.05 and meta["nimg"] == 96 and meta["kind"] == "classifier"
    torch.testing.assert_close(load_classifier(out)[0].head.weight, ema["head.weight"])


def test_resume_refuses_another_config(small_data, tmp_path):
    out = tmp_path / "c.safetensors"
    train(out, 32, small_data)
    with pytest.raises(RunError, match="cannot continue training .*optim.lr"):
        train(out, 64, small_data, lr=0.002)
    assert train(out, 64, small_data, lr=0.002, force=True)["nimg"] == 64


def test_cli_train_classifier_resumes(tmp_path):
    out = tmp_path / "c.safetensors"
    args = ["train-classifier", "--preset", "tiny", "--classes", "0,1", "--quiet", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(main, args + ["--duration", "32"])
    assert r.exit_code == 0 and "EMA sigma_rel 0.05 after 32 images" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--duration", "48"])
    assert r.exit_code == 0 and "resuming from state-000000000032.pt" in r.output and "after 48 images" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--duration", "64", "--lr", "0.5"])
    assert r.exit_code != 0 and "cannot continue training" in r.output and "Traceback" not in r.output, r.output
    assert np.isfinite(load_classifier(out)[0].head_gain.item())
