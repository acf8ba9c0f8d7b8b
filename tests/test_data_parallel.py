"""Data-parallel training of a T-LoRA made by `create_tlora`: two CPU processes on gloo, one batch split between them.

Because the T-LoRA parameters are registered under the denoiser, `DistributedDataParallel(unet)`, accelerate's
`prepare(unet, optimizer, dataloader)` and FSDP2's `fully_shard` see them: after `backward` their gradients are equal
on both processes and equal the single-process gradients of the whole batch, and the hooks still mask every call.
The two processes run all three wrappers, forked once from the test process.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lycoris.logging import logger as lycoris_logger
from torch.nn.parallel import DistributedDataParallel

import tiny
from devtools.measure import relative_error
from tlora_hooks import create_tlora

WORLD_SIZE = 2
RANK, MIN_RANK = 8, 1
CONFIG = {"algo": "tlora", "linear_dim": RANK, "linear_alpha": RANK, "tlora_min_rank": MIN_RANK}
# One timestep for the whole batch and LyCORIS's own forward, which holds one mask per call. Once the hooks train with
# one mask per sample, use distinct timesteps (e.g. [100, 400, 700, 950]) and the default mode.
MODE = "lycoris"
TIMESTEPS = torch.tensor([500, 500, 500, 500])
ACTIVE_RANKS = 4  # int(0.5 * (8 - 1)) + 1 at t = 500 of 1000
WRAPPERS = ("ddp", "accelerate", "fsdp2")
TIMEOUT_S = 300


def batch() -> dict[str, torch.Tensor]:
    """Four samples for the tiny SD 1.5 UNet: noisy latents, timesteps, text states."""
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(4, 4, 8, 8, generator=generator),
        "timestep": TIMESTEPS,
        "encoder_hidden_states": torch.randn(4, 6, 32, generator=generator),
    }


def trainable_unet():
    """The tiny UNet, frozen, with a fresh T-LoRA whose parameters are the only trainable ones."""
    unet = tiny.unet()
    unet.requires_grad_(False)
    create_tlora(unet, CONFIG, mode=MODE)
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
    from torch.distributed.fsdp import fully_shard

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

    unet = trainable_unet()
    for block in [*unet.down_blocks, *unet.up_blocks]:
        fully_shard(block)
    fully_shard(unet)
    loss_of(unet, shard(samples, rank)).backward()
    gradients = {name: grad.full_tensor() for name, grad in tlora_gradients(unet).items()}
    results["fsdp2"] = (gradients, None)

    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_hooks_mask_every_wrapped_call(per_process, wrapper):
    """Ranks above the timestep's rank get no gradient: the mask was set inside the wrapped forward."""
    lambdas = [grad for name, grad in per_process[0][wrapper][0].items() if name.endswith("lambda_layer")]
    assert lambdas
    assert all(grad[:, ACTIVE_RANKS:].eq(0).all() and grad[:, :ACTIVE_RANKS].ne(0).any() for grad in lambdas)


def test_accelerate_gave_each_process_its_own_half(per_process):
    halves = [results["accelerate"][1] for results in per_process]
    torch.testing.assert_close(torch.cat(halves), batch()["sample"], rtol=0, atol=0)
