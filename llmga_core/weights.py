"""Reading model files: JSON configs, sharded indexes, safetensors and pickled PyTorch weights.

The one place the library opens a config or weight file, so every model kind follows the same rules:
- safetensors are memory-mapped (safe_open), so only the tensors that are used are read;
- pickles (.bin, .pth, .pt) load only through torch.load(weights_only=True), memory-mapped when they are
  torch.save zip archives; a pickle that needs anything but tensors and containers is refused unrun;
- a shard index (`*.index.json`) may only name files in its own folder;
- every problem is one WeightFileError sentence that names the file and says what to do.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .releases import resume_hint

__all__ = [
    "WeightFileError", "MissingShardError", "read_json", "shard_files", "check_weight_file", "tensor_shape",
    "iter_weights", "load_pickle", "load_weights",
]


class WeightFileError(ValueError):
    """A config, index or weight file that cannot be used; the message names the file."""


class MissingShardError(WeightFileError, FileNotFoundError):
    """A shard that an index lists is not on disk (an incomplete download)."""


def read_json(path) -> dict:
    """The JSON object in `path` (a config.json, an index, a tokenizer file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightFileError(f"{path} is not valid JSON ({error}); download it again.") from None
    if not isinstance(data, dict):
        raise WeightFileError(f"{path} does not hold a JSON object; download it again.")
    return data


def shard_files(index_path) -> tuple[Path, ...]:
    """The shards an `*.index.json` lists, in first-use order; each must sit in the index's folder."""
    index_path = Path(index_path)
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(f"{index_path} has no weight_map; download it again.")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise WeightFileError(f"{index_path} names a shard outside its folder ({name!r}); download it again.")
        shards.append(index_path.parent / name)
    for shard in shards:
        if not shard.is_file():
            raise MissingShardError(f"Shard {shard.name} listed in {index_path} is missing; {_download_again(shard)}.")
    return tuple(shards)


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _download_again(path: Path) -> str:
    """'download it again', with the command that resumes the download when the file belongs to a release."""
    hint = resume_hint(path)
    return f"download it again: {hint}" if hint else "download it again"


def _corrupt(path: Path) -> WeightFileError:
    kind = "safetensors" if _is_safetensors(path) else "PyTorch"
    return WeightFileError(f"{path} is corrupt or incomplete (not a readable {kind} file); {_download_again(path)}.")


def check_weight_file(path) -> list[str] | None:
    """Reads only a weight file's header: its tensor names (safetensors), None for a pickle.

    A torch.save zip archive keeps its directory at the end, so a cut-off download fails here; a bare
    pickle (PyTorch before 1.6) can only be checked by loading it.
    """
    path = Path(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise _corrupt(path) from error
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"PK\x03\x04":
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        elif not magic.startswith(b"\x80"):  # pickle protocol 2+ opcode
            raise zipfile.BadZipFile("neither a zip archive nor a pickle")
    except (OSError, zipfile.BadZipFile) as error:
        raise _corrupt(path) from error
    return None


def tensor_shape(path, name: str) -> list[int] | None:
    """The shape of tensor `name` from a safetensors header (no data read); None when absent or a pickle."""
    path = Path(path)
    if not _is_safetensors(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(name).get_shape()) if name in handle.keys() else None
    except Exception as error:
        raise _corrupt(path) from error


def load_pickle(path):
    """torch.load(path, weights_only=True) on the CPU; code in the pickle is refused, never run."""
    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        # weights_only wraps every failure; an import it refused (GLOBAL name) means code, anything else a
        # damaged file. torch's own text is a page of advice to load it unsafely, so it is not repeated.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise WeightFileError(f"{path} holds pickled objects other than tensors ({found.group(1)}), so it was "
                                  f"refused and nothing in it was run; use the model's .safetensors files or "
                                  f"download it again from its release.") from None
        raise _corrupt(path) from error
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as error:
        raise _corrupt(path) from error


def _tensors_of(loaded, path: Path) -> dict:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a training checkpoint that wraps its weights
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightFileError(f"{path} does not hold a state dict of tensors; download it again.")
    return loaded


def iter_weights(path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, one tensor at a time for safetensors (memory-mapped)."""
    path = Path(path)
    if not _is_safetensors(path):
        yield from _tensors_of(load_pickle(path), path).items()
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
    except Exception as error:  # safetensors' own error type, or an OSError of a vanished file
        if type(error).__name__ != "SafetensorError" and not isinstance(error, (OSError, RuntimeError, ValueError)):
            raise
        raise _corrupt(path) from error


def load_weights(files: Path | str | Iterable[Path | str]) -> dict[str, torch.Tensor]:
    """All tensors of a weight file or of its shards, on the CPU."""
    files = [files] if isinstance(files, (str, Path)) else files
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(iter_weights(file))
    return state
