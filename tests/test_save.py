"""`save_tlora` after a few training steps: `load_tlora(pipe, path)` with no arguments, and LyCORIS's own
`create_lycoris_from_weights`, reproduce the trained network's masked output; base terms the weights cannot
reproduce are saved."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lycoris import create_lycoris_from_weights
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask
from safetensors import safe_open

import tiny
from compat_tools import run
from devtools.lycoris_build import lycoris_without_gc
from devtools.measure import relative_error
from tlora_hooks import TLoRAError, create_tlora, load_tlora, save_tlora, unload_tlora
from tlora_hooks.hooks import installed_hook

PRESET = {"target_module": ["Attention", "FeedForward"]}
CONFIG = {
    "algo": "tlora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4, "tlora_min_rank": 2, "tlora_alpha": 0.5,
    "apply_preset": PRESET,
}
# One timestep per sample, of four different ranks at R = 8, min_rank 2, alpha 0.5 (3, 5, 6, 7).
TIMESTEPS = torch.tensor([950, 650, 350, 50])


def latents(seed=1):
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def sdxl_batch(step: int, size: int = len(TIMESTEPS)) -> dict:
    """Noisy latents, one timestep per sample, text states and SDXL's added conditions for the tiny UNet."""
    generator = torch.Generator().manual_seed(100 + step)
    timestep = TIMESTEPS[:size]
    return dict(
        sample=torch.randn(size, 4, 4, 4, generator=generator), timestep=timestep,
        encoder_hidden_states=torch.randn(size, 8, 64, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(size, 32, generator=generator),
                           "time_ids": torch.randn(size, 6, generator=generator)},
    )


def train(unet, network, steps: int = 3) -> None:
    """A few AdamW steps through the hooks, the optimizer given what diffusers' scripts give it."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = sdxl_batch(step)
        target = torch.randn_like(batch["sample"])
        loss = (unet(**batch).sample - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A T-LoRA trained three steps on the tiny SDXL: its file, its pipeline output and its UNet output at t=500."""
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    pipe.unet.requires_grad_(False)
    network = create_tlora(pipe, CONFIG)
    initial = [p.detach().clone() for p in network.parameters()]
    train(pipe.unet, network)
    assert all(not torch.equal(p, q) for p, q in zip(network.parameters(), initial)), "every parameter trained"
    path = save_tlora(network, tmp_path_factory.mktemp("trained") / "tlora.safetensors")
    with torch.no_grad():
        unet_output = pipe.unet(**sdxl_batch(99) | {"timestep": torch.full((4,), 500)}).sample
    return path, run(pipe, kw, latents()), unet_output


def test_load_tlora_needs_no_arguments_and_reproduces_the_masked_output(trained, caplog):
    path, reference, _ = trained
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        load_tlora(pipe, path)
    assert not [r for r in caplog.records if r.name.startswith("tlora_hooks")]
    schedule = installed_hook(pipe.unet).adapters["default"].schedule
    assert (schedule.max_rank, schedule.min_rank, schedule.alpha) == (8, 2, 0.5)
    assert relative_error(run(pipe, kw, latents()), reference) < 1e-5


def test_the_file_has_lycoris_layout_and_simpletuner_metadata(trained):
    path, _, _ = trained
    with safe_open(path, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    config = json.loads(metadata["lycoris_config"])
    assert {k: config[k] for k in CONFIG} == CONFIG
    suffixes = {key.split(".", 1)[1] for key in keys}
    assert suffixes == {"q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"}, "no base terms: rebuilt"
    assert all(key.startswith("lycoris_") for key in keys)


def test_lycoris_reads_the_file(trained):
    """LyCORIS's own loader (as SimpleTuner loads), its base rebuilt by its own SVD, with the mask set by hand."""
    path, _, reference = trained
    unet = tiny.sdxl(rank=None)[0].unet
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, unet)
    network.apply_to()
    set_timestep_mask(compute_timestep_mask(500, 1000, 8, 2, 0.5))
    try:
        with torch.no_grad():
            output = unet(**sdxl_batch(99) | {"timestep": torch.full((4,), 500)}).sample
    finally:
        clear_timestep_mask()
    assert len(network.loras) == 40 and relative_error(output, reference) < 1e-5


def test_other_initialisations_save_their_base_and_reload_exactly(tmp_path):
    preset = {"target_module": ["Attention"], "module_algo_map": {"Attention": {"use_data_init": False}}}
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    network = create_tlora(pipe, CONFIG | {"apply_preset": preset})
    train(pipe.unet, network, steps=1)
    reference = run(pipe, kw, latents())
    path = save_tlora(pipe, tmp_path / "random.safetensors")
    with safe_open(path, "pt") as handle:
        assert sum(key.endswith(".base_q") for key in handle.keys()) == len(network.loras)
    fresh, _ = tiny.sdxl(rank=None, steps=3)
    fresh.unet.requires_grad_(False)  # as the trained one: CPU kernels for frozen weights round differently
    load_tlora(fresh, path)
    assert torch.equal(run(fresh, kw, latents()), reference)


def test_a_loaded_file_saves_again_as_it_loads(trained, tmp_path):
    path, reference, _ = trained
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    load_tlora(pipe, path)
    again = save_tlora(pipe.unet, tmp_path)  # a folder: SimpleTuner's file name in it
    assert again.endswith("pytorch_lora_weights.safetensors")
    unload_tlora(pipe)
    load_tlora(pipe, tmp_path)
    assert relative_error(run(pipe, kw, latents()), reference) < 1e-5


def test_what_save_tlora_refuses(tmp_path):
    from lycoris import LycorisNetwork

    pipe, _ = tiny.sdxl(rank=None)
    with pytest.raises(TLoRAError, match="exactly one T-LoRA made by create_tlora or load_tlora.*none of unet"):
        save_tlora(pipe, tmp_path / "x.safetensors")
    hand_made = tiny.add_tlora(pipe.unet)
    with pytest.raises(TLoRAError, match="network.save_weights"):
        save_tlora(hand_made, tmp_path / "x.safetensors")
    assert isinstance(hand_made, LycorisNetwork)
    hand_made.restore()
    network = create_tlora(pipe, CONFIG)
    with pytest.raises(TLoRAError, match="a .safetensors path or a folder"):
        save_tlora(network, tmp_path / "x.pt")


def test_a_loaded_adapter_is_frozen_and_trains_further_once_unfrozen(trained):
    """load_tlora loads an inference adapter: with the base frozen, nothing trains, so an optimizer built from
    `requires_grad` (a textual inversion's, another adapter's) gets none of it; `requires_grad_(True)` resumes it."""
    path, _, _ = trained
    pipe, _ = tiny.sdxl(rank=None, steps=3)
    pipe.unet.requires_grad_(False)
    load_tlora(pipe, path)
    network = pipe.unet.tlora["default"]
    assert len(list(network.parameters())) == 3 * 40
    assert not [p for p in pipe.unet.parameters() if p.requires_grad]
    network.requires_grad_(True)
    loaded = [p.detach().clone() for p in network.parameters()]
    train(pipe.unet, network, steps=1)
    assert all(not torch.equal(p, q) for p, q in zip(network.parameters(), loaded)), "every parameter trained"
