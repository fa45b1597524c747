"""The original's choices by folder name (LLMGA: llmga/llava/mm_utils.py get_model_name_from_path,
llmga/llava/model/builder.py and the template choice of llmga/serve/cli*.py).

The pack recognises a folder from config.json and its tokenizer instead (llmga_core.mllm.loader.recognise);
these rules are what the tests compare that recognition with, for the released folder names.
"""
from __future__ import annotations

from typing import Optional


def model_name_from_path(path: str) -> str:
    """get_model_name_from_path (LLMGA: llmga/llava/mm_utils.py)."""
    parts = str(path).replace("\\", "/").strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def template_from_model_name(model_name: str) -> str:
    """The CLIs' template choice from the folder name: first substring match wins."""
    name = model_name.lower()
    for needle, template in (("llama-2", "llava_llama_2"), ("llama3", "llama_3"), ("gemma", "gemma"),
                             ("qwen2", "qwen_2"), ("phi-3", "phi_3"), ("mistral", "mistral_instruct"),
                             ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if needle in name:
            return template
    return "llava_v0"


def builder_class_from_model_name(model_name: str) -> Optional[str]:
    """The model class builder.py picks from the folder name (None: not taken as an LLMGA MLLM)."""
    name = model_name.lower()
    if "llmga" not in name:
        return None
    for needle, cls in (("mpt", "LlavaMptForCausalLM"), ("mistral", "LlavaMistralForCausalLM"),
                        ("gemma", "LlavaGemmaForCausalLM"), ("qwen2", "LlavaQwen2ForCausalLM"),
                        ("phi-3", "LlavaPhi3ForCausalLM")):
        if needle in name:
            return cls
    return "LlavaLlamaForCausalLM"
