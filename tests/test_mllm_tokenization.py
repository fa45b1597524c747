"""The MLLM tokenizers as the original ran them (transformers 4.41: LLMGA: llmga/llava/model/builder.py picks the
class), and the per-chunk `<image>` tokenization (LLMGA: llmga/llava/mm_utils.py `tokenizer_image_token`).

References, none of which shares code with llmga_core.mllm.tokenization: the original's own stack (transformers
4.41.2 + tokenizers 0.19.1 in a side venv, tests/oracles), the `tokenizers` library reading tokenizer.json, and
`sentencepiece` reading tokenizer.model.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest

from llmga_core.mllm import load_mllm
from llmga_core.mllm.conversation import Conversation
from llmga_core.mllm.tokenization import IMAGE_TOKEN_INDEX, decode_answer, load_tokenizer, tokenizer_image_token
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, shared_model_root

VICUNA_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the human's questions. USER: <image>\nGenerate a similar image. "
                 "ASSISTANT:")
# a Mistral second turn as the template renders it (stored answer "X </s>", then the template's own " </s>")
MISTRAL_TURN2 = ("[INST] <<SYS>>\n\n<</SYS>>\n\nGenerate a similar image. [/INST] a red fox in the snow </s> "
                 "</s><s>[INST] Make it snowy. [/INST]")


@pytest.fixture(scope="module")
def root():
    return shared_model_root()


@pytest.fixture(scope="module")
def variants(root, tmp_path_factory):
    """Every family in the released layout, plus Mistral, Phi-3 and Gemma without tokenizer.json (the conversion
    the original makes from tokenizer.model)."""
    folders = {family: root / RELEASED_NAMES[family] for family in FAMILIES}
    base = tmp_path_factory.mktemp("tokenizer-variants")
    for family in ("mistral", "phi3", "gemma"):
        copy = base / (RELEASED_NAMES[family] + "-no-tokenizer-json")
        shutil.copytree(folders[family], copy, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
        folders[family + "-converted"] = copy
    return folders


def tokenizer_of(root, family):
    return load_tokenizer(root / RELEASED_NAMES[family], family)


# ------------------------------------------------------------------------------- against the original
SPECIAL_TEXTS = ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>",
                 "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<<SYS>>", "<</SYS>>"]
PLAIN_TEXTS = ["Make it snowy.", "a red fox", " sitting", "  in the snow", "\n", "\n\n", " ", "ASSISTANT:", "USER:",
               "The assistant", "é", "雪", "🦊", "\ufffd", "\u2581", "'s", " n't", " .", " ,", "Hello , world", "12345",
               "\t", "ü", "日本語のテキスト", "xxxxx", " <gen_image> a cat </gen_image>", "…"]


def fuzz_texts(n=250, seed=0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "X</s>USER", MISTRAL_TURN2, "<|user|>\nGenerate a similar image.<|end|>\n<|assistant|>\n",
             " Hello", "\u2581Hello", "<s>Hello", " <s> Hello", "a</s> </s><s>[INST] b"]
    texts += ["".join(rng.choice(SPECIAL_TEXTS + PLAIN_TEXTS * 2) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return texts


def fuzz_ids(size: int, special: list[int], n=250, seed=1) -> list[list[int]]:
    """Id lists with special tokens and many byte pieces (ids 3..258 of the SentencePiece models), often invalid
    UTF-8 runs."""
    rng = random.Random(seed)
    pick = lambda: (rng.choice(special) if rng.random() < 0.15 else  # noqa: E731
                    rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(size))
    return [[], [3], [0], [1], [2]] + [[pick() for _ in range(rng.randint(1, 12))] for _ in range(n)]


@pytest.mark.parametrize("variant", [*FAMILIES, "mistral-converted", "phi3-converted", "gemma-converted"])
def test_tokenizer_equals_the_originals_transformers_441(variants, original_tokenizers, variant):
    family = variant.split("-")[0]
    folder = variants[variant]
    ours = load_tokenizer(folder, family)
    texts = fuzz_texts()
    specials = [i for i in range(len(ours)) if ours.convert_ids_to_tokens([i])[0] in SPECIAL_TEXTS + ["<pad>"]]
    id_lists = fuzz_ids(len(ours), specials)
    original = original_tokenizers.ask(folder, original_tokenizers.use_fast(folder), encode=texts, decode=id_lists)
    assert len(ours) == original["len"] and ours.bos_token_id == original["bos"]
    encoded = [ours.encode(text) for text in texts]
    assert [t for t, mine, theirs in zip(texts, encoded, original["encode"]) if mine != theirs] == []
    decoded = [ours.decode(ids) for ids in id_lists]
    assert [(ids, mine, theirs) for ids, mine, theirs in zip(id_lists, decoded, original["decode"])
            if mine != theirs] == []
    expected_class = {"vicuna": "LlamaTokenizer", "llama2": "LlamaTokenizer", "mistral": "LlamaTokenizerFast",
                      "phi3": "LlamaTokenizerFast", "gemma": "GemmaTokenizerFast", "qwen2": "Qwen2TokenizerFast",
                      "llama3": "PreTrainedTokenizerFast"}[family]
    assert original["class"] == expected_class and expected_class in ours.follows


# ------------------------------------------------------------------------------- tokenizer.json as saved
def _saved_pipeline(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_mistral_later_turns_follow_the_saved_tokenizer_json(root):
    folder = root / RELEASED_NAMES["mistral"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["legacy"] is False  # what the class would use
    ours = tokenizer_of(root, "mistral")
    expected = _saved_pipeline(folder).encode(MISTRAL_TURN2).ids  # Prepend("▁") + Replace(" ", "▁") as saved
    assert ours.encode(MISTRAL_TURN2) == expected
    tokens = ours.convert_ids_to_tokens(expected)
    at = tokens.index("<s>", 1)
    assert tokens[at - 1:at + 1] == ["</s>", "<s>"]
    assert tokens[at + 1].startswith("\u2581")  # text after a special token keeps its "▁" (Meta's "▁[" piece)


@pytest.mark.parametrize("family", ["phi3", "gemma", "llama3"])
def test_other_tokenizer_json_families_follow_the_saved_pipeline(root, family):
    folder = root / RELEASED_NAMES[family]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    text = {"phi3": "<|user|>\nPlease make it snowy.<|end|>\n<|assistant|>\nX<|end|><|end|>\n<|user|>\nNow at night",
            "gemma": "<start_of_turn>user\nMake it snowy.<end_of_turn>\n<start_of_turn>model\n",
            "llama3": "<|start_header_id|>user<|end_header_id|>\n\nMake it snowy.<|eot_id|>"}[family]
    saved = _saved_pipeline(folder)
    # the class rebuilds only the BOS/EOS post-processor, from add_bos_token (Phi-3: false; its tokenizer.json adds <s>)
    with_bos = config.get("add_bos_token", True) if family != "llama3" else True
    expected = saved.encode(text, add_special_tokens=with_bos).ids
    ours = tokenizer_of(root, family)
    assert ours.encode(text) == expected
    if family == "phi3":
        assert saved.encode(text).ids[0] == ours.token_to_id("<s>") != expected[0]
        tokens = ours.convert_ids_to_tokens(expected)
        assert tokens[0] == "<|user|>" and tokens[1].startswith("\u2581")  # rstrip eats "\n"; "▁" stays (legacy)


# ------------------------------------------------------------------------------- SentencePiece decoding
def _byte(sp, value: int) -> int:
    return sp.piece_to_id(f"<0x{value:02X}>")


@pytest.mark.parametrize("family", ["vicuna", "llama2"])
def test_slow_families_decode_byte_runs_as_sentencepiece(root, family):
    import sentencepiece as spm

    folder = root / RELEASED_NAMES[family]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = tokenizer_of(root, family)
    word = sp.piece_to_id("\u2581image")
    assert sp.id_to_piece(word) == "\u2581image"
    eos = sp.piece_to_id("</s>")
    cases = {  # ids → the text the original's slow tokenizer decodes (SentencePiece: each undecodable byte alone → U+FFFD)
        (_byte(sp, 0x47), _byte(sp, 0xE6), word): "G\ufffd image",
        (_byte(sp, 0xF6), _byte(sp, 0x14), _byte(sp, 0xE1)): "\ufffd\x14\ufffd",
        (_byte(sp, 0xE9), _byte(sp, 0x9B), _byte(sp, 0xAA), word): "雪 image",  # a valid run stays
        (word, _byte(sp, 0xE9), _byte(sp, 0x9B), eos): "image\ufffd\ufffd</s>",  # cut inside a character
        (word, eos, word): "image</s> image",  # special tokens kept as text
    }
    for ids, text in cases.items():
        assert ours.decode(list(ids)) == text, ids
        if eos not in ids:  # runs without special tokens: exactly sentencepiece's own decode
            assert sp.decode(list(ids)) == text


def test_fast_families_decode_byte_runs_as_their_tokenizer_json(root):
    folder = root / RELEASED_NAMES["mistral"]
    saved = _saved_pipeline(folder)
    ours = tokenizer_of(root, "mistral")
    ids = [saved.token_to_id("<0x47>"), saved.token_to_id("<0xE6>"), saved.token_to_id("\u2581image")]
    assert ours.decode(ids) == saved.decode(ids, skip_special_tokens=False) == "\ufffd\ufffd image"  # ByteFallback


def test_conversation_continues_after_an_answer_cut_inside_a_character(root, original_tokenizers):
    """max_new_tokens can stop inside a multi-byte character: the stored text holds U+FFFD and the next turn's
    ids are the original's for that text."""
    import sentencepiece as spm

    for family in ("vicuna", "mistral"):
        folder = root / RELEASED_NAMES[family]
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        mllm = load_mllm(folder)
        answer_ids = [sp.piece_to_id("\u2581image"), _byte(sp, 0xE9), _byte(sp, 0x9B)]  # "image" + 2 of 3 bytes of 雪
        stored = decode_answer(mllm.tokenizer, answer_ids)
        assert stored == original_tokenizers.decode(folder, answer_ids).strip()
        assert "\ufffd" in stored
        conversation = Conversation(mllm.template).with_turn("Generate a similar image.", stored)
        prompt = conversation.prompt("Make it snowy.")
        assert tokenizer_image_token(prompt, mllm.tokenizer) == original_tokenizers.encode(folder, prompt)
        reply = mllm.generate("Make it snowy.", conversation=conversation, max_new_tokens=4)
        assert len(reply.conversation.messages) == 2 * 2


