"""`torch.compile(denoiser)` with the fast modes: the rank changes every call, the graph is not recompiled.

Recompiles are decided by dynamo's guards before any backend runs, so a backend that only counts the graphs it is
handed (and runs them eagerly) sees the same recompiles inductor would, without inductor's compile time on CPU.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from conftest import lycoris_rank
from tlora_hooks import enable_tlora

STEPS = 20


def flux_calls():
    """A tiny Flux transformer and the inputs of a 20-step run, one timestep per call."""
    pipe, _ = tiny.flux()
    pipe.scheduler.set_timesteps(STEPS, mu=1.0)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(1, 16, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        guidance=torch.full((1,), 3.5, dtype=dtype),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    timesteps = [(t / 1000).reshape(1).to(dtype) for t in pipe.scheduler.timesteps]
    return pipe, inputs, timesteps


@pytest.mark.parametrize("mode", ["auto", "low_memory"])
def test_changing_rank_does_not_recompile(mode):
    pipe, inputs, timesteps = flux_calls()
    transformer = pipe.transformer
    with torch.no_grad(), enable_tlora(pipe, max_rank=8, mode="lycoris"):
        reference = [transformer(timestep=t, **inputs)[0] for t in timesteps]

    graphs_before_call = []
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    handle = enable_tlora(pipe, max_rank=8, mode=mode)
    compiled = torch.compile(transformer, backend=counting_backend)
    with torch.no_grad():
        outputs = []
        for t in timesteps:
            graphs_before_call.append(len(graphs))
            outputs.append(compiled(timestep=t, **inputs)[0])
    handle.remove()
    torch._dynamo.reset()

    ranks = {lycoris_rank(t, 1000, 8) for t in pipe.scheduler.timesteps}
    assert len(ranks) > 3, "the rank must change across the run for this test to mean anything"
    after_warm_up = len(graphs) - graphs_before_call[1]
    assert after_warm_up <= 1, f"{after_warm_up} compilations after the first call"
    for out, ref in zip(outputs, reference):  # the compiled graph reads the folded weights and the live mask
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 1.5e-2



@pytest.mark.parametrize("mode", ["auto", "low_memory", "lycoris"])
def test_compiled_blocks_keep_the_block_guard_and_do_not_recompile(mode):
    """`compile_repeated_blocks`-style compilation of each block traces the block guard's pre-hook into the block:
    the changing rank recompiles nothing, the outputs are the eager ones, and a block run outside a call still
    raises (the guard was not compiled away)."""
    from tlora_hooks import TLoRAError

    pipe, inputs, timesteps = flux_calls()
    transformer = pipe.transformer
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    with torch.no_grad(), enable_tlora(pipe, max_rank=8, mode=mode):
        reference = [transformer(timestep=t, **inputs)[0] for t in timesteps]

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    handle = enable_tlora(pipe, max_rank=8, mode=mode)
    for block in blocks:
        block.compile(backend=counting_backend)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            outputs = []
            for t in timesteps:
                outputs.append(transformer(timestep=t, **inputs)[0])
                if t is timesteps[0]:
                    first_call_graphs = len(graphs)
            with pytest.raises(TLoRAError, match="ran outside a call"):
                blocks[0](inputs["hidden_states"], inputs["encoder_hidden_states"], torch.zeros(1, 32))
    finally:
        handle.remove()
        torch._dynamo.reset()
    assert len(graphs) == first_call_graphs, "no block recompiled after the first call"
    for out, ref in zip(outputs, reference):
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 1.5e-2
