"""A run folder that cannot be corrupted (issue 18): one writer at a time, stats that match the resumed state, write
failures that name the file and keep the earlier files, broken folders refused with one line, SIGTERM under torchrun."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edmkit import checkpoint as ckpt
from edmkit.cli import main
from edmkit.config import ExperimentConfig
from edmkit.files import writer_lock
from edmkit.presets import get_preset
from edmkit.report import write_report
from edmkit.training.loop import train
from edmkit.training.run_state import RunError

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "v0" / "run"
QUIET = dict(progress=False, log=lambda s: None)
TIMING = ("train_sec", "img_per_sec")


@pytest.fixture
def cfg():
    return get_preset("tiny").override("train", grid_nimg=10**9, total_nimg=64)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


# --- one writer per folder ------------------------------------------------------------------------------------------


def lock_targets(tmp_path):
    """(command, the folder or file it writes, whether that is a single file)."""
    run = tmp_path / "fixture-run"
    shutil.copytree(FIXTURE_RUN, run)
    return [
        (["train", "--preset", "tiny", "--duration", "32", "--run", str(tmp_path / "run")], tmp_path / "run", False),
        (["train-classifier", "--preset", "tiny", "--duration", "32", "--out", str(tmp_path / "clf.safetensors")], tmp_path / "clf-state", False),
        (["phema", "--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "phema")], tmp_path / "phema", False),
        (["dataset", "convert", "mnist5k", str(tmp_path / "d.zip")], tmp_path / "d.zip", True),
        (["metrics", "ref", "--data", "mnist5k", "--detector", str(tmp_path / "none.pt"), "--out", str(tmp_path / "ref.npz")],
         tmp_path / "ref.npz", True),
    ]


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tmp_path):
    for args, target, is_file in lock_targets(tmp_path):
        with writer_lock(target, file=is_file):
            before = sorted(p.name for p in target.parent.rglob("*"))
            result = invoke(*args)
            assert result.exit_code != 0, (args, result.output)
            assert "is in use" in result.output and f"pid {os.getpid()}" in result.output and str(target) in result.output, result.output
            assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
            assert sorted(p.name for p in target.parent.rglob("*")) == before, args  # nothing written


def test_a_killed_writer_leaves_no_stale_lock_and_readers_need_none(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    code = f"from edmkit.files import writer_lock\nwith writer_lock({str(run)!r}):\n    print('locked', flush=True)\n    import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    result = invoke("generate", "--checkpoint", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert result.exit_code == 0, result.output  # a reader works while the run folder is held
    with pytest.raises(OSError, match=f"pid {proc.pid}"):
        with writer_lock(run):
            pass
    proc.kill()
    proc.wait()
    with writer_lock(run):  # the OS released the dead holder's lock
        pass


# --- stats.jsonl matches the state ------------------------------------------------------------------------------------


def test_a_crashed_and_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path, cfg):
    cfg = cfg.override("train", state_nimg=64, status_nimg=32)
    train(cfg.override("train", total_nimg=128), tmp_path / "straight", **QUIET)
    crashed = tmp_path / "crashed"
    train(cfg, crashed, **QUIET)  # states at 64; records at 32, 64
    with open(crashed / "stats.jsonl", "a") as f:  # a crash after the status record at 96, before its state, mid-way through a line
        f.write(json.dumps({**records(crashed)[-1], "nimg": 96, "step": 6}) + "\n" + '{"kind": "train", "nimg": 1')
    notices = []
    train(cfg.override("train", total_nimg=128), crashed, progress=False, log=notices.append)
    assert any("dropped 1 unreadable line" in n for n in notices) and any("dropped 1 record(s) after the resumed state" in n for n in notices)
    a, b = records(tmp_path / "straight"), records(crashed)
    assert [r["nimg"] for r in a] == [r["nimg"] for r in b] == [32, 64, 96, 128]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


def test_a_torn_last_line_is_a_notice_in_the_report(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"kind": "train", "nimg": 1')
    notices = []
    write_report(run, gif_n=0, log=notices.append)
    assert len(notices) == 1 and "unreadable line" in notices[0]
    result = invoke("report", str(run), "--gif-n", "0", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0 and "unreadable line" in result.output, result.output


# --- write failures -----------------------------------------------------------------------------------------------


def fail_fsync_of(monkeypatch, prefix: str, err: int = errno.ENOSPC) -> None:
    """Make fsync fail (as on a full disk) for the temp files of outputs whose name starts with ``prefix``."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{prefix}"):
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("prefix", ["state-", "network-", "grid-"])
def test_a_failed_write_names_the_file_keeps_earlier_files_and_resumes(tmp_path, cfg, monkeypatch, prefix):
    cfg = cfg.override("train", state_nimg=32, grid_nimg=64, total_nimg=64).override("ema", snapshot_nimg=32)
    run = tmp_path / "run"
    train(cfg.override("train", total_nimg=32), run, **QUIET)
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.name not in ("stats.jsonl", "config.json")}  # config: new duration
    fail_fsync_of(monkeypatch, prefix)
    with pytest.raises(OSError, match=rf"cannot write {run}/{prefix}\S+: No space left on device") as info:
        train(cfg, run, **QUIET)
    assert info.value.errno == errno.ENOSPC
    assert no_temp_files(run)
    assert all((run / name).read_bytes() == data for name, data in kept.items())  # every earlier file intact
    assert ckpt.load_state(ckpt.list_states(run)[-1])["nimg"] >= 32
    monkeypatch.undo()  # space freed: the same command resumes and finishes
    assert train(cfg, run, **QUIET).nimg == 64


