"""The GPU benchmark's own code path, run on the CPU: no GPU exists here, so this checks that the prepared
script runs end to end and writes every figure it promises, not what a GPU would measure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_script_runs_every_part_on_the_cpu(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--no-compile",
           "--batches", "2", "--warmup", "1", "--repeats", "1", "--epochs", "1", "--limit-train", "256",
           "--workers", "1,2", "--worker-batches", "2", "--worker-seconds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu"

    throughput = figures["throughput"]
    median = throughput["median_images_per_s"]
    assert set(median) == {"reference", "mnistlab"}  # no CUDA-only or compiled paths
    assert all(v > 0 for v in median.values())
    assert throughput["ratio_to_reference"]["mnistlab"] == pytest.approx(median["mnistlab"] / median["reference"])

    epochs = figures["epochs"]
    assert set(epochs) == {"plain"}
    assert epochs["plain"]["epochs"] == 1 and epochs["plain"]["train_images"] == 256
    assert 0.0 < epochs["plain"]["test_acc"] <= 100.0 and len(epochs["plain"]["seconds_per_epoch"]) == 1

    workers = figures["workers"]
    rows = workers["rows"]
    assert sorted(rows, key=int) == ["1", "2"]
    assert len(rows["2"]["rates"]) == 2 and all(r > 0 for r in rows["2"]["rates"])
    two_vs_one = rows["2"]["per_worker_images_per_s"] / rows["1"]["per_worker_images_per_s"]
    assert rows["2"]["per_worker_vs_one"] == pytest.approx(two_vs_one)
    assert workers["served"] == (2 if two_vs_one >= 0.9 else 1)
    assert f"served at >= 90% of one worker's rate: up to {workers['served']} workers" in proc.stdout


@pytest.mark.parametrize(("bad", "message"), [(["--parts", "speed"], "unknown part 'speed'"),
                                              (["--workers", "0,2"], "--workers: positive counts")])
def test_gpu_script_refuses_bad_arguments(bad: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    with pytest.raises(SystemExit) as exit_:
        gpu.main(bad)  # refused before any data is read or any worker starts
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and message in last, last
