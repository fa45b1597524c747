"""LLMGA MLLM nodes: load an LLMGA multimodal LLM, and let it write generation prompts.

The model math lives in llmga_core.mllm; these nodes convert ComfyUI values, put the model under the
host's memory management (so SD can push it off the GPU and the host's free actions release it) and
report progress per token, where a user's Cancel is checked too (nodes/progress.py).
"""
from __future__ import annotations

import os
import re
import time

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io, ui

from ..llmga_core.mllm import TASKS, MLLMInputError, connect_mllm, load_mllm
from ..llmga_core.mllm.loader import recognise
from ..llmga_core.releases import (VisionTowerNotFoundError, find_vision_tower, find_vision_tower_in,
                                   is_vision_tower_folder)
from ..llmga_core.mllm.answers import AnswerMemo, answer_id, apply_edit, memo_key
from ..llmga_core.mllm.quantization import bitsandbytes_installed, check_available, install_command
from ..llmga_core.mllm.streaming import RunningAnswer
from .memory import model_patcher
from .notes import log_notes, shown_text
from .paths import MLLM_FOLDER, list_model_dirs, resolve_model_path
from .progress import step_reporter

DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the quantised choices of the same combo (the rest of the model in the auto dtype), so saved workflows keep
# their widget values: int8 is the pack's own; bitsandbytes (8bit, 4bit) is optional, so those are always listed
# and refused with how to install it
QUANTIZED = ("int8", "8bit", "4bit")

# ComfyUI 0.33 lists in /history and re-sends to the browser only the UI of nodes that ran in that prompt, unless
# the schema sets has_intermediate_output (comfy_api/latest/_io.py; execution.py sends cached UIs of such nodes);
# 0.3.64 has no such field and lists cached nodes' UI itself. So a cached Prompt Generator keeps its text on both.
KEEP_UI_WHEN_CACHED = ({"has_intermediate_output": True}
                       if "has_intermediate_output" in getattr(io.Schema, "__dataclass_fields__", {}) else {})

MLLMType = io.Custom("LLMGA_MLLM")
ConversationType = io.Custom("LLMGA_CONVERSATION")


class PromptText(ui.PreviewText):
    """What the node shows ("text"), plus the bare prompt, source prompt and notes apart for API clients
    (the run command's prompt_<node>.txt). For the node's editor (web/js/llmga_text.js): answer_id (what an
    edit is bound to), model_prompt (the model's own prompt) and edit ("none", "applied" or "dropped")."""

    def __init__(self, shown: str, *, prompt: str, source_prompt: str, notes: list[str], answer_id: str = "",
                 model_prompt: str | None = None, edit: str = "none"):
        super().__init__(shown)
        self.parts = {"prompt": (prompt,), "source_prompt": (source_prompt,), "notes": tuple(notes),
                      "answer_id": (answer_id,), "model_prompt": (prompt if model_prompt is None else model_prompt,),
                      "edit": (edit,)}

    def as_dict(self):
        return {**super().as_dict(), **self.parts}


class LoadedMLLM:
    """What flows along an LLMGA_MLLM link: the library model plus the host patcher that owns its memory (None for
    a served model)."""

    def __init__(self, mllm, patcher):
        self.mllm = mllm
        self.patcher = patcher

    def __repr__(self):
        return f"LoadedMLLM({self.mllm.folder}, {self.mllm.family}, {self.mllm.dtype})"


def find_vision_tower_in_clip_vision() -> str | None:
    """The vision tower in the host's clip_vision folders, as a folder or a single .safetensors file, if a
    user put it there (the lookup itself is the library's)."""
    found = find_vision_tower_in(folder_paths.get_folder_paths("clip_vision"))
    return None if found is None else str(found)


def vision_tower_for(folder: str) -> str:
    """The tower the MLLM in `folder` uses: beside or inside its folder, else in models/clip_vision; a missing
    one is one sentence saying where node users put it."""
    roots = folder_paths.get_folder_paths("clip_vision")
    try:
        return str(find_vision_tower(folder, recognise(folder).config, None, search=roots))
    except VisionTowerNotFoundError as e:
        # the library's sentence ends with a Python argument; node users place folders instead
        where = os.path.join(roots[0], e.folder_name) if roots else f"models/clip_vision/{e.folder_name}"
        raise FileNotFoundError(
            f"The MLLM needs the CLIP vision tower {e.tower_id}, which is not installed: download it (config.json, "
            f"preprocessor_config.json and weights) into {where} (or put its weights alone as {where}.safetensors), "
            f"or into a folder named {e.folder_name} beside the model folder "
            f"({os.path.join(os.path.dirname(folder), e.folder_name)}), then run again.") from None


