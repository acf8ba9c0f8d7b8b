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
from tlora_hooks.hooks import installed_hook

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


def test_peft_loaded_after_the_fold_moves_its_layers_to_the_low_memory_mode(sd3_file):
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


def edit_through_data(transformer) -> None:
    """An in-place write through `.data`, as diffusers' `EMAModel.copy_to` does it: no version counter moves."""
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    weight.data.copy_(weight.data * 1.5)


@pytest.mark.parametrize("how", [edit, edit_through_data], ids=["parameter", "data"])
@pytest.mark.parametrize("mode", ["low_memory", "lycoris"])
def test_the_modes_that_never_write_the_weights_follow_an_in_place_edit_exactly(sd3_file, mode, how):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    reference, reference_kw = reference_pipeline(sd3_file)
    edit(reference.transformer)
    expected = reference_output(reference, reference_kw)
    load_tlora(pipe, sd3_file, mode=mode)
    run(pipe, kw, latents())
    how(pipe.transformer)
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


# -- no call between the write and what reads the weights (unload, disable, state_dict, pipe.to) ---------------------
ALL_MODES = ("fold", "auto", "low_memory", "lycoris")


def assert_weights(after: dict, expected: dict, what: str, exact: bool = False) -> None:
    assert after.keys() >= expected.keys()
    for name, tensor in expected.items():
        if exact:
            assert torch.equal(after[name], tensor), f"{what}: {name}"
        else:
            torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=1e-6, msg=f"{what}: {name}")


