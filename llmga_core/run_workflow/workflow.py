"""A workflow file, its settings, the models it names and the example images it loads."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from ..releases import (DIFFRIR_SOURCE, MLLM_FOLDER, VISION_TOWER, VISION_TOWER_FOLDER, VISION_TOWER_ID,
                       release_for_model, source_of)

if TYPE_CHECKING:  # annotations only: server.py imports this module
    from .server import Server


MODEL_INPUTS = {  # (class_type, input) -> models/ subfolder
    ("LLMGAMLLMLoader", "model_name"): "LLM",
    ("LLMGARemoteMLLM", "model_name"): "LLM",  # its config and tokenizer
    ("LLMGACheckpointLoader", "model_name"): "diffusers",
    ("DiffRIRLoader", "model_name"): "diffrir",
    ("VAELoader", "vae_name"): "vae",
}
TEXT_OUTPUT_NODES = ("LLMGAPromptGenerator",)
PACK_DIR = Path(__file__).resolve().parents[2]
EXAMPLE_IMAGES = PACK_DIR / "workflows"  # the example inputs the shipped workflows load
DEVICE_FLAGS = ("--cpu", "--directml")  # the user already chose where ComfyUI computes


class WorkflowError(RuntimeError):
    """A problem the user can fix; printed as one line without a traceback."""



def load_api_workflow(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"Workflow file {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"Workflow file {path} is not valid JSON ({e}).") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path} is a UI workflow (for drag-and-drop); run its API-format twin in "
                            f"workflows/api/ instead, or export one with 'Export (API)' in ComfyUI.")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise WorkflowError(f"{path} is not an API-format ComfyUI workflow.")
    return data


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_settings(workflow: dict, settings: list[str]) -> None:
    """--set [NODE.]INPUT=VALUE, NODE being a node id, a class_type or a node title (_meta.title)."""
    for setting in settings:
        if "=" not in setting:
            raise WorkflowError(f"--set {setting!r} must look like INPUT=VALUE or NODE.INPUT=VALUE.")
        key, raw = setting.split("=", 1)
        node_sel, _, name = key.rpartition(".")
        value = parse_value(raw)
        hits = 0
        for node_id, node in workflow.items():
            title = node.get("_meta", {}).get("title")
            if node_sel and node_sel not in (node_id, node["class_type"], title):
                continue
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
                hits += 1
        if hits == 0:
            raise WorkflowError(f"--set {setting!r}: no node has a widget input {name!r}"
                                + (f" matching {node_sel!r}" if node_sel else "") + ".")



def missing_models(server: Server, workflow: dict) -> list[tuple[str, str, str]]:
    """(node class, model name, models/ subfolder) for every model input the server cannot offer."""
    missing = []
    options = {}
    for node in workflow.values():
        for (class_type, input_name), folder in MODEL_INPUTS.items():
            if node["class_type"] != class_type or input_name not in node["inputs"]:
                continue
            if class_type not in options:
                options[class_type] = server.combo_options(class_type, input_name)
            if options[class_type] is None:
                raise WorkflowError(f"The server has no node {class_type}; is the LLMGA pack installed in its "
                                    f"custom_nodes folder?")
            name = node["inputs"][input_name]
            if name not in options[class_type]:
                missing.append((class_type, name, folder))
    return missing


def describe_missing(missing, models_dir: str | None, server_url: str | None = None,
                     command: list[str] | None = None) -> str:
    """The missing models with where they go: absolute folders when this command started ComfyUI itself
    (models_dir), folders relative to the server's own models folder with --server (models_dir None); then the
    command that downloads the released ones (`command`: this run's arguments, to repeat with --download)."""
    if models_dir is not None:
        lines = [f"These models are not installed in {models_dir}:"]
        where = lambda *parts: os.path.join(models_dir, *parts)  # noqa: E731
    else:
        lines = [f"These models are not installed on the server at {server_url}; put them in that server's models "
                 f"folder (<its base directory>/models, or a root its extra_model_paths.yaml adds), at the paths "
                 f"below, which are relative to it:"]
        where = lambda *parts: "/".join(parts)  # noqa: E731
    download = ", or run again with --download" if models_dir is not None else ""
    for class_type, name, folder in missing:
        source = source_of(folder, name)
        if source.startswith("huggingface.co/"):
            source += download
        lines.append(f"  - {name} for {class_type}: {where(folder, name)}  [from {source}]")
    if any(folder == MLLM_FOLDER for _, _, folder in missing):
        lines.append(f"  - the MLLM also needs its CLIP vision tower, unless it is there already: "
                     f"{where(VISION_TOWER_FOLDER, VISION_TOWER)}  [from huggingface.co/{VISION_TOWER_ID}{download}]")
    releases = [r for r in (release_for_model(folder, name) for _, name, folder in missing) if r and r.repo_id]
    if releases and models_dir is not None and "--download" not in (command or []):
        again = shlex.join(["python", "-m", "llmga_core.run_workflow", *command, "--download"]) if command else \
            "this command again with --download"
        lines.append(f"Download them with: {again}")
    elif releases:
        names = " ".join(dict.fromkeys(r.name for r in releases))
        lines.append(f"On that machine, python -m llmga_core.downloads {names} --models-dir <its models folder> "
                     f"downloads them.")
    return "\n".join(lines)


def download_models(missing, models_dir: Path) -> None:
    """Fetches the released models among `missing` into models_dir (an MLLM with its vision tower), with
    progress in bytes; refuses, before fetching anything, models that are not on the Hub."""
    from ..downloads import DownloadError, fetch_with_console, plans_for

    releases = {}
    for class_type, name, folder in missing:
        release = release_for_model(folder, name)
        if release is None:
            raise WorkflowError(f"{name} ({class_type}) is not a released model this command knows how to download; "
                                f"put it into {models_dir / folder} by hand.")
        if release.repo_id is None:
            raise WorkflowError(f"{name} ({class_type}) is not on the Hugging Face Hub: download it by hand from "
                                f"{DIFFRIR_SOURCE} into {models_dir / folder}.")
        releases[release.name] = release
    try:
        plans = {}
        for name in releases:
            for plan in plans_for(name, models_dir):
                plans.setdefault(plan.target, plan)  # two MLLMs share one vision tower
        fetch_with_console(list(plans.values()))
    except DownloadError as error:
        raise WorkflowError(str(error)) from None



def set_images(server: Server, workflow: dict, specs: list[str]) -> None:
    """--image [NODE=]PATH uploads PATH and puts it into the LoadImage nodes (or the one named NODE)."""
    for spec in specs:
        node_sel, _, path = spec.rpartition("=")
        targets = [n for nid, n in workflow.items() if n["class_type"] == "LoadImage"
                   and (not node_sel or node_sel in (nid, n.get("_meta", {}).get("title")))]
        if not targets:
            raise WorkflowError(f"--image {spec!r}: the workflow has no matching LoadImage node.")
        name = server.upload_image(Path(path))
        for node in targets:
            node["inputs"]["image"] = name


def provide_example_images(server: Server, workflow: dict) -> None:
    """Uploads the example image a LoadImage node names when the server's input folder lacks it and it ships
    in workflows/; otherwise names the node and the flag that gives it an image."""
    loaders = {nid: n for nid, n in workflow.items()
               if n["class_type"] == "LoadImage" and isinstance(n["inputs"].get("image"), str)}
    if not loaders:
        return
    available = set(server.combo_options("LoadImage", "image") or [])
    for node_id, node in loaders.items():
        name = node["inputs"]["image"]
        if name in available:
            continue
        example = EXAMPLE_IMAGES / name
        if "/" not in name and example.is_file():
            print(f"[llmga] the server's input folder has no {name}; uploading the example image "
                  f"workflows/{name} (pass --image PATH to use your own)", flush=True)
            node["inputs"]["image"] = server.upload_image(example)
            available.add(node["inputs"]["image"])
            continue
        title = node.get("_meta", {}).get("title") or "LoadImage"
        raise WorkflowError(f"The node {title!r} (id {node_id}) loads {name!r}, which is not in the server's input "
                            f"folder; pass --image {node_id}=PATH with a picture of yours.")


