"""`tlora-hooks schedule`: the rank T-LoRA uses at each timestep, or at each step of a real scheduler.

Users pick `alpha` and `min_rank` by looking at this curve; `--plot` draws it beside α = 0.5, 1 and 2.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import TLoRAError
from ..schedule import RankSchedule

COMPARED_ALPHAS = (0.5, 1.0, 2.0)
BAR_WIDTH = 32


def _euler(num_train_timesteps: int, shift: float | None) -> Any:
    """Stable Diffusion XL's scheduler, as its model card configures it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )


def _flow(num_train_timesteps: int, shift: float | None) -> Any:
    """SD3 / Flux flow matching with a static shift (Flux's dynamic shift at a resolution is shift = exp(mu))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps, shift=3.0 if shift is None else shift
    )


# name: builder(num_train_timesteps, shift) -> a Diffusers scheduler; a new scheduler is one row.
SCHEDULERS: dict[str, Callable[[int, float | None], Any]] = {"euler": _euler, "flow": _flow}
SHIFTABLE = {"flow"}


@dataclass(frozen=True)
class ScheduleRow:
    """One line of the table: the denoising step (None for the per-timestep table), its timestep and rank."""

    step: int | None
    timestep: float
    rank: int


def timestep_rows(schedule: RankSchedule, num_train_timesteps: int, stride: int) -> list[ScheduleRow]:
    """The rank every `stride` timesteps from 0 (clean) to T (pure noise).

    Args:
        schedule (`RankSchedule`): the rank formula's settings.
        num_train_timesteps (`int`): T, the last timestep listed.
        stride (`int`): the spacing of the listed timesteps.
    """
    timesteps = list(range(0, num_train_timesteps + 1, stride))
    if timesteps[-1] != num_train_timesteps:
        timesteps.append(num_train_timesteps)
    return [ScheduleRow(None, float(t), schedule.rank(t, num_train_timesteps)) for t in timesteps]


def scheduler_rows(schedule: RankSchedule, scheduler: Any, steps: int) -> list[ScheduleRow]:
    """The rank at each step of `scheduler` after `set_timesteps(steps)`: int(t), as the hooks take it.

    Args:
        schedule (`RankSchedule`): the rank formula's settings.
        scheduler: a Diffusers scheduler; its `num_train_timesteps` is T.
        steps (`int`): num_inference_steps.
    """
    scheduler.set_timesteps(steps)
    T = int(scheduler.config.num_train_timesteps)
    return [
        ScheduleRow(step, float(t), schedule.rank(math.floor(float(t)), T))
        for step, t in enumerate(scheduler.timesteps.tolist())
    ]


def rank_curves(schedule: RankSchedule, num_train_timesteps: int) -> dict[float, list[int]]:
    """Rank at every integer timestep for the compared alphas and the chosen one.

    Args:
        schedule (`RankSchedule`): the ranks and the chosen alpha.
        num_train_timesteps (`int`): T, the last timestep of each curve.

    Returns:
        `dict[float, list[int]]`: alpha -> the rank at timesteps 0..T.
    """
    alphas = sorted(set(COMPARED_ALPHAS) | {float(schedule.alpha)})
    return {
        alpha: RankSchedule(schedule.max_rank, schedule.min_rank, alpha).rank_table(num_train_timesteps)
        for alpha in alphas
    }


def format_table(rows: list[ScheduleRow], schedule: RankSchedule, header: str) -> str:
    """A fixed-width table with a bar per row, so the curve's shape shows in a terminal.

    Args:
        rows (`list[ScheduleRow]`): from `timestep_rows` or `scheduler_rows`.
        schedule (`RankSchedule`): its `max_rank` is a full bar.
        header (`str`): the first line.
    """
    per_step = rows[0].step is not None
    lines = [header, ("step  " if per_step else "") + "timestep  rank"]
    for row in rows:
        bar = "#" * round(BAR_WIDTH * row.rank / schedule.max_rank)
        step = f"{row.step:>4}  " if per_step else ""
        timestep = f"{row.timestep:>8.2f}" if per_step else f"{row.timestep:>8.0f}"
        lines.append(f"{step}{timestep}  {row.rank:>4}  {bar}".rstrip())
    return "\n".join(lines)


def plot_schedule(
    path: str, schedule: RankSchedule, num_train_timesteps: int, steps: list[ScheduleRow] | None
) -> None:
    """Write a PNG of rank against timestep for α = 0.5, 1, 2 and the chosen α, with the scheduler's steps marked.

    Args:
        path (`str`): where to write the PNG.
        schedule (`RankSchedule`): the ranks and the chosen alpha.
        num_train_timesteps (`int`): T, the x-axis' extent.
        steps (`list[ScheduleRow]`, *optional*): the scheduler's steps to mark.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise TLoRAError(
            "--plot needs matplotlib, an optional extra: pip install 'tlora-hooks[plot]' (or pip install matplotlib)."
        ) from error
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.subplots()
    timesteps = range(num_train_timesteps + 1)
    for alpha, ranks in rank_curves(schedule, num_train_timesteps).items():
        chosen = alpha == schedule.alpha
        label = f"α = {alpha:g}" + (" (chosen)" if chosen else "")
        axes.step(timesteps, ranks, where="post", label=label, linewidth=2.5 if chosen else 1.2,
                  alpha=1.0 if chosen else 0.6)
    if steps:
        axes.plot([row.timestep for row in steps], [row.rank for row in steps], "o", color="black", markersize=4,
                  label=f"{len(steps)} scheduler steps (chosen α)")
    axes.set_xlim(num_train_timesteps, 0)  # denoising runs from pure noise (left) to clean (right)
    axes.set_ylim(0, schedule.max_rank * 1.05)
    axes.set_xlabel(f"timestep (T = {num_train_timesteps} is pure noise)")
    axes.set_ylabel("active T-LoRA ranks")
    axes.set_title(f"T-LoRA rank schedule: max_rank = {schedule.max_rank}, min_rank = {schedule.min_rank}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)


def _run(args: argparse.Namespace) -> None:
    schedule = RankSchedule(max_rank=args.max_rank, min_rank=args.min_rank, alpha=args.alpha)
    if args.steps < 1 or args.stride < 1 or args.num_train_timesteps < 1:
        raise TLoRAError("--steps, --stride and --num-train-timesteps must be at least 1.")
    if args.shift is not None and (args.scheduler not in SHIFTABLE or not args.shift > 0):
        raise TLoRAError(f"--shift takes a number > 0 and applies to --scheduler {' / '.join(sorted(SHIFTABLE))}.")
    header = (f"T-LoRA rank schedule: max_rank={schedule.max_rank}, min_rank={schedule.min_rank}, "
              f"alpha={schedule.alpha}, T={args.num_train_timesteps}")
    steps = None
    if args.scheduler is None:
        rows = timestep_rows(schedule, args.num_train_timesteps, args.stride)
    else:
        scheduler = SCHEDULERS[args.scheduler](args.num_train_timesteps, args.shift)
        rows = steps = scheduler_rows(schedule, scheduler, args.steps)
        shift = f", shift={scheduler.config.shift:g}" if args.scheduler in SHIFTABLE else ""
        header += f", {args.steps} steps of {type(scheduler).__name__}{shift}"
    print(format_table(rows, schedule, header))
    if args.plot:
        plot_schedule(args.plot, schedule, args.num_train_timesteps, steps)
        print(f"wrote {args.plot}")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `schedule` and its options.

    Args:
        subparsers (`argparse._SubParsersAction`): what `ArgumentParser.add_subparsers` returned.
    """
    parser = subparsers.add_parser(
        "schedule", help="print the rank per timestep (or per scheduler step), optionally plot it",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-rank", type=int, default=64, help="the LyCORIS linear_dim")
    parser.add_argument("--min-rank", type=int, default=1, help="tlora_min_rank")
    parser.add_argument("--alpha", type=float, default=1.0, help="tlora_alpha")
    parser.add_argument("--num-train-timesteps", type=int, default=1000, help="T, the scheduler's num_train_timesteps")
    parser.add_argument("--stride", type=int, default=50, help="timestep spacing of the table without --scheduler")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="show the rank at each step of this scheduler")
    parser.add_argument("--steps", type=int, default=25, help="num_inference_steps, with --scheduler")
    parser.add_argument(
        "--shift", type=float, default=None, help="flow-matching shift (default 3.0), with --scheduler flow"
    )
    parser.add_argument(
        "--plot", metavar="PNG", help="also write a plot comparing alpha = 0.5, 1 and 2 (needs matplotlib)"
    )
    parser.set_defaults(run=_run)
