"""`make gpu-check` without CUDA: it says so, exits 0 and measures nothing (benchmarks/gpu_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a GPU machine too
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing measured, nothing appended
