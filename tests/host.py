"""The real ComfyUI host for tests: in-process import and a real server on 127.0.0.1.

The host lives outside the project (LLMGA_COMFYUI_DIR, default ~/.cache/llmga-comfyui/ComfyUI-<LLMGA_HOST_VERSION>,
0.33.0 unless set; .ci/setup_env.sh unpacks it from ../shared/host). Tests never skip when it is missing: they fail
and say how to set it up. In the host-free library runs (LLMGA_LIBRARY_ONLY=1, `-m "not host"`) a test that reaches
for the host fails at once: it lacks the `host` mark.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "llmga_pack_under_test"


HOST_VERSIONS = ("0.33.0", "0.3.64")  # ../shared/host; the first is the default


def host_version() -> str:
    return os.environ.get("LLMGA_HOST_VERSION") or HOST_VERSIONS[0]


def comfyui_dir() -> Path:
    """The unpacked ComfyUI (its source files; the CLIP tokenizer files of host-free tests come from here too)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(os.environ.get("LLMGA_COMFYUI_DIR") or cache / "llmga-comfyui" / f"ComfyUI-{host_version()}")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"ComfyUI host not found at {path}; run `LLMGA_HOST_VERSION={host_version()} bash "
                           f".ci/setup_env.sh` (or set LLMGA_COMFYUI_DIR to an unpacked ComfyUI).")
    return path


def comfyui_version() -> tuple[int, ...]:
    """The version of the host under test, from its comfyui_version.py."""
    text = (comfyui_dir() / "comfyui_version.py").read_text()
    return tuple(int(part) for part in text.split('"')[1].split("."))


def require_host() -> None:
    if os.environ.get("LLMGA_LIBRARY_ONLY"):
        raise RuntimeError("this test needs the real ComfyUI but has no `host` mark (tests/conftest.py)")


def import_host_inprocess():
    """Imports the host's modules in this process on the CPU (args.cpu set first)."""
    require_host()
    host = str(comfyui_dir())
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (must come after args.cpu)
    import folder_paths

    return folder_paths


def import_pack_inprocess():
    """Imports this checkout as a package the way the host does (by path, relative imports)."""
    import_host_inprocess()
    install_test_plugins()
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    importlib.import_module(PACK_MODULE + ".nodes")  # what the host's comfy_entrypoint() call imports
    return module


TEST_PLUGINS = REPO / "tests" / "host_plugins"  # test-only host packages: the tiny model sizes (see there)


def install_test_plugins(custom_nodes: Path | None = None) -> None:
    """Links tests/host_plugins/* into a server's custom_nodes/ beside the pack, or with None imports them into
    this process by path as the host imports a custom node package."""
    for plugin in sorted(p for p in TEST_PLUGINS.iterdir() if (p / "__init__.py").is_file()):
        if custom_nodes is not None and not (Path(custom_nodes) / plugin.name).exists():
            (Path(custom_nodes) / plugin.name).symlink_to(plugin, target_is_directory=True)
        elif custom_nodes is None and plugin.name not in sys.modules:
            spec = importlib.util.spec_from_file_location(plugin.name, plugin / "__init__.py")
            sys.modules[plugin.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[plugin.name])


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real `main.py --cpu` on 127.0.0.1 with this pack linked into a private base directory."""

    def __init__(self, base: Path, extra_args=(), env=None, cpu: bool = True):
        self.base = Path(base)
        self.cpu = cpu  # False only for benchmarks on a machine with a GPU
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "comfyui-llmga"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        install_test_plugins(self.base / "custom_nodes")
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args)
        self.env = None if env is None else {**os.environ, **env}
        self.proc = None

    def start(self, timeout=180):
        require_host()
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port",
               str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/object_info/SaveImage")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or body.get("node_errors"):
            raise AssertionError(f"prompt refused ({status}): {json.dumps(body)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout=300) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def alive(self) -> bool:
        """The process runs and answers HTTP."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            self.get("/system_stats")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def interrupt(self, prompt_id: str | None = None):
        return self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models=True, free_memory=True):
        return self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})


