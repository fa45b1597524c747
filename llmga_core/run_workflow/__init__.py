"""Run a shipped LLMGA workflow headless through ComfyUI's HTTP API.

    python -m llmga_core.run_workflow workflows/api/llmga_t2i_sd15.json \
        --set instruction="a lighthouse in a storm" --out results/

Starts a ComfyUI on 127.0.0.1 (the one this pack is installed in, or --comfyui DIR; on the CPU when there
is no usable GPU) unless --server URL is given, sets inputs from the command line, shows progress, and
writes the images and each MLLM prompt to --out. Model folders the workflow names but the server lacks are
listed with where they go; --download fetches the released ones with huggingface_hub (opt-in). Example
input images that ship in workflows/ are uploaded when the server's input folder lacks them. Standard library
only, plus what every ComfyUI environment has: aiohttp for live progress, tqdm for its bars.

Modules: workflow (the file, its settings, the models it names, example images), server (starting or reaching
ComfyUI), running (queueing, progress, outputs), cli (the command line).
"""
from __future__ import annotations

from .cli import build_parser, comfyui_arguments, main, normalise_argv, run_with
from .running import (ProgressPrinter, describe_failure, finished_entry, format_node_errors, queue_prompt,
                      run_prompt, save_outputs)
from .server import (Server, default_comfyui_dir, free_port, has_usable_gpu, last_error_line, local_comfyui,
                     option_value, start_failure_advice)
from .workflow import (DEVICE_FLAGS, EXAMPLE_IMAGES, MODEL_INPUTS, PACK_DIR, TEXT_OUTPUT_NODES, WorkflowError,
                       apply_settings, describe_missing, download_models, load_api_workflow, missing_models,
                       parse_value, provide_example_images, set_images)

__all__ = [
    "MODEL_INPUTS", "TEXT_OUTPUT_NODES", "PACK_DIR", "EXAMPLE_IMAGES", "DEVICE_FLAGS", "WorkflowError",
    "load_api_workflow", "parse_value", "apply_settings", "missing_models", "describe_missing",
    "download_models", "set_images", "provide_example_images", "Server", "free_port", "default_comfyui_dir",
    "has_usable_gpu", "option_value", "last_error_line", "start_failure_advice", "local_comfyui",
    "ProgressPrinter", "queue_prompt", "finished_entry", "run_prompt", "format_node_errors", "describe_failure",
    "save_outputs", "normalise_argv", "build_parser", "comfyui_arguments", "main", "run_with",
]
