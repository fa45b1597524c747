"""The models LLMGA released, and where each goes: one catalogue for the downloads, the run command, the loaders
and the nodes.

Sources: LLMGA's README model links (the MLLMs in English and Chinese, the SD1.5/SDXL UNets on the Hub as
binxia/<folder>), the CLIP vision tower the MLLMs name in config.json (mm_vision_tower), the VAE the original's
editing CLI swaps in (llmga/serve/cli-sd15-editing.py: stabilityai/sd-vae-ft-mse, as the single file ComfyUI
loads), and DiffRIR's README (weights on Google Drive only).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# models/ subfolder per kind (ComfyUI's folder_paths kinds the loaders read)
KIND_FOLDERS = {"mllm": "LLM", "vision_tower": "clip_vision", "sd": "diffusers", "diffrir": "diffrir", "vae": "vae"}
MLLM_FOLDER, VISION_TOWER_FOLDER, SD_FOLDER, DIFFRIR_FOLDER, VAE_FOLDER = (
    KIND_FOLDERS[k] for k in ("mllm", "vision_tower", "sd", "diffrir", "vae"))

VISION_TOWER_ID = "openai/clip-vit-large-patch14-336"  # what every released MLLM's config names
VISION_TOWER = VISION_TOWER_ID.split("/")[-1]  # its folder (and single-file) name
DIFFRIR_EXTENSIONS = (".pth", ".pt", ".safetensors")  # the released .pth, or a safetensors conversion
DIFFRIR_SOURCE = "the DiffRIR release (github.com/Zj-BinXia/DiffRIR, 'pretrained models')"
EDIT_VAE_FILE = "vae-ft-mse-840000-ema-pruned.safetensors"
EDIT_VAE_REPO = "stabilityai/sd-vae-ft-mse-original"
DOWNLOAD_NODE_NAME = "LLMGA Download Model"
LLMGA_HUB_USER = "binxia"  # LLMGA's MLLM and SD folders are huggingface.co/binxia/<folder>


@dataclass(frozen=True)
class Release:
    name: str  # the folder (or, for vae, the file) name the loader lists
    kind: str  # a key of KIND_FOLDERS
    repo_id: Optional[str]  # None: not on the Hub
    note: str = ""

    @property
    def subfolder(self) -> str:
        return KIND_FOLDERS[self.kind]

    @property
    def whole_folder(self) -> bool:
        """The release is a folder of its own under the kind's folder (not loose files in it)."""
        return self.kind in ("mllm", "vision_tower", "sd")


def _llmga(name: str, kind: str) -> Release:
    return Release(name, kind, f"{LLMGA_HUB_USER}/{name}")


RELEASES: dict[str, Release] = {r.name: r for r in [
    *(_llmga(name, "mllm") for name in (
        "llmga-vicuna-7b-v1.5-full-finetune", "llmga-llama-2-7b-chat-full-finetune",
        "llmga-mistral_instruct-full-finetune", "llmga-llama3-8b-it-full-finetune", "llmga-Qwen2-0.5B-full-finetune",
        "llmga-Qwen2-1.5B-full-finetune", "llmga-Qwen2-7B-full-finetune", "llmga-Phi-3-mini-128k-full-finetune",
        "llmga-gemma-2b-it-full-finetune", "llmga-cn-vicuna-7b-v1.5-full-finetune",
        "llmga-cn-llama3-8b-it-full-finetune", "llmga-cn-gemma-2b-it-full-finetune",
        "llmga-cn-Qwen2-0.5B-full-finetune")),
    Release(VISION_TOWER, "vision_tower", VISION_TOWER_ID, "the MLLMs' CLIP vision tower"),
    *(_llmga(name, "sd") for name in (
        "llmga-sd15-t2i-v2", "llmga-sdxl-t2i", "llmga-sd15-inpainting-v2", "llmga-sdxl-inpainting-v2")),
    # released on Google Drive only, file names unknown: a Hub mirror can be named with repo_id
    Release("DiffRIR", "diffrir", None, "x1, x2 and x4 weights, on Google Drive (github.com/Zj-BinXia/DiffRIR)"),
    Release(EDIT_VAE_FILE, "vae", EDIT_VAE_REPO, "the VAE of LLMGA's editing"),
]}


