"""`create_tlora`: LyCORIS's own network and initial values (computed batched), registered under the denoiser, with
presets reported, LyCORIS's class state left alone, and every failure leaving the pipeline as it was."""

from __future__ import annotations

import inspect
import json
import logging
import re

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris

import test_families as families
import tiny
from compat_tools import expected_ranks, layer_state, run
from conftest import lycoris_rank
from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks import TLoRAError, create_tlora, enable_tlora, get_tlora_adapters, load_tlora, unload_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import installed_hook
from tlora_hooks.modes.per_sample import get_sample_masks
from tlora_hooks.presets import DEFAULT_EXCLUDES, DEFAULT_TARGETS, PRESET_ATTRIBUTES

# SimpleTuner's T-LoRA doc, `config/lycoris_tlora.json`, as written there.
SEED_CONFIG = {
    "algo": "tlora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32,
    "apply_preset": {"target_module": ["Attention", "FeedForward"]},
}


def config(rank=8, **extra):
    return {"algo": "tlora", "linear_dim": rank, "linear_alpha": rank / 2, "tlora_min_rank": 2, **extra}


def lycoris_network(denoiser, rank, preset, **kwargs):
    """LyCORIS's own `create_lycoris`, as SimpleTuner calls it (its per-module gc.collect skipped for speed)."""
    LycorisNetwork.apply_preset(preset)
    with lycoris_without_gc():
        return create_lycoris(denoiser, 1.0, rank, rank / 2, algo="tlora", warn_on_unmatched=False, **kwargs)


@pytest.fixture(autouse=True)
def lycoris_class_state():
    """LyCORIS presets are class attributes: give every test LyCORIS's defaults and put them back afterwards."""
    saved = {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES}
    yield
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


def ours(caplog) -> list[logging.LogRecord]:
    """What create_tlora logged about the preset and the layers (diffusers and the hooks log other things)."""
    return [record for record in caplog.records if record.name in ("tlora_hooks.presets", "tlora_hooks.creation")]


