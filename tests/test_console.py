"""The console of `orchestra run`: a real short quickstart through the real CLI, its output as a researcher sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments/quickstart.yaml")


def orchestra_run(cwd: Path, *args: str) -> tuple[int, str]:
    """`orchestra run` as a subprocess; its stdout and stderr together, in order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "run", QUICKSTART, "--num-cpus", "2", *args],
                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode, proc.stdout


def test_quickstart_console_is_short_and_library_output_goes_to_the_trial_logs(tmp_path: Path):
    rc, out = orchestra_run(tmp_path, "--set", "stop.training_iteration=2", "--set", "seeds=[0]")
    assert rc == 0, out[-3000:]
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= 40, out
    assert "params={" not in out
    for noise in ("DeprecationWarning", "new API stack", "pid=", "Checkpoint successfully created",
                  "Experiment state snapshotting"):
        assert noise not in out, f"{noise!r} on the console:\n{out}"
    header = next(ln for ln in lines if ln.startswith("trial ") and "status" in ln)
    assert header.split() == ["trial", "status", "lr", "episode_return_mean", "env", "steps", "steps/s", "iter"]
    rows = [ln.split() for ln in lines if ln.startswith("PPO_CartPole-v1_")]
    assert rows and all(r[1] in ("PENDING", "RUNNING", "TERMINATED") for r in rows)
    final = rows[-2:]  # the table at the end: both trials, 2 iterations of 1000 env steps each
    assert [(r[1], r[4], r[6]) for r in final] == [("TERMINATED", "2000", "2")] * 2, out

    summary = lines[next(i for i, ln in enumerate(lines) if ln.startswith("launch quickstart-")):]
    assert summary[0].endswith("2 trials (2 TERMINATED), 0 errors")
    assert summary[1] == "best trial per configuration (last episode_return_mean, max):"
    assert summary[2].split()[0] == "lr=0.0003" and summary[3].split()[0] == "lr=0.001"
    assert all(s.split()[2].startswith("PPO_CartPole-v1_") for s in summary[2:4])
    launch = tmp_path / "runs" / summary[0].split()[1].rstrip(":")
    assert f"trial folders: {launch}" in summary
    assert any(s.startswith("MLflow: sqlite:///") and "(experiment 'quickstart')" in s for s in summary)
    assert "orchestra ui" in summary[-1] and "orchestra report quickstart" in summary[-1]

    # What the console left out is in the files: the trials' own output, the driver's library log.
    trials = sorted(p for p in launch.iterdir() if p.is_dir() and p.name.startswith("PPO_"))
    assert len(trials) == 2
    for trial in trials:
        logged = (trial / "stdout").read_text() + (trial / "stderr").read_text()
        assert "Checkpoint successfully created" in logged and "DeprecationWarning" in logged
    assert "new API stack" in (launch / "orchestra_driver.log").read_text()


def test_verbose_shows_library_lines_and_one_trial_gets_a_progress_line(tmp_path: Path):
    rc, out = orchestra_run(tmp_path, "--verbose", "--set", "stop.training_iteration=2", "--set", "seeds=[0]",
                            "--set", "config.lr=0.001")
    assert rc == 0, out[-3000:]
    assert "new API stack" in out  # RLlib's warnings, as Ray prints them
    assert "pid=" in out  # worker lines forwarded to the driver
    assert "params={" not in out
    progress = [ln for ln in out.split("\n") if ln.startswith("PPO_CartPole-v1_") and "2/2 iter" in ln]
    assert progress and "100%" in progress[-1] and "steps/s" in progress[-1], out
    assert "best trial per configuration" in out and "orchestra report quickstart" in out
