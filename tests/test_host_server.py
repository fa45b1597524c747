"""The pack inside a real ComfyUI server (../shared/host) on 127.0.0.1, driven through its HTTP API.

One server for the module, with tiny models in the released folder layouts under its base directory.
Every shipped API workflow runs to an image; the UI workflows convert to exactly their API twins.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import host
from tests.host import HOST_VERSIONS, REPO, ComfyServer, host_version, small_workflow
from tests.workflow_format import UI_ONLY_TYPES, render_ui, ui_to_api

WORKFLOWS = REPO / "workflows"
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
PACK_NODES = {"LLMGAMLLMLoader", "LLMGARemoteMLLM", "LLMGAPromptGenerator", "LLMGALongCLIPTextEncode", "LLMGACheckpointLoader",
              "DiffRIRLoader", "DiffRIRRestore", "LLMGAEdit", "LLMGADownloadModel"}
SIMILAR_IMAGE = "llmga_similar_example.png"  # what the similar-image workflows load
EDIT_IMAGE = "llmga_edit_example.png"  # what the editing workflow loads (not square: cropped as the original)


def write_input_images(input_dir: Path) -> None:
    """RGBA test pictures: LoadImage turns transparent pixels into mask = 1 (the region to fill)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (64, 64, 3)), np.full((64, 64, 1), 255)], axis=2).astype("uint8")
    rgba[16:40, 20:48, 3] = 0
    input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(input_dir / "llmga_inpaint_example.png")
    Image.fromarray(rgba[:, :, :3], "RGB").save(input_dir / "llmga_outpaint_example.png")
    # not square, so the MLLM's stretch to a square is exercised
    Image.fromarray(rng.integers(0, 256, (48, 64, 3)).astype("uint8"), "RGB").save(input_dir / SIMILAR_IMAGE)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3)).astype("uint8"), "RGB").save(input_dir / EDIT_IMAGE)


@pytest.fixture(scope="module")
def models_base(tmp_path_factory):
    base = host.models_base(tmp_path_factory.mktemp("comfy_base"))  # the tiny models every workflow names
    write_input_images(base / "input")
    return base


@pytest.fixture(scope="module")
def server(models_base):
    srv = ComfyServer(models_base, env=host.ONE_THREAD).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_pack_imports_cleanly_and_lists_its_nodes(server, object_info):
    log = server.log()
    pack_failures = [line for line in log.splitlines()
                     if "comfyui-llmga" in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not pack_failures and "Error while calling comfy_entrypoint" not in log, log[-3000:]
    missing = PACK_NODES - set(object_info)
    assert not missing, f"nodes not registered: {missing}"
    for node_id in PACK_NODES:
        assert object_info[node_id]["python_module"] == "custom_nodes.comfyui-llmga"
    options = lambda node: object_info[node]["input"]["required"]["model_name"][1]["options"]  # noqa: E731
    assert options("LLMGAMLLMLoader") == sorted(host.MLLM_MODELS)
    assert set(host.SD_MODELS) <= set(options("LLMGACheckpointLoader"))
    assert options("DiffRIRLoader") == ["DiffRIR_x1.pth"]


def test_web_extension_is_served(server):
    listed = server.get("/extensions")
    assert "/extensions/comfyui-llmga/js/llmga_text.js" in listed


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs_to_an_image(server, models_base, path):
    workflow = small_workflow(json.loads(path.read_text()))
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved, entry["outputs"]
    for img in saved:
        png = models_base / "output" / img["subfolder"] / img["filename"]
        assert png.is_file() and png.stat().st_size > 0
    generators = [nid for nid, n in workflow.items() if n["class_type"] == "LLMGAPromptGenerator"]
    for nid in generators:
        assert entry["outputs"][nid]["text"], "the prompt is shown on the node"


def library_mllm(models_base, name):
    from llmga_core.mllm import load_mllm

    return load_mllm(models_base / "models" / "LLM" / name,
                     vision_tower=models_base / "models" / "clip_vision" / "clip-vit-large-patch14-336",
                     dtype=__import__("torch").float32)


def shown_text(reply) -> str:
    """What the node shows for a library reply: the prompt, then the notes in brackets."""
    notes = [n if n.endswith((".", "!", "?", ":")) else n + "." for n in reply.notes]  # shown as sentences
    return reply.prompt + ("\n\n[" + " ".join(notes) + "]" if notes else "")


def test_prompt_generator_matches_the_library(server, models_base):
    """The server's greedy prompt for a workflow equals llmga_core's on the same folder."""
    workflow = small_workflow(json.loads((WORKFLOWS / "api" / "llmga_t2i_sd15.json").read_text()))
    entry = server.run(workflow)
    shown = entry["outputs"]["2"]["text"][0]
    mllm = library_mllm(models_base, workflow["1"]["inputs"]["model_name"])
    reply = mllm.generate(workflow["2"]["inputs"]["instruction"], task="text-to-image", max_new_tokens=12)
    assert shown.startswith(reply.prompt)


def test_dialogue_workflow_equals_one_library_conversation(server, models_base):
    """The three chained Prompt Generators of the dialogue workflow show, turn by turn, the prompts of
    one three-turn conversation in llmga_core, and the last one is what gets rendered."""
    workflow = small_workflow(json.loads((WORKFLOWS / "api" / "llmga_dialogue_sd15.json").read_text()))
    turns = ["2", "3", "4"]
    assert [workflow[t]["inputs"].get("conversation") for t in turns] == [None, ["2", 2], ["3", 2]]
    assert workflow["6"]["inputs"]["text"] == ["4", 0]
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    mllm = library_mllm(models_base, workflow["1"]["inputs"]["model_name"])
    conversation = None
    for t in turns:
        inputs = workflow[t]["inputs"]
        reply = mllm.generate(inputs["instruction"], task=inputs["task"], conversation=conversation,
                              max_new_tokens=inputs["max_new_tokens"])
        conversation = reply.conversation
        assert entry["outputs"][t]["text"] == [shown_text(reply)], f"turn of node {t}"
    assert len(conversation.messages) == 2 * 3


@pytest.mark.parametrize("name", ["llmga_similar_sd15", "llmga_similar_sdxl"])
def test_similar_image_workflow_prompt_matches_the_library(server, models_base, name):
    """The prompt the server writes for the loaded picture equals llmga_core's for the same PNG."""
    from PIL import Image

    workflow = small_workflow(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()))
    assert workflow["1"]["inputs"]["image"] == SIMILAR_IMAGE and workflow["3"]["inputs"]["image"] == ["1", 0]
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    mllm = library_mllm(models_base, workflow["2"]["inputs"]["model_name"])
    reply = mllm.generate("", task="similar-image", image=Image.open(models_base / "input" / SIMILAR_IMAGE),
                          max_new_tokens=workflow["3"]["inputs"]["max_new_tokens"])
    assert entry["outputs"]["3"]["text"] == [shown_text(reply)]


