"""Greedy tokens of llmga_core.mllm against an independent reference, for every family.

The reference (tests/mllm_reference.py) follows the original's CLI path (LLMGA: llmga/serve/cli.py) step by step
with other means than the library, and decodes without a KV cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  imported before the fixtures build models under torch.device("meta"), where
# torch 2.6 cannot import it for the first time (transformers 5 imports it lazily)
from PIL import Image

from llmga_core.mllm import Conversation, load_mllm
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, shared_model_root
from tests.mllm_reference import Reference, literal_prompt


@pytest.fixture(scope="module")
def model_root() -> Path:
    return shared_model_root()


def sample_image() -> Image.Image:
    rng = np.random.RandomState(3)
    base = rng.randint(0, 256, size=(6, 9, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((90, 60), Image.BILINEAR)  # not square: exercises the stretch


TURNS = ("Generate a similar image.", "Make it snowy.", "Now at night")
MAX_NEW = 12


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_reference_over_turns(model_root, original_tokenizers, family, with_image):
    folder = model_root / RELEASED_NAMES[family]
    mllm = load_mllm(folder)
    reference = Reference(folder, model_root / "clip-vit-large-patch14-336", family, original_tokenizers)
    image = sample_image() if with_image else None
    conversation = None
    finished: list[tuple[str, str]] = []
    byte_pieces = 0
    for turn, text in enumerate(TURNS):
        user = ("<image>\n" + text) if (with_image and turn == 0) else text
        prompt = literal_prompt(family, finished + [(user, None)])
        assert (conversation or Conversation(mllm.template)).prompt(user) == prompt
        reply = mllm.generate(text, task="chat", image=image, conversation=conversation, max_new_tokens=MAX_NEW)
        expected = reference.greedy(prompt, image, MAX_NEW)
        assert reply.token_ids == expected, f"turn {turn}"
        finished.append((user, reference.stored(expected)))
        assert reply.conversation.messages[-1][1] == finished[-1][1]
        conversation = reply.conversation
        byte_pieces += sum(t.startswith("<0x") for t in mllm.tokenizer.convert_ids_to_tokens(expected))
    assert len(conversation.messages) == 2 * len(TURNS)
    if family not in ("qwen2", "llama3"):  # the SentencePiece vocabularies: answers with byte-piece runs are decoded
        assert byte_pieces > 0
