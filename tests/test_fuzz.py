"""Bad input: any timestep dtype, shape or value gives a rank in [min_rank, max_rank], never a crash; an
out-of-range one warns once per enable. Bad settings fail at enable time and change nothing."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from compat_tools import StepToyDenoiser, hook_counts, toy_with_tlora
from conftest import lycoris_rank
from tlora_hooks import TLoRAError, enable_tlora, register_convention
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE

T, MAX_RANK, MIN_RANK = 1000, 8, 2
DTYPES = {"int64": torch.int64, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = [(), (2,), (2, 3), (2, 1, 3, 1, 1)]
VALUES = [-5.0, 0.0, 250.7, float(T), 1500.0, math.nan, math.inf, -math.inf]


def expected_rank(value: float) -> int:
    """Clamped to [0, T]; NaN counts as pure noise; in range, LyCORIS's rank for int(t)."""
    if math.isnan(value) or value > T:
        return MIN_RANK
    if value < 0:
        return MAX_RANK
    return lycoris_rank(math.floor(value), T, MAX_RANK, MIN_RANK)


@pytest.fixture(scope="module")
def toy():
    toy = toy_with_tlora(rank=MAX_RANK)
    enable_tlora(toy, MAX_RANK, MIN_RANK, mode="lycoris")  # the rank probe reads LyCORIS's own mask lookup
    return toy


def cases():
    for name, dtype in DTYPES.items():
        for value in VALUES:
            if dtype is torch.int64 and not math.isfinite(value):
                continue
            for shape in SHAPES:
                yield pytest.param(dtype, shape, value, id=f"{name}-{shape}-{value}")
    for value in VALUES:
        yield pytest.param(float, (), value, id=f"float-{value}")
        if math.isfinite(value) and value == int(value):
            yield pytest.param(int, (), value, id=f"int-{value}")


@pytest.mark.parametrize("dtype,shape,value", list(cases()))
def test_any_timestep_gives_a_rank_in_range(toy, rank_probe, dtype, shape, value):
    if dtype in (int, float):
        timestep = dtype(value)
        received = float(timestep)
    else:
        timestep = torch.full(shape, value).to(dtype)
        received = float(timestep.reshape(-1)[0].float())  # what the dtype kept (250.7 -> 250.0 in bf16)
    rank_probe.watch("toy", toy)
    with torch.no_grad():
        toy(torch.randn(2, 16), timestep=timestep)
    (rank,) = rank_probe.ranks()
    assert MIN_RANK <= rank <= MAX_RANK
    assert rank == expected_rank(received)


@pytest.mark.parametrize(
    "per_token,rank",
    [
        ([[0.0, 700.0, 700.0]], lycoris_rank(700, T, MAX_RANK, MIN_RANK)),  # clean conditioning tokens: the max counts
        ([[0.0, math.nan, 700.0]], MIN_RANK),  # NaN anywhere: pure noise
        ([[-50.0, 3000.0, 10.0]], MIN_RANK),
    ],
)
def test_mixed_per_token_values(toy, rank_probe, per_token, rank):
    rank_probe.watch("toy", toy)
    with torch.no_grad():
        toy(torch.randn(1, 16), timestep=torch.tensor(per_token))
    assert rank_probe.ranks() == [rank]


class FlowToy(StepToyDenoiser):
    """Flux-like: receives t / 1000."""


