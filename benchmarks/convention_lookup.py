"""Host-side cost of choosing the convention row on each denoiser call (the scheduler refinement).

The hook asks `ConventionChoice.for_scheduler(pipe.scheduler)` once per call, so EDM / continuous
schedulers swapped in after `enable_tlora` are honoured. This measures that lookup, interleaved
across cases, median of repeats. It is pure Python on the host: the figure does not depend on the GPU.

    python benchmarks/convention_lookup.py            # prints one JSON line
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import timeit
from importlib.metadata import version

import diffusers
import torch

from tlora_hooks.conventions import convention_for


def tiny_unet():
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=1,
    )


def tiny_sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
    )


def main(repeats: int = 15, number: int = 20000) -> dict:
    unet, sd3 = convention_for(tiny_unet()), convention_for(tiny_sd3())
    cases = {
        "unet+euler (3 scheduler rows, none match)": (unet, diffusers.EulerDiscreteScheduler()),
        "unet+euler_continuous (CosXL row)": (unet, diffusers.EulerDiscreteScheduler(timestep_type="continuous")),
        "unet+edm_dpmsolver (Playground row)": (unet, diffusers.EDMDPMSolverMultistepScheduler()),
        "sd3+flowmatch (no scheduler rows)": (sd3, diffusers.FlowMatchEulerDiscreteScheduler()),
    }
    samples = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so machine noise spreads over every case
        for name, (choice, scheduler) in cases.items():
            seconds = timeit.timeit(lambda: choice.for_scheduler(scheduler), number=number)
            samples[name].append(seconds / number * 1e6)
    return {
        "benchmark": "convention_lookup",
        "unit": "microseconds per denoiser call (median)",
        "results": {name: round(statistics.median(values), 3) for name, values in samples.items()},
        "device": f"host CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "lycoris": version("lycoris-lora"),
        "python": platform.python_version(), "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
