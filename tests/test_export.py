"""llmga_core.export: the MLLM's language model written for inference engines, for every family.

The transformers folder must give the logits of the pack's own language model. The GGUF, served by llama.cpp's
llama-server (tests/fixtures/llama_server.py), must tokenize as the pack does and decode greedily the tokens of a
plain argmax loop over the pack's language model: exactly in f32. In f16 and q8_0 the rounding of weights and
activations moves the logits of these tiny random models (weights of std 0.5) enough to flip close choices, so
there the figures are printed; f16 must give exactly the tokens of the pack's model with its weights and the
inputs of its linear layers rounded to float16, as llama.cpp's CPU kernels round them, and every file is checked
tensor for tensor against what llama.cpp's own converter (convert_hf_to_gguf.py of the sources llama-server was
built from) writes for the exported transformers folder.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  before the fixtures build models under torch.device("meta") (torch 2.6)

from llmga_core.export import write_gguf, write_language_model
from llmga_core.mllm import Conversation, load_mllm
from llmga_core.mllm.tokenization import tokenizer_image_token
from tests.fixtures.llama_server import LlamaServer
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, make_mllm_folder, make_vision_tower

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 24
TEXTS = ("A chat between a curious human and an artificial intelligence assistant.",
         "a red fox sitting in the snow at dawn, cinematic, golden hour",
         "Hello, how are you? I'm fine, thanks. There are 3 dogs and 1234567 cats!")
# llama.cpp ends generation at the GGUF's eos id and at the tokens with these texts
EOG_TEXTS = {"</s>", "<|endoftext|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>",
             "<eos>", "<|eom_id|>"}
MATCHES: dict[tuple[str, str], str] = {}  # (family, dtype) → "n/24 ..." for the printed table


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-models")
    for family in FAMILIES:
        make_mllm_folder(root, family)
    make_vision_tower(root / "clip-vit-large-patch14-336")
    return root


@pytest.fixture(scope="module")
def pack_models(model_root):
    """family → the pack's MLLM in float32 with its rotary fp16 rounding hooks removed (see plain_language_model)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_mllm(model_root / RELEASED_NAMES[family])
            plain_language_model(cache[family])
        return cache[family]

    return get


@pytest.fixture(scope="module", autouse=True)
def match_table():
    yield
    if MATCHES:
        lines = [f"{family:7s} {dtype:5s} {text}" for (family, dtype), text in sorted(MATCHES.items())]
        print("\ngreedy tokens of llama-server equal to the pack's (of 24):\n" + "\n".join(lines))


def plain_language_model(mllm):
    """The pack rounds Mistral's and Qwen2's rotary cos/sin through float16 when not running in float16 (the
    original built them in float16 at load; model.py `_round_through_fp16`). That rounding is no part of the
    weights, so neither a transformers folder nor a GGUF can carry it, and an engine computes cos/sin in full
    precision; the exports are compared with the language model without it."""
    for module in mllm.model.language_model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module._forward_hooks.clear()
    return mllm.model.language_model


# the first prompt runs 24 tokens without an end token in every family; the second ends early for Qwen2 (<|im_end|>)
PROMPTS = ("Describe the following image.", "Give me an image about a cat on a wooden cabin roof.")


def rounded_like_llama_cpp_f16(lm):
    """A copy of the language model as an f16 GGUF runs on llama.cpp's CPU backend: weights stored in float16 (the
    embedding too, which is also the head when tied), and the activations converted to float16 before every matrix
    product with them; norms, sums and the rest in float32."""
    lm = copy.deepcopy(lm)
    for module in lm.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data = module.weight.data.half().float()
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (args[0].half().float(),) + args[1:])
    return lm


def prompt_ids(mllm, text: str = PROMPTS[0]) -> list[int]:
    return tokenizer_image_token(Conversation(mllm.template).prompt(text), mllm.tokenizer)


def plain_ids(tokenizer, text: str) -> list[int]:
    """`tokenizer(text, add_special_tokens=False)`: the pack's encode without the BOS its tokenizer adds."""
    ids = tokenizer.encode(text)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def greedy(lm, ids: list[int], steps: int) -> list[int]:
    """Argmax decoding without a cache or any penalty, in float32."""
    sequence = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = lm(input_ids=torch.tensor([sequence])).logits[0, -1].float()
            sequence.append(int(logits.argmax()))
    return sequence[len(ids):]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


