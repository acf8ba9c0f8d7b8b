"""Progress bars for the slow steps (a Hub download, reading a file, building and rebuilding modules), silenced by
the switches diffusers users already have.

A bar is off when the target pipeline says so (`pipe.set_progress_bar_config(disable=True)`: a `DiffusionPipeline`
keeps those settings on itself, a `ModularPipeline` on its blocks), when diffusers' `disable_progress_bar()` or
huggingface_hub's `disable_progress_bars()` (or `HF_HUB_DISABLE_PROGRESS_BARS=1`) is in force, and on every process
but rank 0, as a pipeline's own bars are. A bare denoiser or the CLI has no pipeline settings: the global switches
decide. The bars are huggingface_hub's tqdm in the group `tlora_hooks`, so `disable_progress_bars("tlora_hooks")`
silences these alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

import torch
from huggingface_hub.utils import are_progress_bars_disabled
from huggingface_hub.utils import tqdm as hub_tqdm

PROGRESS_GROUP = "tlora_hooks"


@dataclass(frozen=True)
class ProgressBars:
    """Makes the bars of one call, with the tqdm settings of its target pipeline (`set_progress_bar_config`)."""

    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, target: Any) -> "ProgressBars":
        """The bars for a pipeline (its `set_progress_bar_config` settings) or a bare denoiser (none)."""
        return cls(dict(pipeline_bar_settings(target)))

    @property
    def silenced(self) -> bool:
        from diffusers.utils import (
            logging as diffusers_logging,  # imported when a bar is made: diffusers is slow to import
        )

        return (
            self.settings.get("disable") is True
            or not diffusers_logging.is_progress_bar_enabled()
            or are_progress_bars_disabled(PROGRESS_GROUP)
        )

    def __call__(
        self, iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "module"
    ) -> hub_tqdm:
        """A bar over `iterable`, or over `total` units (then use it as a context manager), as a pipeline's own
        `progress_bar(iterable, total)` is."""
        kwargs: dict[str, Any] = {"total": total, "desc": desc, "unit": unit, "disable": not _rank_zero()}
        kwargs.update(self.settings)
        if self.silenced:
            kwargs["disable"] = True
        return hub_tqdm(iterable, **kwargs, name=PROGRESS_GROUP)

    def download_arguments(self) -> dict[str, Any]:
        """Keywords for `hf_hub_download`: its own bar, made silent when these are (where it takes a `tqdm_class`)."""
        if self.silenced and _download_takes_tqdm_class():
            return {"tqdm_class": SilentTqdm}
        return {}


ProgressArgument = Union[ProgressBars, bool, None]


def as_progress_bars(progress: ProgressArgument) -> ProgressBars:
    """None: the default bars (the global switches decide); True/False: shown/hidden; or the bars themselves."""
    if isinstance(progress, ProgressBars):
        return progress
    return ProgressBars() if progress is None else ProgressBars({"disable": not progress})


def pipeline_bar_settings(target: Any) -> Mapping[str, Any]:
    """What `set_progress_bar_config` stored: on a `DiffusionPipeline` itself, on a `ModularPipeline`'s blocks; {}
    where nothing was set.

    A `ModularPipeline` hands the settings to those of its top-level blocks that run a loop, and its loops' own bars
    read them there. Where every loop sits deeper (the full pipelines `from_pretrained` builds, in diffusers 0.42.1)
    nothing is stored: the pipeline's own denoising bar shows and ours do too; the global switches silence both.
    """
    pending = [target, getattr(target, "_blocks", None)]
    while pending:
        holder = pending.pop(0)
        settings = getattr(holder, "_progress_bar_config", None)
        if isinstance(settings, Mapping):
            return settings
        if holder is not None and holder is not target:
            pending.extend(getattr(holder, "sub_blocks", {}).values())
    return {}


class SilentTqdm(hub_tqdm):
    """huggingface_hub's bar, always disabled: the download bar of a call whose bars are silenced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


@functools.cache
def _download_takes_tqdm_class() -> bool:
    """`hf_hub_download(tqdm_class=...)` exists from huggingface_hub 1.5 on; older ones only obey their own switch."""
    from huggingface_hub import file_download

    return "tqdm_class" in inspect.signature(file_download.hf_hub_download).parameters


def _rank_zero() -> bool:
    """Rank 0, or no process group: a pipeline's own bars show only there."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0
