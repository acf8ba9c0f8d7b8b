"""Host (Python + dispatch) cost per T-LoRA layer call of every mode, side by side in one process.

    python benchmarks/bench_host_overhead.py          # CUDA: full SDXL UNet layers; CPU: the reduced UNet's

On an eager GPU run every layer call costs host time to launch its kernels; SDXL has 700 T-LoRA layers per call,
so microseconds per layer decide whether the GPU waits for the host. Each targeted layer is called with a one-token
input, so the kernels are negligible and the time is the host's: Python frames, dispatch, launches (on CUDA without
synchronising: launch cost only). Also times the per-denoiser-call mask update (`set_masks` + `clear_masks`), the
fold's check for writes from outside alone (part of its `set_masks`), and the whole hook of an inference call
(pre-hook + post-hook: reading the timestep, choosing the mask, setting and clearing it), which is where a call is
told from a training call; the fast modes' comparison of the T-LoRA parameters' version counters (part of the
mask update); and the guarded blocks' calls (each block's `BlockGuard` check against `plain`).
Variants as in bench_forward.py; interleaved repetitions, medians. Prints a table and a `RESULT {json}` line.
`--adapters 2` puts a second T-LoRA (half the rank, its own schedule) on the same layers, both as adapters of one
hook, as `load_tlora(..., adapter_name=...)` twice does: what a second adapter costs per layer and per call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time
from importlib.metadata import version

import torch

from bench_forward import add_tlora, build_sdxl, synchronize, variant
from tlora_hooks.block_guard import entry_blocks

VARIANTS = ("plain", "lycoris", "lycoris_bypass", "low_memory", "fold")
ADAPTER_VARIANTS = ("plain", "lycoris", "low_memory", "fold")  # with several adapters


def time_layers(layers, inputs, device, loops):
    """Seconds per layer call, over `loops` passes through every layer."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(loops):
        for layer, x in zip(layers, inputs):
            layer(x)
    seconds = time.perf_counter() - start
    synchronize(device)
    return seconds / (loops * len(layers))


def time_mask_update(model, mask, device, loops):
    """Seconds per `set_masks` + `clear_masks` of the whole denoiser (what the mode adds per denoiser call)."""
    from tlora_hooks.hooks import installed_hook

    hook = installed_hook(model)
    mode = hook.mode
    masks = {group: mask.to(mode.mask_dtype) for group in hook.tables}
    synchronize(device)
    start = time.perf_counter()
    for _ in range(loops):
        mode.set_masks(masks)
        mode.clear_masks()
    synchronize(device)
    return (time.perf_counter() - start) / loops


def time_write_check(model, loops):
    """Seconds per check of every folded weight for writes from outside (version counter and storage), which the
    fold runs before each denoiser call; None where the mode folds nothing."""
    from tlora_hooks.hooks import installed_hook

    parts = getattr(installed_hook(model).mode, "parts", ())
    stacks = [stack for part in parts for stack in getattr(part, "stacks", ())
              if hasattr(stack, "take_outside_writes")]
    if not stacks:
        return None
    start = time.perf_counter()
    for _ in range(loops):
        for stack in stacks:
            stack.take_outside_writes()
    return (time.perf_counter() - start) / loops


def time_version_check(model, loops):
    """Seconds per comparison of the T-LoRA parameters' version counters with the fast mode's snapshot, which every
    inference call runs so that parameters written outside training (a resumed checkpoint) are not missed; None for
    `"lycoris"`, which reads the parameters themselves."""
    from tlora_hooks.hooks import installed_hook

    mode = installed_hook(model).mode
    if not hasattr(mode, "_refresh_if_changed"):
        return None
    start = time.perf_counter()
    for _ in range(loops):
        mode._refresh_if_changed()
    return (time.perf_counter() - start) / loops


def time_block_calls(model, blocks, loops):
    """Seconds per pass over the denoiser's guarded blocks with their `forward` replaced by a no-op: module call
    dispatch plus whatever pre-hooks the blocks carry. With a hook installed, each block carries `BlockGuard`'s
    check, run as inside a claimed call (the hot path: a running call); against `plain` this is the guard's cost."""
    from tlora_hooks.hooks import installed_hook

    hook = installed_hook(model)
    for block in blocks:
        block.forward = lambda *args, **kwargs: None
    if hook is not None:
        hook.guard.claim()
    try:
        start = time.perf_counter()
        for _ in range(loops):
            for block in blocks:
                block()
        return (time.perf_counter() - start) / loops
    finally:
        if hook is not None:
            hook.guard.release()
        for block in blocks:
            del block.forward


def time_hook(model, call, t, device, loops):
    """Seconds per denoiser call spent in the hook itself (pre-hook + post-hook), for the arguments `call` passes."""
    from tlora_hooks.hooks import installed_hook

    hook, seen = installed_hook(model), []
    recorder = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)),
                                               with_kwargs=True)
    call(t)
    recorder.remove()
    args, kwargs = seen[0]
    synchronize(device)
    start = time.perf_counter()
    for _ in range(loops):
        hook.pre_forward(model, args, kwargs)
        hook.post_forward(model, args, kwargs, None)
    synchronize(device)
    return (time.perf_counter() - start) / loops


