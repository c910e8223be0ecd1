"""benchmarks/gpu_check.py: exits at once without CUDA, and its smoke mode runs every section end to end on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_nothing_runs(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: nothing run"
    assert not (tmp_path / "out").exists()


def test_smoke_run_writes_every_section(gpu_check, tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--device", "cpu", "--smoke"]) == 0
    d = json.loads((out / "gpu_check.json").read_text())
    assert {"date", "device_name", "torch", "cuda", "missing_packages"} <= set(d) and d["smoke"]
    s = d["sections"]
    assert set(s) == {"tests", "train", "sampling", "ddp"}
    assert not any("error" in rec for rec in s.values()), {k: rec.get("error") for k, rec in s.items()}
    assert s["tests"]["passed"] >= 1 and not s["tests"]["failed"]
    presets = s["train"]["presets"]
    assert set(presets) == set(gpu_check.train_presets()) >= {"cifar10", "ddpmpp-cifar10", "ncsnpp-cifar10"}
    assert {"fp32", "bf16", "bf16+compile"} <= set(presets["cifar10"])
    assert all(m["img_per_sec"] > 0 for v in presets.values() for m in v.values()), presets
    assert s["train"]["peers"]["edmkit-G"]["fp32"]["img_per_sec"] > 0
    assert "cifar10 bf16 / fp32" in s["train"]["ratios"]
    assert {"fp32 b=1", "bf16 b=1"} <= set(s["sampling"]["evals_per_sec"])
    assert all("ratio" in v for v in s["sampling"]["heun_over_bare"].values())
    # DDP: one process is the plain step bit for bit; two are too up to float rounding
    assert s["ddp"]["world1"]["ok"] and s["ddp"]["world1"]["equal"] and s["ddp"]["world2"]["ok"]
    summary = (out / "summary.md").read_text()
    for title in ("1 Tests", "2 Training", "3 Sampling", "4 DDP", "cifar10 bf16 / fp32", "1 process(es): OK"):
        assert title in summary, title