register_convention(FlowToy, param="timestep", to_timestep=lambda value: value * 1000.0)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_snapping_to_a_scheduler_keeps_the_rank_in_range(rank_probe, dtype):
    """With a scheduler to snap to and a t/1000 convention, every value still gives an in-range rank."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    toy = toy_with_tlora(rank=MAX_RANK, cls=FlowToy)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    enable_tlora(toy, MAX_RANK, MIN_RANK, scheduler=scheduler)
    rank_probe.watch("toy", toy)
    values = [*(t / 1000 for t in scheduler.timesteps.tolist()), -1.0, 0.0, 1.0, 7.5, math.nan, math.inf, -math.inf]
    if dtype is torch.int64:
        values = [v for v in values if math.isfinite(v)]
    with torch.no_grad():
        for value in values:
            for shape in SHAPES:
                toy(torch.randn(2, 16), timestep=torch.full(shape, value).to(dtype))
    ranks = rank_probe.ranks()
    assert len(ranks) == len(values) * len(SHAPES)
    assert all(MIN_RANK <= rank <= MAX_RANK for rank in ranks)
    if dtype is not torch.int64:  # scheduler values come back to the scheduler's ranks, even through bf16 rounding
        on_schedule = ranks[: 4 * len(SHAPES) : len(SHAPES)]
        assert on_schedule == [lycoris_rank(t, T, MAX_RANK, MIN_RANK) for t in scheduler.timesteps]


def warnings_from(caplog):
    return [r for r in caplog.records if r.name.startswith("tlora_hooks") and r.levelno >= logging.WARNING]


def test_out_of_range_warns_once_per_enable(caplog):
    toy = toy_with_tlora(rank=MAX_RANK)
    caplog.set_level(logging.WARNING, logger="tlora_hooks")
    enable_tlora(toy, MAX_RANK, MIN_RANK)
    with torch.no_grad():
        for value in (0.0, 500.0, 999.0, 1000.0):
            toy(torch.randn(1, 16), timestep=torch.tensor(value))
        assert warnings_from(caplog) == [], "in-range values never warn"
        for value in (1500.0, -3.0, math.nan, math.inf, 2000.0):
            toy(torch.randn(1, 16), timestep=torch.tensor(value))
    (warning,) = warnings_from(caplog)
    message = warning.getMessage()
    assert "1500" in message and "[0, 1000]" in message and f"[{MIN_RANK}, {MAX_RANK}]" in message
    assert "timestep_fn=" in message

    caplog.clear()
    enable_tlora(toy, MAX_RANK, MIN_RANK)  # a new enable warns again, once
    with torch.no_grad():
        for value in (math.nan, -1.0):
            toy(torch.randn(1, 16), timestep=torch.tensor(value))
    assert len(warnings_from(caplog)) == 1 and "nan" in warnings_from(caplog)[0].getMessage()


INVALID_SETTINGS = [
    dict(max_rank=0),
    dict(max_rank=-3),
    dict(max_rank=2.5),
    dict(max_rank="8"),
    dict(max_rank=True),
    dict(max_rank=4),  # not the modules' rank
    dict(min_rank=-1),
    dict(min_rank=1.5),
    dict(min_rank=True),
    dict(min_rank=MAX_RANK + 1),
    dict(alpha=0),
    dict(alpha=-1.0),
    dict(alpha=math.nan),
    dict(alpha=math.inf),
    dict(alpha="1"),
    dict(alpha=True),
    dict(alpha=None),
    dict(mode="fastest"),
    dict(mode=None),
    dict(timestep_fn=3),
    dict(scheduler=object()),
    dict(scheduler="euler"),
]


@pytest.mark.parametrize("settings", INVALID_SETTINGS, ids=[repr(s) for s in INVALID_SETTINGS])
def test_invalid_settings_raise_at_enable_time_and_change_nothing(settings):
    toy = toy_with_tlora(rank=MAX_RANK)
    enable_tlora(toy, MAX_RANK, MIN_RANK, alpha=2.0)
    state = (hook_counts(toy), [m.mask_group_id for m in applied_tlora_modules(toy)], getattr(toy, STATE_ATTRIBUTE))
    with pytest.raises(TLoRAError):
        enable_tlora(toy, **{"max_rank": MAX_RANK, **settings})
    assert state == (
        hook_counts(toy), [m.mask_group_id for m in applied_tlora_modules(toy)], getattr(toy, STATE_ATTRIBUTE)
    )
    assert getattr(toy, STATE_ATTRIBUTE).adapters["default"].schedule.alpha == 2.0, "the working hooks stay"
