"""`load_tlora` gives LyCORIS's own masked output for every format, `unload_tlora` restores the pipeline exactly,
and every bad input raises TLoRAError without touching the pipeline."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules.tlora import set_timestep_mask
from safetensors.torch import load_file, save_file

import tiny
import tlora_files
from compat_tools import hook_counts, layer_state, scheduler_state_masks
from conftest import lycoris_rank
from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks import TLoRAError, enable_tlora, load_tlora, loading, unload_tlora
from tlora_hooks.commands import main
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import installed_hook
from tlora_hooks.records import loaded_adapters
from tlora_hooks.schedule import masks_by_rank

SCHEDULE = dict(linear_dim=8, linear_alpha=4, tlora_min_rank=2, tlora_alpha=0.5)


def run(pipe, kw, seed=1, shape=None):
    shape = shape or ((1, 4, 4, 4) if hasattr(pipe, "unet") else (1, 4, 4))
    dtype = next(pipe.components[n] for n in ("unet", "transformer") if n in pipe.components).dtype
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return pipe(**kw, latents=latents, return_dict=False)[0]


def save_trained(pipe, denoiser, path, *, scale=0.5, **config):
    """A perturbed LyCORIS T-LoRA with LoRA alpha = scale * rank, saved as SimpleTuner does; returns the network."""
    network = tiny.add_tlora(denoiser, 8)
    for module in network.loras:
        module.alpha.fill_(scale * module.lora_dim)
        module.scale = scale
    tlora_files.simpletuner_file(network, path, **config)
    return network


@pytest.fixture(scope="module")
def sdxl_trained(tmp_path_factory):
    """The in-memory network's masked output and ranks, and its file with SimpleTuner metadata."""
    pipe, kw = tiny.sdxl(rank=None)
    path = str(tmp_path_factory.mktemp("sdxl") / "tlora.safetensors")
    network = save_trained(pipe, pipe.unet, path, **SCHEDULE)
    handle = enable_tlora(pipe, max_rank=8, min_rank=2, alpha=0.5)
    reference = run(pipe, kw)
    handle.remove()
    network.restore()
    return path, reference


@pytest.fixture
def sdxl():
    """A fresh tiny SDXL without adapter; two steps, as these tests compare outputs, not schedules."""
    return tiny.sdxl(rank=None, steps=2)


def test_simpletuner_file_round_trips_with_no_arguments(sdxl_trained, rank_probe, caplog):
    path, reference = sdxl_trained
    pipe, kw = tiny.sdxl(rank=None)
    rank_probe.watch("unet", pipe.unet)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        handle = load_tlora(pipe, path)
    assert not caplog.records, "the metadata says everything: no warning"
    assert handle.denoisers == ["unet"] and handle.mode == {"unet": "lycoris"}
    torch.testing.assert_close(run(pipe, kw), reference, atol=1e-5, rtol=1e-5)
    T = pipe.scheduler.config.num_train_timesteps
    assert rank_probe.ranks() == [lycoris_rank(t, T, 8, 2, 0.5) for t in pipe.scheduler.timesteps]


def test_masked_output_equals_lycoris_create_lycoris_from_weights(sdxl_trained, sdxl):
    path, _ = sdxl_trained
    pipe, kw = sdxl
    theirs, theirs_kw = tiny.sdxl(rank=None, steps=2)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, theirs.unet)
    network.apply_to()
    enable_tlora(theirs, max_rank=8, min_rank=2, alpha=0.5)
    load_tlora(pipe, path)
    torch.testing.assert_close(run(pipe, kw), run(theirs, theirs_kw), atol=1e-5, rtol=1e-5)
    mine = {module.lora_name: module for module in applied_tlora_modules(pipe.unet)}
    assert mine.keys() == {module.lora_name for module in network.loras}
    for reference in network.loras:  # every module's masked delta, for every rank the schedule can pick
        module = mine[reference.lora_name]
        assert module.scale == reference.scale == 0.5
        for mask in masks_by_rank(8)[1:]:
            set_timestep_mask(mask.unsqueeze(0), module.mask_group_id)
            set_timestep_mask(mask.unsqueeze(0), reference.mask_group_id)
            torch.testing.assert_close(module.get_diff_weight()[0], reference.get_diff_weight()[0], atol=1e-5, rtol=0)


