"""Engines that wrap the denoiser: xDiT replaces it with a wrapper whose forward runs its blocks (hooks on the
original never run), ParaAttention rebinds its `forward` (hooks still run, on the full inputs).

xFuser does not import without a GPU ("No Accelerators available"), so xDiT is covered by a stand-in that replaces
`pipe.transformer` and wraps each block's `attn` as `xFuserFluxTransformer2DWrapper` does (its PipeFusion stages
and scheduler wrapper are left out). ParaAttention runs on the CPU: a stand-in covers it everywhere, and the real
`parallelize_pipe` runs on two gloo processes where `para_attn` is installed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tiny
from conftest import RankProbe
from process_group import init_gloo, run_ranks
from tlora_hooks import TLoRAError, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import installed_hook

SCHEDULE = (8, 1, 1.0)


class XDiTStyleWrapper(nn.Module):
    """What xDiT's `xFuserTransformerBaseWrapper` puts in `pipe.transformer`: a module holding the transformer as
    `module`, reading unknown attributes from it, whose forward (same signature as xFuser's Flux wrapper) runs the
    transformer's blocks itself. Here it runs the transformer's own forward function without `__call__`, so, as
    with xDiT, the transformer's hooks never run while its blocks and layers do."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.module = transformer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None,
                txt_ids=None, guidance=None, joint_attention_kwargs=None, return_dict=True):
        return type(self.module).forward(
            self.module, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, joint_attention_kwargs=joint_attention_kwargs, return_dict=return_dict,
        )


