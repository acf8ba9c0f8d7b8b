"""diffusers' context parallelism (`enable_parallelism`, Ulysses degree 2) on two CPU processes: every rank masks
every call with the rank a single process uses, and the output equals the single-process run.

Context parallelism splits the inputs inside the denoiser's `forward` (a diffusers hook that rewrites it), after
the T-LoRA pre-hook on the root has read the full timestep; Wan's plan also splits a per-token (TI2V) `timestep`
along its tokens. The per-token case below gives the two halves different timesteps, so a reading or reduction
moved below the root would give the two ranks different ranks.

The processes make diffusers see one CPU device (`process_group.cpu_only_device_count`): it places rank r on
`r % device_count()` of the accelerator type, a ZeroDivisionError on CPU-only torch (and CUDA where a GPU is
seen). Ring attention is not covered: diffusers' native backend has no `return_lse` for it.

On GPUs: the NCCL job (one GPU per rank) needs two GPUs; with one, the CPU job is checked against a single process
on the GPU.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from conftest import RankProbe, lycoris_rank
from process_group import cpu_only_device_count, init_gloo, run_ranks
from tlora_hooks import enable_tlora

SCHEDULE = (8, 1, 1.0)
TOLERANCE = 1e-5  # fp32; the split attention sums in another order


def _flux():
    return tiny.flux(dtype=torch.float32), torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))


def _wan_ti2v():
    return tiny.wan("2.2_ti2v"), torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))


PIPELINES = {"flux": _flux, "wan22_ti2v": _wan_ti2v}


def parallelize(transformer: torch.nn.Module) -> None:
    from diffusers import ContextParallelConfig

    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))


def run_pipeline(case: str, parallel: bool, device: str = "cpu") -> dict:
    """Ranks the T-LoRA modules saw per call (LyCORIS's forward) and the outputs, in that mode and the default one.

    Flux is parallelised before enable_tlora, Wan after: the order does not matter.
    """
    (pipe, kw), latents = PIPELINES[case]()
    to_device(pipe, device)
    block_tokens = first_block_tokens(pipe.transformer)
    with pytest.MonkeyPatch.context() as patch:
        probe = RankProbe(patch).watch("transformer", pipe.transformer)  # "auto" means "lycoris" while probing
        if parallel and case == "flux":
            parallelize(pipe.transformer)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        if parallel and case != "flux":
            parallelize(pipe.transformer)
        masked = pipe(**kw, latents=latents.to(device), return_dict=False)[0].cpu()
        ranks = probe.ranks()
        probe.close()
    handle = enable_tlora(pipe, *SCHEDULE)  # the default mode, replacing the hooks
    default = pipe(**kw, latents=latents.to(device), return_dict=False)[0].cpu()
    return {"ranks": ranks, "masked": masked, "default": default, "mode": handle.mode["transformer"],
            "block_tokens": sorted(set(block_tokens))}


def first_block_tokens(transformer: torch.nn.Module) -> list[int]:
    """The number of tokens the first block's `norm1` receives, call by call: each rank's share once split. Inside
    the block, since Wan's plan splits the tokens in the first block's own (rewritten) forward."""
    blocks = getattr(transformer, "transformer_blocks", None) or transformer.blocks
    seen = []
    blocks[0].norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


def run_per_token_call(parallel: bool, device: str = "cpu") -> dict:
    """One Wan TI2V call whose first-frame token is clean (t = 0) and the other carries t, as image-to-video
    passes them: the rank each rank's modules used, and the timestep a module below the root received."""
    (pipe, _), _ = _wan_ti2v()
    to_device(pipe, device)
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    per_token = torch.tensor([[0.0, float(t)]], device=device)  # 2 tokens: one per latent frame
    below_root = []
    pipe.transformer.condition_embedder.register_forward_pre_hook(lambda module, args: below_root.append(args[0]))
    with pytest.MonkeyPatch.context() as patch:
        probe = RankProbe(patch).watch("transformer", pipe.transformer)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        if parallel:
            parallelize(pipe.transformer)
        latents = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(2)).to(device)
        embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3)).to(device)
        pipe.transformer(hidden_states=latents, timestep=per_token, encoder_hidden_states=embeds, return_dict=False)
        ranks = probe.ranks()
        probe.close()
    return {"ranks": ranks, "t": float(t), "below_root_max": float(below_root[0].max())}


