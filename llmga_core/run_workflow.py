"""Run a shipped LLMGA workflow headless through ComfyUI's HTTP API.

    python -m llmga_core.run_workflow workflows/api/llmga_t2i_sd15.json \
        --set instruction="a lighthouse in a storm" --out results/

Starts a ComfyUI on 127.0.0.1 (the one this pack is installed in, or --comfyui DIR) unless --server URL
is given, sets inputs from the command line, shows progress, and writes the images and the MLLM's prompt
to --out. Model folders the workflow names but the server lacks are listed with where they go;
--download fetches the released ones with huggingface_hub (opt-in). Standard library only, plus aiohttp
for live progress when it is importable (it is in every ComfyUI environment).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mimetypes
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

# Released model folders (Hugging Face repo id = binxia/<folder>) by the ComfyUI models/ subfolder they go in.
RELEASED_REPOS = {
    "LLM": "binxia",
    "diffusers": "binxia",
}
VISION_TOWER_REPO = "openai/clip-vit-large-patch14-336"
MODEL_INPUTS = {  # (class_type, input) -> models/ subfolder
    ("LLMGAMLLMLoader", "model_name"): "LLM",
    ("LLMGACheckpointLoader", "model_name"): "diffusers",
    ("DiffRIRLoader", "model_name"): "diffrir",
}
TEXT_OUTPUT_NODES = ("LLMGAPromptGenerator",)


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

    def upload_image(self, path: Path) -> str:
        boundary = uuid.uuid4().hex
        content = Path(path).read_bytes()
        ctype = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{Path(path).name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            info = json.loads(r.read())
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_comfyui_dir() -> Path | None:
    """The ComfyUI this pack is installed in: <ComfyUI>/custom_nodes/<pack>/llmga_core/run_workflow.py."""
    here = Path(__file__).resolve()
    candidate = here.parents[2].parent if here.parents[2].name == "custom_nodes" else None
    return candidate if candidate and (candidate / "main.py").is_file() else None


@contextlib.contextmanager
def local_comfyui(comfyui_dir: Path, extra_args: list[str], log_path: Path):
    port = free_port()
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           *extra_args]
    print(f"[llmga] starting ComfyUI in {comfyui_dir} on 127.0.0.1:{port} (log: {log_path})", flush=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 300
        while not server.alive():
            if proc.poll() is not None:
                raise WorkflowError(f"ComfyUI exited with code {proc.returncode} while starting; see {log_path}.")
            if time.time() > deadline:
                raise WorkflowError(f"ComfyUI did not answer within 300 s; see {log_path}.")
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
    info_cache = {}
    for node in workflow.values():
        for (class_type, input_name), folder in MODEL_INPUTS.items():
            if node["class_type"] != class_type or input_name not in node["inputs"]:
                continue
            if class_type not in info_cache:
                info_cache[class_type] = server.request(f"/object_info/{class_type}").get(class_type)
            info = info_cache[class_type]
            if info is None:
                raise WorkflowError(f"The server has no node {class_type}; is the LLMGA pack installed in its "
                                    f"custom_nodes folder?")
            spec = info["input"]["required"][input_name]
            # ComfyUI < 0.3.4x lists combo options in place of the type; newer ones under "options"
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
            name = node["inputs"][input_name]
            if name not in options:
                missing.append((class_type, name, folder))
    return missing


def describe_missing(missing, models_dir: str) -> str:
    lines = ["These models are not installed:"]
    for class_type, name, folder in missing:
        where = os.path.join(models_dir, folder, name)
        if folder in RELEASED_REPOS:
            source = f"huggingface.co/{RELEASED_REPOS[folder]}/{name} (or run again with --download)"
        else:
            source = "the DiffRIR release (Zj-BinXia/DiffRIR README, 'pretrained models')"
        lines.append(f"  - {name} for {class_type}: put it at {where}  [from {source}]")
    if any(folder == "LLM" for _, _, folder in missing):
        lines.append(f"  - the MLLM also needs the CLIP vision tower {VISION_TOWER_REPO} at "
                     f"{os.path.join(models_dir, 'clip_vision', 'clip-vit-large-patch14-336')}")
    return "\n".join(lines)


def download_models(missing, models_dir: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WorkflowError("--download needs huggingface_hub (pip install huggingface_hub).") from None
    for class_type, name, folder in missing:
        if folder not in RELEASED_REPOS:
            raise WorkflowError(f"{name} ({class_type}) is not on Hugging Face; download it by hand from the "
                                f"DiffRIR release into {models_dir / folder}.")
        repo = f"{RELEASED_REPOS[folder]}/{Path(name).name}"
        print(f"[llmga] downloading {repo} -> {models_dir / folder / name}", flush=True)
        snapshot_download(repo_id=repo, local_dir=str(models_dir / folder / name))
        if folder == "LLM":
            tower = models_dir / "clip_vision" / "clip-vit-large-patch14-336"
            if not (tower / "config.json").is_file():
                print(f"[llmga] downloading {VISION_TOWER_REPO} -> {tower}", flush=True)
                snapshot_download(repo_id=VISION_TOWER_REPO, local_dir=str(tower),
                                  allow_patterns=["*.json", "*.txt", "*.safetensors"])


# ---------------------------------------------------------------------------------------------- running

async def _watch_ws(server: Server, prompt_id: str, titles: dict) -> None:
    import aiohttp

    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = event.get("type")
            if kind == "executing":
                if data.get("node") is None:
                    return
                print(f"[llmga] running {titles.get(data['node'], data['node'])}", flush=True)
            elif kind == "progress":
                print(f"\r[llmga]   {data['value']}/{data['max']}", end="\n" if data["value"] >= data["max"] else "",
                      flush=True)
            elif kind == "execution_cached" and data.get("nodes"):
                print(f"[llmga] cached: {', '.join(titles.get(n, n) for n in data['nodes'])}", flush=True)
            elif kind in ("execution_error", "execution_interrupted", "execution_success"):
                return


def run_prompt(server: Server, workflow: dict, timeout: float) -> dict:
    titles = {nid: n.get("_meta", {}).get("title") or n["class_type"] for nid, n in workflow.items()}
    answer = server.request("/prompt", {"prompt": workflow, "client_id": server.client_id})
    if answer.get("__status__") or answer.get("node_errors"):
        raise WorkflowError("The server refused the workflow: " + format_node_errors(answer, titles))
    prompt_id = answer["prompt_id"]
    print(f"[llmga] queued {prompt_id}", flush=True)
    try:
        import aiohttp  # noqa: F401

        asyncio.run(asyncio.wait_for(_watch_ws(server, prompt_id, titles), timeout))
    except ImportError:
        pass  # no live progress; poll below
    except asyncio.TimeoutError:
        raise WorkflowError(f"The workflow did not finish within {timeout:.0f} s.") from None
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.request(f"/history/{prompt_id}")
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None:
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
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for node_id, output in entry.get("outputs", {}).items():
        class_type = workflow.get(node_id, {}).get("class_type", "")
        for image in output.get("images", []):
            if image.get("type") != "output":
                continue
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            target = out_dir / image["filename"]
            target.write_bytes(server.request(f"/view?{query}", raw=True))
            written.append(target)
        if class_type in TEXT_OUTPUT_NODES and output.get("text"):
            target = out_dir / f"prompt_{node_id}.txt"
            target.write_text("\n".join(output["text"]), encoding="utf-8")
            written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmga_core.run_workflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="an API-format workflow, e.g. workflows/api/llmga_t2i_sd15.json")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                        help="set a widget input; NODE is a node id, class type or title (repeatable)")
    parser.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                        help="upload an image and use it in LoadImage nodes (or the one named NODE)")
    parser.add_argument("--out", type=Path, default=Path("llmga_output"), help="folder for images and prompts")
    parser.add_argument("--server", help="use a running ComfyUI at this URL instead of starting one")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI folder to start (default: the one this pack is in)")
    parser.add_argument("--comfyui-args", default="", help="extra arguments for ComfyUI's main.py, e.g. '--cpu'")
    parser.add_argument("--download", action="store_true",
                        help="download missing released models with huggingface_hub before running")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    args = parser.parse_args(argv)
    try:
        workflow = load_api_workflow(args.workflow)
        apply_settings(workflow, args.settings)
        if args.server:
            server = Server(args.server)
            if not server.alive():
                raise WorkflowError(f"No ComfyUI answers at {args.server}.")
            return run_with(server, workflow, args, models_dir=None)
        comfyui = args.comfyui or default_comfyui_dir()
        if comfyui is None or not (Path(comfyui) / "main.py").is_file():
            raise WorkflowError("Cannot find ComfyUI: pass --comfyui DIR (the folder with main.py) or --server URL.")
        args.out.mkdir(parents=True, exist_ok=True)
        with local_comfyui(Path(comfyui), args.comfyui_args.split(), args.out / "comfyui.log") as server:
            return run_with(server, workflow, args, models_dir=Path(comfyui) / "models")
    except WorkflowError as e:
        print(f"[llmga] error: {e}", file=sys.stderr)
        return 2


def run_with(server: Server, workflow: dict, args, models_dir: Path | None) -> int:
    missing = missing_models(server, workflow)
    if missing:
        if args.download and models_dir is not None:
            download_models(missing, models_dir)
            server.request("/object_info")  # refreshes the host's model lists
            missing = missing_models(server, workflow)
        elif args.download:
            raise WorkflowError("--download needs a local ComfyUI (not --server): the files go in its models folder.")
        if missing:
            raise WorkflowError(describe_missing(missing, str(models_dir or "<ComfyUI>/models")))
    for spec in args.image:
        node_sel, _, path = spec.rpartition("=")
        name = server.upload_image(Path(path))
        targets = [n for nid, n in workflow.items() if n["class_type"] == "LoadImage"
                   and (not node_sel or node_sel in (nid, n.get("_meta", {}).get("title")))]
        if not targets:
            raise WorkflowError(f"--image {spec!r}: the workflow has no matching LoadImage node.")
        for node in targets:
            node["inputs"]["image"] = name
    entry = run_prompt(server, workflow, args.timeout)
    for path in save_outputs(server, entry, workflow, args.out):
        print(f"[llmga] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