def latents(shape=(1, 4, 4, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- LyCORIS's initial values, batched ----------------------------------------------------------------------------
BUILDERS = {
    "unet": (tiny.unet, {"target_module": ["Transformer2DModel"]}),  # linears and the 1x1 proj_in/proj_out convs
    "flux": (tiny.flux_transformer, {"target_module": ["FluxAttention", "FeedForward"]}),
}


TENSORS = (
    lambda m: m.q_layer.weight, lambda m: m.p_layer.weight, lambda m: m.lambda_layer,
    lambda m: m.base_q, lambda m: m.base_p, lambda m: m.base_lambda,
)


@pytest.mark.parametrize("rank", [4, 16])  # 16 exceeds the tiny layers' dimensions: LyCORIS pads the ranks
@pytest.mark.parametrize("family", BUILDERS)
def test_initial_values_equal_lycoris_up_to_the_sign_of_each_pair(family, rank):
    build, preset = BUILDERS[family]
    reference = {m.lora_name: m for m in lycoris_network(build(), rank, preset).loras}
    created = {m.lora_name: m for m in create_tlora(build(), config(rank, apply_preset=preset)).loras}
    assert created.keys() == reference.keys() and reference
    assert any(m.isconv for m in created.values()) == (family == "unet")
    for name, ours in created.items():
        theirs = reference[name]
        q, p = ours.q_layer.weight.reshape(rank, -1), ours.p_layer.weight.reshape(-1, rank)
        q_ref, p_ref = theirs.q_layer.weight.reshape(rank, -1), theirs.p_layer.weight.reshape(-1, rank)
        torch.testing.assert_close(ours.lambda_layer, theirs.lambda_layer, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.abs(), q_ref.abs(), rtol=0, atol=1e-4)
        torch.testing.assert_close(p.abs(), p_ref.abs(), rtol=0, atol=1e-4)
        lam, lam_ref = ours.lambda_layer.detach().reshape(-1), theirs.lambda_layer.detach().reshape(-1)
        for i in range(rank):  # each rank-one term P_i lambda_i Q_i, whatever sign the decomposition chose
            torch.testing.assert_close(
                torch.outer(p[:, i], q[i]) * lam[i], torch.outer(p_ref[:, i], q_ref[i]) * lam_ref[i],
                rtol=0, atol=1e-5 * lam_ref.abs().max().item(),
            )
        assert all(torch.equal(get(ours), base(ours)) for get, base in zip(TENSORS[:3], TENSORS[3:]))
        assert ours.alpha.item() == rank / 2 and ours.multiplier == 1.0 and ours.lambda_layer.requires_grad


@pytest.mark.parametrize("mode", ["lycoris", "fold", "low_memory"])
def test_the_output_at_init_is_the_plain_model_output(mode):
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    plain = run(pipe, kw, latents())
    create_tlora(pipe, config(), mode=mode)
    assert torch.equal(run(pipe, kw, latents()), plain)


def test_other_initialisations_run_lycoris_own_code():
    """`use_data_init=False` (random matrices) reaches TLoraModule through a module_algo_map, as in LyCORIS."""
    preset = {"target_module": ["Attention"], "module_algo_map": {"Attention": {"use_data_init": False}}}
    theirs, ours = tiny.unet(), tiny.unet()
    torch.manual_seed(3)
    reference = lycoris_network(theirs, 4, preset).loras
    torch.manual_seed(3)
    created = create_tlora(ours, config(4, apply_preset=preset)).loras
    assert [m.lora_name for m in created] == [m.lora_name for m in reference]
    for ours, theirs in zip(created, reference):
        assert not ours.base_from_weights
        for get in TENSORS:
            assert torch.equal(get(ours), get(theirs))


# -- presets ------------------------------------------------------------------------------------------------------
def test_the_seed_config_works_as_is(tmp_path, caplog):
    path = tmp_path / "lycoris_tlora.json"
    path.write_text(json.dumps(SEED_CONFIG))
    pipe, _ = tiny.sdxl(rank=None)
    reference = lycoris_network(tiny.sdxl(rank=None)[0].unet, 64, SEED_CONFIG["apply_preset"]).loras
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        network = create_tlora(pipe, path)
    assert not ours(caplog)
    assert [m.lora_name for m in network.loras] == [m.lora_name for m in reference]
    schedule = installed_hook(pipe.unet).adapters["default"].schedule
    assert (schedule.max_rank, schedule.min_rank, schedule.alpha) == (64, 1, 1.0)
    assert all(m.lora_dim == 64 and m.scale == 0.5 for m in network.loras)


def test_a_preset_that_matches_part_warns_with_the_family_classes(caplog):
    """SimpleTuner's generic `Attention` names no layer of Flux: only FeedForward gets modules, and a warning says
    so."""
    pipe, _ = tiny.flux(rank=None)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        network = create_tlora(pipe, SEED_CONFIG | {"linear_dim": 4})
    (record,) = ours(caplog)
    assert "['Attention']" in record.getMessage() and "FluxAttention" in record.getMessage()
    assert network.loras and all("_ff" in m.lora_name for m in network.loras)


def test_only_the_presets_own_targets_are_reported(caplog):
    """A preset without `target_module` keeps LyCORIS's default classes (Linear, Conv1d, Conv3d, ...): a warning names
    what the preset itself names and matched nothing, never those defaults."""
    preset = {"target_name": ["down_blocks.1.*", "nonexistent.*"], "use_fnmatch": True}
    with caplog.at_level(logging.WARNING, logger="tlora_hooks.presets"):
        create_tlora(tiny.unet(), config(4, apply_preset=preset))
    (record,) = [record for record in ours(caplog) if record.name == "tlora_hooks.presets"]
    assert "['nonexistent.*']" in record.getMessage(), record.getMessage()


def test_a_preset_that_matches_nothing_is_an_error():
    pipe, kw = tiny.flux(rank=None)
    before = run(pipe, kw, latents((1, 4, 4)).bfloat16())
    with pytest.raises(TLoRAError, match=r"matches no layer of FluxTransformer2DModel.*Attention.*FluxAttention"):
        create_tlora(pipe, config(apply_preset={"target_module": ["Attention"]}))
    assert torch.equal(run(pipe, kw, latents((1, 4, 4)).bfloat16()), before)
    assert installed_hook(pipe.transformer) is None and "tlora" not in pipe.transformer._modules


# The tiny builder of each family with default targets, and its denoiser's class.
FAMILIES = {
    "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
    "flux2": "Flux2Transformer2DModel", "chroma": "ChromaTransformer2DModel",
    "qwen_image": "QwenImageTransformer2DModel", "sana": "SanaTransformer2DModel",
    "pixart_sigma": "PixArtTransformer2DModel", "auraflow": "AuraFlowTransformer2DModel",
    "lumina2": "Lumina2Transformer2DModel", "hidream": "HiDreamImageTransformer2DModel",
    "hunyuan_dit": "HunyuanDiT2DModel", "kandinsky3": "Kandinsky3UNet", "stable_cascade": "StableCascadeUNet",
    "cogvideox": "CogVideoXTransformer3DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "wan": "WanTransformer3DModel", "ltx": "LTXVideoTransformer3DModel", "mochi": "MochiTransformer3DModel",
    "allegro": "AllegroTransformer3DModel", "skyreels_v2": "SkyReelsV2Transformer3DModel",
    "cosmos": "CosmosTransformer3DModel",
}


def test_every_family_with_default_targets_is_tested():
    assert set(FAMILIES.values()) == set(DEFAULT_TARGETS)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_build_on_every_family(family, caplog):
    pipe, _ = getattr(tiny, family)()
    name, denoiser = next((n, getattr(pipe, n)) for n in ("unet", "transformer", "prior") if hasattr(pipe, n))
    assert type(denoiser).__name__ == FAMILIES[family]
    for module in applied_tlora_modules(denoiser):  # the builder's own LyCORIS network
        module.restore()
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        network = create_tlora(pipe, {"algo": "tlora", "linear_dim": 4}, component=name)
    assert not ours(caplog), [r.getMessage() for r in ours(caplog)]
    wrapped = {id(m.org_module[0]) for m in network.loras}
    for target in DEFAULT_TARGETS[FAMILIES[family]]:
        blocks = [block for block in denoiser.modules() if type(block).__name__ == target]
        assert any(id(layer) in wrapped for block in blocks for layer in block.modules()), f"{target} got no module"
    for pattern in DEFAULT_EXCLUDES.get(FAMILIES[family], ()):
        excluded = [layer for path, layer in denoiser.named_modules() if re.match(pattern, path)]
        assert excluded and not any(id(layer) in wrapped for layer in excluded), f"{pattern} got modules"


# The case of test_families that builds each family's default pipeline: its scheduler's own timestep of each step.
FAMILY_CASES = {
    "sdxl": "sdxl", "sd3": "sd3", "flux": "flux_true_cfg", "flux2": "flux2", "chroma": "chroma",
    "qwen_image": "qwen_image_true_cfg", "sana": "sana", "pixart_sigma": "pixart_sigma", "auraflow": "auraflow_fp16",
    "lumina2": "lumina2", "hidream": "hidream", "hunyuan_dit": "hunyuan_dit", "kandinsky3": "kandinsky3",
    "stable_cascade": "stable_cascade_prior", "cogvideox": "cogvideox", "hunyuan_video": "hunyuan_video_bf16",
    "wan": "wan21", "ltx": "ltx_t2v", "mochi": "mochi_inverted", "allegro": "allegro", "skyreels_v2": "skyreels_v2",
    "cosmos": "cosmos1_edm",
}
TIMESTEP_PARAMETERS = {"hidream": "timesteps", "stable_cascade": "timestep_ratio"}  # else `timestep`
UNBATCHED_INPUTS = ("img_ids", "txt_ids")  # Flux-style position ids: (tokens, 3), no batch dim


def as_float32(value):
    return nested(value, lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)


def nested(value, change):
    """`change` applied to every tensor in a call's (nested) arguments; the unbatched ids are left alone."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        return {key: item if key in UNBATCHED_INPUTS else nested(item, change) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(nested(item, change) for item in value)
    return value


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_train_each_sample_at_its_own_rank_on_every_family(family):
    """A training call at batch 2 (or the pipeline's CFG batch) on the inputs the pipeline gave its denoiser, each
    sample with the value it received at another step: every T-LoRA layer masks each sample by the rank of that
    step's scheduler timestep (test_families' reference), and the backward runs (HiDream's routed experts are out
    of its default targets: their inputs do not start with the batch dim)."""
    case = families.CASES[FAMILY_CASES[family]]
    (stage,) = case.stages
    (name,) = stage.denoisers
    pipe, kw = case.build()
    denoiser = getattr(pipe, name)
    for module in applied_tlora_modules(denoiser):
        module.restore()
    pipe.to(torch.float32)  # fp32 timesteps: bf16's rounding of t / 1000 would move int(t) off the step
    network = create_tlora(pipe, {"algo": "tlora", "linear_dim": 8}, component=name)
    calls = []
    capture = denoiser.register_forward_pre_hook(lambda m, *call: calls.append(call), with_kwargs=True)
    recorder = families.StepRecorder(pipe, stage)
    try:
        families.run(pipe, as_float32(kw), case, [recorder])
    finally:
        capture.remove()

    parameters = [p for p in inspect.signature(type(denoiser).forward).parameters if p != "self"]
    param = TIMESTEP_PARAMETERS.get(family, "timestep")
    position = parameters.index(param)
    args, kwargs = calls[0]
    if (kwargs[parameters[0]] if parameters[0] in kwargs else args[0]).shape[0] == 1:  # no CFG batch: two samples
        args, kwargs = nested((args, kwargs), lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t)
    batch = (kwargs[parameters[0]] if parameters[0] in kwargs else args[0]).shape[0]
    step_calls = {}
    for step, call in zip(recorder.call_steps, calls):
        step_calls.setdefault(step, call)
    steps = [round(index * (len(recorder.timesteps) - 1) / (batch - 1)) for index in range(batch)]
    received = [named[param] if param in named else a[position] for a, named in map(step_calls.get, steps)]
    timesteps = torch.stack([value if value.dim() == 0 else value[0] for value in received])
    if param in kwargs:
        kwargs = {**kwargs, param: timesteps}
    else:
        args = (*args[:position], timesteps, *args[position + 1 :])
    scheduler = getattr(pipe, stage.scheduler)
    expected = [
        lycoris_rank(
            stage.noise_ward(scheduler, step, recorder.timesteps[step], recorder.pipeline_timesteps[step]),
            families.num_train_timesteps(scheduler), 8,
        )
        for step in steps
    ]
    assert len(set(expected)) > 1, expected

    group = installed_hook(denoiser).adapters["default"].group_id
    seen = []
    probes = [
        module.org_module[0].register_forward_pre_hook(lambda m, a: seen.append(get_sample_masks(group).ranks()))
        for module in network.loras
    ]
    try:
        output = denoiser(*args, **kwargs)
    finally:
        for probe in probes:
            probe.remove()
    output = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    output.float().pow(2).mean().backward()
    assert len(seen) >= len(network.loras) and all(ranks == expected for ranks in seen), (expected, seen[:3])
    gradients = [m.lambda_layer.grad for m in network.loras if m.lambda_layer.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)


def test_an_unknown_family_without_a_preset_names_its_candidates():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = tiny.flux_transformer().transformer_blocks[0]

    with pytest.raises(TLoRAError, match=r"No default T-LoRA targets are known for Custom.*FluxAttention"):
        create_tlora(Custom(), config())


def test_lycoris_class_state_is_the_users_before_and_after():
    """A preset the user applied earlier neither leaks into create_tlora nor is lost by it."""
    LycorisNetwork.apply_preset({"target_module": ["FeedForward"], "use_fnmatch": True})
    before = {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES}
    network = create_tlora(tiny.unet(), config(apply_preset={"target_module": ["Attention"]}))
    assert network.loras and not any("_ff_" in m.lora_name for m in network.loras)
    assert {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES} == before


# -- registration under the denoiser ------------------------------------------------------------------------------
def test_parameters_are_the_denoisers_and_only_they_train_once_the_base_is_frozen():
    unet = tiny.unet()
    plain_keys = list(unet.state_dict())
    unet.requires_grad_(False)  # diffusers' scripts freeze the base first
    network = create_tlora(unet, config())
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()} and len(trainable) == 3 * 40
    unet.requires_grad_(False)  # or afterwards, then the adapter on again, as LyCORIS users do
    network.prepare_optimizer_params(1e-3)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in network.parameters()}
    state = unet.state_dict()
    assert list(state) == plain_keys + [f"tlora.default.{key}" for key in network.state_dict()]
    unet.load_state_dict(state)  # strict: a checkpoint (accelerate's save_state) reloads


def test_pipe_to_casts_the_adapter_and_the_masks_follow():
    """diffusers' `pipe.to(dtype)` casts every parameter, PEFT's included; the T-LoRA's too, and the masks follow."""
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    network = create_tlora(pipe, config(), mode="lycoris")
    tiny.perturbed(network)
    pipe.to(torch.bfloat16)
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert installed_hook(pipe.unet).mode.mask_dtype == torch.bfloat16
    reference = run(pipe, kw, latents().bfloat16())
    create_tlora(pipe, config(), mode="fold")  # a fresh one on the bf16 weights, fast mode: runs, and at init is exact
    assert run(pipe, kw, latents().bfloat16()).dtype == reference.dtype == torch.bfloat16


def test_save_pretrained_writes_the_adapter_beside_the_unchanged_base(tmp_path):
    """As with PEFT layers: the base keys are unchanged, so a stock from_pretrained loads the base (and says it
    ignored the `tlora.*` keys); save_tlora writes the adapter alone."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = tiny.unet()
    base = {key: value.clone() for key, value in unet.state_dict().items()}
    create_tlora(unet, config())
    unet.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert {k for k in saved if not k.startswith("tlora.default.")} == set(base)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in base.items())


def test_a_base_only_state_dict_loads_strictly_and_keeps_the_adapter():
    """A state dict without the `tlora.*` keys (the base model's own) loads the base, strict, leaving the adapter."""
    unet = tiny.unet()
    base = {key: value + 1.0 for key, value in unet.state_dict().items()}
    network = create_tlora(unet, config(), mode="lycoris")
    tiny.perturbed(network)
    adapter = {key: value.clone() for key, value in unet.state_dict().items() if key.startswith("tlora.")}
    unet.load_state_dict(base)
    loaded = unet.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in base.items()), "the base is what was loaded"
    assert all(torch.equal(loaded[key], value) for key, value in adapter.items()), "the adapter is unchanged"
    changed = {key: value * 2 for key, value in adapter.items()}
    unet.load_state_dict({**base, **changed})
    assert all(torch.equal(unet.state_dict()[key], value) for key, value in changed.items()), "adapter keys load"


def test_unload_restores_the_state_dict_and_module_tree_exactly():
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    unet = pipe.unet
    def state():
        names = [name for name, _ in unet.named_modules()]
        return run(pipe, kw, latents()), list(unet.state_dict()), names, layer_state(unet)

    before = state()
    for _ in range(2):
        tiny.perturbed(create_tlora(pipe, config()))
        assert "tlora" in dict(unet.named_children())
        unload_tlora(pipe)
        after = state()
        assert torch.equal(after[0], before[0]) and after[1:] == before[1:]
        assert installed_hook(unet) is None and not applied_tlora_modules(unet)


# -- replacing, and failures ----------------------------------------------------------------------------------------
def test_a_second_create_or_load_replaces_the_first(tmp_path):
    from tlora_hooks import save_tlora

    pipe, kw = tiny.sdxl(rank=None, steps=2)
    first = create_tlora(pipe, config())
    count = len(applied_tlora_modules(pipe.unet))
    tiny.perturbed(first)
    path = save_tlora(first, tmp_path / "first.safetensors")
    second = create_tlora(pipe, config())
    assert len(applied_tlora_modules(pipe.unet)) == count and list(pipe.unet.tlora) == ["default"]
    assert pipe.unet.tlora["default"] is second
    load_tlora(pipe, path)
    assert len(applied_tlora_modules(pipe.unet)) == count and pipe.unet.tlora["default"] is not second
    third = create_tlora(pipe, config())
    assert pipe.unet.tlora["default"] is third
    assert sum(name.startswith("tlora.") for name, _ in pipe.unet.named_parameters()) == 3 * count


def snapshot(pipe, kw):
    """The output and what a create touches: state dict keys, layers, the hooks' settings, the applied modules."""
    unet = pipe.unet
    hook = installed_hook(unet)
    hooked = (hook.adapters["default"].schedule, hook.mode.name) if hook is not None else None
    return (run(pipe, kw, latents()), list(unet.state_dict()), layer_state(unet), hooked,
            [id(m) for m in applied_tlora_modules(unet)])


BAD_CONFIGS = {
    "lokr": (dict(algo="lokr"), "needs \"algo\": \"tlora\""),
    "no_algo": (dict(algo=None), "needs \"algo\": \"tlora\""),
    "min_rank": (dict(tlora_min_rank=9), "larger than max_rank"),
    "bad_alpha": (dict(tlora_alpha=0), "alpha must be a finite number > 0"),
    "bad_linear_alpha": (dict(linear_alpha="x"), "linear_alpha must be a finite number"),
    "unknown_preset_key": (dict(apply_preset={"targets": ["Attention"]}), "unknown keys \\['targets'\\]"),
    "prefix": (dict(apply_preset={"target_module": ["Attention"], "lora_prefix": "lora"}), "Remove lora_prefix"),
    "other_algo": (dict(apply_preset={"module_algo_map": {"Attention": {"algo": "lokr"}}}), "T-LoRA modules only"),
    "other_dim": (dict(apply_preset={"module_algo_map": {"Attention": {"dim": 4}}}), "share one rank"),
    "nothing": (dict(apply_preset={"target_module": ["NoSuchBlock"]}), "matches no layer.*NoSuchBlock"),
    "train_norm": (dict(train_norm=True), "not T-LoRA modules"),
    "not_json": (dict(dropout=torch.tensor(0.1)), "plain JSON values"),
}


@pytest.mark.parametrize("already", [False, True], ids=["fresh", "replacing"])
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_raise_and_change_nothing(case, already):
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    if already:  # LyCORIS's forward reads the perturbed weights on every call; the fast modes read them once
        tiny.perturbed(create_tlora(pipe, config(), mode="lycoris"))
    before = snapshot(pipe, kw)
    extra, message = BAD_CONFIGS[case]
    with pytest.raises(TLoRAError, match=message):
        create_tlora(pipe, {k: v for k, v in config(**extra).items() if v is not None})
    after = snapshot(pipe, kw)
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


def test_a_failure_while_building_puts_the_previous_adapter_back(monkeypatch):
    from tlora_hooks import creation

    pipe, kw = tiny.sdxl(rank=None, steps=2)
    tiny.perturbed(create_tlora(pipe, config(), mode="lycoris"))
    before = snapshot(pipe, kw)

    def failing(modules, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(creation, "rebuild_base_terms", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        create_tlora(pipe, config())
    after = snapshot(pipe, kw)
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(config="missing.json"), FileNotFoundError),
        (dict(config=[1]), "config must be a LyCORIS config dict"),
        (dict(mode="fastest"), "Unknown mode"),
        (dict(adapter_name="a.b"), "adapter_name"),
        (dict(component="vae"), "not a module of this pipeline"),
        (dict(timestep_fn=3), "timestep_fn must be a callable"),
        (dict(scheduler="euler"), "scheduler must be a Diffusers scheduler"),
    ],
)
def test_bad_arguments_raise(kwargs, message, tmp_path):
    pipe, _ = tiny.sdxl(rank=None)
    kwargs = {"config": config(), **kwargs}
    error = message if isinstance(message, type) else TLoRAError
    with pytest.raises(error, match=None if isinstance(message, type) else message):
        create_tlora(pipe, **kwargs)
    assert "tlora" not in pipe.unet._modules


@pytest.mark.parametrize("mode", ["auto", "low_memory", "lycoris"])
def test_apply_to_again_as_lycoris_scripts_do_changes_nothing(mode):
    """`network.apply_to()` after `create_tlora` (a LyCORIS habit) leaves the network as create_tlora applied it:
    training and inference calls give what they give without it, and unloading gives the layers back."""
    generator = torch.Generator().manual_seed(2)
    sample, embeds = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 6, 32, generator=generator)
    timesteps = torch.tensor([300, 300]) if mode == "lycoris" else torch.tensor([10, 900])  # lycoris: one rank
    outputs = []
    for again in (False, True):
        unet = tiny.unet().requires_grad_(False)
        layers = layer_state(unet)
        network = tiny.perturbed(create_tlora(unet, config(4), mode=mode), seed=1)
        if again:
            network.apply_to()
        trained = unet(sample, timesteps, embeds).sample
        trained.sum().backward()
        with torch.no_grad():
            validated = unet(sample, torch.tensor([300, 300]), embeds).sample
        outputs.append((trained.detach(), validated, [m.lambda_layer.grad for m in network.loras]))
        unload_tlora(unet)
        assert layer_state(unet) == layers
    (trained, validated, grads), (trained_again, validated_again, grads_again) = outputs
    assert torch.equal(trained_again, trained) and torch.equal(validated_again, validated)
    assert all(torch.equal(a, b) for a, b in zip(grads_again, grads))