def test_failed_dataset_and_report_writes_are_one_line_errors(tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    fail_fsync_of(monkeypatch, "d.zip")
    result = invoke("dataset", "convert", "mnist5k", str(tmp_path / "d.zip"), "--classes", "1")
    assert result.exit_code != 0 and "cannot write" in result.output and "d.zip: No space left" in result.output, result.output
    assert not (tmp_path / "d.zip").exists() and no_temp_files(tmp_path)
    fail_fsync_of(monkeypatch, "index.html", errno.EACCES)
    result = invoke("report", str(run), "--gif-n", "0", "--out", str(tmp_path / "r"))
    assert result.exit_code != 0 and "index.html: Permission denied" in result.output, result.output
    assert not (tmp_path / "r" / "index.html").exists() and no_temp_files(tmp_path)


def test_a_real_file_size_limit_stops_training_with_one_line_and_resumes(tmp_path):
    """``ulimit -f`` (no root needed): the state file exceeds it, the write fails with EFBIG (Python ignores SIGXFSZ)."""
    run = tmp_path / "run"
    cmd = f"ulimit -f 600 && exec {sys.executable} -m edmkit train --preset tiny --quiet --duration 160 --run {run}"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=240)
    assert out.returncode != 0 and "cannot write" in out.stderr and "File too large" in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and no_temp_files(run)
    assert all(ckpt.load_network(p)[1]["nimg"] == 160 for p in run.glob("network-*.safetensors"))  # what was written is whole
    ok = subprocess.run([sys.executable, "-m", "edmkit", "train", "--preset", "tiny", "--quiet", "--duration", "160", "--run", str(run)],
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert ckpt.load_state(ckpt.list_states(run)[-1])["nimg"] == 160


# --- broken run folders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{not json", '{"model": "someone else\'s"}', "[1, 2]"])
def test_a_foreign_config_json_is_refused_unless_forced(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    result = invoke("train", "--preset", "tiny", "--duration", "16", "--run", str(run))
    assert result.exit_code != 0 and "config.json: not an edmkit config" in result.output and "--force" in result.output, result.output
    assert (run / "config.json").read_text() == text and not ckpt.list_states(run)
    assert invoke("train", "--preset", "tiny", "--duration", "16", "--run", str(run), "--force", "--quiet").exit_code == 0
    assert ExperimentConfig.from_json((run / "config.json").read_text()).train.total_nimg == 16


def test_a_foreign_state_file_is_refused_not_trained_over(tmp_path, cfg):
    run = tmp_path / "run"
    train(cfg.override("train", total_nimg=16), tmp_path / "other", **QUIET)  # a config.json to reuse
    run.mkdir()
    shutil.copy(tmp_path / "other" / "config.json", run / "config.json")
    torch.save({"weights": torch.zeros(3)}, run / "state-000000000999.pt")
    with pytest.raises(RunError, match="no readable training state among state-000000000999.pt"):
        train(cfg.override("train", total_nimg=16), run, **QUIET)
    assert [p.name for p in ckpt.list_states(run)] == ["state-000000000999.pt"]


def test_network_files_with_missing_or_newer_metadata_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = next(FIXTURE_RUN.glob("network-*-0.100.safetensors"))
    meta = ckpt.read_network_metadata(src)
    tensors = load_file(src)
    base = {"format": "edmkit", "format_version": "1", "config": meta["config"].to_json(), "nimg": "160", "ema_std": "0.1"}
    for change, message in [({"config": None}, "without its 'config' entry"), ({"format_version": "99"}, "format version 99 is newer"),
                            ({"nimg": "many"}, "damaged edmkit metadata")]:
        path = tmp_path / "net.safetensors"
        save_file(tensors, path, metadata={k: v for k, v in {**base, **change}.items() if v is not None})
        result = invoke("generate", "--checkpoint", str(path), "--n", "1", "--steps", "1", "--out", str(tmp_path / "g.png"))
        assert result.exit_code != 0 and str(path) in result.output and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


# --- SIGTERM under torchrun ---------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find torchrun's workers")
def test_sigterm_to_one_rank_stops_every_rank_cleanly_and_resumes_bit_exactly(tmp_path):
    import socket

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def cmd(run: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port()}",
                "-m", "edmkit", "train", "--preset", "tiny", "--quiet", "--duration", "480", "--run-dir", str(run)]

    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo") if os.path.isdir("/sys/class/net/lo") else dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "stopped"
    proc = subprocess.Popen(cmd(run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    while not (run / "stats.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [p for p in children_of(proc.pid) if b"edmkit" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert proc.poll() is None and len(workers) == 2, workers
    os.kill(max(workers), signal.SIGTERM)  # one rank only
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out  # every worker exited 0, so torchrun did too
    assert out.count("stopped by signal 15") == 1 and "done:" not in out, out  # rank 0 reports once
    states = ckpt.list_states(run)
    stopped_at = ckpt.load_state(states[-1])["nimg"]
    assert 0 < stopped_at < 480
    resumed = subprocess.run(cmd(run), capture_output=True, text=True, timeout=240, env=env)
    assert resumed.returncode == 0 and f"resuming from state-{stopped_at:012d}.pt" in resumed.stdout, resumed.stdout + resumed.stderr
    straight = tmp_path / "straight"
    assert subprocess.run(cmd(straight), capture_output=True, timeout=240, env=env).returncode == 0
    a, b = ckpt.load_state(ckpt.list_states(straight)[-1]), ckpt.load_state(ckpt.list_states(run)[-1])
    assert a["nimg"] == b["nimg"] == 480
    for k, v in a["net"].items():
        assert torch.equal(v, b["net"][k]), k
