"""Progress bars on the slow steps (reading, building, rebuilding the base terms, converting, downloading): shown by
default, and silenced by the target pipeline's `set_progress_bar_config(disable=True)`, by diffusers'
`disable_progress_bar()` and by huggingface_hub's `disable_progress_bars()` (all bars, or the `tlora_hooks` group)."""

from __future__ import annotations

import diffusers
import huggingface_hub
import pytest
from diffusers.modular_pipelines import LoopSequentialPipelineBlocks
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import constants
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

import tiny
import tlora_files
from test_modular import CASES, modular_twin
from tlora_hooks import create_tlora, load_tlora
from tlora_hooks.commands import main
from tlora_hooks.formats import read_tlora_file
from tlora_hooks.progress import ProgressBars

# The bars a load that rebuilds the base terms shows (LyCORIS files save none).
LOAD_BARS = ("Reading t.safetensors", "Building T-LoRA modules", "Rebuilding T-LoRA base terms")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, 4)
    path = tlora_files.simpletuner_file(network, tmp_path_factory.mktemp("progress") / "t.safetensors",
                                        linear_dim=4, tlora_min_rank=1, tlora_alpha=1.0)
    network.restore()
    return path


def loud_sdxl():
    """The tiny SDXL with diffusers' default bar settings (the builders silence them)."""
    pipe, _ = tiny.sdxl(rank=None)
    pipe.set_progress_bar_config()
    return pipe


def bars_shown(stderr: str) -> list[str]:
    return [bar for bar in LOAD_BARS if bar in stderr]


@pytest.fixture
def hub_switch():
    yield disable_progress_bars
    enable_progress_bars()


@pytest.fixture
def diffusers_switch():
    yield diffusers_logging.disable_progress_bar
    diffusers_logging.enable_progress_bar()


def test_the_default_shows_a_bar_for_every_slow_step_of_a_load(path, capsys):
    modules = len(read_tlora_file(path).modules)
    capsys.readouterr()
    load_tlora(loud_sdxl(), path)
    stderr = capsys.readouterr().err
    assert bars_shown(stderr) == list(LOAD_BARS)
    assert f"Rebuilding T-LoRA base terms: 100%|██████████| {modules}/{modules} " in stderr


def test_the_pipelines_own_setting_silences_them(path, capsys):
    pipe = loud_sdxl()
    pipe.set_progress_bar_config(disable=True)
    load_tlora(pipe, path)
    assert bars_shown(capsys.readouterr().err) == []


@pytest.mark.parametrize("group", [None, "tlora_hooks"], ids=["all_bars", "this_library"])
def test_huggingface_hubs_switch_silences_them(path, capsys, hub_switch, group):
    hub_switch(group)
    load_tlora(loud_sdxl(), path)
    assert bars_shown(capsys.readouterr().err) == []


def test_diffusers_switch_silences_them(path, capsys, diffusers_switch):
    diffusers_switch()
    load_tlora(loud_sdxl(), path)
    assert bars_shown(capsys.readouterr().err) == []


def test_a_bare_denoiser_follows_the_global_switches(path, capsys, hub_switch):
    """A denoiser has no pipeline settings: shown by default, silenced by huggingface_hub's switch."""
    load_tlora(loud_sdxl().unet, path)
    assert bars_shown(capsys.readouterr().err) == list(LOAD_BARS)
    hub_switch()
    load_tlora(loud_sdxl().unet, path)
    assert bars_shown(capsys.readouterr().err) == []


def test_a_modular_pipelines_setting_silences_them(path, capsys):
    """Flux's modular pipeline stores `set_progress_bar_config` on its denoise loop block, where it is read."""
    classic, _ = tiny.flux(rank=None)
    modular = modular_twin(CASES["modular_flux"], classic)  # sets disable=True
    network = tiny.add_tlora(classic.transformer, 4)
    flux_path = tlora_files.simpletuner_file(network, path.replace("t.safetensors", "flux.safetensors"),
                                             linear_dim=4, tlora_min_rank=1, tlora_alpha=1.0)
    network.restore()
    load_tlora(modular, flux_path)
    assert "T-LoRA" not in capsys.readouterr().err
    modular.set_progress_bar_config()
    load_tlora(modular, flux_path)
    assert "Building T-LoRA modules" in capsys.readouterr().err


