"""The Chinese releases (binxia/llmga-cn-*: English bases, the same templates) and Chinese text in the long-prompt
encoder.

References, none of which shares code with the pack: the original's tokenizer stack (transformers 4.41.2 in a
side venv, tests/oracles), the independent reference MLLM (tests/mllm_reference.py), the name rules of the
original's CLIs (tests/original_folder_names.py), GPT-2's byte-to-unicode table written out here, and the
long-prompt reference encoder (tests/long_prompt_reference.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from llmga_core.long_prompt import (PromptCharactersDroppedWarning, TokenizerSpec, encode_prompt, plan_prompts,
                                    recipe_for, tokenizer_spec)
from llmga_core.mllm import load_mllm
from llmga_core.mllm.loader import recognise
from llmga_core.mllm.tokenization import IMAGE_TOKEN_INDEX, tokenizer_image_token
from tests.fixtures.tiny_clip import clip_l_tokenizer, host_tokenizer_dir, make_tiny_clip_text_models
from tests.fixtures.tiny_mllm import (CN_CORPUS, CN_RELEASED_NAMES, RELEASED_NAMES, make_cn_mllm_folder,
                                      make_vision_tower, shared_model_root)
from tests.long_prompt_reference import lpw_reference, original_clip_tokenizers
from tests.mllm_reference import Reference, literal_prompt
from tests.original_folder_names import template_from_model_name

# characters of the CN tokenizers' corpus (pieces there) and others (spelled in bytes)
INSTRUCTION = "一只红狐狸坐在雪地里，清晨的阳光"
FOLLOW_UP = "把天空变成紫色 and add a full moon"


@pytest.fixture(scope="module")
def cn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    for family in CN_RELEASED_NAMES:
        make_cn_mllm_folder(root, family)
    make_vision_tower(root / "clip-vit-large-patch14-336")
    return root


@pytest.mark.parametrize("family", list(CN_RELEASED_NAMES))
def test_a_chinese_release_is_recognised_like_its_english_twin(cn_root, family):
    folder = cn_root / CN_RELEASED_NAMES[family]
    info, twin = recognise(folder), recognise(shared_model_root() / RELEASED_NAMES[family])
    assert (info.family, info.template) == (twin.family, twin.template) == (
        family, template_from_model_name(CN_RELEASED_NAMES[family]))
    mllm = load_mllm(folder)
    assert (mllm.family, mllm.template) == (family, twin.template)


def _original_image_token_ids(oracle, folder, prompt: str) -> list[int]:
    """The original's tokenizer_image_token on its own tokenizer: each chunk around <image> tokenized alone,
    joined by -200, a leading BOS kept once (LLMGA: llmga/llava/mm_utils.py `tokenizer_image_token`)."""
    chunks = [oracle.encode(folder, chunk) for chunk in prompt.split("<image>")]
    bos = oracle.ask(folder, oracle.use_fast(folder))["bos"]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + (chunk[1:] if chunks[0][:1] == [bos] and chunk[:1] == [bos] else chunk)
    return ids


@pytest.mark.parametrize("family", list(CN_RELEASED_NAMES))
def test_a_chinese_instruction_gives_the_originals_ids_byte_fallback_included(cn_root, original_tokenizers, family):
    folder = cn_root / CN_RELEASED_NAMES[family]
    mllm = load_mllm(folder)
    prompt = mllm.new_conversation().prompt("<image>\n" + INSTRUCTION)
    ids = tokenizer_image_token(prompt, mllm.tokenizer)
    assert ids == _original_image_token_ids(original_tokenizers, folder, prompt)
    # the tokenizer has some of these characters as single tokens and spells the others in UTF-8 bytes, as the
    # original's own decode of each id alone shows (a byte alone decodes to U+FFFD)
    own = [i for i in original_tokenizers.encode(folder, INSTRUCTION) if i != mllm.tokenizer.bos_token_id]
    alone = original_tokenizers.ask(folder, original_tokenizers.use_fast(folder), decode=[[i] for i in own])["decode"]
    whole = {text.strip() for text in alone if len(text.strip()) == 1 and "\u4e00" <= text.strip() <= "\u9fff"}
    assert whole and whole <= set("".join(CN_CORPUS))
    assert sum(text == "\ufffd" for text in alone) >= 3 * 5  # 红狐狸雪地… at one token per byte or so
    assert mllm.tokenizer.decode([i for i in ids if i >= 0]).count(INSTRUCTION) == 1  # and back


def sample_image() -> Image.Image:
    rng = np.random.RandomState(7)
    return Image.fromarray(rng.randint(0, 256, size=(5, 8, 3)).astype(np.uint8)).resize((64, 40), Image.BILINEAR)


@pytest.mark.parametrize("family", list(CN_RELEASED_NAMES))
def test_chinese_chat_gives_the_reference_tokens_over_two_turns(cn_root, original_tokenizers, family):
    """A Chinese first turn with an image and a mixed second turn: greedy tokens equal the independent reference
    (the original's tokenizer, the documented prompt, no KV cache), so the stored Chinese answer (byte runs
    decoded as the original decodes them) feeds the second turn as in the original."""
    folder = cn_root / CN_RELEASED_NAMES[family]
    mllm = load_mllm(folder)
    reference = Reference(folder, cn_root / "clip-vit-large-patch14-336", family, original_tokenizers)
    conversation, finished = None, []
    for turn, text in enumerate((INSTRUCTION, FOLLOW_UP)):
        user = "<image>\n" + text if turn == 0 else text
        prompt = literal_prompt(family, finished + [(user, None)])
        reply = mllm.generate(text, task="chat", image=sample_image(), conversation=conversation, max_new_tokens=12)
        expected = reference.greedy(prompt, sample_image(), 12)
        assert reply.token_ids == expected, f"turn {turn}"
        finished.append((user, reference.stored(expected)))
        assert reply.conversation.messages[-1][1] == finished[-1][1]
        conversation = reply.conversation


# ------------------------------------------------------------------------------------------- long prompts
def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's (and CLIP's) byte-level alphabet: printable bytes map to themselves, the rest to U+0100…"""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _utf8_of_ids(ids: list[int]) -> bytes:
    """The bytes CLIP's ids stand for, read off the vocabulary file with the byte alphabet (no tokenizer)."""
    vocab = json.loads((Path(host_tokenizer_dir()) / "vocab.json").read_text(encoding="utf-8"))
    by_id = {i: token for token, i in vocab.items()}
    alphabet = _bytes_to_unicode()
    return bytes(alphabet[c] for i in ids for c in by_id[i].removesuffix("</w>"))


