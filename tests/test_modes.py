"""Every fast mode against LyCORIS's own masked forward (`mode="lycoris"`), call by call, and exact restore."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import tiny
from devtools.measure import KernelCounter, relative_error
from tlora_hooks import disable_tlora, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules

FAST_MODES = ("low_memory", "fold", "auto")


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, tuple) else output.sample


def clone_tree(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return value


def record_calls(pipe, denoiser, kw):
    """Run the pipeline once; return every denoiser call's (args, kwargs, output)."""
    calls = []
    pre = denoiser.register_forward_pre_hook(
        lambda m, a, k: calls.append([clone_tree(a), clone_tree(k), None]), with_kwargs=True
    )
    post = denoiser.register_forward_hook(
        lambda m, a, k, o: calls[-1].__setitem__(2, first_tensor(o).detach().clone()), with_kwargs=True
    )
    with torch.no_grad():
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    pre.remove()
    post.remove()
    return calls


def replay(denoiser, calls):
    """The same calls again, one by one (the hooks mask each from its own timestep)."""
    with torch.no_grad():
        return [first_tensor(denoiser(*args, **kwargs)).clone() for args, kwargs, _ in calls]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_bit_identical(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


def build(family: str, dtype: torch.dtype):
    if family == "sdxl":
        pipe, kw = tiny.sdxl()
        if dtype != torch.float32:  # LyCORIS modules stay fp32, as when loaded from a file
            pipe.to(dtype)
            kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return pipe, kw, pipe.unet
    pipe, kw = tiny.flux(dtype=dtype)
    return pipe, kw, pipe.transformer


# Relative to the output's largest value. bf16: the fast modes round W0 + ΔW (or the delta) once, LyCORIS rounds ΔW
# and W0 + ΔW separately; seen: 1.1e-2 (SDXL), 5.5e-3 (Flux), while unmasking moves the outputs by 5.6 % and 3.5 %.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_every_mode_matches_lycoris_call_by_call(family, dtype):
    pipe, kw, denoiser = build(family, dtype)
    before = snapshot(denoiser)
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(pipe, denoiser, kw)
    reference = [output for _, _, output in calls]
    tolerance = TOLERANCE[dtype]
    # Unmasked (every rank at every call) must be far outside the tolerance, or the comparison proves nothing.
    unmasked = replay(denoiser, calls)
    assert max(relative_error(u, r) for u, r in zip(unmasked, reference)) > 2 * tolerance

    for mode in FAST_MODES:
        handle = enable_tlora(pipe, max_rank=8, mode=mode)
        outputs = replay(denoiser, calls)
        if mode != "low_memory":
            assert "fold" in next(iter(handle.mode.values())), handle.mode
        handle.remove()
        for step, (out, ref) in enumerate(zip(outputs, reference)):
            error = relative_error(out, ref)
            assert error <= tolerance, f"{mode}, call {step}: relative error {error:.2e}"
        assert_bit_identical(denoiser, before)


def test_modules_of_smaller_rank_read_the_first_ranks_of_the_mask():
    """LyCORIS truncates the (1, max_rank) mask to each module's own rank; the fast modes must too."""
    pipe, kw = tiny.sdxl(rank=None)
    tiny.add_tlora(pipe.unet, 8, targets=("Attention",), seed=1)
    tiny.add_tlora(pipe.unet, 4, targets=("FeedForward",), seed=2)
    assert {m.lora_dim for m in applied_tlora_modules(pipe.unet)} == {4, 8}
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(pipe, pipe.unet, kw)
    for mode in ("low_memory", "fold"):
        with enable_tlora(pipe, max_rank=8, mode=mode):
            outputs = replay(pipe.unet, calls)
        for out, (_, _, ref) in zip(outputs, calls):
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_fold_restores_weights_bit_identical_in_their_own_storage_and_lycoris_works_after():
    pipe, kw = tiny.sdxl()
    unet = pipe.unet
    modules = applied_tlora_modules(unet)
    parameters = {name: p for name, p in unet.named_parameters()}
    before = snapshot(unet)
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        reference = record_calls(pipe, unet, kw)

    handle = enable_tlora(pipe, max_rank=8, mode="fold")
    replay(unet, reference)
    assert handle.mode == {"unet": "fold"}
    disable_tlora(pipe)

    assert_bit_identical(unet, before)
    assert dict(unet.named_parameters()) == parameters, "the same Parameter objects"
    for module in modules:
        weight = module.org_module[0].weight
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size(), "not a view of a stack"
        assert module.org_module[0].__dict__["forward"] == module.forward, "LyCORIS is back in the layer's forward"
    assert applied_tlora_modules(unet) == modules
    # LyCORIS's own forward runs again, with the mask: same outputs as before the fold.
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        again = replay(unet, reference)
    for out, (_, _, ref) in zip(again, reference):
        assert torch.equal(out, ref)


def test_low_memory_never_touches_the_weights():
    pipe, kw = tiny.flux()
    transformer = pipe.transformer
    before = snapshot(transformer)
    handle = enable_tlora(pipe, max_rank=8, mode="low_memory")
    pipe(**kw)
    assert_bit_identical(transformer, before)  # during use, not only after
    handle.remove()
    assert_bit_identical(transformer, before)
    for module in applied_tlora_modules(transformer):
        assert "bypass_forward" not in module.__dict__ and not module.bypass_mode


def test_extra_memory_is_reported():
    pipe, kw = tiny.sdxl()
    modules = applied_tlora_modules(pipe.unet)
    weight_bytes = sum(m.org_module[0].weight.numel() * 4 for m in modules)
    factor_bytes = sum(2 * m.lora_dim * (m.shape[0] + m.shape[1]) * 4 for m in modules)  # A (2r, in), B (out, 2r)

    fold = enable_tlora(pipe, max_rank=8, mode="fold")
    assert fold.extra_memory_bytes == weight_bytes + factor_bytes
    low = enable_tlora(pipe, max_rank=8, mode="low_memory")
    pipe(**kw)  # the bypass builds its factors on the first call
    # plus the unmasked copy of the thinner factor (2r values per row of the narrower side), masked per call
    masked_copy_bytes = sum(2 * m.lora_dim * min(m.shape[0], m.shape[1]) * 4 for m in modules)
    assert low.extra_memory_bytes == factor_bytes + masked_copy_bytes
    assert fold.extra_memory_bytes == 0, "replaced handles report nothing"
    low.remove()


def test_auto_folds_from_the_first_call_and_every_run_is_the_same():
    """The path is chosen at enable time: the first run after enabling gives the same bits as the next."""
    pipe, kw = tiny.sdxl()
    handle = enable_tlora(pipe, max_rank=8)
    assert handle.mode == {"unet": "fold"}
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    first = pipe(**kw, latents=latents.clone(), return_dict=False)[0]
    assert torch.equal(pipe(**kw, latents=latents.clone(), return_dict=False)[0], first)
    handle.remove()


def test_auto_uses_low_memory_when_memory_is_short(monkeypatch):
    from tlora_hooks.modes import auto

    monkeypatch.setattr(auto, "memory_info", lambda device: (1 << 10, 1 << 30))
    pipe, kw = tiny.sdxl()
    with enable_tlora(pipe, max_rank=8) as handle:
        pipe(**kw)
        assert handle.mode == {"unet": "low_memory"}


def test_auto_uses_low_memory_for_fp8_weights_cast_by_hooks():
    """diffusers layerwise casting stores weights in fp8 and upcasts them inside each call: nothing to fold."""
    from diffusers.hooks import apply_layerwise_casting

    pipe, kw = tiny.sdxl()
    apply_layerwise_casting(pipe.unet, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = snapshot(pipe.unet)
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(pipe, pipe.unet, kw)
    with enable_tlora(pipe, max_rank=8) as handle:
        outputs = replay(pipe.unet, calls)
        assert handle.mode == {"unet": "low_memory"}
    for out, (_, _, ref) in zip(outputs, calls):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert_bit_identical(pipe.unet, before)


def test_auto_uses_low_memory_under_an_offloading_hook():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    pipe, kw = tiny.sdxl()
    add_hook_to_module(pipe.unet, ModelHook())
    with enable_tlora(pipe, max_rank=8) as handle:
        assert handle.mode == {"unet": "low_memory"}
    remove_hook_from_module(pipe.unet)


def test_fast_paths_under_autocast_match_lycoris():
    """fp32 weights and factors, bf16 compute: the bypass must not add an fp32 product into a bf16 output in place."""
    pipe, kw = tiny.sdxl()
    outputs = {}
    for mode in ("lycoris",) + FAST_MODES:
        with enable_tlora(pipe, max_rank=8, mode=mode), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[mode] = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    reference = outputs.pop("lycoris")
    assert reference.dtype == torch.bfloat16
    for mode, out in outputs.items():
        assert relative_error(out, reference) <= TOLERANCE[torch.bfloat16], mode


@pytest.mark.parametrize("mode", ["fold", "low_memory"])
def test_fast_paths_follow_weights_moved_after_enabling(mode, caplog):
    """`pipe.to(dtype)` after enable_tlora gives the layers new tensors (fold must write into those) in a new dtype
    (the bypass must compute in it)."""
    pipe, fp32_kw = tiny.sdxl()
    reference_pipe, _ = tiny.sdxl()
    reference_pipe.to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in fp32_kw.items()}
    with enable_tlora(reference_pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(reference_pipe, reference_pipe.unet, kw)
    expected = snapshot(reference_pipe.unet)

    handle = enable_tlora(pipe, max_rank=8, mode=mode)
    pipe(**fp32_kw)  # the paths are built in fp32
    pipe.to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="tlora_hooks"):
        outputs = replay(pipe.unet, calls)
    handle.remove()
    assert "after enable_tlora" in caplog.text
    assert "converting them on every" not in caplog.text, "the bypass must rebuild its factors, not convert per call"
    for out, (_, _, ref) in zip(outputs, calls):
        assert relative_error(out, ref) <= TOLERANCE[torch.bfloat16]
    assert_bit_identical(pipe.unet, expected)


def test_first_call_under_inference_mode_then_under_no_grad():
    """Buffers made inside `torch.inference_mode()` could not be updated outside it."""
    pipe, kw = tiny.flux()
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(pipe, pipe.transformer, kw)
    for mode in FAST_MODES:
        with enable_tlora(pipe, max_rank=8, mode=mode):
            with torch.inference_mode():
                replay(pipe.transformer, calls[:2])
            outputs = replay(pipe.transformer, calls)
        for out, (_, _, ref) in zip(outputs, calls):
            assert relative_error(out, ref) <= TOLERANCE[torch.bfloat16]


def test_low_memory_layer_runs_its_own_ops_plus_two_matmuls():
    """No per-layer mask multiply (the group's factor is masked once per call) and never LyCORIS's ΔW rebuild;
    outside a denoiser call the layer gives LyCORIS's unmasked output."""
    pipe, kw = tiny.sdxl()
    module = applied_tlora_modules(pipe.unet)[0]
    layer = module.org_module[0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmasked = layer(x)  # LyCORIS's forward, no mask set: every rank
        with KernelCounter() as plain:
            module.org_forward(x)
        with enable_tlora(pipe, max_rank=8, mode="low_memory"):
            pipe(**kw)
            with KernelCounter() as bypassed:
                out = layer(x)
    assert bypassed.ops - plain.ops == Counter({"aten.mm": 1, "aten.addmm_": 1})
    assert plain.ops - bypassed.ops == Counter()
    torch.testing.assert_close(out, unmasked, atol=2e-6, rtol=2e-5)


def test_low_memory_keeps_hooks_that_wrap_the_layers_after_enabling():
    """Sequential offload wraps every layer's forward; enabling before it and disabling after must leave the
    wrappers in place (an offloaded layer called without its hook has no weights)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    pipe, kw = tiny.sdxl()
    layers = [module.org_module[0] for module in applied_tlora_modules(pipe.unet)]
    handle = enable_tlora(pipe, max_rank=8, mode="low_memory")
    for layer in layers:
        add_hook_to_module(layer, Counting())
    pipe(**kw)
    during = Counting.calls
    handle.remove()
    pipe(**kw)
    assert during > 0 and Counting.calls == 2 * during


def test_low_memory_behind_per_layer_hooks_goes_through_lycoris_bypass_branch():
    """Where a hook wraps the layer's forward (sequential offload does), the bypass runs from LyCORIS's forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    pipe, kw = tiny.sdxl()
    unet = pipe.unet
    with enable_tlora(pipe, max_rank=8, mode="lycoris"):
        calls = record_calls(pipe, unet, kw)
    layers = [module.org_module[0] for module in applied_tlora_modules(unet)]
    for layer in layers:
        add_hook_to_module(layer, ModelHook())
    with enable_tlora(pipe, max_rank=8, mode="low_memory"):
        assert all(module.bypass_mode for module in applied_tlora_modules(unet))
        outputs = replay(unet, calls)
    for layer in layers:
        remove_hook_from_module(layer)
    for out, (_, _, ref) in zip(outputs, calls):
        assert relative_error(out, ref) <= TOLERANCE[torch.float32]
    assert not any(module.bypass_mode for module in applied_tlora_modules(unet))
