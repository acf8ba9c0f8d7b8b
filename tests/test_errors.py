"""Every deliberate failure raises TLoRAError with a message that says what to do, and changes nothing."""

from __future__ import annotations

import pytest
import torch

import tiny
from compat_tools import hook_counts, scheduler_state_masks
from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks import TLoRAError, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE


def snapshot(pipe):
    """What a failed enable must leave untouched: hooks, mask groups, outputs."""
    unet = pipe.unet
    groups = [m.mask_group_id for m in applied_tlora_modules(unet)]
    return hook_counts(unet), groups, STATE_ATTRIBUTE in unet.__dict__


@pytest.fixture(scope="module")
def sdxl():
    return tiny.sdxl()


def assert_unchanged(pipe, kw, call):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    before_state = snapshot(pipe)
    before = pipe(**kw, latents=latents.clone(), return_dict=False)[0]
    with pytest.raises(TLoRAError) as error:
        call()
    assert snapshot(pipe) == before_state
    assert torch.equal(pipe(**kw, latents=latents.clone(), return_dict=False)[0], before)
    return str(error.value)


def test_wrong_max_rank_names_both_numbers(sdxl):
    pipe, kw = sdxl
    message = assert_unchanged(pipe, kw, lambda: enable_tlora(pipe, max_rank=64))
    assert "max_rank=64" in message and "rank 8" in message and "max_rank=None" in message


def test_max_rank_none_reads_the_modules(sdxl):
    pipe, _ = sdxl
    handle = enable_tlora(pipe, max_rank=None)
    assert handle.denoisers == ["unet"]
    handle.remove()


@pytest.mark.parametrize(
    "settings,words",
    [
        (dict(max_rank=0), "positive integer"),
        (dict(max_rank=8, min_rank=9), "larger than max_rank"),
        (dict(max_rank=8, alpha=0.0), "alpha"),
        (dict(max_rank=8, mode="fastest"), "Unknown mode"),
        (dict(max_rank=8, timestep_fn="timestep"), "timestep_fn must be a callable"),
    ],
)
def test_invalid_settings_leave_the_pipeline_as_it_was(sdxl, settings, words):
    pipe, kw = sdxl
    assert words in assert_unchanged(pipe, kw, lambda: enable_tlora(pipe, **settings))


def test_enabling_again_with_bad_settings_keeps_the_working_hooks(sdxl):
    pipe, kw = sdxl
    handle = enable_tlora(pipe, max_rank=8)
    pipe(**kw)  # "auto" finishes its setup on the first call; the outputs compared below are from later calls
    try:
        assert_unchanged(pipe, kw, lambda: enable_tlora(pipe, max_rank=8, alpha=-1.0))
        assert handle.denoisers == ["unet"]
    finally:
        handle.remove()


def test_pipeline_without_tlora_names_the_components():
    pipe, _ = tiny.sd3(rank=None)
    transformer = pipe.transformer
    with pytest.raises(TLoRAError, match=r"No T-LoRA modules found.*transformer \(SD3Transformer2DModel\)"):
        enable_tlora(pipe)
    assert hook_counts(transformer) == (0, 0)


def test_pipeline_with_no_modules_at_all():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=None,
    )
    with pytest.raises(TLoRAError, match="components seen: none"):
        enable_tlora(pipe)


def test_not_a_pipeline_or_module():
    with pytest.raises(TLoRAError, match="expects a Diffusers pipeline or a denoiser nn.Module, got dict"):
        enable_tlora({"unet": None})


def test_merged_weights_are_an_error_not_a_silent_no_op():
    """SimpleTuner's documented recipe: create_lycoris_from_weights + merge_to() leaves nothing to mask."""
    from lycoris import create_lycoris_from_weights

    pipe, _ = tiny.sdxl(rank=None)
    source = tiny.sdxl(rank=None)[0].unet
    network = tiny.apply_tlora(source, 4)  # apply_to() registers the modules, so state_dict() holds them
    state = network.state_dict()
    with lycoris_without_gc():
        merged, _ = create_lycoris_from_weights(1.0, None, pipe.unet, weights_sd=state)
    assert len(merged.loras) == len(network.loras) > 0
    merged.merge_to()
    with pytest.raises(TLoRAError, match=r"none is in the forward path.*merge_to\(\)"):
        enable_tlora(pipe, max_rank=4)


