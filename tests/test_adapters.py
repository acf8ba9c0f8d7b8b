"""Several T-LoRAs on one denoiser: each adapter masked by its own schedule, scaled by its own strength, in every mode.

The reference is LyCORIS's own forward: the same files through `create_lycoris_from_weights` on a second pipeline,
each network in a mask group of its own, its mask set from the scheduler's own timestep by its own schedule around
every denoiser call, and a strength as LyCORIS's `multiplier`. Every denoiser call's output is compared.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

import tiny
import tlora_files
from compat_tools import hook_counts
from devtools.lycoris_build import lycoris_without_gc
from devtools.measure import relative_error
from tlora_hooks import (
    TLoRAError,
    create_tlora,
    delete_tlora_adapters,
    enable_tlora,
    get_tlora_adapters,
    load_tlora,
    loading,
    save_tlora,
    set_tlora_adapter_weight,
    set_tlora_adapters,
    unload_tlora,
)
from tlora_hooks.call_rank import CallRank
from tlora_hooks.hooks import installed_hook
from tlora_hooks.modes.chain import ChainLink
from tlora_hooks.records import loaded_adapters
from tlora_hooks.schedule import RankSchedule

MODES = ("lycoris", "fold", "low_memory", "auto")
# (rank, min_rank, alpha, LoRA alpha / rank, target classes), as each adapter was trained
ADAPTERS = {
    "subject": (8, 1, 1.0, 0.5, ("Attention",)),
    "style": (4, 2, 2.0, 1.0, ("Attention",)),  # on the same layers as "subject"
    "style_ff": (4, 2, 2.0, 1.0, ("FeedForward",)),  # on other layers
    "detail": (6, 3, 0.5, 0.8, ("Attention",)),  # a third one on the same layers
}
LAYOUTS = {"overlapping": ("subject", "style"), "disjoint": ("subject", "style_ff")}
TOLERANCE = 2e-5  # fp32, relative to each call's largest output: the fast modes fold or bypass, LyCORIS rebuilds ΔW
GROUPS = {"subject": 901, "style": 902, "style_ff": 902, "detail": 903}  # the reference's LyCORIS mask groups


def schedule_of(key: str) -> tuple[int, int, float]:
    rank, min_rank, alpha, *_ = ADAPTERS[key]
    return rank, min_rank, alpha


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Each adapter as SimpleTuner saves it (with its schedule in the metadata), trained on a tiny SD3."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (key, (rank, min_rank, alpha, scale, targets)) in enumerate(ADAPTERS.items()):
        pipe, _ = tiny.sd3(rank=None)
        network = tiny.add_tlora(pipe.transformer, rank, targets=targets, seed=seed)
        for module in network.loras:
            module.alpha.fill_(scale * rank)
        paths[key] = tlora_files.simpletuner_file(
            network, folder / f"{key}.safetensors", linear_dim=rank, tlora_min_rank=min_rank, tlora_alpha=alpha
        )
        network.restore()
    return paths


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def pipeline(with_peft: bool = False):
    pipe, kw = tiny.sd3(rank=None, steps=3)
    if with_peft:
        pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="peft")
    return pipe, kw


@contextmanager
def recorded_calls(pipe):
    """Every transformer call's output, in order."""
    outputs: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        yield outputs
    finally:
        handle.remove()


def run_calls(pipe, kw) -> list[torch.Tensor]:
    """One pipeline run from fixed latents: each denoiser call's output, and the final latents last."""
    with recorded_calls(pipe) as outputs, torch.no_grad():
        final = pipe(**kw, latents=latents(), return_dict=False)[0]
    return outputs + [final]