@contextlib.contextmanager
def adapters_variant(name, model, networks, scheduler):
    """Put the model in the state `name` with each network an adapter of its own schedule; yield the handle."""
    from tlora_hooks.api import hook_denoisers
    from tlora_hooks.hooks import HookedAdapter
    from tlora_hooks.schedule import RankSchedule

    if name == "plain":
        for network in reversed(networks):
            network.restore()
        try:
            yield None
        finally:
            for network in networks:
                network.apply_to()
        return
    adapters = [
        HookedAdapter(f"adapter_{index}", list(network.loras), RankSchedule(network.loras[0].lora_dim, 1 + index))
        for index, network in enumerate(networks)
    ]
    handle = hook_denoisers(model, {"unet": (model, adapters)}, mode=name, timestep_fn=None, scheduler=scheduler,
                            replace_all=False)
    try:
        yield handle
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, call, scheduler, targets, _ = build_sdxl(device, dtype, device != "cuda", 1024)
    model.eval().requires_grad_(False)
    network = add_tlora(model, targets, args.rank, device)
    networks = [network] + [add_tlora(model, targets, args.rank // 2, device) for _ in range(args.adapters - 1)]
    variants = VARIANTS if args.adapters == 1 else ADAPTER_VARIANTS
    layers = [module.org_module[0] for module in network.loras]
    blocks = entry_blocks(model, layers)
    inputs = [torch.randn(1, 1, layer.in_features, device=device, dtype=dtype) for layer in layers]
    mask = torch.ones(1, args.rank, device=device, dtype=dtype)
    mask[:, args.rank // 2:] = 0
    samples = {name: [] for name in variants}
    updates = {name: [] for name in variants}
    checks = []
    version_checks = []
    hooks = {name: [] for name in variants}
    block_calls = {name: [] for name in variants}
    for repetition in range(args.reps + 1):  # the first round is untimed
        order = variants[repetition % len(variants):] + variants[: repetition % len(variants)]
        for name in order:
            state = (
                variant(name, model, network, args.rank, scheduler, dtype) if args.adapters == 1
                else adapters_variant(name, model, networks, scheduler)
            )
            with state as handle, torch.inference_mode():
                call(scheduler.timesteps[0].to(device))  # builds each path's state, as a first denoiser call does
                seconds = time_layers(layers, inputs, device, args.loops)
                block_seconds = time_block_calls(model, blocks, 10 * args.loops)
                update, hook, check = None, None, None
                if handle is not None:
                    update = time_mask_update(model, mask, device, args.loops)
                    hook = time_hook(model, call, scheduler.timesteps[1].to(device), device, args.loops)
                    check = time_write_check(model, 100 * args.loops)
                    version_check = time_version_check(model, 100 * args.loops)
                    if repetition and version_check is not None:
                        version_checks.append(version_check)
            if repetition:
                samples[name].append(seconds)
                block_calls[name].append(block_seconds)
                if update is not None:
                    updates[name].append(update)
                    hooks[name].append(hook)
                if check is not None:
                    checks.append(check)
    per_layer = {name: statistics.median(values) for name, values in samples.items()}
    result = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype).replace("torch.", ""), tlora_layers=len(layers), adapters=args.adapters, reps=args.reps,
        loops=args.loops,
        torch=torch.__version__, diffusers=version("diffusers"), lycoris=version("lycoris-lora"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        us_per_layer_call={name: round(value * 1e6, 2) for name, value in per_layer.items()},
        us_over_plain_per_layer={
            name: round((value - per_layer["plain"]) * 1e6, 2) for name, value in per_layer.items()
        },
        ms_per_denoiser_call_all_layers={
            name: round(value * len(layers) * 1e3, 3) for name, value in per_layer.items()
        },
        us_mask_update_per_call={name: round(statistics.median(v) * 1e6, 1) for name, v in updates.items() if v},
        us_fold_write_check_per_call=round(statistics.median(checks) * 1e6, 1) if checks else None,
        us_hook_per_call={name: round(statistics.median(v) * 1e6, 1) for name, v in hooks.items() if v},
        tlora_parameters=sum(len(list(module.parameters())) for module in network.loras),
        us_version_check_per_call=round(statistics.median(version_checks) * 1e6, 1) if version_checks else None,
        guarded_blocks=len(blocks),
        us_block_calls_per_call={name: round(statistics.median(v) * 1e6, 1) for name, v in block_calls.items()},
    )
    print(f"{'variant':16}{'us/layer call':>15}{'over plain':>12}{'ms per call, all layers':>26}")
    for name in variants:
        print(f"{name:16}{per_layer[name] * 1e6:15.2f}{(per_layer[name] - per_layer['plain']) * 1e6:12.2f}"
              f"{per_layer[name] * len(layers) * 1e3:26.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
