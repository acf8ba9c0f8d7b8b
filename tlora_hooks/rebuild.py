"""The base terms LyCORIS does not save, rebuilt as its `make_module_from_state_dict` does, but batched and without gc.

LyCORIS builds `base_q = vh[:r]`, `base_p = u[:, :r]`, `base_lambda = s[:r]` from `torch.linalg.svd` of the current
base weight in fp32 (principal triplets, zero-padded when r > min(out, in)), and runs `gc.collect()` per module.
Here same-shaped weights are decomposed together on their own device. Only the products sigma_i u_i v_i^T enter the
forward, so the sign each decomposition picks for a singular pair does not matter.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from .logging import get_logger
from .progress import ProgressArgument, as_progress_bars

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)

# LyCORIS's value for the singular values of padding ranks (r > min(out, in)); their vectors are zero.
PADDING_SINGULAR_VALUE = 1e-6
# Working memory per batch of same-shaped weights (shared by the concurrent batches).
CHUNK_BYTES = 1 << 30
# Batches decomposed at once on a CUDA device, each from its own host thread on its own stream: cuSOLVER's dense
# eigensolver works through one mid-size matrix at a time with host round trips, leaving the GPU mostly idle.
# On the CPU, LAPACK already uses every core: one batch at a time.
CUDA_WORKERS = 4

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def gram_eigh_triplets(weights: torch.Tensor, k: int) -> Triplets:
    """Top-k singular triplets of a (batch, out, in) stack from an fp64 eigendecomposition of the smaller Gram matrix.

    The Gram matrix squares the condition number, so it is formed and decomposed in fp64: the top triplets then come
    out more accurate than an fp32 SVD's. The other side's vectors are W v / sigma, so sigma u v^T = W v v^T exactly.
    """
    w = weights.to(torch.float64)
    tall = w.shape[-2] >= w.shape[-1]
    gram = w.mT @ w if tall else w @ w.mT
    values, vectors = torch.linalg.eigh(gram)
    values = values.flip(-1)[..., :k].clamp_min(0)
    vectors = vectors.flip(-1)[..., :k]
    sigma = values.sqrt()
    other = (w @ vectors) if tall else (w.mT @ vectors)
    other = torch.where(sigma.unsqueeze(-2) > 0, other / sigma.unsqueeze(-2).clamp_min(1e-300), 0.0)
    u, v = (other, vectors) if tall else (vectors, other)
    return u.float(), sigma.float(), v.mT.float()


def svd_triplets(weights: torch.Tensor, k: int) -> Triplets:
    """Top-k singular triplets from `torch.linalg.svd` in fp32, LyCORIS's own computation, batched."""
    u, s, vh = torch.linalg.svd(weights.float(), full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :]


DECOMPOSITIONS: dict[str, Callable[[torch.Tensor, int], Triplets]] = {
    "gram-eigh": gram_eigh_triplets,
    "svd": svd_triplets,
}
# Chosen by benchmarks/bench_load.py (see benchmarks/RESULTS.md): faster on CPU, and exact to LyCORIS within 1e-5.
DEFAULT_DECOMPOSITION = "gram-eigh"


def principal_base_terms(weights: torch.Tensor, rank: int, method: str | None = None) -> Triplets:
    """(base_q (b, rank, in), base_p (b, out, rank), base_lambda (b, rank)) as LyCORIS's `principal` init, padded."""
    k = min(rank, *weights.shape[-2:])
    u, s, vh = DECOMPOSITIONS[method or DEFAULT_DECOMPOSITION](weights, k)
    pad = rank - k
    if pad:
        vh = torch.nn.functional.pad(vh, (0, 0, 0, pad))
        u = torch.nn.functional.pad(u, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad), value=PADDING_SINGULAR_VALUE)
    return vh, u, s