@contextmanager
def scheduler_group_masks(pipe, schedules: dict[int, tuple[int, int, float]]):
    """LyCORIS's mask of each group from `pipe.scheduler`'s current step and the group's own schedule, set around
    every denoiser call, as SimpleTuner's vendored pipelines set one."""

    def set_masks(module, args, kwargs):
        scheduler = pipe.scheduler
        t = scheduler.timesteps[scheduler.step_index or 0]
        for group, schedule in schedules.items():
            set_timestep_mask(compute_timestep_mask(int(t), scheduler.config.num_train_timesteps, *schedule), group)

    def clear_masks(module, args, kwargs, output):
        for group in schedules:
            clear_timestep_mask(group)

    handles = [
        pipe.transformer.register_forward_pre_hook(set_masks, with_kwargs=True),
        pipe.transformer.register_forward_hook(clear_masks, with_kwargs=True, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def lycoris_reference(files, adapters: dict[str, float], *, with_peft=False, one_schedule=None) -> list[torch.Tensor]:
    """LyCORIS's own forward with `adapters` ({key: strength as its multiplier}), each in its own mask group masked
    by its own schedule (or all by `one_schedule`, to show a test tells them apart)."""
    pipe, kw = pipeline(with_peft)
    schedules = {}
    for key, weight in adapters.items():
        with lycoris_without_gc():
            network, _ = create_lycoris_from_weights(weight, files[key], pipe.transformer)
        network.apply_to()
        for module in network.loras:
            module.mask_group_id = GROUPS[key]
        schedules[GROUPS[key]] = one_schedule or schedule_of(key)
    with scheduler_group_masks(pipe, schedules):
        return run_calls(pipe, kw)


def assert_calls_close(outputs, reference, what=""):
    assert len(outputs) == len(reference), what
    for index, (out, ref) in enumerate(zip(outputs, reference)):
        error = relative_error(out, ref)
        assert error <= TOLERANCE, f"{what} call {index}: relative error {error:.2e}"


def largest_error(outputs, reference) -> float:
    return max(relative_error(out, ref) for out, ref in zip(outputs, reference))


def load_both(pipe, files, layout: str, mode: str | None = None):
    first, second = LAYOUTS[layout]
    load_tlora(pipe, files[first], adapter_name=first, mode=mode)
    return load_tlora(pipe, files[second], adapter_name=second)


@pytest.fixture(scope="module")
def references(files) -> dict[str, list[torch.Tensor]]:
    """Per layout: LyCORIS with both adapters each under its own schedule. Each is checked to differ, by far more
    than the tolerance, from the same adapters under one schedule and from the first adapter alone."""
    found = {}
    for layout, (first, second) in LAYOUTS.items():
        found[layout] = lycoris_reference(files, {first: 1.0, second: 1.0})
        one_schedule = lycoris_reference(files, {first: 1.0, second: 1.0}, one_schedule=schedule_of(first))
        assert largest_error(one_schedule, found[layout]) > 50 * TOLERANCE, "each schedule must matter"
        assert largest_error(lycoris_reference(files, {first: 1.0}), found[layout]) > 50 * TOLERANCE
    return found


# -- each adapter masked by its own schedule, in every mode -----------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_adapters_equal_lycoris_each_masked_by_its_own_schedule(files, references, layout, mode):
    pipe, kw = pipeline()
    handle = load_both(pipe, files, layout, mode=mode)
    assert ("fold" in handle.mode["transformer"]) == (mode in ("fold", "auto")), handle.mode
    adapters = get_tlora_adapters(pipe)["transformer"]
    first, second = LAYOUTS[layout]
    assert list(adapters) == [first, second]
    for name, adapter in adapters.items():
        assert adapter.schedule == RankSchedule(*schedule_of(name)) and adapter.active and adapter.weight == 1.0
    assert adapters[first].mask_group != adapters[second].mask_group
    assert_calls_close(run_calls(pipe, kw), references[layout], f"{layout}, {mode}:")


def test_the_fold_folds_both_adapters_of_a_layer_in_one_stack(files):
    pipe, _ = pipeline()
    load_both(pipe, files, "overlapping", mode="fold")
    (fold,) = [part for part in installed_hook(pipe.transformer).mode.parts if part.name.startswith("fold")]
    assert fold.stacks and all(len(stack.signature) == 2 for stack in fold.stacks)
    assert {rank for stack in fold.stacks for _, rank in stack.signature} == {8, 4}
    assert all(stack.a.shape[1] == 2 * (8 + 4) for stack in fold.stacks), "factors concatenated along the rank"


def test_the_timestep_is_read_once_per_call_whatever_the_number_of_adapters(files, monkeypatch):
    reads = []
    original = CallRank.scheduler_timestep
    monkeypatch.setattr(CallRank, "scheduler_timestep", lambda *args: reads.append(1) or original(*args))
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping")
    calls = run_calls(pipe, kw)
    assert len(reads) == len(calls) - 1


# -- strengths --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_strengths_equal_lycoris_with_the_multiplier_scaled_and_change_between_calls(files, mode):
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping", mode=mode)
    set_tlora_adapters(pipe, ["subject", "style"], [0.7, 0.0])
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"subject": 0.7, "style": 0.0}), f"{mode} 0.7/0")
    built = built_state(installed_hook(pipe.transformer))
    set_tlora_adapter_weight(pipe, "style", 1.5)  # one strength, between calls, without reloading
    assert {name: a.weight for name, a in get_tlora_adapters(pipe)["transformer"].items()} == \
        {"subject": 0.7, "style": 1.5}
    reference = lycoris_reference(files, {"subject": 0.7, "style": 1.5})
    assert_calls_close(run_calls(pipe, kw), reference, f"{mode} 0.7/1.5")
    assert built_state(installed_hook(pipe.transformer)) == built, "no weight copy or factor rebuilt"


