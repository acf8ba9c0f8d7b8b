"""Modular Diffusers: `enable_tlora`, `load_tlora` and `create_tlora` take a `ModularPipeline`, and every denoiser
call gets the rank the classic pipeline gives on the same inputs; the scheduler is read from the pipeline's components
on every call; an adapter `create_tlora` makes there trains each sample by its own rank.

Each case builds the family's modular core denoise step offline (`...CoreDenoiseStep().init_pipeline()`, then
`update_components` with the tiny classic pipeline's own denoisers and a copy of its scheduler) and calls both with
the same prompt embeddings. The rank of a call is compared by the scheduler step it belongs to, since modular
guiders call the denoiser once per guidance batch where some classic pipelines batch cond and uncond together.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import tiny
import tlora_files
import training_tools as tt
from compat_tools import hook_counts
from conftest import lycoris_rank
from devtools.measure import relative_error
from tlora_hooks import TLoRAError, create_tlora, disable_tlora, enable_tlora, load_tlora, unload_tlora
from tlora_hooks.discovery import components_of
from tlora_hooks.hooks import installed_hook

# Both pipelines share the classic one's denoisers; these are the classic call's options the modular blocks take
# elsewhere (the guider's scale) or not at all (the output type).
CLASSIC_ONLY = ("output_type", "guidance_scale", "guidance_scale_2", "true_cfg_scale")


@dataclass(frozen=True)
class ModularCase:
    """One modular pipeline family: its classic twin, its core denoise step (`family.module:Class`), the denoisers
    both hold, and config values the modular pipeline takes through `update_components`."""

    classic: Callable[[], tuple[Any, dict]]
    blocks: str
    pipeline: str
    denoisers: tuple[str, ...] = ("transformer",)
    config: dict = field(default_factory=dict)
    classic_call: Callable[[dict], dict] = lambda kw: kw


def without_negative_prompt(kw: dict) -> dict:
    """The modular Flux.1 core step has no guider: compare with the classic pipeline without true CFG."""
    return {key: value for key, value in kw.items() if not key.startswith("negative") and key != "true_cfg_scale"}


CASES = {
    "modular_sdxl": ModularCase(tiny.sdxl, "stable_diffusion_xl.modular_blocks_stable_diffusion_xl:"
                                "StableDiffusionXLCoreDenoiseStep", "StableDiffusionXLModularPipeline", ("unet",)),
    "modular_sd3": ModularCase(tiny.sd3, "stable_diffusion_3.modular_blocks_stable_diffusion_3:"
                               "StableDiffusion3T2ICoreDenoiseStep", "StableDiffusion3ModularPipeline"),
    "modular_flux": ModularCase(tiny.flux, "flux.modular_blocks_flux:FluxCoreDenoiseStep", "FluxModularPipeline",
                                classic_call=without_negative_prompt),
    "modular_flux2": ModularCase(tiny.flux2, "flux2.modular_blocks_flux2:Flux2CoreDenoiseStep",
                                 "Flux2ModularPipeline"),
    "modular_flux2_klein_base": ModularCase(
        lambda: tiny.flux2("klein_base"), "flux2.modular_blocks_flux2_klein_base:Flux2KleinBaseCoreDenoiseStep",
        "Flux2KleinBaseModularPipeline",
    ),
    "modular_qwen_image": ModularCase(tiny.qwen_image, "qwenimage.modular_blocks_qwenimage:QwenImageCoreDenoiseStep",
                                      "QwenImageModularPipeline"),
    "modular_wan21": ModularCase(tiny.wan, "wan.modular_blocks_wan:WanCoreDenoiseStep", "WanModularPipeline"),
    "modular_wan22_a14b": ModularCase(
        lambda: tiny.wan("2.2_a14b"), "wan.modular_blocks_wan22:Wan22CoreDenoiseStep", "Wan22ModularPipeline",
        ("transformer", "transformer_2"), config={"boundary_ratio": 0.875},
    ),
    "modular_ltx": ModularCase(tiny.ltx, "ltx.modular_blocks_ltx:LTXCoreDenoiseStep", "LTXModularPipeline"),
}


def copy_of(scheduler):
    return type(scheduler).from_config(scheduler.config)


def modular_pipeline(blocks: str, pipeline: str, **components) -> Any:
    """The modular pipeline class `pipeline` running the core denoise step `blocks`, holding `components`."""
    import diffusers

    module, name = blocks.split(":")
    step = getattr(importlib.import_module(f"diffusers.modular_pipelines.{module}"), name)
    pipe = getattr(diffusers, pipeline)(blocks=step())
    pipe.update_components(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def modular_twin(case: ModularCase, classic) -> Any:
    """The family's modular core denoise pipeline holding the classic pipeline's denoisers and a scheduler copy."""
    return modular_pipeline(case.blocks, case.pipeline, scheduler=copy_of(classic.scheduler),
                            **{name: getattr(classic, name) for name in case.denoisers}, **case.config)


class StepRanks:
    """(component, scheduler step, rank) of every denoiser call, the step read from the scheduler the pipeline holds
    at that moment (`step_index` is None until the first step ends)."""

    def __init__(self, rank_probe, pipe, denoisers) -> None:
        rank_probe.close()
        rank_probe.reset()
        self.probe, self.pipe, self.steps, self.handles = rank_probe, pipe, [], []
        for name in denoisers:
            rank_probe.watch(name, components_of(pipe)[name])
            self.handles.append(components_of(pipe)[name].register_forward_pre_hook(self.note_step))

    def note_step(self, module, args) -> None:
        self.steps.append(self.pipe.scheduler.step_index or 0)

    def calls(self) -> list[tuple[str, int, int]]:
        """The calls so far; the probe stops watching."""
        for handle in self.handles:
            handle.remove()
        self.probe.close()
        assert len(self.steps) == len(self.probe.calls)
        return list(zip(self.probe.names(), self.steps, self.probe.ranks()))


def by_step(calls: list[tuple[str, int, int]]) -> dict[tuple[str, int], set[int]]:
    grouped: dict[tuple[str, int], set[int]] = {}
    for name, step, rank in calls:
        grouped.setdefault((name, step), set()).add(rank)
    return grouped


@pytest.mark.parametrize("case_id", CASES)
def test_every_denoiser_call_gets_the_rank_of_the_classic_pipeline(case_id, rank_probe):
    case = CASES[case_id]
    classic, kw = case.classic()
    kw = case.classic_call(kw)
    modular = modular_twin(case, classic)
    assert type(modular).__name__ == case.pipeline

    enable_tlora(classic, max_rank=8)
    probe = StepRanks(rank_probe, classic, case.denoisers)
    classic(**kw)
    expected = by_step(probe.calls())
    disable_tlora(classic)

    handle = enable_tlora(modular, max_rank=8)
    assert handle.denoisers == list(case.denoisers)
    probe = StepRanks(rank_probe, modular, case.denoisers)
    modular(**{key: value for key, value in kw.items() if key not in CLASSIC_ONLY}, output="latents")
    seen = by_step(probe.calls())
    assert seen == expected, "each step's calls must all get the classic pipeline's rank for that step"
    assert all(len(ranks) == 1 for ranks in seen.values()) and len({min(r) for r in seen.values()}) > 1


# Modular pipelines without a tiny classic twin here (their classic pipelines encode images with models the tests
# cannot build offline): each runs its core denoise step on inputs of the right shapes, and every call is checked
# against the rank of the scheduler step it belongs to, read from the pipeline's own scheduler.
def kontext():
    pipe, kw = tiny.flux("kontext")
    return {"transformer": pipe.transformer, "scheduler": copy_of(pipe.scheduler)}, dict(
        prompt_embeds=kw["prompt_embeds"], pooled_prompt_embeds=kw["pooled_prompt_embeds"], height=16, width=16,
        max_area=16 * 16, image_latents=torch.randn(1, 1, 16, 16, dtype=torch.bfloat16), num_inference_steps=4,
    )


def flux2_klein():
    """Klein distilled: one call per step, no guidance."""
    pipe, kw = tiny.flux2("klein_base")
    return {"transformer": pipe.transformer, "scheduler": copy_of(pipe.scheduler)}, dict(
        prompt_embeds=kw["prompt_embeds"], height=16, width=16, num_inference_steps=4,
    )


def qwen_image_edit(image_latents_shape=(1, 4, 1, 4, 4), **extra):
    pipe, kw = tiny.qwen_image()
    inputs = {key: kw[key] for key in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                                       "negative_prompt_embeds_mask", "height", "width", "num_inference_steps")}
    inputs.update(image_latents=torch.randn(image_latents_shape, dtype=torch.bfloat16), **extra)
    return {"transformer": pipe.transformer, "scheduler": copy_of(pipe.scheduler)}, inputs


def qwen_image_layered():
    """Layered latents are (batch, layers, channels, height, width); the size comes from the image."""
    components, inputs = qwen_image_edit((1, 1, 4, 4, 4), layers=2)
    del inputs["height"], inputs["width"]
    return components, inputs


def wan_image_to_video(two_experts: bool):
    """Wan 2.1 I2V (image embeddings through added K/V) or Wan 2.2 I2V A14B (two experts, 6 steps so both run):
    36 input channels, the latents beside 20 channels of image condition."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
                  text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    torch.manual_seed(0)
    names = ("transformer", "transformer_2") if two_experts else ("transformer",)
    extra = {} if two_experts else dict(image_dim=4, added_kv_proj_dim=24)
    components = {name: WanTransformer3DModel(**config, **extra) for name in names}
    for seed, transformer in enumerate(components.values()):
        tiny.add_tlora(transformer, seed=seed)
    components["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    inputs = dict(tiny._text_embeds(32), num_inference_steps=6 if two_experts else 4, height=16, width=16,
                  num_frames=5, image_condition_latents=torch.randn(1, 20, 2, 2, 2))
    if two_experts:
        components["boundary_ratio"] = 0.875
    else:
        inputs["image_embeds"] = torch.randn(1, 3, 4)
    return components, inputs


