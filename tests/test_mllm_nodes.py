"""The MLLM nodes inside the real host (in-process): model management, progress/interrupt, errors."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def host_models(tmp_path_factory, comfy_inprocess):
    from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower

    folder_paths = comfy_inprocess
    root = tmp_path_factory.mktemp("models")
    make_mllm_folder(root / "LLM", "qwen2")
    make_mllm_folder(root / "LLM" / "family", "gemma")  # a folder of folders
    make_vision_tower(root / "LLM" / "llmga-Qwen2-0.5B-full-finetune" / "clip-vit-large-patch14-336")
    make_vision_tower(root / "clip_vision" / "clip-vit-large-patch14-336")
    folder_paths.add_model_folder_path("LLM", str(root / "LLM"))
    folder_paths.add_model_folder_path("clip_vision", str(root / "clip_vision"))
    return root


@pytest.fixture(scope="module")
def mllm_nodes(llmga_pack, host_models):
    return importlib.import_module("llmga_pack_under_test.nodes.mllm")


@pytest.fixture(scope="module")
def loaded(mllm_nodes):
    return mllm_nodes.LLMGAMLLMLoader.execute("llmga-Qwen2-0.5B-full-finetune", "float32")[0]


def generate(mllm_nodes, loaded, instruction="a red kite over the dunes", **kw):
    args = dict(task="text-to-image", instruction=instruction, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    args.update(kw)
    return mllm_nodes.LLMGAPromptGenerator.execute(loaded, **args)


def test_loader_lists_folders_and_finds_the_tower_under_clip_vision(mllm_nodes, loaded, host_models):
    schema = mllm_nodes.LLMGAMLLMLoader.define_schema()
    listed = [name for name in schema.inputs[0].options if not name.startswith(("/", "..")) and
              ("Qwen2" in name or "gemma" in name)]
    # the vision tower inside the model folder is not offered as a model; nested folders are
    assert sorted(listed) == ["family/llmga-gemma-2b-it-full-finetune", "llmga-Qwen2-0.5B-full-finetune"]
    assert loaded.mllm.family == "qwen2"
    assert str(host_models / "clip_vision") in str(mllm_nodes.find_vision_tower_in_clip_vision())


def test_the_model_lives_under_host_memory_management(mllm_nodes, loaded):
    import comfy.model_management as mm

    out = generate(mllm_nodes, loaded)
    assert any(lm.model is loaded.patcher for lm in mm.current_loaded_models)
    assert loaded.patcher.model_size() == loaded.mllm.size_bytes()
    mm.unload_all_models()  # what the host's "free model memory" does
    assert not any(lm.model is loaded.patcher for lm in mm.current_loaded_models)
    again = generate(mllm_nodes, loaded)  # reloads on demand, same greedy answer
    assert again.args[0] == out.args[0] and again.args[1] == out.args[1]


def test_outputs_and_text_shown_on_the_node(mllm_nodes, loaded):
    direct = loaded.mllm.generate("a red kite over the dunes", task="text-to-image", max_new_tokens=6)
    out = generate(mllm_nodes, loaded)
    prompt, response, conversation, _source = out.args
    assert (prompt, response) == (direct.prompt, direct.response)
    assert conversation.messages == direct.conversation.messages
    shown = out.ui.as_dict()["text"][0]
    assert shown.startswith(prompt)
    # a 6-token answer has no <gen_image> tag: the node says the whole answer is used
    assert not direct.prompt_found and "gen_image" in shown


def test_cancel_stops_generation_at_the_next_token_whatever_the_progress_hook_does(mllm_nodes, loaded):
    """The user's Cancel (the host's interrupt flag, as POST /interrupt sets it) stops the answer at the next token
    through the host's own check; the progress hook only shows progress (ComfyUI 0.33 throttles it)."""
    import comfy.model_management as mm
    import comfy.utils

    shown = []

    def hook(value, total, preview, node_id=None):
        shown.append(value)
        mm.interrupt_current_processing(True)  # Cancel pressed while the first token is shown

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            generate(mllm_nodes, loaded, instruction="cancel me", max_new_tokens=50)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert shown == [1]  # the second token was computed, then refused before it was shown
    assert not mm.processing_interrupted()  # the host's check cleared the flag, so the next prompt runs
    after = generate(mllm_nodes, loaded, instruction="cancel me", max_new_tokens=3)
    assert len(after.args[2].messages) == 2  # the next request runs to its end: one question, one answer


def test_empty_instruction_is_refused_before_the_model_is_loaded(mllm_nodes, loaded):
    import comfy.model_management as mm

    mm.unload_all_models()
    with pytest.raises(ValueError, match="instruction"):
        generate(mllm_nodes, loaded, instruction="  ")
    assert not any(lm.model is loaded.patcher for lm in mm.current_loaded_models)


def test_a_conversation_continues_in_a_second_node(mllm_nodes, loaded):
    first = generate(mllm_nodes, loaded, task="chat", instruction="Hello there.")
    second = generate(mllm_nodes, loaded, task="chat", instruction="And a second turn.",
                      conversation=first.args[2])
    direct = loaded.mllm.generate("And a second turn.", task="chat", max_new_tokens=6,
                                  conversation=loaded.mllm.generate("Hello there.", task="chat",
                                                                    max_new_tokens=6).conversation)
    assert second.args[1] == direct.response
    assert len(second.args[2].messages) == len(first.args[2].messages) + 2


