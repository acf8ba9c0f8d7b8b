"""Every pipeline family, hooked, against a reference that sets the LyCORIS mask from the scheduler's own timestep.

The reference does what SimpleTuner's vendored pipelines do, without the convention table: the
mask for a step comes from that step's loop timestep `t` (the value `callback_on_step_end` receives,
an element of the loop's `timesteps`), set before the step's first denoiser call. It is set for step
0 before the run and for step i+1 in the callback of step i; each family's `noise_ward` maps the
loop `t` to the noise-ward timestep where the scheduler's scale is not already that (Mochi's
inverted schedule, Stable Cascade's ratio, EDM's c_noise), from the scheduler's own state.

Each case asserts that (a) the rank the T-LoRA modules read on every denoiser call equals the rank
of its step's reference timestep, (b) the reference run read the same ranks, (c) the output equals
the reference output, and (d) the family's calls-per-step pattern is the one the case is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

import tiny
from conftest import lycoris_rank
from tlora_hooks import enable_tlora
from tlora_hooks.discovery import applied_tlora_modules

SCHEDULE = (8, 1, 1.0)  # max_rank, min_rank, alpha
# Mochi's rotary embedding asks CPU autocast for float32, which CPU autocast does not do; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


# -- the scheduler's own timestep, noise-ward, from the loop's `t` and the scheduler's state ---------------------
def loop_timestep(scheduler, step: int, t, pipeline_t) -> float:
    """Most schedulers: the loop's `t` is already the noise-ward timestep."""
    return float(t)


def edm_sigma(scheduler, step: int, t, pipeline_t) -> float:
    """EDM / continuous schedulers pass c_noise; the step's sigma, as rectified-flow time sigma/(1+sigma), x1000."""
    sigma = float(scheduler.sigmas[step])
    return sigma / (1 + sigma) * 1000


def flow_time_of_sigma(scheduler, step: int, t, pipeline_t) -> float:
    """Cosmos 2 runs its flow scheduler on EDM Karras sigmas (up to 80); sigma/(1+sigma) is the flow time."""
    sigma = float(scheduler.sigmas[step])
    return sigma / (1 + sigma) * 1000


def flow_sigma(scheduler, step: int, t, pipeline_t) -> float:
    """The step's flow sigma x 1000 (Cosmos 2.5 hands the transformer `scheduler.sigmas[i]`)."""
    return float(scheduler.sigmas[step]) * 1000


def trigflow(scheduler, step: int, t, pipeline_t) -> float:
    """Sana-Sprint's SCM scheduler steps a TrigFlow angle; its flow time is sin/(sin+cos)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return float(torch.sin(t) / (torch.sin(t) + torch.cos(t)) * 1000)


def ratio(scheduler, step: int, t, pipeline_t) -> float:
    """DDPMWuerstchen steps a noise ratio in (0, 1] (1 = pure noise) and has no num_train_timesteps."""
    return float(t) * 1000


def pipeline_current(scheduler, step: int, t, pipeline_t) -> float:
    """The pipeline's own `current_timestep` (Mochi: 1000 - t, its scheduler runs `invert_sigmas=True`)."""
    return float(pipeline_t)


def noisiest_frame(scheduler, step: int, t, pipeline_t) -> float:
    """Diffusion forcing: the loop's `t` is one timestep per latent frame (a row of the step matrix)."""
    return float(torch.as_tensor(t).max())


@dataclass(frozen=True)
class Stage:
    """One denoising loop of a pipeline: its denoiser(s), the callback that reports its steps, its scheduler."""

    denoisers: tuple[str, ...] = ("transformer",)
    noise_ward: Callable[[Any, int, Any, Any], float] = loop_timestep  # (scheduler, step, t, pipe.current_timestep)
    scheduler: str = "scheduler"
    callback: str = "callback_on_step_end"


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[Any, dict]]
    stages: tuple[Stage, ...] = (Stage(),)
    calls_per_step: frozenset[int] | None = frozenset({1})  # the family's pattern, over all steps
    atol: float = 1e-5
    legacy_callback: bool = False  # `callback(step, t, latents)` (PixArt) instead of `callback_on_step_end`
    repeats_timesteps: bool = False  # the loop visits one t twice (PNDM's first step, Heun's second order)