def test_flux_bf16_round_trip_gives_the_same_ranks(tmp_path, rank_probe):
    pipe, kw = tiny.flux(rank=None)
    path = str(tmp_path / "flux.safetensors")
    network = save_trained(pipe, pipe.transformer, path, linear_dim=8, tlora_min_rank=1, tlora_alpha=2.0)
    rank_probe.watch("transformer", pipe.transformer)
    handle = enable_tlora(pipe, max_rank=8, min_rank=1, alpha=2.0)
    reference = run(pipe, kw)
    reference_ranks = rank_probe.ranks()
    handle.remove()
    network.restore()
    rank_probe.reset()
    fresh, fresh_kw = tiny.flux(rank=None)
    rank_probe.watch("transformer", fresh.transformer)
    load_tlora(fresh, path)
    out = run(fresh, fresh_kw)
    assert rank_probe.ranks() == reference_ranks and len(set(reference_ranks)) > 1
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)


def test_conv_modules_match_lycoris(tmp_path):
    """proj_in / proj_out are 1x1 convs when use_linear_projection=False; LyCORIS's tlora wraps them too."""
    def unet():
        return tiny.unet(block_out_channels=(8, 16), use_linear_projection=False, cross_attention_dim=16,
                         norm_num_groups=4)

    trained = unet()
    network = tiny.add_tlora(trained, 8, targets=("Transformer2DModel",))
    assert any(module.isconv for module in network.loras)
    path = tlora_files.simpletuner_file(network, tmp_path / "conv.safetensors")
    theirs, mine = unet(), unet()
    with lycoris_without_gc():
        reference, _ = create_lycoris_from_weights(1.0, path, theirs)
    reference.apply_to()
    enable_tlora(theirs, max_rank=8)
    load_tlora(mine, path, min_rank=1, alpha=1.0)
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 16, generator=generator)
    for t in (999, 500, 0):
        torch.testing.assert_close(
            mine(sample, t, context).sample, theirs(sample, t, context).sample, atol=1e-5, rtol=1e-5
        )


def test_unload_restores_outputs_and_layers_exactly(sdxl_trained, sdxl):
    path, _ = sdxl_trained
    pipe, kw = sdxl
    before, layers, keys = run(pipe, kw), layer_state(pipe.unet), list(pipe.unet.state_dict())
    hooks = hook_counts(pipe.unet)
    for _ in range(2):
        load_tlora(pipe, path)
        assert not torch.equal(run(pipe, kw), before)
        unload_tlora(pipe)
        assert torch.equal(run(pipe, kw), before)
        assert layer_state(pipe.unet) == layers and list(pipe.unet.state_dict()) == keys
        assert hook_counts(pipe.unet) == hooks
        assert installed_hook(pipe.unet) is None and not applied_tlora_modules(pipe.unet)
    unload_tlora(pipe)  # nothing loaded: a no-op


def test_loading_again_replaces_the_previous_file(sdxl_trained):
    path, reference = sdxl_trained
    pipe, kw = tiny.sdxl(rank=None)
    load_tlora(pipe, path, multiplier=0.3)
    count = len(applied_tlora_modules(pipe.unet))
    load_tlora(pipe, path)
    assert len(applied_tlora_modules(pipe.unet)) == count
    torch.testing.assert_close(run(pipe, kw), reference, atol=1e-5, rtol=1e-5)


def test_multiplier_scales_the_adapter(sdxl_trained, sdxl):
    path, _ = sdxl_trained
    pipe, kw = sdxl
    before = run(pipe, kw)
    load_tlora(pipe, path, multiplier=0.0)
    assert all(module.multiplier == 0.0 for module in applied_tlora_modules(pipe.unet))
    torch.testing.assert_close(run(pipe, kw), before, atol=0, rtol=0)


def test_a_bare_denoiser_can_be_loaded_and_unloaded(sdxl_trained, sdxl):
    path, _ = sdxl_trained
    pipe, kw = sdxl
    before = run(pipe, kw)
    handle = load_tlora(pipe.unet, path)
    assert handle.denoisers == ["UNet2DConditionModel"]
    unload_tlora(pipe.unet)
    assert torch.equal(run(pipe, kw), before)


def test_arguments_override_the_metadata_and_silence_is_logged(tmp_path, sdxl_trained, sdxl, caplog):
    path, _ = sdxl_trained
    pipe, _ = sdxl
    load_tlora(pipe, path, min_rank=4)
    schedule = installed_hook(pipe.unet).adapters["default"].schedule
    assert (schedule.max_rank, schedule.min_rank, schedule.alpha) == (8, 4, 0.5)
    trained, _ = tiny.sdxl(rank=None)
    bare = str(tmp_path / "bare.safetensors")
    save_trained(trained, trained.unet, bare)  # no metadata
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        load_tlora(pipe, bare)
    assert "does not record tlora_min_rank (using 1) or tlora_alpha (using 1.0)" in caplog.text
    schedule = installed_hook(pipe.unet).adapters["default"].schedule
    assert (schedule.min_rank, schedule.alpha) == (1, 1.0)


