"""Benchmarks are not timed tests: CI checks each script runs on its tiny setting and writes JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["masking_cost", "masking_overhead", "throughput", "sweep_cost", "memory", "adapter_switch", "step_anatomy"]


@pytest.mark.parametrize("name,flags", [(name, []) for name in SCRIPTS] + [("throughput", ["--compile"])],
                         ids=SCRIPTS + ["throughput-compile"])
def test_benchmark_runs_on_tiny_setting(name, flags, tmp_path):
    shared_path("tokenizers")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--tiny", "--out", str(tmp_path),
                           *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert data["benchmark"] and data["environment"]["versions"]["torch"]
    if flags:
        assert data["speedup_compiled"] > 0