# ------------------------------------------------------------------------------------- shared tiny models
MLLM_MODELS = {  # released folder names the shipped workflows use -> tiny fixture family
    "llmga-vicuna-7b-v1.5-full-finetune": "vicuna",
    "llmga-llama3-8b-it-full-finetune": "llama3",
    "llmga-Qwen2-0.5B-full-finetune": "qwen2",
}
SD_MODELS = {"llmga-sd15-t2i-v2": "sd15", "llmga-sdxl-t2i": "sdxl",
             "llmga-sd15-inpainting-v2": "sd15-inpaint", "llmga-sdxl-inpainting-v2": "sdxl-inpaint"}
VISION_TOWER = "clip-vit-large-patch14-336"
DIFFRIR_X1 = "DiffRIR_x1.pth"
EDIT_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"  # what the editing workflow loads, as the original
_TINY_MODELS: Path | None = None


def tiny_models() -> Path:
    """One models/ tree per process with every model the shipped workflows name, at tiny sizes (built on
    first use, removed at exit); servers link to it with models_base()."""
    global _TINY_MODELS
    if _TINY_MODELS is None:
        import atexit
        import shutil
        import tempfile

        from tests.fixtures.tiny_diffrir import make_diffrir_weights
        from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower
        from tests.fixtures.tiny_sd import make_sd_folder

        root = Path(tempfile.mkdtemp(prefix="llmga-models-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        for name, family in MLLM_MODELS.items():
            make_mllm_folder(root / "LLM", family, name=name)
        make_vision_tower(root / "clip_vision" / VISION_TOWER)
        for name, kind in SD_MODELS.items():
            # the SD1.5 UNet with attention at its low-resolution level only: editing runs at 512²
            make_sd_folder(root / "diffusers", kind, name=name, light=kind == "sd15")
        write_vae_file(root / "vae" / EDIT_VAE)
        (root / "diffrir").mkdir()
        make_diffrir_weights(root / "diffrir" / DIFFRIR_X1, scale=1)
        _TINY_MODELS = root
    return _TINY_MODELS


def write_vae_file(path: Path) -> None:
    """A random VAE of the real SD architecture (the host's VAELoader accepts no smaller one) as one float16
    safetensors file with diffusers keys, which the host converts."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(path))


def models_base(base: Path) -> Path:
    """A ComfyUI base directory with this pack linked into custom_nodes/ (as ComfyServer does) and whose
    models/<kind>/<name> entries link to tiny_models(), so a test can add, damage or remove models of its own
    there without touching other servers' models."""
    require_host()
    base = Path(base)
    shared = tiny_models()
    for kind in ("LLM", "clip_vision", "diffusers", "diffrir", "vae"):
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        for entry in (shared / kind).iterdir():
            link = base / "models" / kind / entry.name
            if not link.exists():
                link.symlink_to(entry, target_is_directory=entry.is_dir())
    pack = base / "custom_nodes" / "comfyui-llmga"
    pack.parent.mkdir(parents=True, exist_ok=True)
    if not pack.exists():
        pack.symlink_to(REPO, target_is_directory=True)
    install_test_plugins(pack.parent)
    return base


# One OpenMP thread in the servers the tests start: on a shared 2-core machine a second thread that is
# descheduled made tiny-model steps up to 150x slower (3 s instead of 20 ms per sampler step).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def process_rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a finished prompt's history entry (None when there is none)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def executed_nodes(entry: dict) -> set[str]:
    """Node ids that really ran for a finished prompt (the others came from the cache)."""
    cached = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            cached.update(data.get("nodes", []))
    return set(entry["prompt"][2]) - cached


class ProgressWatch:
    """The server's websocket for one client, on a thread: waits for a node's progress events (so a test
    can interrupt or free memory while that node is running)."""

    def __init__(self, server: "ComfyServer"):
        import threading

        self.server = server
        self.events = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the websocket did not connect")

    def _run(self):
        import asyncio

        import aiohttp

        async def listen():
            url = self.server.url.replace("http", "ws", 1) + f"/ws?clientId={self.server.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                self._ready.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        with self._cond:
                            self.events.append(json.loads(msg.data))
                            self._cond.notify_all()
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

        try:
            asyncio.run(listen())
        except Exception:  # the server went away; waiters time out and say so
            self._ready.set()

    def wait_progress(self, prompt_id: str, node: str, at_least: int = 1, timeout: float = 120) -> dict:
        """The first progress event of `node` in `prompt_id` with value >= at_least."""
        def match():
            for event in self.events:
                data = event.get("data", {})
                if (event.get("type") == "progress" and data.get("prompt_id") == prompt_id
                        and data.get("node") == node and data.get("value", 0) >= at_least):
                    return data
            return None

        with self._cond:
            if not self._cond.wait_for(match, timeout):
                raise TimeoutError(f"node {node} of prompt {prompt_id} reported no progress >= {at_least} "
                                   f"within {timeout}s")
            return match()

    def last_progress(self, prompt_id: str, node: str) -> dict | None:
        with self._cond:
            found = [e["data"] for e in self.events if e.get("type") == "progress"
                     and e["data"].get("prompt_id") == prompt_id and e["data"].get("node") == node]
        return found[-1] if found else None


# ------------------------------------------------------------------------------------- workflows at test size
def small_workflow(workflow: dict) -> dict:
    """A shipped workflow at tiny-model size: few steps, a small canvas, few new tokens, float32 MLLM."""
    for node in workflow.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = 2
            if "start_at_step" in inputs:
                inputs["start_at_step"] = min(inputs["start_at_step"], 1)
        elif kind in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = 64
        elif kind == "LLMGAPromptGenerator":
            inputs["max_new_tokens"] = 12
        elif kind == "LLMGAMLLMLoader":
            inputs["dtype"] = "float32"
        elif kind == "ImagePadForOutpaint":
            for side in ("left", "top", "right", "bottom"):
                inputs[side] = min(inputs[side], 32)
        elif kind == "DiffRIRRestore":
            inputs["tile_size"] = 32
        elif kind == "LLMGAEdit":
            inputs["steps"] = 2  # the edit itself stays at the original's 512²
    return workflow


def shipped_workflow(name: str, seed: int | None = None) -> dict:
    """workflows/api/<name>.json at test size; `seed` replaces every seed widget (MLLM, sampler, edit)."""
    workflow = small_workflow(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    if seed is not None:
        for node in workflow.values():
            if "seed" in node["inputs"]:
                node["inputs"]["seed"] = seed
    return workflow


LOADERS = {"LLMGAMLLMLoader": "model_name", "LLMGACheckpointLoader": "model_name", "DiffRIRLoader": "model_name",
           "VAELoader": "vae_name"}


def model_loads(entry: dict) -> list[tuple[str, str]]:
    """(loader class, model name) for each loader that really ran for a finished prompt."""
    prompt = entry["prompt"][2]
    return [(prompt[n]["class_type"], prompt[n]["inputs"][LOADERS[prompt[n]["class_type"]]])
            for n in executed_nodes(entry) if prompt[n]["class_type"] in LOADERS]


def prompt_seconds(entry: dict) -> float | None:
    """Execution time of a finished prompt from the server's own timestamps (queue wait excluded)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    return None if end is None or stamps.get("execution_start") is None else (end - stamps["execution_start"]) / 1000


def run_load(server: ComfyServer, prompts: list[tuple[str, dict]], timeout: float = 3600) -> dict:
    """Queues every (label, prompt) at once, as a pipeline does, waits until the queue is empty, and reads each
    prompt's fate from /history: completed, failed, lost (queued but never finished) or refused at /prompt."""
    queued, refused = [], 0
    for label, prompt in prompts:
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
        if status == 200 and not body.get("node_errors"):
            queued.append((label, body["prompt_id"]))
        else:
            refused += 1
    deadline = time.time() + timeout
    while time.time() < deadline and server.alive():
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.5)
    history = server.get("/history") if server.alive() else {}
    result = {"completed": [], "failed": [], "lost": [], "refused": refused}
    for label, prompt_id in queued:
        entry = history.get(prompt_id)
        if entry is None or entry.get("status", {}).get("completed") is None:
            result["lost"].append((label, prompt_id))
        elif entry["status"]["status_str"] == "success":
            result["completed"].append((label, entry))
        else:
            result["failed"].append((label, entry))
    return result
