"""LLMGA Remote MLLM in real ComfyUI servers: two workers share one llama-server.

The shipped text-to-image workflow with its loader swapped for LLMGA Remote MLLM runs on two ComfyUI servers at
once against one llama-server (API key in an environment variable the node names); both show the prompt the
in-process model writes. A missing key variable and a stopped llama-server are one sentence each, and the worker
serves the next prompt.
"""
from __future__ import annotations

import threading

import pytest

from tests import host
from tests.fixtures.llama_server import LlamaServer
from tests.host import ComfyServer, execution_error, shipped_workflow

pytestmark = pytest.mark.host

KEY = "llmga-host-test-key"
KEY_VARIABLE = "LLMGA_TEST_MLLM_KEY"
MODEL = "llmga-vicuna-7b-v1.5-full-finetune"
EXACT = ("-fa", "off", "-ctk", "f32", "-ctv", "f32")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return [host.models_base(tmp_path_factory.mktemp(f"remote_worker{i}")) for i in range(2)]


@pytest.fixture(scope="module")
def llama_server(bases, tmp_path_factory):
    from llmga_core.export import write_gguf

    gguf = tmp_path_factory.mktemp("gguf") / "vicuna-f32.gguf"
    write_gguf(bases[0] / "models" / "LLM" / MODEL, gguf, dtype="f32")
    server = LlamaServer(gguf, api_key=KEY, parallel=2, extra=EXACT).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workers(bases):
    env = dict(host.ONE_THREAD, **{KEY_VARIABLE: KEY})
    servers = [ComfyServer(base, env=env) for base in bases]
    threads = [threading.Thread(target=s.start) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield servers
    for s in servers:
        s.stop()


def remote_workflow(base_url: str, instruction: str, key_variable: str = KEY_VARIABLE) -> dict:
    workflow = shipped_workflow("llmga_t2i_sd15")
    loader = next(k for k, n in workflow.items() if n["class_type"] == "LLMGAMLLMLoader")
    workflow[loader] = {"class_type": "LLMGARemoteMLLM",
                        "inputs": {"model_name": workflow[loader]["inputs"]["model_name"], "base_url": base_url,
                                   "served_model": "", "api_key_env": key_variable, "timeout": 60.0}}
    generator = next(k for k, n in workflow.items() if n["class_type"] == "LLMGAPromptGenerator")
    workflow[generator]["inputs"]["instruction"] = instruction
    return workflow


def shown_prompt(entry: dict, workflow: dict) -> str:
    generator = next(k for k, n in workflow.items() if n["class_type"] == "LLMGAPromptGenerator")
    return entry["outputs"][generator]["prompt"][0]


def test_two_workers_share_one_llama_server_and_show_the_in_process_prompts(workers, llama_server, bases):
    from llmga_core.mllm import load_mllm

    instructions = ["a red fox in the snow", "a lighthouse at night"]
    local = load_mllm(bases[0] / "models" / "LLM" / MODEL,
                      vision_tower=bases[0] / "models" / "clip_vision" / "clip-vit-large-patch14-336")
    workflows = [remote_workflow(llama_server.base_url, text) for text in instructions]
    prompt_ids = [worker.queue(w) for worker, w in zip(workers, workflows)]  # both queued before either ends
    for worker, workflow, prompt_id, text in zip(workers, workflows, prompt_ids, instructions):
        entry = worker.wait(prompt_id)
        assert execution_error(entry) is None, execution_error(entry)
        want = local.generate(text, task="text-to-image", max_new_tokens=12)
        assert shown_prompt(entry, workflow) == want.prompt


def test_a_missing_key_variable_and_a_stopped_server_are_one_sentence_and_the_worker_lives_on(workers, llama_server,
                                                                                             bases):
    worker = workers[0]
    entry = worker.run(remote_workflow(llama_server.base_url, "a harbour", key_variable="LLMGA_NOT_SET_ANYWHERE"))
    error = execution_error(entry)
    assert error is not None
    assert error["exception_message"].startswith("The environment variable LLMGA_NOT_SET_ANYWHERE (api_key_env) is "
                                                 "not set in ComfyUI's environment;")
    entry = worker.run(remote_workflow("http://127.0.0.1:9", "a harbour"))
    error = execution_error(entry)
    assert error is not None and error["exception_message"].startswith(
        "Cannot reach the MLLM server at http://127.0.0.1:9 (")
    assert worker.alive()
    entry = worker.run(remote_workflow(llama_server.base_url, "a harbour"))
    assert execution_error(entry) is None
