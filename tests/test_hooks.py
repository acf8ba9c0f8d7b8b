"""Hook behaviour: cleanup after errors, replace-not-stack, private mask groups, weak references, reductions."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules.tlora import get_timestep_mask

import tiny
import tlora_files
from compat_tools import hook_counts, run, scheduler_state_masks
from conftest import lycoris_rank
from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks import TLoRAError, disable_tlora, enable_tlora, get_tlora_adapters, load_tlora, unload_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE, installed_hook

SD3_LATENTS = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def test_an_exception_inside_the_forward_leaves_no_mask(rank_probe):
    pipe, kw = tiny.sd3()
    handle = enable_tlora(pipe, max_rank=8)
    group = handle.mask_groups["transformer"]
    seen = []
    boom = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: (seen.append(get_timestep_mask(group)), 1 / 0)
    )
    with pytest.raises(ZeroDivisionError):
        pipe(**kw)
    assert seen and seen[0] is not None, "the mask was set during the call"
    assert get_timestep_mask(group) is None
    boom.remove()
    rank_probe.watch("transformer", pipe.transformer)
    pipe(**kw)  # the hooks are intact and the next run is masked
    assert len(set(rank_probe.ranks())) > 1


def test_enabling_twice_replaces_the_hooks():
    pipe, _ = tiny.sdxl()
    before = hook_counts(pipe.unet)
    first = enable_tlora(pipe, max_rank=8)
    second = enable_tlora(pipe, max_rank=8, alpha=2.0)
    assert hook_counts(pipe.unet) == (before[0] + 1, before[1] + 1)
    assert first.denoisers == [] and second.denoisers == ["unet"]
    assert getattr(pipe.unet, STATE_ATTRIBUTE).adapters["default"].schedule.alpha == 2.0
    disable_tlora(pipe)
    assert hook_counts(pipe.unet) == before
    assert STATE_ATTRIBUTE not in pipe.unet.__dict__


def test_handle_is_a_context_manager_and_restores_mask_groups():
    pipe, _ = tiny.sdxl()
    modules = applied_tlora_modules(pipe.unet)
    assert {m.mask_group_id for m in modules} == {0}
    with enable_tlora(pipe, max_rank=8) as handle:
        group = handle.mask_groups["unet"]
        assert group != 0 and {m.mask_group_id for m in modules} == {group}
    assert {m.mask_group_id for m in modules} == {0}
    assert handle.denoisers == []


def test_two_pipelines_get_private_mask_groups(rank_probe):
    first, kw = tiny.sd3()
    second, _ = tiny.sd3()
    groups = (
        enable_tlora(first, max_rank=8).mask_groups["transformer"],
        enable_tlora(second, max_rank=8).mask_groups["transformer"],
    )
    assert groups[0] != groups[1]
    rank_probe.watch("first", first.transformer).watch("second", second.transformer)
    first(**kw)
    expected = [lycoris_rank(t, 1000, 8) for t in first.scheduler.timesteps]
    assert rank_probe.ranks() == expected


def test_dropping_the_pipeline_frees_it():
    pipe, kw = tiny.sd3()
    handle = enable_tlora(pipe, max_rank=8)
    pipe(**kw)
    pipe_ref, transformer_ref = weakref.ref(pipe), weakref.ref(pipe.transformer)
    del pipe
    gc.collect()
    assert pipe_ref() is None and transformer_ref() is None
    assert handle.denoisers == []
    handle.remove()  # harmless once everything is gone


def test_per_token_timesteps_take_the_noisiest_token(rank_probe):
    """Image-to-video conditioning tokens get 0; the generated ones carry t, and set the rank."""
    pipe, _ = tiny.wan("2.2_ti2v")
    pipe.scheduler.set_timesteps(4)
    enable_tlora(pipe, max_rank=8)
    rank_probe.watch("transformer", pipe.transformer)
    t = pipe.scheduler.timesteps[1]
    latents = torch.randn(2, 16, 2, 2, 2)
    per_token = torch.full((2, 2), float(t))
    per_token[:, 0] = 0.0  # first-frame tokens are clean
    pipe.transformer(hidden_states=latents, timestep=per_token, encoder_hidden_states=torch.randn(2, 8, 32))
    assert rank_probe.ranks() == [lycoris_rank(t, 1000, 8)]
    assert lycoris_rank(t, 1000, 8) != 8, "a min or mean reduction would give another rank"


def test_flux_bf16_value_snaps_to_the_scheduler_timestep():
    """869.58 reaches the transformer as bf16 0.8671875; its rank is that of int(869.58)."""
    pipe, _ = tiny.flux(rank=1000)
    handle = enable_tlora(pipe, max_rank=1000)
    hook = getattr(pipe.transformer, STATE_ATTRIBUTE)
    pipe.scheduler.timesteps = torch.tensor([1000.0, 869.5759, 500.0])
    received = (torch.tensor([869.5759]).to(torch.bfloat16) / 1000)
    assert received.item() == 0.8671875
    (mask,) = hook.masks_for(received, torch.device("cpu")).values()
    assert int(mask.sum()) == lycoris_rank(869.5759, 1000, 1000) != lycoris_rank(867.1875, 1000, 1000)
    handle.remove()


def test_mask_is_built_in_the_modules_dtype_on_the_call_device():
    pipe, _ = tiny.flux()
    handle = enable_tlora(pipe, max_rank=8, mode="lycoris")
    hook = getattr(pipe.transformer, STATE_ATTRIBUTE)
    (mask,) = hook.masks_for(torch.tensor([0.5], dtype=torch.bfloat16), torch.device("cpu")).values()
    assert mask.shape == (1, 8) and mask.dtype == applied_tlora_modules(pipe.transformer)[0].lambda_layer.dtype
    handle.remove()


# -- nested `with` blocks: an error, never an unmasked rest of the outer block ----------------------------------------
def test_an_inner_with_block_on_the_same_denoiser_raises_and_the_outer_stays_masked(rank_probe):
    pipe, kw = tiny.sdxl(steps=3)
    rank_probe.watch("unet", pipe.unet)
    with enable_tlora(pipe, max_rank=8) as outer:
        before = (hook_counts(pipe.unet), getattr(pipe.unet, STATE_ATTRIBUTE))
        with pytest.raises(TLoRAError, match="open `with enable_tlora"):
            with enable_tlora(pipe, max_rank=8, alpha=2.0):
                pass
        with pytest.raises(TLoRAError, match="open `with enable_tlora"):
            enable_tlora(pipe, max_rank=8, alpha=2.0)  # a plain call would replace the block's hooks too
        assert (hook_counts(pipe.unet), getattr(pipe.unet, STATE_ATTRIBUTE)) == before
        pipe(**kw)  # the rest of the outer block: still masked, with its own schedule
        assert outer.denoisers == ["unet"]
    expected = [lycoris_rank(t, 1000, 8) for t in pipe.scheduler.timesteps]
    assert rank_probe.ranks() == expected and len(set(expected)) > 1
    enable_tlora(pipe, max_rank=8, alpha=2.0).remove()  # after the block, enabling works again


def _sd3_file_and_outputs(tmp_path, schedules):
    """A perturbed T-LoRA file, and LyCORIS's own output for it (its mask set from the scheduler's step) under each
    schedule."""
    trained, _ = tiny.sd3(rank=None)
    path = tlora_files.simpletuner_file(tiny.add_tlora(trained.transformer, 8), tmp_path / "t.safetensors")
    reference, kw = tiny.sd3(rank=None, steps=3)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, reference.transformer)
    network.apply_to()
    outputs = {}
    for schedule in schedules:
        with scheduler_state_masks(reference, schedule):
            outputs[schedule] = run(reference, kw, SD3_LATENTS)
    return path, outputs


@pytest.mark.parametrize("mode", ["fold", "low_memory", "lycoris"])
@pytest.mark.parametrize("before", ["enable_tlora", "load_tlora"])
def test_a_with_block_over_earlier_hooks_puts_them_back_at_its_end(tmp_path, before, mode):
    """A plain `enable_tlora` or a `load_tlora` before the block: its hooks come back after it, or the rest of the
    run would be unmasked (all ranks at every step)."""
    outer, inner = (8, 2, 0.5), (8, 1, 1.0)
    path, expected = _sd3_file_and_outputs(tmp_path, [outer, inner])
    assert not torch.equal(expected[outer], expected[inner])
    pipe, kw = tiny.sd3(rank=None, steps=3)
    if before == "load_tlora":
        load_tlora(pipe, path, min_rank=2, alpha=0.5, mode=mode)
    else:
        with lycoris_without_gc():
            network, _ = create_lycoris_from_weights(1.0, path, pipe.transformer)
        network.apply_to()
        enable_tlora(pipe, *outer, mode=mode)
    adapters = get_tlora_adapters(pipe)
    with enable_tlora(pipe, *inner, mode=mode) as block:
        assert block.denoisers == ["transformer"]
        torch.testing.assert_close(run(pipe, kw, SD3_LATENTS), expected[inner], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(pipe, kw, SD3_LATENTS), expected[outer], atol=1e-5, rtol=1e-5)
    assert get_tlora_adapters(pipe) == adapters, "the same adapters, settings and mask groups as before the block"
    with enable_tlora(pipe, *inner, mode=mode):
        disable_tlora(pipe)
        handle = enable_tlora(pipe, *inner, mode=mode)  # hooks enabled inside the block are the latest word
    assert handle.denoisers == ["transformer"]
    assert get_tlora_adapters(pipe)["transformer"]["default"].schedule.alpha == inner[2]


def test_a_with_block_does_not_bring_back_hooks_of_an_adapter_unloaded_inside_it(tmp_path):
    path, _ = _sd3_file_and_outputs(tmp_path, [])
    pipe, kw = tiny.sd3(rank=None, steps=3)
    plain = run(pipe, kw, SD3_LATENTS)
    load_tlora(pipe, path)
    with enable_tlora(pipe, max_rank=8):
        unload_tlora(pipe)
    assert installed_hook(pipe.transformer) is None and not applied_tlora_modules(pipe.transformer)
    assert torch.equal(run(pipe, kw, SD3_LATENTS), plain)


@pytest.mark.parametrize("mode", ["fold", "low_memory"])
def test_deep_copying_a_hooked_denoiser_raises_and_a_copy_made_after_disabling_works(tmp_path, mode):
    """The copy's hooks would act on the original's state, and the fold leaves a delta in the copied weights."""
    schedule = (8, 2, 0.5)
    path, expected = _sd3_file_and_outputs(tmp_path, [schedule])
    pipe, kw = tiny.sd3(rank=None, steps=3)
    load_tlora(pipe, path, min_rank=2, alpha=0.5, mode=mode)
    run(pipe, kw, SD3_LATENTS)
    for target in (pipe.transformer, pipe):
        with pytest.raises(TLoRAError, match="copy.deepcopy of transformer while T-LoRA hooks are on it"):
            copy.deepcopy(target)
    torch.testing.assert_close(run(pipe, kw, SD3_LATENTS), expected[schedule], atol=1e-5, rtol=1e-5)
    disable_tlora(pipe)  # what the message says: copy without the hooks, then enable each
    copied = copy.deepcopy(pipe)
    for each in (pipe, copied):
        enable_tlora(each, *schedule, mode=mode)
    for each in (copied, pipe):
        torch.testing.assert_close(run(each, kw, SD3_LATENTS), expected[schedule], atol=1e-5, rtol=1e-5)
    originals = set(map(id, applied_tlora_modules(pipe.transformer)))
    assert originals and not originals & set(map(id, applied_tlora_modules(copied.transformer)))


def test_plain_repeated_enables_still_replace_and_blocks_on_other_denoisers_are_independent():
    pipe, _ = tiny.wan("2.2_a14b")
    enable_tlora(pipe, max_rank=8)
    enable_tlora(pipe, max_rank=8, alpha=2.0)  # no `with`: replaces, as documented
    with enable_tlora(pipe, max_rank=8, components=["transformer"]) as high:
        with enable_tlora(pipe, max_rank=8, min_rank=3, components=["transformer_2"]) as low:
            assert high.denoisers == ["transformer"] and low.denoisers == ["transformer_2"]
        assert high.denoisers == ["transformer"], "the inner block ended only its own denoiser's hooks"
    for denoiser in (pipe.transformer, pipe.transformer_2):  # each block put back the plain enable's hooks
        assert installed_hook(denoiser).adapters["default"].schedule.alpha == 2.0 and installed_hook(denoiser).active
