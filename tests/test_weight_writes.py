"""Others writing the denoiser's weights while T-LoRA is enabled: fusing a PEFT LoRA, loading a state dict, editing
in place, saving. In every mode, every call either gives LyCORIS's own output for the weights the user has, or raises
TLoRAError; and unloading everything gives back the original weights (within float rounding where a PEFT delta was
added and taken away again).

The reference is LyCORIS's own forward (`create_lycoris_from_weights` + `apply_to()`) on a second pipeline with the
same weights and the same writes, its mask set from the scheduler's own step around every call.
"""

from __future__ import annotations

import pytest
import torch
from lycoris import create_lycoris_from_weights

import tiny
import tlora_files
from compat_tools import run, scheduler_state_masks
from devtools.lycoris_build import lycoris_without_gc
from devtools.measure import relative_error
from tlora_hooks import TLoRAError, disable_tlora, enable_tlora, load_tlora, unload_tlora

MODES = ("fold", "low_memory", "lycoris")
SCHEDULE = (8, 2, 0.5)  # max_rank, min_rank, alpha, as the file's metadata says
TOLERANCE = 2e-5  # fp32: the fast modes fold or bypass, LyCORIS rebuilds ΔW per layer


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory) -> str:
    trained, _ = tiny.sd3(rank=None)
    network = tiny.add_tlora(trained.transformer, 8)
    path = tmp_path_factory.mktemp("writes") / "sd3.safetensors"
    return tlora_files.simpletuner_file(network, path, linear_dim=8, tlora_min_rank=2, tlora_alpha=0.5)


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def weights(transformer) -> dict[str, torch.Tensor]:
    """The transformer's own parameters (PEFT's names mapped back), as the user sees them."""
    state = {}
    for name, tensor in transformer.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    return state


def reference_pipeline(path: str):
    """A second tiny SD3 whose T-LoRA runs LyCORIS's own forward (group 0, masked by `scheduler_state_masks`)."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, pipe.transformer)
    network.apply_to()
    return pipe, kw


def reference_output(pipe, kw) -> torch.Tensor:
    with scheduler_state_masks(pipe, SCHEDULE):
        return run(pipe, kw, latents())


def assert_close(out: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert relative_error(out, reference) <= TOLERANCE, f"{what}: relative error {relative_error(out, reference):.2e}"


# -- fuse_lora / unfuse_lora ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["tlora_first", "peft_first"])
@pytest.mark.parametrize("mode", MODES)
def test_a_fused_peft_lora_stays_fused_and_unloading_everything_restores_the_original(sd3_file, mode, order):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    peft = tiny.peft_lora(pipe.transformer)
    reference, reference_kw = reference_pipeline(sd3_file)
    tlora_only = reference_output(reference, reference_kw)
    reference.load_lora_weights(peft, adapter_name="style")
    expected = reference_output(reference, reference_kw)  # both adapters, unfused: fusing must not change it
    unmasked = run(reference, reference_kw, latents())
    assert min(relative_error(tlora_only, expected), relative_error(unmasked, expected)) > 50 * TOLERANCE

    if order == "tlora_first":
        load_tlora(pipe, sd3_file, mode=mode)
        run(pipe, kw, latents())  # the fold now holds W0 + the delta of the last call
        pipe.load_lora_weights(peft, adapter_name="style")
    else:
        pipe.load_lora_weights(peft, adapter_name="style")
        load_tlora(pipe, sd3_file, mode=mode)
    assert_close(run(pipe, kw, latents()), expected, "unfused")
    pipe.fuse_lora()
    assert_close(run(pipe, kw, latents()), expected, "fused")
    unload_tlora(pipe)  # the order: the T-LoRA first, while the PEFT LoRA is fused
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = weights(pipe.transformer)
    assert after.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_peft_loaded_after_the_fold_moves_its_layers_to_the_low_memory_path(sd3_file):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    handle = load_tlora(pipe, sd3_file, mode="fold")
    assert handle.mode == {"transformer": "fold"}
    pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
    run(pipe, kw, latents())
    assert handle.mode == {"transformer": "fold+low_memory"}


# -- load_state_dict / state_dict / save_pretrained -----------------------------------------------------------------
def fine_tuned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another base: every weight moved a little, as a fine-tune would."""
    generator = torch.Generator().manual_seed(7)
    return {name: t + 0.05 * t.abs().mean() * torch.randn(t.shape, generator=generator) for name, t in state.items()}


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("mode", MODES)
def test_load_state_dict_while_enabled_becomes_the_new_base(sd3_file, mode, assign):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    new_base = fine_tuned(weights(pipe.transformer))
    reference, reference_kw = reference_pipeline(sd3_file)
    reference.transformer.load_state_dict(new_base)  # LyCORIS's forward reads the layers' current weights
    expected = reference_output(reference, reference_kw)

    load_tlora(pipe, sd3_file, mode=mode)
    before = run(pipe, kw, latents())
    pipe.transformer.load_state_dict(pipe.transformer.state_dict())  # a round trip changes nothing
    assert torch.equal(run(pipe, kw, latents()), before)
    pipe.transformer.load_state_dict(new_base, assign=assign)
    assert_close(run(pipe, kw, latents()), expected, "after load_state_dict")
    unload_tlora(pipe)
    after = weights(pipe.transformer)
    assert all(torch.equal(after[name], tensor) for name, tensor in new_base.items()), "exactly what was loaded"


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_and_save_pretrained_give_the_base_weights(sd3_file, mode, tmp_path):
    from diffusers import SD3Transformer2DModel

    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    load_tlora(pipe, sd3_file, mode=mode)
    out = run(pipe, kw, latents())
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())
    pipe.transformer.save_pretrained(tmp_path)
    saved = SD3Transformer2DModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in original.items())
    kept = {name: parameter for name, parameter in pipe.transformer.state_dict(keep_vars=True).items()}
    assert all(torch.equal(kept[name], tensor) for name, tensor in original.items())
    assert torch.equal(run(pipe, kw, latents()), out), "the next call folds again"
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items()), "the state dict stays W0"


