"""The MLLM's pre-flight: validate() refuses what generate() would, plan() predicts the positions, the KV cache,
the progress steps and the memory a generate call needs. Predictions are checked against what a real call does
(the language model's inputs observed through a hook, a real transformers cache of that length)."""
from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llmga_core.mllm import MLLMInputError, load_mllm
from tests.fixtures.tiny_mllm import RELEASED_NAMES, shared_model_root


@pytest.fixture(scope="module")
def root():
    return shared_model_root()


@pytest.fixture(scope="module")
def models(root):
    return {family: load_mllm(root / RELEASED_NAMES[family]) for family in ("qwen2", "llama3", "gemma")}


def photo(seed=1) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(5, 7, 3)).astype(np.uint8)).resize((70, 50), Image.BICUBIC)


class Prefills:
    """The sequence lengths the language model is called with, in order (prefill first, then 1 per token)."""

    def __init__(self, mllm):
        self.lengths = []
        self.handle = mllm.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        self.lengths.append((embeds if embeds is not None else ids).shape[1])

    def prefills(self):
        return [n for n in self.lengths if n > 1]

    def close(self):
        self.handle.remove()


def real_cache_bytes(mllm, positions: int) -> int:
    """Bytes of the keys and values transformers itself stores for `positions` positions of this model."""
    from transformers import DynamicCache

    lm = mllm.model.language_model
    try:
        cache = DynamicCache(config=lm.config)
    except TypeError:
        cache = DynamicCache()
    hidden = lm.config.hidden_size
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    with torch.inference_mode():
        lm(inputs_embeds=torch.zeros(1, positions, hidden, dtype=mllm.dtype), use_cache=True, **{cache_arg: cache})
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [layer.keys, layer.values]
    if not tensors:  # older cache layout
        tensors = list(cache.key_cache) + list(cache.value_cache)
    assert tensors and all(t.shape[-2] == positions for t in tensors)
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma"])
@pytest.mark.parametrize("with_image", [False, True])
def test_plan_predicts_the_positions_and_the_cache_of_a_real_call(models, family, with_image):
    mllm = models[family]
    task, image = ("similar-image", photo()) if with_image else ("text-to-image", None)
    plan = mllm.plan("a red fox in the snow", task=task, image=image, max_new_tokens=9)
    seen = Prefills(mllm)
    try:
        reply = mllm.generate("a red fox in the snow", task=task, image=image, max_new_tokens=9)
    finally:
        seen.close()
    (prefill,) = seen.prefills()
    assert plan.positions == prefill + 9
    assert plan.progress_steps == 9 and len(reply.token_ids) <= 9
    assert plan.kv_cache_bytes == real_cache_bytes(mllm, plan.positions)
    assert plan.weights_bytes == sum(t.numel() * t.element_size()
                                     for t in [*mllm.model.parameters(), *mllm.model.buffers()])
    assert plan.working_bytes == plan.kv_cache_bytes + plan.activation_bytes > plan.kv_cache_bytes


def test_plan_of_a_later_turn_counts_the_whole_conversation(models):
    mllm = models["qwen2"]
    first = mllm.generate("", task="similar-image", image=photo(), max_new_tokens=5)
    plan = mllm.plan("make it darker", task="chat", conversation=first.conversation, max_new_tokens=7)
    seen = Prefills(mllm)
    try:
        mllm.generate("make it darker", task="chat", image=photo(), conversation=first.conversation, max_new_tokens=7)
    finally:
        seen.close()
    assert plan.positions == seen.prefills()[0] + 7


def test_plan_of_editing_covers_both_turns(models):
    mllm = models["qwen2"]
    plan = mllm.plan("make it snowy", task="editing", image=photo(), max_new_tokens=6)
    steps = []
    seen = Prefills(mllm)
    try:
        mllm.generate("make it snowy", task="editing", image=photo(), max_new_tokens=6,
                      on_token=lambda step, token: steps.append(step))
    finally:
        seen.close()
    first, second = seen.prefills()
    assert plan.progress_steps == 12 and max(steps) <= 12 and steps == list(range(1, len(steps) + 1))
    # the second prompt holds the first answer, whose length the plan can only bound
    assert second + 6 <= plan.positions <= second + 6 + 6 + 8