def built_state(hook) -> tuple:
    """The mode and every stack and factor tensor it holds, by identity."""
    parts = getattr(hook.mode, "parts", [hook.mode])
    stacks = [stack for part in parts for stack in getattr(part, "stacks", [])]
    return id(hook.mode), [(id(stack), id(stack.a), id(stack.b)) for stack in stacks]


@pytest.mark.parametrize("mode", MODES)
def test_an_inactive_adapter_is_out_of_the_forward_and_comes_back(files, references, mode):
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping", mode=mode)
    style = loaded_adapters(pipe.transformer).records["style"].network.loras
    set_tlora_adapters(pipe, "subject", 0.7)
    assert all(ChainLink.slot(module) is None for module in style), "no LyCORIS frame of it runs"
    assert all(id(module) not in map(id, installed_hook(pipe.transformer).mode.modules) for module in style)
    assert not get_tlora_adapters(pipe)["transformer"]["style"].active
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"subject": 0.7}), f"{mode}, style inactive")
    set_tlora_adapter_weight(pipe, "style", 0.5)  # kept for when it is active again; still inactive
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"subject": 0.7}), f"{mode}, still inactive")
    set_tlora_adapters(pipe, [])
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {}), f"{mode}, none active")
    set_tlora_adapters(pipe, ["style", "subject"])  # weights back to 1.0, as diffusers' set_adapters does
    assert_calls_close(run_calls(pipe, kw), references["overlapping"], f"{mode}, both again")


@pytest.mark.parametrize("mode", MODES)
def test_three_adapters_on_one_layer_with_the_middle_one_inactive(files, mode):
    """The inactive adapter's module sits between the other two in each layer's chain: the outer one must be found
    where it is called from now, not from the inactive module's stale link."""
    pipe, kw = pipeline()
    before = model_state(pipe.transformer)
    for name in ("subject", "style", "detail"):
        load_tlora(pipe, files[name], adapter_name=name, mode=mode)
    set_tlora_adapters(pipe, ["subject", "detail"])
    reference = lycoris_reference(files, {"subject": 1.0, "detail": 1.0})
    assert_calls_close(run_calls(pipe, kw), reference, f"{mode}, the middle one inactive")
    set_tlora_adapters(pipe, ["subject", "style", "detail"], [1.0, 0.5, 1.0])
    reference = lycoris_reference(files, {"subject": 1.0, "style": 0.5, "detail": 1.0})
    assert_calls_close(run_calls(pipe, kw), reference, f"{mode}, all three")
    set_tlora_adapters(pipe, "style")
    delete_tlora_adapters(pipe, ["detail", "subject"])
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"style": 1.0}), f"{mode}, the middle one left")
    unload_tlora(pipe)
    assert_same_state(before, model_state(pipe.transformer))


