"""The headless run command's own logic (the end-to-end runs are in test_host_server.py)."""
from __future__ import annotations

import json

import pytest

from llmga_core import run_workflow as rw
from tests.host import REPO

T2I = REPO / "workflows" / "api" / "llmga_t2i_sd15.json"


def test_set_by_input_name_node_id_class_or_title():
    wf = rw.load_api_workflow(T2I)
    rw.apply_settings(wf, ["steps=3", "2.seed=9", "LLMGAPromptGenerator.instruction=a \"quoted\" boat",
                           "Empty Latent Image.width=640", "cfg=6.5"])
    assert wf["6"]["inputs"]["steps"] == 3 and wf["6"]["inputs"]["cfg"] == 6.5
    assert wf["2"]["inputs"]["seed"] == 9 and wf["6"]["inputs"]["seed"] == 0
    assert wf["2"]["inputs"]["instruction"] == 'a "quoted" boat'
    assert wf["5"]["inputs"]["width"] == 640 and wf["5"]["inputs"]["height"] == 512


def test_set_never_overwrites_a_link_and_says_what_is_wrong():
    wf = rw.load_api_workflow(T2I)
    with pytest.raises(rw.WorkflowError, match="no node has a widget input 'text'"):
        rw.apply_settings(wf, ["text=hello"])  # the long-prompt text is linked to the MLLM's prompt
    with pytest.raises(rw.WorkflowError, match="must look like INPUT=VALUE"):
        rw.apply_settings(wf, ["steps"])


def test_files_that_are_not_api_workflows_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(rw.WorkflowError, match="is not valid JSON"):
        rw.load_api_workflow(bad)
    with pytest.raises(rw.WorkflowError, match="does not exist"):
        rw.load_api_workflow(tmp_path / "missing.json")
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(rw.WorkflowError, match="not an API-format ComfyUI workflow"):
        rw.load_api_workflow(bad)


def test_missing_models_say_where_they_go(tmp_path):
    missing = [("LLMGAMLLMLoader", "llmga-Qwen2-7B-full-finetune", "LLM"),
               ("DiffRIRLoader", "DiffRIR_x2.pth", "diffrir")]
    text = rw.describe_missing(missing, str(tmp_path))
    assert f"{tmp_path}/LLM/llmga-Qwen2-7B-full-finetune" in text
    assert "huggingface.co/binxia/llmga-Qwen2-7B-full-finetune" in text
    assert f"{tmp_path}/diffrir/DiffRIR_x2.pth" in text and "DiffRIR release" in text
    assert f"{tmp_path}/clip_vision/clip-vit-large-patch14-336" in text


def test_download_fetches_released_repos_into_the_model_folders(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, local_dir, **kw: calls.append((repo_id, local_dir)))
    rw.download_models([("LLMGAMLLMLoader", "llmga-gemma-2b-it-full-finetune", "LLM"),
                        ("LLMGACheckpointLoader", "llmga-sdxl-t2i", "diffusers")], tmp_path)
    assert calls == [
        ("binxia/llmga-gemma-2b-it-full-finetune", str(tmp_path / "LLM" / "llmga-gemma-2b-it-full-finetune")),
        ("openai/clip-vit-large-patch14-336", str(tmp_path / "clip_vision" / "clip-vit-large-patch14-336")),
        ("binxia/llmga-sdxl-t2i", str(tmp_path / "diffusers" / "llmga-sdxl-t2i")),
    ]
    with pytest.raises(rw.WorkflowError, match="not on Hugging Face"):
        rw.download_models([("DiffRIRLoader", "DiffRIR_x1.pth", "diffrir")], tmp_path)
