"""Faults: an interrupted call, disabling mid-run, and dropping the pipeline leave nothing broken behind.

Torch runs `always_call` forward hooks on `Exception` only. After a KeyboardInterrupt inside the denoiser the
post-hook does not run: the mask stays in this denoiser's private LyCORIS group (nothing else reads it) until
its next call overwrites it, `disable_tlora` clears it, or the denoiser is freed.
"""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from lycoris.modules.tlora import get_timestep_mask

import tiny
from compat_tools import expected_ranks, hook_counts, run
from tlora_hooks import TLoRAError, TLoRAHandle, disable_tlora, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE

SCHEDULE = (8, 1, 1.0)


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def raise_on_call(block, exception, call: int = 2):
    """A block pre-hook that raises `exception` on the denoiser's `call`-th call."""
    calls = {"n": 0}

    def maybe_raise(module, args):
        calls["n"] += 1
        if calls["n"] == call:
            raise exception

    return block.register_forward_pre_hook(maybe_raise)


@pytest.mark.parametrize(
    "exception", [RuntimeError("boom"), KeyboardInterrupt()], ids=["Exception", "KeyboardInterrupt"]
)
def test_interrupted_run_keeps_hooks_and_the_next_run_is_right(exception, rank_probe):
    pipe, kw = tiny.sd3(steps=3)
    handle = enable_tlora(pipe, *SCHEDULE)
    group = handle.mask_groups["transformer"]
    clean = run(pipe, kw, latents())
    counts = hook_counts(pipe.transformer)

    boom = raise_on_call(pipe.transformer.transformer_blocks[0], exception)
    with pytest.raises(type(exception)):
        run(pipe, kw, latents())
    boom.remove()

    assert hook_counts(pipe.transformer) == counts and handle.denoisers == ["transformer"]
    assert get_timestep_mask(0) is None, "no other group is touched"
    if isinstance(exception, Exception):
        assert get_timestep_mask(group) is None
    else:  # torch skips always_call hooks on BaseException: the private group keeps the mask until the next call
        assert get_timestep_mask(group) is not None

    rank_probe.watch("transformer", pipe.transformer)
    assert torch.equal(run(pipe, kw, latents()), clean)
    assert rank_probe.ranks() == expected_ranks(pipe, SCHEDULE)
    assert get_timestep_mask(group) is None


def test_disable_clears_what_an_interrupt_left():
    pipe, kw = tiny.sd3(steps=2)
    handle = enable_tlora(pipe, *SCHEDULE)
    group = handle.mask_groups["transformer"]
    boom = raise_on_call(pipe.transformer.transformer_blocks[0], KeyboardInterrupt(), call=1)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, kw, latents())
    boom.remove()
    assert get_timestep_mask(group) is not None
    disable_tlora(pipe)
    assert get_timestep_mask(group) is None
    assert {m.mask_group_id for m in applied_tlora_modules(pipe.transformer)} == {0}


def test_an_error_in_the_pre_hook_releases_the_denoiser():
    """The hook's own TLoRAError (no timestep) runs the post-hook: no mask, and another thread may enter."""
    pipe, _ = tiny.sd3()
    handle = enable_tlora(pipe, *SCHEDULE)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 64))
    with pytest.raises(TLoRAError, match="without its `timestep` argument"):
        pipe.transformer(**inputs)
    assert get_timestep_mask(handle.mask_groups["transformer"]) is None
    errors = []
    thread = threading.Thread(
        target=lambda: _call_or_record(errors, pipe.transformer, timestep=torch.tensor([500.0]), **inputs)
    )
    thread.start()
    thread.join()
    assert errors == []


def _call_or_record(errors, module, **kwargs):
    try:
        module(**kwargs)
    except Exception as error:  # noqa: BLE001 - the test asserts there is none
        errors.append(error)


# -- disable_tlora while a run is in flight -----------------------------------------------------------------------
@pytest.fixture
def unmasked():
    """The tiny SD3 run without T-LoRA hooks: what every run after disable_tlora must give."""
    pipe, kw = tiny.sd3(steps=3)
    return run(pipe, kw, latents())


