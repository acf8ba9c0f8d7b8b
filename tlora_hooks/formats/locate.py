"""Where a T-LoRA file is: a local file, a folder, or a file in a Hugging Face Hub repo.

Found the way diffusers' `load_lora_weights` finds a LoRA (`_get_model_file`): an existing file path, then a folder
joined with `weight_name` (and `subfolder`), else a repo id fetched with `huggingface_hub.hf_hub_download`, which
reads and fills the Hub cache and honours `HF_HUB_OFFLINE`. Without `weight_name`, the folder's or repo's only T-LoRA
file is taken: the `.safetensors` files (and the official FLUX `lora.pt`, by name) directly in it, narrowed, when
there are several, to those whose keys are T-LoRA keys; several left is an error listing them. A safetensors header
holds the keys and is read alone (a range request on the Hub), so no weights are fetched to decide; a pickle has no
such header, so it counts by name. Errors name the options as the caller spells them (`weight_name=` in Python,
`--weight-name` on the command line).
"""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from safetensors import SafetensorError, safe_open

from ..errors import TLoRAError
from ..progress import ProgressBars

# The name diffusers' LoRA trainers write (and `save_tlora` writes into a folder).
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The official FLUX code's checkpoint, a pickle: a candidate by its name (its keys cannot be read cheaply).
PICKLED_FILE_NAMES = ("lora.pt",)
# A path that does not exist and ends so is a missing file, not a repo id.
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Files diffusers' `_best_guess_weight_name` never takes for an adapter.
NOT_ADAPTERS = ("scheduler", "optimizer", "checkpoint")
# How each entry point spells the options its errors name: `load_tlora`'s keywords, the CLI's flags.
OPTION_SPELLINGS = {
    "keyword": {"weight_name": "weight_name=", "subfolder": "subfolder=", "token": "token=",
                "local_files_only": "local_files_only=True"},
    "flag": {"weight_name": "--weight-name", "subfolder": "--subfolder", "token": "--token",
             "local_files_only": "--local-files-only"},
}
# huggingface_hub's errors (by class name, most specific first; subclasses match) and what they mean here.
HUB_ERRORS = (
    ("GatedRepoError", "{repo} is a gated repo: accept its conditions on the Hub, then pass {token} (or log in with "
                       "`hf auth login`)."),
    ("RepositoryNotFoundError", "{repo} is not a local file or folder, and the Hub has no repo {repo} (a private "
                                "one needs {token}, or `hf auth login`)."),
    ("RevisionNotFoundError", "{repo} has no revision {revision!r} (a branch, tag or commit)."),
    ("LocalEntryNotFoundError", "{file} of {repo} ({revision}) is not in the Hub cache and cannot be downloaded "
                                "(offline: HF_HUB_OFFLINE=1 or {local_files_only}, or no connection). Download it "
                                "once online, or pass the file's local path."),
    ("EntryNotFoundError", "{repo} ({revision}) has no file {file}: check {weight_name} and {subfolder}."),
    ("HFValidationError", "{repo!r} is neither a local file or folder nor a Hub repo id ('user/repo')."),
    ("OfflineModeIsEnabled", "{repo} is not a local file or folder and offline mode is on (HF_HUB_OFFLINE=1)."),
    ("HfHubHTTPError", "Fetching {file} from the Hub repo {repo} failed: {error}"),
    # The network layer's own errors (requests' are OSErrors, httpx's are not).
    ("HTTPError", "Reaching the Hub for {repo} failed ({error}); pass a local path, or {weight_name} with the file "
                  "in the Hub cache."),
    ("OSError", "Fetching {file} of the Hub repo {repo} (or reading the Hub cache) failed: {error}"),
)


@dataclass(frozen=True)
class FileSource:
    """Where to look beyond a local path: the keywords of diffusers' `load_lora_weights`.

    Args:
        weight_name: The file's name in the folder or repo; without it, its only T-LoRA file.
        subfolder: The folder inside the folder or repo that holds the file.
        revision: A branch, tag or commit of the repo (default: its main branch).
        cache_dir: The Hub cache folder (default: huggingface_hub's, `HF_HUB_CACHE`).
        token: A Hub token for private or gated repos (default: `HF_TOKEN` or the saved login).
        local_files_only: Read the Hub cache only, never the network (as `HF_HUB_OFFLINE=1` does).
        option_spelling: How errors name these options: `"keyword"` (`weight_name=`, for `load_tlora`) or `"flag"`
            (`--weight-name`, for the command line); an `OPTION_SPELLINGS` key.
    """

    weight_name: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    option_spelling: str = "keyword"

    @property
    def options(self) -> dict[str, str]:
        """The options' names as the caller spells them, for the error messages."""
        return OPTION_SPELLINGS[self.option_spelling]


def locate_tlora_file(
    path: str | os.PathLike,
    source: FileSource,
    holds_tlora: Callable[[list[str]], bool],
    progress: ProgressBars,
) -> str:
    """The local file to read for `path` (a file, a folder or a repo id); `holds_tlora(keys)` recognises a T-LoRA."""
    name = os.fspath(path)
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        return _in_folder(name, source, holds_tlora)
    if name.endswith(WEIGHT_EXTENSIONS) or name.startswith((".", "~", os.sep)):
        raise TLoRAError(f"No T-LoRA file or folder at {name!r}.")
    return _from_hub(name, source, holds_tlora, progress)


