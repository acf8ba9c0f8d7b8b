"""Shared by the pipeline, compatibility, fault, thread and fuzz tests: an independent mask reference, the ranks it
gives, a toy denoiser, and the hook count a clean removal must restore.

`scheduler_state_masks` is the reference for compositions that change how a call reaches the denoiser
(offload, caches, a ControlNet, a PEFT LoRA): like SimpleTuner's vendored pipelines, it sets the mask from the
scheduler's own current timestep (`timesteps[step_index]`) before every call, never from the call's arguments.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

import tiny
from conftest import lycoris_rank
from tlora_hooks import register_convention


def run(pipe, kw, latents, **extra):
    """One stock pipeline call from fixed latents; returns the output latents."""
    return pipe(**kw, **extra, latents=latents.clone(), return_dict=False)[0]


def layer_state(denoiser):
    """Everything a load could leave behind on the layers: their attribute names and forward."""
    return {name: (sorted(layer.__dict__), layer.__dict__.get("forward")) for name, layer in denoiser.named_modules()}


def hook_counts(module: torch.nn.Module) -> tuple[int, int]:
    """How many forward pre-hooks and forward hooks torch holds on `module` (torch has no public count)."""
    return len(module._forward_pre_hooks), len(module._forward_hooks)


def denoisers(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "transformer") if getattr(pipe, name, None) is not None}


@contextmanager
def scheduler_state_masks(pipe, schedule, group_id: int = 0, mask_dtype: torch.dtype = torch.float32):
    """Set LyCORIS's mask from `pipe.scheduler`'s current step around every denoiser call (T-LoRA hooks disabled).

    `mask_dtype` must be the T-LoRA modules' dtype: LyCORIS multiplies its singular values by the mask.
    """
    max_rank, min_rank, alpha = schedule

    def set_mask(module, args, kwargs):
        scheduler = pipe.scheduler
        t = scheduler.timesteps[scheduler.step_index or 0]
        T = scheduler.config.num_train_timesteps
        mask = compute_timestep_mask(int(t), T, max_rank, min_rank, alpha).to(mask_dtype)
        set_timestep_mask(mask, group_id)

    def clear_mask(module, args, kwargs, output):
        clear_timestep_mask(group_id)

    handles = []
    for denoiser in denoisers(pipe).values():
        handles.append(denoiser.register_forward_pre_hook(set_mask, with_kwargs=True))
        handles.append(denoiser.register_forward_hook(clear_mask, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def expected_ranks(pipe, schedule, calls_per_step: int = 1) -> list[int]:
    """LyCORIS's rank for each entry of the scheduler's timesteps (after a run), per denoiser call."""
    T = pipe.scheduler.config.num_train_timesteps
    return [lycoris_rank(t, T, *schedule) for t in pipe.scheduler.timesteps for _ in range(calls_per_step)]


class StepToyDenoiser(torch.nn.Module):
    """A denoiser small enough to call hundreds of times: takes `timestep` like a stock one, in any shape."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ToyBlock(width) for _ in range(2))

    def forward(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        for block in self.blocks:
            sample = block(sample)
        return sample


class ToyBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj_in = torch.nn.Linear(width, width)
        self.proj_out = torch.nn.Linear(width, width)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return sample + self.proj_out(torch.nn.functional.gelu(self.proj_in(sample)))


register_convention(StepToyDenoiser, param="timestep")


def toy_with_tlora(rank: int = 8, seed: int = 0, cls: type = StepToyDenoiser) -> StepToyDenoiser:
    """A StepToyDenoiser (or subclass) whose Linear layers carry a perturbed LyCORIS T-LoRA."""
    torch.manual_seed(seed)
    toy = cls()
    network = tiny.apply_tlora(toy, rank, targets=("ToyBlock",))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.lambda_layer.add_(torch.randn(module.lambda_layer.shape, generator=generator))
    return toy