class XDiTStyleAttentionWrapper(XDiTStyleWrapper):
    """What xFuser's attention wrapper puts in each block's `attn`: the attention as `module`, its processor called
    with the wrapper as `attn`, so the attention's own `__call__` never runs while its projections (the T-LoRA
    layers) do, reached through the wrapper."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        return self.module.processor(self, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                     **kwargs)


def xdit_parallel(pipe) -> None:
    """`xFuserPipelineBaseWrapper.__init__`: `pipeline.transformer = wrapper(transformer)`, where the Flux wrapper
    has wrapped every submodule named `attn` first (`submodule_name_to_wrap=["attn"]`)."""
    transformer = pipe.transformer
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn = XDiTStyleAttentionWrapper(block.attn)
    pipe.transformer = XDiTStyleWrapper(transformer)


def attention_wrappers(wrapper: nn.Module) -> list[XDiTStyleAttentionWrapper]:
    return [module for module in wrapper.modules() if isinstance(module, XDiTStyleAttentionWrapper)]


def xdit_unwrap(pipe) -> None:
    transformer = pipe.transformer.module
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn = block.attn.module
    pipe.transformer = transformer


def paraattention_parallelize(transformer: nn.Module) -> None:
    """`para_attn`'s `parallelize_transformer`: the instance's `forward` rebound to one that splits the inputs,
    calls the original forward and gathers the output (one process here: nothing to split)."""
    original_forward = transformer.forward

    @functools.wraps(transformer.__class__.forward)
    def new_forward(self, hidden_states, encoder_hidden_states=None, *args, timestep=None, **kwargs):
        return original_forward(hidden_states, encoder_hidden_states, *args, timestep=timestep, **kwargs)

    transformer.forward = new_forward.__get__(transformer)


def flux_latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))


def run(pipe, kw) -> torch.Tensor:
    return pipe(**kw, latents=flux_latents(), return_dict=False)[0]


@pytest.fixture(scope="module")
def plain():
    """The hooked tiny Flux with nothing wrapped: ranks per call (LyCORIS's forward) and the default mode's output."""
    pipe, kw = tiny.flux(dtype=torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        probe = RankProbe(patch).watch("transformer", pipe.transformer)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        masked = run(pipe, kw)
        ranks = probe.ranks()
        probe.close()
    enable_tlora(pipe, *SCHEDULE)
    assert len(set(ranks)) > 1
    return ranks, masked, run(pipe, kw)


@pytest.mark.parametrize("mode", ["auto", "low_memory", "lycoris"])
def test_xdit_wrapping_after_enable_raises_on_the_next_call(mode, plain):
    """The original transformer's hooks never run: the first block raises instead of running unmasked (or, in
    the fold mode, with the previous call's mask). Unwrapping gives the masked output again."""
    _, _, expected = plain
    pipe, kw = tiny.flux(dtype=torch.float32)
    enable_tlora(pipe, *SCHEDULE, mode=mode)
    masked = run(pipe, kw)
    xdit_parallel(pipe)
    advice = r"ran outside a call of FluxTransformer2DModel.* enable_tlora\(pipe, \.\.\.\) again after wrapping"
    with pytest.raises(TLoRAError, match=advice):
        run(pipe, kw)
    xdit_unwrap(pipe)
    torch.testing.assert_close(run(pipe, kw), masked, atol=0, rtol=0)
    if mode == "auto":
        torch.testing.assert_close(masked, expected, atol=0, rtol=0)


def test_enable_after_xdit_wrapping_hooks_the_wrapper(plain, caplog):
    """enable_tlora(pipe) after wrapping hooks the module the pipeline calls, read as the transformer it wraps."""
    ranks, masked, expected = plain
    pipe, kw = tiny.flux(dtype=torch.float32)
    xdit_parallel(pipe)
    attention = attention_wrappers(pipe.transformer)
    assert all(applied_tlora_modules(wrapper.module) for wrapper in attention), "T-LoRA layers inside each attn"
    attention_calls = []
    for wrapper in attention:
        wrapper.register_forward_pre_hook(lambda module, args: attention_calls.append(module))
    with pytest.MonkeyPatch.context() as patch:
        probe = RankProbe(patch).watch("transformer", pipe.transformer)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        torch.testing.assert_close(run(pipe, kw), masked, atol=0, rtol=0)
        assert probe.ranks() == ranks
        probe.close()
    assert len(attention_calls) == len(attention) * len(ranks), "every call ran through the attention wrappers"
    assert "XDiTStyleWrapper wrapping a FluxTransformer2DModel" in caplog.text
    handle = enable_tlora(pipe, *SCHEDULE)
    assert installed_hook(pipe.transformer) is not None and handle.mode == {"transformer": "fold"}
    torch.testing.assert_close(run(pipe, kw), expected, atol=0, rtol=0)


def test_loaded_before_wrapping_then_enabled_again_after(plain, tmp_path):
    """The xDiT recipe: load_tlora on the stock pipeline, wrap, enable_tlora again: the hooks move to the wrapper."""
    from tlora_files import simpletuner_file
    from tlora_hooks import load_tlora

    path = simpletuner_file(tiny.add_tlora(tiny.flux_transformer(), 8), tmp_path / "flux.safetensors")
    pipe, kw = tiny.flux(dtype=torch.float32, rank=None)
    load_tlora(pipe, path, min_rank=1, alpha=1.0)
    loaded = run(pipe, kw)
    inner = pipe.transformer
    xdit_parallel(pipe)
    enable_tlora(pipe, max_rank=None, min_rank=1, alpha=1.0)
    assert installed_hook(inner) is None and installed_hook(pipe.transformer) is not None
    torch.testing.assert_close(run(pipe, kw), loaded, atol=0, rtol=0)


def test_load_after_xdit_wrapping_says_to_load_before(tmp_path):
    """The file names the stock layers, whose paths the wrapper changes: load_tlora after wrapping raises saying
    to load before wrapping and enable after, and leaves the pipeline as it was."""
    from tlora_files import simpletuner_file
    from tlora_hooks import load_tlora

    path = simpletuner_file(tiny.add_tlora(tiny.flux_transformer(), 8), tmp_path / "flux.safetensors")
    pipe, kw = tiny.flux(dtype=torch.float32, rank=None)
    xdit_parallel(pipe)
    before = run(pipe, kw)
    with pytest.raises(TLoRAError, match=r"wrapping the FluxTransformer2DModel this file was made for .*Call "
                       r"load_tlora\(pipe, path\) before wrapping the pipeline, then enable_tlora"):
        load_tlora(pipe, path, min_rank=1, alpha=1.0)
    assert applied_tlora_modules(pipe.transformer) == [] and installed_hook(pipe.transformer) is None
    torch.testing.assert_close(run(pipe, kw), before, atol=0, rtol=0)


def test_enable_on_the_wrapped_transformer_itself_raises_at_the_call():
    """Hooks on the inner module of an xDiT-style wrapper never run: the call raises."""
    pipe, kw = tiny.flux(dtype=torch.float32)
    xdit_parallel(pipe)
    enable_tlora(pipe.transformer.module, *SCHEDULE, scheduler=pipe.scheduler)
    with pytest.raises(TLoRAError, match="ran outside a call"):
        run(pipe, kw)


def test_blocks_recomputed_by_gradient_checkpointing_do_not_raise():
    """Checkpointing re-runs blocks during backward, after the call: that is not a bypass."""
    pipe, _ = tiny.flux(dtype=torch.float32)
    transformer = pipe.transformer
    transformer.enable_gradient_checkpointing()
    transformer.train()
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    hidden = torch.randn(1, 4, 4, requires_grad=True)
    output = transformer(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 8, 32),
                         pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                         img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                         return_dict=False)[0]
    output.square().mean().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("order", ["enable_then_parallelize", "parallelize_then_enable"])
