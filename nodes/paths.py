"""Model folders of the pack inside the host's folder_paths, and safe name resolution.

Kinds registered here (so extra_model_paths.yaml can add more roots):
  LLM       models/LLM/<name>/        LLMGA MLLM folders (config.json inside)
  diffrir   models/diffrir/<file>     DiffRIR weights (.pth, .pt, .safetensors)
The host already knows `diffusers` (models/diffusers/<name>/) and `clip_vision`.
"""
from __future__ import annotations

import os

import folder_paths

from ..llmga_core.releases import DIFFRIR_EXTENSIONS, DIFFRIR_FOLDER, MLLM_FOLDER, SD_FOLDER  # noqa: F401 (SD_FOLDER: nodes)

# The weight files each file kind lists and loads. The host has no call that declares a kind's extensions
# (add_model_folder_path gives a new kind none, which lists every file), so the pack filters its own lists.
MODEL_EXTENSIONS = {DIFFRIR_FOLDER: DIFFRIR_EXTENSIONS}

_registered = False


def register_model_folders() -> None:
    """Adds the pack's model kinds once, after any roots extra_model_paths.yaml added (the host applies it
    before it imports custom nodes, and add_model_folder_path keeps them)."""
    global _registered
    if _registered:
        return
    for kind in (MLLM_FOLDER, DIFFRIR_FOLDER):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))
    _registered = True


def list_model_files(kind: str) -> list[str]:
    """The host's list of files of `kind` (every root, subfolders, cached), only the kind's weight files."""
    return folder_paths.filter_files_extensions(folder_paths.get_filename_list(kind), MODEL_EXTENSIONS[kind])


def list_model_dirs(kind: str, marker: str, skip=None) -> list[str]:
    """Folders (relative to any root of `kind`) that contain the file `marker`, sorted.

    Like the host's DiffusersLoader: walks every root, follows links, and names a folder
    by its path relative to the root ("/" separated so workflows are portable). Folders inside a
    listed folder are not listed (an MLLM folder may hold its CLIP vision tower), nor folders for which
    skip(path) is true (a vision tower beside the MLLM folders).
    """
    found = set()
    for root in folder_paths.get_folder_paths(kind):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if marker in filenames and os.path.abspath(dirpath) != os.path.abspath(root):
                if skip is None or not skip(dirpath):
                    found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []  # a model's own subfolders (a vision tower inside it, unet/) are not models
    return sorted(found)


def resolve_model_path(kind: str, name: str, *, want_dir: bool) -> str:
    """Absolute path of model `name` of `kind`; refuses names that leave the model folders."""
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"Model name {name!r} must be a path inside the {kind} model folders "
                         f"(no absolute paths, no '..').")
    roots = folder_paths.get_folder_paths(kind)
    if want_dir:  # the host looks up files only
        for root in roots:
            candidate = os.path.join(root, name)
            # a symlinked model folder is fine; the name itself may not climb out of the root
            if os.path.normpath(candidate).startswith(os.path.normpath(root) + os.sep) and os.path.isdir(candidate):
                return candidate
    else:  # the host's own lookup, as its loaders use it; get_full_path_or_raise's text would not say where
        found = folder_paths.get_full_path(kind, name)
        extensions = MODEL_EXTENSIONS.get(kind)
        if found is not None and extensions and os.path.splitext(name)[1].lower() not in extensions:
            raise ValueError(f"{name!r} is not a {kind} weight file ({', '.join(extensions)}); choose one of "
                             f"the files the node lists.")
        if found is not None:
            return found
    where = ", ".join(roots) or f"models/{kind}"
    what = "folder" if want_dir else "file"
    raise FileNotFoundError(f"No {kind} model {what} named {name!r}; put it under {where} "
                            f"and refresh the node list.")
