"""`create_tlora`: LyCORIS's own network and initial values (computed batched), registered under the denoiser, with
presets reported, LyCORIS's class state left alone, and every failure leaving the pipeline as it was."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from test_loading import layer_state

import tiny
from compat_tools import run
from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks import TLoRAError, create_tlora, load_tlora, unload_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import installed_hook
from tlora_hooks.presets import DEFAULT_TARGETS, PRESET_ATTRIBUTES

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
    tiny_perturb(network)
    pipe.to(torch.bfloat16)
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert installed_hook(pipe.unet).mode.mask_dtype == torch.bfloat16
    reference = run(pipe, kw, latents().bfloat16())
    create_tlora(pipe, config(), mode="fold")  # a fresh one on the bf16 weights, fast mode: runs, and at init is exact
    assert run(pipe, kw, latents().bfloat16()).dtype == reference.dtype == torch.bfloat16


def tiny_perturb(network, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.abs().mean())


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
    tiny_perturb(network)
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
        tiny_perturb(create_tlora(pipe, config()))
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
    tiny_perturb(first)
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
        tiny_perturb(create_tlora(pipe, config(), mode="lycoris"))
    before = snapshot(pipe, kw)
    extra, message = BAD_CONFIGS[case]
    with pytest.raises(TLoRAError, match=message):
        create_tlora(pipe, {k: v for k, v in config(**extra).items() if v is not None})
    after = snapshot(pipe, kw)
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


def test_a_failure_while_building_puts_the_previous_adapter_back(monkeypatch):
    from tlora_hooks import creation

    pipe, kw = tiny.sdxl(rank=None, steps=2)
    tiny_perturb(create_tlora(pipe, config(), mode="lycoris"))
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
    ],
)
def test_bad_arguments_raise(kwargs, message, tmp_path):
    pipe, _ = tiny.sdxl(rank=None)
    kwargs = {"config": config(), **kwargs}
    error = message if isinstance(message, type) else TLoRAError
    with pytest.raises(error, match=None if isinstance(message, type) else message):
        create_tlora(pipe, **kwargs)
    assert "tlora" not in pipe.unet._modules


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
        tiny_perturb(network)
        if offload:
            cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
            assert all(p.device.type == "meta" for p in network.parameters())
        outputs.append(run(pipe, kw, latents()))
        assert all(p.device.type == "cpu" for p in network.parameters())
    assert torch.equal(*outputs)