# -- unloading --------------------------------------------------------------------------------------------------------
def model_state(transformer):
    """Everything a load could leave behind: the state dict, the module tree, every module's attributes and own
    forward, and the hooks torch holds."""
    return (
        {name: tensor.clone() for name, tensor in transformer.state_dict().items()},
        [name for name, _ in transformer.named_modules()],
        {name: (sorted(vars(module)), vars(module).get("forward")) for name, module in transformer.named_modules()},
        hook_counts(transformer),
    )


def assert_same_state(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][key], after[0][key]) for key in before[0])
    assert before[1:] == after[1:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first_deleted", ["subject", "style"], ids=["inner_first", "outer_first"])
def test_deleting_one_adapter_leaves_the_other_exact_and_both_the_original(files, mode, first_deleted):
    pipe, kw = pipeline()
    original, before = run_calls(pipe, kw), model_state(pipe.transformer)
    load_both(pipe, files, "overlapping", mode=mode)
    set_tlora_adapter_weight(pipe, "subject", 0.7)
    delete_tlora_adapters(pipe, first_deleted)
    kept = "style" if first_deleted == "subject" else "subject"
    assert list(get_tlora_adapters(pipe)["transformer"]) == [kept]
    assert list(pipe.transformer.tlora) == [kept]
    weight = 0.7 if kept == "subject" else 1.0  # its strength survives the other's removal
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {kept: weight}), f"{mode}, {kept} kept")
    delete_tlora_adapters(pipe, [kept])
    assert_same_state(before, model_state(pipe.transformer))
    assert installed_hook(pipe.transformer) is None and loaded_adapters(pipe.transformer) is None
    assert all(torch.equal(out, ref) for out, ref in zip(run_calls(pipe, kw), original))


def test_unload_tlora_removes_every_adapter_exactly(files):
    pipe, kw = pipeline()
    original, before = run_calls(pipe, kw), model_state(pipe.transformer)
    load_both(pipe, files, "overlapping")
    set_tlora_adapters(pipe, "style")  # one inactive, out of the chain
    unload_tlora(pipe)
    assert_same_state(before, model_state(pipe.transformer))
    assert all(torch.equal(out, ref) for out, ref in zip(run_calls(pipe, kw), original))


def test_with_load_tlora_unloads_its_adapter_only(files):
    pipe, kw = pipeline()
    load_tlora(pipe, files["subject"], adapter_name="subject")
    with load_tlora(pipe, files["style"], adapter_name="style"):
        both = run_calls(pipe, kw)
    assert list(get_tlora_adapters(pipe)["transformer"]) == ["subject"], "the other adapter keeps its hooks"
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"subject": 1.0}), "after the block")
    assert largest_error(both, lycoris_reference(files, {"subject": 1.0})) > 50 * TOLERANCE


def test_loading_a_name_again_replaces_that_adapter_only(files, references):
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping", mode="low_memory")
    set_tlora_adapter_weight(pipe, "subject", 0.7)
    load_tlora(pipe, files["style"], adapter_name="style")  # the same file again, under the same name
    adapters = get_tlora_adapters(pipe)["transformer"]
    assert list(adapters) == ["subject", "style"] and adapters["subject"].weight == 0.7
    assert installed_hook(pipe.transformer).mode.name == "low_memory", "the denoiser keeps its mode"
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"subject": 0.7, "style": 1.0}), "replaced")
    load_tlora(pipe, files["subject"])  # "default": a third adapter
    assert list(get_tlora_adapters(pipe)["transformer"]) == ["subject", "style", "default"]


def test_one_mode_per_denoiser_the_last_one_asked_for(files):
    pipe, _ = pipeline()
    load_tlora(pipe, files["subject"], adapter_name="subject", mode="low_memory")
    handle = load_tlora(pipe, files["style"], adapter_name="style")
    assert handle.mode == {"transformer": "low_memory"}
    handle = load_tlora(pipe, files["style_ff"], adapter_name="style_ff", mode="lycoris")
    assert handle.mode == {"transformer": "lycoris"}
    delete_tlora_adapters(pipe, "style_ff")
    assert installed_hook(pipe.transformer).mode.name == "lycoris"
    unload_tlora(pipe)
    assert load_tlora(pipe, files["subject"]).mode == {"transformer": "fold"}, "a first load starts from auto"


