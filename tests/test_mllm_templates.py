"""Templates, task phrasing, output cut and caption parsing as the original does them (LLMGA: llmga/llava/
conversation.py, llmga/serve/cli*.py, the training datasets' prompts in llmga/llava/datasets/)."""
from __future__ import annotations

import pytest

from llmga_core.mllm import TASKS, TEMPLATES, Conversation, parse_generation_prompt
from llmga_core.mllm.prompts import user_text
from llmga_core.mllm.templates import cut_output
from tests.original_folder_names import builder_class_from_model_name, model_name_from_path, template_from_model_name

LLAMA2_SYS = ("You are LLMGA, a useful language and vision generation assistant. You can generate images according to "
              "the user's requirements. If the user wants you to inpaint or outpaint images, please imagine what is in "
              "the black mask parts of the image. If image generation is required, please provide a detailed "
              "description of the generated images in the form of <gen_image> DETAILED DESCRIPTION </gen_image>.")

# One-turn prompts with an image and the user text `Generate a similar image.`, as LLMGA: llmga/llava/conversation.py
# `get_prompt` renders them for each template
ONE_TURN = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions. USER: <image>\nGenerate a similar image. "
                "ASSISTANT:",
    "llava_llama_2": "[INST] <<SYS>>\n" + LLAMA2_SYS + "\n<</SYS>>\n\n<image>\nGenerate a similar image. [/INST]",
    "mistral_instruct": "[INST] <<SYS>>\n\n<</SYS>>\n\n<image>\nGenerate a similar image. [/INST]",
    "llama_3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
               "able to understand the visual content that the user provides, and assist the user with a variety of "
               "tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nGenerate a "
               "similar image.<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n",
    "qwen_2": "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
              "helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nGenerate a similar image.<|im_end|>"
              "<|im_start|>assistant\n",
    "phi_3": "<|user|>\n<image>\nGenerate a similar image.<|end|>\n<|assistant|>\n",
    "gemma": "<start_of_turn>user\n<image>\nGenerate a similar image.<end_of_turn>\n<start_of_turn>model\n",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nGenerate a similar "
                     "image.<|im_end|><|im_start|>assistant\n",
    # SINGLE style: system + "###", then role + ": " + msg + "###", open turn role + ":"
    "llava_v0": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions.###Human: <image>\nGenerate a similar image.###"
                "Assistant:",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. USER: <image>\nGenerate a similar image. "
                 "ASSISTANT:",
}

# §5 "Second-turn renders with user `Make it snowy.`": (stored answer of turn 1, the text after the first turn)
SECOND_TURN = {
    "llava_v1": ("X</s>", " X</s></s>USER: Make it snowy. ASSISTANT:"),
    "llava_llama_2": ("X </s>", " X </s> </s><s>[INST] Make it snowy. [/INST]"),
    "mistral_instruct": ("X </s>", " X </s> </s><s>[INST] Make it snowy. [/INST]"),
    "llama_3": ("X<|eot_id|>", "X<|eot_id|><|eot_id|><|start_header_id|>user<|end_header_id|>\n\nMake it snowy."
                               "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n"),
    "qwen_2": ("X<|im_end|>", "X<|im_end|><|im_end|><|im_start|>user\nMake it snowy.<|im_end|><|im_start|>assistant\n"),
    "phi_3": ("X<|end|>", "X<|end|><|end|>\n<|user|>\nMake it snowy.<|end|>\n<|assistant|>\n"),
    "gemma": ("X<end_of_turn>\n<eos>", "X<end_of_turn>\n<eos><end_of_turn>\n<eos><start_of_turn>user\nMake it snowy."
                                       "<end_of_turn>\n<start_of_turn>model\n"),
}


@pytest.mark.parametrize("name", sorted(ONE_TURN))
def test_one_turn_prompt_is_the_documented_string(name):
    assert Conversation(name).prompt("<image>\nGenerate a similar image.") == ONE_TURN[name]


@pytest.mark.parametrize("name", sorted(SECOND_TURN))
def test_second_turn_repeats_the_end_marker_of_the_stored_answer(name):
    stored, rest = SECOND_TURN[name]
    first = Conversation(name).with_turn("<image>\nGenerate a similar image.", stored)
    assert first.prompt("Make it snowy.") == ONE_TURN[name] + rest
    assert first.messages[-1] == (TEMPLATES[name].roles[1], stored)


def test_llama2_style_strips_only_the_leading_sep_characters():
    # ret.lstrip("<s>") removes the characters '<', 's', '>' — the first "<s>" only, as "[INST]" follows
    text = Conversation("mistral_instruct").prompt("hi")
    assert text == "[INST] <<SYS>>\n\n<</SYS>>\n\nhi [/INST]"


def test_stop_strings_the_clis_compute():
    expected = {"llava_v1": "</s>", "llava_llama_2": "<s>", "mistral_instruct": "<s>", "llama_3": "<|eot_id|>",
                "qwen_2": "<|im_end|>", "phi_3": "<|end|>", "gemma": "<eos>", "llava_v0": "###"}
    assert {name: TEMPLATES[name].stop_str for name in expected} == expected


