"""The MLLM's language model on llama.cpp's llama-server (connect_mllm), against the in-process model.

Every family is exported by `llmga_core.export.write_gguf` and served by a real llama-server on 127.0.0.1 with an
API key (tests/fixtures/llama_server.py; .ci/build_llama_server.sh builds it). The in-process float32 model is the
reference: the served float32 GGUF, with llama.cpp's flash attention off and a float32 KV cache (its CPU flash
attention rounds through float16), must give the same token ids over two turns; the repetition penalty of Qwen2's
generation_config.json must cover the generated ids only, as in the original.
"""
from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import pytest

from llmga_core.mllm import MLLMInputError, MLLMServerError, connect_mllm, load_mllm
from llmga_core.mllm.model import FP16_ROTARY_FAMILIES
from llmga_core.mllm.tokenization import tokenizer_image_token
from tests.fixtures.llama_server import LlamaServer, free_port
from tests.fixtures.tiny_mllm import FAMILIES, make_cn_mllm_folder, make_mllm_folder, make_vision_tower

KEY = "llmga-test-key"
EXACT = ("-fa", "off", "-ctk", "f32", "-ctv", "f32")  # float32 all through, as the in-process reference


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    make_vision_tower(root / "clip-vit-large-patch14-336")
    return root


@pytest.fixture(scope="module")
def folders(root):
    return {family: make_mllm_folder(root, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def ggufs(root, folders):
    from llmga_core.export import write_gguf

    out = {}
    for family, folder in folders.items():
        out[family] = root / f"{family}-f32.gguf"
        write_gguf(folder, out[family], dtype="f32")
    return out


@pytest.fixture(scope="module")
def local(folders, root):
    """The in-process float32 model; for Mistral and Qwen2 without the original's float16 rounding of the rotary
    cos/sin, which llama-server cannot do (their served replies say "approximate", tested below)."""
    cache = {}

    def get(family):
        if family not in cache:
            mllm = load_mllm(folders[family], vision_tower=root / "clip-vit-large-patch14-336")
            if family in FP16_ROTARY_FAMILIES:
                for module in mllm.model.language_model.modules():
                    if type(module).__name__.endswith("RotaryEmbedding"):
                        module._forward_hooks.clear()
            cache[family] = mllm
        return cache[family]
    return get


@pytest.fixture(scope="module")
def servers(ggufs):
    """One llama-server per family, started on first use, all stopped at the end of the module."""
    started = {}

    def get(family):
        if family not in started:
            started[family] = LlamaServer(ggufs[family], api_key=KEY, parallel=2, extra=EXACT).start()
        return started[family]
    yield get
    for server in started.values():
        server.stop()


def _two_turns(model, family):
    first = model.generate("a red fox in the snow at dawn", task="text-to-image", max_new_tokens=40)
    second = model.generate("make it a night scene with stars", conversation=first.conversation,
                            max_new_tokens=40)
    return first, second


@pytest.mark.parametrize("family", FAMILIES)
def test_served_greedy_tokens_equal_the_in_process_model_over_two_turns(family, folders, local, servers):
    remote = connect_mllm(folders[family], servers(family).base_url, api_key=KEY)
    expected = _two_turns(local(family), family)
    got = _two_turns(remote, family)
    for turn, (want, have) in enumerate(zip(expected, got), 1):
        assert have.token_ids == want.token_ids, f"{family} turn {turn}"
        assert have.response == want.response
        assert have.prompt == want.prompt
    assert got[1].conversation.messages == expected[1].conversation.messages
    approximate = [n for n in got[0].notes + got[1].notes if "approximate" in n]
    if family in FP16_ROTARY_FAMILIES:
        assert len(approximate) == 2 and "rounds its cos/sin through float16" in approximate[0]
    else:
        assert approximate == []


def test_the_penalty_covers_the_generated_ids_only(folders, local, servers):
    """Qwen2's generation_config has repetition_penalty 1.1. The served tokens equal the in-process ones (above);
    here the same server, with its penalty window over the prompt too (llama-server's default), gives other
    tokens, and the in-process model without the penalty gives others again: the test above would notice either."""
    family = "qwen2"
    TEXT = "snow snow snow, the snow of a snowy snow day"  # words the prompt repeats
    mllm = local(family)
    assert mllm._sampling.repetition_penalty == pytest.approx(1.1)
    remote = connect_mllm(folders[family], servers(family).base_url, api_key=KEY)
    want = remote.generate(TEXT, task="text-to-image", max_new_tokens=64).token_ids
    assert want == mllm.generate(TEXT, task="text-to-image", max_new_tokens=64).token_ids
    prompt = mllm.new_conversation().prompt("Generate an image based on given keywords. " + TEXT)
    ids = tokenizer_image_token(prompt, mllm.tokenizer)
    whole_window = []
    for _ in range(len(want)):
        reply = remote.client.request("POST", "/completion", {
            "prompt": ids + whole_window, "n_predict": 1, "cache_prompt": True, "return_tokens": True,
            "samplers": ["penalties", "top_k"], "top_k": 1, "repeat_penalty": 1.1, "repeat_last_n": len(ids) + len(whole_window)})
        whole_window.append(reply["tokens"][0])
    assert whole_window != want
    mllm._sampling.repetition_penalty = 1.0
    try:
        plain = mllm.generate(TEXT, task="text-to-image", max_new_tokens=64).token_ids
    finally:
        mllm._sampling.repetition_penalty = 1.1
    assert plain != want


def test_sampling_is_seeded_and_says_it_is_approximate(folders, servers):
    remote = connect_mllm(folders["vicuna"], servers("vicuna").base_url, api_key=KEY)
    runs = [remote.generate("a castle", task="text-to-image", temperature=0.9, seed=s, max_new_tokens=24)
            for s in (3, 3, 4)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids
    assert any("approximate" in n and "seed 3" in n for n in runs[0].notes)


def test_image_tasks_are_refused_in_one_sentence_naming_the_local_loader(folders, servers):
    import torch

    remote = connect_mllm(folders["vicuna"], servers("vicuna").base_url, api_key=KEY)
    image = torch.rand(32, 32, 3)
    for task in ("similar-image", "editing", "chat"):
        with pytest.raises(MLLMInputError) as e:
            remote.generate("make it blue", task=task, image=image)
        assert "load_mllm" in str(e.value) and "LLMGA MLLM Loader" in e.value.for_graph()
        assert str(e.value).count(". ") == 0  # one sentence


def test_a_wrong_key_is_refused_and_the_right_one_works(folders, servers):
    url = servers("vicuna").base_url
    with pytest.raises(MLLMServerError, match=r"refused the API key \(401 Unauthorized\)"):
        connect_mllm(folders["vicuna"], url, api_key="not-the-key")
    with pytest.raises(MLLMServerError, match="refused the API key"):
        connect_mllm(folders["vicuna"], url)
    assert connect_mllm(folders["vicuna"], url, api_key=KEY).served_model == "llmga"


def test_a_server_of_another_model_is_refused(folders, root, servers):
    # another vocabulary (Qwen2's folder against Llama-3's server)
    with pytest.raises(MLLMServerError, match=r"vocabulary of \d+ tokens, but .* has \d+: it serves another model"):
        connect_mllm(folders["qwen2"], servers("llama3").base_url, api_key=KEY)
    # the same vocabulary size, other pieces: Vicuna's tokenizer trained with Chinese text padded to the size
    cn = make_cn_mllm_folder(root / "cn", "vicuna")
    with pytest.raises(MLLMServerError) as refused:
        connect_mllm(cn, servers("vicuna").base_url, api_key=KEY)
    assert re.search(r"(tokenizes differently|vocabulary of \d+ tokens).*serve that GGUF\.$", str(refused.value))


def test_a_tokenizer_that_gives_other_ids_is_refused(folders, servers, tmp_path):
    """The same vocabulary, other ids for the probe: Vicuna's folder with a tokenizer_config that adds no BOS."""
    import json
    import shutil

    copy = tmp_path / "llmga-vicuna-7b-v1.5-no-bos"
    shutil.copytree(folders["vicuna"], copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(MLLMServerError, match=r"tokenizes differently from llmga-vicuna-7b-v1\.5-no-bos \(a probe text "
                                              r"gave other ids\), so it serves another model or tokenizer;"):
        connect_mllm(copy, servers("vicuna").base_url, api_key=KEY)


def test_a_served_model_name_that_is_not_served_lists_the_served_ones(folders, servers):
    with pytest.raises(MLLMServerError, match=r"does not serve 'llava' \(it serves 'llmga'\)"):
        connect_mllm(folders["vicuna"], servers("vicuna").base_url, model="llava", api_key=KEY)


def test_a_server_that_is_down_or_silent_is_one_sentence(folders):
    port = free_port()
    with pytest.raises(MLLMServerError, match=r"Cannot reach the MLLM server at http://127\.0\.0\.1:\d+ "):
        connect_mllm(folders["vicuna"], f"http://127.0.0.1:{port}")
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(MLLMServerError, match=r"did not answer the model list within 1 s"):
            connect_mllm(folders["vicuna"], url, timeout=1)


def test_killed_mid_answer_then_restarted_the_next_answer_is_exact(folders, ggufs, local):
    expected = local("vicuna").generate("a lighthouse", task="text-to-image", max_new_tokens=30)
    server = LlamaServer(ggufs["vicuna"], api_key=KEY, extra=EXACT).start()
    try:
        remote = connect_mllm(folders["vicuna"], server.base_url, api_key=KEY)

        def kill_at_five(step, token_id):
            if step == 5:
                server.kill()
        with pytest.raises(MLLMServerError) as e:
            remote.generate("a lighthouse", task="text-to-image", max_new_tokens=30, on_token=kill_at_five)
        assert re.search(r"(Cannot reach|closed the connection|failed during).*\(5 tokens of the answer had "
                         r"arrived\.\)$", str(e.value)), str(e.value)
        restarted = LlamaServer(ggufs["vicuna"], api_key=KEY, extra=EXACT, port=server.port).start()
        try:
            again = remote.generate("a lighthouse", task="text-to-image", max_new_tokens=30)
        finally:
            restarted.stop()
    finally:
        server.stop()
    assert again.token_ids == expected.token_ids


def test_cancel_stops_at_the_next_token_and_the_server_serves_on(folders, servers, local):
    remote = connect_mllm(folders["vicuna"], servers("vicuna").base_url, api_key=KEY)
    seen = []

    class Cancelled(Exception):
        pass

    def cancel_at_three(step, token_id):
        seen.append(token_id)
        if step == 3:
            raise Cancelled
    with pytest.raises(Cancelled):
        remote.generate("a harbour", task="text-to-image", max_new_tokens=30, on_token=cancel_at_three)
    assert len(seen) == 3
    expected = local("vicuna").generate("a harbour", task="text-to-image", max_new_tokens=30)
    assert seen == expected.token_ids[:3]
    assert remote.generate("a harbour", task="text-to-image", max_new_tokens=30).token_ids == expected.token_ids


def test_a_prompt_longer_than_a_server_slot_is_refused_before_any_request(folders, ggufs):
    with LlamaServer(ggufs["vicuna"], api_key=KEY, context=256, extra=EXACT) as server:  # its smallest context
        remote = connect_mllm(folders["vicuna"], server.base_url, api_key=KEY)
        assert remote.context == 256
        with pytest.raises(MLLMServerError, match=r"does not fit the 256 positions of one slot"):
            remote.generate("a red fox", task="text-to-image", max_new_tokens=250)


def test_concurrent_clients_on_one_server_each_get_the_in_process_tokens(folders, servers, local):
    """Four threads (as four ComfyUI workers) share one two-slot server, each with its own connection."""
    url = servers("qwen2").base_url
    instructions = ["a red fox", "a blue whale", "a green forest", "a yellow taxi"]
    expected = {i: local("qwen2").generate(i, task="text-to-image", max_new_tokens=32).token_ids
                for i in instructions}
    results, errors = {}, []

    def work(instruction):
        try:
            remote = connect_mllm(folders["qwen2"], url, api_key=KEY)
            results[instruction] = remote.generate(instruction, task="text-to-image", max_new_tokens=32).token_ids
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in instructions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == expected


def test_a_server_that_is_not_llama_server_is_refused(folders):
    """An OpenAI-compatible server of another engine (here a minimal one answering /v1/models as vLLM does)."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class VLLMModels(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "llmga", "object": "model",
                                                           "owned_by": "vllm"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), VLLMModels)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(MLLMServerError, match=r"serves 'llmga' with vllm, not llama\.cpp's llama-server"):
            connect_mllm(folders["vicuna"], f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_a_base_url_that_is_not_http_is_refused(folders):
    with pytest.raises(ValueError, match="is not an http"):
        connect_mllm(folders["vicuna"], "ftp://127.0.0.1:8080")
    assert Path(folders["vicuna"]).is_dir()
