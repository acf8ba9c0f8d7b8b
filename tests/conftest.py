"""Shared test tools: a probe that records the rank LyCORIS's T-LoRA modules actually saw on each denoiser call."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest
import torch
from lycoris.logging import logger as lycoris_logger
from lycoris.modules.tlora import TLoraModule, compute_timestep_mask

from tlora_hooks import logging as tlora_logging
from tlora_hooks.modes import build as mode_build

TESTS = os.path.dirname(os.path.abspath(__file__))
# tiny.py and the other test helpers; the repository root for devtools/, shared with the benchmarks.
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
lycoris_logger.setLevel(logging.WARNING)
# The library's logger does not propagate by default (as diffusers'); caplog listens on the root logger.
tlora_logging.enable_propagation()
warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
# Tiny models on shared 2-core machines: extra intra-op threads only spin (measured 40x slower per tiny SDXL run).
torch.set_num_threads(1)


class RankProbe:
    """Records, per denoiser call, the set of ranks the T-LoRA modules read from their mask."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, set[int]]] = []
        self._handles = []
        original = TLoraModule._get_mask
        # Only LyCORIS's own forward reads the mask per module, so while probing, "auto" means mode="lycoris"; the
        # fast modes are checked against that mode, output by output, in test_modes.py.
        monkeypatch.setattr(mode_build, "resolve_auto", lambda foldable: "lycoris")

        def recording_get_mask(module, device):
            mask = original(module, device)
            if self.calls:
                self.calls[-1][1].add(int(mask.sum()))
            return mask

        monkeypatch.setattr(TLoraModule, "_get_mask", recording_get_mask)

    def watch(self, name: str, denoiser: torch.nn.Module) -> "RankProbe":
        def start_call(module, args):
            self.calls.append((name, set()))

        self._handles.append(denoiser.register_forward_pre_hook(start_call))
        return self

    def ranks(self) -> list[int]:
        """One rank per call; fails if the modules of one call disagreed."""
        for name, seen in self.calls:
            assert len(seen) == 1, f"{name}: modules saw different ranks in one call: {sorted(seen)}"
        return [next(iter(seen)) for _, seen in self.calls]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def reset(self) -> None:
        self.calls.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def rank_probe(monkeypatch):
    probe = RankProbe(monkeypatch)
    yield probe
    probe.close()


def lycoris_rank(t, max_timestep: int, max_rank: int, min_rank: int = 1, alpha: float = 1.0) -> int:
    """The reference rank: LyCORIS's own mask for int(t), as SimpleTuner's vendored pipelines compute it."""
    return int(compute_timestep_mask(int(t), max_timestep, max_rank, min_rank, alpha).sum())