def test_bad_input_is_one_clear_error_and_the_server_keeps_serving(server):
    workflow = small_workflow(json.loads((WORKFLOWS / "api" / "llmga_t2i_sd15.json").read_text()))
    workflow["2"]["inputs"]["instruction"] = "   "
    workflow["2"]["inputs"]["seed"] = 12345  # a new cache key
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LLMGAPromptGenerator"
    assert "instruction" in errors[0]["exception_message"].lower()
    # the next prompt still works
    workflow["2"]["inputs"]["instruction"] = "a small boat"
    assert server.run(workflow)["status"]["status_str"] == "success"


def test_model_name_outside_the_model_folders_is_refused(server):
    workflow = small_workflow(json.loads((WORKFLOWS / "api" / "llmga_t2i_sd15.json").read_text()))
    workflow["3"]["inputs"]["model_name"] = "../../etc"
    status, body = server.post("/prompt", {"prompt": workflow, "client_id": server.client_id})
    if status == 400 or body.get("node_errors"):  # refused by the combo check before running
        assert "3" in body["node_errors"]
        return
    entry = server.wait(body["prompt_id"])  # or by the loader itself, in one sentence
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LLMGACheckpointLoader"
    assert "inside the diffusers model folders" in errors[0]["exception_message"]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_equals_its_api_twin(object_info, path):
    twin = WORKFLOWS / "api" / path.name
    assert twin.is_file(), f"{path.name} has no API-format twin in workflows/api/"
    converted = ui_to_api(json.loads(path.read_text()), object_info)
    expected = json.loads(twin.read_text())
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa: E731
    assert strip(converted) == strip(expected)


def test_each_ui_workflow_has_an_id_of_its_own():
    """The frontend keys open tabs and saved copies by workflow id: two shipped files with one id would replace
    each other."""
    ids = {path.stem: json.loads(path.read_text())["id"] for path in UI_WORKFLOWS}
    assert len(set(ids.values())) == len(ids), ids