MORE_CASES = {  # id: (core denoise step, pipeline class, components and inputs)
    "modular_flux_kontext": ("flux.modular_blocks_flux_kontext:FluxKontextCoreDenoiseStep",
                             "FluxKontextModularPipeline", kontext),
    "modular_flux2_klein": ("flux2.modular_blocks_flux2_klein:Flux2KleinCoreDenoiseStep", "Flux2KleinModularPipeline",
                            flux2_klein),
    "modular_qwen_image_edit": ("qwenimage.modular_blocks_qwenimage_edit:QwenImageEditCoreDenoiseStep",
                                "QwenImageEditModularPipeline", qwen_image_edit),
    "modular_qwen_image_edit_plus": ("qwenimage.modular_blocks_qwenimage_edit_plus:QwenImageEditPlusCoreDenoiseStep",
                                     "QwenImageEditPlusModularPipeline", qwen_image_edit),
    "modular_qwen_image_layered": ("qwenimage.modular_blocks_qwenimage_layered:QwenImageLayeredCoreDenoiseStep",
                                   "QwenImageLayeredModularPipeline", qwen_image_layered),
    "modular_wan21_i2v": ("wan.modular_blocks_wan_i2v:WanImage2VideoCoreDenoiseStep", "WanImage2VideoModularPipeline",
                          lambda: wan_image_to_video(False)),
    "modular_wan22_i2v_a14b": ("wan.modular_blocks_wan22_i2v:Wan22Image2VideoCoreDenoiseStep",
                               "Wan22Image2VideoModularPipeline", lambda: wan_image_to_video(True)),
}


