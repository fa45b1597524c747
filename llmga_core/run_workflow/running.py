"""Queueing a prompt, its progress on the console, and what it wrote."""
from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..console import live_bar_class
from .server import Server
from .workflow import TEXT_OUTPUT_NODES, WorkflowError


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


