"""Fetching LLMGA's released models from the Hugging Face Hub into the folders the loaders read (opt-in).

    python -m llmga_core.downloads llmga-Qwen2-0.5B-full-finetune                  # in the pack folder
    python -m llmga_core.downloads llmga-Qwen2-0.5B-full-finetune --models-dir /data/ComfyUI/models

Without --models-dir the files go to the models folder of the ComfyUI this pack is installed in
(<ComfyUI>/custom_nodes/<pack>); see `resolve_models_dir` for how a relative --models-dir is read.

Nothing here runs unless asked: listing models never touches the network. What it does:
- a catalogue of the releases (LLMGA's README model links): the name the loaders list,
  the Hub repository, and the models/ subfolder it goes in;
- only the files the loaders read are fetched: configs, tokenizer files and one set of weights (safetensors
  before .bin duplicates, the fp16 variant of an SD component before its full-precision copy, as the
  loaders prefer them); training leftovers (trainer_state.json, training_args.bin), other frameworks'
  weights and the SD safety checker (which ComfyUI never runs) are left on the Hub;
- progress in bytes through a callback (its exceptions, e.g. ComfyUI's interrupt, stop the download);
- resumable: a file's bytes go to <target>/.cache/llmga/partial/<path>.<etag>.incomplete and move into place
  only when complete; after an interrupt or a dropped connection the next run continues with a Range request
  (huggingface_hub 2.x deletes its own partial file when a download fails, so the partial file is kept here, and
  the bytes come through huggingface_hub's http_get with its endpoint, token, proxy and HF_HUB_OFFLINE rules);
- idempotent: <target>/.cache/llmga/<release>.json records what was fetched, so a complete download returns
  without any request;
- errors users meet are one DownloadError sentence: no network (naming the files and the folder to put them in
  by hand), a repository that does not exist, too little disk space.

Modules: plan (the files a loader reads, the plan of a download), fetch (resumable fetching), cli (the
command line and console progress); the catalogue is llmga_core.releases.

Host-free and standard library at import (huggingface_hub is imported when a download starts), so the run
command (llmga_core.run_workflow) uses it too.
"""
from __future__ import annotations

from ..releases import KIND_FOLDERS, RELEASES, Release, release_for_model, resume_hint, target_folder
from .cli import ConsoleProgress, fetch_with_console, main, plans_for, resolve_models_dir
from .fetch import download, run_downloads
from .plan import (DownloadError, DownloadPlan, RemoteFile, find_release, is_complete, needs_vision_tower,
                   plan_download, select_files)

__all__ = [
    "Release",
    "RELEASES",
    "KIND_FOLDERS",
    "DownloadError",
    "DownloadPlan",
    "RemoteFile",
    "find_release",
    "release_for_model",
    "target_folder",
    "is_complete",
    "plan_download",
    "run_downloads",
    "download",
    "needs_vision_tower",
    "select_files",
    "plans_for",
    "fetch_with_console",
    "resume_hint",
    "ConsoleProgress",
    "resolve_models_dir",
    "main",
]
