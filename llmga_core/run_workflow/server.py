"""The ComfyUI server a run talks to: one this command starts, or one at --server."""
from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .workflow import PACK_DIR, WorkflowError


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