class ToyDenoiser(torch.nn.Module):
    """A denoiser class no convention row knows."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, sample, noise_level):
        return self.proj(sample) * (1 + noise_level)


def toy_with_tlora():
    toy = ToyDenoiser()
    tiny.apply_tlora(toy, 4, targets=("ToyDenoiser",))
    return toy


def test_unknown_denoiser_class_names_it_and_shows_timestep_fn():
    toy = toy_with_tlora()
    with pytest.raises(TLoRAError) as error:
        enable_tlora(toy, max_rank=4)
    assert "ToyDenoiser" in str(error.value) and "timestep_fn=" in str(error.value)
    assert hook_counts(toy) == (0, 0)


def test_timestep_fn_serves_an_unknown_class(rank_probe):
    toy = toy_with_tlora()
    rank_probe.watch("toy", toy)
    enable_tlora(toy, max_rank=4, timestep_fn=lambda module, args, kwargs: kwargs["noise_level"] * 1000)
    toy(torch.randn(1, 8), noise_level=torch.tensor(0.0))
    toy(torch.randn(1, 8), noise_level=torch.tensor(0.6))
    toy(torch.randn(1, 8), noise_level=torch.tensor(1.0))
    assert rank_probe.ranks() == [4, 2, 1]


def test_missing_timestep_argument_is_reported():
    pipe, kw = tiny.sd3()
    enable_tlora(pipe, max_rank=8)
    sample = torch.randn(1, 4, 4, 4)
    with pytest.raises(TLoRAError, match="called without its `timestep` argument"):
        pipe.transformer(hidden_states=sample, encoder_hidden_states=torch.randn(1, 8, 32),
                         pooled_projections=torch.randn(1, 64))


def test_tlora_on_convolutions_larger_than_1x1_is_refused_before_anything_changes():
    """A LyCORIS preset with ResnetBlock2D puts T-LoRA modules on 3x3 convs, whose LyCORIS forward fails at the
    first call (its masked delta has a 1x1 kernel): enable_tlora refuses them as load_tlora does."""
    from lycoris import LycorisNetwork, create_lycoris

    pipe, kw = tiny.sdxl(rank=None)
    LycorisNetwork.apply_preset({"target_module": ["Attention", "ResnetBlock2D"]})
    with lycoris_without_gc():
        network = create_lycoris(pipe.unet, 1.0, linear_dim=4, linear_alpha=4, conv_dim=4, conv_alpha=4,
                                 algo="tlora", warn_on_unmatched=False)
    network.apply_to()
    convs = [m for m in network.loras if m.isconv and m.org_module[0].kernel_size != (1, 1)]
    assert convs, "the preset must put modules on 3x3 convs"
    before = snapshot(pipe)
    with pytest.raises(TLoRAError, match=rf"{convs[0].lora_name} wraps a \(3, 3\) conv.*1x1 convs.*ResnetBlock2D"):
        enable_tlora(pipe, max_rank=4)
    assert snapshot(pipe) == before
    with pytest.raises(RuntimeError):  # why: LyCORIS's own forward on the 3x3 conv, with no hook involved
        pipe(**kw)


# -- fuse_qkv_projections(): the fused attention runs one to_qkv layer instead of the layers that hold the T-LoRA -----
FUSED_QKV = {  # family -> (builder, fuse, unfuse, denoiser name)
    "sdxl": (lambda: tiny.sdxl(steps=2), lambda pipe: pipe.fuse_qkv_projections(vae=False),
             lambda pipe: pipe.unfuse_qkv_projections(vae=False), "unet"),
    "flux": (lambda: tiny.flux(steps=2, dtype=torch.float32), lambda pipe: pipe.transformer.fuse_qkv_projections(),
             lambda pipe: pipe.transformer.unfuse_qkv_projections(), "transformer"),
}


@pytest.mark.parametrize("mode", ["fold", "low_memory", "lycoris"])
@pytest.mark.parametrize("family", list(FUSED_QKV))
def test_fused_qkv_projections_are_refused_before_and_after_enabling(family, mode):
    """SDXL's older `Attention` (fused processors; unfusing leaves the fused layers) and Flux's (a flag): both are
    found when enabling and at the next call, and unfusing gives LyCORIS's own masked output again."""
    build, fuse, unfuse, name = FUSED_QKV[family]
    pipe, kw = build()
    denoiser = getattr(pipe, name)

    def output():
        return pipe(**kw, generator=torch.Generator().manual_seed(3), return_dict=False)[0]

    with scheduler_state_masks(pipe, (8, 1, 1.0)):
        expected = output()
    before = hook_counts(denoiser)
    fuse(pipe)
    with pytest.raises(TLoRAError, match=r"fuse_qkv_projections\(\).*Call unfuse_qkv_projections\(\)"):
        enable_tlora(pipe, max_rank=8, mode=mode)
    assert hook_counts(denoiser) == before and STATE_ATTRIBUTE not in denoiser.__dict__
    unfuse(pipe)
    enable_tlora(pipe, max_rank=8, mode=mode)
    torch.testing.assert_close(output(), expected, atol=1e-5, rtol=1e-5)
    fuse(pipe)  # after enabling: the next call raises, before it runs
    with pytest.raises(TLoRAError, match="to_q, to_k, to_v -> to_qkv"):
        output()
    unfuse(pipe)
    torch.testing.assert_close(output(), expected, atol=1e-5, rtol=1e-5)
