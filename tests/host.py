"""The real ComfyUI host for tests: in-process import and a real server on 127.0.0.1.

The host lives outside the project (LLMGA_COMFYUI_DIR, default ~/.cache/llmga-comfyui/ComfyUI-0.3.64; .ci/run
unpacks it from ../shared/host). Tests never skip when it is missing: they fail and say how
to set it up.
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


def comfyui_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(os.environ.get("LLMGA_COMFYUI_DIR") or cache / "llmga-comfyui" / "ComfyUI-0.3.64")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"ComfyUI host not found at {path}; run `bash .ci/setup_env.sh` "
                           f"(or set LLMGA_COMFYUI_DIR to an unpacked ComfyUI 0.3.64).")
    return path


def import_host_inprocess():
    """Imports the host's modules in this process on the CPU (args.cpu set first)."""
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
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    importlib.import_module(PACK_MODULE + ".nodes")  # what the host's comfy_entrypoint() call imports
    return module


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real `main.py --cpu` on 127.0.0.1 with this pack linked into a private base directory."""

    def __init__(self, base: Path, extra_args=()):
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "comfyui-llmga"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, timeout=180):
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT)
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