@pytest.mark.parametrize("case_id", MORE_CASES)
def test_every_denoiser_call_gets_the_rank_of_its_scheduler_step(case_id, rank_probe):
    blocks, pipeline, build = MORE_CASES[case_id]
    components, inputs = build()
    modular = modular_pipeline(blocks, pipeline, **components)
    denoisers = [name for name in ("transformer", "transformer_2") if name in components]
    assert enable_tlora(modular, max_rank=8).denoisers == denoisers
    probe = StepRanks(rank_probe, modular, denoisers)
    modular(**inputs, output="latents")
    calls = probe.calls()
    timesteps, T = modular.scheduler.timesteps, modular.scheduler.config.num_train_timesteps
    assert [rank for *_, rank in calls] == [lycoris_rank(timesteps[step], T, 8) for _, step, _ in calls]
    assert {step for _, step, _ in calls} == set(range(len(timesteps))), "every step calls the denoiser"
    assert {name for name, *_ in calls} == set(denoisers) and len({rank for *_, rank in calls}) > 1


@pytest.mark.parametrize("case_id", CASES)
def test_update_components_scheduler_after_enabling_is_followed(case_id, rank_probe):
    """A scheduler with half the training timesteps: the rank formula's T changes, so a hook still reading the
    enabled-with scheduler (T = 1000) would give other ranks."""
    case = CASES[case_id]
    classic, kw = case.classic()
    modular = modular_twin(case, classic)
    enable_tlora(modular, max_rank=8)
    swapped = type(modular.scheduler).from_config(modular.scheduler.config, num_train_timesteps=500)
    modular.update_components(scheduler=swapped)
    probe = StepRanks(rank_probe, modular, case.denoisers)
    call = {key: value for key, value in case.classic_call(kw).items() if key not in CLASSIC_ONLY}
    modular(**call, output="latents")
    timesteps = [float(t) for t in swapped.timesteps]
    assert [rank for _, _, rank in probe.calls()] == [lycoris_rank(timesteps[step], 500, 8) for _, step, _ in
                                                      probe.calls()]
    assert [lycoris_rank(t, 500, 8) for t in timesteps] != [lycoris_rank(t, 1000, 8) for t in timesteps]