def test_converted_file_loads_with_no_arguments_like_the_original_with_them(tmp_path, sdxl):
    pipe, kw = sdxl
    source = str(tmp_path / "bare.safetensors")
    trained, _ = tiny.sdxl(rank=None)
    save_trained(trained, trained.unet, source)
    converted = str(tmp_path / "converted.safetensors")
    assert main(["convert", source, converted, "--min-rank", "3", "--alpha", "2.0"]) == 0
    load_tlora(pipe, source, min_rank=3, alpha=2.0)
    expected = run(pipe, kw)
    load_tlora(pipe, converted)
    assert torch.equal(run(pipe, kw), expected)
    assert installed_hook(pipe.unet).adapters["default"].schedule.min_rank == 3


# -- the official ControlGenAI formats --------------------------------------------------------------------------------

def _sdxl_two_steps():
    return tiny.sdxl(rank=None, steps=2)


OFFICIAL = {
    "sdxl_ortho": (_sdxl_two_steps, "unet", "ortho", tlora_files.save_official_sdxl, "w.safetensors"),
    "sdxl_vanilla": (_sdxl_two_steps, "unet", "vanilla", tlora_files.save_official_sdxl, "w.safetensors"),
    "flux_lora_pt": (lambda: tiny.flux(rank=None, dtype=torch.float32, steps=2), "transformer", "vanilla",
                     tlora_files.save_official_flux, "lora.pt"),
}


@pytest.mark.parametrize("case", list(OFFICIAL))
def test_official_files_give_the_official_layer_output(tmp_path, case, caplog):
    build, component, variant, save, name = OFFICIAL[case]
    pipe, kw = build()
    denoiser = getattr(pipe, component)
    state = tlora_files.official_state(denoiser, 4, variant, seed=3)
    path = save(state, tmp_path / name)
    before = run(pipe, kw)
    with caplog.at_level(logging.INFO, logger="tlora_hooks"):
        handle = load_tlora(pipe, path, min_rank=1, strict=True, mode="lycoris")  # layers read the group's mask
    assert ("skipped 8 keys its trainer built but never used" in caplog.text) == (case == "flux_lora_pt")
    group = handle.mask_groups[component]
    generator = torch.Generator().manual_seed(0)
    for prefix, layer in tlora_files.official_layers(denoiser).items():
        if layer is None:
            continue
        x = torch.randn(3, layer.in_features, generator=generator)
        for mask in masks_by_rank(4)[1:]:
            set_timestep_mask(mask.unsqueeze(0), group)
            plain = torch.nn.functional.linear(x, layer.weight, layer.bias)  # the layer without LyCORIS
            expected = plain + tlora_files.official_delta(state, prefix, x, mask)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(run(pipe, kw), before)
    unload_tlora(pipe)
    assert torch.equal(run(pipe, kw), before)


def test_converted_official_file_loads_identically(tmp_path, sdxl):
    pipe, kw = sdxl
    state = tlora_files.official_state(pipe.unet, 4, "ortho")
    source = tlora_files.save_official_sdxl(state, tmp_path / "o.safetensors")
    converted = str(tmp_path / "c.safetensors")
    assert main(["convert", source, converted, "--min-rank", "2"]) == 0
    load_tlora(pipe, source, min_rank=2)
    expected = run(pipe, kw)
    load_tlora(pipe, converted)
    assert torch.equal(run(pipe, kw), expected)


# -- one file, several denoisers --------------------------------------------------------------------------------------

def test_wan22_experts_need_a_component_and_keep_their_own_schedules(tmp_path):
    pipe, _ = tiny.wan("2.2_a14b", rank=None)
    trained, _ = tiny.wan("2.2_a14b", rank=None)
    high = str(tmp_path / "high.safetensors")
    save_trained(trained, trained.transformer, high, tlora_min_rank=1)
    low = str(tmp_path / "low.safetensors")
    save_trained(trained, trained.transformer_2, low, tlora_min_rank=4)
    with pytest.raises(TLoRAError, match="fits transformer and transformer_2 equally.*component='transformer_2'"):
        load_tlora(pipe, high)
    load_tlora(pipe, high, component="transformer")
    load_tlora(pipe, low, component="transformer_2")
    assert installed_hook(pipe.transformer).adapters["default"].schedule.min_rank == 1
    assert installed_hook(pipe.transformer_2).adapters["default"].schedule.min_rank == 4
    unload_tlora(pipe)
    assert installed_hook(pipe.transformer) is None and not applied_tlora_modules(pipe.transformer_2)


