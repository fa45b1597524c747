"""LLMGA's multimodal LLM (LLaVA-based prompt writer) on plain transformers, host-free.

Port of LLMGA's inference side (LLMGA: llmga/llava/ and llmga/serve/cli*.py): load a released
folder, render its conversation template, splice CLIP image features at `<image>`, decode with a KV
cache, and read the caption from `<gen_image>…</gen_image>` exactly as the original does.
"""
from .conversation import Conversation
from .model import QUIRKS, GenerationPlan, LLMGAMLLM, MLLMInputError, MLLMReply, load_mllm
from .prompts import TASKS, parse_generation_prompt
from .templates import TEMPLATES

__all__ = ["load_mllm", "LLMGAMLLM", "MLLMReply", "Conversation", "TASKS", "TEMPLATES", "parse_generation_prompt",
           "QUIRKS", "MLLMInputError", "GenerationPlan"]
