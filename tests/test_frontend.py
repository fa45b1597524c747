"""The prompt on the node, in the real ComfyUI frontend (headless Chromium), against the real server.

Two frontends: the one the host pins (comfyui-frontend-package in the host's venv: 1.49.6 for ComfyUI 0.33.0,
1.27.10 for 0.3.64) and the newest on the package index (installed by .ci/setup_env.sh into its own folder,
served by the same ComfyUI through --front-end-root). One server and one browser session per frontend
(tests/frontend/check_frontend.mjs records what the page shows; the tests here compare it with the server's
history and with independent references).
Screenshots of every check go to $LLMGA_SCREENSHOTS (default /tmp/llmga-screenshots)/<frontend>/. With
LLMGA_README_SCREENSHOT=1 the run on the pinned frontend also writes README's picture of the text-to-image workflow
(docs/images/llmga_t2i_sd15.png: the whole workflow after a run whose prompt was edited on the node).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from tests import host
from tests.host import REPO, ComfyServer, executed_nodes, small_workflow
from tests.test_host_server import write_input_images
from tests.workflow_format import DESCRIPTIONS, NOTE_TYPE, note_text

WORKFLOWS = REPO / "workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
SCRIPT = REPO / "tests" / "frontend" / "check_frontend.mjs"
NEWEST_FRONTEND = "1.58.1"  # the newest comfyui-frontend-package on PyPI when tested; .ci/setup_env.sh installs it
STREAM_MODEL = "llmga-vicuna-stream-test"  # the tiny Vicuna without an end token: it writes max_new_tokens tokens
STREAM_TOKENS = 800
STREAM_WORKFLOW = "llmga_t2i_sd15"
GENERATOR = "LLMGAPromptGenerator"
MISSING_WORKFLOW = "llmga_edit_sd15"  # loads a single-file model (the editing VAE) with download metadata
README_PICTURE = REPO / "docs" / "images" / "llmga_t2i_sd15.png"
README_PICTURE_MAX_BYTES = 300_000


def newest_frontend_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("LLMGA_FRONTEND_DIR") or cache / "llmga-comfyui" / f"frontend-{NEWEST_FRONTEND}")
    static = root / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        raise RuntimeError(f"comfyui-frontend-package {NEWEST_FRONTEND} is not installed in {root}; run "
                           f"`bash .ci/setup_env.sh`.")
    return static


def make_stream_model(models: Path) -> None:
    """The tiny Vicuna of the workflows, but with no end token in generation_config.json, so it always writes
    max_new_tokens tokens (the random tiny models otherwise stop after a few dozen)."""
    source = (models / "LLM" / "llmga-vicuna-7b-v1.5-full-finetune").resolve()
    target = models / "LLM" / STREAM_MODEL
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "generation_config.json" and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    generation = json.loads((source / "generation_config.json").read_text())
    generation["eos_token_id"] = []
    (target / "generation_config.json").write_text(json.dumps(generation))


def as_shown(text: str) -> str:
    """Text as a textarea's value gives it back: the HTML spec normalises CR and CRLF to LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def to_fixed(seconds: float) -> str:
    """JavaScript's seconds.toFixed(2) + "s", as the queue panels write a run's time (a tie rounds up)."""
    return f"{Decimal(seconds).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}s"


def run_seconds(entry: dict) -> float:
    """A history entry's execution time as the frontends take it: execution_start to the end message."""
    stamps = dict(entry["status"]["messages"])
    end = max(data["timestamp"] for kind, data in entry["status"]["messages"]
              if kind in ("execution_success", "execution_error", "execution_interrupted"))
    return (end - stamps["execution_start"]["timestamp"]) / 1000


def js_keys(obj: dict) -> list[str]:
    """A JSON object's keys in JavaScript's order: integer-like keys (node ids) ascending, then the others."""
    index = [k for k in obj if k.isdigit() and str(int(k)) == k and int(k) < 2**32 - 1]
    return sorted(index, key=int) + [k for k in obj if k not in index]