def test_load_tlora_onto_a_modular_pipeline_masks_and_unloads(tmp_path, rank_probe):
    """The file's schedule (min_rank 2, alpha 0.5) on every call; unloading gives the plain UNet's output back."""
    classic, kw = tiny.sdxl(rank=None, steps=3)
    network = tiny.add_tlora(classic.unet, 8, seed=4)
    path = tlora_files.simpletuner_file(network, tmp_path / "t.safetensors", linear_dim=8, tlora_min_rank=2,
                                        tlora_alpha=0.5)
    network.restore()
    modular = modular_twin(CASES["modular_sdxl"], classic)
    call = {key: value for key, value in kw.items() if key not in CLASSIC_ONLY}

    def run():
        latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        return modular(**call, latents=latents, output="latents")

    plain = run()
    handle = load_tlora(modular, path)
    assert handle.denoisers == ["unet"]
    probe = StepRanks(rank_probe, modular, ["unet"])
    masked = run()
    timesteps = modular.scheduler.timesteps
    assert [rank for _, _, rank in probe.calls()] == [lycoris_rank(timesteps[step], 1000, 8, 2, 0.5) for _, step, _
                                                      in probe.calls()]
    assert not torch.equal(masked, plain)
    unload_tlora(modular)
    torch.testing.assert_close(run(), plain, rtol=0, atol=0)


def test_a_modular_pipeline_whose_denoiser_has_no_row_is_refused():
    """Anima's CosmosTransformer3DModel: each Cosmos pipeline passes another timestep, so enabling asks for
    timestep_fn=, as for the classic Cosmos transformer outside its pipelines."""
    from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaCoreDenoiseStep

    modular = AnimaCoreDenoiseStep().init_pipeline()
    transformer = tiny.cosmos_transformer()
    tiny.add_tlora(transformer)
    modular.update_components(transformer=transformer)
    with pytest.raises(TLoRAError, match="each Cosmos pipeline passes a different timestep.*timestep_fn="):
        enable_tlora(modular, max_rank=8)
    assert hook_counts(transformer) == (0, 0)


# The modular pipelines of diffusers 0.42.1 whose denoiser class has no convention row, and that denoiser's
# attribute: enabling asks for timestep_fn= (or register_convention).
REFUSED = {
    "Cosmos3DistilledModularPipeline": "transformer", "Cosmos3OmniModularPipeline": "transformer",
    "EchoModularPipeline": "transformer", "ErnieImageModularPipeline": "transformer",
    "Flux3DistilledModularPipeline": "transformer", "Flux3ModularPipeline": "transformer",
    "HeliosModularPipeline": "transformer", "HeliosPyramidDistilledModularPipeline": "transformer",
    "HeliosPyramidModularPipeline": "transformer", "HunyuanVideo15ModularPipeline": "transformer",
    "Ideogram4ModularPipeline": "transformer", "Krea2ModularPipeline": "transformer",
    "Krea2TurboModularPipeline": "transformer", "LTX25ModularPipeline": "transformer",
    "LTX2ModularPipeline": "transformer", "MiniMaxH3ModularPipeline": "transformer",
    "MiniMaxMusic3ModularPipeline": "transformer", "QwenImage21ModularPipeline": "transformer",
    "QwenImage21TurboModularPipeline": "transformer", "Wan22VaceModularPipeline": "transformer_2",
    "WanAnimate2DistilledModularPipeline": "transformer", "WanAnimate2ModularPipeline": "transformer",
    "ZImageModularPipeline": "transformer",
}


def test_every_modular_pipeline_of_diffusers_is_tested_or_refused():
    """A modular pipeline a new diffusers adds is neither: this fails until it is one or the other."""
    import diffusers

    shipped = {name for name in dir(diffusers) if name.endswith("ModularPipeline") and name != "ModularPipeline"}
    tested = {case.pipeline for case in CASES.values()} | {pipeline for _, pipeline, _ in MORE_CASES.values()}
    refused = set(REFUSED) | {"AnimaModularPipeline"}  # a Cosmos transformer: its own test above
    assert shipped == tested | refused and not tested & refused


