"""Data-parallel training of a T-LoRA made by `create_tlora`: two CPU processes on gloo, one batch split between them.

Because the T-LoRA parameters are registered under the denoiser, `DistributedDataParallel(unet)`, accelerate's
`prepare(unet, optimizer, dataloader)`, FSDP2's `fully_shard` and FSDP1's `FullyShardedDataParallel` see them: after
`backward` their gradients are equal on both processes and equal the single-process gradients of the whole batch, and
the hooks still mask every call.
The two processes run all four wrappers, forked once from the test process.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lycoris.logging import logger as lycoris_logger
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask
from torch.nn.parallel import DistributedDataParallel

import tiny
from devtools.measure import relative_error
from process_group import free_port
from tlora_hooks import create_tlora, disable_tlora

WORLD_SIZE = 2
RANK, MIN_RANK = 8, 1
CONFIG = {"algo": "tlora", "linear_dim": RANK, "linear_alpha": RANK, "tlora_min_rank": MIN_RANK}
# One timestep per sample, of four different ranks (1, 3, 5, 7 at R = 8), in the default mode: each process masks
# each of its samples by its own rank.
TIMESTEPS = torch.tensor([999, 700, 400, 50])
WRAPPERS = ("ddp", "accelerate", "fsdp2", "fsdp1")
TIMEOUT_S = 300


def batch() -> dict[str, torch.Tensor]:
    """Four samples for the tiny SD 1.5 UNet: noisy latents, timesteps, text states."""
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(4, 4, 8, 8, generator=generator),
        "timestep": TIMESTEPS,
        "encoder_hidden_states": torch.randn(4, 6, 32, generator=generator),
    }


def trainable_unet(mode: str = "auto"):
    """The tiny UNet, frozen, with a fresh T-LoRA whose parameters are the only trainable ones."""
    unet = tiny.unet()
    unet.requires_grad_(False)
    create_tlora(unet, CONFIG, mode=mode)
    return unet


def loss_of(model, samples: dict[str, torch.Tensor]) -> torch.Tensor:
    prediction = model(samples["sample"], samples["timestep"], encoder_hidden_states=samples["encoder_hidden_states"])
    return prediction.sample.pow(2).mean()


def tlora_gradients(unet) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in unet.named_parameters() if param.requires_grad}


def shard(samples: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    size = len(samples["sample"]) // WORLD_SIZE
    return {key: value[rank * size : (rank + 1) * size] for key, value in samples.items()}


def run_wrappers(rank: int, port: int, folder: str) -> None:
    """One process: each wrapper trains one step on this process's half of the batch; gradients go to `folder`."""
    from accelerate import Accelerator
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    lycoris_logger.setLevel(logging.WARNING)
    results = {}

    # accelerate first: it initialises the gloo process group the other two reuse.
    accelerator = Accelerator(cpu=True)
    unet = trainable_unet()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    samples = batch()
    rows = [{key: value[index] for key, value in samples.items()} for index in range(len(samples["sample"]))]
    loader = torch.utils.data.DataLoader(rows, batch_size=len(rows) // WORLD_SIZE)
    model, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    local = next(iter(loader))
    accelerator.backward(loss_of(model, local))
    results["accelerate"] = (tlora_gradients(accelerator.unwrap_model(model)), local["sample"])

    unet = trainable_unet()
    model = DistributedDataParallel(unet)
    loss_of(model, shard(samples, rank)).backward()
    results["ddp"] = (tlora_gradients(unet), None)

    unet = trainable_unet(mode="low_memory")  # FSDP shards the weights the fold would rewrite
    for block in [*unet.down_blocks, *unet.up_blocks]:
        fully_shard(block)
    fully_shard(unet)
    loss_of(unet, shard(samples, rank)).backward()
    gradients = {name: grad.full_tensor() for name, grad in tlora_gradients(unet).items()}
    results["fsdp2"] = (gradients, None)

    # FSDP1: a unit mixes the frozen base and the T-LoRA, so use_orig_params; units by block class, since LyCORIS reads
    # `q_layer.weight` / `p_layer.weight` without calling those layers (a size policy would hand it shards).
    unet = trainable_unet(mode="low_memory")
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BasicTransformerBlock})
    model = FullyShardedDataParallel(
        unet, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu")
    )
    loss_of(model, shard(samples, rank)).backward()
    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        gradients = {
            name.replace("_fsdp_wrapped_module.", ""): param.grad.detach().clone()
            for name, param in model.named_parameters() if param.requires_grad
        }
    results["fsdp1"] = (gradients, None)

    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_process(tmp_path_factory):
    """What each of the two processes saw: per wrapper, its T-LoRA gradients (and the samples accelerate gave it)."""
    folder = str(tmp_path_factory.mktemp("data_parallel"))
    # fork: the children inherit the imports (spawning re-imports diffusers in each, 20 s on a loaded machine).
    context = mp.start_processes(
        run_wrappers, args=(free_port(), folder), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} training processes did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def whole_batch():
    """The single-process gradients of the whole batch: the reference."""
    unet = trainable_unet()
    loss_of(unet, batch()).backward()
    return tlora_gradients(unet)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_gradients_are_synchronised_and_equal_the_whole_batch(per_process, whole_batch, wrapper):
    first, second = (results[wrapper][0] for results in per_process)
    assert set(first) == set(whole_batch) and len(whole_batch) == 3 * 40, "every T-LoRA parameter, and only those"
    for name, reference in whole_batch.items():
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
        assert relative_error(first[name], reference) <= 1e-5, name


def lycoris_sample_by_sample(masked: bool = True) -> dict[str, torch.Tensor]:
    """LyCORIS's own forward (hooks removed), one sample at a time with the (1, R) mask of its own timestep: the
    whole batch's gradients, computed without the hooks."""
    unet = trainable_unet()
    disable_tlora(unet)
    samples = batch()
    for index, timestep in enumerate(samples["timestep"].tolist()):
        if masked:
            set_timestep_mask(compute_timestep_mask(timestep, 1000, RANK, MIN_RANK))
        try:
            one = {key: value[index : index + 1] for key, value in samples.items()}
            (loss_of(unet, one) / len(samples["timestep"])).backward()  # the batch loss is a mean over samples
        finally:
            clear_timestep_mask()
    return tlora_gradients(unet)


def test_the_whole_batch_masks_each_sample_as_lycoris_does(whole_batch):
    """So the wrapped runs, equal to it, masked each sample of each process by its own rank."""
    reference, unmasked = lycoris_sample_by_sample(), lycoris_sample_by_sample(masked=False)
    assert max(relative_error(unmasked[name], reference[name]) for name in reference) > 1e-2, "masks must matter"
    for name, gradient in whole_batch.items():
        assert relative_error(gradient, reference[name]) <= 1e-5, name


def test_accelerate_gave_each_process_its_own_half(per_process):
    halves = [results["accelerate"][1] for results in per_process]
    torch.testing.assert_close(torch.cat(halves), batch()["sample"], rtol=0, atol=0)
