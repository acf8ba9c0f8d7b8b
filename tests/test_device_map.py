"""A denoiser split across devices by accelerate (a model-level `device_map` run through `AlignDevicesHook`s), and the
order of LyCORIS and accelerate hooks.

On the CPU the split is CPU / disk / meta (offloaded weights); the multi-device placement is checked on GPUs
(`gpu` tests at the end). The reference is LyCORIS's own forward with the mask set by hand
(`compat_tools` toy denoiser), or the uncomposed hooked run.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from compat_tools import StepToyDenoiser, ToyBlock, toy_with_tlora
from tlora_hooks import TLoRAError, disable_tlora, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import installed_hook
from tlora_hooks.modes.low_memory import BypassStack

TIMESTEPS = (999, 700, 400, 100)
SCHEDULE = (8, 1, 1.0)


def scheduler():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    scheduler.set_timesteps(4)
    return scheduler


def sample(device="cpu") -> torch.Tensor:
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).to(device)


def reference(toy, device="cpu") -> list[torch.Tensor]:
    """LyCORIS's own forward, the mask of each timestep set by hand (no hooks)."""
    outputs = []
    for t in TIMESTEPS:
        set_timestep_mask(compute_timestep_mask(t, 1000, *SCHEDULE))
        try:
            outputs.append(toy(sample(device), timestep=torch.tensor(t)).cpu())
        finally:
            clear_timestep_mask()
    return outputs


def hooked(toy, device="cpu") -> list[torch.Tensor]:
    with torch.no_grad():
        return [toy(sample(device), timestep=torch.tensor(t, device=device)).cpu() for t in TIMESTEPS]


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Every per-call conversion of low_memory factors to a layer's device or dtype."""
    seen = []
    original = BypassStack.factors_for

    def counting(stack, layer, x):
        seen.append((x.device, x.dtype))
        return original(stack, layer, x)

    monkeypatch.setattr(BypassStack, "factors_for", counting)
    return seen


# -- offloaded weights (CPU / disk / meta) ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["disk", "cpu_offload"])
def test_dispatched_with_offloaded_weights(where, tmp_path, conversions):
    """Offloaded blocks keep their weights on meta and load them per call: the low_memory mode, its factors
    built once on the execution device, the masked output exact."""
    from accelerate import cpu_offload, dispatch_model

    toy = toy_with_tlora()
    expected = reference(toy)
    if where == "disk":
        dispatch_model(toy, device_map={"blocks.0": "cpu", "blocks.1": "disk"}, main_device="cpu",
                       offload_dir=str(tmp_path))
    else:
        cpu_offload(toy, execution_device=torch.device("cpu"))  # what enable_sequential_cpu_offload does
    assert toy.blocks[1].proj_in.weight.device.type == "meta"
    handle = enable_tlora(toy, *SCHEDULE, scheduler=scheduler())
    assert handle.mode == {"StepToyDenoiser": "low_memory"}
    for _ in range(2):
        for out, want in zip(hooked(toy), expected):
            torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert conversions == [], "no factor is converted per call"


def test_weight_keeping_device_hooks_keep_the_fold_mode():
    """An AlignDevicesHook without offload (a multi-GPU device_map's) only moves inputs: fold stays available."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    toy = toy_with_tlora()
    expected = reference(toy)
    for index, block in enumerate(toy.blocks):
        add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", io_same_device=index == 0))
    handle = enable_tlora(toy, *SCHEDULE, scheduler=scheduler())
    assert handle.mode == {"StepToyDenoiser": "fold"}
    for out, want in zip(hooked(toy), expected):
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


# -- LyCORIS before or after accelerate hooks, hooks removed afterwards ----------------------------------------------
def hook_leaves(toy) -> None:
    """accelerate hooks on every layer (what a device map or sequential offload puts there), weights kept."""
    from accelerate.hooks import attach_align_device_hook

    attach_align_device_hook(toy, execution_device=torch.device("cpu"))


def remove_hooks(toy) -> None:
    """What `pipe.remove_all_hooks()` (and so `enable_model_cpu_offload()`) does to each component."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(toy, recurse=True)


def toy_lycoris_over_hooks():
    """The toy with accelerate hooks on its layers, then LyCORIS applied over them (same weights as toy_with_tlora)."""
    torch.manual_seed(0)
    plain = StepToyDenoiser()
    hook_leaves(plain)
    network = tiny.apply_tlora(plain, 8, targets=("ToyBlock",))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.loras:
            module.lambda_layer.add_(torch.randn(module.lambda_layer.shape, generator=generator))
    return plain


