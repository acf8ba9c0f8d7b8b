"""The demo, the project's main job on its embedded default, runs offline and masks by the schedule."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import lycoris_rank
from tlora_hooks.commands.demo import DemoConfig, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_rows_follow_the_schedule(capsys):
    config = DemoConfig(steps=5, rank=8, min_rank=2, alpha=2.0, size=32)
    rows = run_demo(config)
    assert [row["rank"] for row in rows] == [lycoris_rank(row["timestep"], 1000, 8, 2, 2.0) for row in rows]
    assert len({row["rank"] for row in rows}) > 1
    assert rows[-1]["drift"] > 1e-3, "the masked run should differ from the unmasked one"
    assert "rank" in capsys.readouterr().out


def test_cli_demo_prints_its_table_and_no_lycoris_info_lines():
    """A fresh process, as `make demo` runs it: importing LyCORIS there sets its logger to INFO, which the demo must
    quiet after the import, not before."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "tlora_hooks", "demo", "--steps", "2", "--rank", "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "T-LoRA demo" in result.stdout
    lycoris_lines = [line for line in (result.stdout + result.stderr).splitlines() if "[LyCORIS]" in line]
    assert lycoris_lines == []
