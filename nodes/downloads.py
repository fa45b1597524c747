"""LLMGA Download Model: fetch a released model from the Hugging Face Hub into the folder its loader reads.

Opt-in: nothing is fetched until this node runs (its list of releases is fixed, so /object_info and the
loaders' lists never touch the network). The work is llmga_core.downloads; this node picks the host's model
folders, shows the bytes on its ProgressBar and lets the host's interrupt stop the transfer (checked at every
chunk, nodes/progress.py), after which the next run resumes where it stopped.
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..llmga_core.downloads import is_complete, needs_vision_tower, plan_download, run_downloads
from ..llmga_core.releases import KIND_FOLDERS, RELEASES, VISION_TOWER, target_folder
from .paths import register_model_folders
from .progress import step_reporter

register_model_folders()  # idempotent; the LLM and diffrir kinds exist before their roots are asked for

log = logging.getLogger("llmga")


def kind_root(kind: str) -> str:
    """The folder a release of `kind` goes in: the kind's first root (models/<kind> unless
    extra_model_paths.yaml puts another first)."""
    roots = folder_paths.get_folder_paths(KIND_FOLDERS[kind])
    return roots[0] if roots else os.path.join(folder_paths.models_dir, KIND_FOLDERS[kind])


def loader_name(release, target) -> str:
    """The name the release's loader lists once it is downloaded."""
    if release.kind != "diffrir":
        return release.name
    weights = sorted(f for f in os.listdir(target) if f.lower().endswith((".pth", ".pt", ".safetensors")))
    return weights[0] if weights else ""


class LLMGADownloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGADownloadModel",
            display_name="LLMGA Download Model",
            category="LLMGA/loaders",
            description="Downloads a released LLMGA model (MLLM, vision tower, SD folder) from the Hugging Face Hub "
                        "into the models folder its loader reads, with progress in bytes. Only the files the "
                        "loaders need are fetched; an interrupted download resumes on the next run; a complete one "
                        "is not fetched or checked again. Refresh the loaders' lists (r) afterwards.",
            inputs=[
                io.Combo.Input("model", options=list(RELEASES), default="llmga-Qwen2-0.5B-full-finetune",
                               tooltip="The release; it goes to models/LLM, clip_vision, diffusers, diffrir or vae "
                                       "as its loader expects."),
                io.Boolean.Input("vision_tower", default=True, optional=True,
                                 tooltip="With an MLLM, also fetch its CLIP vision tower "
                                         "(openai/clip-vit-large-patch14-336) into models/clip_vision unless it is "
                                         "there already."),
                io.String.Input("repo_id", default="", optional=True,
                                tooltip="Another Hub repository to fetch this release from (a mirror you trust); "
                                        "empty: the release's own. DiffRIR is not on the Hub, so it needs one."),
                io.String.Input("revision", default="main", optional=True,
                                tooltip="Branch, tag or commit of the repository."),
            ],
            outputs=[
                io.String.Output(display_name="model_name",
                                 tooltip="The name the release's loader lists (pick it there after refreshing)."),
                io.String.Output(display_name="folder", tooltip="Where the files are."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, model, vision_tower=True, repo_id="", revision="main"):
        # local files only: a complete download is not run again; a deleted or unfinished one is
        release = RELEASES.get(model)
        if release is None:
            return model
        done = is_complete(release, kind_root(release.kind), repo_id=repo_id or None, revision=revision or "main")
        if release.kind == "mllm" and vision_tower:
            target = target_folder(release, kind_root(release.kind))
            done = done and not needs_vision_tower(target, folder_paths.get_folder_paths("clip_vision"))
        return (model, vision_tower, repo_id, revision, done)

    @classmethod
    def execute(cls, model, vision_tower=True, repo_id="", revision="main") -> io.NodeOutput:
        release = RELEASES.get(model)
        if release is None:
            raise ValueError(f"Unknown release {model!r}; choose one of the node's list.")
        revision = (revision or "").strip() or "main"
        plans = [plan_download(release, kind_root(release.kind), repo_id=repo_id or None, revision=revision)]
        if release.kind == "mllm" and vision_tower and needs_vision_tower(
                plans[0].target, folder_paths.get_folder_paths("clip_vision")):
            plans.append(plan_download(RELEASES[VISION_TOWER], kind_root("vision_tower")))
        total = sum(plan.total_bytes for plan in plans)
        complete_before = [plan.complete for plan in plans]
        report = step_reporter(total)
        run_downloads(plans, lambda done, all_bytes, file: report(done, all_bytes))
        lines = []
        for plan, was_complete in zip(plans, complete_before):
            state = "already complete" if was_complete else f"{plan.total_bytes / 1e6:.1f} MB from {plan.repo_url}"
            lines.append(f"{plan.release.name}: {state} in {plan.target}")
        text = "\n".join(lines)
        log.info("LLMGA download: %s", text.replace("\n", "; "))
        target = plans[0].target
        return io.NodeOutput(loader_name(release, target), str(target), ui=ui.PreviewText(text))


NODES = [LLMGADownloadModel]
