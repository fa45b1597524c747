"""The command line: python -m llmga_core.run_workflow."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .running import run_prompt, save_outputs
from .server import Server, default_comfyui_dir, has_usable_gpu, local_comfyui, option_value
from .workflow import (DEVICE_FLAGS, WorkflowError, apply_settings, describe_missing, download_models,
                       load_api_workflow, missing_models, provide_example_images, set_images)


def normalise_argv(argv: list[str]) -> list[str]:
    """`--comfyui-args --cpu` as README writes it: argparse would read "--cpu" as an option of its own, so
    the value is glued on (`--comfyui-args=--cpu`) before parsing."""
    out = []
    items = iter(argv)
    for arg in items:
        value = next(items, None) if arg == "--comfyui-args" else None
        out.append(arg if value is None else f"--comfyui-args={value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmga_core.run_workflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="an API-format workflow, e.g. workflows/api/llmga_t2i_sd15.json")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                        help="set a widget input; NODE is a node id, class type or title (repeatable)")
    parser.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                        help="upload an image and use it in LoadImage nodes (or the one named NODE)")
    parser.add_argument("--out", type=Path, default=Path("llmga_output"), help="folder for images and prompts")
    parser.add_argument("--server", help="use a running ComfyUI at this URL instead of starting one")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder to start (default: the one this pack is in)")
    parser.add_argument("--comfyui-args", dest="comfyui_args", action="append", default=[], metavar="ARGS",
                        help="extra arguments for ComfyUI's main.py, e.g. --comfyui-args \"--cpu --lowvram\" "
                             "(repeatable); --cpu is added by itself when torch sees no GPU")
    parser.add_argument("--download", action="store_true",
                        help="download missing released models with huggingface_hub before running")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    return parser


def comfyui_arguments(args) -> list[str]:
    extra = [part for chunk in args.comfyui_args for part in shlex.split(chunk)]
    if not any(a == flag or a.startswith(flag + "=") for a in extra for flag in DEVICE_FLAGS) and not has_usable_gpu():
        print("[llmga] torch sees no usable GPU here, so ComfyUI starts with --cpu (slow; "
              "pass --comfyui-args=--cpu to choose it yourself)", flush=True)
        extra.append("--cpu")
    return extra


def main(argv=None) -> int:
    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.argv = [str(a) for a in argv]  # repeated with --download in the missing-model list
    try:
        workflow = load_api_workflow(args.workflow)
        apply_settings(workflow, args.settings)
        if args.server:
            server = Server(args.server)
            if not server.alive():
                raise WorkflowError(f"No ComfyUI answers at {args.server}; start it, or leave out --server to let "
                                    f"this command start one.")
            return run_with(server, workflow, args, models_dir=None)
        comfyui = args.comfyui or default_comfyui_dir()
        if comfyui is None or not (Path(comfyui) / "main.py").is_file():
            raise WorkflowError("Cannot find ComfyUI: run this from the pack folder inside ComfyUI/custom_nodes, or "
                                "pass --comfyui DIR (the folder with main.py) or --server URL.")
        extra = comfyui_arguments(args)
        base = option_value(extra, "--base-directory")
        models_dir = (Path(base).absolute() if base else Path(comfyui).absolute()) / "models"
        args.out.mkdir(parents=True, exist_ok=True)
        with local_comfyui(Path(comfyui), extra, (args.out / "comfyui.log").absolute()) as server:
            return run_with(server, workflow, args, models_dir=models_dir)
    except WorkflowError as e:
        print(f"[llmga] error: {e}", file=sys.stderr)
        return 2


def run_with(server: Server, workflow: dict, args, models_dir: Path | None) -> int:
    missing = missing_models(server, workflow)
    if missing:
        if args.download and models_dir is not None:
            download_models(missing, models_dir)
            missing = missing_models(server, workflow)  # the loaders list their folders afresh
        elif args.download:
            raise WorkflowError("--download needs a ComfyUI this command starts (not --server): the files go in "
                                "its models folder.")
        if missing:
            raise WorkflowError(describe_missing(missing, None if models_dir is None else str(models_dir),
                                                 server.url, command=getattr(args, "argv", None)))
    set_images(server, workflow, args.image)
    provide_example_images(server, workflow)
    entry = run_prompt(server, workflow, args.timeout)
    for path in save_outputs(server, entry, workflow, args.out):
        print(f"[llmga] wrote {path}", flush=True)
    return 0


