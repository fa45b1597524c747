"""The host's CLIP as LLMGA's long-prompt encoding needs it, for every node that encodes text (the long-prompt
encoder and the editing node): which family a CLIP is, its tokenizers with their BOS/EOS/pad ids, and one
encode_from_tokens call per prompt, so the host's clip-skip, LoRA patches and hooks apply.
"""
from __future__ import annotations

import comfy.sd1_clip
import comfy.sdxl_clip

from ..llmga_core.long_prompt import CHUNK_LENGTH, TokenizerSpec


def clip_family(clip) -> str | None:
    """"sdxl" for an SDXL CLIP (CLIP-L + CLIP-G), "sd15" for an SD1.x CLIP-L, else None."""
    model, tokenizer = clip.cond_stage_model, clip.tokenizer
    if isinstance(model, comfy.sdxl_clip.SDXLClipModel) and isinstance(tokenizer, comfy.sdxl_clip.SDXLTokenizer):
        return "sdxl"
    if (isinstance(model, comfy.sd1_clip.SD1ClipModel) and getattr(model, "clip", None) == "clip_l"
            and isinstance(getattr(tokenizer, "clip_l", None), comfy.sd1_clip.SDTokenizer)):
        return "sd15"
    return None


def host_tokenizer_specs(clip, encoders) -> dict[str, TokenizerSpec]:
    """The host's own CLIP tokenizers (transformers CLIPTokenizer) with the host's BOS/EOS/pad ids,
    which are LLMGA's: pad 49407 for CLIP-L, 0 ("!") for CLIP-G. The library cleans and splits the text as
    LLMGA's tokenizer did (llmga_core.long_prompt.clip_token_ids); only the BPE of each word is the host's."""
    specs = {}
    for key in encoders:
        host_tokenizer = getattr(clip.tokenizer, f"clip_{key}")
        if host_tokenizer.max_length != CHUNK_LENGTH:
            raise ValueError(f"This CLIP reads {host_tokenizer.max_length}-token windows; LLMGA's encoding "
                             f"needs a standard {CHUNK_LENGTH}-token CLIP.")
        specs[key] = TokenizerSpec(host_tokenizer.tokenizer, host_tokenizer.start_token,
                                   host_tokenizer.end_token, host_tokenizer.pad_token)
    return specs


def host_chunk_encoder(clip, recipe):
    """ChunkEncoder on the host CLIP: one encode_from_tokens call per prompt.

    The host encodes every 77-token row on its own, joins them along the sequence and pools the first
    row, which is the ChunkEncoder contract (POOLED_CHUNK = 0), so the chunks go to it as given.
    """
    def encode_chunks(chunks: dict[str, list[list[int]]]):
        tokens = {key: [[(int(t), 1.0) for t in chunk] for chunk in chunks[key]] for key in recipe.encoders}
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return cond.reshape(-1, CHUNK_LENGTH, cond.shape[-1]), pooled

    return encode_chunks