def dtype_tooltip() -> str:
    text = ("auto: float16 on a GPU (as LLMGA runs), float32 on the CPU; bfloat16 halves float32's size and, on "
            "CPUs with AVX-512 BF16, its time per token. int8: the pack's own 8-bit weights (blocks of 32 with a "
            "float16 scale, as llama.cpp's q8_0; the LM head too), the fastest choice on a CPU. 8bit (LLM.int8(), "
            "about half the float16 size of the LLM's layers) and 4bit (NF4, about a quarter) are the original's "
            "--load-8bit / --load-4bit. The rest of the model is in the auto dtype (the vision tower and projector "
            "are not quantized).")
    if bitsandbytes_installed():
        return text + " 8bit/4bit run on bitsandbytes."
    return text + (f" 8bit/4bit need bitsandbytes, which is not installed: run `{install_command()}` and restart "
                   "ComfyUI.")


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    if DTYPES.get(name) is not None:
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
                io.Combo.Input("dtype", options=[*DTYPES, *QUANTIZED], default="auto", tooltip=dtype_tooltip()),
            ],
            outputs=[MLLMType.Output(display_name="mllm")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto") -> io.NodeOutput:
        folder = resolve_model_path(MLLM_FOLDER, model_name, want_dir=True)
        load_device = mm.get_torch_device()
        offload_device = mm.text_encoder_offload_device()
        llm_dtype = choose_dtype(dtype, load_device)
        quantization = dtype if dtype in QUANTIZED else None
        tower = vision_tower_for(folder)
        if quantization in ("8bit", "4bit"):  # it runs on the load device; load_mllm checks the one it loads on
            check_available(quantization, load_device, llm_dtype)
        mllm = load_mllm(folder, vision_tower=tower, device=offload_device, dtype=llm_dtype,
                         quantization=quantization)
        # plain torch layers: a plain ModelPatcher even with dynamic VRAM on, so SD can push it off (memory.py)
        patcher = model_patcher(mllm.model, load_device, offload_device, size=mllm.size_bytes())
        return io.NodeOutput(LoadedMLLM(mllm, patcher))


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def api_key_from(variable: str) -> str | None:
    """The key in the environment variable named `variable` ("" = no key). Workflows carry only the name, so a
    shared workflow never holds the key."""
    variable = (variable or "").strip()
    if not variable:
        return None
    if not ENV_NAME.match(variable):
        raise ValueError(f"api_key_env must be the NAME of an environment variable that holds the key (letters, "
                         f"digits, _), not {'the key itself' if len(variable) > 24 else repr(variable)}; set e.g. "
                         "LLMGA_MLLM_API_KEY=… before starting ComfyUI and enter LLMGA_MLLM_API_KEY here.")
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"The environment variable {variable} (api_key_env) is not set in ComfyUI's environment; "
                         "set it to the server's API key before starting ComfyUI, or clear api_key_env for a server "
                         "without a key.")
    return key


class LLMGARemoteMLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGARemoteMLLM",
            display_name="LLMGA Remote MLLM",
            category="LLMGA/loaders",
            description="LLMGA's MLLM with its language model served by llama.cpp's llama-server (one server for "
                        "many ComfyUI workers). Text turns (text-to-image, chat) give the local model's greedy "
                        "tokens; image tasks need LLMGA MLLM Loader.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_dirs(MLLM_FOLDER, "config.json",
                                                                     skip=is_vision_tower_folder),
                               tooltip="The released MLLM folder under models/LLM that the server serves (its "
                                       "config and tokenizer are read here, not its weights)."),
                io.String.Input("base_url", default="http://127.0.0.1:8080",
                                tooltip="The llama-server address, serving the GGUF that `python -m llmga_core.export "
                                        "<folder> --gguf <file>` writes."),
                io.String.Input("served_model", default="",
                                tooltip="The model name the server serves (its --alias); empty: the one it serves."),
                io.String.Input("api_key_env", default="",
                                tooltip="The NAME of an environment variable of ComfyUI that holds the server's API "
                                        "key (e.g. LLMGA_MLLM_API_KEY); never the key itself. Empty: no key."),
                io.Float.Input("timeout", default=600.0, min=1.0, max=86400.0, step=1.0,
                               tooltip="Seconds one request to the server may take before the prompt fails."),
            ],
            outputs=[MLLMType.Output(display_name="mllm")],
        )

    @classmethod
    def execute(cls, model_name: str, base_url: str, served_model: str = "", api_key_env: str = "",
                timeout: float = 600.0) -> io.NodeOutput:
        folder = resolve_model_path(MLLM_FOLDER, model_name, want_dir=True)
        remote = connect_mllm(folder, base_url, model=served_model.strip() or None,
                              api_key=api_key_from(api_key_env), timeout=timeout)
        return io.NodeOutput(LoadedMLLM(remote, None))  # nothing here for the host's memory management