def case(build, *denoisers: str, noise_ward=loop_timestep, calls_per_step=(1,), **fields) -> Case:
    """A one-loop case."""
    stage = Stage(denoisers or ("transformer",), noise_ward)
    pattern = frozenset(calls_per_step) if calls_per_step is not None else None
    return Case(build, (stage,), pattern, **fields)


CASES: dict[str, Case] = {
    # images
    "sd15_pndm": case(lambda: tiny.sd15("pndm"), "unet", repeats_timesteps=True),
    "sd15_heun": case(lambda: tiny.sd15("heun"), "unet", repeats_timesteps=True),  # 2 calls per step, different t
    "sdxl": case(tiny.sdxl, "unet"),
    "sdxl_img2img": case(lambda: tiny.sdxl(img2img=True), "unet"),  # begin_index != 0
    "sdxl_edm_playground": case(lambda: tiny.sdxl("edm"), "unet", noise_ward=edm_sigma),
    "sdxl_continuous_cosxl": case(lambda: tiny.sdxl("continuous"), "unet", noise_ward=edm_sigma),
    "sd3": case(tiny.sd3),
    "sd3_skip_layer_guidance": case(lambda: tiny.sd3(skip_layer_guidance=True), calls_per_step=(1, 2)),
    "flux_true_cfg": case(tiny.flux, calls_per_step=(2,), atol=0),
    "flux_kontext": case(lambda: tiny.flux("kontext"), atol=0),
    "flux_fill": case(lambda: tiny.flux("fill"), atol=0),
    "flux_img2img": case(lambda: tiny.flux("img2img"), atol=0),
    "flux2": case(tiny.flux2, atol=0),
    "flux2_klein_base": case(lambda: tiny.flux2("klein_base"), calls_per_step=(2,), atol=0),
    "chroma": case(tiny.chroma, calls_per_step=(2,), atol=0),
    "qwen_image_true_cfg": case(tiny.qwen_image, calls_per_step=(2,), atol=0),
    "sana": case(tiny.sana),
    "sana_sprint": case(tiny.sana_sprint, noise_ward=trigflow),
    "pixart_sigma": case(tiny.pixart_sigma, legacy_callback=True),
    "auraflow_fp16": case(tiny.auraflow, atol=0),
    "lumina2": case(tiny.lumina2, calls_per_step=(2,)),
    "hidream": case(tiny.hidream),
    "hunyuan_dit": case(tiny.hunyuan_dit),
    "kandinsky22_prior": case(lambda: tiny.kandinsky22("prior"), "prior"),
    "kandinsky22_decoder": case(tiny.kandinsky22, "unet"),
    "kandinsky22_combined": Case(
        lambda: tiny.kandinsky22("combined"),
        (
            Stage(("prior_prior",), scheduler="prior_scheduler", callback="prior_callback_on_step_end"),
            Stage(("unet",)),
        ),
    ),
    "kandinsky3": case(tiny.kandinsky3, "unet"),
    "stable_cascade_prior": case(tiny.stable_cascade, "prior", noise_ward=ratio),
    "stable_cascade_decoder": case(lambda: tiny.stable_cascade("decoder"), "decoder", noise_ward=ratio),
    "stable_cascade_combined": Case(
        lambda: tiny.stable_cascade("combined"),
        (Stage(("prior_prior",), ratio, "prior_scheduler", "prior_callback_on_step_end"), Stage(("decoder",), ratio)),
    ),
    # video
    "cogvideox": case(tiny.cogvideox),
    "hunyuan_video_bf16": case(tiny.hunyuan_video, atol=0),
    "wan21": case(tiny.wan, calls_per_step=(2,)),
    "wan22_a14b_both_experts": case(
        lambda: tiny.wan("2.2_a14b"), "transformer", "transformer_2", calls_per_step=(2,)
    ),
    "wan22_ti2v_per_token": case(lambda: tiny.wan("2.2_ti2v"), calls_per_step=(2,)),
    "ltx_t2v": case(tiny.ltx),
    "ltx_i2v_per_token": case(lambda: tiny.ltx("i2v")),
    "ltx_condition_per_token": case(lambda: tiny.ltx("condition")),
    "mochi_inverted": case(tiny.mochi, noise_ward=pipeline_current),
    "allegro": case(tiny.allegro),
    "skyreels_v2": case(tiny.skyreels_v2, calls_per_step=(2,)),
    "skyreels_v2_df_per_frame": case(tiny.skyreels_v2_df, noise_ward=noisiest_frame, calls_per_step=(2,)),
    "skyreels_v2_df_async": case(lambda: tiny.skyreels_v2_df(ar_step=2), noise_ward=noisiest_frame,
                                 calls_per_step=(2,)),
    "cosmos1_edm": case(tiny.cosmos, noise_ward=edm_sigma, calls_per_step=(2,), atol=0),
    "cosmos2_t2i": case(lambda: tiny.cosmos("2"), noise_ward=flow_time_of_sigma, calls_per_step=(2,), atol=0),
    "cosmos2_5": case(lambda: tiny.cosmos("2.5"), noise_ward=flow_sigma, calls_per_step=(2,), atol=0),
}


