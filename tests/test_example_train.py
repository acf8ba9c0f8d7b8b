"""examples/train_tlora.py, offline on a random tiny pipeline: three steps train the T-LoRA, and `load_tlora` of the
saved file into a fresh pipeline gives the trained pipeline's masked output."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tlora_hooks import load_tlora
from tlora_hooks.modes.training import TrainingMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import train_tlora  # noqa: E402

PROMPT = "a photo of sks dog"
# The default mode at batch 2 (of three images: batches of 2 and 1), one timestep per sample.
TRAINING = ["--train_batch_size", "2"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process (its own tests reset it the same way): one per trainer run here."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    generator = np.random.default_rng(0)
    for index, size in enumerate([(20, 24), (24, 20), (16, 16)]):
        pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return str(folder)


def denoise(pipe, family, dtype, seed=1):
    """The pipeline's latents from fixed noise, through its masked denoiser."""
    embeds = {k: v.to(dtype) for k, v in family.encode(pipe, PROMPT, torch.device("cpu")).items()}
    shape = (1, 4, 16, 16) if isinstance(family, train_tlora.SDXL) else (1, 64, 4)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**embeds, latents=latents, num_inference_steps=3, height=16, width=16, output_type="latent")[0]


@pytest.fixture
def training_ranks(monkeypatch):
    """The ranks of the samples of every training call, as the hooks handed them to the mode."""
    ranks = []
    set_sample_masks = TrainingMode.set_sample_masks

    def recording(self, masks_by_group):
        ranks.extend(masks.sum(dim=1).tolist() for masks in masks_by_group.values())
        set_sample_masks(self, masks_by_group)

    monkeypatch.setattr(TrainingMode, "set_sample_masks", recording)
    return ranks


@pytest.mark.parametrize("model, precision", [("sdxl", "no"), ("flux", "bf16")])
def test_three_steps_then_load_tlora_reproduces_the_trained_output(images, tmp_path, model, precision, training_ranks):
    args = train_tlora.parse_args([
        "--model", model, "--tiny", "--instance_data_dir", images, "--instance_prompt", PROMPT,
        "--output_dir", str(tmp_path), "--resolution", "16", "--max_train_steps", "3", "--learning_rate", "1e-2",
        "--gradient_checkpointing", "--mixed_precision", precision, "--num_validation_images", "1",
        "--validation_steps", "2", "--seed", "0", *TRAINING,
    ])
    trained = train_tlora.train(args)
    assert any(len(set(ranks)) == 2 for ranks in training_ranks), f"one rank per sample at batch 2: {training_ranks}"
    assert trained.path == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(tmp_path / "validation_0.png")
    assert all(not torch.equal(m.lambda_layer, m.base_lambda) for m in trained.network.loras), "three steps trained"

    family = train_tlora.FAMILIES[model]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fresh = family.tiny()
    getattr(fresh, family.denoiser).to(dtype)  # the trainer keeps the frozen base in the mixed-precision dtype
    load_tlora(fresh, trained.path)
    reference = denoise(trained.pipeline, family, dtype)
    if dtype == torch.bfloat16:  # accelerate left the trained one under its autocast, returning fp32 (as diffusers'
        from accelerate.utils import convert_outputs_to_fp32  # scripts validate it): the fresh one gets the same

        denoiser = getattr(fresh, family.denoiser)
        denoiser.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(denoiser.forward))
    output = denoise(fresh, family, dtype)
    assert torch.equal(output, reference)


def test_only_the_main_process_saves_and_validates(images, tmp_path, monkeypatch):
    """On the other processes of a multi-process run, the trainer trains and writes nothing (diffusers' scripts save
    and validate on the main process only)."""

    class OtherProcess(train_tlora.Accelerator):
        is_main_process = property(lambda self: False)

    monkeypatch.setattr(train_tlora, "Accelerator", OtherProcess)
    output = tmp_path / "output"
    args = train_tlora.parse_args([
        "--model", "sdxl", "--tiny", "--instance_data_dir", images, "--instance_prompt", PROMPT,
        "--output_dir", str(output), "--resolution", "16", "--max_train_steps", "1", "--num_validation_images", "1",
        "--validation_steps", "2", "--seed", "0", *TRAINING,
    ])
    trained = train_tlora.train(args)
    assert trained.path is None and not output.exists()
    assert all(not torch.equal(m.lambda_layer, m.base_lambda) for m in trained.network.loras), "it trained"