# -- the timestep of a bare denoiser: scheduler= and timestep_fn= ---------------------------------------------------
def sample_ranks(network, group: int, call) -> list[list[int]]:
    """The per-sample ranks each T-LoRA layer read during `call()`, a training call."""
    seen = []
    probes = [
        module.org_module[0].register_forward_pre_hook(lambda m, a: seen.append(get_sample_masks(group).ranks()))
        for module in network.loras
    ]
    try:
        call()
    finally:
        for probe in probes:
            probe.remove()
    assert len(seen) >= len(network.loras)
    return seen


EDM_SIGMAS = (80.0, 5.0, 0.5, 0.01)


def edm_unet_call(unet, c_noise):
    """A training call of an EDM SDXL UNet (Playground v2.5), which receives c_noise = 0.25 ln(sigma) as timestep."""
    generator = torch.Generator().manual_seed(0)
    batch = len(c_noise)
    added = {"text_embeds": torch.randn(batch, 32, generator=generator), "time_ids": torch.randn(batch, 6)}
    sample, embeds = torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 8, 64, generator=generator)
    return lambda: unet(sample, c_noise, embeds, added_cond_kwargs=added).sample.sum().backward()


@pytest.mark.parametrize("given", ["scheduler", "timestep_fn", "neither"])
def test_a_bare_denoiser_reads_its_timestep_through_the_scheduler_or_timestep_fn_given(given):
    """A training script holds the bare UNet: only the pipeline's EDM scheduler says that its timestep is c_noise.
    Each sample's rank is that of its flow time sigma / (1 + sigma) x 1000 (hand-written, as test_families'
    reference maps EDM sigmas)."""
    pipe, _ = tiny.sdxl("edm", rank=None)
    unet = pipe.unet.float().requires_grad_(False)
    options = {
        "scheduler": {"scheduler": pipe.scheduler},
        "timestep_fn": {"timestep_fn": lambda module, args, kwargs: (s := (4 * args[1]).exp()) / (1 + s) * 1000},
        "neither": {},
    }[given]
    network = create_tlora(unet, config(8), **options)
    sigmas = torch.tensor(EDM_SIGMAS)
    expected = [lycoris_rank(sigma / (1 + sigma) * 1000, 1000, 8, 2) for sigma in EDM_SIGMAS]
    group = installed_hook(unet).adapters["default"].group_id
    seen = sample_ranks(network, group, edm_unet_call(unet, 0.25 * sigmas.log()))
    if given == "neither":  # read as a raw DDPM t (about -1 .. 1): every sample at nearly full rank
        assert all(ranks != expected for ranks in seen)
    else:
        assert all(ranks == expected for ranks in seen), (expected, seen[0])


