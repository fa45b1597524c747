"""LLMGA's long-prompt CLIP encoding, host-free.

Ports the prompt encoders that LLMGA runs in front of its fine-tuned Stable Diffusion UNets:
- SD1.5 inference: the community `lpw_stable_diffusion` pipeline that LLMGA's cli-sd15 loads
  (`get_weighted_text_embeddings`), and LLMGA's llmga/diffusers/pipeline_stable_diffusion_inpaint_lpw.py
  for the inpainting model (same algorithm, 4 chunks instead of 3);
- SD1.5 stage-2 training: llmga/diffusers/my_utils/util.py `get_text_index` +
  `get_unweighted_text_embeddings` as called by llmga/diffusers/train_text_to_image*.py;
- SDXL (training and inference alike): llmga/diffusers/pipeline_stable_diffusion_xl_lpw.py
  `encode_prompt` with util.py `get_unweighted_text_embeddings_SDXL1/_SDXL2`.

One algorithm, two backends. Everything that turns text into chunk ids and chunk outputs into the
final embedding is pure (functions over a tokenizer and tensors); the CLIP forward pass is a
callable, `ChunkEncoder`, that encodes a list of 77-id chunks. `encode_prompt` plugs in
transformers text models; the ComfyUI node plugs in the host's CLIP object so that its clip-skip
and LoRA patches apply.

Text becomes ids as LLMGA's own CLIP tokenizer made them (transformers 4's slow CLIPTokenizer without ftfy,
clip_tokenizer.py), whatever tokenizer the host has; only the BPE of each word is the host's.
"""
from __future__ import annotations

import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .clip_tokenizer import (TokenizerSpec, clean_clip_text, clip_token_ids,  # noqa: F401 (public here too)
                             is_dropped_character, tokenizer_spec)

CHUNK_LENGTH = 77            # CLIP positions: BOS + 75 tokens + EOS
CHUNK_TOKENS = CHUNK_LENGTH - 2

PIPELINES = ("sd15", "sd15-inpaint", "sdxl", "sdxl-inpaint")
LAYOUTS = ("inference", "training")


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than LLMGA's encoder keeps; the tail was dropped as the original does."""


class PromptCharactersDroppedWarning(UserWarning):
    """LLMGA's CLIP tokenizer (transformers 4's CLIPTokenizer without ftfy) turns some characters of a prompt into
    no token at all, so the text encoder never sees them: NUL, U+FFFD and every control, format (U+200B, U+00AD,
    bidi marks), surrogate, private-use or unassigned character except tab, LF and CR. The pack drops the same ones
    (`is_dropped_character`); every other script is kept, as UTF-8 byte pieces."""


# --------------------------------------------------------------------------------------------
# A1111 attention syntax, as lpw_stable_diffusion parses it
# --------------------------------------------------------------------------------------------

ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1

# Alternatives are tried in order at each position, which is what makes "\(" an escape and
# ":1.3)" a weight only right after text inside "(".
_ATTENTION_PIECE = re.compile(
    r"""
      \\[()\[\]\\]          # escaped bracket or backslash: the literal character
    | \\                    # any other backslash: dropped
    | [(\[]                 # opening bracket
    | :([+-]?[.\d]+)\)      # ":<number>)" closes "(" with an explicit factor
    | [)\]]                 # closing bracket
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that starts no weight is text
    """,
    re.X,
)