# ------------------------------------------------------------------------------------- transformers folder
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_folder_gives_the_pack_logits(model_root, pack_models, tmp_path, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = model_root / RELEASED_NAMES[family]
    mllm = pack_models(family)
    out = write_language_model(folder, tmp_path / "lm")
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if k.startswith("mm_")] and "auto_map" not in config
    assert config["model_type"] == {"vicuna": "llama", "llama2": "llama", "llama3": "llama"}.get(family, family)
    assert config["vocab_size"] == len(mllm.tokenizer)
    assert (out / "generation_config.json").read_bytes() == (folder / "generation_config.json").read_bytes()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json"):
        assert (out / name).is_file() == (folder / name).is_file()
        if (folder / name).is_file():
            assert (out / name).read_bytes() == (folder / name).read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        embed = handle.get_tensor("model.embed_tokens.weight")
        assert not any(k.startswith(("model.mm_projector", "model.vision_tower")) for k in handle.keys())
    assert embed.dtype == torch.bfloat16 and embed.shape[0] == len(mllm.tokenizer)

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert exported.get_input_embeddings().weight.shape[0] == len(mllm.tokenizer)
    ids = torch.tensor([prompt_ids(mllm)])
    with torch.inference_mode():
        expected = mllm.model.language_model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if family in ("mistral", "qwen2"):  # as the pack runs them, with cos/sin rounded through float16: close
        from llmga_core.mllm.model import _round_through_fp16

        rotary = [m for m in mllm.model.language_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        handles = [m.register_forward_hook(_round_through_fp16) for m in rotary]
        try:
            with torch.inference_mode():
                rounded = mllm.model.language_model(input_ids=ids).logits
        finally:
            for handle in handles:
                handle.remove()
        assert 0 < float((rounded - got).abs().max()) < 0.01 * float(got.abs().max())  # 0.06 of 16 here


# ---------------------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_served_by_llama_server_tokenizes_and_decodes_as_the_pack(model_root, pack_models, tmp_path, family,
                                                                      dtype):
    mllm = pack_models(family)
    tokenizer = mllm.tokenizer
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    end_ids = {i for i, text in enumerate(texts) if text in EOG_TEXTS} | {tokenizer.eos_token_id}
    f16_model = rounded_like_llama_cpp_f16(mllm.model.language_model) if dtype == "f16" else None

    path = write_gguf(model_root / RELEASED_NAMES[family], tmp_path / f"{family}-{dtype}.gguf", dtype=dtype)
    with LlamaServer(path) as server:
        for text in TEXTS:
            served = post(server.base_url + "/tokenize", {"content": text, "add_special": False})["tokens"]
            assert served == plain_ids(tokenizer, text), text
        for number, prompt in enumerate(PROMPTS):
            ids = prompt_ids(mllm, prompt)
            expected = greedy(mllm.model.language_model, ids, NEW_TOKENS)
            reply = post(server.base_url + "/completion", {
                "prompt": ids, "n_predict": NEW_TOKENS, "temperature": 0, "repeat_penalty": 1.0,
                "cache_prompt": False, "return_tokens": True, "ignore_eos": False})
            tokens = reply["tokens"]
            same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))
            stopped = len(tokens) < NEW_TOKENS
            if stopped:  # only at one of llama.cpp's end-of-generation tokens
                assert reply["stop_type"] == "eos" and tokens[-1] in end_ids, reply
            if dtype == "f32":
                assert tokens == expected[:len(tokens)], prompt
            if dtype == "f16":
                assert tokens == greedy(f16_model, ids, NEW_TOKENS)[:len(tokens)], prompt
            if number == 0:
                MATCHES[family, dtype] = f"{same:2d}/{NEW_TOKENS}" + (
                    f" (llama.cpp stopped at end token {tokens[-1]} after {len(tokens)})" if stopped else "")
                print(f"{family} {dtype}: {MATCHES[family, dtype]}")