class StepRecorder:
    """Records each step's loop timestep (from the stage's callback) and the step of every denoiser call."""

    def __init__(self, pipe, stage: Stage, on_step: Callable[[int], None] | None = None):
        self.step = 0
        self.timesteps: list = []
        self.pipeline_timesteps: list = []  # `pipe.current_timestep` at each step's end, where the pipeline has it
        self.call_steps: list[int] = []
        self.on_step = on_step
        self._handles = [getattr(pipe, name).register_forward_pre_hook(self._on_call) for name in stage.denoisers]

    def _on_call(self, module, args):
        self.call_steps.append(self.step)

    def callback(self, pipe, i, t, callback_kwargs):
        self.timesteps.append(t.clone() if isinstance(t, torch.Tensor) else t)
        self.pipeline_timesteps.append(getattr(pipe, "current_timestep", None))
        self.step = i + 1
        if self.on_step is not None:
            self.on_step(i + 1)
        return {}

    def close(self):
        for handle in self._handles:
            handle.remove()


def num_train_timesteps(scheduler) -> int:
    return getattr(scheduler.config, "num_train_timesteps", None) or 1000


def stage_rank(pipe, stage: Stage, recorder: StepRecorder, step: int) -> int:
    """The reference rank: LyCORIS's mask for int(the scheduler's noise-ward timestep of this step)."""
    scheduler = getattr(pipe, stage.scheduler)
    timestep = stage.noise_ward(scheduler, step, recorder.timesteps[step], recorder.pipeline_timesteps[step])
    return lycoris_rank(timestep, num_train_timesteps(scheduler), *SCHEDULE)


def run(pipe, kw, case: Case, recorders: list[StepRecorder]):
    callbacks = {}
    for stage, recorder in zip(case.stages, recorders):
        if case.legacy_callback:
            callbacks.update(callback=lambda i, t, latents, r=recorder: r.callback(pipe, i, t, {}), callback_steps=1)
        else:
            callbacks[stage.callback] = recorder.callback
    try:
        return pipe(**kw, generator=torch.Generator().manual_seed(0), **callbacks, return_dict=False)
    finally:
        for recorder in recorders:
            recorder.close()


