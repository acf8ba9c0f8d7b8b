"""`tlora-hooks schedule`: the printed ranks are LyCORIS's, at the timesteps the stock schedulers produce."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from conftest import lycoris_rank
from tlora_hooks.commands import main
from tlora_hooks.commands.schedule import COMPARED_ALPHAS, rank_curves
from tlora_hooks.schedule import RankSchedule


def table(capsys, *argv) -> tuple[str, list[list[float]]]:
    """Run the command in-process; return its output and the numeric table rows."""
    assert main(["schedule", *argv]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:3] for line in out.splitlines()[2:] if line.strip() and line.split()[0][0].isdigit()]
    return out, [[float(cell) for cell in row if cell[0].isdigit()] for row in rows]


def test_rank_per_timestep(capsys):
    out, rows = table(capsys, "--max-rank", "64", "--min-rank", "1", "--alpha", "1.0")
    assert "max_rank=64, min_rank=1, alpha=1.0, T=1000" in out
    assert [t for t, _ in rows] == list(range(0, 1001, 50))
    assert [rank for _, rank in rows] == [lycoris_rank(t, 1000, 64, 1, 1.0) for t, _ in rows]


def test_rank_per_euler_step(capsys):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(25)
    out, rows = table(
        capsys, "--max-rank", "64", "--min-rank", "4", "--alpha", "2.0", "--scheduler", "euler", "--steps", "25"
    )
    assert "25 steps of EulerDiscreteScheduler" in out
    assert [step for step, _, _ in rows] == list(range(25))
    assert [t for _, t, _ in rows] == scheduler.timesteps.tolist()
    assert [rank for _, _, rank in rows] == [lycoris_rank(t, 1000, 64, 4, 2.0) for t in scheduler.timesteps]


def test_rank_per_flow_step_with_shift(capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(25)
    out, rows = table(capsys, "--scheduler", "flow", "--steps", "25", "--shift", "3.0", "--alpha", "0.5")
    assert "shift=3" in out
    assert [t for _, t, _ in rows] == pytest.approx(scheduler.timesteps.tolist(), abs=0.005)
    assert [rank for _, _, rank in rows] == [lycoris_rank(t, 1000, 64, 1, 0.5) for t in scheduler.timesteps]
    assert len({rank for _, _, rank in rows}) > 10


def test_curves_compare_the_chosen_alpha_with_half_one_and_two():
    curves = rank_curves(RankSchedule(16, 2, 1.5), 1000)
    assert sorted(curves) == sorted({*COMPARED_ALPHAS, 1.5})
    for alpha, ranks in curves.items():
        assert ranks == [lycoris_rank(t, 1000, 16, 2, alpha) for t in range(1001)]


def test_plot_writes_a_png(tmp_path, capsys):
    from matplotlib.image import imread

    path = tmp_path / "ranks.png"
    out, _ = table(capsys, "--scheduler", "flow", "--steps", "10", "--alpha", "1.5", "--plot", str(path))
    assert f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(path).shape
    assert (width, height) == (700, 420)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "ranks.png"
    assert main(["schedule", "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert "pip install 'tlora-hooks[plot]'" in captured.err
    assert "timestep  rank" in captured.out, "the table is printed before the plot is attempted"
    assert not path.exists()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--max-rank", "8", "--min-rank", "9"], "larger than max_rank"),
        (["--alpha", "0"], "alpha must be a finite number > 0"),
        (["--scheduler", "euler", "--shift", "2"], "--shift"),
        (["--scheduler", "flow", "--shift", "-1"], "--shift"),
        (["--scheduler", "flow", "--steps", "0"], "at least 1"),
    ],
)
def test_bad_settings_exit_2_with_the_reason(capsys, argv, words):
    assert main(["schedule", *argv]) == 2
    assert words in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command(capsys):
    argv = ["schedule", "--max-rank", "16", "--scheduler", "flow", "--steps", "6"]
    assert main(argv) == 0
    in_process = capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "tlora_hooks", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == in_process


def test_the_console_script_is_the_one_pyproject_declares_and_runs_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    declared = pyproject["project"]["scripts"]["tlora-hooks"]
    assert EntryPoint("tlora-hooks", declared, "console_scripts").load() is main
    (installed,) = [e for e in entry_points(group="console_scripts") if e.name == "tlora-hooks"]
    assert installed.value == declared, "the installed package is stale: reinstall it (pip install -e .)"


def test_the_documented_output_is_what_the_documented_command_prints(capsys):
    """docs/cli.md shows a `schedule` command and, below it, its output: both must stay true together."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    command = "tlora-hooks schedule --alpha 2.0 --scheduler flow --steps 25 --shift 3.0"
    assert command in page and "The second command above prints:" in page
    assert main(command.split()[1:]) == 0
    assert f"```\n{capsys.readouterr().out}```" in page
