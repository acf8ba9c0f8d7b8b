"""One full pipeline per process (accelerate's `PartialState`, gloo on the CPU): each process loads or enables its
own T-LoRA, takes its share of the prompts, and every image equals the one a single process makes for that prompt.

Nothing in tlora_hooks is shared between processes: each has its hooks, masks and LyCORIS mask groups. The test
proves the recipe in docs/scale-out.md end to end, including `gather_object` of the results.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from process_group import run_ranks
from tlora_files import simpletuner_file
from tlora_hooks import disable_tlora, enable_tlora, load_tlora

PROMPTS = ["a sks dog", "a sks dog on a beach", "a sks dog in snow", "a sks dog, oil painting", "a sks dog at night"]
SCHEDULE = (8, 1, 1.0)


def prompt_embeds(prompt: str, dim: int, pooled_dim: int) -> dict[str, torch.Tensor]:
    """Stand-in text encoder: embeddings fixed by the prompt's index, as a real encoder fixes them by its text."""
    generator = torch.Generator().manual_seed(PROMPTS.index(prompt))
    return {"prompt_embeds": torch.randn(1, 8, dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(1, pooled_dim, generator=generator)}


def sdxl_loaded(path: str):
    """A tiny SDXL with no adapter, then `load_tlora` of the file."""
    pipe, kw = tiny.sdxl(rank=None)
    load_tlora(pipe, path, min_rank=SCHEDULE[1], alpha=SCHEDULE[2])
    return pipe, kw


def flux_enabled(path: str):
    """A tiny Flux with a LyCORIS T-LoRA applied (same seed in every process), then `enable_tlora`."""
    pipe, kw = tiny.flux(dtype=torch.float32)
    enable_tlora(pipe, *SCHEDULE)
    return pipe, kw


# setup: (builder, (prompt embedding dim, pooled dim), latents shape)
SETUPS = {
    "sdxl_load_tlora": (sdxl_loaded, (64, 32), (1, 4, 4, 4)),
    "flux_enable_tlora": (flux_enabled, (32, 32), (1, 4, 4)),
}


def generate(setup: str, pipe, kw, prompt: str) -> torch.Tensor:
    _, dims, latent_shape = SETUPS[setup]
    call = {key: value for key, value in kw.items() if "prompt_embeds" not in key}
    call["guidance_scale"] = 1.0  # one call per step; no negative embeddings needed
    call.pop("true_cfg_scale", None)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(100 + PROMPTS.index(prompt)))
    return pipe(**call, **prompt_embeds(prompt, *dims), latents=latents, return_dict=False)[0]


def single_process(setup: str, path: str) -> dict[str, torch.Tensor]:
    build, _, _ = SETUPS[setup]
    pipe, kw = build(path)
    return {prompt: generate(setup, pipe, kw, prompt) for prompt in PROMPTS}


def partial_state_rank(rank: int, world_size: int, path: str) -> dict:
    """The recipe, as each process of `accelerate launch --num_processes 2 script.py` runs it."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # The environment comes from `accelerate launch` (here: run_ranks); cpu=True picks gloo (on GPUs: PartialState()).
    state = PartialState(cpu=True)
    results = {"backend": state.backend, "process_index": state.process_index}
    for setup, (build, _, _) in SETUPS.items():
        pipe, kw = build(path)  # one full pipeline in this process
        with state.split_between_processes(PROMPTS) as mine:
            images = [(prompt, generate(setup, pipe, kw, prompt)) for prompt in mine]
        results[setup] = {"mine": [prompt for prompt, _ in images], "all": dict(gather_object(images))}
    return results


@pytest.fixture(scope="module")
def tlora_file(tmp_path_factory) -> str:
    """A LyCORIS T-LoRA file for the tiny SDXL UNet, as SimpleTuner saves it."""
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, SCHEDULE[0], seed=3)
    return simpletuner_file(network, tmp_path_factory.mktemp("tlora") / "sdxl.safetensors")


def test_each_process_masks_its_prompts_like_one_process(tlora_file):
    ranks = run_ranks(partial_state_rank, 2, tlora_file)
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"] and [r["process_index"] for r in ranks] == [0, 1]
    for setup in SETUPS:
        expected = single_process(setup, tlora_file)
        assert ranks[0][setup]["mine"] + ranks[1][setup]["mine"] == PROMPTS, "each prompt made once, split in order"
        for rank in ranks:
            assert set(rank[setup]["all"]) == set(PROMPTS)
            for prompt in PROMPTS:
                torch.testing.assert_close(rank[setup]["all"][prompt], expected[prompt], atol=0, rtol=0)
        pipe, kw = SETUPS[setup][0](tlora_file)
        disable_tlora(pipe)  # the T-LoRA stays applied, unmasked
        unmasked = generate(setup, pipe, kw, PROMPTS[0])
        assert (unmasked - expected[PROMPTS[0]]).abs().max() > 1e-4, "masking should change the image"
