"""benchmarks/device_edit_parity.py on the CPU at a small size: the script a GPU session runs works,
and on one device its staged checks agree (a statistics pass or v* leaves the model unchanged)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_end_to_end import needs_smollm2

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_smollm2
def test_device_edit_parity_runs_and_its_cpu_stages_agree(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/device_edit_parity.py itself")
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_edit_parity.py"),
                           "--forget-size", "2", "--steps", "1", "--stats-tokens", "500", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert list(record["devices"]) == ["cpu"] and record["requests"] == 2
    cpu = record["devices"]["cpu"]
    assert len(cpu["vstar_final_losses"]) == 2
    differences = record["largest_differences"]
    assert differences["cpu: target_nll vs target_nll_after_statistics"] == 0.0
    assert differences["cpu: target_nll vs target_nll_after_vstar"] == 0.0
    assert differences["cpu: target_nll vs plain_nll"] < 1e-4
