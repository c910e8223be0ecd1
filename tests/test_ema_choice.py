"""The end-of-training EMA choice (training.ema_choice): a finished run sweeps its post-hoc EMA lengths, keeps the best
in <run>/ema-choice/, and `generate --checkpoint RUN` samples it until training goes on; the score is FID where a
reference fits the data (the built-in digit detector on the embedded digits) and the denoising loss elsewhere."""

import json

import pytest
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.presets import get_preset
from edmkit.training import ema_choice
from edmkit.training.loop import train
from edmkit.training.run_state import RunError

GRID = (0.05, 0.07, 0.10)


def tiny(choose: str, **train_kw):
    return get_preset("tiny").override("ema", choose=choose, choose_stds=GRID, choose_n=4).override("train", total_nimg=512, **train_kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("choice") / "run"
    cfg = tiny("loss")
    train(cfg, run, progress=False, log=lambda s: None)
    return cfg, run


def test_a_finished_run_keeps_the_best_reconstruction_and_generate_samples_it(finished):
    cfg, run = finished
    sweep = json.loads((run / ckpt.EMA_CHOICE_DIR / "sweep.json").read_text())
    choice = json.loads((run / ckpt.EMA_CHOICE_DIR / ckpt.EMA_CHOICE_FILE).read_text())
    scores = {r["sigma_rel"]: r["score"] for r in sweep["rows"]}
    assert sorted(scores) == list(GRID) and sweep["score"] == "denoising loss"
    best = min(scores, key=scores.get)
    assert choice["sigma_rel"] == best and choice["nimg"] == 512
    path = ckpt.find_network(run)
    assert path.parent.name == ckpt.EMA_CHOICE_DIR and ckpt.read_network_metadata(path)["ema_std"] == pytest.approx(best)
    assert ckpt.find_network(run, ema_std=0.1).parent == run  # an explicit EMA still picks the tracked file
    assert (run / ckpt.EMA_CHOICE_DIR / "grid.png").is_file()
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(run), "--n", "2", "--steps", "2", "--out", str(run.parent / "g.png"),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"EMA {best:g}" in result.output


def test_training_on_makes_the_choice_stale_and_chooses_again(finished, tmp_path):
    cfg, run = finished
    import shutil

    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    longer = cfg.override("train", total_nimg=640)
    train(longer, run, stop_nimg=576, progress=False, log=lambda s: None)  # a stop short of the end: no choice
    assert ckpt.chosen_network(run) is None and ckpt.find_network(run).parent == run
    train(longer, run, progress=False, log=lambda s: None)
    assert json.loads((run / ckpt.EMA_CHOICE_DIR / ckpt.EMA_CHOICE_FILE).read_text())["nimg"] == 640
    assert ckpt.chosen_network(run) is not None


def test_the_score_is_fid_where_a_reference_fits_else_the_loss(tmp_path):
    assert ema_choice.score_kind(tiny("auto")) == "fid"  # the embedded digits: the built-in detector
    assert ema_choice.score_kind(tiny("auto", data=str(tmp_path / "x.npz"))) == "loss"
    assert ema_choice.score_kind(tiny("auto", data=str(tmp_path / "x.npz"), eval_ref=str(tmp_path / "ref.npz"))) == "fid"
    assert ema_choice.score_kind(tiny("off")) == "off"
    assert ema_choice.score_kind(tiny("loss")) == "loss"
    assert ema_choice.score_kind(tiny("auto", task="sr")) == "off"
    assert ema_choice.score_kind(get_preset("movingmnist").override("ema", choose="loss")) == "off"
    with pytest.raises(RunError, match="--eval-ref"):
        ema_choice.score_kind(tiny("fid", data=str(tmp_path / "x.npz")))


def test_digits_are_scored_by_the_built_in_detector_fid(finished, tmp_path):
    cfg, run = finished
    choice_cfg = cfg.override("ema", choose="fid")
    import shutil

    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(ckpt.EMA_CHOICE_DIR))
    result = ema_choice.choose_ema(choice_cfg, tmp_path / "run", log=lambda s: None)
    assert result["score_name"] == "FID (n=4)"
    assert len({r["score"] for r in result["rows"]}) == len(GRID)  # each EMA length gives its own FID
    assert ema_choice.choose_ema(choice_cfg, tmp_path / "run", log=lambda s: None) is None  # made once per snapshot