# §1: released checkpoints → builder class and CLI template (chosen from the folder name by the original)
RELEASED = {
    "llmga-vicuna-7b-v1.5-full-finetune": ("LlavaLlamaForCausalLM", "llava_v1"),
    "llmga-llama-2-7b-chat-full-finetune": ("LlavaLlamaForCausalLM", "llava_llama_2"),
    "llmga-mistral_instruct-full-finetune": ("LlavaMistralForCausalLM", "mistral_instruct"),
    "llmga-llama3-8b-it-full-finetune": ("LlavaLlamaForCausalLM", "llama_3"),
    "llmga-Qwen2-0.5B-full-finetune": ("LlavaQwen2ForCausalLM", "qwen_2"),
    "llmga-Qwen2-1.5B-full-finetune": ("LlavaQwen2ForCausalLM", "qwen_2"),
    "llmga-Qwen2-7B-full-finetune": ("LlavaQwen2ForCausalLM", "qwen_2"),
    "llmga-Phi-3-mini-128k-full-finetune": ("LlavaPhi3ForCausalLM", "phi_3"),
    "llmga-gemma-2b-it-full-finetune": ("LlavaGemmaForCausalLM", "gemma"),
    "llmga-cn-vicuna-7b-v1.5-full-finetune": ("LlavaLlamaForCausalLM", "llava_v1"),
    "llmga-cn-llama3-8b-it-full-finetune": ("LlavaLlamaForCausalLM", "llama_3"),
    "llmga-cn-gemma-2b-it-full-finetune": ("LlavaGemmaForCausalLM", "gemma"),
    "llmga-cn-Qwen2-0.5B-full-finetune": ("LlavaQwen2ForCausalLM", "qwen_2"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_folder_name_rules_of_the_original(name):
    assert (builder_class_from_model_name(name), template_from_model_name(name)) == RELEASED[name]


def test_folder_name_rules_edge_cases():
    assert template_from_model_name("llmga-vicuna-7b") == "llava_v0"  # a renamed folder changes the original's template
    assert builder_class_from_model_name("vicuna-7b-v1.5") is None  # no "llmga": not loaded as an MLLM
    assert model_name_from_path("/m/llmga-Qwen2-0.5B-full-finetune/checkpoint-500/") == \
        "llmga-Qwen2-0.5B-full-finetune_checkpoint-500"
    assert model_name_from_path("/m/llmga-gemma-2b-it-full-finetune/") == "llmga-gemma-2b-it-full-finetune"


@pytest.mark.parametrize("template,stored,printed", [
    ("gemma", "a cat<end_of_turn>\n<eos>", "a cat"),
    ("llama_3", "a cat<|eot_id|>", "a cat"),
    ("llava_v1", "a cat</s>", "a cat"),
    ("phi_3", "a cat<|end|>", "a cat"),
    ("qwen_2", "a cat<|im_end|>", "a cat"),
    ("mistral_instruct", "a cat </s>", "a cat"),
    ("llava_llama_2", "a cat </s>", "a cat </s>"),
    ("llava_v0", "a cat###", "a cat###"),
    ("qwen_2", "unfinished answer", "unfinis"),  # stopped at max_new_tokens: real text is cut
])
def test_fixed_length_output_cut(template, stored, printed):
    assert cut_output(template, stored) == printed


@pytest.mark.parametrize("text,caption,found", [
    ("<gen_image> a red fox in the snow </gen_image>", "a red fox in the snow ", True),
    ("Sure! <gen_image> a fox </gen_image> and <gen_image> a dog </gen_image>", "a fox ", True),
    ("<gen_image>xa fox</gen_image>", "a fox", True),  # +12 drops whatever follows the tag
    ("<gen_image> a fox without end", "a fox without end", True),
    ("a fox </gen_image> tail", "a fox ", False),
    ("just a description", "just a description", False),
    ("", "", False),
])
def test_caption_parsing_rules(text, caption, found):
    assert parse_generation_prompt(text) == (caption, found)


def test_tasks_and_their_fixed_phrases():
    assert TASKS == ("chat", "text-to-image", "similar-image", "inpainting", "outpainting", "editing")
    assert user_text("similar-image", "") == "Generate a similar image."
    assert user_text("inpainting", "  ") == "Please inpaint this image."
    assert user_text("outpainting", "") == "Extend this image."
    assert user_text("similar-image", "Recreate the given image.") == "Recreate the given image."
    assert user_text("text-to-image", " a cat on a sofa ") == "Generate an image based on given keywords. a cat on a sofa"
    assert user_text("chat", "  hello ") == "  hello "  # verbatim, as the CLIs send it
    assert user_text("editing", "Make it snowy.") == "Make it snowy."


@pytest.mark.parametrize("task,message", [
    ("chat", "The instruction is empty; the chat task sends your text to the model as it is, so type a message."),
    ("text-to-image", "The instruction is empty; text-to-image needs keywords or a short description of the image to "
                      "write a prompt for."),
    ("editing", "The instruction is empty; editing needs the change to make, e.g. 'Make it snowy.'."),
])
def test_empty_instruction_is_refused(task, message):
    with pytest.raises(ValueError) as info:
        user_text(task, " ")
    assert str(info.value) == message


def test_unknown_task_and_template():
    with pytest.raises(ValueError, match="Unknown task 'draw'"):
        user_text("draw", "x")
    with pytest.raises(ValueError, match="Unknown conversation template 'nope'"):
        Conversation("nope")


def test_conversation_is_a_value():
    start = Conversation("qwen_2")
    after = start.with_turn("hi", "X<|im_end|>")
    assert start.messages == () and after.messages == (("<|im_start|>user\n", "hi"), ("<|im_start|>assistant\n",
                                                                                       "X<|im_end|>"))
    with pytest.raises(Exception):
        after.template = "gemma"
