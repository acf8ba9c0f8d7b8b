"""A loaded T-LoRA under the pipeline's own methods: `pipe.to(dtype)` and `pipe.to(device)` after `load_tlora` move
its modules with the denoiser, and the masked output matches LyCORIS's own forward there; `pipe.save_pretrained`
writes the adapter beside the unchanged base weights, and `from_pretrained` reads the base back without it."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from lycoris import create_lycoris_from_weights
from safetensors.torch import load_file

import tiny
import tlora_files
from compat_tools import scheduler_state_masks
from devtools.lycoris_build import lycoris_without_gc
from devtools.measure import relative_error
from tlora_hooks import load_tlora, unload_tlora
from tlora_hooks.records import loaded_adapters

SCHEDULE = (4, 1, 1.0)  # rank, min_rank, alpha, as the file's metadata records them
MODES = ("lycoris", "fold", "low_memory", "auto")
BF16_TOLERANCE = 3e-2  # bf16 keeps 8 bits of mantissa: both runs round differently at every layer


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, SCHEDULE[0], scale=3.0)  # an adapter that matters beside bf16 rounding
    path = tlora_files.simpletuner_file(network, tmp_path_factory.mktemp("methods") / "t.safetensors",
                                        linear_dim=4, tlora_min_rank=1, tlora_alpha=1.0)
    network.restore()
    return str(path)


def run(pipe, kw, dtype=torch.float32, device="cpu"):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    inputs = {key: value.to(device, dtype) if torch.is_tensor(value) else value for key, value in kw.items()}
    with torch.no_grad():
        return pipe(**inputs, latents=latents, return_dict=False)[0].float().cpu()


def lycoris_run(path, dtype=torch.float32, device="cpu"):
    """LyCORIS's own network from the file, moved with the pipeline, masked from the scheduler's own timestep."""
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    with lycoris_without_gc():
        network, _ = create_lycoris_from_weights(1.0, path, pipe.unet)
    network.apply_to()
    pipe.to(device, dtype)
    network.to(device, dtype)
    with scheduler_state_masks(pipe, SCHEDULE, mask_dtype=dtype):
        return run(pipe, kw, dtype, device)


@pytest.mark.parametrize("mode", MODES)
def test_pipe_to_a_dtype_after_loading_casts_the_adapter_and_matches_lycoris(path, mode):
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    plain = run(pipe.to(torch.bfloat16), kw, torch.bfloat16)
    pipe.to(torch.float32)
    load_tlora(pipe, path, mode=mode)
    run(pipe, kw)  # a call in fp32 first: the fold has written its delta into the weights
    pipe.to(torch.bfloat16)
    network = loaded_adapters(pipe.unet).records["default"].network
    assert {parameter.dtype for parameter in network.parameters()} == {torch.bfloat16}
    masked = run(pipe, kw, torch.bfloat16)
    expected = lycoris_run(path, torch.bfloat16)
    assert relative_error(masked, expected) <= BF16_TOLERANCE, relative_error(masked, expected)
    assert relative_error(plain, expected) > 5 * BF16_TOLERANCE, "the adapter must matter"
    unload_tlora(pipe)
    torch.testing.assert_close(run(pipe, kw, torch.bfloat16), plain, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_pipe_to_cuda_after_loading_moves_the_adapter_and_matches_lycoris(path, mode):
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    load_tlora(pipe, path, mode=mode)
    run(pipe, kw)
    pipe.to("cuda")
    network = loaded_adapters(pipe.unet).records["default"].network
    assert {parameter.device.type for parameter in network.parameters()} == {"cuda"}
    masked = run(pipe, kw, device="cuda")
    assert relative_error(masked, lycoris_run(path, device="cuda")) <= 1e-4


def test_save_pretrained_writes_the_adapter_beside_the_unchanged_base(path, tmp_path):
    """The adapter is registered under the UNet (`tlora.default.*`), so the UNet's state dict, and the file
    `save_pretrained` writes, hold it; the base keys and values are the model's own. `from_pretrained` reads the base
    and leaves those keys out: the reloaded pipeline runs without the T-LoRA until it is loaded again."""
    pipe, kw = tiny.sdxl(rank=None, steps=3)
    base = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items()}
    plain = run(pipe, kw)
    load_tlora(pipe, path)
    pipe.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    adapter = {name for name in saved if name.startswith("tlora.")}
    network = loaded_adapters(pipe.unet).records["default"].network
    assert adapter == {f"tlora.default.{name}" for name in network.state_dict()} and adapter
    assert {name: saved[name] for name in saved if name not in adapter}.keys() == base.keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in base.items())

    absent = dict.fromkeys(("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder",
                            "feature_extractor"))
    again = StableDiffusionXLPipeline.from_pretrained(tmp_path, **absent)
    again.set_progress_bar_config(disable=True)
    assert loaded_adapters(again.unet) is None and "tlora" not in dict(again.unet.named_children())
    assert again.unet.state_dict().keys() == base.keys()
    torch.testing.assert_close(run(again, kw), plain, rtol=0, atol=0)
    load_tlora(again, path)
    torch.testing.assert_close(run(again, kw), run(pipe, kw), rtol=0, atol=0)
