"""Conversation templates of LLMGA's MLLM, rendered exactly as the original renders them.

Port of LLMGA: llmga/llava/conversation.py (`Conversation.get_prompt` and `conv_templates`) plus the
template choice and output slicing of LLMGA: llmga/serve/cli*.py. Strings are data and must stay
byte-identical: the model was trained on them, and every character changes the token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

SINGLE, TWO, MPT, LLAMA_2, LLAMA_3, GEMMA, PHI3, QWEN2 = (
    "single", "two", "mpt", "llama_2", "llama_3", "gemma", "phi3", "qwen2")

LLAVA_V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information.")
LLMGA_LLAMA_2_SYSTEM = (
    "You are LLMGA, a useful language and vision generation assistant. You can generate images according to the "
    "user's requirements. If the user wants you to inpaint or outpaint images, please imagine what is in the black "
    "mask parts of the image. If image generation is required, please provide a detailed description of the "
    "generated images in the form of <gen_image> DETAILED DESCRIPTION </gen_image>.")
LLAMA_3_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.")
CHATML_SYSTEM = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                 "The assistant gives helpful and honest answers.")


@dataclass(frozen=True)
class Template:
    """One entry of the original's conv_templates (without example messages)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: Optional[str] = None
    # characters the CLIs cut from the end of the decoded answer before printing/parsing it
    output_cut: int = 0

    @property
    def stop_str(self) -> str:
        """The stop string the CLIs compute (they never pass it to generate)."""
        if self.name == "gemma":
            return self.sep2
        return self.sep2 if self.style == TWO else self.sep

    def render(self, messages: Sequence[tuple[str, Optional[str]]]) -> str:
        """Conversation.get_prompt: `messages` are (role, text) pairs; text None renders the open turn."""
        ret = ""
        if self.style == SINGLE:
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + ": " + message + self.sep if message else role + ":"
        elif self.style == TWO:
            seps = (self.sep, self.sep2)
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
        elif self.style in (MPT, QWEN2, LLAMA_3):
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + message + self.sep if message else role
        elif self.style == LLAMA_2:
            for i, (role, message) in enumerate(messages):
                if i == 0 and (not message or role != self.roles[0]):
                    raise ValueError("the first message of a Llama-2 style conversation must be the user's")
                if not message:
                    continue
                if i == 0:
                    message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
                if i % 2 == 0:
                    ret += self.sep + f"[INST] {message} [/INST]"
                else:
                    ret += " " + message + " " + self.sep2
            ret = ret.lstrip(self.sep)  # str.lstrip: strips the CHARACTERS '<', 's', '>' (as the original)
        elif self.style == GEMMA:
            seps = (self.sep, self.sep2)
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += "<start_of_turn>" + role + "\n" + message + "<end_of_turn>\n" + seps[i % 2]
                else:
                    ret += "<start_of_turn>" + role + "\n"
        elif self.style == PHI3:
            for role, message in messages:
                ret += role + "\n" + message + self.sep + "\n" if message else role + "\n"
        else:
            raise ValueError(f"unknown separator style {self.style!r}")
        return ret


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("llava_v0", LLAVA_V0_SYSTEM, ("Human", "Assistant"), SINGLE, "###"),
    Template("llava_v1", LLAVA_V0_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", output_cut=4),
    Template("vicuna_v1", VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>"),
    Template("llama_2", LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>"),
    Template("llava_llama_2", LLMGA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>"),
    Template("mistral_instruct", "", ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>", output_cut=5),
    Template("llama_3", LLAMA_3_SYSTEM, ("<|start_header_id|>user<|end_header_id|>\n\n",
                                          "<|start_header_id|>system<|end_header_id|>\n\n"),  # sic: trained so
             LLAMA_3, "<|eot_id|>", output_cut=10),
    Template("mpt", CHATML_SYSTEM, _CHATML_ROLES, MPT, "<|im_end|>"),
    Template("chatml_direct", "<|im_start|>system\nAnswer the questions.", _CHATML_ROLES, MPT, "<|im_end|>"),
    Template("qwen_2", CHATML_SYSTEM, _CHATML_ROLES, QWEN2, "<|im_end|>", output_cut=10),
    Template("phi_3", "", ("<|user|>", "<|assistant|>"), PHI3, "<|end|>", output_cut=7),
    Template("gemma", "", ("user", "model"), GEMMA, "", "<eos>", output_cut=19),
)}
# the original's aliases
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]
TEMPLATES["mistral_direct"] = TEMPLATES["chatml_direct"]

# family → the template the CLIs pick for that family's released folder name
FAMILY_TEMPLATES = {
    "vicuna": "llava_v1", "llama2": "llava_llama_2", "llama3": "llama_3", "mistral": "mistral_instruct",
    "qwen2": "qwen_2", "phi3": "phi_3", "gemma": "gemma",
}


def cut_output(template_name: str, text: str) -> str:
    """The printed answer: the stored answer minus the template's fixed number of trailing characters."""
    template = TEMPLATES.get(template_name)
    cut = template.output_cut if template is not None else 0
    return text[:-cut] if cut else text