def test_every_api_workflow_has_a_ui_twin():
    assert {p.name for p in API_WORKFLOWS} == {p.name for p in UI_WORKFLOWS}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_generated_from_its_api_twin(object_info, path):
    """The UI file is what `python -m tests.workflow_format` writes for the current nodes (every output
    socket, e.g. a newly appended one, is in it). The files are written on the newest host; an older host's
    nodes may lack outputs that the newest appended (0.33's SaveImage has an IMAGE output), and there the file
    equals the render but for those unlinked sockets."""
    shipped = path.read_text()
    if host_version() != HOST_VERSIONS[0]:
        workflow = json.loads(shipped)
        for node in (n for n in workflow["nodes"] if n["type"] not in UI_ONLY_TYPES):  # notes: the frontend's own
            declared = len(object_info[node["type"]]["output"])
            assert all(not out["links"] for out in node["outputs"][declared:]), node
            node["outputs"] = node["outputs"][:declared]
        shipped = json.dumps(workflow, indent=2)
    assert shipped == render_ui(WORKFLOWS / "api" / path.name, object_info), \
        f"{path.name} is out of date; run `.venv-comfyui-{HOST_VERSIONS[0]}/bin/python -m tests.workflow_format`"


def test_ui_workflows_are_in_the_template_browser(server):
    """ComfyUI lists the pack's workflows/ folder under the pack's name and serves each file."""
    listed = server.get("/workflow_templates")
    assert sorted(listed["comfyui-llmga"]) == sorted(p.stem for p in UI_WORKFLOWS)  # not the api/ twins
    for path in UI_WORKFLOWS:
        assert server.get(f"/api/workflow_templates/comfyui-llmga/{path.name}") == json.loads(path.read_text())


def test_run_workflow_command_writes_images_and_prompt(server, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmga_core.run_workflow", str(WORKFLOWS / "api" / "llmga_t2i_sd15.json"),
           "--server", server.url, "--out", str(out), "--set", "steps=2", "--set", "width=64",
           "--set", "height=64", "--set", "max_new_tokens=8", "--set", "dtype=float32",
           "--set", "LLMGAPromptGenerator.instruction=a quiet harbour"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(out.glob("*.png")), done.stdout
    assert (out / "prompt_2.txt").read_text().strip() != "" or "prompt_2.txt" in done.stdout


def test_run_workflow_names_missing_models_and_where_they_go(server, tmp_path):
    workflow = json.loads((WORKFLOWS / "api" / "llmga_t2i_sd15.json").read_text())
    workflow["1"]["inputs"]["model_name"] = "llmga-Qwen2-7B-full-finetune"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    done = subprocess.run([sys.executable, "-m", "llmga_core.run_workflow", str(path), "--server", server.url,
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "llmga-Qwen2-7B-full-finetune" in done.stderr
    assert "LLM" in done.stderr and "huggingface.co/binxia/llmga-Qwen2-7B-full-finetune" in done.stderr


def test_run_workflow_refuses_a_ui_workflow(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmga_core.run_workflow", str(UI_WORKFLOWS[0]),
                           "--server", "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "UI workflow" in done.stderr


# The frontend tests (every UI workflow in the real frontend, the prompt on the node) are in tests/test_frontend.py.


def test_inpainting_keeps_preserved_pixels(server, models_base):
    """After DiffRIR the saved image equals the input outside the mask (SaveImage truncates
    255·x to uint8, so a preserved value may read one level lower) and differs inside it."""
    from PIL import Image
    import numpy as np

    workflow = small_workflow(json.loads((WORKFLOWS / "api" / "llmga_inpaint_sd15_diffrir.json").read_text()))
    entry = server.run(workflow)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    img = entry["outputs"]["11"]["images"][0]
    saved = np.asarray(Image.open(models_base / "output" / img["subfolder"] / img["filename"]).convert("RGB"))
    source = np.asarray(Image.open(models_base / "input" / "llmga_inpaint_example.png"))
    hole = source[:, :, 3] == 0
    diff = np.abs(saved.astype(int) - source[:, :, :3].astype(int))
    assert diff[~hole].max() <= 1
    assert diff[hole].mean() > 5


def test_run_workflow_starts_its_own_comfyui(models_base, tmp_path):
    """Without --server the command starts ComfyUI itself on 127.0.0.1, runs, and stops it."""
    from tests.host import comfyui_dir

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmga_core.run_workflow", str(WORKFLOWS / "api" / "llmga_t2i_sdxl.json"),
           "--comfyui", str(comfyui_dir()), "--comfyui-args",
           f"--cpu --base-directory {models_base} --database-url sqlite:///:memory:",
           "--out", str(out), "--set", "steps=2", "--set", "width=64", "--set", "height=64",
           "--set", "max_new_tokens=8", "--set", "dtype=float32", "--set", "seed=7"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "comfyui.log").read_text(errors="replace")[-3000:]
    assert "starting ComfyUI" in done.stdout and "running" in done.stdout
    assert list(out.glob("*.png")) and (out / "prompt_2.txt").is_file()