CHINESE_PROMPTS = ["一只红狐狸坐在雪地里，清晨的阳光，细节丰富", "a red fox 坐在雪地里, golden hour, 4k, 超高清"]


@pytest.mark.parametrize("text", CHINESE_PROMPTS, ids=["chinese", "mixed"])
def test_chinese_prompts_reach_clip_as_utf8_byte_pieces(text):
    """Chinese characters reach CLIP as the pieces of their UTF-8 bytes (2–3 tokens a character), as the original's
    tokenizer splits them (a word of its own each): nothing dropped, no warning."""
    tok = clip_l_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        positive, _ = plan_prompts(text, None, tokenizers={"l": tokenizer_spec(tok)}, recipe=recipe_for("sd15"))
    ids = [i for i in positive.chunks["l"][0][1:-1] if i != 49407]
    assert _utf8_of_ids(ids) == re.sub(r"\s+", "", text.lower()).encode("utf-8")
    han = sum("\u4e00" <= c <= "\u9fff" for c in text)
    assert positive.token_count > len(text.split()) + han  # more than a token per Chinese character


def test_a_chinese_prompt_goes_through_the_encoder_as_the_reference(original_tokenizers):
    """The reference encodes the original's ids (transformers 4.41's slow CLIPTokenizer, no ftfy)."""
    tiny = make_tiny_clip_text_models()
    text = " ".join(CHINESE_PROMPTS * 2)  # 119 characters, 172 tokens: three chunks
    with torch.no_grad():
        ours = encode_prompt(text, tokenizers=[tiny.tokenizer], text_encoders=[tiny.text_encoder], pipeline="sd15")
    original, _ = original_clip_tokenizers(original_tokenizers, host_tokenizer_dir(), [text, ""])
    positive, negative, chunks = lpw_reference([(text, 1.0)], [("", 1.0)], original, tiny.text_encoder, 3)
    assert chunks == 3 and ours["prompt_embeds"].shape[1] == 77 * 3
    torch.testing.assert_close(ours["prompt_embeds"], positive, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["negative_prompt_embeds"], negative, rtol=0, atol=1e-6)


