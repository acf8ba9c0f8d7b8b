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
from safetensors import SafetensorError, safe_open

from ..errors import TLoRAError
from ..progress import ProgressBars

READS = (
    "load_tlora reads LyCORIS/SimpleTuner and official ControlGenAI .safetensors files and the official FLUX lora.pt"
)


def read_tensors(path: str, progress: ProgressBars) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (on the CPU) and its string metadata, with a bar over the tensors read."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        with progress(total=1, desc=f"Reading {os.path.basename(path)}", unit="file") as bar:
            tensors = _read_pickle(path)
            bar.update()
        return tensors, {}
    if _looks_like_safetensors(head, os.path.getsize(path)):
        return _read_safetensors(path, progress)
    raise TLoRAError(f"{path} is neither a safetensors file nor a torch checkpoint (it may be corrupt). {READS}.")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    return 0 < header_size <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: str, progress: ProgressBars) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            bar = progress(keys, total=len(keys), desc=f"Reading {os.path.basename(path)}", unit="tensor")
            tensors = {key: handle.get_tensor(key) for key in bar}
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
