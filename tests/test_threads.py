"""One pipeline object per thread: concurrent pipelines never mix masks; one denoiser in two threads is an error."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch
from lycoris.modules.tlora import get_timestep_mask

import tiny
from compat_tools import run, toy_with_tlora
from conftest import lycoris_rank
from tlora_hooks import TLoRAError, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules

RUNS_PER_THREAD = 12


@contextmanager
def one_core_per_op():
    """Each torch op on one core, so the two Python threads run side by side on the machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def second_tlora(pipe):
    """Give the second pipeline a T-LoRA of its own (tiny.sd3 always builds the same one)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in applied_tlora_modules(pipe.transformer):
            module.lambda_layer.add_(torch.randn(module.lambda_layer.shape, generator=generator))


def test_two_pipelines_in_two_threads_match_running_alone():
    first, kw = tiny.sd3(steps=2)
    second, _ = tiny.sd3(steps=2)
    second_tlora(second)
    enable_tlora(first, max_rank=8, min_rank=1, alpha=0.5)
    enable_tlora(second, max_rank=8, min_rank=2, alpha=2.0)
    jobs = {"first": first, "second": second}
    latents = [torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    with one_core_per_op():
        for pipe in jobs.values():
            run(pipe, kw, latents[0])  # the default mode finishes its setup on its first call
        alone = {name: [run(pipe, kw, x) for x in latents] for name, pipe in jobs.items()}
    assert not torch.equal(alone["first"][0], alone["second"][0])

    inside = {name: False for name in jobs}
    overlaps = []  # calls that started while the other pipeline's denoiser was inside its forward
    for name, pipe in jobs.items():
        other = next(n for n in jobs if n != name)

        def enter(module, args, name=name, other=other):
            inside[name] = True
            overlaps.append(inside[other])

        def leave(module, args, output, name=name):
            inside[name] = False

        pipe.transformer.register_forward_pre_hook(enter)
        pipe.transformer.register_forward_hook(leave)
    mismatches: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def worker(name):
        pipe = jobs[name]
        try:
            start.wait()
            for i in range(RUNS_PER_THREAD):
                out = run(pipe, kw, latents[i % len(latents)])
                if not torch.equal(out, alone[name][i % len(latents)]):
                    mismatches.append(f"{name} run {i}")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
    with one_core_per_op():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert not mismatches, mismatches
    assert len(overlaps) == 2 * 2 * RUNS_PER_THREAD
    assert sum(overlaps) >= 8, f"the denoiser calls should overlap in time ({sum(overlaps)} did)"


class Gate:
    """Stops a thread inside the denoiser's forward (after its pre-hook set the mask) until released."""

    def __init__(self, block: torch.nn.Module):
        self.inside = threading.Event()
        self.release = threading.Event()
        self.thread_id: int | None = None
        self._handle = block.register_forward_pre_hook(self._hold)

    @torch.compiler.disable
    def _hold(self, module, args):
        if threading.get_ident() == self.thread_id:
            self.inside.set()
            assert self.release.wait(10), "the test never released the gate"

    def remove(self):
        self._handle.remove()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
@torch.no_grad()
def test_one_denoiser_entered_from_two_threads_raises_and_keeps_the_first_call_right(compiled, rank_probe):
    toy = toy_with_tlora()
    handle = enable_tlora(toy, max_rank=8)
    group = handle.mask_groups["StepToyDenoiser"]
    sample = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    expected = toy(sample, timestep=torch.tensor(700))
    model = torch.compile(toy, backend="eager") if compiled else toy
    rank_probe.watch("toy", toy)
    gate = Gate(toy.blocks[1])
    result = {}

    def first_call():
        gate.thread_id = threading.get_ident()
        with torch.no_grad():
            result["out"] = model(sample, timestep=torch.tensor(700))

    thread = threading.Thread(target=first_call)
    thread.start()
    assert gate.inside.wait(10)
    mask_of_first_call = get_timestep_mask(group)
    with pytest.raises(TLoRAError, match="entered from two threads at once.*one pipeline object per thread"):
        model(sample, timestep=torch.tensor(100))
    assert get_timestep_mask(group) is mask_of_first_call, "the refused call must not clear the running call's mask"
    gate.release.set()
    thread.join()
    gate.remove()

    assert torch.equal(result["out"], expected)
    assert rank_probe.ranks()[0] == lycoris_rank(700, 1000, 8)
    assert get_timestep_mask(group) is None
    model(sample, timestep=torch.tensor(100))  # the denoiser is free again
    assert rank_probe.ranks()[-1] == lycoris_rank(100, 1000, 8)
    torch._dynamo.reset()


def interrupt_inside(block, exception):
    """A block pre-hook that raises `exception` once, inside the denoiser's forward."""
    state = {"armed": True}

    def raise_once(module, args):
        if state["armed"]:
            state["armed"] = False
            raise exception

    return block.register_forward_pre_hook(raise_once)


def test_a_thread_that_died_inside_the_denoiser_does_not_lock_it(rank_probe):
    """SystemExit ends a thread without torch's always_call post-hook (it runs on Exception only)."""
    toy = toy_with_tlora()
    enable_tlora(toy, max_rank=8)
    sample = torch.randn(2, 16)
    boom = interrupt_inside(toy.blocks[0], SystemExit())

    def dies_inside():
        try:
            toy(sample, timestep=torch.tensor(300))
        except SystemExit:
            pass  # the thread ends here, its claim left behind

    thread = threading.Thread(target=dies_inside)
    thread.start()
    thread.join()
    boom.remove()
    rank_probe.watch("toy", toy)
    toy(sample, timestep=torch.tensor(300))
    assert rank_probe.ranks() == [lycoris_rank(300, 1000, 8)]


def test_an_interrupted_call_on_a_live_thread_does_not_lock_the_denoiser(rank_probe):
    """After Ctrl-C in the main thread (no post-hook ran), a worker thread may use the denoiser: the claim is stale
    because the interrupted call is no longer on the main thread's stack, although the thread lives on."""
    toy = toy_with_tlora()
    enable_tlora(toy, max_rank=8)
    sample = torch.randn(2, 16)
    boom = interrupt_inside(toy.blocks[0], KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        toy(sample, timestep=torch.tensor(300))
    boom.remove()
    rank_probe.watch("toy", toy)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(toy(sample, timestep=torch.tensor(600))))
    thread.start()
    thread.join()
    assert len(outcome) == 1, "the worker's call should not have raised"
    assert rank_probe.ranks() == [lycoris_rank(600, 1000, 8)]