# ------------------------------------------------------------------------------- bad folders
def test_folder_without_tokenizer_files_is_one_sentence(root, tmp_path):
    for family in ("vicuna", "mistral"):
        folder = tmp_path / family
        shutil.copytree(root / RELEASED_NAMES[family], folder,
                        ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json", "tokenizer.model"))
        with pytest.raises(FileNotFoundError) as err:
            load_tokenizer(folder, family)
        assert str(err.value) == (f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + "
                                  "merges.txt); copy the complete model folder as released.")


def test_vicuna_needs_its_sentencepiece_model(root, tmp_path):
    folder = tmp_path / "vicuna"
    shutil.copytree(root / RELEASED_NAMES["vicuna"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text((root / RELEASED_NAMES["mistral"] / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.model, which the vicuna tokenizer"):
        load_tokenizer(folder, "vicuna")


def test_unreadable_tokenizer_files_are_one_sentence(root, tmp_path):
    folder = tmp_path / "mistral"
    shutil.copytree(root / RELEASED_NAMES["mistral"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3}')
    with pytest.raises(ValueError) as err:
        load_tokenizer(folder, "mistral")
    message = str(err.value)
    assert message.startswith(f"{folder / 'tokenizer.json'} could not be read as a tokenizer (")
    assert message.endswith("); re-download the tokenizer files of this model.") and message.count("\n") == 0
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a SentencePiece model"):
        load_tokenizer(folder, "mistral")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(folder, "mistral")


# ------------------------------------------------------------------------------- <image> and vocabulary
def test_vicuna_layout_around_the_image(root):
    tok = tokenizer_of(root, "vicuna")
    before, after = VICUNA_PROMPT.split("<image>")
    first, second = tok.encode(before), tok.encode(after)
    assert first[0] == second[0] == tok.bos_token_id == 1
    ids = tokenizer_image_token(VICUNA_PROMPT, tok)
    assert ids == first + [IMAGE_TOKEN_INDEX] + second[1:]  # BOS once, each chunk with its own leading "▁"
    at = ids.index(IMAGE_TOKEN_INDEX)
    # `… ':' '▁', -200, '▁', '<0x0A>', …` (29871, -200, 29871, 13 with the real vocabulary)
    assert tok.convert_ids_to_tokens(ids[at - 2:at]) == [":", "▁"]
    assert tok.convert_ids_to_tokens(ids[at + 1:at + 3]) == ["▁", "<0x0A>"]
    # tokenizing the string at once gives other ids
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != tok.encode(VICUNA_PROMPT.replace("<image>", ""))


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_kept_once_and_chunks_concatenate(root, family):
    tok = tokenizer_of(root, family)
    prompt = "first part <image>\nsecond part"
    first, second = (tok.encode(chunk) for chunk in prompt.split("<image>"))
    ids = tokenizer_image_token(prompt, tok)
    if first and first[0] == tok.bos_token_id:
        assert ids == first + [IMAGE_TOKEN_INDEX] + second[1:]
    else:  # Qwen2 (no BOS) and Phi-3 (add_bos_token false): chunks joined as they are
        assert family in ("qwen2", "phi3")
        assert ids == first + [IMAGE_TOKEN_INDEX] + second
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenizer_image_token("no image here", tok) == tok.encode("no image here")


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


def test_clean_up_flag_is_the_folders_else_the_class_default(root, tmp_path):
    assert tokenizer_of(root, "llama3").clean_up_spaces is True
    assert tokenizer_of(root, "qwen2").clean_up_spaces is False
    for family, default in (("llama3", True), ("vicuna", False), ("mistral", False)):
        folder = tmp_path / family
        shutil.copytree(root / RELEASED_NAMES[family], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("clean_up_tokenization_spaces")
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        assert load_tokenizer(folder, family).clean_up_spaces is default  # 4.41: True only for the base fast class


def test_decode_keeps_special_tokens_and_cleans_spaces_where_the_folder_says(root):
    text = "Hello , world . It 's fine !<|eot_id|>"
    llama3 = tokenizer_of(root, "llama3")  # clean_up_tokenization_spaces: true (applied as transformers 4.41 did)
    ids = _saved_pipeline(root / RELEASED_NAMES["llama3"]).encode(text, add_special_tokens=False).ids
    assert decode_answer(llama3, ids) == "Hello, world. It's fine!<|eot_id|>"
    qwen = tokenizer_of(root, "qwen2")  # false: kept as generated
    ids = qwen.encode(" Hello , world .<|im_end|>")
    assert decode_answer(qwen, ids) == "Hello , world .<|im_end|>"
