"""Run a shipped LLMGA workflow headless through ComfyUI's HTTP API.

    python -m llmga_core.run_workflow workflows/api/llmga_t2i_sd15.json \
        --set instruction="a lighthouse in a storm" --out results/

Starts a ComfyUI on 127.0.0.1 (the one this pack is installed in, or --comfyui DIR; on the CPU when there
is no usable GPU) unless --server URL is given, sets inputs from the command line, shows progress, and
writes the images and each MLLM prompt to --out. Model folders the workflow names but the server lacks are
listed with where they go; --download fetches the released ones with huggingface_hub (opt-in). Example
input images that ship in workflows/ are uploaded when the server's input folder lacks them. Standard
library only, plus what every ComfyUI environment has: aiohttp for live progress, tqdm for its bars.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mimetypes
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .console import live_bar_class
from .releases import (DIFFRIR_SOURCE, MLLM_FOLDER, VISION_TOWER, VISION_TOWER_FOLDER, VISION_TOWER_ID,
                       release_for_model, source_of)

MODEL_INPUTS = {  # (class_type, input) -> models/ subfolder
    ("LLMGAMLLMLoader", "model_name"): "LLM",
    ("LLMGARemoteMLLM", "model_name"): "LLM",  # its config and tokenizer
    ("LLMGACheckpointLoader", "model_name"): "diffusers",
    ("DiffRIRLoader", "model_name"): "diffrir",
    ("VAELoader", "vae_name"): "vae",
}
TEXT_OUTPUT_NODES = ("LLMGAPromptGenerator",)
PACK_DIR = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = PACK_DIR / "workflows"  # the example inputs the shipped workflows load
DEVICE_FLAGS = ("--cpu", "--directml")  # the user already chose where ComfyUI computes


class WorkflowError(RuntimeError):
    """A problem the user can fix; printed as one line without a traceback."""


# ---------------------------------------------------------------------------------------------- the workflow

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


# ---------------------------------------------------------------------------------------------- the server

class Server:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def request(self, path, payload=None, *, raw=False, timeout=60):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return body if raw else json.loads(body or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return {"__status__": e.code, **json.loads(body)}
            except json.JSONDecodeError:
                raise WorkflowError(f"{self.url}{path} answered {e.code}: {body[:300]!r}") from None

    def alive(self) -> bool:
        try:
            self.request("/system_stats", timeout=5)
            return True
        except (urllib.error.URLError, OSError, WorkflowError):
            return False

    def upload_image(self, path: Path, name: str | None = None) -> str:
        path = Path(path)
        try:
            content = path.read_bytes()
        except OSError as e:
            raise WorkflowError(f"Cannot read the image {path} ({e.strerror}); check the path given to "
                                f"--image.") from None
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name or path.name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            info = json.loads(r.read())
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def combo_options(self, class_type: str, input_name: str) -> list | None:
        """The values the server accepts for a combo input (None when it has no such node)."""
        info = self.request(f"/object_info/{class_type}").get(class_type)
        if info is None:
            return None
        spec = info["input"].get("required", {}).get(input_name) or info["input"].get("optional", {}).get(input_name)
        if not spec:
            return []
        # ComfyUI < 0.3.4x lists combo options in place of the type; newer ones under "options"
        return spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options", [])


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_comfyui_dir() -> Path | None:
    """The ComfyUI this pack is installed in, <ComfyUI>/custom_nodes/<pack>, also when that pack folder is a
    symlink: Python sees only the link's target, so the shell's $PWD and this file's unresolved path, which
    keep the link's location, are tried first."""
    candidates = []
    pwd = os.environ.get("PWD")
    if pwd and os.path.isabs(pwd):
        candidates.append(Path(pwd))
    candidates += [Path(os.path.abspath(__file__)), PACK_DIR]
    for start in candidates:
        for folder in (start, *start.parents):
            try:
                is_pack = folder.is_dir() and os.path.samefile(folder, PACK_DIR)
            except OSError:
                is_pack = False
            if is_pack:
                comfyui = folder.parent.parent
                if folder.parent.name == "custom_nodes" and (comfyui / "main.py").is_file():
                    return comfyui
                break
    return None


def has_usable_gpu() -> bool:
    """What ComfyUI's device choice needs: a CUDA/ROCm, XPU or MPS device torch can use."""
    try:
        import torch
    except ImportError:
        return True  # ComfyUI will not start either; its own error says why
    if torch.cuda.is_available():
        return True
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def option_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in a ComfyUI argument list (`--flag VALUE` or `--flag=VALUE`)."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def last_error_line(log_text: str) -> str:
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"[\w.]*(Error|Exception)\b", line) or " error: " in line:
            return line
    return lines[-1] if lines else "(the log is empty)"


