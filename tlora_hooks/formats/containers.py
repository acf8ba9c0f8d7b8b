"""Reading a file's tensors and metadata: safetensors, or a torch pickle loaded with `weights_only=True`.

The container is recognised by its first bytes, not its name, so a misnamed file gets the right error.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ..errors import TLoRAError

# What the trainers write inside a checkpoint folder, in the order a folder is searched.
KNOWN_FILE_NAMES = ("pytorch_lora_weights.safetensors", "lora.safetensors", "lora.pt")
READS = (
    "load_tlora reads LyCORIS/SimpleTuner and official ControlGenAI .safetensors files and the official FLUX lora.pt"
)


def resolve_path(path: str | os.PathLike) -> str:
    """The file to read; a trainer's checkpoint folder resolves to the one weights file it holds."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in KNOWN_FILE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise TLoRAError(
            f"{path} is a folder without a T-LoRA weights file ({', '.join(KNOWN_FILE_NAMES)}); pass the file."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No T-LoRA file at {path!r}.")
    return path


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (on the CPU) and its string metadata."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return _read_pickle(path), {}
    if _looks_like_safetensors(head, os.path.getsize(path)):
        return _read_safetensors(path)
    raise TLoRAError(f"{path} is neither a safetensors file nor a torch checkpoint (it may be corrupt). {READS}.")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    return 0 < header_size <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as error:
        raise TLoRAError(
            f"{path} could not be read as safetensors ({error}); the file may be corrupt or truncated."
        ) from error
    return tensors, metadata


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    """A torch checkpoint, unpickled with `weights_only=True`: nothing but tensors and plain containers can load."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, SafetensorError
    ) as error:
        raise TLoRAError(
            f"{path} is a pickle that does not hold plain tensors, or is corrupt ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Only a flat dict of tensors is loaded, never "
            "arbitrary objects; re-save it with `torch.save({name: tensor, ...})` or as safetensors."
        ) from error
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        kind = type(loaded).__name__ if not isinstance(loaded, dict) else "a dict holding non-tensor values"
        raise TLoRAError(
            f"{path} holds {kind}, not a flat dict of tensors as the official FLUX `lora.pt` does. "
            "Save the adapter's state_dict itself: `torch.save({name: tensor, ...}, path)`."
        )
    return loaded
