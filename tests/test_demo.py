"""The demo, the project's main job on its embedded default, runs offline and masks by the schedule."""

from __future__ import annotations

from conftest import lycoris_rank
from tlora_hooks.commands import main
from tlora_hooks.commands.demo import DemoConfig, run_demo


def test_demo_rows_follow_the_schedule(capsys):
    config = DemoConfig(steps=5, rank=8, min_rank=2, alpha=2.0, size=32)
    rows = run_demo(config)
    assert [row["rank"] for row in rows] == [lycoris_rank(row["timestep"], 1000, 8, 2, 2.0) for row in rows]
    assert len({row["rank"] for row in rows}) > 1
    assert rows[-1]["drift"] > 1e-3, "the masked run should differ from the unmasked one"
    assert "rank" in capsys.readouterr().out


def test_cli_demo_exits_zero(capsys):
    assert main(["demo", "--steps", "3", "--rank", "4"]) == 0
    assert "T-LoRA demo" in capsys.readouterr().out