@pytest.mark.parametrize("name", REFUSED)
def test_a_modular_pipeline_whose_denoiser_has_no_row_asks_for_timestep_fn(name):
    """The pipeline its default blocks make, holding its own denoiser class (built on the meta device: refused
    before any weight is read); nothing on the pipeline or the denoiser changes."""
    import diffusers

    cls = getattr(diffusers, name)
    blocks = getattr(diffusers, cls.default_blocks_name)()
    modular = cls(blocks=blocks)
    component = REFUSED[name]
    spec = next(spec for spec in blocks.expected_components if spec.name == component)
    with torch.device("meta"):
        denoiser = spec.type_hint()
    modular.update_components(**{component: denoiser})
    components, modules = dict(modular.components), [name for name, _ in denoiser.named_modules()]
    config = {**TLORA_CONFIG, "apply_preset": {"target_module": ["Linear"]}}
    with pytest.raises(TLoRAError, match=f"No timestep convention is known for denoiser class "
                                         f"{type(denoiser).__name__}.*timestep_fn=.*register_convention"):
        create_tlora(modular, config, component=component)
    assert modular.components == components and hook_counts(denoiser) == (0, 0)
    assert [name for name, _ in denoiser.named_modules()] == modules


def test_a_modular_pipeline_before_load_components_says_to_load_them(tmp_path):
    """`ModularPipeline.from_pretrained` builds a pipeline whose components load later (`load_components`); every
    verb says so, and leaves it as it was."""
    import diffusers

    modular = diffusers.StableDiffusionXLAutoBlocks().init_pipeline()
    components = dict(modular.components)
    classic, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(classic.unet, 4)
    path = tlora_files.simpletuner_file(network, tmp_path / "t.safetensors", linear_dim=4)
    network.restore()
    for verb in (lambda: load_tlora(modular, path), lambda: enable_tlora(modular, max_rank=4),
                 lambda: create_tlora(modular, TLORA_CONFIG)):
        with pytest.raises(TLoRAError, match=r"has not loaded its unet yet: call pipe.load_components\(\.\.\.\)"):
            verb()
        assert modular.components == components


# -- create_tlora on a modular pipeline -------------------------------------------------------------------------------
TLORA_CONFIG = {"algo": "tlora", "linear_dim": 8, "linear_alpha": 8, "tlora_min_rank": 2, "tlora_alpha": 0.5}


def test_create_tlora_on_a_modular_pipeline_trains_each_sample_by_its_own_rank():
    """The adapter goes on the pipeline's UNet, registered under it, and a training call with four timesteps of four
    ranks gives LyCORIS's own gradients, sample by sample (the same call with the hooks removed)."""
    classic, _ = tiny.sdxl(rank=None)
    modular = modular_twin(CASES["modular_sdxl"], classic)
    modular.unet.requires_grad_(False)
    network = tiny.perturbed(create_tlora(modular, TLORA_CONFIG))
    assert modular.unet.tlora["default"] is network and len(network.loras) == 40
    assert {id(p) for p in modular.unet.parameters() if p.requires_grad} == {id(p) for p in network.parameters()}
    assert installed_hook(modular.unet) is not None
    case = tt.sdxl_case(modular.unet, network)
    _, grads = tt.batched_step(case)
    disable_tlora(modular)
    expected = tt.lycoris_per_sample(case, min_rank=2, alpha=0.5)[1]
    _, unmasked = tt.lycoris_per_sample(case, masked=False)
    assert max(relative_error(unmasked[name], expected[name]) for name in expected) > 1e-2, "the masks must matter"
    for name, gradient in grads.items():
        assert relative_error(gradient, expected[name]) <= 1e-5, name


@pytest.mark.parametrize("case_id", ["modular_sdxl", "modular_flux"])
def test_create_tlora_on_a_modular_pipeline_masks_every_call_as_the_classic_pipeline(case_id, rank_probe):
    """A scheduler with 500 training timesteps: hooks that did not read the modular pipeline's scheduler (T = 1000)
    would give other ranks."""
    case = CASES[case_id]
    classic, kw = case.classic(rank=None)
    kw = case.classic_call(kw)
    classic.scheduler = type(classic.scheduler).from_config(classic.scheduler.config, num_train_timesteps=500)
    modular = modular_twin(case, classic)
    network = create_tlora(modular, TLORA_CONFIG)
    assert getattr(modular, case.denoisers[0]).tlora["default"] is network
    probe = StepRanks(rank_probe, modular, case.denoisers)
    modular(**{key: value for key, value in kw.items() if key not in CLASSIC_ONLY}, output="latents")
    seen = by_step(probe.calls())

    enable_tlora(classic, max_rank=8, min_rank=2, alpha=0.5)  # the same denoiser and adapter, the classic hooks
    probe = StepRanks(rank_probe, classic, case.denoisers)
    classic(**kw)
    assert seen == by_step(probe.calls())
    assert all(len(ranks) == 1 for ranks in seen.values()) and len({min(r) for r in seen.values()}) > 1
