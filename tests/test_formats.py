"""Every file layout is read into the same form; bad files raise TLoRAError; `inspect` and `convert` on the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from lycoris.modules import get_module
from lycoris.modules.tlora import TLoraModule
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
import tlora_files
from tlora_hooks import TLoRAError
from tlora_hooks.commands import main
from tlora_hooks.formats import check_one_rank, read_tlora_file
from tlora_hooks.matching import lycoris_names


@pytest.fixture(scope="module")
def sdxl_unet():
    pipe, _ = tiny.sdxl(rank=None)
    return pipe.unet


@pytest.fixture(scope="module")
def simpletuner_path(tmp_path_factory, sdxl_unet):
    network = tiny.add_tlora(sdxl_unet, 8)
    for module in network.loras:
        module.alpha.fill_(4.0)  # LyCORIS saves its alpha buffer: scale 4 / 8
    path = tlora_files.simpletuner_file(
        network, tmp_path_factory.mktemp("st") / "tlora.safetensors",
        linear_dim=8, linear_alpha=4, tlora_min_rank=2, tlora_alpha=0.5,
        apply_preset={"target_module": ["Attention", "FeedForward"]},
    )
    network.restore()
    return path, len(network.loras)


def test_simpletuner_file_reads_modules_and_metadata(simpletuner_path, sdxl_unet):
    path, count = simpletuner_path
    tlora_file = read_tlora_file(path)
    assert tlora_file.format == "lycoris"
    assert len(tlora_file.modules) == count and tlora_file.ranks == [8]
    assert tlora_file.base_source == "rebuilt"
    assert set(tlora_file.modules) <= set(lycoris_names(sdxl_unet))
    settings = tlora_file.settings
    assert (settings.linear_dim, settings.linear_alpha, settings.min_rank, settings.alpha) == (8, 4.0, 2, 0.5)
    assert settings.preset == {"target_module": ["Attention", "FeedForward"]}
    assert tlora_file.scales == [0.5]  # LyCORIS alpha 4 / rank 8


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_official_sdxl_keys_map_onto_the_layers_the_processor_adds_to(tmp_path, sdxl_unet, variant):
    state = tlora_files.official_state(sdxl_unet, 4, variant)
    tlora_file = read_tlora_file(tlora_files.save_official_sdxl(state, tmp_path / "pytorch_lora_weights.safetensors"))
    assert tlora_file.format == f"controlgenai-{variant}"
    assert tlora_file.base_source == {"ortho": "saved", "vanilla": "none"}[variant] and tlora_file.scales == [1.0]
    names = lycoris_names(sdxl_unet)
    expected = tlora_files.official_layers(sdxl_unet)
    mapped = {module.source_key: names[name] for name, module in tlora_file.modules.items()}
    assert mapped.keys() == expected.keys()
    assert all(mapped[prefix] is layer for prefix, layer in expected.items())


def test_official_flux_pt_maps_context_projections_and_skips_unused_single_block_layers(tmp_path):
    transformer = tiny.flux_transformer(num_single_layers=2)
    state = tlora_files.official_state(transformer, 4, "vanilla")
    tlora_file = read_tlora_file(tlora_files.save_official_flux(state, tmp_path / "lora.pt"))
    names = lycoris_names(transformer)
    layers = tlora_files.official_layers(transformer)
    used = {prefix: layer for prefix, layer in layers.items() if layer is not None}
    mapped = {module.source_key: names[name] for name, module in tlora_file.modules.items()}
    assert mapped.keys() == used.keys()
    assert all(mapped[prefix] is layer for prefix, layer in used.items())
    first_attention = transformer.transformer_blocks[0].attn
    assert mapped["transformer_blocks.0.attn.processor.to_q_proj_lora"] is first_attention.add_q_proj
    unused = {key.rsplit(".", 2)[0] for key in tlora_file.unused_keys}
    assert unused == {prefix for prefix, layer in layers.items() if layer is None} and len(unused) == 8
    assert tlora_file.unknown_keys == []


def test_a_plain_lora_is_named_and_sent_to_load_lora_weights(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(TLoRAError, match=r"plain LoRA.*pipe\.load_lora_weights"):
        read_tlora_file(path)


def test_unrelated_tensors_are_not_a_tlora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(TLoRAError, match="no T-LoRA keys"):
        read_tlora_file(path)


# A valid safetensors header whose one tensor lies past the end of the file.
HEADER_PAST_THE_END = (64).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [99], "data_offsets": [0, 396]}}'


@pytest.mark.parametrize(
    "content,words",
    [
        (b"this is not a weights file at all", "neither a safetensors file nor a torch checkpoint"),
        (b"", "neither a safetensors file"),
        (HEADER_PAST_THE_END, "could not be read as safetensors"),
        (b"PK\x03\x04garbage that is no zip", "does not hold plain tensors, or is corrupt"),
    ],
)
def test_corrupt_files_raise_tlora_error(tmp_path, content, words):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(TLoRAError, match=words):
        read_tlora_file(path)


def test_a_truncated_safetensors_file_raises(tmp_path, simpletuner_path):
    path = tmp_path / "truncated.safetensors"
    data = open(simpletuner_path[0], "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TLoRAError, match="could not be read as safetensors"):
        read_tlora_file(path)


class NotATensor:
    pass


@pytest.mark.parametrize(
    "payload,words",
    [
        ({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": NotATensor()}, "does not hold plain tensors"),
        ({"state_dict": {"x.down.weight": torch.zeros(1)}}, "not a flat dict of tensors"),
        ([torch.zeros(1)], "holds list"),
    ],
)
def test_a_pickle_that_is_not_a_flat_dict_of_tensors_is_refused(tmp_path, payload, words):
    path = tmp_path / "lora.pt"
    torch.save(payload, str(path))
    with pytest.raises(TLoRAError, match=words):
        read_tlora_file(path)


def test_a_missing_file_is_a_tlora_error(tmp_path):
    with pytest.raises(TLoRAError, match="No T-LoRA file or folder at"):
        read_tlora_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_the_cli_names_a_missing_file_in_one_line_and_exits_2(tmp_path, capsys, command):
    missing = str(tmp_path / "nope.safetensors")
    output = [str(tmp_path / "out.safetensors")] if command == "convert" else []
    assert main([command, missing, *output]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("tlora-hooks: ") and captured.err.count("\n") == 1
    assert missing in captured.err and not (tmp_path / "out.safetensors").exists()


def test_a_checkpoint_folder_resolves_to_its_weights_file(tmp_path, sdxl_unet):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "optimizer.safetensors"))
    state = tlora_files.official_state(sdxl_unet, 4, "vanilla")
    tlora_files.save_official_sdxl(state, tmp_path / "pytorch_lora_weights.safetensors")
    assert read_tlora_file(tmp_path).path.endswith("pytorch_lora_weights.safetensors")


def test_malformed_module_shapes_are_reported(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lycoris_a.q_layer.weight": torch.zeros(4, 8), "lycoris_a.p_layer.weight": torch.zeros(8, 3),
               "lycoris_a.lambda_layer": torch.zeros(1, 4), "lycoris_a.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(TLoRAError, match="lycoris_a is malformed.*ranks disagree"):
        read_tlora_file(path)


def test_inconsistent_ranks_across_modules(tmp_path):
    tensors = {}
    for name, rank in (("lycoris_a", 4), ("lycoris_b", 4), ("lycoris_c", 8)):
        tensors.update({f"{name}.q_layer.weight": torch.zeros(rank, 8), f"{name}.p_layer.weight": torch.zeros(8, rank),
                        f"{name}.lambda_layer": torch.zeros(1, rank), f"{name}.alpha": torch.tensor(float(rank))})
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(TLoRAError, match="different ranks.*2 of rank 4, 1 of rank 8"):
        check_one_rank(read_tlora_file(tmp_path / "mixed.safetensors"))


def test_inspect_prints_what_the_file_holds(simpletuner_path, capsys):
    path, count = simpletuner_path
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "format:        lycoris" in text and f"modules:       {count}" in text and "rank:          8" in text
    assert "min_rank:      2 (tlora_min_rank)" in text and "alpha:         0.5" in text
    assert "UNet (UNet2DConditionModel)" in text
    assert "lycoris_down_blocks_*_attentions_*_transformer_blocks_*_attn*_to_q" in text
    assert main(["inspect", "--json", path]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules"] == count and summary["scales"] == [0.5] and summary["family"].startswith("UNet")


@pytest.mark.parametrize(
    "variant,save,says",
    [
        ("vanilla", tlora_files.save_official_flux, "none: the format has no base term"),
        ("vanilla", tlora_files.save_official_sdxl, "none: the format has no base term"),
        ("ortho", tlora_files.save_official_sdxl, "saved in the file"),
    ],
    ids=["flux_lora_pt", "sdxl_vanilla", "sdxl_ortho"],
)
def test_inspect_says_where_the_base_terms_come_from(tmp_path, variant, save, says, capsys):
    """Official Vanilla and FLUX files have no base term (docs/loading.md's formats table), Ortho files save theirs."""
    flux = save is tlora_files.save_official_flux
    pipe, _ = tiny.flux(rank=None, dtype=torch.float32) if flux else tiny.sdxl(rank=None)
    denoiser = pipe.transformer if flux else pipe.unet
    path = save(tlora_files.official_state(denoiser, 4, variant), tmp_path / "official")
    assert main(["inspect", path]) == 0
    assert f"base terms:    {says}" in capsys.readouterr().out


def test_inspect_recognises_sdxl_and_flux_widths(tmp_path):
    from tlora_hooks.commands.inspect import likely_family
    from tlora_hooks.formats import ModuleWeights, TLoraFile

    def fake(names_and_widths):
        modules = {name: ModuleWeights(torch.zeros(4, width), torch.zeros(8, 4), torch.zeros(1, 4), 4.0)
                   for name, width in names_and_widths}
        return TLoraFile(path="x", format="lycoris", modules=modules)

    sdxl = fake([("lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 2048)])
    flux = fake([("lycoris_single_transformer_blocks_0_attn_to_q", 3072)])
    assert likely_family(sdxl) == "UNet (UNet2DConditionModel), SDXL"
    assert likely_family(flux) == "Flux (FluxTransformer2DModel), FLUX.1"
    assert likely_family(fake([("lycoris_conv_in", 8)])) == "unknown"


def test_convert_writes_a_lycoris_tlora_file_with_the_schedule(tmp_path, sdxl_unet, capsys):
    state = tlora_files.official_state(sdxl_unet, 4, "ortho")
    source = tlora_files.save_official_sdxl(state, tmp_path / "official.safetensors")
    target = str(tmp_path / "converted.safetensors")
    assert main(["convert", source, target, "--min-rank", "2"]) == 0
    assert "base terms are saved" in capsys.readouterr().out
    with safe_open(target, framework="pt") as handle:
        config = json.loads(handle.metadata()["lycoris_config"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert config["algo"] == "tlora" and config["linear_dim"] == 4
    assert (config["tlora_min_rank"], config["tlora_alpha"]) == (2, 1.0)
    name = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    algo, params = get_module(tensors, name)  # LyCORIS's own loader recognises the module as T-LoRA
    assert algo is TLoraModule and params[0].shape == (4, 8)
    converted, original = read_tlora_file(target), read_tlora_file(source)
    assert converted.settings.min_rank == 2 and converted.base_source == "saved"
    for key, module in original.modules.items():
        for mine, theirs in ((converted.modules[key].q, module.q), (converted.modules[key].base.p, module.base.p)):
            assert torch.equal(mine, theirs)


def test_convert_asks_for_min_rank_when_the_file_does_not_say(tmp_path, sdxl_unet, capsys):
    state = tlora_files.official_state(sdxl_unet, 4, "vanilla")
    source = tlora_files.save_official_sdxl(state, tmp_path / "v.safetensors")
    assert main(["convert", source, str(tmp_path / "out.safetensors")]) == 2
    assert "--min-rank" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