def test_lycoris_applied_over_hooks_is_dropped_by_their_removal_without_tlora_hooks():
    """The hazard itself, in LyCORIS and accelerate alone: the T-LoRA silently stops running."""
    toy = toy_lycoris_over_hooks()
    with torch.no_grad():
        with_lora = toy(sample(), timestep=None)
        remove_hooks(toy)
        after = toy(sample(), timestep=None)
    assert applied_tlora_modules(toy), "LyCORIS still lists its modules"
    assert (with_lora - after).abs().max() > 1e-3, "yet they no longer run"


def hooked_toy(order: str):
    """The toy with hooks on its layers, LyCORIS applied before or after them."""
    if order == "lycoris_then_hooks":
        toy = toy_with_tlora()
        hook_leaves(toy)
        return toy
    return toy_lycoris_over_hooks()


@pytest.mark.parametrize("mode", ["auto", "fold", "low_memory", "lycoris"])
@pytest.mark.parametrize("order", ["lycoris_then_hooks", "hooks_then_lycoris"])
def test_hook_order_and_removal_keep_the_tlora(order, mode, caplog):
    """Masked output before and after the hooks' removal; after disabling, LyCORIS's own unmasked output as it was
    before enabling (every module still runs), and enabling again runs them masked."""
    expected = reference(toy_with_tlora())
    toy = hooked_toy(order)
    with torch.no_grad():
        unmasked = toy(sample(), timestep=None)
    handle = enable_tlora(toy, *SCHEDULE, mode=mode, scheduler=scheduler())
    for out, want in zip(hooked(toy), expected):
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    remove_hooks(toy)
    for out, want in zip(hooked(toy), expected):
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        handle.remove()
    assert not [record for record in caplog.records if record.name.startswith("tlora_hooks")]
    with torch.no_grad():
        torch.testing.assert_close(toy(sample(), timestep=None), unmasked, atol=1e-6, rtol=1e-6)
    for again in ("low_memory", "lycoris"):
        handle = enable_tlora(toy, *SCHEDULE, mode=again, scheduler=scheduler())
        for out, want in zip(hooked(toy), expected):
            torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
        handle.remove()


def test_hooks_removed_before_enable_are_refused():
    toy = toy_lycoris_over_hooks()
    remove_hooks(toy)
    with pytest.raises(TLoRAError, match="no longer in their layers' forward"):
        enable_tlora(toy, *SCHEDULE, scheduler=scheduler())


@pytest.mark.parametrize("mode", ["low_memory", "lycoris"])
def test_a_dropped_module_raises_on_the_next_call(mode):
    """A diffusers hook added to the layers before LyCORIS and removed after enable_tlora drops the modules; the
    next call raises instead of running without them."""
    from diffusers.hooks import HookRegistry, ModelHook

    torch.manual_seed(0)
    toy = StepToyDenoiser()
    layers = [layer for block in toy.blocks for layer in (block.proj_in, block.proj_out)]
    for layer in layers:
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(ModelHook(), "outer")
    tiny.apply_tlora(toy, 8, targets=("ToyBlock",))
    enable_tlora(toy, *SCHEDULE, mode=mode, scheduler=scheduler())
    hooked(toy)
    for layer in layers:
        layer._diffusers_hook.remove_hook("outer")
    with pytest.raises(TLoRAError, match="4 T-LoRA module\\(s\\) of the .* mode are no longer"):
        hooked(toy)
    disable_tlora(toy)


# -- several devices --------------------------------------------------------------------------------------------------
def place_lycoris_modules(toy, devices: tuple[str, str]) -> None:
    """LyCORIS keeps its modules outside the model, so no placement moves them: put each beside its block."""
    for module in applied_tlora_modules(toy):
        module.to(devices[0] if module.lora_name.startswith("lycoris_blocks_0") else devices[1])


def dispatched_toy(devices: tuple[str, str]):
    """The toy's blocks placed by accelerate's `dispatch_model` with the map {blocks.0: devices[0], blocks.1:
    devices[1]}. A "cpu" block beside a GPU is offloaded, not run on the CPU: dispatch_model picks the GPU as its
    main device, keeps that block's weights on meta and loads them onto the GPU for each call."""
    from accelerate import dispatch_model

    toy = toy_with_tlora()
    expected = reference(toy)
    place_lycoris_modules(toy, devices)
    dispatch_model(toy, device_map={"blocks.0": devices[0], "blocks.1": devices[1]})
    return toy, expected