def to_device(pipe, device: str) -> None:
    """The pipeline and its T-LoRA modules (LyCORIS keeps them outside the denoiser) on `device`."""
    if device == "cpu":
        return
    from tlora_hooks.discovery import applied_tlora_modules

    pipe.to(device)
    for module in applied_tlora_modules(pipe.transformer):
        module.to(device)


def context_parallel_rank(rank: int, world_size: int) -> dict:
    """What one rank of the CPU job returns (runs in a child process)."""
    cpu_only_device_count()
    init_gloo(rank, world_size)
    results = {case: run_pipeline(case, parallel=True) for case in PIPELINES}
    results["per_token"] = run_per_token_call(parallel=True)
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict]:
    """Both ranks' results, from one two-process job for the whole module (a job costs seconds of imports)."""
    return run_ranks(context_parallel_rank, world_size=2)


@pytest.mark.parametrize("case", list(PIPELINES))
def test_every_rank_masks_like_one_process(case, parallel_results):
    single = run_pipeline(case, parallel=False)
    assert len(set(single["ranks"])) > 1, "the schedule should change the rank across calls"
    (tokens,) = single["block_tokens"]
    for rank, results in enumerate(parallel_results):
        parallel = results[case]
        assert parallel["block_tokens"] == [tokens // 2], f"rank {rank}'s blocks should run half of the tokens"
        assert parallel["ranks"] == single["ranks"], f"rank {rank} used other T-LoRA ranks than one process"
        torch.testing.assert_close(parallel["masked"], single["masked"], atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(parallel["default"], single["default"], atol=TOLERANCE, rtol=TOLERANCE)
        assert parallel["mode"] == single["mode"] == "fold"
    assert (single["default"] - single["masked"]).abs().max() < TOLERANCE, "fold gives LyCORIS's masked output"


def test_per_token_timesteps_are_reduced_before_the_split(parallel_results):
    """Below the root each rank holds its own tokens' timesteps (rank 0 only the clean one); the rank is still
    the noisiest token's on both."""
    single = run_per_token_call(parallel=False)
    expected = lycoris_rank(single["t"], 1000, *SCHEDULE)
    assert single["ranks"] == [expected] and expected != SCHEDULE[0], "t = 0 alone would give the full rank"
    below_root = [results["per_token"]["below_root_max"] for results in parallel_results]
    assert below_root == [0.0, single["t"]], "the fixture must split the timestep between the ranks"
    for rank, results in enumerate(parallel_results):
        assert results["per_token"]["ranks"] == [expected], f"rank {rank} reduced its own half of the tokens"


# -- GPUs ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_ranks_mask_like_one_process_on_the_gpu():
    """What one GPU can check (the NCCL job needs two): the two CPU ranks, started fresh (spawned: a forked child
    cannot touch CUDA once the parent has), against a single process on the GPU."""
    parallel_results = run_ranks(context_parallel_rank, 2, start="spawn")
    for case in PIPELINES:
        single = run_pipeline(case, parallel=False, device="cuda:0")
        assert single["mode"] == "fold"
        for results in parallel_results:
            assert results[case]["ranks"] == single["ranks"]
            torch.testing.assert_close(results[case]["masked"], single["masked"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(results[case]["default"], single["default"], atol=1e-4, rtol=1e-4)
    single = run_per_token_call(parallel=False, device="cuda:0")
    assert [results["per_token"]["ranks"] for results in parallel_results] == [single["ranks"]] * 2


def context_parallel_gpu_rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    device = f"cuda:{rank}"
    results = {case: run_pipeline(case, parallel=True, device=device) for case in PIPELINES}
    results["per_token"] = run_per_token_call(parallel=True, device=device)
    return results


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_rank_masks_like_one_process_on_gpus():
    parallel_results = run_ranks(context_parallel_gpu_rank, 2, start="spawn")
    for case in PIPELINES:
        single = run_pipeline(case, parallel=False, device="cuda:0")
        for results in parallel_results:
            assert results[case]["ranks"] == single["ranks"]
            torch.testing.assert_close(results[case]["default"], single["default"], atol=1e-4, rtol=1e-4)
    single = run_per_token_call(parallel=False, device="cuda:0")
    assert [results["per_token"]["ranks"] for results in parallel_results] == [single["ranks"]] * 2
