"""The T-LoRA parameters written outside a training call: a resumed checkpoint (`unet.load_state_dict`, as
accelerate's `load_state` does, also with `assign=True`), an optimizer step, `copy_` under no_grad. The fast modes
keep factors built from them; the next call must use what was written, as LyCORIS's own forward (mode="lycoris",
which reads the parameters on every call) does on a second pipeline given the same state dict.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from compat_tools import run
from devtools.measure import relative_error
from tlora_hooks import create_tlora

CONFIG = {"algo": "tlora", "linear_dim": 8, "linear_alpha": 4}
TOLERANCE = 2e-5  # fp32


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def trained_state() -> dict[str, torch.Tensor]:
    """What `accelerator.save_state` stores after training: the UNet's state dict, the adapter moved off its init."""
    pipe, _ = tiny.sdxl(rank=None, steps=3)
    pipe.unet.requires_grad_(False)
    tiny.perturbed(create_tlora(pipe, CONFIG), seed=1)
    return {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}


def write(unet, state: dict[str, torch.Tensor], how: str) -> None:
    """Give the adapter's parameters the checkpoint's values, the way `how` names."""
    if how in ("load_state_dict", "load_state_dict_assign"):  # assign=True puts new Parameter objects in place
        unet.load_state_dict(state, assign=how.endswith("assign"))
        return
    parameters = {name: p for name, p in unet.named_parameters() if name.startswith("tlora.")}
    assert parameters, "the adapter is registered under the denoiser"
    if how == "copy_under_no_grad":
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[name])
    else:  # an optimizer step whose gradient leads to the checkpoint's values
        for name, parameter in parameters.items():
            parameter.grad = parameter.detach() - state[name]
        torch.optim.SGD(parameters.values(), lr=1.0).step()


@pytest.mark.parametrize("how", ["load_state_dict", "load_state_dict_assign", "copy_under_no_grad", "optimizer_step"])
@pytest.mark.parametrize("mode", ["auto", "fold", "low_memory"])
def test_parameters_written_outside_training_reach_the_next_call(mode, how):
    state = trained_state()
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    pipe.unet.requires_grad_(False)
    create_tlora(pipe, CONFIG, mode=mode)
    initial = run(pipe, kw, latents())  # the fast mode has built its factors from the initial adapter
    write(pipe.unet, state, how)
    resumed = run(pipe, kw, latents())

    reference, reference_kw = tiny.sdxl(rank=None, steps=3)
    create_tlora(reference, CONFIG, mode="lycoris")
    reference.unet.load_state_dict(pipe.unet.state_dict())  # the parameters as the write left them
    expected = run(reference, reference_kw, latents())
    assert relative_error(initial, expected) > 100 * TOLERANCE, "the checkpoint must change the output"
    assert relative_error(resumed, expected) <= TOLERANCE