def reference_run(case: Case, pipe, kw, hooked: list[StepRecorder]):
    """The stock pipeline with the LyCORIS mask set from the scheduler's own timestep before each step.

    One loop uses mask group 0, as SimpleTuner does; a pipeline with two loops (prior + decoder)
    gives each its own group, so each loop's mask can be set before its first call.
    """
    max_rank, min_rank, alpha = SCHEDULE
    recorders = []
    for index, (stage, steps) in enumerate(zip(case.stages, hooked)):
        group = 0 if len(case.stages) == 1 else 100 + index
        for name in stage.denoisers:
            for module in applied_tlora_modules(getattr(pipe, name)):
                module.mask_group_id = group
        scheduler = getattr(pipe, stage.scheduler)

        def set_mask(step, stage=stage, steps=steps, scheduler=scheduler, group=group):
            if step < len(steps.timesteps):
                t = stage.noise_ward(scheduler, step, steps.timesteps[step], steps.pipeline_timesteps[step])
                mask = compute_timestep_mask(int(t), num_train_timesteps(scheduler), max_rank, min_rank, alpha)
                set_timestep_mask(mask, group)

        set_mask(0)
        recorders.append(StepRecorder(pipe, stage, on_step=set_mask))
    try:
        return run(pipe, kw, case, recorders), recorders
    finally:
        for index in range(len(case.stages)):
            clear_timestep_mask(0 if len(case.stages) == 1 else 100 + index)


def expected_ranks(pipe, case: Case, probe_names: list[str], recorders: list[StepRecorder]) -> list[int]:
    """One reference rank per denoiser call, in call order."""
    stage_of = {name: index for index, stage in enumerate(case.stages) for name in stage.denoisers}
    next_call = [iter(recorder.call_steps) for recorder in recorders]
    ranks = []
    for name in probe_names:
        index = stage_of[name]
        step = next(next_call[index])
        ranks.append(stage_rank(pipe, case.stages[index], recorders[index], step))
    return ranks


@pytest.mark.parametrize("case_id", list(CASES))
def test_family_matches_scheduler_timestep_reference(case_id, rank_probe):
    case = CASES[case_id]
    pipe, kw = case.build()
    for stage in case.stages:
        for name in stage.denoisers:
            rank_probe.watch(name, getattr(pipe, name))

    if len(case.stages) > 1:
        # Leave each loop's scheduler holding its timesteps, so a hook reading the wrong one would snap wrongly.
        run(pipe, kw, case, [StepRecorder(pipe, stage) for stage in case.stages])
        rank_probe.reset()
    handle = enable_tlora(pipe, max_rank=SCHEDULE[0], min_rank=SCHEDULE[1], alpha=SCHEDULE[2])
    hooked = [StepRecorder(pipe, stage) for stage in case.stages]
    out = run(pipe, kw, case, hooked)
    handle.remove()
    hooked_ranks, names = rank_probe.ranks(), rank_probe.names()
    rank_probe.reset()

    reference_out, reference = reference_run(case, pipe, kw, hooked)
    reference_ranks = rank_probe.ranks()

    expected = expected_ranks(pipe, case, names, hooked)
    for hooked_stage, reference_stage in zip(hooked, reference):
        assert [torch.as_tensor(t).tolist() for t in reference_stage.timesteps] == [
            torch.as_tensor(t).tolist() for t in hooked_stage.timesteps
        ]
    assert hooked_ranks == expected
    assert reference_ranks == expected
    assert len(set(expected)) > 1, "the schedule should change the rank across steps"
    loop_timesteps = [str(torch.as_tensor(t).tolist()) for t in hooked[0].timesteps] if len(case.stages) == 1 else []
    assert (len(set(loop_timesteps)) < len(loop_timesteps)) == case.repeats_timesteps
    if case.calls_per_step is not None:
        counts = {steps.count(step) for steps in (r.call_steps for r in hooked) for step in set(steps)}
        assert counts == case.calls_per_step, f"calls per step: {[r.call_steps for r in hooked]}"
    torch.testing.assert_close(out[0], reference_out[0], atol=case.atol, rtol=case.atol)
