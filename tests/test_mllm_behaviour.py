"""generate(): images and masks, conversations, tasks, sampling, stopping, progress and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llmga_core.mllm import Conversation, load_mllm, parse_generation_prompt
from llmga_core.mllm.templates import cut_output
from tests.fixtures.tiny_mllm import RELEASED_NAMES, shared_model_root
from tests.mllm_reference import Reference, clip_pixels_441, literal_prompt


@pytest.fixture(scope="module")
def root():
    return shared_model_root()



@pytest.fixture(scope="module")
def qwen(root):
    return load_mllm(root / RELEASED_NAMES["qwen2"])


def photo(width=70, height=50, seed=1) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(height // 10, width // 10, 3)).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).float() / 255.0  # H×W×3 in 0..1, as a ComfyUI IMAGE row


def stretched(image: Image.Image) -> Image.Image:
    side = max(image.size)
    return image.resize((side, side), Image.LANCZOS)


# ------------------------------------------------------------------------------------------- images
def test_pixels_are_the_stretched_clip_processor_pixels(qwen):
    image = photo(70, 50)
    reply = qwen.generate("", task="similar-image", image=image, max_new_tokens=1)
    assert reply.conversation.messages[0][1] == "<image>\nGenerate a similar image."
    assert torch.equal(reply.conversation.pixel_values, clip_pixels_441(stretched(image)))
    tensor_reply = qwen.generate("", task="similar-image", image=as_tensor(image), max_new_tokens=4)
    assert torch.equal(tensor_reply.conversation.pixel_values, reply.conversation.pixel_values)
    assert tensor_reply.token_ids[:1] == reply.token_ids


@pytest.mark.parametrize("task,phrase", [("inpainting", "Please inpaint this image."),
                                         ("outpainting", "Extend this image.")])
def test_masked_image_is_blacked_at_full_resolution_then_stretched(qwen, task, phrase):
    image = photo(64, 40)
    mask = torch.zeros(40, 64)
    mask[5:20, 10:30] = 1.0
    mask[30, 40] = 125 / 255  # ≥ 125 of 255 → hole (the original's threshold)
    mask[31, 41] = 124 / 255  # below → kept
    reply = qwen.generate("", task=task, image=as_tensor(image), mask=mask, max_new_tokens=1)
    blacked = np.array(image)
    blacked[5:20, 10:30] = 0
    blacked[30, 40] = 0
    assert torch.equal(reply.conversation.pixel_values, clip_pixels_441(stretched(Image.fromarray(blacked))))
    assert reply.conversation.messages[0][1] == "<image>\n" + phrase
    pil_mask = Image.fromarray((mask.numpy() * 255).round().astype(np.uint8))  # a mask file: white = generate
    again = qwen.generate("", task=task, image=image, mask=pil_mask, max_new_tokens=1)
    assert torch.equal(again.conversation.pixel_values, reply.conversation.pixel_values)


def test_editing_runs_both_turns_of_the_editing_cli(qwen):
    image = photo(80, 50)
    reply = qwen.generate("Make it snowy.", task="editing", image=image, max_new_tokens=6)
    messages = reply.conversation.messages
    assert [m[1] for m in messages[::2]] == ["<image>\nGenerate a similar image", "Make it snowy."]
    first = parse_generation_prompt(cut_output("qwen_2", messages[1][1]))[0]
    assert reply.source_prompt == first
    rgb = np.array(image)
    crop = Image.fromarray(rgb[:, 15:65]).resize((512, 512))  # centre crop, PIL's default filter
    assert torch.equal(reply.conversation.pixel_values, clip_pixels_441(crop))
    with pytest.raises(ValueError, match="The editing task starts a new conversation"):
        qwen.generate("Make it snowy.", task="editing", image=image, conversation=reply.conversation)
    with pytest.raises(ValueError, match="The editing task needs the image to edit."):
        qwen.generate("Make it snowy.", task="editing")


# -------------------------------------------------------------------------------------- conversations
def test_conversation_continues_with_the_same_image_and_refuses_another(qwen):
    image = photo()
    first = qwen.generate("Describe it.", image=image, max_new_tokens=4)
    snapshot = (first.conversation.messages, first.conversation.image_fingerprint)
    with_image = qwen.generate("Make it snowy.", image=as_tensor(image), conversation=first.conversation,
                               max_new_tokens=5)
    without = qwen.generate("Make it snowy.", conversation=first.conversation, max_new_tokens=5)
    assert with_image.token_ids == without.token_ids
    assert with_image.conversation.messages == without.conversation.messages
    assert (first.conversation.messages, first.conversation.image_fingerprint) == snapshot  # input untouched
    other = qwen.generate("Now at night.", conversation=first.conversation, max_new_tokens=5)  # fan-out
    assert other.conversation.messages[:2] == first.conversation.messages and len(other.conversation.messages) == 2 * 2
    with pytest.raises(ValueError) as info:
        qwen.generate("Make it snowy.", image=photo(seed=9), conversation=first.conversation)
    assert str(info.value) == ("This conversation was started with another image; pass the same image (and mask) to "
                               "continue it, or start a new conversation for a new image.")
    text_only = qwen.generate("Hello.", max_new_tokens=2)
    with pytest.raises(ValueError, match="This conversation was started without an image"):
        qwen.generate("Look.", image=image, conversation=text_only.conversation)


def test_conversation_of_another_template_is_refused(qwen):
    with pytest.raises(ValueError, match="This conversation uses the gemma template but the model uses qwen_2"):
        qwen.generate("hi", conversation=Conversation("gemma"))


def test_template_override_changes_rendering_not_the_output_cut(root):
    folder = root / RELEASED_NAMES["qwen2"]
    mllm = load_mllm(folder, template="chatml_direct")
    reply = mllm.generate("Hello.", max_new_tokens=12)
    assert reply.conversation.template == "chatml_direct"
    assert reply.conversation.prompt("x").startswith("<|im_start|>system\nAnswer the questions.<|im_end|>")
    stored = reply.conversation.messages[1][1]
    assert reply.response == stored[:-10]  # still qwen_2's cut, as --conv-mode leaves it


def test_prompt_cut_to_tokenizer_model_max_length_with_an_image(root, tmp_path, original_tokenizers):
    folder = tmp_path / RELEASED_NAMES["qwen2"]
    shutil.copytree(root / RELEASED_NAMES["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["tokenizer_model_max_length"] = 590  # the image alone is 576 positions
    (folder / "config.json").write_text(json.dumps(config))
    tower = root / "clip-vit-large-patch14-336"
    mllm = load_mllm(folder, vision_tower=tower)
    image = photo()
    reply = mllm.generate("Generate a similar image.", image=image, max_new_tokens=6)
    assert any("cut to the first 590" in note for note in reply.notes)
    reference = Reference(folder, tower, "qwen2", original_tokenizers)
    prompt = literal_prompt("qwen2", [("<image>\nGenerate a similar image.", None)])
    assert reference.embeddings(prompt, image).shape[0] == 590
    assert reply.token_ids == reference.greedy(prompt, image, 6)


# ----------------------------------------------------------------------------------- decoding control
def test_seeded_sampling_matches_transformers_warpers(root, qwen, original_tokenizers):
    """Sampling = repetition penalty → temperature → top-k (folder: 20) → top-p → multinomial, seeded."""
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    folder = root / RELEASED_NAMES["qwen2"]
    reply = qwen.generate("Tell me a story.", temperature=0.9, seed=1234, max_new_tokens=10)
    assert qwen.generate("Tell me a story.", temperature=0.9, seed=1234, max_new_tokens=10).token_ids == reply.token_ids
    assert qwen.generate("Tell me a story.", temperature=0.9, seed=99, max_new_tokens=10).token_ids != reply.token_ids

    reference = Reference(folder, root / "clip-vit-large-patch14-336", "qwen2", original_tokenizers)
    prompt = literal_prompt("qwen2", [("Tell me a story.", None)])
    prefix = reference.embeddings(prompt, None)
    steps = [RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.9), TopKLogitsWarper(20),
             TopPLogitsWarper(0.8)]
    generator = torch.Generator().manual_seed(1234)
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            new = reference.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
            scores = reference.lm(inputs_embeds=torch.cat([prefix, new])[None]).logits[:, -1].float()
            for step in steps:
                scores = step(torch.tensor([ids], dtype=torch.long), scores)
            ids.append(int(torch.multinomial(scores.softmax(-1), 1, generator=generator)))
            if ids[-1] in reference.eos:
                break
    assert reply.token_ids == ids


def test_explicit_top_p_replaces_the_folders(qwen):
    base = dict(temperature=1.0, seed=5, max_new_tokens=10)
    narrow = qwen.generate("Tell me a story.", top_p=1e-6, **base)  # keeps only the most likely token
    greedy_with_penalty = qwen.generate("Tell me a story.", max_new_tokens=10)
    assert narrow.token_ids == greedy_with_penalty.token_ids


def test_stops_at_the_generation_config_eos(root, tmp_path):
    folder = tmp_path / RELEASED_NAMES["gemma"]
    shutil.copytree(root / RELEASED_NAMES["gemma"], folder)
    tower = root / "clip-vit-large-patch14-336"
    free = load_mllm(folder, vision_tower=tower).generate("Hello.", max_new_tokens=6)
    assert len(free.token_ids) == 6 and any(n.startswith("stopped at max_new_tokens (6)") for n in free.notes)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = free.token_ids[2]  # make the third greedy token the end token
    (folder / "generation_config.json").write_text(json.dumps(generation))
    stopped = load_mllm(folder, vision_tower=tower).generate("Hello.", max_new_tokens=6)
    assert stopped.token_ids == free.token_ids[:3]
    assert not any("max_new_tokens" in n for n in stopped.notes)
    assert "no <gen_image> tag in the answer; the whole answer is used as the prompt" in stopped.notes
    assert stopped.response == cut_output("gemma", stopped.conversation.messages[1][1])
    assert stopped.prompt == stopped.response and stopped.prompt_found is False


def test_on_token_reports_every_token_and_its_exception_propagates(qwen):
    seen = []
    reply = qwen.generate("Hello.", max_new_tokens=5, on_token=lambda step, token: seen.append((step, token)))
    assert seen == list(enumerate(reply.token_ids, start=1))

    class Interrupted(Exception):
        pass

    def interrupt(step, token):
        if step == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        qwen.generate("Hello.", max_new_tokens=5, on_token=interrupt)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(instruction="", task="chat"), ValueError, "The instruction is empty; the chat task sends"),
    (dict(instruction="", task="similar-image"), ValueError, "The similar-image task needs an image."),
    (dict(instruction="", task="inpainting"), ValueError, "The inpainting task needs an image and a mask."),
    (dict(instruction="", task="inpainting", image="photo"), ValueError, "The inpainting task needs a mask"),
    (dict(instruction="a cat", task="text-to-image", image="photo"), ValueError,
     "The text-to-image task takes no image"),
    (dict(instruction="hi", mask="mask"), ValueError, "A mask was given without its image"),
    (dict(instruction="", task="inpainting", image="photo", mask="small mask"), ValueError,
     "The mask is 20×10 but the image is 70×50; give a mask of the image's size."),
    (dict(instruction="look at <image>"), ValueError, "The instruction contains '<image>'"),
    (dict(instruction="hi", task="draw"), ValueError, "Unknown task 'draw'"),
    (dict(instruction="hi", max_new_tokens=0), ValueError, "max_new_tokens is 0"),
    (dict(instruction="hi", temperature=-1.0), ValueError, "temperature is -1.0"),
    (dict(instruction="hi", temperature=1.0, top_p=0.0), ValueError, "top_p is 0.0"),
    (dict(instruction="hi", conversation="text"), TypeError, "conversation must be a Conversation"),
])
def test_bad_input_is_refused_with_one_sentence(qwen, kwargs, error, message):
    values = {"photo": photo(70, 50), "mask": torch.ones(50, 70), "small mask": torch.ones(10, 20)}
    kwargs = {k: values.get(v, v) if isinstance(v, str) and k in ("image", "mask") else v for k, v in kwargs.items()}
    instruction = kwargs.pop("instruction")
    with pytest.raises(error) as info:
        qwen.generate(instruction, **kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_every_precision_feeds_clip_float16_rounded_pixels(root, dtype):
    """Quirk 9: the CLIs pass `.half()` pixels to the float32 tower, whatever the LLM's dtype."""
    mllm = load_mllm(root / RELEASED_NAMES["llama3"], dtype=dtype)
    pixels = clip_pixels_441(stretched(photo()))
    features = mllm._image_features(pixels)
    with torch.no_grad():
        hidden = mllm.model.vision_tower(pixel_values=pixels.half().float(), output_hidden_states=True).hidden_states
        expected = mllm.model.mm_projector(hidden[-2][:, 1:].to(dtype))[0]
        unrounded = mllm.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert torch.equal(features, expected)
    assert not torch.equal(hidden[-2], unrounded[-2])
    assert len(mllm.generate("", task="similar-image", image=photo(), max_new_tokens=3).token_ids) == 3