def test_enable_tlora_over_one_loaded_adapter_keeps_its_name_and_strength(files):
    pipe, kw = pipeline()
    load_tlora(pipe, files["style"], adapter_name="style")
    set_tlora_adapter_weight(pipe, "style", 0.5)
    enable_tlora(pipe, max_rank=None, min_rank=2, alpha=2.0, mode="low_memory")
    (adapter,) = get_tlora_adapters(pipe)["transformer"].values()
    assert (adapter.name, adapter.weight, adapter.schedule) == ("style", 0.5, RankSchedule(4, 2, 2.0))
    assert_calls_close(run_calls(pipe, kw), lycoris_reference(files, {"style": 0.5}), "enabled again")


def test_the_verbs_reach_every_denoiser_of_a_pipeline():
    """Wan 2.2's two experts, each with its own adapter named "default": one call sets both; names are checked
    across them."""
    pipe, _ = tiny.wan("2.2_a14b")
    enable_tlora(pipe, max_rank=8)
    set_tlora_adapter_weight(pipe, "default", 0.25)
    adapters = get_tlora_adapters(pipe)
    assert list(adapters) == ["transformer", "transformer_2"]
    assert [expert["default"].weight for expert in adapters.values()] == [0.25, 0.25]
    set_tlora_adapters(pipe, [])
    assert not any(expert["default"].active for expert in get_tlora_adapters(pipe).values())
    assert installed_hook(pipe.transformer_2).mode.name == "none"


# -- a PEFT LoRA beside them ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["peft_first", "tlora_first"])
def test_a_peft_lora_beside_two_adapters(files, order, mode):
    reference = lycoris_reference(files, {"subject": 1.0, "style": 1.0}, with_peft=True)
    pipe, kw = pipeline(with_peft=order == "peft_first")
    peft_only = None if order == "tlora_first" else run_calls(pipe, kw)
    load_both(pipe, files, "overlapping", mode=mode)
    if order == "tlora_first":
        pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="peft")
    assert_calls_close(run_calls(pipe, kw), reference, f"{order}, {mode}:")
    assert largest_error(reference, lycoris_reference(files, {"subject": 1.0, "style": 1.0})) > 50 * TOLERANCE
    delete_tlora_adapters(pipe, ["subject", "style"])
    if peft_only is not None:
        assert all(torch.equal(out, ref) for out, ref in zip(run_calls(pipe, kw), peft_only)), "PEFT untouched"


# -- saving -----------------------------------------------------------------------------------------------------------
def test_save_tlora_says_which_adapter(files, tmp_path):
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping")
    with pytest.raises(TLoRAError, match=r"transformer: 'subject', transformer: 'style'.*adapter_name="):
        save_tlora(pipe, tmp_path / "x.safetensors")
    with pytest.raises(TLoRAError, match="none named 'other'"):
        save_tlora(pipe, tmp_path / "x.safetensors", adapter_name="other")
    network = loaded_adapters(pipe.transformer).records["subject"].network
    with pytest.raises(TLoRAError, match="the adapter 'subject'"):
        save_tlora(network, tmp_path / "x.safetensors", adapter_name="style")
    assert not (tmp_path / "x.safetensors").exists()
    path = save_tlora(pipe, tmp_path / "style.safetensors", adapter_name="style")
    saved, original = pipeline(), pipeline()
    load_tlora(saved[0], path)
    load_tlora(original[0], files["style"])
    assert all(torch.equal(a, b) for a, b in zip(run_calls(*saved), run_calls(*original)))
    # the saved file records its own schedule: loaded with no arguments
    assert get_tlora_adapters(saved[0])["transformer"]["default"].schedule == RankSchedule(4, 2, 2.0)


# -- errors change nothing --------------------------------------------------------------------------------------------
def everything(pipe, kw):
    transformer = pipe.transformer
    adapters = get_tlora_adapters(pipe)
    return (run_calls(pipe, kw), adapters, installed_hook(transformer), installed_hook(transformer).mode,
            loaded_adapters(transformer), model_state(transformer)[1:])