# -- bad input: TLoRAError, and the pipeline exactly as it was --------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    files = {}
    (folder / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    files["corrupt"] = str(folder / "corrupt.safetensors")
    plain = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8)}
    save_file(plain, str(folder / "plain.safetensors"))
    files["plain"] = str(folder / "plain.safetensors")
    flux, _ = tiny.flux(rank=None, dtype=torch.float32)
    flux_state = tlora_files.official_state(flux.transformer, 4, "vanilla")
    files["other_model"] = tlora_files.save_official_flux(flux_state, folder / "lora.pt")
    torch.save({"x.processor.to_q_lora.down.weight": torch.nn.Linear(2, 2)}, str(folder / "objects.pt"))
    files["pickle_with_objects"] = str(folder / "objects.pt")
    sdxl, _ = tiny.sdxl(rank=None)
    tensors = tlora_files.official_state(sdxl.unet, 4, "vanilla")
    tensors["not_a_module_of_sdxl.processor.to_q_lora.down.weight"] = torch.zeros(4, 8)
    tensors["not_a_module_of_sdxl.processor.to_q_lora.up.weight"] = torch.zeros(8, 4)
    files["partial"] = tlora_files.save_official_sdxl(tensors, folder / "partial.safetensors")
    mixed = tlora_files.official_state(sdxl.unet, 4, "vanilla")
    down = next(k for k in mixed if k.endswith("to_q_lora.down.weight"))
    up = down[: -len("down.weight")] + "up.weight"
    mixed[down], mixed[up] = torch.zeros(2, mixed[down].shape[1]), torch.zeros(mixed[up].shape[0], 2)
    files["mixed_ranks"] = tlora_files.save_official_sdxl(mixed, folder / "mixed.safetensors")
    wide = tlora_files.official_state(sdxl.unet, 4, "vanilla")
    for key in list(wide):
        if key.endswith("down.weight"):
            wide[key] = torch.zeros(4, wide[key].shape[1] + 1)
    files["wrong_shapes"] = tlora_files.save_official_sdxl(wide, folder / "wide.safetensors")
    conv = sdxl.unet.conv_in  # a 3x3 conv: LyCORIS's T-LoRA forward cannot run on it
    save_file({"lycoris_conv_in.q_layer.weight": torch.zeros(4, conv.in_channels, 1, 1),
               "lycoris_conv_in.p_layer.weight": torch.zeros(conv.out_channels, 4, 1, 1),
               "lycoris_conv_in.lambda_layer": torch.ones(1, 4), "lycoris_conv_in.alpha": torch.tensor(4.0)},
              str(folder / "conv3x3.safetensors"))
    files["conv_3x3"] = str(folder / "conv3x3.safetensors")
    good = tlora_files.official_state(sdxl.unet, 4, "ortho")
    files["good"] = tlora_files.save_official_sdxl(good, folder / "good.safetensors")
    files.update(damaged_lycoris_files(folder))
    return files


# A module of the tiny SDXL's LyCORIS file, and what each damaged copy changes in it.
FIRST = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
DAMAGE = {
    "int32_q": lambda t: t.update({f"{FIRST}.q_layer.weight": t[f"{FIRST}.q_layer.weight"].to(torch.int32)}),
    "bool_lambda": lambda t: t.update({f"{FIRST}.lambda_layer": t[f"{FIRST}.lambda_layer"] > 0}),
    "nan_p": lambda t: t[f"{FIRST}.p_layer.weight"].view(-1)[3:4].fill_(float("nan")),
    "inf_alpha": lambda t: t[f"{FIRST}.alpha"].fill_(float("inf")),
    "two_alphas": lambda t: t.update({f"{FIRST}.alpha": torch.tensor([4.0, 4.0])}),
}
# lycoris_config metadata that cannot be used: a load without arguments must refuse it, not fall back to defaults.
BAD_METADATA = {
    "config_not_json": '{"algo": "tlora", "tlora_min_rank": 2,',
    "config_a_list": '["tlora", 2, 0.5]',
    "alpha_abc": json.dumps({"algo": "tlora", "tlora_min_rank": 1, "tlora_alpha": "abc"}),
    "min_rank_2.5": json.dumps({"algo": "tlora", "tlora_min_rank": 2.5, "tlora_alpha": 1.0}),
    "min_rank_true": json.dumps({"algo": "tlora", "tlora_min_rank": True, "tlora_alpha": 1.0}),
}