def test_a_near_tie_is_decided_as_with_the_originals_float16_pixels(root, original_tokenizers, tmp_path):
    """Quirk 9 where it decides the answer. The LM head of a copy of the tiny Llama-3 is rewritten (from the
    reference's hidden states, not the pack's) so that two tokens lead every other by far and the float16 rounding
    of the pixels alone decides between them: token A with the CLIs' `.half()` pixels, token B with unrounded
    ones. The pack, loaded in float32, answers A."""
    from safetensors.torch import load_file, save_file

    source, tower = root / RELEASED_NAMES["llama3"], root / "clip-vit-large-patch14-336"
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    image = photo()
    reference = Reference(folder, tower, "llama3", original_tokenizers)
    prompt = literal_prompt("llama3", [("<image>\nGenerate a similar image.", None)])
    with torch.no_grad():
        rounded, unrounded = (reference.lm.model(inputs_embeds=reference.embeddings(prompt, image, half)[None])
                              .last_hidden_state[0, -1].double() for half in (True, False))
    moved = rounded - unrounded
    assert moved.abs().max() > 0  # the rounding reaches the answer's first position
    # v·rounded = -v·unrounded > 0: logit A - logit B changes sign between the two pixel rules
    both = rounded + unrounded
    v = moved - (moved @ both) / (rounded @ both) * rounded
    v = v if v @ rounded > 0 else -v
    state = load_file(str(folder / "model.safetensors"))
    head = state["lm_head.weight"].double()
    token_a, token_b = 100, 101
    lead = (head @ rounded).abs().max() + (head @ unrounded).abs().max() + 50.0  # far above every other token
    head[token_b] = lead * rounded / (rounded @ rounded)
    head[token_a] = head[token_b] + v / (v @ rounded)  # +1 at the rounded state, -1 at the unrounded one
    state["lm_head.weight"] = head.to(state["lm_head.weight"].dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    reference = Reference(folder, tower, "llama3", original_tokenizers)
    with torch.no_grad():
        unrounded_choice = int(reference.lm(inputs_embeds=reference.embeddings(prompt, image, False)[None])
                               .logits[0, -1].argmax())
    assert reference.greedy(prompt, image, 1) == [token_a] and unrounded_choice == token_b
    mllm = load_mllm(folder, vision_tower=tower, dtype=torch.float32)
    assert mllm.generate("", task="similar-image", image=image, max_new_tokens=1).token_ids == [token_a]


def test_repetition_penalty_applies_in_greedy_decoding_to_generated_ids_only(root, qwen, original_tokenizers):
    """Quirk 8: the folder's repetition_penalty (1.1) counts in greedy decoding, over the new tokens alone (the
    prompt went in as embeddings)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    reference = Reference(root / RELEASED_NAMES["qwen2"], root / "clip-vit-large-patch14-336", "qwen2",
                          original_tokenizers)
    prompt = literal_prompt("qwen2", [("a dog", None)])
    reply = qwen.generate("a dog", max_new_tokens=16)
    assert reply.token_ids == reference.greedy(prompt, None, 16)
    reference.penalty = 1.0
    assert reference.greedy(prompt, None, 16) != reply.token_ids  # the penalty changes this answer
    prompt_ids = reference.chunk_ids(prompt)[0]
    penalty = RepetitionPenaltyLogitsProcessor(1.1)
    prefix = reference.embeddings(prompt, None)
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(16):
            new = reference.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
            logits = reference.lm(inputs_embeds=torch.cat([prefix, new])[None]).logits[:, -1].float()
            ids.append(int(penalty(torch.tensor([prompt_ids + ids]), logits).argmax()))
    assert ids != reply.token_ids  # penalising the prompt ids too would give another answer