def test_image_batch_uses_the_first_image(mllm_nodes, loaded):
    images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    out = generate(mllm_nodes, loaded, task="similar-image", instruction="", image=images)
    direct = loaded.mllm.generate("", task="similar-image", image=images[0], max_new_tokens=6)
    assert out.args[1] == direct.response
    assert "first" in out.ui.as_dict()["text"][0]


def test_outputs_keep_their_order_with_source_prompt_last(mllm_nodes):
    # shared workflows link outputs by index, so the new output may only be appended
    names = [out.display_name for out in mllm_nodes.LLMGAPromptGenerator.define_schema().outputs]
    assert names == ["prompt", "response", "conversation", "source_prompt"]


def test_source_prompt_is_empty_for_other_tasks(mllm_nodes, loaded):
    assert generate(mllm_nodes, loaded).args[3] == ""


def test_editing_source_prompt_is_the_first_turn_caption(mllm_nodes, loaded):
    """The node's editing = two library turns: the image centre-cropped to 512² with "Generate a similar
    image" (source caption), then the instruction (target caption). Built here as two chat turns on an
    image cropped by hand, so the node's outputs are checked against the plain turns."""
    image = torch.rand(1, 512, 560, 3, generator=torch.Generator().manual_seed(3))
    out = generate(mllm_nodes, loaded, task="editing", instruction="Make it snowy.", image=image)
    prompt, response, conversation, source = out.args
    library = loaded.mllm.generate("Make it snowy.", task="editing", image=image[0], max_new_tokens=6)
    assert source == library.source_prompt and prompt == library.prompt and response == library.response

    cropped = image[0, :, 24:536]  # centre crop of 560 → 512; already 512², so no resize
    first = loaded.mllm.generate("Generate a similar image", task="chat", image=cropped, max_new_tokens=6)
    second = loaded.mllm.generate("Make it snowy.", task="chat", conversation=first.conversation, max_new_tokens=6)
    assert source == first.prompt
    assert (prompt, response) == (second.prompt, second.response)
    assert library.token_ids == second.token_ids
    assert conversation.messages == second.conversation.messages
    shown = out.ui.as_dict()["text"][0]
    assert shown.startswith(prompt + "\n\nsource: " + source)
    # neither 6-token answer has a <gen_image> tag: the node says so for both captions
    assert not first.prompt_found and not second.prompt_found
    assert "source caption: no <gen_image> tag" in shown and shown.count("the whole answer is used") == 2


@pytest.mark.parametrize("task, kwargs, message", [
    ("editing", {}, "editing task needs the image"),
    ("similar-image", {}, "similar-image task needs an image"),
    ("inpainting", {"image": torch.rand(1, 8, 8, 3)}, "needs a mask"),
    ("chat", {"mask": torch.ones(1, 8, 8)}, "mask was given without its image"),
])
def test_missing_image_is_refused_before_the_model_is_loaded(mllm_nodes, loaded, task, kwargs, message):
    import comfy.model_management as mm

    mm.unload_all_models()
    with pytest.raises(ValueError, match=message) as caught:
        generate(mllm_nodes, loaded, task=task, instruction="Make it snowy.", **kwargs)
    assert str(caught.value).count(". ") == 0  # one sentence
    assert not any(lm.model is loaded.patcher for lm in mm.current_loaded_models)


def test_editing_refuses_a_conversation_before_the_model_is_loaded(mllm_nodes, loaded):
    import comfy.model_management as mm

    earlier = loaded.mllm.generate("Hello there.", task="chat", max_new_tokens=2).conversation
    mm.unload_all_models()
    with pytest.raises(ValueError, match="starts a new conversation"):
        generate(mllm_nodes, loaded, task="editing", instruction="Make it snowy.", image=torch.rand(1, 8, 8, 3),
                 conversation=earlier)
    assert not any(lm.model is loaded.patcher for lm in mm.current_loaded_models)


def test_three_chained_nodes_equal_one_library_conversation(mllm_nodes, loaded, monkeypatch):
    """Three Prompt Generators wired through `conversation` (the dialogue workflow) write the same tokens,
    prompts and stored conversation as three generate calls on one conversation in llmga_core."""
    turns = [("text-to-image", "a stone cottage by a mountain lake"),
             ("chat", "Make it winter: snow on the roof and the lake frozen."),
             ("chat", "Now make it night, with warm light in the windows.")]
    expected, conversation = [], None
    for task, text in turns:
        reply = loaded.mllm.generate(text, task=task, conversation=conversation, max_new_tokens=6)
        expected.append(reply)
        conversation = reply.conversation

    seen_tokens = []
    real_generate = loaded.mllm.generate

    def recording(*args, **kwargs):  # the real generate; records what the node got
        reply = real_generate(*args, **kwargs)
        seen_tokens.append(reply.token_ids)
        return reply

    monkeypatch.setattr(loaded.mllm, "generate", recording)
    outs, conversation = [], None
    for task, text in turns:
        out = generate(mllm_nodes, loaded, task=task, instruction=text, conversation=conversation)
        outs.append(out)
        conversation = out.args[2]
    assert seen_tokens == [reply.token_ids for reply in expected]
    for out, reply in zip(outs, expected):
        assert out.args[:2] == (reply.prompt, reply.response)
        assert out.ui.as_dict()["text"][0].startswith(reply.prompt)
    assert outs[-1].args[2].messages == expected[-1].conversation.messages
    assert len(outs[-1].args[2].messages) == 2 * 3