def test_create_tlora_follows_the_pipelines_setting(capsys):
    """The SVD that initialises a new adapter shows its bar, unless the pipeline silences its bars."""
    config = {"algo": "tlora", "linear_dim": 4}
    create_tlora(loud_sdxl(), config)
    assert "Rebuilding T-LoRA base terms" in capsys.readouterr().err
    pipe = loud_sdxl()
    pipe.set_progress_bar_config(disable=True)
    create_tlora(pipe, config)
    assert "T-LoRA" not in capsys.readouterr().err


# Full modular pipelines, built from their default blocks as `ModularPipeline.from_pretrained` builds them.
FULL_MODULAR = ("StableDiffusionXLModularPipeline", "FluxModularPipeline", "WanModularPipeline",
                "QwenImageModularPipeline", "StableDiffusion3ModularPipeline", "Flux2ModularPipeline",
                "LTXModularPipeline")


def denoise_loops(blocks) -> list[LoopSequentialPipelineBlocks]:
    """The loop blocks anywhere in a block tree: what draws a modular pipeline's own denoising bar."""
    found = [blocks] if isinstance(blocks, LoopSequentialPipelineBlocks) else []
    for sub_block in getattr(blocks, "sub_blocks", {}).values():
        found += denoise_loops(sub_block)
    return found


def own_bars_disabled(pipe) -> set[bool]:
    """Whether each denoise loop's own bar (diffusers' `progress_bar`) is disabled."""
    disabled = set()
    for loop in denoise_loops(pipe._blocks):
        with loop.progress_bar(total=1) as bar:
            disabled.add(bar.disable)
    return disabled


@pytest.mark.parametrize("name", FULL_MODULAR)
def test_a_full_modular_pipelines_bars_follow_its_own_denoising_bar(name, monkeypatch):
    """diffusers 0.42.1's `ModularPipeline.set_progress_bar_config` hands the settings only to top-level loop blocks;
    the full pipelines' loops sit inside auto blocks, so it stores nothing and the pipeline's own denoising bar
    still shows: ours show with it. Settings on the loops themselves (where diffusers' bar reads them) silence both."""
    pipe = getattr(diffusers, getattr(diffusers, name).default_blocks_name)().init_pipeline()
    assert type(pipe).__name__ == name
    for loop in denoise_loops(pipe._blocks):  # block instances are shared by the pipelines of a family: start clean
        monkeypatch.setattr(loop, "_progress_bar_config", {}, raising=False)
    pipe.set_progress_bar_config(disable=True)
    assert own_bars_disabled(pipe) == {ProgressBars.of(pipe).silenced}
    for loop in denoise_loops(pipe._blocks):
        loop.set_progress_bar_config(disable=True)
    assert own_bars_disabled(pipe) == {True} and ProgressBars.of(pipe).silenced


def test_convert_shows_its_reading_bar_until_silenced(path, tmp_path, capsys, hub_switch):
    assert main(["convert", path, str(tmp_path / "a.safetensors")]) == 0
    assert "Reading t.safetensors" in capsys.readouterr().err
    hub_switch()
    assert main(["convert", path, str(tmp_path / "b.safetensors")]) == 0
    assert "Reading" not in capsys.readouterr().err


def test_the_hub_download_bar_is_silenced_with_ours(path, monkeypatch, capsys):
    """`hf_hub_download` gets a `tqdm_class` that stays silent when the pipeline silences its bars, and none (its
    own default bar) otherwise. The stand-in draws the bar as huggingface_hub does, through that class."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    received = []

    def hf_hub_download(repo, filename, tqdm_class=None, **_):
        received.append(tqdm_class)
        bar_class = tqdm_class or huggingface_hub.utils.tqdm
        with bar_class(total=10, desc=f"Downloading {filename}", disable=False) as bar:
            bar.update(10)
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    pipe = loud_sdxl()
    load_tlora(pipe, "user/repo", weight_name="t.safetensors")
    assert received == [None] and "Downloading t.safetensors" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    load_tlora(pipe, "user/repo", weight_name="t.safetensors")
    assert received[-1] is not None and "Downloading" not in capsys.readouterr().err
