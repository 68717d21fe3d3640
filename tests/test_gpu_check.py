"""benchmarks/gpu_check.py at its small CPU shape: the script a GPU machine runs works end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_at_a_small_shape(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["cuda"] is None and "no CUDA device" in figures["note"]
    assert set(figures["parity"]) == {f"{family}/{method}" for family in ("llama", "gpt2") for method in
                                      ("none", "rome", "memit", "alphaedit", "grace", "wise", "ga", "gd", "kl", "dpo")}
    assert all(run["cpu_float32"]["finite"] for run in figures["parity"].values())
    cost = figures["cost"]
    assert cost["shape"] == "small"
    for stage in ("statistics_pass", "v_star_4_requests", "memit_4_edits", "alphaedit_4_edits", "grace_4_edits",
                  "wise_4_edits", "gd_10_lora_steps", "evaluation"):
        assert cost[stage]["seconds"] >= 0, stage
    assert cost["evaluation"]["documents"] > 0