def damaged_lycoris_files(folder) -> dict[str, str]:
    """Copies of one LyCORIS file of the tiny SDXL, each damaged in one tensor or in its metadata."""
    source, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(source.unet, 4)
    clean = str(folder / "clean_lycoris.safetensors")
    tlora_files.simpletuner_file(network, clean)
    files = {}
    for case, damage in DAMAGE.items():
        tensors = load_file(clean)
        damage(tensors)
        files[case] = str(folder / f"{case}.safetensors")
        save_file(tensors, files[case])
    for case, config in BAD_METADATA.items():
        files[case] = str(folder / f"{case}.safetensors")
        save_file(load_file(clean), files[case], {"lycoris_config": config})
    return files


BAD = {
    "missing_file": (dict(path="/nonexistent/t.safetensors"), TLoRAError, "No T-LoRA file or folder at"),
    "corrupt": (dict(path="corrupt"), TLoRAError, "neither a safetensors file"),
    "plain_lora": (dict(path="plain"), TLoRAError, "plain LoRA.*load_lora_weights"),
    "other_model": (dict(path="other_model"), TLoRAError, r"None of the \d+ T-LoRA modules.*0 matched, \d+ unmatched"),
    "strict_unmatched": (dict(path="partial", strict=True), TLoRAError, r"modules match unet.*1 keys match nothing"),
    "mixed_ranks": (dict(path="mixed_ranks"), TLoRAError, "different ranks"),
    "pickle_with_objects": (dict(path="pickle_with_objects"), TLoRAError, "does not hold plain tensors"),
    "wrong_shapes": (dict(path="wrong_shapes"), TLoRAError, "made for another model"),
    "conv_3x3": (dict(path="conv_3x3"), TLoRAError, r"\(3, 3\) conv.*only runs on 1x1 convs"),
    "unknown_mode": (dict(path="good", mode="fastest"), TLoRAError, "Unknown mode"),
    "bad_multiplier": (dict(path="good", multiplier=float("nan")), TLoRAError, "multiplier must be a finite number"),
    "min_rank_above_rank": (dict(path="good", min_rank=5), TLoRAError, "larger than max_rank"),
    "unknown_component": (dict(path="good", component="vae"), TLoRAError, "not a module of this pipeline"),
    # The tensors each module uses are floating point, finite, and shaped as one module (the first bad key named).
    "int32_tensor": (dict(path="int32_q"), TLoRAError, f"{FIRST}.q_layer.weight holds torch.int32 values"),
    "bool_tensor": (dict(path="bool_lambda"), TLoRAError, f"{FIRST}.lambda_layer holds torch.bool values"),
    "nan_value": (dict(path="nan_p"), TLoRAError, f"{FIRST}.p_layer.weight holds NaN or infinite values"),
    "inf_alpha": (dict(path="inf_alpha"), TLoRAError, rf"{FIRST}.alpha holds NaN or infinite values"),
    "alpha_not_scalar": (dict(path="two_alphas"), TLoRAError, rf"{FIRST}.alpha holds 2 values"),
    # lycoris_config that is present but unusable: an error naming the key, never a silent default.
    "metadata_not_json": (dict(path="config_not_json"), TLoRAError, "`lycoris_config` metadata is not valid JSON"),
    "metadata_a_list": (dict(path="config_a_list"), TLoRAError, "`lycoris_config` metadata is a JSON list"),
    "metadata_alpha_abc": (dict(path="alpha_abc"), TLoRAError, r"`tlora_alpha` = 'abc', not a finite number.*alpha="),
    "metadata_min_rank_2.5": (dict(path="min_rank_2.5"), TLoRAError, r"`tlora_min_rank` = 2.5, not an integer >= 0"),
    "metadata_min_rank_true": (dict(path="min_rank_true"), TLoRAError, r"`tlora_min_rank` = True, not an integer"),
}


def snapshot(pipe, kw, output=None):
    """The output and every piece of state a load touches: layers, hooks, the loaded record, the applied modules."""
    unet = pipe.unet
    return (run(pipe, kw) if output is None else output, layer_state(unet), installed_hook(unet),
            loaded_adapters(unet), [id(m) for m in applied_tlora_modules(unet)])


def assert_same(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1:] == after[1:]


@pytest.fixture(scope="module")
def baseline_outputs(bad_files):
    """The output of a fresh tiny SDXL, and of one with the good file loaded (the builders are deterministic)."""
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    fresh = run(pipe, kw)
    load_tlora(pipe, bad_files["good"], min_rank=1)
    return {False: fresh, True: run(pipe, kw)}


