"""The rank schedule equals LyCORIS's `compute_timestep_mask` and never leaves [min_rank, max_rank]."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from conftest import lycoris_rank
from tlora_hooks import RankSchedule, TLoRAError, rank_for_timestep
from tlora_hooks.schedule import masks_by_rank


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("max_rank,min_rank,T", [(64, 1, 1000), (32, 16, 1000), (8, 0, 1000), (4, 1, 1)])
def test_equals_lycoris_for_every_integer_timestep(alpha, max_rank, min_rank, T):
    ours = [rank_for_timestep(t, T, max_rank, min_rank, alpha) for t in range(T + 1)]
    lycoris = [lycoris_rank(t, T, max_rank, min_rank, alpha) for t in range(T + 1)]
    assert ours == lycoris


@pytest.mark.parametrize("t", [-1, -1e9, 1001, 1500, 80000, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_out_of_range_timesteps_stay_in_range(t, alpha):
    rank = rank_for_timestep(t, 1000, 64, 5, alpha)
    assert 5 <= rank <= 64
    # Out of range clamps to the nearest end; NaN counts as pure noise.
    expected = 64 if t < 0 else 5
    assert rank == expected


def test_lycoris_itself_leaves_ranks_on_past_the_end():
    """The reason for the clamp: LyCORIS's negative slice keeps 34 of 64 ranks at t=1500."""
    assert lycoris_rank(1500, 1000, 64) == 34
    assert rank_for_timestep(1500, 1000, 64) == 1


def test_alpha_one_matches_the_seed_doc_table():
    assert [rank_for_timestep(t, 1000, 64) for t in (0, 250, 500, 750, 999)] == [64, 48, 32, 16, 1]


def test_readme_schedule_table_is_computed():
    """The README's table holds the real values for alpha 0.5, 1 and 2 (the seed doc's were wrong)."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| α = ([\d.]+) \|((?: *\d+ *\|)+)$", readme, flags=re.MULTILINE)
    assert {float(alpha) for alpha, _ in rows} == {0.5, 1.0, 2.0}
    for alpha, cells in rows:
        values = [int(cell) for cell in cells.split("|") if cell.strip()]
        assert values == [rank_for_timestep(t, 1000, 64, 1, float(alpha)) for t in (0, 250, 500, 750, 999)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_rank=0), dict(max_rank=-4), dict(max_rank=8.0), dict(max_rank=8, min_rank=9),
        dict(max_rank=8, min_rank=-1), dict(max_rank=8, alpha=0), dict(max_rank=8, alpha=-1.0),
        dict(max_rank=8, alpha=math.nan), dict(max_rank=8, alpha=math.inf), dict(max_rank=8, alpha="1"),
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(TLoRAError) as error:
        RankSchedule(**kwargs)
    assert isinstance(error.value, ValueError)


def test_mask_table_rows_keep_the_first_ranks():
    table = masks_by_rank(4)
    assert table.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