@torch.no_grad()
def rebuild_base_terms(
    modules: Iterable[TLoraModule],
    *,
    method: str | None = None,
    progress: ProgressArgument = None,
    workers: int | None = None,
) -> None:
    """Fill `base_q`, `base_p`, `base_lambda` of LyCORIS T-LoRA modules from their wrapped layers' current weights.

    `method` names a `DECOMPOSITIONS` entry (default `DEFAULT_DECOMPOSITION`); `progress` is the bar's settings
    (`progress.ProgressBars`, or False to hide it; None: the default, which the global switches silence);
    `workers` batches run at once (default `CUDA_WORKERS` on CUDA, 1 elsewhere; the results do not depend on it).
    """
    method = method or DEFAULT_DECOMPOSITION
    by_shape: dict[tuple, list[TLoraModule]] = {}
    for module in modules:
        weight = module.org_module[0].weight
        by_shape.setdefault((tuple(weight.shape), weight.device, weight.dtype, module.lora_dim), []).append(module)
    on_cuda = any(device.type == "cuda" for _, device, _, _ in by_shape)
    workers = workers or (CUDA_WORKERS if on_cuda else 1)
    batches = []
    for (shape, _, _, rank), same_shape in by_shape.items():
        chunk = max(1, CHUNK_BYTES // workers // working_bytes(shape))
        batches += [(same_shape[start : start + chunk], rank) for start in range(0, len(same_shape), chunk)]
    total = sum(len(same_shape) for same_shape in by_shape.values())
    with as_progress_bars(progress)(total=total, desc="Rebuilding T-LoRA base terms") as bar:

        def rebuild(batch: tuple[list[TLoraModule], int]) -> None:
            _rebuild_batch(*batch, method)
            bar.update(len(batch[0]))

        if workers == 1:
            for batch in batches:
                rebuild(batch)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="tlora-rebuild") as pool:
                list(pool.map(_on_own_stream(rebuild), batches))
    logger.info("Rebuilt the T-LoRA base terms of %d modules of %d shapes (%s)", total, len(by_shape), method)


def working_bytes(shape: tuple[int, ...]) -> int:
    """fp64 working memory of one matrix: the weight, its vectors and the Gram matrix."""
    out_dim, flat_in = shape[0], math.prod(shape[1:])
    return 8 * (3 * out_dim * flat_in + 2 * min(out_dim, flat_in) ** 2)


def _rebuild_batch(part: list[TLoraModule], rank: int, method: str) -> None:
    out_dim = part[0].org_module[0].weight.shape[0]
    weights = torch.stack([m.org_module[0].weight.detach().reshape(out_dim, -1) for m in part])
    base_q, base_p, base_lambda = principal_base_terms(weights, rank, method)
    for index, module in enumerate(part):
        _assign(module, base_q[index], base_p[index], base_lambda[index])


def _on_own_stream(work: Callable) -> Callable:
    """`work` for worker threads: on the thread's own CUDA stream of the batch's device (ordered after the caller's
    stream, and the caller's stream after it), or as is on the CPU, with the caller's grad and inference modes."""
    inference = torch.is_inference_mode_enabled()
    caller = {}
    if torch.cuda.is_available():
        caller = {index: torch.cuda.current_stream(index) for index in range(torch.cuda.device_count())}
    streams = threading.local()

    def run(batch: tuple[list[TLoraModule], int]) -> None:
        device = batch[0][0].org_module[0].weight.device
        stream = None
        if device.type == "cuda":
            own = streams.__dict__.setdefault("by_device", {})
            if device.index not in own:
                own[device.index] = torch.cuda.Stream(device)
            stream = own[device.index]
            stream.wait_stream(caller[device.index])
        with torch.inference_mode(inference), torch.no_grad(), torch.cuda.stream(stream) if stream else nullcontext():
            work(batch)
        if stream is not None:
            caller[device.index].wait_stream(stream)

    return run


def _assign(module: TLoraModule, q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> None:
    """Store one module's base terms in LyCORIS's layout (`_initialize_from_svd`, including its conv slicing)."""
    if module.isconv:
        kernel_ones = [1] * (len(module.conv_shape) - 2)
        q = q[:, : module.shape[1]].reshape(module.lora_dim, module.shape[1], *kernel_ones)
        p = p[: module.shape[0], :].reshape(module.shape[0], module.lora_dim, *kernel_ones)
    module.base_q.copy_(q)
    module.base_p.copy_(p)
    module.base_lambda.copy_(lam.unsqueeze(0))
