"""Running one test body in several processes on the CPU (gloo), as a multi-GPU job runs it on devices.

`run_ranks(body, world_size, *args)` starts processes, gives each the environment `torchrun` would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT), runs `body(rank, world_size, *args)` and returns what
each rank returned, in rank order. A rank that raised fails the test with its traceback. `body` must be a module-level
function (a spawned process imports it by name); it creates the process group itself (`init_gloo`, or accelerate's
`PartialState`), since that is the step a user's script does.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# One tiny model per process on shared cores: more threads only spin (see conftest.py).
THREADS_PER_RANK = 1
TIMEOUT_SECONDS = 180


def free_port() -> int:
    """A TCP port no process listens on now, for MASTER_PORT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_gloo(rank: int, world_size: int) -> None:
    """The process group a CPU run uses, from the environment `run_ranks` set."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def cpu_only_device_count() -> None:
    """Let diffusers' parallelism run its ranks on the CPU, also where torch sees a GPU.

    `ModelMixin._resolve_parallel_config` places each rank on `rank % torch.accelerator.device_count()` of the
    accelerator type `torch._C._get_accelerator()`: a ZeroDivisionError on CPU-only torch, and CUDA (with its mesh)
    on a GPU machine. With one "device" of type cpu every rank runs on the CPU, as on CPU-only torch.
    """
    torch.accelerator.device_count = lambda: 1
    torch._C._get_accelerator = lambda *args, **kwargs: torch.device("cpu")


def _rank_main(rank: int, world_size: int, port: int, body: Callable, args: tuple, results: Any) -> None:
    torch.set_num_threads(THREADS_PER_RANK)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(THREADS_PER_RANK),
    )
    try:
        # Pickled here, not by the queue: torch would share tensors through memory that dies with this process.
        results.put((rank, True, pickle.dumps(body(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(body: Callable[..., Any], world_size: int = 2, *args: Any, start: str = "fork") -> list[Any]:
    """`body(rank, world_size, *args)` in `world_size` new processes; their return values, by rank.

    Forked by default: the children inherit the imported torch and diffusers (a job takes seconds, where spawned
    interpreters spend half a minute importing on a loaded 2-core machine). The test process runs torch on one
    thread, so no thread pool is forked. CUDA cannot be used in a forked child: GPU jobs pass `start="spawn"`.
    """
    context = mp.get_context(start)
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, body, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, Any] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, payload = results.get(timeout=TIMEOUT_SECONDS)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise AssertionError(f"ranks {missing} did not finish in {TIMEOUT_SECONDS} s") from None
            if not ok:
                raise AssertionError(f"rank {rank} raised:\n{payload}")
            outcomes[rank] = pickle.loads(payload)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    return [outcomes[rank] for rank in range(world_size)]