# -- in-place edits ---------------------------------------------------------------------------------------------------
def edit(transformer) -> None:
    """An in-place edit through the Parameter, as a user or an optimizer step does it."""
    with torch.no_grad():
        transformer.transformer_blocks[0].attn.to_q.weight.mul_(1.5)


@pytest.mark.parametrize("mode", ["low_memory", "lycoris"])
def test_the_modes_that_never_write_the_weights_follow_an_in_place_edit_exactly(sd3_file, mode):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    reference, reference_kw = reference_pipeline(sd3_file)
    edit(reference.transformer)
    expected = reference_output(reference, reference_kw)
    load_tlora(pipe, sd3_file, mode=mode)
    run(pipe, kw, latents())
    edit(pipe.transformer)
    assert_close(run(pipe, kw, latents()), expected, "after the edit")


def test_an_in_place_edit_of_folded_weights_raises_and_disabling_restores_them(sd3_file):
    """The fold holds W0 + the last call's delta: an edit on top cannot be told apart from the delta."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    reference, reference_kw = reference_pipeline(sd3_file)
    edit(reference.transformer)
    expected = reference_output(reference, reference_kw)

    load_tlora(pipe, sd3_file, mode="fold")
    run(pipe, kw, latents())
    edit(pipe.transformer)
    for _ in range(2):  # every call refuses, until the user does what the message says
        with pytest.raises(TLoRAError, match="were written while they held W0 plus the T-LoRA delta"):
            run(pipe, kw, latents())
    disable_tlora(pipe)  # as the message says: the fold puts back the weights it held before the edit ...
    after = weights(pipe.transformer)
    assert all(torch.equal(after[name], tensor) for name, tensor in original.items()), "the weights before the edit"
    edit(pipe.transformer)  # ... the edit, then T-LoRA again
    enable_tlora(pipe, *SCHEDULE, mode="fold")
    assert_close(run(pipe, kw, latents()), expected, "edited, then enabled")