class OriginalClipTokenizer:
    """transformers 4.41's slow CLIPTokenizer on the host's CLIP vocabulary (the tokenizer of the original's
    pipelines, and of ComfyUI on transformers 4), called like a transformers tokenizer, over the oracle pipe."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.folder = host_tokenizer_dir()

    def __call__(self, text, add_special_tokens=True, verbose=True):
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.oracle.ask(self.folder, False, encode=texts)["encode"]
        if not add_special_tokens:
            ids = [row[1:-1] for row in ids]  # its BOS and EOS
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def _dropped_by_the_441_rule(text: str) -> list[str]:
    """What transformers 4.41's CLIPTokenizer does without ftfy (BasicTokenizer._clean_text): NUL, U+FFFD and
    every control, format, private-use or unassigned character (category C*) except tab and newlines go."""
    return [c for c in dict.fromkeys(text) if ord(c) in (0, 0xFFFD)
            or (unicodedata.category(c).startswith("C") and c not in "\t\n\r")]


DIRTY = "一只狐狸\u200b在雪地里\ufffd, a red\u00ad fox \x07in the snow\u200b, \ue000 4k"


def test_characters_the_original_clip_tokenizer_drops_are_named(original_tokenizers):
    original = OriginalClipTokenizer(original_tokenizers)
    spec = TokenizerSpec(original, 49406, 49407, 49407)
    with pytest.warns(PromptCharactersDroppedWarning) as caught:
        positive, _ = plan_prompts(DIRTY, None, tokenizers={"l": spec}, recipe=recipe_for("sd15-inpaint"))
    expected = _dropped_by_the_441_rule(DIRTY)
    assert [hex(ord(c)) for c in expected] == ["0x200b", "0xfffd", "0xad", "0x7", "0xe000"]
    assert [str(w.message) for w in caught] == [
        "The prompt has characters that CLIP's tokenizer drops, so the text encoder never sees them: U+200B (zero "
        "width space) ×2, U+FFFD (replacement character), U+00AD (soft hyphen), U+0007 (unnamed), U+E000 (unnamed); "
        "remove or replace them."]
    # they really vanish: the ids are those of the text without them
    clean = "".join(c for c in DIRTY if c not in expected)
    assert positive.chunks["l"][0][1:1 + positive.token_count] == original(clean, add_special_tokens=False)["input_ids"]


def test_the_pack_drops_what_the_original_drops_on_any_transformers(original_tokenizers):
    """transformers 5's CLIP tokenizer alone would give each of them a byte piece; the pack cleans the text as the
    original's tokenizer did, on any transformers, and says which characters went."""
    tok = clip_l_tokenizer()
    with pytest.warns(PromptCharactersDroppedWarning):
        positive, _ = plan_prompts(DIRTY, None, tokenizers={"l": tokenizer_spec(tok)}, recipe=recipe_for("sd15"))
    original = OriginalClipTokenizer(original_tokenizers)
    assert positive.chunks["l"][0][1:1 + positive.token_count] == original(DIRTY, add_special_tokens=False)["input_ids"]