ANSWERS = AnswerMemo()  # one per server: answers of the models the host keeps loaded
PARTIAL_TEXT_EVENT = "llmga.partial_text"  # websocket message {node, prompt_id, text}: the answer so far
PARTIAL_TEXT_INTERVAL_S = 0.25  # the first token at once, then at most four updates a second


class PartialText:
    """Sends the answer being written to the node's display through the host's websocket, as a message of the
    pack's own (PARTIAL_TEXT_EVENT). Not the host's send_progress_text: frontend 1.27 renders that text as
    HTML (linkified, unescaped), and model text must reach the browser as text only."""

    def __init__(self, node_id, running: RunningAnswer):
        self.node_id = None if node_id is None else str(node_id)
        self.running = running
        self.sent_at = None
        try:
            from server import PromptServer  # the host's server; absent in scripts without one
            self.server = getattr(PromptServer, "instance", None)
        except ImportError:
            self.server = None

    def add(self, token_id: int) -> None:
        self.running.add(token_id)
        # only to the client that queued the prompt: without a client id the host would broadcast it
        if self.server is None or self.node_id is None or self.server.client_id is None:
            return
        now = time.monotonic()
        if self.sent_at is not None and now - self.sent_at < PARTIAL_TEXT_INTERVAL_S:
            return
        self.sent_at = now
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        prompt_id = context.prompt_id if context is not None else getattr(self.server, "last_prompt_id", None)
        self.server.send_sync(PARTIAL_TEXT_EVENT, {"node": self.node_id, "prompt_id": prompt_id,
                                                   "text": "\n\n".join(self.running.texts())},
                              self.server.client_id)


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
                # appended last and optional: saved workflows fill widgets by position
                io.String.Input("edited_prompt", default="", optional=True, dynamic_prompts=False,
                                tooltip="Replaces the prompt output when not empty, without generating again (the "
                                        "node's text box writes it when you edit the shown prompt)."),
                io.String.Input("edited_from", default="", optional=True,
                                tooltip="The answer_id the edit was made from; when the answer changes (another "
                                        "instruction, image, model …) the edit is dropped. Empty: any answer."),
            ],
            hidden=[io.Hidden.unique_id],
            **KEEP_UI_WHEN_CACHED,
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
                seed: int = 0, edited_prompt: str = "", edited_from: str = "") -> io.NodeOutput:
        pil_like = None if image is None else image[0, :, :, :3]
        mask_2d = None if mask is None else (mask[0] if mask.ndim == 3 else mask)
        top_p_or_folder = None if top_p <= 0.0 else top_p  # 0: the folder's own top_p
        try:  # bad input fails here, before the model moves to the GPU; generate reuses the checked request
            plan = mllm.mllm.plan(instruction, task=task, image=pil_like, mask=mask_2d, conversation=conversation,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p_or_folder)
        except MLLMInputError as e:
            raise ValueError(e.for_graph()) from None
        notes = []
        if image is not None and image.shape[0] > 1:
            notes.append(f"The image batch has {image.shape[0]} images; the assistant looks at the first.")
        answer = answer_id(mllm.mllm, task, instruction, pil_like, mask_2d, conversation, temperature, top_p,
                           max_new_tokens, seed)
        key = memo_key(answer, seed)
        reply = ANSWERS.get(mllm, key)
        if reply is None:
            if mllm.patcher is not None:  # a served model (LLMGA Remote MLLM) holds nothing here
                mm.load_models_gpu([mllm.patcher], memory_required=plan.working_bytes, force_full_load=True)
            total = plan.progress_steps
            report = step_reporter(total)
            node_id = cls.hidden.unique_id if cls.hidden is not None else None  # None when called directly
            partial = PartialText(node_id, RunningAnswer(mllm.mllm, max_new_tokens))

            def on_token(step, token_id):
                report(step, total)  # raises when the user cancelled: the next token is not computed
                partial.add(token_id)

            reply = mllm.mllm.generate(instruction, task=task, image=pil_like, mask=mask_2d,
                                       conversation=conversation, temperature=temperature, top_p=top_p_or_folder,
                                       max_new_tokens=max_new_tokens, seed=seed, on_token=on_token, plan=plan)
            ANSWERS.put(mllm, key, reply)
        notes.extend(reply.notes)
        prompt, edit, edit_note = apply_edit(reply.prompt, edited_prompt, edited_from, answer)
        if edit_note:
            notes.append(edit_note)
        notes = log_notes("LLMGA Prompt Generator", notes)
        source = reply.source_prompt if reply.source_prompt is not None else ""
        shown = shown_text(prompt if task != "editing" else prompt + "\n\nsource: " + source, notes)
        return io.NodeOutput(prompt, reply.response, reply.conversation, source,
                             ui=PromptText(shown, prompt=prompt, source_prompt=source, notes=notes, answer_id=answer,
                                           model_prompt=reply.prompt, edit=edit))


NODES = [LLMGAMLLMLoader, LLMGARemoteMLLM, LLMGAPromptGenerator]