@dataclass
class Enabled:
    """A tiny SD3 with T-LoRA hooks, its mask group, and its hook counts before enabling."""

    pipe: Any
    kw: dict
    handle: TLoRAHandle
    group: int
    counts: tuple[int, int]


def enable_on_sd3() -> Enabled:
    pipe, kw = tiny.sd3(steps=3)
    counts = hook_counts(pipe.transformer)
    handle = enable_tlora(pipe, *SCHEDULE)
    return Enabled(pipe, kw, handle, handle.mask_groups["transformer"], counts)


def assert_fully_disabled(enabled: Enabled, unmasked_out):
    pipe = enabled.pipe
    assert get_timestep_mask(enabled.group) is None
    assert hook_counts(pipe.transformer) == enabled.counts
    assert STATE_ATTRIBUTE not in pipe.transformer.__dict__
    assert {m.mask_group_id for m in applied_tlora_modules(pipe.transformer)} == {0}
    assert torch.equal(run(pipe, enabled.kw, latents()), unmasked_out)


def test_disable_from_a_step_callback(unmasked, rank_probe):
    enabled = enable_on_sd3()
    pipe, kw = enabled.pipe, enabled.kw
    rank_probe.watch("transformer", pipe.transformer)

    def disable_after_first_step(pipeline, step, timestep, callback_kwargs):
        if step == 0:
            disable_tlora(pipeline)
        return callback_kwargs

    run(pipe, kw, latents(), callback_on_step_end=disable_after_first_step)
    masked_first, *rest = rank_probe.ranks()
    assert masked_first == expected_ranks(pipe, SCHEDULE)[0] < 8 and rest == [8, 8], "unmasked after disabling"
    rank_probe.close()
    assert_fully_disabled(enabled, unmasked)


def test_disable_from_inside_the_forward(unmasked):
    """The call in flight finishes (its remaining layers unmasked); nothing is left set."""
    enabled = enable_on_sd3()
    pipe, kw = enabled.pipe, enabled.kw
    disabler = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(
        lambda module, args: disable_tlora(pipe)
    )
    run(pipe, kw, latents())
    disabler.remove()
    assert enabled.handle.denoisers == []
    assert_fully_disabled(enabled, unmasked)


def test_disable_from_another_thread_during_a_call(unmasked):
    enabled = enable_on_sd3()
    pipe, kw = enabled.pipe, enabled.kw
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        if not inside.is_set():
            inside.set()
            release.wait(10)

    gate = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(hold)
    errors = []
    worker = threading.Thread(target=lambda: _call_or_record(errors, pipe, **kw, latents=latents()))
    worker.start()
    assert inside.wait(10)
    disable_tlora(pipe)
    release.set()
    worker.join()
    gate.remove()
    assert errors == []
    assert_fully_disabled(enabled, unmasked)


# -- dropping the pipeline ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("interrupted", [False, True], ids=["after_a_run", "after_a_keyboard_interrupt"])
def test_dropping_the_pipeline_frees_everything(interrupted):
    pipe, kw = tiny.sd3(steps=2)
    handle = enable_tlora(pipe, *SCHEDULE)
    group = handle.mask_groups["transformer"]
    if interrupted:
        raise_on_call(pipe.transformer.transformer_blocks[0], KeyboardInterrupt(), call=1)
        with pytest.raises(KeyboardInterrupt):
            run(pipe, kw, latents())
        assert get_timestep_mask(group) is not None
    else:
        run(pipe, kw, latents())
    refs = {
        "pipeline": weakref.ref(pipe),
        "transformer": weakref.ref(pipe.transformer),
        "hook": weakref.ref(getattr(pipe.transformer, STATE_ATTRIBUTE)),
        "a T-LoRA module": weakref.ref(applied_tlora_modules(pipe.transformer)[0]),
    }
    del pipe
    gc.collect()
    assert [name for name, ref in refs.items() if ref() is not None] == []
    assert get_timestep_mask(group) is None, "a stale mask must not outlive the denoiser"
    assert handle.denoisers == []
    handle.remove()  # harmless once everything is gone