def test_paraattention_style_rebinding_keeps_the_hooks(order, plain):
    ranks, masked, expected = plain
    pipe, kw = tiny.flux(dtype=torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        probe = RankProbe(patch).watch("transformer", pipe.transformer)
        if order == "parallelize_then_enable":
            paraattention_parallelize(pipe.transformer)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        if order == "enable_then_parallelize":
            paraattention_parallelize(pipe.transformer)
        torch.testing.assert_close(run(pipe, kw), masked, atol=0, rtol=0)
        assert probe.ranks() == ranks
        probe.close()
    enable_tlora(pipe, *SCHEDULE)
    torch.testing.assert_close(run(pipe, kw), expected, atol=0, rtol=0)


# -- the real ParaAttention, two gloo processes --------------------------------------------------------------------
ORDERS = ("enable_then_parallelize", "parallelize_then_enable")


def without_enable_gqa(ulysses_attn_func):
    """para-attn 0.3.38 intercepts scaled_dot_product_attention but rejects the `enable_gqa` keyword that diffusers
    0.42 passes to it (always False for Flux): drop it, refusing True (the recipe in docs/scale-out.md)."""

    def ulysses(*args, enable_gqa=False, **kwargs):
        if enable_gqa:
            raise NotImplementedError("para-attn's Ulysses attention has no grouped-query attention")
        return ulysses_attn_func(*args, **kwargs)

    return ulysses


def paraattention_rank(rank: int, world_size: int) -> dict:
    import para_attn.para_attn_interface as para_attn_interface
    from para_attn.context_parallel.diffusers_adapters import parallelize_pipe

    para_attn_interface.ulysses_attn_func = without_enable_gqa(para_attn_interface.ulysses_attn_func)
    init_gloo(rank, world_size)
    results = {}
    for order in ORDERS:  # one job for both: a job costs seconds of imports
        pipe, kw = tiny.flux(dtype=torch.float32)
        root, block = [], []
        pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: root.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True
        )
        pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: block.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
        )
        with pytest.MonkeyPatch.context() as patch:
            probe = RankProbe(patch).watch("transformer", pipe.transformer)
            if order == "parallelize_then_enable":
                parallelize_pipe(pipe)
            enable_tlora(pipe, *SCHEDULE, mode="lycoris")
            if order == "enable_then_parallelize":
                parallelize_pipe(pipe)
            masked = run(pipe, kw)
            results[order] = {"ranks": probe.ranks(), "masked": masked, "hidden_shapes": sorted(set(root)),
                              "block_tokens": sorted(set(block))}
    return results


def test_paraattention_two_processes(plain):
    pytest.importorskip("para_attn")
    ranks, masked, _ = plain
    tokens = flux_latents().shape[1]
    for results in run_ranks(paraattention_rank, 2):
        for order in ORDERS:
            assert results[order]["hidden_shapes"] == [(1, tokens, 4)], "the hooks see the full, unsplit inputs"
            assert results[order]["block_tokens"] == [tokens // 2], "each rank's blocks run half of the tokens"
            assert results[order]["ranks"] == ranks
            torch.testing.assert_close(results[order]["masked"], masked, atol=1e-5, rtol=1e-5)
