"""LLMGA long-prompt CLIP encoding as a ComfyUI node (LLMGALongCLIPTextEncode).

The algorithm is llmga_core.long_prompt (a port of LLMGA's lpw / SDXL long-prompt encoders); this
node only supplies its backend: the host's CLIP object. It hands the host ready-made token rows
with every weight 1.0, so the host adds no emphasis of its own and never reads brackets as
ComfyUI weights, while its clip-skip (CLIPSetLastLayer), LoRA patches and hooks still apply.
"""
from __future__ import annotations

import warnings

from comfy_api.latest import io, ui

from ..llmga_core.long_prompt import (PIPELINES, PromptCharactersDroppedWarning, PromptTruncatedWarning,
                                      encode_with_backend, recipe_for)
from .host_clip import clip_family, host_chunk_encoder, host_tokenizer_specs
from .notes import log_notes, shown_text

PIPELINE_CHOICES = ["auto", *PIPELINES]
# what the library warns about the text: logged and shown on the node
SHOWN_WARNINGS = (PromptTruncatedWarning, PromptCharactersDroppedWarning)


def resolve_pipeline(clip, pipeline: str) -> str:
    """The LLMGA pipeline to encode for; refuses a CLIP that does not fit it, in one sentence."""
    if pipeline not in PIPELINE_CHOICES:
        raise ValueError(f"Unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINE_CHOICES)}.")
    family = clip_family(clip)
    if family is None:
        raise ValueError(f"LLMGA long-prompt encoding needs an SD1.5 CLIP (CLIP-L) or an SDXL CLIP "
                         f"(CLIP-L + CLIP-G), but the connected CLIP is {type(clip.cond_stage_model).__name__}; "
                         f"load the CLIP of an LLMGA SD1.5 or SDXL checkpoint.")
    if pipeline == "auto":
        return family
    wanted = "sdxl" if pipeline.startswith("sdxl") else "sd15"
    if wanted != family:
        have = "an SDXL CLIP" if family == "sdxl" else "an SD1.5 CLIP"
        need = "an SDXL CLIP (CLIP-L + CLIP-G)" if wanted == "sdxl" else "an SD1.5 CLIP (CLIP-L)"
        raise ValueError(f"Pipeline {pipeline!r} needs {need}, but the connected CLIP is {have}; "
                         f"choose 'auto' or a pipeline of the CLIP's family.")
    return pipeline


class LLMGALongCLIPTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGALongCLIPTextEncode",
            display_name="LLMGA Long-Prompt CLIP Text Encode",
            category="LLMGA/conditioning",
            description="Encodes a long prompt (such as an LLMGA MLLM caption) the way LLMGA's SD1.5 and SDXL "
                        "pipelines do: up to 225/300 tokens in 75-token chunks, SD1.5 with A1111 (x:1.2) weights, "
                        "SDXL with raw text, pooled output from the last chunk and an all-zero negative.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of an SD1.5 or SDXL checkpoint (CLIPSetLastLayer and "
                                              "CLIP LoRAs apply)."),
                io.String.Input("text", multiline=True, dynamic_prompts=False,
                                tooltip="The prompt. Long text is fine: LLMGA keeps 225 tokens (sd15) or 300 "
                                        "(sd15-inpaint, SDXL) and warns in the log when it cuts."),
                io.Combo.Input("pipeline", options=PIPELINE_CHOICES, default="auto",
                               tooltip="Which LLMGA pipeline to match. auto: sdxl for an SDXL CLIP, else sd15 "
                                       "(text-to-image, 225 tokens). sd15-inpaint keeps 300 tokens."),
                io.String.Input("negative_text", display_name="negative", multiline=True, default="",
                                dynamic_prompts=False, optional=True,
                                tooltip="Negative prompt. Empty is LLMGA's default: for SD1.5 the empty prompt "
                                        "padded to the positive's chunk count, for SDXL all zeros. A non-empty "
                                        "SDXL negative is encoded on its own, so its length may differ from the "
                                        "positive's (the sampler handles that)."),
                io.Combo.Input("layout", options=["inference", "training"], default="inference", optional=True,
                               tooltip="SD1.5 only. inference: what LLMGA's generation code gives (weights "
                                       "parsed, 77 per chunk). training: how stage 2 encoded captions (raw "
                                       "text, 300 tokens, 75 per chunk + 2). SDXL has a single layout."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive"),
                io.Conditioning.Output("negative", display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, clip, text, pipeline="auto", negative_text="", layout="inference") -> io.NodeOutput:
        if clip is None:
            raise ValueError("The clip input is empty; connect the CLIP output of a checkpoint or CLIP loader.")
        pipeline = resolve_pipeline(clip, pipeline)
        recipe = recipe_for(pipeline, layout)
        specs = host_tokenizer_specs(clip, recipe.encoders)

        with warnings.catch_warnings(record=True) as caught:
            for shown in SHOWN_WARNINGS:
                warnings.simplefilter("always", shown)
            embeds = encode_with_backend(text, negative_text, tokenizers=specs, recipe=recipe,
                                         encode_chunks=host_chunk_encoder(clip, recipe))
        notes = []
        for w in caught:
            if issubclass(w.category, SHOWN_WARNINGS):
                notes.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        notes = log_notes("LLMGA long prompt", notes)

        # Width/height stay unset: the sampler fills them from the latent size and SDXL's encode_adm
        # then builds (H, W, 0, 0, H, W), which is LLMGA's add_time_ids.
        def conditioning(cond, pooled):
            extra = {} if pooled is None else {"pooled_output": pooled}
            return [[cond, clip.add_hooks_to_dict(extra)]]

        positive = conditioning(embeds["prompt_embeds"], embeds.get("pooled_prompt_embeds"))
        negative = conditioning(embeds["negative_prompt_embeds"], embeds.get("negative_pooled_prompt_embeds"))
        # cut prompts and dropped characters are shown on the node (web/js/llmga_text.js), not only logged
        return io.NodeOutput(positive, negative, ui=ui.PreviewText(shown_text("", notes)) if notes else None)


NODES = [LLMGALongCLIPTextEncode]