def start_failure_advice(line: str) -> str:
    if re.search(r"NVIDIA|CUDA|cuda|GPU", line):
        return "ComfyUI found no usable GPU, so run again with --comfyui-args=--cpu"
    if "unrecognized arguments" in line or " error: argument" in line:
        return "correct the --comfyui-args (python main.py --help in the ComfyUI folder lists them)"
    if "No module named" in line:
        return ("run this command with ComfyUI's own Python, or install ComfyUI's requirements.txt into this one "
                f"({sys.executable})")
    return "fix what it says, or start ComfyUI yourself and pass --server URL"


@contextlib.contextmanager
def local_comfyui(comfyui_dir: Path, extra_args: list[str], log_path: Path, start_timeout: float = 300):
    port = free_port()
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           *extra_args]
    print(f"[llmga] starting ComfyUI in {comfyui_dir} on 127.0.0.1:{port} (log: {log_path})", flush=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + start_timeout
        while not server.alive():
            if proc.poll() is not None:
                log.flush()
                line = last_error_line(log_path.read_text(errors="replace"))
                raise WorkflowError(f"ComfyUI exited with code {proc.returncode} while starting: {line} -- "
                                    f"{start_failure_advice(line)} (full log: {log_path}).")
            if time.time() > deadline:
                log.flush()
                line = last_error_line(log_path.read_text(errors="replace"))
                raise WorkflowError(f"ComfyUI did not answer within {start_timeout:.0f} s; its log ends with: {line} "
                                    f"(full log: {log_path}).")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---------------------------------------------------------------------------------------------- models

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
    from .downloads import DownloadError, fetch_with_console, plans_for

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


# ---------------------------------------------------------------------------------------------- input images

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


# ---------------------------------------------------------------------------------------------- progress

class ProgressPrinter:
    """What the websocket reports, for a person: one live tqdm bar per node with progress in a terminal;
    elsewhere (a log, a pipe) plain lines, at most one per quarter of a node's steps."""

    def __init__(self, titles: dict, stream=None, live: bool | None = None):
        self.titles = titles
        self.stream = stream or sys.stdout
        self.tqdm = live_bar_class(self.stream, live)
        self.node = None
        self.bar = None
        self.last = None  # (value, max) of the current node
        self.shown = -1  # last quarter printed in plain mode

    def line(self, text: str) -> None:
        self.finish_node()
        print(f"[llmga] {text}", file=self.stream, flush=True)

    def title(self, node_id) -> str:
        return self.titles.get(node_id, node_id)

    def executing(self, node_id) -> None:
        self.finish_node()
        self.node = node_id
        print(f"[llmga] running {self.title(node_id)}", file=self.stream, flush=True)

    def progress(self, node_id, value: int, maximum: int) -> None:
        if node_id is not None and node_id != self.node:
            self.executing(node_id)
        self.last = (value, maximum)
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=maximum, desc=f"[llmga]   {self.title(self.node)}", file=self.stream,
                                     unit="step", dynamic_ncols=True, leave=True)
            if self.bar.total != maximum:
                self.bar.total = maximum
            self.bar.n = value
            self.bar.refresh()
            return
        quarter = 4 * value // max(maximum, 1)
        if quarter > self.shown:
            self.shown = quarter
            print(f"[llmga]   {self.title(self.node)}: {value}/{maximum}", file=self.stream, flush=True)

    def finish_node(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last is not None and 4 * self.last[0] // max(self.last[1], 1) < 4:
            # ended before its last step (the MLLM at its end token): say where, on a line of its own
            print(f"[llmga]   {self.title(self.node)}: done at {self.last[0]}/{self.last[1]}", file=self.stream,
                  flush=True)
        self.node, self.bar, self.last, self.shown = None, None, None, -1


# ---------------------------------------------------------------------------------------------- running

def queue_prompt(server: Server, workflow: dict, titles: dict) -> str:
    answer = server.request("/prompt", {"prompt": workflow, "client_id": server.client_id})
    if answer.get("__status__") or answer.get("node_errors"):
        raise WorkflowError("The server refused the workflow: " + format_node_errors(answer, titles))
    print(f"[llmga] queued {answer['prompt_id']}", flush=True)
    return answer["prompt_id"]


def finished_entry(server: Server, prompt_id: str) -> dict | None:
    history = server.request(f"/history/{prompt_id}")
    entry = history.get(prompt_id) if isinstance(history, dict) else None
    return entry if entry and entry.get("status", {}).get("completed") is not None else None


async def _queue_and_watch(server: Server, workflow: dict, titles: dict, printer: ProgressPrinter) -> str:
    """Connects the websocket first and queues then, so that a prompt that finishes at once (all cached) cannot
    end before anyone listens; /history is looked at whenever the socket is quiet, for events missed all the same."""
    import aiohttp

    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        prompt_id = queue_prompt(server, workflow, titles)
        while True:
            try:
                msg = await ws.receive(timeout=2.0)
            except asyncio.TimeoutError:
                if finished_entry(server, prompt_id) is not None:
                    return prompt_id
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return prompt_id  # the server went away; the history poll below says how it ended
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # previews
            event = json.loads(msg.data)
            data = event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = event.get("type")
            if kind == "executing":
                if data.get("node") is None:
                    return prompt_id
                printer.executing(data["node"])
            elif kind == "progress":
                printer.progress(data.get("node"), int(data["value"]), int(data["max"]))
            elif kind == "execution_cached" and data.get("nodes"):
                printer.line(f"cached: {', '.join(printer.title(n) for n in data['nodes'])}")
            elif kind in ("execution_error", "execution_interrupted", "execution_success"):
                return prompt_id


def run_prompt(server: Server, workflow: dict, timeout: float, printer: ProgressPrinter | None = None) -> dict:
    titles = {nid: n.get("_meta", {}).get("title") or n["class_type"] for nid, n in workflow.items()}
    printer = printer or ProgressPrinter(titles)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        prompt_id = queue_prompt(server, workflow, titles)  # no live progress; the poll below waits
    else:
        try:
            prompt_id = asyncio.run(asyncio.wait_for(_queue_and_watch(server, workflow, titles, printer), timeout))
        except asyncio.TimeoutError:
            raise WorkflowError(f"The workflow did not finish within {timeout:.0f} s.") from None
        finally:
            printer.finish_node()
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = finished_entry(server, prompt_id)
        if entry is not None:
            status = entry["status"]
            if status.get("status_str") != "success":
                raise WorkflowError("The workflow failed: " + describe_failure(status, titles))
            return entry
        time.sleep(0.5)
    raise WorkflowError(f"The workflow did not finish within {timeout:.0f} s.")


def format_node_errors(answer: dict, titles: dict) -> str:
    parts = []
    if answer.get("error"):
        parts.append(answer["error"].get("message", "") + " " + answer["error"].get("details", ""))
    for node_id, err in (answer.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            parts.append(f"{titles.get(node_id, node_id)}: {e.get('message')} {e.get('details', '')}".strip())
    return "; ".join(p.strip() for p in parts if p.strip()) or json.dumps(answer)[:500]


def describe_failure(status: dict, titles: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            node = titles.get(data.get("node_id"), data.get("node_type"))
            return f"{node}: {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return "interrupted."
    return status.get("status_str", "unknown error")


def save_outputs(server: Server, entry: dict, workflow: dict, out_dir: Path) -> list[Path]:
    """Saved images, and per Prompt Generator prompt_<node>.txt (the bare prompt a pipeline reads),
    source_prompt_<node>.txt (editing) and notes_<node>.txt (what the node said beside the prompt)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        target = out_dir / name
        target.write_text(text, encoding="utf-8")
        written.append(target)

    for node_id, output in entry.get("outputs", {}).items():
        class_type = workflow.get(node_id, {}).get("class_type", "")
        for image in output.get("images", []):
            if image.get("type") != "output":
                continue
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            target = out_dir / image["filename"]
            target.write_bytes(server.request(f"/view?{query}", raw=True))
            written.append(target)
        if class_type in TEXT_OUTPUT_NODES and "prompt" in output:
            write(f"prompt_{node_id}.txt", "".join(output["prompt"]))
            if "".join(output.get("source_prompt", [])):
                write(f"source_prompt_{node_id}.txt", "".join(output["source_prompt"]))
            if output.get("notes"):
                write(f"notes_{node_id}.txt", "\n".join(output["notes"]) + "\n")
        elif class_type in TEXT_OUTPUT_NODES and output.get("text"):
            write(f"prompt_{node_id}.txt", "\n".join(output["text"]))  # a pack version without the bare prompt
        elif output.get("text") and class_type.startswith(("LLMGA", "DiffRIR")):
            write(f"notes_{node_id}.txt", "\n".join(output["text"]) + "\n")
    return written


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


if __name__ == "__main__":
    sys.exit(main())