BAD_CALLS = {  # (pipe, files) -> the call; what its error says
    "set_unknown": (lambda p, f: set_tlora_adapters(p, ["subject", "other"]), "no T-LoRA adapter named 'other'"),
    "set_lengths": (lambda p, f: set_tlora_adapters(p, ["subject", "style"], [0.5]), "2 adapter names"),
    "set_twice": (lambda p, f: set_tlora_adapters(p, ["subject", "subject"]), "names an adapter twice"),
    "set_nan": (lambda p, f: set_tlora_adapters(p, ["subject"], float("nan")), "finite number"),
    "set_bool": (lambda p, f: set_tlora_adapters(p, ["subject"], [True]), "finite number"),
    "set_not_names": (lambda p, f: set_tlora_adapters(p, 3), "a name or a list of names"),
    "weight_unknown": (lambda p, f: set_tlora_adapter_weight(p, "other", 0.5), "no T-LoRA adapter named 'other'"),
    "weight_text": (lambda p, f: set_tlora_adapter_weight(p, "style", "0.5"), "finite number"),
    "delete_unknown": (lambda p, f: delete_tlora_adapters(p, ["style", "other"]), "no adapter named 'other'"),
    "load_bad_name": (lambda p, f: load_tlora(p, f["style"], adapter_name="a.b"), "without dots"),
    "load_bad_mode": (lambda p, f: load_tlora(p, f["style"], adapter_name="x", mode="fast"), "Unknown mode"),
    "load_bad_timestep_fn": (lambda p, f: load_tlora(p, f["style"], adapter_name="x", timestep_fn="t"), "callable"),
    "enable_one_schedule": (lambda p, f: enable_tlora(p, max_rank=None), "holds the adapters 'subject' \\(rank 8"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_and_change_nothing(files, case):
    call, message = BAD_CALLS[case]
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping")
    set_tlora_adapters(pipe, ["subject", "style"], [0.7, 1.2])
    before = everything(pipe, kw)
    with pytest.raises(TLoRAError, match=message):
        call(pipe, files)
    after = everything(pipe, kw)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]


@pytest.mark.parametrize("mode", ("lycoris", "fold", "low_memory"))
@pytest.mark.parametrize("name", ["detail", "style"], ids=["adding", "replacing"])
def test_a_load_failing_midway_leaves_every_adapter_as_it_was(files, monkeypatch, mode, name):
    """The rebuild of the new adapter's base terms fails after the hooks and the replaced adapter came off: the
    outputs, the adapters (their mask groups included), the records and the model come back as they were."""
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping", mode=mode)
    set_tlora_adapters(pipe, ["subject", "style"], [0.7, 1.2])
    outputs, adapters, hook, _, records, state = everything(pipe, kw)
    mode_name = hook.mode.name

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loading, "fill_base_terms", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_tlora(pipe, files["detail"], adapter_name=name)
    assert get_tlora_adapters(pipe) == adapters
    assert loaded_adapters(pipe.transformer) is records and model_state(pipe.transformer)[1:] == state
    assert installed_hook(pipe.transformer).mode.name == mode_name
    assert all(torch.equal(a, b) for a, b in zip(outputs, run_calls(pipe, kw)))


def test_changing_adapters_during_a_call_raises_and_changes_nothing(files):
    pipe, kw = pipeline()
    load_both(pipe, files, "overlapping")
    errors = []

    def change(module, args, kwargs):
        try:
            set_tlora_adapters(pipe, "subject")
        except TLoRAError as error:
            errors.append(str(error))

    handle = pipe.transformer.register_forward_pre_hook(change, with_kwargs=True)
    pipe(**kw, latents=latents())
    handle.remove()
    assert errors and "between calls" in errors[0]
    assert all(adapter.active for adapter in get_tlora_adapters(pipe)["transformer"].values())


def test_a_second_created_adapter_never_adapts_the_first_ones_layers():
    """A name pattern in the preset matches paths; the first adapter's own layers (`tlora.subject.lycoris_..._to_q
    .q_layer`) are under the denoiser too, and must not get T-LoRA modules of the second."""
    pipe, _ = tiny.sd3(rank=None)
    transformer = pipe.transformer
    config = {"algo": "tlora", "linear_dim": 4}
    create_tlora(transformer, {**config, "apply_preset": {"target_module": ["Attention"]}}, adapter_name="subject")
    style = create_tlora(transformer, {**config, "apply_preset": {"target_name": [".*to_q.*"]}}, adapter_name="style")
    subject_layers = {id(module) for module in transformer.tlora["subject"].modules()}
    assert style.loras and not any(id(module.org_module[0]) in subject_layers for module in style.loras)
    assert list(transformer.tlora) == ["subject", "style"], "the registration is back, in order"


# -- created adapters, and a training call with two -------------------------------------------------------------------
CONFIGS = {
    "subject": {"algo": "tlora", "linear_dim": 8, "linear_alpha": 4, "tlora_min_rank": 1, "tlora_alpha": 1.0,
                "apply_preset": {"target_module": ["Attention"]}},
    "style": {"algo": "tlora", "linear_dim": 4, "linear_alpha": 4, "tlora_min_rank": 2, "tlora_alpha": 2.0,
              "apply_preset": {"target_module": ["Attention", "FeedForward"]}},
}
TRAINING_TIMESTEPS = torch.tensor([999, 700, 400, 50])  # ranks 1, 3, 5, 7 of 8 and 2, 2, 3, 4 of 4


def two_created_adapters(mode: str):
    """A tiny SDXL UNet with two created adapters, perturbed from their init, trainable, the base frozen."""
    import training_tools as tt

    case = tt.sdxl()
    case.network.restore()  # the hand-applied one training_tools builds; the adapters here are created
    unet = case.denoiser
    networks = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        networks[name] = tiny.perturbed(create_tlora(unet, config, adapter_name=name, mode=mode), seed=seed + 1)
    unet.requires_grad_(False)
    for network in networks.values():
        network.requires_grad_(True)
    return case, unet, networks


def grads(networks) -> dict[str, torch.Tensor]:
    found = {}
    for name, network in networks.items():
        for key, parameter in network.named_parameters():
            grad = parameter.grad
            found[f"{name}.{key}"] = grad.clone() if grad is not None else torch.zeros_like(parameter)
            parameter.grad = None
    return found


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.7, 0.3)], ids=["full", "scaled"])
@pytest.mark.parametrize("mode", ["fold", "low_memory"])
def test_a_training_call_masks_each_sample_by_each_adapters_own_schedule(mode, strengths):
    """One batched training call against LyCORIS's own forward, one sample at a time, each adapter's group masked by
    that sample's rank in its own schedule, a strength as LyCORIS's multiplier."""
    case, unet, networks = two_created_adapters(mode)
    assert get_tlora_adapters(unet)["UNet2DConditionModel"].keys() == {"subject", "style"}
    set_tlora_adapters(unet, list(networks), list(strengths))
    loss, out = case.loss(timesteps=TRAINING_TIMESTEPS)
    loss.backward()
    batched, batched_grads = out.detach(), grads(networks)

    hook = installed_hook(unet)
    groups = {name: hook.adapters[name].group_id for name in networks}
    hook.remove()  # LyCORIS's own forward from here, each network in its own group
    for (name, network), strength in zip(networks.items(), strengths):
        for module in network.loras:
            module.mask_group_id = groups[name]
            module.multiplier = strength
    outputs = []
    for b, t in enumerate(TRAINING_TIMESTEPS.tolist()):
        for name, config in CONFIGS.items():
            schedule = (config["linear_dim"], config["tlora_min_rank"], config["tlora_alpha"])
            set_timestep_mask(compute_timestep_mask(t, 1000, *schedule), groups[name])
        loss, out = case.loss(slice(b, b + 1), TRAINING_TIMESTEPS[b:b + 1])
        loss.backward()
        outputs.append(out.detach())
    for group in groups.values():
        clear_timestep_mask(group)
    reference, reference_grads = torch.cat(outputs), grads(networks)
    assert relative_error(batched, reference) <= 1e-5
    for key, grad in reference_grads.items():
        assert grad.abs().max() > 0, key
        error = (batched_grads[key] - grad).norm() / grad.norm()
        assert error <= 1e-5, f"{key}: {error:.2e}"