def hooked_split_toy(devices: tuple[str, str]):
    """The toy's blocks placed on and run on two devices by one weight-keeping `AlignDevicesHook` each (what
    dispatch_model puts on GPU blocks), so a block really runs on the CPU beside one on a GPU."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    toy = toy_with_tlora()
    expected = reference(toy)
    place_lycoris_modules(toy, devices)
    for index, block in enumerate(toy.blocks):
        add_hook_to_module(block, AlignDevicesHook(execution_device=devices[index], place_submodules=True))
    return toy, expected


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ONE_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "low_memory"])
@pytest.mark.parametrize(
    ("place", "devices", "stacks_on", "auto_mode"),
    [
        pytest.param(dispatched_toy, ("cuda:0", "cuda:1"), {"cuda:0", "cuda:1"}, "fold", marks=TWO_GPUS,
                     id="dispatch-two-gpus"),
        # blocks.1 is offloaded and runs on cuda:0 (accelerate's dispatch_model): meta weights, so no fold.
        pytest.param(dispatched_toy, ("cuda:0", "cpu"), {"cuda:0"}, "low_memory", marks=ONE_GPU,
                     id="dispatch-gpu-and-offloaded"),
        pytest.param(hooked_split_toy, ("cuda:0", "cpu"), {"cuda:0", "cpu"}, "fold", marks=ONE_GPU,
                     id="hooks-gpu-and-cpu"),
    ],
)
def test_split_denoiser_keeps_each_layers_state_on_its_device(place, devices, stacks_on, auto_mode, mode, conversions):
    toy, expected = place(devices)
    handle = enable_tlora(toy, *SCHEDULE, mode=mode, scheduler=scheduler())
    for _ in range(2):
        for out, want in zip(hooked(toy, devices[0]), expected):
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert conversions == [], "no factor is converted per call"
    assert stack_devices(toy) == {torch.device(device) for device in stacks_on}
    assert handle.mode["StepToyDenoiser"] == (auto_mode if mode == "auto" else "low_memory")


class ToyOfBlocks(StepToyDenoiser):
    """The toy with `count` blocks: the same layers, more of them."""

    def __init__(self, count: int, width: int = 16):
        super().__init__(width)
        self.blocks = torch.nn.ModuleList(ToyBlock(width) for _ in range(count))


class CallWork(TorchDispatchMode):
    """The aten ops T-LoRA's hooks on a denoiser run per call (between its pre-hooks and after its forward), copies
    keyed by their source and target device type."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.ops: Counter = Counter()

        def enter(*_):
            self.__enter__()

        def leave(*_):
            self.__exit__(None, None, None)

        denoiser.register_forward_pre_hook(enter, prepend=True)
        denoiser.register_forward_pre_hook(leave)
        denoiser.register_forward_hook(enter, prepend=True)
        denoiser.register_forward_hook(leave, always_call=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.ops[("copy", args[0].device.type, out.device.type)] += 1
        elif func is torch.ops.aten.copy_.default:
            self.ops[("copy", args[1].device.type, args[0].device.type)] += 1
        else:
            self.ops[str(func)] += 1
        return out

    def cross_device_copies(self) -> Counter:
        return Counter({key: count for key, count in self.ops.items() if key[0] == "copy" and key[1] != key[2]})


def steady_call_work(blocks_per_device: int, mode: str) -> CallWork:
    """The work of one call after the first (which builds the stacks), the toy's blocks half on the CPU and half on
    meta (the stand-in for a second device), each run there by a weight-keeping AlignDevicesHook."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    torch.manual_seed(0)
    toy = ToyOfBlocks(2 * blocks_per_device)
    tiny.add_tlora(toy, 8, targets=("ToyBlock",))
    for index, block in enumerate(toy.blocks):
        device = "cpu" if index < blocks_per_device else "meta"
        add_hook_to_module(block, AlignDevicesHook(execution_device=device, place_submodules=True))
    enable_tlora(toy, *SCHEDULE, mode=mode, scheduler=scheduler())
    work = CallWork(toy)
    with torch.no_grad():
        for t in TIMESTEPS[:2]:
            work.ops.clear()
            toy(sample(), timestep=torch.tensor(t))
    return work


@pytest.mark.parametrize("mode", ["fold", "low_memory"])
def test_a_call_copies_one_mask_per_device_and_nothing_per_layer(mode, conversions):
    """Four times the layers on each of two devices: the same ops per call, and one copy to the second device (the
    mask; the fold mode leaves the meta layers, which it cannot fold, to low_memory)."""
    few, many = steady_call_work(1, mode), steady_call_work(4, mode)
    assert many.ops == few.ops
    assert many.cross_device_copies() == Counter({("copy", "cpu", "meta"): 1})
    assert conversions == [], "no factor is converted per call"


def stack_devices(denoiser) -> set[torch.device]:
    """Where the fast mode on `denoiser` keeps its stacked state (fold: W0 and factors; low_memory: factors)."""
    mode = installed_hook(denoiser).mode
    stacks = [stack for part in mode.parts for stack in getattr(part, "stacks", [])]
    return {stack.a.device for stack in stacks}
