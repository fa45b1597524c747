"""The pack's ComfyUI nodes (V3 schema). One module per capability; each exports NODES."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .paths import register_model_folders

register_model_folders()

from . import checkpoints, diffrir, downloads, editing, long_prompt, mllm  # noqa: E402  (folders registered first)

NODE_MODULES = (mllm, long_prompt, checkpoints, diffrir, editing, downloads)


class LLMGAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> LLMGAExtension:
    return LLMGAExtension()