def find_release(name: str) -> Optional[Release]:
    """A release by its name (the folder the loaders list) or by its repository id; None when unknown."""
    if name in RELEASES:
        return RELEASES[name]
    return next((r for r in RELEASES.values() if r.repo_id == name), None)


def release_for_model(subfolder: str, name: str) -> Optional[Release]:
    """The release a loader's model name stands for (None when the name is not a released one)."""
    for release in RELEASES.values():
        if release.subfolder != subfolder:
            continue
        if release.name == name or (release.kind == "diffrir" and name.lower().startswith("diffrir")):
            return release
    return None


def source_of(subfolder: str, name: str) -> str:
    """Where a model a workflow names can be fetched from, in words: its release's Hub repository, LLMGA's Hub
    account for another MLLM or SD folder name, DiffRIR's release page."""
    release = release_for_model(subfolder, name)
    if release is not None and release.repo_id:
        return f"huggingface.co/{release.repo_id}"
    if subfolder in (MLLM_FOLDER, SD_FOLDER):
        return f"huggingface.co/{LLMGA_HUB_USER}/{Path(name).name}"
    if subfolder == VAE_FOLDER:
        return "wherever that VAE was published"
    return DIFFRIR_SOURCE


def target_folder(release: Release, root) -> Path:
    """Where `release` goes: root/<name> for a folder release, root itself for loose files (DiffRIR, a VAE)."""
    root = Path(root)
    return root / release.name if release.whole_folder else root


# ------------------------------------------------ download records (llmga_core/downloads writes them) and hints
def _record_path(target: Path, name: str) -> Path:
    return Path(target) / ".cache" / "llmga" / f"{name}.json"


