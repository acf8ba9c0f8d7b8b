"""docs/audit.md, the cells no other file covers: each user action that touches the denoiser's weights or hooks,
in each mode, gives LyCORIS's own masked output for what the user has, or raises TLoRAError.

The reference is a twin tiny SD3 pipeline with the same action applied and LyCORIS's own forward, its mask set from
the scheduler's own step around every call (`scheduler_state_masks`). Where LyCORIS's default forward cannot run on
the layer (quantized weights) the reference is LyCORIS's own bypass forward (`bypass_mode`), its math for such layers.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from compat_tools import run, scheduler_state_masks
from devtools.measure import relative_error
from tlora_hooks import TLoRAError, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules

MODES = ("fold", "low_memory", "lycoris")
SCHEDULE = (8, 1, 1.0)
TOLERANCE = 2e-5


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def reference(action=None, *, bypass: bool = False) -> torch.Tensor:
    """The twin pipeline's output with `action(pipe)` applied, LyCORIS's own forward, masked by the scheduler."""
    pipe, kw = tiny.sd3(steps=3)
    if action is not None:
        action(pipe)
    for module in applied_tlora_modules(pipe.transformer):
        module.bypass_mode = bypass or module.bypass_mode
    with scheduler_state_masks(pipe, SCHEDULE):
        return run(pipe, kw, latents())


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert relative_error(out, expected) <= TOLERANCE, f"relative error {relative_error(out, expected):.2e}"


def enabled_and_run_once(mode: str):
    """A tiny SD3 with T-LoRA enabled in `mode`, after one call (the fold then holds W0 + that call's delta)."""
    pipe, kw = tiny.sd3(steps=3)
    handle = enable_tlora(pipe, *SCHEDULE, mode=mode)
    run(pipe, kw, latents())
    return pipe, kw, handle


# -- set_adapters ---------------------------------------------------------------------------------------------------
def peft_at_half(pipe) -> None:
    pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
    pipe.set_adapters(["style"], [0.5])


@pytest.mark.parametrize("mode", MODES)
def test_set_adapters_after_enabling(mode):
    pipe, kw, _ = enabled_and_run_once(mode)
    peft_at_half(pipe)
    assert_matches(run(pipe, kw, latents()), reference(peft_at_half))
    pipe.disable_lora()
    assert_matches(run(pipe, kw, latents()), reference(lambda p: (peft_at_half(p), p.disable_lora())))


# -- offloading set up after enabling --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_model_cpu_offload_after_enabling(mode):
    pipe, kw, _ = enabled_and_run_once(mode)
    pipe.enable_model_cpu_offload(device="cpu")
    expected = reference()
    for _ in range(2):
        assert_matches(run(pipe, kw, latents()), expected)


def test_fold_follows_weights_moved_away_and_back():
    """What accelerate's model offload does on a GPU between calls: each layer gets a new tensor with its values."""
    pipe, kw, _ = enabled_and_run_once("fold")
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.data = parameter.data.clone()
    assert_matches(run(pipe, kw, latents()), reference())


@pytest.mark.parametrize("mode", MODES)
def test_group_offloading_after_enabling(mode):
    """Without streams, group offloading moves the weights themselves, which the fold follows."""
    from diffusers.hooks import apply_group_offloading

    def offload(pipe) -> None:
        apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"), offload_type="leaf_level")

    pipe, kw, _ = enabled_and_run_once(mode)
    offload(pipe)
    assert_matches(run(pipe, kw, latents()), reference(offload))


def test_group_offloading_that_keeps_copies_after_folding_raises():
    """With CUDA streams (or a disk path) group offloading loads its own copies, taken when it was applied, into the
    layers: the fold's writes would never reach them. Its hook on the denoiser is what the fold looks for."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe, kw, _ = enabled_and_run_once("fold")
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(
        ModelHook(), "lazy_prefetch_group_offloading"
    )
    with pytest.raises(TLoRAError, match="Group offloading with streams .* after enable_tlora chose mode 'fold'"):
        run(pipe, kw, latents())


def test_weights_offloaded_to_meta_after_folding_raise():
    """Sequential offload leaves meta tensors in the layers: the fold refuses them rather than fold into nothing."""
    pipe, kw, _ = enabled_and_run_once("fold")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(TLoRAError, match="offloaded or quantized after enable_tlora"):
        run(pipe, kw, latents())


# -- layerwise casting ------------------------------------------------------------------------------------------------
def fp8_storage(pipe) -> None:
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(pipe.transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_layerwise_casting_before_enabling(mode):
    pipe, kw = tiny.sd3(steps=3)
    fp8_storage(pipe)
    with enable_tlora(pipe, *SCHEDULE, mode=mode) as handle:
        assert "fold" not in handle.mode["transformer"], "fp8 weights are never folded"
        assert_matches(run(pipe, kw, latents()), reference(fp8_storage))


@pytest.mark.parametrize("mode", MODES)
def test_layerwise_casting_after_enabling(mode):
    pipe, kw, _ = enabled_and_run_once(mode)
    fp8_storage(pipe)
    if mode == "fold":
        with pytest.raises(TLoRAError, match="offloaded or quantized after enable_tlora"):
            run(pipe, kw, latents())
        return
    assert_matches(run(pipe, kw, latents()), reference(fp8_storage))


# -- quantization -----------------------------------------------------------------------------------------------------
def int8_weights(pipe) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(pipe.transformer, Int8WeightOnlyConfig())


@pytest.mark.parametrize("mode", ["auto", "fold", "low_memory"])
def test_torchao_quantized_before_enabling_runs_beside_the_weights(mode):
    pytest.importorskip("torchao")
    pipe, kw = tiny.sd3(steps=3)
    int8_weights(pipe)
    handle = enable_tlora(pipe, *SCHEDULE, mode=mode)
    assert handle.mode == {"transformer": "low_memory"}, "quantized layers are never folded"
    assert_matches(run(pipe, kw, latents()), reference(int8_weights, bypass=True))


def test_torchao_quantized_after_folding_raises():
    pytest.importorskip("torchao")
    pipe, kw, _ = enabled_and_run_once("fold")
    int8_weights(pipe)  # quantize_ read W0 + the last call's delta
    with pytest.raises(TLoRAError, match="quantized after enable_tlora .* while they held W0 plus the T-LoRA delta"):
        run(pipe, kw, latents())


def test_torchao_quantized_after_enabling_low_memory():
    pytest.importorskip("torchao")
    pipe, kw, _ = enabled_and_run_once("low_memory")
    int8_weights(pipe)
    assert_matches(run(pipe, kw, latents()), reference(int8_weights, bypass=True))


def test_bitsandbytes_int8_layers_run_beside_their_weights():
    """bitsandbytes' Linear8bitLt, as diffusers' BitsAndBytesConfig loads it: LyCORIS itself runs it in bypass mode."""
    bnb = pytest.importorskip("bitsandbytes")

    def int8_layers(denoiser) -> None:
        for name, module in list(denoiser.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and "transformer_blocks" in f"{name}.{child_name}":
                    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                                has_fp16_weights=False)
                    layer.load_state_dict(child.state_dict())
                    setattr(module, child_name, layer.to("cpu"))

    def build():
        pipe, kw = tiny.sd3(steps=3, rank=None)
        int8_layers(pipe.transformer)
        tiny.add_tlora(pipe.transformer, 8)
        return pipe, kw

    ref, kw = build()
    assert all(module.bypass_mode for module in applied_tlora_modules(ref.transformer) if module.is_quant)
    with scheduler_state_masks(ref, SCHEDULE):
        expected = run(ref, kw, latents())
    for mode in ("auto", "low_memory"):
        pipe, kw = build()
        with enable_tlora(pipe, *SCHEDULE, mode=mode) as handle:
            assert "fold" not in handle.mode["transformer"]
            assert_matches(run(pipe, kw, latents()), expected)


# -- from_pipe --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_from_pipe_shares_the_hooks_in_every_mode(mode):
    from diffusers import StableDiffusion3Pipeline

    pipe, kw, _ = enabled_and_run_once(mode)
    other = StableDiffusion3Pipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.transformer is pipe.transformer
    assert_matches(run(other, kw, latents()), reference())