@pytest.mark.parametrize("call_first", [False, True], ids=["no_call", "call_first"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_fuse_lora_with_no_call_after_it_is_kept_by_state_dict_and_unloading(sd3_file, mode, call_first):
    """`fuse_lora()` then, with no pipeline call: `state_dict()` holds the fused PEFT delta (as a plain pipeline's),
    and unloading T-LoRA, unfusing and unloading the PEFT LoRA gives back the original weights."""
    plain, _ = tiny.sd3(rank=None, steps=3)
    peft = tiny.peft_lora(plain.transformer)
    plain.load_lora_weights(peft, adapter_name="style")
    plain.fuse_lora()
    fused = weights(plain.transformer)  # the reference: no T-LoRA at all

    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    load_tlora(pipe, sd3_file, mode=mode)
    if call_first:
        run(pipe, kw, latents())
    pipe.load_lora_weights(peft, adapter_name="style")
    pipe.fuse_lora()
    assert_weights(weights(pipe.transformer), fused, "state_dict after fuse_lora")
    unload_tlora(pipe)
    assert_weights(weights(pipe.transformer), fused, "after unload_tlora, still fused")
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert_weights(weights(pipe.transformer), original, "after unloading everything")


@pytest.mark.parametrize("verb", [unload_tlora, disable_tlora], ids=["unload", "disable"])
@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_load_state_dict_with_no_call_after_it_is_what_unloading_gives_back(sd3_file, mode, assign, verb):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    new_base = fine_tuned(weights(pipe.transformer))
    load_tlora(pipe, sd3_file, mode=mode)
    run(pipe, kw, latents())
    pipe.transformer.load_state_dict(new_base, assign=assign, strict=False)
    verb(pipe)  # no state_dict() in between either: it would look at the weights first
    assert_weights(weights(pipe.transformer), new_base, "after removing T-LoRA", exact=True)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_load_state_dict_then_pipe_to_with_no_call_between(sd3_file, mode):
    """The loaded weights move with the others: the call after `pipe.to(bf16)` runs on them (it equals a fresh enable
    on the weights the user has), and disabling gives them back."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    new_base = fine_tuned(weights(pipe.transformer))
    load_tlora(pipe, sd3_file, mode=mode)
    run(pipe, kw, latents())
    pipe.transformer.load_state_dict(new_base, strict=False)
    pipe.to(torch.bfloat16)
    bf16_kw = {name: value.to(torch.bfloat16) if torch.is_tensor(value) else value for name, value in kw.items()}
    moved = run(pipe, bf16_kw, latents().to(torch.bfloat16))
    disable_tlora(pipe)
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in new_base.items()}
    assert_weights(weights(pipe.transformer), expected, "after disable_tlora", exact=True)
    enable_tlora(pipe, *SCHEDULE, mode=mode)  # enabled on the weights as they are now
    assert torch.equal(run(pipe, bf16_kw, latents().to(torch.bfloat16)), moved)


def swapped_peft_lora(transformer) -> dict[str, torch.Tensor]:
    """A second PEFT LoRA, on other layers than `tiny_peft_lora`'s."""
    generator = torch.Generator().manual_seed(9)
    state = {}
    for name in ("transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_out.0"):
        layer = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.3
    return state


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_peft_lora_swapped_under_the_same_name_is_followed(sd3_file, mode):
    """diffusers names the next LoRA `default_0` again after `unload_lora_weights`: the new one's layers leave the
    fold too, its fused delta is kept, and unloading everything gives back the original weights."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    reference, reference_kw = reference_pipeline(sd3_file)
    load_tlora(pipe, sd3_file, mode=mode)
    for target in (pipe, reference):
        target.load_lora_weights(tiny.peft_lora(target.transformer))
    run(pipe, kw, latents())
    names = list(pipe.transformer.peft_config)
    for target in (pipe, reference):
        target.unload_lora_weights()
        target.load_lora_weights(swapped_peft_lora(target.transformer))
        target.fuse_lora()
    assert list(pipe.transformer.peft_config) == names, "the same adapter name, another LoRA"
    assert_close(run(pipe, kw, latents()), reference_output(reference, reference_kw), "the swapped LoRA, fused")
    unload_tlora(pipe)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert_weights(weights(pipe.transformer), original, "after unloading everything")


@pytest.mark.parametrize("verb", [unload_tlora, disable_tlora], ids=["unload", "disable"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_an_edit_with_no_call_after_it(sd3_file, mode, verb, caplog):
    """An edit made while the weights hold W0 (no call yet) is kept by every mode. One made on W0 + the last call's
    delta cannot be told apart from the delta: the fold gives back W0 from before it and warns; the others keep it."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    edited = {**original, "transformer_blocks.0.attn.to_q.weight": original["transformer_blocks.0.attn.to_q.weight"]
              * 1.5}
    load_tlora(pipe, sd3_file, mode=mode)
    edit(pipe.transformer)  # before any call: on W0
    verb(pipe)
    assert_weights(weights(pipe.transformer), edited, "an edit on W0 is kept", exact=True)
    if verb is disable_tlora:
        unload_tlora(pipe)

    pipe, kw = tiny.sd3(rank=None, steps=3)
    load_tlora(pipe, sd3_file, mode=mode)
    run(pipe, kw, latents())
    edit(pipe.transformer)  # on W0 + the last call's delta, in the fold
    caplog.clear()
    verb(pipe)
    warnings = [r for r in caplog.records if r.name.startswith("tlora_hooks") and r.levelname == "WARNING"]
    folds = handle_mode(mode) == "fold"
    assert_weights(weights(pipe.transformer), original if folds else edited, "after an edit on the fold", exact=True)
    assert [("were written while they held W0 plus" in r.getMessage()) for r in warnings] == ([True] if folds else [])


def handle_mode(mode: str) -> str:
    return "fold" if mode in ("fold", "auto") else mode  # "auto" folds plain fp32 Linear layers on the CPU


@pytest.mark.parametrize("mode", ALL_MODES)
def test_an_edit_then_pipe_to_with_no_call_between(sd3_file, mode):
    """`pipe.to(bf16)` after an edit: an edit on W0 moves with the weights; one on the fold's W0 + delta makes the
    next call raise (nothing runs), and disabling gives back W0 converted."""
    for call_first in (False, True):
        pipe, kw = tiny.sd3(rank=None, steps=3)
        original = weights(pipe.transformer)
        load_tlora(pipe, sd3_file, mode=mode)
        if call_first:
            run(pipe, kw, latents())
        edit(pipe.transformer)
        pipe.to(torch.bfloat16)
        bf16_kw = {name: value.to(torch.bfloat16) if torch.is_tensor(value) else value for name, value in kw.items()}
        drops = call_first and handle_mode(mode) == "fold"
        if drops:
            with pytest.raises(TLoRAError, match="were written while they held W0 plus the T-LoRA delta"):
                run(pipe, bf16_kw, latents().to(torch.bfloat16))
        else:
            run(pipe, bf16_kw, latents().to(torch.bfloat16))
        disable_tlora(pipe)
        expected = {name: tensor.to(torch.bfloat16) for name, tensor in original.items()}
        if not drops:
            expected["transformer_blocks.0.attn.to_q.weight"] = (
                original["transformer_blocks.0.attn.to_q.weight"] * 1.5
            ).to(torch.bfloat16)
        assert_weights(weights(pipe.transformer), expected, f"call_first={call_first}", exact=True)


def test_the_fold_names_a_dtype_it_cannot_write_and_disabling_gives_w0_back_in_it(sd3_file):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    original = weights(pipe.transformer)
    load_tlora(pipe, sd3_file, mode="fold")
    run(pipe, kw, latents())
    pipe.to(torch.float64)
    with pytest.raises(TLoRAError, match=r"converted to torch.float64 after enable_tlora.*disable_tlora"):
        run(pipe, kw, latents())
    disable_tlora(pipe)
    expected = {name: tensor.to(torch.float64) for name, tensor in original.items()}
    assert_weights(weights(pipe.transformer), expected, "W0, converted", exact=True)


@pytest.mark.parametrize("first_look", ["call", "state_dict"])
def test_pipe_to_warns_once_per_move(sd3_file, caplog, first_look):
    """Told once whether a call or `state_dict()` (whose hooks take the move in stack by stack) sees it first."""
    pipe, kw = tiny.sd3(rank=None, steps=3)
    load_tlora(pipe, sd3_file, mode="fold")
    run(pipe, kw, latents())
    assert len(installed_hook(pipe.transformer).mode.parts[0].stacks) > 1, "several stacks move"
    caplog.clear()
    pipe.to(torch.bfloat16)
    if first_look == "state_dict":
        pipe.transformer.state_dict()
    run(pipe, {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in kw.items()},
        latents().to(torch.bfloat16))
    moved = [r for r in caplog.records if r.name.startswith("tlora_hooks") and "moved" in r.getMessage()]
    assert len(moved) == 1
    assert "Enable T-LoRA after" not in moved[0].getMessage()