def _read_record(target: Path, name: str) -> Optional[dict]:
    try:
        data = json.loads(_record_path(target, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def resume_hint(path) -> Optional[str]:
    """For a damaged or missing file of a released model: the command (and node) that resumes its download, as
    the end of an error sentence; None when the file belongs to no release this module can fetch."""
    path = Path(os.path.abspath(path))
    for folder in path.parents:
        for record_file in sorted((folder / ".cache" / "llmga").glob("*.json")):
            record = _read_record(folder, record_file.stem)
            release = RELEASES.get(record.get("release", "")) if record else None
            if release is None or record.get("repo_id") is None:
                continue
            relative = path.relative_to(folder).as_posix()
            if release.whole_folder or relative in record["files"]:
                root = folder.parent if release.whole_folder else folder
                return _hint(release, root, record["repo_id"])
        if folder.name in RELEASES and RELEASES[folder.name].whole_folder:
            release = RELEASES[folder.name]
            if folder.parent.name == release.subfolder:
                return _hint(release, folder.parent, release.repo_id)
    release = RELEASES.get(path.name)
    if release is not None and release.kind == "vae" and path.parent.name == release.subfolder:
        return _hint(release, path.parent, release.repo_id)
    return None


def _hint(release: Release, root: Path, repo_id: str) -> str:
    node = f"or queue the {DOWNLOAD_NODE_NAME} node with {release.name}" + \
           (f" and repo_id {repo_id}" if repo_id != release.repo_id else "")
    if root.name != release.subfolder:
        return f"{node} to resume the download"
    command = ["python", "-m", "llmga_core.downloads", release.name, "--models-dir", str(root.parent)]
    if repo_id != release.repo_id:
        command += ["--repo-id", repo_id]
    return f"`{shlex.join(command)}` (in the pack folder) resumes the download, {node}"



# ------------------------------------------------------------------------ where the vision tower is looked for
class VisionTowerNotFoundError(FileNotFoundError):
    """No vision tower beside or inside the model folder; carries what a caller needs to say where it goes."""

    def __init__(self, message: str, *, tower_id: str, folder_name: str):
        super().__init__(message)
        self.tower_id = tower_id
        self.folder_name = folder_name


def is_vision_tower_folder(path) -> bool:
    """True for a CLIP folder (whole CLIP or vision-only config.json without LLaVA fields), so model lists can
    leave out a vision tower that sits beside the MLLM folders."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: listed, so that loading it says what is wrong
    if not isinstance(config, dict) or "mm_vision_tower" in config or "mm_projector_type" in config:
        return False
    return config.get("model_type") in ("clip", "clip_vision_model") or "vision_config" in config


def _single_file_tower(root: Path, tail: list[str]) -> Optional[Path]:
    """`<name>.safetensors` (any letter case, or `<owner>_<name>`) in `root`: the one-file form of the tower
    that ComfyUI users keep in models/clip_vision."""
    names = {tail[-1].lower() + ".safetensors"}
    if len(tail) > 1:
        names.add(f"{tail[-2]}_{tail[-1]}".lower() + ".safetensors")
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name.lower() in names and entry.is_file():
            return entry
    return None


def _tower_name_parts(tower_id: str) -> list[str]:
    return str(tower_id).replace("\\", "/").rstrip("/").split("/")


def find_vision_tower_in(roots: Iterable[str | Path], tower_id: str = VISION_TOWER_ID) -> Optional[Path]:
    """The tower `tower_id` in one of `roots` (a host's models/clip_vision folders): a folder named like it
    (or the openai/ layout) with a config.json, else its single .safetensors file; None when absent."""
    tail = _tower_name_parts(tower_id)
    roots = [Path(root) for root in roots]
    for root in roots:
        for candidate in (root / tail[-1], root.joinpath(*tail)):
            if (candidate / "config.json").is_file():
                return candidate
    for root in roots:
        single = _single_file_tower(root, tail)
        if single is not None:
            return single
    return None


def find_vision_tower(folder: Path, config: dict, explicit: Optional[str | Path],
                      search: Iterable[str | Path] = ()) -> Path:
    """The CLIP tower: `explicit` (a folder, or one .safetensors file), else a folder named like the config's
    mm_vision_tower (e.g. clip-vit-large-patch14-336, or the openai/ layout) beside or inside the model folder,
    else such a folder or a single `clip-vit-large-patch14-336.safetensors` in one of the `search` folders
    (a host's models/clip_vision)."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"The vision tower folder {path} has no config.json; give the folder of "
                                    f"{VISION_TOWER_ID} (config.json, preprocessor_config.json and weights) or its "
                                    "weights as one .safetensors file.")
        return path
    tower_id = str(config.get("mm_vision_tower") or VISION_TOWER_ID)
    if Path(tower_id).is_absolute() and (Path(tower_id) / "config.json").is_file():
        return Path(tower_id)  # the original accepts an existing path here too
    tail = _tower_name_parts(tower_id)
    for base in (Path(folder).parent, Path(folder)):
        for candidate in (base / tail[-1], base.joinpath(*tail)):
            if (candidate / "config.json").is_file():
                return candidate
    found = find_vision_tower_in(search, tower_id)
    if found is not None:
        return found
    raise VisionTowerNotFoundError(
        f"The CLIP vision tower {tower_id} was not found: download {tower_id} (config.json, "
        f"preprocessor_config.json and weights) into a folder named {tail[-1]} beside the model folder "
        f"({Path(folder).parent / tail[-1]}) or under models/clip_vision/ (ComfyUI, where its weights alone as "
        f"{tail[-1]}.safetensors also work), or pass its folder or .safetensors file as vision_tower.",
        tower_id=tower_id, folder_name=tail[-1])