def test_plan_applies_the_originals_position_cut_with_an_image(root, tmp_path):
    folder = tmp_path / RELEASED_NAMES["qwen2"]
    shutil.copytree(root / RELEASED_NAMES["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["tokenizer_model_max_length"] = 590  # the image alone is 576 positions
    (folder / "config.json").write_text(json.dumps(config))
    mllm = load_mllm(folder, vision_tower=root / "clip-vit-large-patch14-336")
    plan = mllm.plan("Generate a similar image.", image=photo(), max_new_tokens=4)
    seen = Prefills(mllm)
    try:
        mllm.generate("Generate a similar image.", image=photo(), max_new_tokens=4)
    finally:
        seen.close()
    assert seen.prefills() == [590] and plan.positions == 594


BAD = [
    (dict(task="similar-image"), "The similar-image task needs an image.",
     "The similar-image task needs an image; connect one to the image input."),
    (dict(task="inpainting", image="photo"), "The inpainting task needs a mask",
     "The inpainting task needs a mask (white = the region to generate) with the image; connect one to the mask input."),
    (dict(task="chat", mask=torch.ones(50, 70)), "A mask was given without its image; pass the image",
     "A mask was given without its image; connect the image together with the mask."),
    (dict(task="editing"), "The editing task needs the image to edit.",
     "The editing task needs the image to edit; connect it to the image input."),
    (dict(task="text-to-image", image="photo"), "use similar-image (or chat)",
     "The text-to-image task takes no image; choose the similar-image (or chat) task, or disconnect the image input."),
    (dict(task="chat", instruction="look: <image>"), "pass the image as `image`",
     "The instruction contains '<image>', which marks where the image goes; remove '<image>' from the instruction "
     "and connect the picture to the image input."),
]


@pytest.mark.parametrize("arguments,python_words,graph_words", BAD)
def test_validate_refuses_before_any_model_work_with_words_for_both_audiences(models, arguments, python_words,
                                                                              graph_words):
    mllm = models["qwen2"]
    arguments = dict(arguments)
    instruction = arguments.pop("instruction", "hello")
    if arguments.get("image") == "photo":
        arguments["image"] = photo()
    calls = []
    handle = mllm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in mllm.model.children()]
    try:
        for check in (mllm.validate, mllm.plan, mllm.generate):
            with pytest.raises(MLLMInputError) as error:
                check(instruction, **arguments)
            assert python_words in str(error.value)
            assert error.value.for_graph() == graph_words
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    assert calls == []  # nothing ran: no tower, no projector, no LLM


def test_a_different_image_continuing_a_conversation_is_refused_by_validate(models):
    mllm = models["qwen2"]
    first = mllm.generate("", task="similar-image", image=photo(1), max_new_tokens=2)
    mllm.validate("again", conversation=first.conversation, image=photo(1))  # the same image continues it
    with pytest.raises(MLLMInputError) as error:
        mllm.validate("again", conversation=first.conversation, image=photo(2))
    assert error.value.for_graph() == ("This conversation was started with another image; connect the same image "
                                       "(and mask) to continue it, or disconnect the conversation input to start a "
                                       "new one.")


def test_generate_with_its_plan_checks_and_converts_the_request_once(models, monkeypatch):
    """The node plans first (before the model moves) and generates with the plan: the image is converted, masked
    and fingerprinted once, and the reply equals a generate call of its own."""
    from llmga_core.mllm import images as imaging

    mllm = models["qwen2"]
    image = torch.rand(40, 56, 3)
    mask = torch.zeros(40, 56)
    mask[8:24, 10:30] = 1.0
    expected = mllm.generate("", task="inpainting", image=image, mask=mask, max_new_tokens=6)
    conversions = []
    original = imaging.to_uint8_rgb
    monkeypatch.setattr(imaging, "to_uint8_rgb", lambda value: conversions.append(1) or original(value))
    plan = mllm.plan("", task="inpainting", image=image, mask=mask, max_new_tokens=6)
    reply = mllm.generate("", task="inpainting", image=image, mask=mask, max_new_tokens=6, plan=plan)
    assert len(conversions) == 1
    assert reply.token_ids == expected.token_ids and reply.conversation.messages == expected.conversation.messages
    with pytest.raises(ValueError, match="^The plan was made for other arguments than this generate call;"):
        mllm.generate("", task="inpainting", image=image.clone(), mask=mask, max_new_tokens=6, plan=plan)
    with pytest.raises(ValueError, match="^The plan was made for other arguments"):
        mllm.generate("", task="inpainting", image=image, mask=mask, max_new_tokens=7, plan=plan)