def saved_preview(entry: dict, order=list) -> dict:
    """The image a queue panel shows for a finished run: its first saved (type "output") one, the nodes'
    outputs taken in `order` (the server's own, or js_keys where the frontend walks the history itself)."""
    outputs = entry["outputs"]
    return next(item for node in order(outputs) for item in outputs[node].get("images", [])
                if item["type"] == "output")


def view_url(image: dict) -> str:
    return f"/api/view?filename={image['filename']}&type={image['type']}&subfolder={image['subfolder']}"


def strip(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def downstream(prompt: dict, node: str) -> set[str]:
    """The nodes that take `node`'s outputs, directly or through others, in an API prompt."""
    found, frontier = set(), {node}
    while frontier:
        frontier = {nid for nid, n in prompt.items() for v in n["inputs"].values()
                    if isinstance(v, list) and len(v) == 2 and str(v[0]) in frontier} - found
        found |= frontier
    return found


class FrontendRun:
    def __init__(self, name, server, report, workflows):
        self.name, self.server, self.report, self.workflows = name, server, report, workflows

    def history(self, prompt_id: str) -> dict:
        return self.server.get(f"/history/{prompt_id}")[prompt_id]

    def check(self, name: str) -> dict:
        result = self.report["checks"].get(name)
        assert result is not None, f"the browser run did not reach the {name} check; console: {self.report['console']}"
        assert "error" not in result, result["error"]
        return result


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend(request, tmp_path_factory):
    name = request.param
    base = host.models_base(tmp_path_factory.mktemp(f"frontend_{name}"))
    write_input_images(base / "input")
    make_stream_model(base / "models")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run template dialog
    extra = [] if name == "pinned" else ["--front-end-root", str(newest_frontend_root())]
    server = ComfyServer(base, extra_args=extra, env=host.ONE_THREAD).start()
    shots = Path(os.environ.get("LLMGA_SCREENSHOTS", "/tmp/llmga-screenshots")) / name
    shutil.rmtree(shots, ignore_errors=True)
    workflows = []
    for path in UI_WORKFLOWS:
        twin = json.loads((WORKFLOWS / "api" / path.name).read_text())
        workflows.append({"name": path.stem, "path": str(path), "twin": twin,
                          "small": small_workflow(json.loads(json.dumps(twin)))})
    stream = next(w for w in workflows if w["name"] == STREAM_WORKFLOW)
    legacy = json.loads(Path(stream["path"]).read_text())
    for node in legacy["nodes"]:  # as saved before edited_prompt / edited_from existed
        if node["type"] == GENERATOR:
            node["widgets_values"] = node["widgets_values"][:-2]
    config = {"server": server.url, "screenshots": str(shots),
              "workflows": [{k: w[k] for k in ("name", "path", "small")} for w in workflows],
              "stream": {"path": stream["path"], "small": stream["small"], "model": STREAM_MODEL,
                         "max_new_tokens": STREAM_TOKENS},
              "legacy": {"workflow": legacy}, "readme": {"name": STREAM_WORKFLOW},
              "missing_model": {"workflow": str(WORKFLOWS / f"{MISSING_WORKFLOW}.json"),
                                "folder": str(base / "models" / "vae"), "name": host.EDIT_VAE,
                                "aside": str(base / f"{host.EDIT_VAE}.aside")}}
    work = tmp_path_factory.mktemp(f"frontend_{name}_run")
    (work / "config.json").write_text(json.dumps(config))
    try:
        done = subprocess.run(["node", str(SCRIPT), str(work / "config.json"), str(work / "report.json")],
                              cwd=SCRIPT.parent, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads((work / "report.json").read_text())
        yield FrontendRun(name, server, report, workflows)
    finally:
        server.stop()


def test_the_frontend_is_the_one_asked_for(frontend):
    wanted = importlib.metadata.version("comfyui-frontend-package") if frontend.name == "pinned" else NEWEST_FRONTEND
    assert frontend.report["frontend"] == wanted
    if frontend.name == "newest":
        assert f"web root: {newest_frontend_root()}" in frontend.server.log()


@pytest.mark.parametrize("index", range(len(UI_WORKFLOWS)), ids=[p.stem for p in UI_WORKFLOWS])
def test_every_ui_workflow_loads_converts_and_runs_from_the_frontend(frontend, index):
    entry = frontend.workflows[index]
    record = frontend.report["workflows"][entry["name"]]
    assert "error" not in record, record["error"]
    assert record["missing"] == [], f"unknown node types {record['missing']}"
    assert strip(record["output"]) == strip(entry["twin"])  # the frontend builds exactly the API twin
    assert strip(record["small_output"]) == strip(entry["small"])  # and, set through its widgets, the test size
    assert record["node_errors"] == {}
    history = frontend.history(record["prompt_id"])
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    saved = [img for out in history["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved and all((frontend.server.base / "output" / i["subfolder"] / i["filename"]).is_file() for i in saved)
    generators = [nid for nid, n in entry["small"].items() if n["class_type"] == GENERATOR]
    assert generators
    for nid in generators:  # each Prompt Generator shows its prompt, and its notes apart
        shown = record["shown"][nid]
        out = history["outputs"][nid]
        assert (shown["text"], shown["tag"]) == (as_shown(out["prompt"][0]), "TEXTAREA")
        notes = list(out["notes"]) + (["source: " + out["source_prompt"][0]] if out["source_prompt"][0] else [])
        assert sorted(shown["notes"].split("\n")) == sorted(notes) if notes else shown["notes"] == ""
        assert shown["serialized"] is False and shown["edit_widgets_hidden"] == [True, True]
        assert shown["property"]["text"] == out["prompt"][0]


@pytest.mark.parametrize("index", range(len(UI_WORKFLOWS)), ids=[p.stem for p in UI_WORKFLOWS])
def test_every_ui_workflow_shows_its_note(frontend, index):
    """The Markdown note renders on the canvas: its heading is on top where the note is, and it holds the
    workflow's models and settings (UI only: the frontend's prompt, compared with the API twin above, has none)."""
    entry = frontend.workflows[index]
    record = frontend.report["workflows"][entry["name"]]
    assert "error" not in record, record["error"]
    title = DESCRIPTIONS[entry["name"]][0]
    assert [(n["heading"], n["heading_visible"]) for n in record["notes"]] == [(title, True)], record["notes"]
    note = record["notes"][0]
    assert note["widget_value"] == note_text(entry["name"], entry["twin"])
    loaded = {v for n in entry["twin"].values() for k, v in n["inputs"].items()
              if k in ("model_name", "vae_name") and isinstance(v, str)}
    for name in loaded | {host.VISION_TOWER, "The original's settings"}:
        assert name in note["text"], (name, note["text"])
    assert NOTE_TYPE not in {n["class_type"] for n in record["output"].values()}


@pytest.mark.parametrize("index", range(len(UI_WORKFLOWS)), ids=[p.stem for p in UI_WORKFLOWS])
def test_no_two_nodes_overlap_after_a_run(frontend, index):
    """After the run has put its pictures and texts on the nodes (Load Image previews, the saved images, the
    Prompt Generator's text box), every node has the room its contents ask for and no two nodes' boxes (title bar
    included) overlap."""
    entry = frontend.workflows[index]
    nodes = frontend.report["workflows"][entry["name"]]["layout"]
    assert len(nodes) == len(entry["twin"]) + 1  # and the note
    for node in nodes:
        assert node["wanted"] is None or (node["size"][0] >= node["wanted"][0] - 0.5
                                          and node["size"][1] >= node["wanted"][1] - 0.5), node
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounds"], b["bounds"]
            apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert apart, f"{a['type']} {a['bounds']} overlaps {b['type']} {b['bounds']}"


def test_the_missing_models_list_offers_the_editing_vae(frontend):
    """With the editing VAE removed from the server, loading the editing workflow lists it as missing and offers
    its download from the workflow's metadata (node.properties.models: name, url, directory): frontend 1.27.10 in
    its Missing Models dialog, 1.49.6 and 1.58.1 in the missing-models section of the right side panel
    (opened from the toast's "View details"). Without the metadata no download is offered."""
    result = frontend.check("missing_models")
    assert result["listed_by_server"] is False  # the server's VAELoader list lacks the file while it is aside
    workflow = json.loads((WORKFLOWS / f"{MISSING_WORKFLOW}.json").read_text())
    [metadata] = [m for n in workflow["nodes"] for m in n["properties"].get("models", [])]
    hub = "https://huggingface.co/stabilityai/sd-vae-ft-mse-original"
    assert metadata == {"name": host.EDIT_VAE, "directory": "vae", "url": f"{hub}/resolve/main/{host.EDIT_VAE}"}
    version = tuple(int(p) for p in frontend.report["frontend"].split("."))
    shown = result["with_metadata"]
    assert shown["ui"] == ("dialog" if version < (1, 30) else "panel")
    # the panel's Copy URL gives the file's page on the Hub (the frontend's toBrowsableUrl), the dialog's the file
    url = metadata["url"] if version < (1, 30) else metadata["url"].replace("/resolve/", "/blob/")
    assert shown["rows"] == [{"name": host.EDIT_VAE, "directory": "vae", "download": True, "url": url}]
    bare = result["without_metadata"]
    if version < (1, 30):  # the dialog lists only models with metadata
        assert bare == {"ui": "none", "rows": []}
    else:  # still missing, but nothing to download it from
        assert [(r["name"], r["download"], r["url"]) for r in bare["rows"]] == [(host.EDIT_VAE, False, None)]


def test_the_readme_picture(frontend):
    """The whole text-to-image workflow after a run whose prompt was edited on the node, as the edit check left
    it; with LLMGA_README_SCREENSHOT=1 the pinned frontend's picture becomes README's (at most 300 KB)."""
    from PIL import Image

    picture = Path(frontend.check("edit")["picture"])
    with Image.open(picture) as image:
        assert image.size == (1720, 800)
    if frontend.name == "pinned" and os.environ.get("LLMGA_README_SCREENSHOT") == "1":
        write_readme_picture(picture, README_PICTURE)
    if README_PICTURE.is_file():
        assert README_PICTURE.stat().st_size <= README_PICTURE_MAX_BYTES


def write_readme_picture(source: Path, target: Path) -> None:
    """The screenshot as README shows it: a PNG, down to a 256-colour palette when the full colours exceed the
    size limit."""
    import io

    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        for candidate in (image, image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)):
            data = io.BytesIO()
            candidate.save(data, format="PNG", optimize=True)
            if data.tell() <= README_PICTURE_MAX_BYTES:
                break
    assert data.tell() <= README_PICTURE_MAX_BYTES, data.tell()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.getvalue())


def test_the_queue_side_panel_lists_the_runs(frontend):
    """After the workflows ran from the frontend's queue, its queue / job history side panel (opened from the
    sidebar) lists those runs as the server's /history (and /api/jobs where the host has it) has them; except
    frontend 1.58.1 on ComfyUI 0.3.64, which lists jobs only through /api/jobs, which that host lacks."""
    result = frontend.check("queue_panel")
    version = tuple(int(p) for p in frontend.report["frontend"].split("."))
    runs = [frontend.report["workflows"][w["name"]]["prompt_id"] for w in frontend.workflows]
    # when the panel was open the server had exactly these runs
    assert sorted(result["server"]["history"]) == sorted(runs)
    history = {pid: frontend.history(pid) for pid in runs}
    assert all(entry["status"]["status_str"] == "success" for entry in history.values())
    newest_first = sorted(runs, key=lambda pid: history[pid]["prompt"][0], reverse=True)
    jobs_api = host.comfyui_version() >= (0, 33)  # of the hosts tested, 0.33.0 has /api/jobs and 0.3.64 not
    assert result["server"]["jobs_status"] == (200 if jobs_api else 404)
    requests = result["requests"]
    if version < (1, 30):  # 1.27.10 (pinned by 0.3.64): the Queue tab, its tasks read from /history
        assert (result["panel"], result["title"].lower()) == ("queue", "queue")
        assert requests.get("GET /api/history 200")
        owner = {img["filename"]: pid for pid, entry in history.items() for out in entry["outputs"].values()
                 for img in out.get("images", []) if img["type"] == "output"}
        rows = result["rows"]
        assert [owner.get(row["title"]) for row in rows] == newest_first  # one task per run, the last on top
        for row, pid in zip(rows, newest_first):
            entry = history[pid]
            # each output item counts, the text lists of the LLMGA nodes too (its flatOutputs)
            count = sum(len(items) for out in entry["outputs"].values() for kind, items in out.items()
                        if kind != "animated")
            image = saved_preview(entry, js_keys)
            assert row == {"title": image["filename"], "src": view_url(image), "status": "success",
                           "time": to_fixed(run_seconds(entry)), "outputs": str(count) if count > 1 else None}, pid
        return
    assert result["panel"] == "job-history" and result["title"] == "Job History"
    if not jobs_api:  # the known limitation: asked, refused, nothing listed, no other source tried
        assert requests.get("GET /api/jobs 404") and not requests.get("GET /api/jobs 200")
        assert not [r for r in requests if "/history" in r], requests
        assert result["rows"] == [] and result["floating"] == [] and "No active jobs" in result["text"]
        return
    assert requests.get("GET /api/jobs 200") and not [r for r in requests if " 200" not in r], requests
    listed = [row["id"] for row in result["rows"]]
    assert listed == newest_first == [pid for pid in result["server"]["jobs"] if pid in runs]
    assert result["floating"] == result["rows"]  # the floating queue it was docked from listed the same
    for row in result["rows"]:
        entry, job = history[row["id"]], frontend.server.get(f"/api/jobs/{row['id']}")
        image = saved_preview(entry)
        assert job["status"] == "completed" and job["preview_output"]["filename"] == image["filename"]
        assert row["texts"] == [image["filename"], to_fixed(run_seconds(entry))]
        assert row["src"].startswith(view_url(image))


def test_the_prompt_streams_onto_the_node_while_it_is_written(frontend, original_tokenizers):
    result = frontend.check("stream")
    gen, events = result["generator"], result["events"]
    history = frontend.history(result["prompt_id"])
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    done_at = next(i for i, e in enumerate(events) if e["type"] == "executed" and str(e["node"]) == gen)
    partial = [(i, e) for i, e in enumerate(events) if e["type"] == "llmga.partial_text"]
    assert partial and all(str(e["node"]) == gen for _, e in partial)
    assert all(i < done_at for i, _ in partial), "partial text after the node finished"
    assert all(e["shown"] == as_shown(e["text"]) for _, e in partial), "the text box did not show the partial text"
    final = history["outputs"][gen]["prompt"][0]
    assert events[done_at]["shown"] == as_shown(final) and partial[0][1]["text"] != final

    # each partial text is the original tokenizer's decode of the first k tokens, k growing (the library's
    # greedy tokens for the same request; transformers 4.41 decode as the original CLI stores an answer)
    import torch
    from llmga_core.mllm import load_mllm

    models = frontend.server.base / "models"
    folder = models / "LLM" / STREAM_MODEL
    mllm = load_mllm(folder, vision_tower=models / "clip_vision" / host.VISION_TOWER, dtype=torch.float32)
    ids = []
    inputs = history["prompt"][2][gen]["inputs"]
    assert inputs["max_new_tokens"] == STREAM_TOKENS
    reply = mllm.generate(inputs["instruction"], task=inputs["task"], max_new_tokens=STREAM_TOKENS,
                          on_token=lambda step, token: ids.append(token))
    assert reply.prompt == final and len(ids) == STREAM_TOKENS
    prefixes = original_tokenizers.ask(folder, False, decode=[ids[:k] for k in range(1, len(ids) + 1)])["decode"]
    where = {}
    for k, text in enumerate(prefixes, start=1):
        where.setdefault(text.strip(), k)
    counts = [where.get(e["text"]) for _, e in partial]
    assert None not in counts, "a partial text is no prefix of the answer"
    assert counts == sorted(counts) and counts[0] == 1  # the first token at once, then growing
    # the text box asks for more room for the long answer, and the node (laid out with room for the box at its
    # largest) has it
    before, after = result["size_before"], result["size_after"]
    assert after["wanted"][1] > before["wanted"][1], f"the box did not ask for room for {len(final)} characters"
    assert after["size"][1] >= after["wanted"][1] and after["size"] == result["shown"][gen]["size"], after


def test_editing_the_prompt_reruns_only_what_is_downstream(frontend):
    result = frontend.check("edit")
    gen, edited = result["generator"], result["edited"]
    first = frontend.history(result["first"]["prompt_id"])
    answer_id = first["outputs"][gen]["answer_id"][0]
    typed = result["typed"][gen]
    assert (typed["edited_prompt"], typed["edited_from"]) == (edited, answer_id)  # the text box wrote the inputs
    assert typed["status"].startswith("edited")

    entry = frontend.history(result["run"]["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    prompt = entry["prompt"][2]
    assert (prompt[gen]["inputs"]["edited_prompt"], prompt[gen]["inputs"]["edited_from"]) == (edited, answer_id)
    out = entry["outputs"][gen]
    assert out["prompt"] == [edited] and out["edit"] == ["applied"] and out["answer_id"] == [answer_id]
    assert out["model_prompt"] == first["outputs"][gen]["prompt"]
    assert executed_nodes(entry) == {gen} | downstream(prompt, gen)  # loaders and the latent come from the cache
    run_events = result["run"]["events"]
    assert not [e for e in run_events if e["type"] in ("progress", "llmga.partial_text") and str(e["node"]) == gen], \
        "the MLLM generated again"
    assert result["shown"][gen]["text"] == edited and result["prompt"][gen]["inputs"]["edited_prompt"] == edited


def test_a_stale_edit_is_dropped_when_the_answer_changes(frontend):
    result = frontend.check("stale_edit")
    gen = result["generator"]
    assert result["before"][gen]["edited_prompt"] != ""  # the edit of the previous check is still set
    entry = frontend.history(result["run"]["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    out = entry["outputs"][gen]
    assert out["edit"] == ["dropped"] and out["prompt"] == out["model_prompt"]
    assert any("was dropped" in note for note in out["notes"])
    assert [e for e in result["run"]["events"] if e["type"] == "progress" and str(e["node"]) == gen], \
        "a new instruction must be answered anew"
    after = result["shown"][gen]
    assert (after["edited_prompt"], after["edited_from"]) == ("", "")  # cleared, so it cannot come back
    assert after["text"] == as_shown(out["prompt"][0]) and "was dropped" in after["notes"]


def test_the_copy_button_copies_the_text(frontend):
    result = frontend.check("copy")
    text = result["shown"][result["generator"]]["text"]
    assert text and result["clipboard"] == text
    assert result["fallback"] == [text]


def test_text_and_notes_come_back_after_a_reload_and_when_the_workflow_is_reopened(frontend):
    result = frontend.check("reload")
    gen = result["generator"]
    before = result["before"][gen]
    assert before["text"] and before["notes"]
    for after in (result["after_reload"][gen], result["after_reopen"][gen]):
        assert (after["text"], after["notes"], after["readOnly"]) == (before["text"], before["notes"], False)
    assert result["saved_properties"]["llmga_output"]["text"] == before["text"]
    # kept in the workflow file, never sent with a prompt
    assert "llmga_output" not in json.dumps(result["prompt"]) and before["text"] not in json.dumps(result["prompt"])


def test_an_interrupted_answer_gives_the_node_its_text_back(frontend):
    result = frontend.check("interrupted")
    gen = result["generator"]
    assert result["during"] == {"text": "half an ans", "status": "writing…", "readOnly": True}
    before, after = result["before"][gen], result["after"][gen]
    assert (after["text"], after["notes"], after["readOnly"]) == (before["text"], before["notes"], False)


def test_a_workflow_saved_before_the_edit_inputs_still_loads(frontend):
    result = frontend.check("legacy")
    twin = next(w for w in frontend.workflows if w["name"] == STREAM_WORKFLOW)["twin"]
    assert result["missing"] == [] and strip(result["output"]) == strip(twin)


def test_hostile_model_text_stays_text(frontend):
    result = frontend.check("hostile")
    hostile = result["hostile"]
    assert (result["partial"], result["partial_tag"]) == (hostile, "TEXTAREA")
    assert (result["value"], result["tag"]) == (hostile, "TEXTAREA")
    assert result["notes"].split("\n") == ["source: " + hostile, hostile]
    assert result["other_value"] == hostile
    assert not result["injected"] and result["pwned"] is None
    assert not result["host_text_preview"]  # the host's progress-text widget (HTML in 1.27) is never used


@pytest.mark.parametrize("family, max_new_tokens, boundary", [
    ("llama3", 200, "end token"),  # the tiny Llama-3 ends its first (source) caption with an end token
    ("vicuna", 4, "max_new_tokens"),  # both captions stop at the limit
])
def test_the_running_answer_splits_the_editing_turns(tmp_path, original_tokenizers, family, max_new_tokens,
                                                     boundary):
    """The live text of an editing run: two turns, split where the decode loop stopped the first one, each
    decoded as the original tokenizer decodes it (transformers 4.41), the last equal to the reply's tokens."""
    import torch
    from llmga_core.mllm import load_mllm
    from llmga_core.mllm.streaming import RunningAnswer
    from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower

    folder = make_mllm_folder(tmp_path / "LLM", family)
    make_vision_tower(folder / host.VISION_TOWER)
    mllm = load_mllm(folder, dtype=torch.float32)
    image = torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0))
    seen, running = [], RunningAnswer(mllm, max_new_tokens)

    def on_token(step, token_id):
        seen.append(token_id)
        running.add(token_id)

    reply = mllm.generate("Make it snowy.", task="editing", image=image, max_new_tokens=max_new_tokens,
                          on_token=on_token)
    first, second = running.turns
    assert first + second == seen and second == reply.token_ids
    end_ids = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    end_ids = set(end_ids if isinstance(end_ids, list) else [end_ids])
    if boundary == "end token":
        assert first[-1] in end_ids and len(first) < max_new_tokens
    else:
        assert len(first) == max_new_tokens and first[-1] not in end_ids
    expected = [original_tokenizers.decode(folder, ids).strip() for ids in running.turns]
    assert running.texts() == expected
    assert expected[0] == reply.conversation.messages[1][1]  # the source caption as the conversation stores it


def test_api_clients_set_the_edit_directly(frontend):
    """Without the frontend: edited_prompt alone replaces the prompt output; bound to another answer it is
    dropped; the MLLM does not generate again for either."""
    server = frontend.server
    watch = host.ProgressWatch(server)
    workflow = host.shipped_workflow(STREAM_WORKFLOW)
    gen = next(nid for nid, n in workflow.items() if n["class_type"] == GENERATOR)
    workflow[gen]["inputs"]["instruction"] = "an API client's boat"
    first = server.run(workflow)
    assert watch.last_progress(first["prompt"][1], gen) is not None  # a new request: generated
    model_prompt = first["outputs"][gen]["prompt"][0]
    workflow[gen]["inputs"]["edited_prompt"] = "my own words"
    applied = server.run(workflow)
    assert applied["outputs"][gen]["prompt"] == ["my own words"] and applied["outputs"][gen]["edit"] == ["applied"]
    workflow[gen]["inputs"]["edited_from"] = "0000000000000000"
    dropped = server.run(workflow)
    assert dropped["outputs"][gen]["prompt"] == [model_prompt] and dropped["outputs"][gen]["edit"] == ["dropped"]
    for entry in (applied, dropped):
        assert gen in executed_nodes(entry) and "1" not in executed_nodes(entry)
        assert watch.last_progress(entry["prompt"][1], gen) is None, "the MLLM generated again"
        assert entry["outputs"][gen]["model_prompt"] == [model_prompt]
    # greedy: another seed is generated again (the memory keeps the seed) but is the same answer, so the edit
    # bound to it still applies
    answer = first["outputs"][gen]["answer_id"][0]
    workflow[gen]["inputs"].update(edited_from=answer, seed=workflow[gen]["inputs"]["seed"] + 1)
    reseeded = server.run(workflow)
    assert watch.last_progress(reseeded["prompt"][1], gen) is not None
    assert reseeded["outputs"][gen]["answer_id"] == [answer] and reseeded["outputs"][gen]["edit"] == ["applied"]
    assert reseeded["outputs"][gen]["model_prompt"] == [model_prompt]