def parse_prompt_attention(text: str) -> list[list]:
    """Splits `text` into [[run, weight], ...] with the A1111 rules lpw_stable_diffusion uses.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3, nesting multiplies,
    `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, an unclosed bracket applies to the rest of
    the prompt, a `:number)` with no open `(` is literal text, adjacent runs of equal weight merge,
    and "" gives [["", 1.0]]. One deliberate difference: where the original raises ValueError on a
    factor that is not a number (`(v:1.2.3)`), the factor text is kept literally and the bracket
    counts as a plain `( )`.
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_PIECE.finditer(text):
        piece, factor = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif factor is not None and open_round:
            try:
                value = float(factor)
            except ValueError:
                runs.append([piece[:-1], 1.0])
                value = ROUND_BRACKET_FACTOR
            scale_from(open_round.pop(), value)
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            runs.append([piece, 1.0])

    for start in open_round:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    if not runs:
        return [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return merged


# --------------------------------------------------------------------------------------------
# What each LLMGA pipeline does
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodingRecipe:
    """LLMGA's encoding choices for one pipeline and layout."""

    pipeline: str
    layout: str
    encoders: tuple[str, ...]     # "l" (CLIP-L) and, for SDXL, "g" (CLIP-G), in channel order
    max_chunks: int               # cap = 75 * max_chunks tokens
    parse_weights: bool           # A1111 attention syntax + weighting (SD1.5 inference only)
    whole_chunks: bool            # True: 77·n (every chunk keeps BOS/EOS); False: 75·n+2
    pooled: bool                  # SDXL: CLIP-G text_embeds of the last chunk
    zero_empty_negative: bool     # SDXL force_zeros_for_empty_prompt
    shared_chunk_count: bool      # SD1.5: the negative gets the prompt's chunk count (lpw); SDXL: each its own

    @property
    def max_tokens(self) -> int:
        return CHUNK_TOKENS * self.max_chunks

    @property
    def is_sdxl(self) -> bool:
        return "g" in self.encoders


