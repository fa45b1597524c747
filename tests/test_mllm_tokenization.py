"""Tokenizer classes per family and the per-chunk `<image>` tokenization (reference/mllm.md §4, §9, §12)."""
from __future__ import annotations

import json

import pytest

from llmga_core.mllm import load_mllm
from llmga_core.mllm.tokenization import (IMAGE_TOKEN_INDEX, clean_up_spaces_flag, decode_answer, load_tokenizer,
                                          tokenizer_image_token)
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, shared_model_root

VICUNA_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the human's questions. USER: <image>\nGenerate a similar image. "
                 "ASSISTANT:")


@pytest.fixture(scope="module")
def root():
    return shared_model_root()


def tokenizer_of(root, family):
    return load_tokenizer(root / RELEASED_NAMES[family], family)


def test_vicuna_layout_around_the_image(root):
    tok = tokenizer_of(root, "vicuna")
    before, after = VICUNA_PROMPT.split("<image>")
    first, second = tok(before).input_ids, tok(after).input_ids
    assert first[0] == second[0] == tok.bos_token_id == 1
    ids = tokenizer_image_token(VICUNA_PROMPT, tok)
    assert ids == first + [IMAGE_TOKEN_INDEX] + second[1:]  # BOS once, each chunk with its own leading "▁"
    at = ids.index(IMAGE_TOKEN_INDEX)
    # `… ':' '▁', -200, '▁', '<0x0A>', …` (29871, -200, 29871, 13 with the real vocabulary)
    assert tok.convert_ids_to_tokens(ids[at - 2:at]) == [":", "▁"]
    assert tok.convert_ids_to_tokens(ids[at + 1:at + 3]) == ["▁", "<0x0A>"]
    # tokenizing the string at once gives other ids
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != tok(VICUNA_PROMPT.replace("<image>", "")).input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_kept_once_and_chunks_concatenate(root, family):
    tok = tokenizer_of(root, family)
    prompt = "first part <image>\nsecond part"
    first, second = (tok(chunk).input_ids for chunk in prompt.split("<image>"))
    ids = tokenizer_image_token(prompt, tok)
    if first and first[0] == tok.bos_token_id:
        assert ids == first + [IMAGE_TOKEN_INDEX] + second[1:]
    else:  # Qwen2 (no BOS) and Phi-3 (add_bos_token false): chunks joined as they are
        assert family in ("qwen2", "phi3")
        assert ids == first + [IMAGE_TOKEN_INDEX] + second
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenizer_image_token("no image here", tok) == tok("no image here").input_ids


@pytest.mark.parametrize("family,class_name", [
    ("vicuna", "LlamaTokenizer"), ("llama2", "LlamaTokenizer"), ("mistral", "LlamaTokenizer"),
    ("phi3", "LlamaTokenizer"), ("qwen2", "Qwen2Tokenizer"), ("gemma", "GemmaTokenizer"),
    ("llama3", "TokenizersBackend"),
])
def test_tokenizer_class_follows_tokenizer_config(root, family, class_name):
    assert type(tokenizer_of(root, family)).__name__ == class_name


def test_phi3_text_after_special_tokens_keeps_its_prefix_space(root):
    from transformers import AutoTokenizer, PretrainedConfig

    folder = root / RELEASED_NAMES["phi3"]
    text = "<|user|>\nGenerate a similar image.<|end|>\n<|assistant|>\n"
    ours = tokenizer_of(root, "phi3")
    tokens = ours.convert_ids_to_tokens(ours(text).input_ids)
    # rstrip on <|user|> eats the newline; legacy=True keeps "▁" on the following word (the original's ids)
    assert tokens[0] == "<|user|>" and tokens[1].startswith("▁G")
    as_saved = AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig())  # legacy=false as saved
    assert as_saved.convert_ids_to_tokens(as_saved(text).input_ids)[1] == "G"


def test_legacy_setting_of_the_folder_decides_the_space_after_special_tokens(root):
    mistral = tokenizer_of(root, "mistral")  # legacy=true (Mistral-7B-Instruct-v0.2): "▁" after </s>
    vicuna = tokenizer_of(root, "vicuna")  # legacy=false (vicuna-7b-v1.5): none
    assert mistral.convert_ids_to_tokens(mistral("X</s>USER").input_ids)[3:5] == ["</s>", "▁"]
    assert vicuna.convert_ids_to_tokens(vicuna("X</s>USER").input_ids)[3:5] == ["</s>", "U"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_shrinks_to_the_tokenizer_like_resize_token_embeddings(root, family):
    folder = root / RELEASED_NAMES[family]
    config_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    mllm = load_mllm(folder)
    rows = mllm.model.language_model.get_input_embeddings().weight.shape[0]
    head = mllm.model.language_model.get_output_embeddings().weight.shape[0]
    assert rows == head == len(mllm.tokenizer)
    assert (config_vocab > len(mllm.tokenizer)) == (family in ("qwen2", "phi3"))  # the padded released vocabularies
    reply = mllm.generate("hello there", max_new_tokens=16)
    assert max(reply.token_ids) < len(mllm.tokenizer)


def test_clean_up_flag_is_the_folders_else_true(root, tmp_path):
    assert clean_up_spaces_flag(root / RELEASED_NAMES["llama3"]) is True
    assert clean_up_spaces_flag(root / RELEASED_NAMES["qwen2"]) is False
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    assert clean_up_spaces_flag(tmp_path) is True


def test_decode_keeps_special_tokens_and_cleans_spaces_where_the_folder_says(root):
    text = "Hello , world . It 's fine !<|eot_id|>"
    llama3 = tokenizer_of(root, "llama3")  # clean_up_tokenization_spaces: true (applied as transformers 4.41 did)
    ids = llama3(text, add_special_tokens=False).input_ids
    assert decode_answer(llama3, ids, clean_up_spaces_flag(root / RELEASED_NAMES["llama3"])) == \
        "Hello, world. It's fine!<|eot_id|>"
    qwen = tokenizer_of(root, "qwen2")  # false: kept as generated
    ids = qwen(" Hello , world .<|im_end|>").input_ids
    assert decode_answer(qwen, ids, clean_up_spaces_flag(root / RELEASED_NAMES["qwen2"])) == "Hello , world .<|im_end|>"
