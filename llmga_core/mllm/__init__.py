"""LLMGA's multimodal LLM (LLaVA-based prompt writer) on plain transformers, host-free; or its language model on a
server (remote.py).

Port of LLMGA's inference side (LLMGA: llmga/llava/ and llmga/serve/cli*.py): load a released
folder, render its conversation template, splice CLIP image features at `<image>`, decode with a KV
cache, and read the caption from `<gen_image>…</gen_image>` exactly as the original does.
"""
from .conversation import Conversation
from .assistant import MLLMInputError, MLLMReply
from .model import QUIRKS, GenerationPlan, LLMGAMLLM, load_mllm
from .remote import MLLMServerError, RemoteMLLM, connect_mllm
from .prompts import TASKS, parse_generation_prompt
from .templates import TEMPLATES

__all__ = ["load_mllm", "LLMGAMLLM", "MLLMReply", "Conversation", "TASKS", "TEMPLATES", "parse_generation_prompt",
           "QUIRKS", "MLLMInputError", "GenerationPlan", "connect_mllm", "RemoteMLLM",
           "MLLMServerError"]