def test_a_bare_bf16_transformer_given_the_scheduler_snaps_validation_calls_to_it(rank_probe):
    """Validation through the stock pipeline after `create_tlora(pipe.transformer, ..., scheduler=pipe.scheduler)`:
    the bf16-rounded t / 1000 of every step is snapped back to its step, as on the pipeline."""
    pipe, kw = tiny.flux(rank=None, steps=25)
    preset = {"target_module": ["FluxAttention", "FeedForward"]}
    create_tlora(pipe.transformer, config(64, tlora_min_rank=1, apply_preset=preset), scheduler=pipe.scheduler)
    rank_probe.watch("transformer", pipe.transformer)
    run(pipe, kw, latents((1, 4, 4)).bfloat16())
    assert rank_probe.ranks() == expected_ranks(pipe, (64, 1, 1.0), calls_per_step=2)


def test_two_experts_need_a_component():
    pipe, _ = tiny.wan("2.2_a14b", rank=None)
    with pytest.raises(TLoRAError, match="several denoisers.*component="):
        create_tlora(pipe, config())
    network = create_tlora(pipe, config(), component="transformer_2")
    assert pipe.transformer_2.tlora["default"] is network and "tlora" not in pipe.transformer._modules


@pytest.mark.parametrize("mode", ["lycoris", "low_memory"])
def test_sequential_offload_leaves_the_registered_adapter_its_weights(mode):
    """accelerate's sequential offload (here on the CPU) puts the weights of every module holding tensors on the
    meta device outside its own forward; LyCORIS reads the adapter's without calling those modules, so the adapter is
    taken back out before each call, and the output is the unoffloaded one."""
    from accelerate import cpu_offload

    outputs = []
    for offload in (False, True):
        pipe, kw = tiny.sdxl(rank=None, steps=2)
        network = create_tlora(pipe, config(), mode=mode)
        tiny.perturbed(network)
        if offload:
            cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
            assert all(p.device.type == "meta" for p in network.parameters())
        outputs.append(run(pipe, kw, latents()))
        assert all(p.device.type == "cpu" for p in network.parameters())
    assert torch.equal(*outputs)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_create_inside_an_open_with_block_is_refused_and_the_block_keeps_its_hooks(adapter_name):
    """As `load_tlora` there: a create that took the block's hooks off would leave the rest of the block unmasked."""
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    tiny.perturbed(create_tlora(pipe, config()))
    with enable_tlora(pipe, max_rank=8, min_rank=2):
        hook = installed_hook(pipe.unet)
        inside = run(pipe, kw, latents())
        with pytest.raises(TLoRAError, match="create_tlora on unet, whose T-LoRA hooks belong to an open"):
            create_tlora(pipe, config(), adapter_name=adapter_name)
        assert installed_hook(pipe.unet) is hook and hook.in_block
        assert torch.equal(run(pipe, kw, latents()), inside), "the block still masks with its own adapter"
    assert set(get_tlora_adapters(pipe)["unet"]) == {"default"}