@pytest.mark.parametrize("already_loaded", [False, True], ids=["fresh", "with_a_loaded_file"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_changes_nothing(bad_files, baseline_outputs, sdxl, case, already_loaded):
    pipe, kw = sdxl
    if already_loaded:
        load_tlora(pipe, bad_files["good"], min_rank=1)
    arguments, error, words = BAD[case]
    arguments = dict(arguments, path=bad_files.get(arguments["path"], arguments["path"]))
    run(pipe, kw)  # the default mode settles its paths on the first call after enabling
    before = snapshot(pipe, kw)
    torch.testing.assert_close(before[0], baseline_outputs[already_loaded], atol=1e-5, rtol=1e-5)
    with pytest.raises(error, match=words):
        load_tlora(pipe, **arguments)
    assert_same(before, snapshot(pipe, kw))


def test_load_tlora_onto_fused_qkv_projections_is_refused_and_changes_nothing(bad_files, sdxl):
    """The fused attention would run its to_qkv layer, not the layers the file's modules go on."""
    pipe, kw = sdxl
    pipe.fuse_qkv_projections(vae=False)
    before = snapshot(pipe, kw)
    with pytest.raises(TLoRAError, match=r"fused q/k/v projections.*Call unfuse_qkv_projections\(\)"):
        load_tlora(pipe, bad_files["good"], min_rank=1)
    assert_same(before, snapshot(pipe, kw))


def test_unmatched_keys_warn_without_strict(bad_files, sdxl, caplog):
    pipe, _ = sdxl
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        load_tlora(pipe, bad_files["partial"], min_rank=1)
    assert "1 keys match nothing" in caplog.text and "strict=True" in caplog.text


def test_a_failure_while_enabling_puts_the_previous_file_back(bad_files, sdxl, monkeypatch):
    pipe, kw = sdxl
    load_tlora(pipe, bad_files["good"], min_rank=1)
    before = snapshot(pipe, kw)
    calls = []
    original = loading.hook_denoisers

    def fail_once(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise TLoRAError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "hook_denoisers", fail_once)
    with pytest.raises(TLoRAError, match="injected"):
        load_tlora(pipe, bad_files["good"], min_rank=2)
    after = snapshot(pipe, kw)
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and before[3:] == after[3:]
    assert installed_hook(pipe.unet).adapters["default"].schedule.min_rank == 1


def test_modules_applied_by_hand_are_not_stacked_on(bad_files):
    pipe, kw = tiny.sdxl(rank=8)
    before = run(pipe, kw)
    with pytest.raises(TLoRAError, match="already holds 40 T-LoRA modules that load_tlora or create_tlora did not"):
        load_tlora(pipe, bad_files["good"], min_rank=1)
    assert torch.equal(run(pipe, kw), before)


def test_an_unknown_denoiser_class_fails_before_the_rebuild(sdxl_trained, monkeypatch):
    from tlora_hooks import conventions, rebuild

    pipe, kw = tiny.sdxl(rank=None)
    monkeypatch.setattr(conventions, "CONVENTIONS", {})
    rebuilt = []
    monkeypatch.setattr(rebuild, "rebuild_base_terms", lambda modules, **options: rebuilt.append(modules))
    with pytest.raises(TLoRAError, match="No timestep convention"):
        load_tlora(pipe, sdxl_trained[0])
    assert not rebuilt and not applied_tlora_modules(pipe.unet)


def test_enable_tlora_components_limits_and_validates(bad_files):
    pipe, _ = tiny.wan("2.2_a14b")
    first = enable_tlora(pipe, max_rank=8, min_rank=1)
    second = enable_tlora(pipe, max_rank=8, min_rank=3, components="transformer_2")
    assert first.denoisers == ["transformer"] and second.denoisers == ["transformer_2"]
    assert installed_hook(pipe.transformer).adapters["default"].schedule.min_rank == 1
    with pytest.raises(TLoRAError, match=r"components=\['vae'\]: vae holds no applied T-LoRA modules"):
        enable_tlora(pipe, max_rank=8, components=["vae"])
    assert installed_hook(pipe.transformer_2).adapters["default"].schedule.min_rank == 3


def test_offloaded_weights_are_refused(sdxl_trained):
    from diffusers import UNet2DConditionModel

    pipe, _ = tiny.sdxl(rank=None)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    with pytest.raises(TLoRAError, match="not loaded \\(meta device"):
        load_tlora(unet, sdxl_trained[0])
    assert not applied_tlora_modules(unet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loading_on_cuda_builds_and_rebuilds_there(sdxl_trained):
    path, reference = sdxl_trained
    pipe, kw = tiny.sdxl(rank=None)
    pipe.to("cuda")
    load_tlora(pipe, path)
    modules = applied_tlora_modules(pipe.unet)
    assert all(m.base_q.is_cuda and m.q_layer.weight.is_cuda and m.base_q.dtype == torch.float32 for m in modules)
    latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions, as the CPU reference
        out = pipe(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, latents=latents,
                   return_dict=False)[0]
    torch.testing.assert_close(out.cpu(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_arguments_override_unusable_metadata(bad_files, sdxl, case, caplog):
    """min_rank= and alpha= replace what the metadata records, readable or not; the load then goes on."""
    pipe, kw = sdxl
    with caplog.at_level(logging.INFO, logger="tlora_hooks"):
        load_tlora(pipe, bad_files[case], min_rank=2, alpha=0.5)
    schedule = installed_hook(pipe.unet).adapters["default"].schedule
    assert (schedule.max_rank, schedule.min_rank, schedule.alpha) == (4, 2, 0.5)
    assert "overrides the file's" in caplog.text
    with pytest.raises(TLoRAError, match="Pass (min_rank|alpha)="):  # one argument is not enough where both are bad
        load_tlora(pipe, bad_files[case], **({"alpha": 0.5} if "min_rank" in case else {"min_rank": 2}))


def test_inspect_and_convert_name_unusable_metadata(bad_files, tmp_path, capsys):
    assert main(["inspect", bad_files["alpha_abc"]]) == 0
    assert "alpha:         invalid: its `lycoris_config` metadata has `tlora_alpha` = 'abc'" in capsys.readouterr().out
    assert main(["convert", bad_files["alpha_abc"], str(tmp_path / "out.safetensors")]) == 2
    assert "`tlora_alpha` = 'abc'" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()
    assert main(["convert", bad_files["alpha_abc"], str(tmp_path / "out.safetensors"), "--alpha", "0.5"]) == 0


def test_with_load_tlora_unloads_at_the_end_and_cannot_be_nested(bad_files, sdxl_trained, sdxl):
    """Left applied without its hooks, the file's modules would run every rank at every step after the block."""
    pipe, kw = sdxl
    before_state, before = layer_state(pipe.unet), run(pipe, kw)
    with load_tlora(pipe, bad_files["good"], min_rank=1):
        loaded = run(pipe, kw)
        with pytest.raises(TLoRAError, match="open `with enable_tlora"):
            with load_tlora(pipe, sdxl_trained[0]):
                pass
        with pytest.raises(TLoRAError, match="open `with enable_tlora"):
            enable_tlora(pipe, max_rank=4, alpha=2.0)
        assert torch.equal(run(pipe, kw), loaded), "the open block keeps its file, hooks and schedule"
    assert not torch.equal(loaded, before)
    assert torch.equal(run(pipe, kw), before) and layer_state(pipe.unet) == before_state
    assert not applied_tlora_modules(pipe.unet) and installed_hook(pipe.unet) is None


SD3_LATENTS = (1, 4, 4, 4)


@pytest.mark.parametrize("dtype", [None, torch.float8_e4m3fn], ids=["int64_alpha", "fp8"])
def test_files_lycoris_saves_load_as_lycoris_loads_them(tmp_path, dtype, capsys):
    """`save_weights(path, None)` keeps LyCORIS's int `linear_alpha` as an int64 scalar; fp8 tensors have no
    `isfinite` kernel. LyCORIS's `create_lycoris_from_weights` loads both files: so must load_tlora and inspect."""
    trained, _ = tiny.sd3(rank=None)
    path = tlora_files.simpletuner_file(tiny.add_tlora(trained.transformer, 8), tmp_path / "t.safetensors",
                                        dtype=dtype, **SCHEDULE)
    alphas = {tensor.dtype for key, tensor in load_file(path).items() if key.endswith(".alpha")}
    assert alphas == {torch.int64 if dtype is None else dtype}, "the file LyCORIS wrote is the case under test"
    reference, kw = tiny.sd3(rank=None, steps=3)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, reference.transformer)
    network.apply_to()
    with scheduler_state_masks(reference, (8, 2, 0.5)):
        expected = run(reference, kw, shape=SD3_LATENTS)
    pipe, kw = tiny.sd3(rank=None, steps=3)
    plain = run(pipe, kw, shape=SD3_LATENTS)
    load_tlora(pipe, path)
    out = run(pipe, kw, shape=SD3_LATENTS)
    assert not torch.equal(out, plain), "the T-LoRA applies"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert main(["inspect", path]) == 0 and "damaged" not in capsys.readouterr().out


# -- a PEFT LoRA already on the layers --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["low_memory", "lycoris"])
def test_pipe_to_float64_after_loading_casts_the_registered_modules_and_gives_lycoris_output(tmp_path, mode):
    """The modules load_tlora registers under the denoiser follow `pipe.to(dtype)`: no dtype mismatch at the call."""
    trained, _ = tiny.sd3(rank=None)
    path = str(tmp_path / "sd3.safetensors")
    save_trained(trained, trained.transformer, path, **SCHEDULE)
    reference, kw = tiny.sd3(rank=None, steps=3)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, reference.transformer)
    network.apply_to()
    reference.to(torch.float64)
    network.to(torch.float64)  # a network applied by hand is not part of the denoiser
    kw64 = {key: value.double() if torch.is_tensor(value) else value for key, value in kw.items()}
    with scheduler_state_masks(reference, (8, 2, 0.5), mask_dtype=torch.float64):
        expected = run(reference, kw64, shape=SD3_LATENTS)
    pipe, kw = tiny.sd3(rank=None, steps=3)
    load_tlora(pipe, path, mode=mode)
    run(pipe, kw, shape=SD3_LATENTS)  # enabled and run in float32 first
    pipe.to(torch.float64)
    assert {module.q_layer.weight.dtype for module in applied_tlora_modules(pipe.transformer)} == {torch.float64}
    out = run(pipe, kw64, shape=SD3_LATENTS)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_load_tlora_onto_layers_of_a_fused_peft_lora_is_refused_and_changes_nothing(tmp_path):
    """The file's base terms would be rebuilt from weights with the PEFT delta fused in, not the trained ones."""
    trained, _ = tiny.sd3(rank=None)
    path = str(tmp_path / "sd3.safetensors")
    save_trained(trained, trained.transformer, path, **SCHEDULE)
    pipe, kw = tiny.sd3(rank=None, steps=3)
    pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
    pipe.fuse_lora()
    state = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    modules, fused = list(pipe.transformer.modules()), run(pipe, kw, shape=SD3_LATENTS)
    with pytest.raises(TLoRAError, match=r"PEFT LoRA is fused into this layer.*unfuse_lora\(\) before load_tlora"):
        load_tlora(pipe, path)
    assert list(pipe.transformer.modules()) == modules and installed_hook(pipe.transformer) is None
    after = pipe.transformer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[name], state[name]) for name in state)
    assert torch.equal(run(pipe, kw, shape=SD3_LATENTS), fused)
    pipe.unfuse_lora()
    load_tlora(pipe, path)  # what the message says to do
    assert len(applied_tlora_modules(pipe.transformer)) == len(applied_tlora_modules(trained.transformer))


@pytest.mark.parametrize("mode", ["lycoris", "low_memory", "fold", "auto"])
def test_load_tlora_onto_layers_a_peft_lora_wraps(tmp_path, mode, request):
    """The T-LoRA goes on PEFT's base layer, as LyCORIS's create_lycoris_from_weights puts it: both adapters apply,
    the ranks are the schedule's, and the output is LyCORIS's own (its mask set from the scheduler's step)."""
    trained, _ = tiny.sd3(rank=None)
    path = str(tmp_path / "sd3.safetensors")
    save_trained(trained, trained.transformer, path, **SCHEDULE)

    def pipeline(with_peft: bool):
        pipe, kw = tiny.sd3(rank=None, steps=3)
        if with_peft:
            pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
        return pipe, kw

    reference, kw = pipeline(with_peft=True)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, reference.transformer)
    network.apply_to()
    assert sum(module.peft_wrapper is not None for module in network.loras) == 3, "LyCORIS's modules on PEFT's layers"
    with scheduler_state_masks(reference, (8, 2, 0.5)):
        expected = run(reference, kw, shape=SD3_LATENTS)
    assert not torch.equal(run(reference, kw, shape=SD3_LATENTS), expected), "unmasked differs"

    pipe, kw = pipeline(with_peft=True)
    peft_only = run(pipe, kw, shape=SD3_LATENTS)
    handle = load_tlora(pipe, path, mode=mode)
    assert ("fold" in handle.mode["transformer"]) == (mode in ("fold", "auto"))
    if mode == "lycoris":  # only LyCORIS's own forward reads the mask per module, so only it can be probed
        rank_probe = request.getfixturevalue("rank_probe").watch("transformer", pipe.transformer)
        out = run(pipe, kw, shape=SD3_LATENTS)
        assert rank_probe.ranks() == [lycoris_rank(t, 1000, 8, 2, 0.5) for t in pipe.scheduler.timesteps]
    else:
        out = run(pipe, kw, shape=SD3_LATENTS)
    assert not torch.equal(out, peft_only), "the T-LoRA applies"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    unload_tlora(pipe)
    assert torch.equal(run(pipe, kw, shape=SD3_LATENTS), peft_only), "the PEFT LoRA stays, untouched"