def recipe_for(pipeline: str, layout: str = "inference") -> EncodingRecipe:
    """The recipe of `pipeline` ("sd15", "sd15-inpaint", "sdxl", "sdxl-inpaint") and `layout`.

    layout "inference" (the default) is what LLMGA's generation code runs; "training" is how stage 2
    encoded captions. They differ only for SD1.5; SDXL uses the same code for both.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"Unknown pipeline {pipeline!r}; use one of {', '.join(PIPELINES)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; use 'inference' (LLMGA's generation code) "
                         f"or 'training' (how stage 2 encoded captions).")
    if pipeline.startswith("sdxl"):
        return EncodingRecipe(pipeline, layout, ("l", "g"), max_chunks=4, parse_weights=False,
                              whole_chunks=False, pooled=True, zero_empty_negative=True,
                              shared_chunk_count=False)
    if layout == "training":
        return EncodingRecipe(pipeline, layout, ("l",), max_chunks=4, parse_weights=False,
                              whole_chunks=False, pooled=False, zero_empty_negative=False,
                              shared_chunk_count=True)
    return EncodingRecipe(pipeline, layout, ("l",), max_chunks=3 if pipeline == "sd15" else 4,
                          parse_weights=True, whole_chunks=True, pooled=False,
                          zero_empty_negative=False, shared_chunk_count=True)


# --------------------------------------------------------------------------------------------
# Pure part: text -> chunk ids (and per-position weights)
# --------------------------------------------------------------------------------------------

def tokenize_prompt(text: str, spec: TokenizerSpec, recipe: EncodingRecipe) -> tuple[list[int], list[float] | None]:
    """All content ids of `text` (no BOS/EOS, not yet capped) and, with weight parsing, their weights.

    With parsing (SD1.5 inference) every attention run is tokenized on its own, as lpw does;
    without it the whole text is tokenized at once, as LLMGA's get_text_index does. `spec` may also be
    a bare tokenizer (its own special ids).
    """
    if not isinstance(spec, TokenizerSpec):
        spec = tokenizer_spec(spec)
    if not recipe.parse_weights:
        return clip_token_ids(text, spec), None
    ids: list[int] = []
    weights: list[float] = []
    for run, weight in parse_prompt_attention(text):
        run_ids = clip_token_ids(run, spec)
        ids += run_ids
        weights += [weight] * len(run_ids)
    return ids, weights


def plain_chunk_ids(text: str, spec: TokenizerSpec) -> list[int]:
    """A plain diffusers tokenizer call padded to 77 and sliced to 77 (the editing inversion's source):
    BOS, ids, EOS, pad…, or BOS and the first 76 ids with no EOS when longer; brackets are literal."""
    ids = [spec.bos, *clip_token_ids(text, spec), spec.eos][:CHUNK_LENGTH]
    return ids + [spec.pad] * (CHUNK_LENGTH - len(ids))


def chunk_count(token_count: int, max_chunks: int) -> int:
    """n = max(1, ceil(L / 75)), at most `max_chunks`."""
    return max(1, min(max_chunks, math.ceil(token_count / CHUNK_TOKENS)))


def chunk_ids(ids: Sequence[int], n_chunks: int, spec: TokenizerSpec) -> list[list[int]]:
    """LLMGA's id windows: the sequence BOS, ids, pad…, EOS of length 75·n+2 cut into n windows of 77
    (window i starts at 75·i) whose first id is made BOS and last id EOS."""
    if len(ids) > CHUNK_TOKENS * n_chunks:
        raise ValueError(f"{len(ids)} ids do not fit in {n_chunks} chunks of {CHUNK_TOKENS}.")
    body = list(ids) + [spec.pad] * (CHUNK_TOKENS * n_chunks - len(ids))
    return [[spec.bos, *body[CHUNK_TOKENS * i:CHUNK_TOKENS * (i + 1)], spec.eos] for i in range(n_chunks)]


def chunk_weights(weights: Sequence[float], n_chunks: int) -> list[float]:
    """Per-position weights for the 77·n layout: 1.0 at every BOS, EOS and pad."""
    body = list(weights) + [1.0] * (CHUNK_TOKENS * n_chunks - len(weights))
    out: list[float] = []
    for i in range(n_chunks):
        out += [1.0, *body[CHUNK_TOKENS * i:CHUNK_TOKENS * (i + 1)], 1.0]
    return out


@dataclass
class PromptChunks:
    """One prompt laid out for the encoder(s)."""

    chunks: dict[str, list[list[int]]]   # encoder key -> n chunks of 77 ids
    weights: list[float] | None          # 77·n weights (SD1.5 inference), else None
    token_count: int                     # tokens in the prompt before the cap
    kept_tokens: int

    @property
    def n_chunks(self) -> int:
        return len(next(iter(self.chunks.values())))


# how a note names the encoding that cut a prompt, in a user's words
PIPELINE_WORDS = {"sd15": "SD1.5 text-to-image", "sd15-inpaint": "SD1.5 inpainting", "sdxl": "SDXL text-to-image",
                  "sdxl-inpaint": "SDXL inpainting"}


def _warn_truncated(what: str, token_count: int, kept: int, recipe: EncodingRecipe) -> str:
    message = (f"The {what} has {token_count} tokens; LLMGA's {PIPELINE_WORDS[recipe.pipeline]} pipeline encodes "
               f"at most {kept}, so it keeps the first {kept} and drops the rest.")
    warnings.warn(PromptTruncatedWarning(message), stacklevel=3)
    return message


def dropped_characters(text: str, tokenizer=None) -> list[str]:
    """The characters of `text`, in order of first appearance, that LLMGA's CLIP tokenizer (transformers 4's
    CLIPTokenizer without ftfy) turns into no token, and so does this encoder: see `is_dropped_character`.
    Whitespace only separates words and is not counted. `tokenizer` is not needed (the rule is the original's
    whatever tokenizer the host has) and is accepted for callers that pass one.
    """
    return [c for c in dict.fromkeys(text) if is_dropped_character(c)]


def _describe_characters(text: str, characters: list[str], limit: int = 6) -> str:
    named = []
    for c in characters[:limit]:
        count = text.count(c)
        named.append(f"U+{ord(c):04X} ({unicodedata.name(c, 'unnamed').lower()})" + (f" ×{count}" if count > 1 else ""))
    more = len(characters) - limit
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")


def _warn_dropped(what: str, text: str, characters: list[str]) -> str:
    message = (f"The {what} has characters that CLIP's tokenizer drops, so the text encoder never sees them: "
               f"{_describe_characters(text, characters)}; remove or replace them.")
    warnings.warn(PromptCharactersDroppedWarning(message), stacklevel=3)
    return message


def plan_prompts(prompt: str, negative_prompt: str | None, *, tokenizers: dict[str, TokenizerSpec],
                 recipe: EncodingRecipe) -> tuple[PromptChunks, PromptChunks | None]:
    """Chunk ids for the prompt and the negative (None = SDXL zeros).

    The negative defaults to "" (lpw's default). SD1.5 gives both the longer one's chunk count, as
    lpw does (and as training's batch padding did). SDXL plans each on its own, as LLMGA's SDXL
    encoder does (own chunk count, EOS and pooled chunk), so the prompt's ids never depend on the
    negative. Cut prompts raise PromptTruncatedWarning; characters the tokenizer drops raise
    PromptCharactersDroppedWarning.
    """
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"The {name} must be a string, not {type(text).__name__}.")
    missing = [key for key in recipe.encoders if key not in tokenizers]
    if missing:
        raise ValueError(f"LLMGA's {recipe.pipeline} encoding needs tokenizers for {recipe.encoders}; "
                         f"missing {missing}.")

    zero_negative = recipe.zero_empty_negative and not negative_prompt
    texts = {"prompt": prompt}
    if not zero_negative:
        texts["negative prompt"] = negative_prompt or ""

    tokenized: dict[str, dict[str, tuple[list[int], list[float] | None]]] = {}
    for what, text in texts.items():
        tokenized[what] = {key: tokenize_prompt(text, tokenizers[key], recipe) for key in recipe.encoders}
        # what reaches the tokenizer: with weight parsing the runs, without their brackets
        seen = "".join(run for run, _ in parse_prompt_attention(text)) if recipe.parse_weights else text
        dropped = dropped_characters(seen)
        if dropped:
            _warn_dropped(what, seen, dropped)

    # SDXL: tokenizer_2 makes every "!" its own id, so its count can exceed CLIP-L's; where that changes the chunk
    # count the original's torch.concat of the two encoders fails, and here both get the larger count.
    def kept_length(what: str) -> int:
        return min(recipe.max_tokens, max(len(ids) for ids, _ in tokenized[what].values()))

    shared = chunk_count(max(kept_length(what) for what in texts), recipe.max_chunks)

    plans: dict[str, PromptChunks] = {}
    for what in texts:
        n_chunks = shared if recipe.shared_chunk_count else chunk_count(kept_length(what), recipe.max_chunks)
        token_count = max(len(ids) for ids, _ in tokenized[what].values())
        if token_count > recipe.max_tokens:
            _warn_truncated(what, token_count, recipe.max_tokens, recipe)
        chunks, weights = {}, None
        for key in recipe.encoders:
            ids, key_weights = tokenized[what][key]
            chunks[key] = chunk_ids(ids[:recipe.max_tokens], n_chunks, tokenizers[key])
            if key_weights is not None and weights is None:
                weights = chunk_weights(key_weights[:recipe.max_tokens], n_chunks)
        plans[what] = PromptChunks(chunks, weights, token_count, min(token_count, recipe.max_tokens))
    return plans["prompt"], plans.get("negative prompt")


# --------------------------------------------------------------------------------------------
# Pure part: chunk outputs -> prompt embedding
# --------------------------------------------------------------------------------------------

def join_chunks(hidden: torch.Tensor, plan: PromptChunks, recipe: EncodingRecipe) -> torch.Tensor:
    """[n, 77, C] chunk outputs -> [1, L, C] prompt embedding.

    Whole chunks (SD1.5 inference, L = 77·n) get lpw's weighting: m0 = mean of the whole tensor,
    rows × weight, m1 = new mean, everything × m0/m1 (means in fp32 as lpw takes them). Otherwise
    (L = 75·n+2) chunk 0 loses its last row, the last chunk its first, middle chunks both.
    """
    n = hidden.shape[0]
    if n != plan.n_chunks or hidden.shape[1] != CHUNK_LENGTH:
        raise ValueError(f"Expected {plan.n_chunks} chunk outputs of {CHUNK_LENGTH} rows, "
                         f"got {tuple(hidden.shape)}.")
    if recipe.whole_chunks:
        joined = hidden.reshape(1, n * CHUNK_LENGTH, hidden.shape[-1])
        if recipe.parse_weights and plan.weights is not None:
            weights = torch.tensor(plan.weights, dtype=joined.dtype, device=joined.device)
            mean_before = joined.float().mean(dim=(-2, -1)).to(joined.dtype)
            joined = joined * weights[None, :, None]
            mean_after = joined.float().mean(dim=(-2, -1)).to(joined.dtype)
            joined = joined * (mean_before / mean_after)[:, None, None]
        return joined
    if n == 1:
        return hidden[:1]
    pieces = [hidden[0, :-1]] + [hidden[i, 1:-1] for i in range(1, n - 1)] + [hidden[n - 1, 1:]]
    return torch.cat(pieces, dim=0)[None]


# --------------------------------------------------------------------------------------------
# The algorithm over any backend
# --------------------------------------------------------------------------------------------

ChunkEncoder = Callable[[dict[str, list[list[int]]]], tuple[torch.Tensor, "torch.Tensor | None"]]
"""Encodes chunks: {encoder key: k chunks of 77 ids} -> (hidden [k, 77, C] with the encoders joined
on channels in recipe order, pooled [1, P] of chunk POOLED_CHUNK of those given, or None when the
recipe needs none). Each chunk must be encoded on its own (no attention across chunks)."""

# The chunk a ChunkEncoder pools: the first, which is the host CLIP's own rule, so that backend passes
# the chunks through as given; the algorithm sends the chunk LLMGA pools (the prompt's last) there.
POOLED_CHUNK = 0


def _encode_distinct(plan: PromptChunks, encode_chunks: ChunkEncoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the backend once per distinct chunk (a "" negative padded to n chunks is n equal ones)
    and returns the [n, 77, C] outputs in prompt order plus the pooled output of the last chunk."""
    keys = list(plan.chunks)
    rows = [tuple(tuple(plan.chunks[key][i]) for key in keys) for i in range(plan.n_chunks)]
    pooled_row = rows[-1]  # LLMGA pools the prompt's last chunk
    order = [row for row in dict.fromkeys(rows) if row != pooled_row]
    order.insert(POOLED_CHUNK, pooled_row)
    position = {row: i for i, row in enumerate(order)}
    hidden, pooled = encode_chunks({key: [list(row[k]) for row in order] for k, key in enumerate(keys)})
    index = torch.tensor([position[row] for row in rows], device=hidden.device)
    return hidden.index_select(0, index), pooled


def encode_planned(plan: PromptChunks, recipe: EncodingRecipe,
                   encode_chunks: ChunkEncoder) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One planned prompt -> (embedding [1, L, C], pooled [1, P] or None)."""
    hidden, pooled = _encode_distinct(plan, encode_chunks)
    if recipe.pooled and pooled is None:
        raise ValueError(f"LLMGA's {recipe.pipeline} encoding needs the CLIP-G pooled output, "
                         f"but the text encoder returned none.")
    return join_chunks(hidden, plan, recipe), (pooled if recipe.pooled else None)


def encode_with_backend(prompt: str, negative_prompt: str | None, *, tokenizers: dict[str, TokenizerSpec],
                        recipe: EncodingRecipe, encode_chunks: ChunkEncoder) -> dict[str, torch.Tensor]:
    """LLMGA's encoding of a prompt pair over any backend; diffusers key names."""
    positive_plan, negative_plan = plan_prompts(prompt, negative_prompt, tokenizers=tokenizers, recipe=recipe)
    prompt_embeds, pooled = encode_planned(positive_plan, recipe, encode_chunks)
    if negative_plan is None:   # SDXL force_zeros_for_empty_prompt
        negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = encode_planned(negative_plan, recipe, encode_chunks)
    out = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    if recipe.pooled:
        out["pooled_prompt_embeds"] = pooled
        out["negative_pooled_prompt_embeds"] = negative_pooled
    return out


# --------------------------------------------------------------------------------------------
# transformers backend
# --------------------------------------------------------------------------------------------

def transformers_chunk_encoder(text_encoders: dict[str, torch.nn.Module], recipe: EncodingRecipe) -> ChunkEncoder:
    """A ChunkEncoder over transformers CLIPTextModel / CLIPTextModelWithProjection.

    SD1.5: last_hidden_state (last layer with final LayerNorm). SDXL: hidden_states[-2] of both
    encoders (no final LayerNorm), pooled = CLIP-G text_embeds. Chunks are batched; CLIP has no
    attention across batch rows, so this equals LLMGA's one-call-per-chunk loop.
    """
    def encode_chunks(chunks: dict[str, list[list[int]]]):
        parts, pooled = [], None
        for key in recipe.encoders:
            model = text_encoders[key]
            ids = torch.tensor(chunks[key], dtype=torch.long, device=model.device)
            with torch.inference_mode():
                if recipe.is_sdxl:
                    out = model(ids, output_hidden_states=True)
                    parts.append(out.hidden_states[-2])
                    if key == "g":
                        pooled = out.text_embeds[POOLED_CHUNK:POOLED_CHUNK + 1]
                else:
                    parts.append(model(ids).last_hidden_state)
        hidden = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1)
        return hidden, pooled

    return encode_chunks


def _as_list(value, what: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if value is None:
        raise ValueError(f"encode_prompt needs {what}.")
    return [value]


def encode_prompt(prompt: str, negative_prompt: str | None = None, *, tokenizers, text_encoders,
                  pipeline: str, layout: str = "inference") -> dict[str, torch.Tensor]:
    """LLMGA's long-prompt encoding with transformers CLIP models; returns diffusers' keyword names.

    tokenizers / text_encoders: SD1.5 one CLIPTokenizer and one CLIPTextModel; SDXL the pipeline's
    (tokenizer, tokenizer_2) and (text_encoder, text_encoder_2 = CLIPTextModelWithProjection).
    pipeline: "sd15" (cap 225 tokens), "sd15-inpaint" (300), "sdxl", "sdxl-inpaint" (300).
    layout: "inference" (default) is what LLMGA's generation code gives; for SD1.5 that is the
    lpw encoding: A1111 weights, every chunk whole (77·n). "training" is the SD1.5 stage-2 layout:
    raw text, cap 300, 75·n+2 with inner BOS/EOS dropped. SDXL has one layout (75·n+2, penultimate
    layers, pooled from the last chunk, zeros for a None or "" negative; a non-empty negative is
    encoded on its own, with its own chunk count, exactly as the prompt would be).

    Returns {"prompt_embeds", "negative_prompt_embeds"} plus, for SDXL, {"pooled_prompt_embeds",
    "negative_pooled_prompt_embeds"}, so `pipe(**embeds)` works. A prompt over the cap is cut and
    a PromptTruncatedWarning gives its token count. An SDXL negative with another chunk count
    (⌈tokens/75⌉) than the prompt gives embeddings of another length, which diffusers' pipelines
    cannot concatenate for guidance, so write the negative with the prompt's chunk count or run the
    two guidance halves through the UNet separately (as ComfyUI does); the prompt is never padded.
    """
    recipe = recipe_for(pipeline, layout)
    tokenizer_list = _as_list(tokenizers, "tokenizers")
    encoder_list = _as_list(text_encoders, "text_encoders")
    expected = len(recipe.encoders)
    if len(tokenizer_list) != expected or len(encoder_list) != expected:
        kind = "SDXL" if recipe.is_sdxl else "SD1.5"
        raise ValueError(f"The {pipeline} pipeline needs {expected} tokenizer(s) and {expected} text "
                         f"encoder(s) ({kind}); got {len(tokenizer_list)} and {len(encoder_list)}.")
    if recipe.is_sdxl and not hasattr(encoder_list[1], "text_projection"):
        raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (text_encoder_2).")
    specs = {key: tokenizer_spec(tok) for key, tok in zip(recipe.encoders, tokenizer_list)}
    models = dict(zip(recipe.encoders, encoder_list))
    return encode_with_backend(prompt, negative_prompt, tokenizers=specs, recipe=recipe,
                               encode_chunks=transformers_chunk_encoder(models, recipe))
