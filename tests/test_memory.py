"""The MLLM under the host's memory management, in a real ComfyUI server (CPU): ComfyUI's "Free model and node
cache" (POST /free) releases the MLLM's memory, and the next prompt loads it again and answers the same.

The model here is big enough (about 160 MB in float32) for its release to stand out of the server's own
allocations; its vision tower and projector are counted in the size the host manages."""
from __future__ import annotations

import time

import pytest

from tests import host
from tests.host import ComfyServer, executed_nodes, process_rss_bytes

MODEL = "llmga-Qwen2-memory-test"
SIZES = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 2, "tokenizer_size": 32000, "vocab_size": 32000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.fixtures.tiny_mllm import make_mllm_folder

    base = host.models_base(tmp_path_factory.mktemp("memory_base"))
    make_mllm_folder(base / "models" / "LLM", "qwen2", name=MODEL, sizes=SIZES)
    srv = ComfyServer(base, env=host.ONE_THREAD).start()
    yield srv
    srv.stop()


def prompt_graph(seed: int = 0) -> dict:
    return {"m": {"class_type": "LLMGAMLLMLoader", "inputs": {"model_name": MODEL, "dtype": "float32"}},
            "g": {"class_type": "LLMGAPromptGenerator",
                  "inputs": {"mllm": ["m", 0], "task": "text-to-image", "instruction": "a red boat",
                             "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "seed": seed}},
            "s": {"class_type": "PreviewAny", "inputs": {"source": ["g", 0]}}}


def settled_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS after the server has been idle a moment (the worker applies /free between prompts)."""
    time.sleep(seconds)
    return process_rss_bytes(pid)


def test_free_releases_the_mllm_and_the_next_prompt_loads_it_again(server):
    from llmga_core.mllm import load_mllm

    folder = server.base / "models" / "LLM" / MODEL
    mllm = load_mllm(folder, vision_tower=server.base / "models" / "clip_vision" / host.VISION_TOWER)
    size = mllm.size_bytes()
    parts = sum(t.numel() * t.element_size() for module in (mllm.model.language_model, mllm.model.vision_tower,
                                                           mllm.model.mm_projector)
                for t in [*module.parameters(), *module.buffers()])
    assert size == parts > 150e6  # the tower and the projector are in the size the host manages
    del mllm

    before = settled_rss(server.proc.pid, 0.5)
    first = server.run(prompt_graph())
    assert first["status"]["status_str"] == "success", server.log()[-3000:]
    loaded = settled_rss(server.proc.pid)
    assert loaded - before > 0.7 * size, (before, loaded, size)

    status, _ = server.free(unload_models=True, free_memory=True)
    assert status == 200
    deadline = time.time() + 30
    freed = loaded
    while time.time() < deadline and loaded - freed < 0.7 * size:
        freed = settled_rss(server.proc.pid, 1.0)
    assert loaded - freed > 0.7 * size, f"RSS {loaded / 1e6:.0f} MB -> {freed / 1e6:.0f} MB; model {size / 1e6:.0f} MB"

    second = server.run(prompt_graph())
    assert second["status"]["status_str"] == "success"
    assert {"m", "g"} <= executed_nodes(second)  # loaded and generated again, not served from a cache
    assert second["outputs"]["g"]["prompt"] == first["outputs"]["g"]["prompt"]
    assert settled_rss(server.proc.pid) - freed > 0.7 * size