def _in_folder(folder: str, source: FileSource, holds_tlora: Callable[[list[str]], bool]) -> str:
    where = os.path.join(folder, source.subfolder) if source.subfolder else folder
    if source.weight_name is not None:
        path = os.path.join(where, source.weight_name)
        if not os.path.isfile(path):
            raise TLoRAError(f"The folder {where} has no file {source.weight_name!r}.")
        return path
    if not os.path.isdir(where):
        raise TLoRAError(f"{folder} has no subfolder {source.subfolder!r}.")
    names = sorted(entry.name for entry in os.scandir(where) if entry.is_file())
    return os.path.join(where, _only_tlora(names, f"the folder {where}", lambda name: _local_keys(where, name),
                                           holds_tlora, source))


def _from_hub(
    repo: str, source: FileSource, holds_tlora: Callable[[list[str]], bool], progress: ProgressBars
) -> str:
    import huggingface_hub
    from huggingface_hub.utils import validate_repo_id

    from .. import __version__

    context = {"repo": repo, "revision": source.revision or "main", "file": source.weight_name or "its T-LoRA file",
               **source.options}
    with hub_errors_explained(context):
        validate_repo_id(repo)
        weight_name = source.weight_name or _only_tlora_in_repo(repo, source, holds_tlora)
        context["file"] = posixpath.join(source.subfolder, weight_name) if source.subfolder else weight_name
        return huggingface_hub.hf_hub_download(
            repo, weight_name, subfolder=source.subfolder, revision=source.revision, cache_dir=source.cache_dir,
            token=source.token, local_files_only=source.local_files_only, library_name="tlora-hooks",
            library_version=__version__, **progress.download_arguments(),
        )


def _only_tlora_in_repo(repo: str, source: FileSource, holds_tlora: Callable[[list[str]], bool]) -> str:
    """The repo's only T-LoRA file directly in `subfolder`, from the repo's listing; offline there is no listing."""
    import huggingface_hub
    from huggingface_hub import constants

    if source.local_files_only or constants.HF_HUB_OFFLINE:
        raise TLoRAError(
            f"{repo} is not a local file or folder, and offline (HF_HUB_OFFLINE=1 or "
            f"{source.options['local_files_only']}) the repo's files cannot be listed to find its T-LoRA file: pass "
            f"{source.options['weight_name']} (the file's name in the repo, e.g. 'pytorch_lora_weights.safetensors')."
        )
    prefix = f"{source.subfolder.strip('/')}/" if source.subfolder else ""
    files = huggingface_hub.list_repo_files(repo, revision=source.revision, token=source.token)
    names = [path[len(prefix):] for path in files if path.startswith(prefix) and "/" not in path[len(prefix):]]

    def keys(name: str) -> list[str]:
        metadata = huggingface_hub.parse_safetensors_file_metadata(
            repo, prefix + name, revision=source.revision, token=source.token
        )
        return list(metadata.tensors)

    return _only_tlora(names, f"the Hub repo {repo}" + (f" ({prefix.rstrip('/')})" if prefix else ""), keys,
                       holds_tlora, source)


def _only_tlora(
    names: list[str],
    where: str,
    keys_of: Callable[[str], list[str]],
    holds_tlora: Callable[[list[str]], bool],
    source: FileSource,
) -> str:
    """The one T-LoRA file among a folder's file names; several or none is a TLoRAError naming them.

    Several are an error even where one has a trainer's name: guessing would load another file than the one meant,
    silently.
    """
    candidates = [
        name for name in names
        if (name.endswith(".safetensors") or name in PICKLED_FILE_NAMES) and not any(w in name for w in NOT_ADAPTERS)
    ]
    if len(candidates) > 1:
        candidates = [name for name in candidates if not name.endswith(".safetensors") or holds_tlora(keys_of(name))]
    weight_name = source.options["weight_name"]
    if not candidates:
        raise TLoRAError(
            f"{where} holds no T-LoRA file (files: {', '.join(names[:10]) or 'none'}). Pass {weight_name} to "
            "name one."
        )
    if len(candidates) > 1:
        raise TLoRAError(
            f"{where} holds several T-LoRA files: {', '.join(candidates)}. Pass {weight_name} with one of them."
        )
    return candidates[0]


def _local_keys(folder: str, name: str) -> list[str]:
    try:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return []  # not safetensors after all: no candidate (weight_name= still reads it, with the right error)


@contextmanager
def hub_errors_explained(context: dict) -> Iterator[None]:
    """Turns huggingface_hub's (and its network layer's) errors into a TLoRAError saying what is missing."""
    try:
        yield
    except TLoRAError:
        raise
    except Exception as error:
        names = {cls.__name__ for cls in type(error).__mro__}
        message = next((message for name, message in HUB_ERRORS if name in names), None)
        if message is None:
            raise
        raise TLoRAError(message.format(**context, error=error)) from error
