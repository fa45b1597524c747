"""LLMGA MLLM nodes: load an LLMGA multimodal LLM, and let it write generation prompts.

The model math lives in llmga_core.mllm; these nodes convert ComfyUI values, put the model under the
host's memory management (so SD can push it off the GPU and the host's free actions release it) and
report progress per token, which is also where a user interrupt is honoured.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..llmga_core.mllm import TASKS, MLLMInputError, load_mllm
from ..llmga_core.mllm.loader import VisionTowerNotFoundError, is_vision_tower_folder
from .paths import MLLM_FOLDER, list_model_dirs, resolve_model_path

log = logging.getLogger("llmga")

VISION_TOWER_NAME = "clip-vit-large-patch14-336"
DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

MLLMType = io.Custom("LLMGA_MLLM")
ConversationType = io.Custom("LLMGA_CONVERSATION")


class PromptText(ui.PreviewText):
    """What the node shows ("text"), plus the bare prompt, source prompt and notes apart for API clients
    (the run command's prompt_<node>.txt)."""

    def __init__(self, shown: str, *, prompt: str, source_prompt: str, notes: list[str]):
        super().__init__(shown)
        self.parts = {"prompt": (prompt,), "source_prompt": (source_prompt,), "notes": tuple(notes)}

    def as_dict(self):
        return {**super().as_dict(), **self.parts}


class LoadedMLLM:
    """What flows along an LLMGA_MLLM link: the library model plus the host patcher that owns its memory."""

    def __init__(self, mllm, patcher):
        self.mllm = mllm
        self.patcher = patcher

    def __repr__(self):
        return f"LoadedMLLM({self.mllm.folder}, {self.mllm.family}, {self.mllm.dtype})"


def find_vision_tower_in_clip_vision() -> str | None:
    """models/clip_vision/clip-vit-large-patch14-336 (or openai/…), as a folder, if a user put it there."""
    for root in folder_paths.get_folder_paths("clip_vision"):
        for candidate in (os.path.join(root, VISION_TOWER_NAME), os.path.join(root, "openai", VISION_TOWER_NAME)):
            if os.path.isfile(os.path.join(candidate, "config.json")):
                return candidate
    return None


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    if DTYPES[name] is not None:
        return DTYPES[name]
    # the original runs the LLM in float16; on a CPU that is slow and imprecise, so float32 there
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


class LLMGAMLLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGAMLLMLoader",
            display_name="LLMGA MLLM Loader",
            category="LLMGA/loaders",
            description="Loads an LLMGA multimodal LLM folder (as released on Hugging Face) from models/LLM.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_dirs(MLLM_FOLDER, "config.json",
                                                                     skip=is_vision_tower_folder),
                               tooltip="A folder under models/LLM, e.g. llmga-Qwen2-0.5B-full-finetune. The CLIP "
                                       "vision tower openai/clip-vit-large-patch14-336 goes beside it or under "
                                       "models/clip_vision/clip-vit-large-patch14-336."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: float16 on a GPU (as LLMGA runs), float32 on the CPU."),
            ],
            outputs=[MLLMType.Output(display_name="mllm")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto") -> io.NodeOutput:
        folder = resolve_model_path(MLLM_FOLDER, model_name, want_dir=True)
        load_device = mm.get_torch_device()
        offload_device = mm.text_encoder_offload_device()
        try:
            mllm = load_mllm(folder, vision_tower=find_vision_tower_in_clip_vision(), device=offload_device,
                             dtype=choose_dtype(dtype, load_device))
        except VisionTowerNotFoundError as e:
            # the library's sentence ends with a Python argument; node users place folders instead
            roots = folder_paths.get_folder_paths("clip_vision")
            where = os.path.join(roots[0], e.folder_name) if roots else f"models/clip_vision/{e.folder_name}"
            raise FileNotFoundError(
                f"The MLLM needs the CLIP vision tower {e.tower_id}, which is not installed: download it (config.json, "
                f"preprocessor_config.json and weights) into {where}, or into a folder named {e.folder_name} beside "
                f"the model folder ({os.path.join(os.path.dirname(folder), e.folder_name)}), then run again.") from None
        patcher = comfy.model_patcher.ModelPatcher(mllm.model, load_device=load_device,
                                                   offload_device=offload_device, size=mllm.size_bytes())
        return io.NodeOutput(LoadedMLLM(mllm, patcher))


class LLMGAPromptGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGAPromptGenerator",
            display_name="LLMGA Prompt Generator",
            category="LLMGA",
            description="The LLMGA assistant writes a detailed generation prompt (or chats) from your instruction, "
                        "optionally looking at an image and a mask.",
            inputs=[
                MLLMType.Input("mllm"),
                io.Combo.Input("task", options=list(TASKS), default="text-to-image",
                               tooltip="chat sends the instruction as it is; the other tasks phrase it as LLMGA was "
                                       "trained (text-to-image: your keywords; similar-image/inpainting/outpainting "
                                       "need an image, the last two a mask; an empty instruction uses LLMGA's phrase; "
                                       "editing: the change to make to the image, giving the target caption as "
                                       "prompt and the source caption as source_prompt)."),
                io.String.Input("instruction", multiline=True, default="", dynamic_prompts=False,
                                tooltip="Keywords or a request, e.g. 'a cat on a windowsill at dusk'."),
                io.Image.Input("image", optional=True, tooltip="The image the assistant looks at (first of a batch)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="White = region to generate (inpainting/outpainting); it reaches the model black."),
                ConversationType.Input("conversation", optional=True,
                                       tooltip="Continue the dialogue of an earlier LLMGA Prompt Generator."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy (deterministic, identical to the original at temperature 0)."),
                io.Float.Input("top_p", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Nucleus sampling when temperature > 0 (1 = no nucleus cut; the folder's top_k, "
                                       "50 if unset, applies as in the original); 0 = the folder's own top_p from "
                                       "generation_config.json, as the original CLI samples."),
                io.Int.Input("max_new_tokens", default=512, min=1, max=4096),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            ],
            outputs=[
                io.String.Output(display_name="prompt",
                                 tooltip="The caption from <gen_image>…</gen_image> (editing: the target caption); "
                                         "the whole answer when there is no tag."),
                io.String.Output(display_name="response", tooltip="The whole answer."),
                ConversationType.Output(display_name="conversation"),
                # appended last: saved workflows link outputs by index
                io.String.Output(display_name="source_prompt",
                                 tooltip="editing: the caption of the first turn, the source image described (prompt "
                                         "is the target); other tasks: empty."),
            ],
        )

    @classmethod
    def execute(cls, mllm, task: str, instruction: str, image=None, mask=None, conversation=None,
                temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512,
                seed: int = 0) -> io.NodeOutput:
        pil_like = None if image is None else image[0, :, :, :3]
        mask_2d = None if mask is None else (mask[0] if mask.ndim == 3 else mask)
        try:  # bad input fails here, before the model moves to the GPU
            plan = mllm.mllm.plan(instruction, task=task, image=pil_like, mask=mask_2d, conversation=conversation,
                                  max_new_tokens=max_new_tokens)
        except MLLMInputError as e:
            raise ValueError(e.for_graph()) from None
        notes = []
        if image is not None and image.shape[0] > 1:
            notes.append(f"The image batch has {image.shape[0]} images; the assistant looks at the first.")
        mm.load_models_gpu([mllm.patcher], memory_required=plan.working_bytes, force_full_load=True)
        total = plan.progress_steps
        progress = comfy.utils.ProgressBar(total)

        def on_token(step, token_id):
            progress.update_absolute(step, total)  # also raises when the user interrupts

        reply = mllm.mllm.generate(instruction, task=task, image=pil_like, mask=mask_2d, conversation=conversation,
                                   temperature=temperature, top_p=None if top_p <= 0.0 else top_p,
                                   max_new_tokens=max_new_tokens, seed=seed, on_token=on_token)
        notes.extend(reply.notes)
        for note in notes:
            log.warning("LLMGA Prompt Generator: %s", note)
        source = reply.source_prompt if reply.source_prompt is not None else ""
        shown = reply.prompt if task != "editing" else reply.prompt + "\n\nsource: " + source
        if notes:
            shown += "\n\n[" + " ".join(notes) + "]"
        return io.NodeOutput(reply.prompt, reply.response, reply.conversation, source,
                             ui=PromptText(shown, prompt=reply.prompt, source_prompt=source, notes=notes))


NODES = [LLMGAMLLMLoader, LLMGAPromptGenerator]