# ------------------------------------------------------------------------- against llama.cpp's own converter
CONVERT = r"""
import json, runpy, sys
source, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [source + "/gguf-py", source]
import conversion.base
for pre, folder, dtype, out in jobs:
    # the tiny byte-level BPE tokenizers are not in the converter's list of known pre-tokenizer hashes
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer, pre=pre: pre
    sys.argv = [source + "/convert_hf_to_gguf.py", folder, "--outtype", dtype, "--outfile", out]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
# deliberate differences from the converter's metadata (besides general.*, which names and describes the file):
# Phi-3's tokenizer adds no BOS as the original's LlamaTokenizerFast rebuilt its post-processor from
# add_bos_token=false, while the converter reads tokenizer.json's post-processor
DIFFERENT = {("phi3", "tokenizer.ggml.add_bos_token")}


def llama_cpp_sources() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmga-comfyui" / "llama.cpp"
    version = (cache / "version").read_text().strip() if (cache / "version").is_file() else "?"
    source = cache / f"src-{version}" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"llama.cpp's sources are not at {source}; build llama-server with `bash "
                    ".ci/build_llama_server.sh`, which keeps them.", pytrace=False)
    return source


def test_gguf_equals_what_llama_cpp_converter_writes(model_root, tmp_path):
    import gguf

    jobs, ours = [], {}
    for family in FAMILIES:
        plain = write_language_model(model_root / RELEASED_NAMES[family], tmp_path / family)
        pre = {"qwen2": "qwen2", "llama3": "llama-bpe"}.get(family, "-")
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            ours[family, dtype] = write_gguf(model_root / RELEASED_NAMES[family], tmp_path / f"{family}-{dtype}.gguf",
                                             dtype=dtype)
            jobs.append([pre, str(plain), dtype, str(tmp_path / f"{family}-{dtype}.converted.gguf")])
    run = subprocess.run([sys.executable, "-c", CONVERT, str(llama_cpp_sources()), json.dumps(jobs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for (family, dtype), path in ours.items():
        mine, theirs = gguf.GGUFReader(path), gguf.GGUFReader(path.with_suffix(".converted.gguf"))
        tensors = {t.name: t for t in theirs.tensors}
        assert sorted(t.name for t in mine.tensors) == sorted(tensors), (family, dtype)
        for tensor in mine.tensors:
            other = tensors[tensor.name]
            assert tensor.tensor_type == other.tensor_type, (family, dtype, tensor.name)
            assert list(tensor.shape) == list(other.shape) and bytes(tensor.data) == bytes(other.data), \
                (family, dtype, tensor.name)
        for key in sorted(set(mine.fields) & set(theirs.fields)):
            if key.startswith(("GGUF.", "general.")) or (family, key) in DIFFERENT:
                continue
            assert mine.fields[key].contents() == theirs.fields[key].contents(), (family, dtype, key)
        for family_, key in DIFFERENT:
            if family_ == family:
                assert mine.fields[key].contents() != theirs.fields[key].contents()


# ---------------------------------------------------------------------------------------------------- CLI
def test_command_line_writes_both_and_refuses_other_folders(model_root, tmp_path):
    folder = model_root / RELEASED_NAMES["qwen2"]
    command = [sys.executable, "-m", "llmga_core.export"]
    run = subprocess.run(command + [str(folder), "--gguf", str(tmp_path / "q.gguf"), "--dtype", "q8_0"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "q.gguf").read_bytes()[:4] == b"GGUF"
    run = subprocess.run(command + [str(folder), "--transformers", str(tmp_path / "lm")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]

    plain = tmp_path / "plain-llm"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    run = subprocess.run(command + [str(plain), "--gguf", str(tmp_path / "x.gguf")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an LLMGA MLLM folder" in lines[0], run.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_python_errors_are_one_sentence(model_root, tmp_path, monkeypatch):
    folder = model_root / RELEASED_NAMES["qwen2"]
    with pytest.raises(ValueError, match=r"^dtype 'q4_0' is not one of f32, f16, bf16, q8_0; pick one of them\.$"):
        write_gguf(folder, tmp_path / "x.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="is the MLLM folder itself"):
        write_language_model(folder, folder)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"^Writing GGUF needs the gguf package: pip install gguf$"):
        write_gguf(folder, tmp_path / "x.gguf")
