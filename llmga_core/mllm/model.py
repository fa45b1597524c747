"""LLMGA's MLLM: load a released folder and generate answers as the original command-line tools do.

Ports the inference path of LLMGA: llmga/serve/cli.py, cli2.py, cli-sd15-inpainting.py and
cli-sd15-editing.py on top of llmga/llava/model/llava_arch.py (`prepare_inputs_labels_for_multimodal`:
the image features spliced into the embedding sequence at the -200 placeholder) and the
`generate(inputs_embeds=…)` call of the Llava* wrappers, with a KV-cache decode loop of its own (greedy,
or seeded sampling with the original's warpers). Quirks of the original that change tokens are
reproduced; they are listed in QUIRKS.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch import nn

from ..memory import trim_heap_when_freed
from . import images as imaging
from .assistant import Assistant, MLLMInputError, MLLMReply, _Request, _StepCounter  # noqa: F401 (public names)
from .conversation import Conversation
from ..releases import find_vision_tower
from .loader import (FolderInfo, build_language_model, build_projector, check_vision_tower_fits, checkpoint_files,
                     load_vision_tower, load_weights, native_config, recognise, shrink_vocabulary, vision_tower_pixels)
from . import int8_weights, quantization as quantizing
from .sampling import forward_argument_names, next_token, sampling_config
from .prompts import EDITING_FIRST_TURN
from .templates import TEMPLATES
from .tokenization import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, load_tokenizer, tokenizer_image_token

log = logging.getLogger("llmga")

QUIRKS = (
    "Template per family as the original picks it for the released folder names (llava_v1 for Vicuna, with its "
    "'human' system prompt; llava_llama_2; llama_3 with the system header for the assistant; mistral_instruct with "
    "an always-present empty <<SYS>> block; qwen_2 without newlines between turns; phi_3; gemma).",
    "Stored answers keep their decoded end text and the template appends its end marker again (doubled markers).",
    "The printed answer is the stored one minus a fixed number of trailing characters of the auto-detected "
    "template (template= changes the rendering, not this cut, like --conv-mode); cut even when generation stopped "
    "at max_new_tokens.",
    "Caption: text after <gen_image> from index +12 up to </gen_image> (the space before the closing tag stays).",
    "Generation stops only at generation_config.json's eos ids or max_new_tokens (Gemma runs to <eos>); its "
    "repetition_penalty applies in greedy decoding, over the generated ids only.",
    "Sampling uses the folder's top_k (50 when unset) and top_p, as transformers 4.41 did.",
    "CLIP runs in float32 with eager attention on pixels rounded through float16 whatever the LLM's dtype (the CLIs "
    "send preprocess(...)['pixel_values'].half()); features of hidden_states[-2] without CLS, projector in the LLM "
    "dtype.",
    "Image stretched to a max(w, h) square with LANCZOS (not padded); CLIPImageProcessor (PIL) pixels; inpainting/"
    "outpainting holes (mask >= 125/255) blacked at the original resolution first; editing centre-crops to 512x512.",
    "Each chunk around <image> tokenized separately (BOS kept once), features spliced at -200.",
    "Embedding sequence cut to tokenizer_model_max_length (2048) positions when an image is present.",
    "Vocabulary shrunk to len(tokenizer) as resize_token_embeddings did (Qwen2, Phi-3).",
    "Mistral/Qwen2 rotary cos/sin rounded through float16 (the original built them in float16 at load).",
    "Gemma: the spliced image features are scaled by sqrt(hidden) like the text embeddings.",
    "Tokenizers as transformers 4.41 built them (tokenization.py): slow SentencePiece for Vicuna/Llama-2 (one "
    "U+FFFD per undecodable byte), tokenizer.json as saved for the fast families (BOS post-processor from "
    "add_bos_token), 4.41's conversion without it; decode keeps special tokens and applies 4.41's space clean-up "
    "where the folder's clean_up_tokenization_spaces (else the class default) says so.",
)


@dataclass(frozen=True)
class GenerationPlan:
    """What one generate call needs, known before it runs. progress_steps: the most on_token calls
    (max_new_tokens per turn; editing runs two turns). positions: the longest sequence the KV cache holds
    (the prompt with the image's features, cut at the model's position limit as the original cuts it, plus
    the new tokens; for editing the second turn, whose prompt holds the first answer). weights_bytes: the
    modules as loaded; kv_cache_bytes: keys and values of `positions` positions in the LLM's dtype;
    activation_bytes: an upper estimate of the prefill's transient tensors (hidden states, MLP, attention
    scores, the last position's logits, the vision tower's pass)."""

    progress_steps: int
    positions: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    request: Optional[object] = field(default=None, repr=False, compare=False)  # for generate(plan=...)

    @property
    def working_bytes(self) -> int:
        """Memory beyond the weights: what a host makes room for next to the loaded model."""
        return self.kv_cache_bytes + self.activation_bytes


# the original built these families' rotary cos/sin in float16 at load (QUIRKS); others compute them on the fly
FP16_ROTARY_FAMILIES = ("mistral", "qwen2")


class MLLMModules(nn.Module):
    """The weights of one MLLM as a plain module, so a host can move or offload it as a whole."""

    def __init__(self, language_model: nn.Module, vision_tower: nn.Module, mm_projector: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector


def _round_through_fp16(module, args, output):
    return tuple(t.to(torch.float16).to(t.dtype) for t in output)


class LLMGAMLLM(Assistant):
    """A loaded LLMGA MLLM. `generate` runs on the device the modules are on at call time."""

    def __init__(self, info: FolderInfo, modules: MLLMModules, tokenizer, image_pixels: imaging.ClipPixels,
                 template: str):
        self.info = info
        self.model = modules
        self.tokenizer = tokenizer
        self.family = info.family
        self.template = template
        # the CLIs keep slicing output by the automatically chosen template whatever --conv-mode says
        self.output_template = info.template
        self.folder = info.folder
        self.dtype = next(modules.language_model.parameters()).dtype
        self._pixels = image_pixels
        self._max_positions = info.config.get("tokenizer_model_max_length")
        self._select_layer = int(info.config.get("mm_vision_select_layer", -2))
        self._select_feature = info.config.get("mm_vision_select_feature", "patch")
        self._sampling = sampling_config(info)
        # "auto", "compiled", "static" or "dynamic" (the dynamic-cache loop): fast_decode.DECODERS, docs/speed-and-memory.md
        self.decoder = "auto"
        # the CPU step's matrix-vector kernel: None picks it (fast_decode.cpu_linear_choice), or "reduction",
        # "onednn", "default" to compare them (bench_mllm.py)
        self.cpu_linear = None
        # a CPU decode first moves the language model's weights onto transparent huge pages (huge_pages.py)
        self.huge_pages = True

    # ------------------------------------------------------------------------------------- public
    def size_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def plan(self, instruction: str, *, task: str = "chat", image=None, mask=None,
             conversation: Optional[Conversation] = None, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: Optional[float] = None) -> GenerationPlan:
        """Validates the request (as validate) and says what generating it needs: progress steps and memory.
        `generate(..., plan=the plan)` with the same arguments reuses the checked request."""
        request = self._request(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        conv, has_image = request.conversation, request.fingerprint is not None
        first_with_image = has_image and not conv.messages
        if task == "editing":
            first = IMAGE_TOKEN + "\n" + EDITING_FIRST_TURN
            # the stored first answer is at most max_new_tokens tokens, re-tokenized within a few
            prompt = conv.with_turn(first, "").prompt(request.text)
            prefill = self._prompt_positions(prompt, has_image) + max_new_tokens + 8
        else:
            message = IMAGE_TOKEN + "\n" + request.text if first_with_image else request.text
            prefill = self._prompt_positions(conv.prompt(message), has_image)
        if has_image and self._max_positions is not None:
            prefill = min(prefill, int(self._max_positions))
        positions = prefill + max_new_tokens
        cfg = self.model.language_model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        item = torch.finfo(self.dtype).bits // 8
        kv = 2 * cfg.num_hidden_layers * heads * head_dim * item * positions
        activations = self._prefill_activation_bytes(prefill, item, has_image)
        turns = 2 if task == "editing" else 1
        return GenerationPlan(progress_steps=turns * max_new_tokens, positions=positions,
                              weights_bytes=self.size_bytes(), kv_cache_bytes=kv, activation_bytes=activations,
                              request=request)

    def _pixel_values(self, request: _Request):
        """CLIP pixels of the request's image: new ones for a first image, else the conversation's (or None)."""
        if request.seen is None:
            return request.conversation.pixel_values
        if request.task == "editing":
            return self._pixels(imaging.editing_crop(request.seen))
        return self._pixels(imaging.stretch_to_square(Image.fromarray(request.seen)))

    def _prompt_positions(self, prompt: str, has_image: bool) -> int:
        """Positions of a rendered prompt: its tokens, with the image's features in place of <image>."""
        ids = tokenizer_image_token(prompt, self.tokenizer)
        image_places = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        return len(ids) - image_places + (self._image_feature_count() * image_places if has_image else 0)

    def _image_feature_count(self) -> int:
        cfg = self.model.vision_tower.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches + (1 if self._select_feature == "cls_patch" else 0)

    def _prefill_activation_bytes(self, positions: int, item: int, has_image: bool) -> int:
        cfg = self.model.language_model.config
        hidden, layers_wide = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        # residual, norm, q/k/v, attention output (6 × hidden) and gate/up/product (3 × intermediate) per
        # position, the attention scores of one layer when the kernel materialises them, the last logits in fp32
        per_layer = positions * (6 * hidden + 3 * layers_wide) * item
        scores = cfg.num_attention_heads * positions * positions * max(item, 4)
        logits = 2 * cfg.vocab_size * 4
        vision = 0
        if has_image:
            vc = self.model.vision_tower.config
            tokens = self._image_feature_count() + 1
            vision = tokens * (6 * vc.hidden_size + 2 * vc.intermediate_size) * 4 \
                + vc.num_attention_heads * tokens * tokens * 4
        return per_layer + scores + logits + vision

    # ----------------------------------------------------------------------------------- the turns
    def _new_tokens(self, ids, pixels, notes, temperature, top_p, max_new_tokens, seed, counter):
        embeds = self._input_embeddings(ids, pixels, notes)
        return self._decode(embeds, temperature, top_p, max_new_tokens, seed, counter)

    # ----------------------------------------------------------------------------------- the image
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """576×H projected features (LLaVA encode_images) in the LLM dtype."""
        tower = self.model.vision_tower
        tower_param = next(tower.parameters())
        # the CLIs (llmga/serve/cli.py) send `.half()` pixels to the tower in every precision: near a logit tie
        # the rounding decides the token, so a float32 load rounds them too
        pixels = pixel_values.to(torch.float16).to(device=tower_param.device, dtype=tower_param.dtype)
        outputs = tower(pixel_values=pixels, output_hidden_states=True)
        features = outputs.hidden_states[self._select_layer]
        if self._select_feature == "patch":
            features = features[:, 1:]
        elif self._select_feature != "cls_patch":
            raise ValueError(f"mm_vision_select_feature {self._select_feature!r} is not supported.")
        projector_param = next(self.model.mm_projector.parameters())
        features = features.to(device=projector_param.device, dtype=projector_param.dtype)
        features = self.model.mm_projector(features)[0]
        embed = self.model.language_model.get_input_embeddings()
        if self.family == "gemma" and hasattr(embed, "embed_scale"):
            # GemmaModel (4.41) scaled the whole input sequence, image features included; transformers 5 scales
            # in its embedding layer, so only what that layer returns
            hidden = self.model.language_model.config.hidden_size
            features = features * torch.tensor(hidden ** 0.5, dtype=features.dtype)
        return features

    def _input_embeddings(self, ids: list[int], pixel_values, notes: list[str]) -> torch.Tensor:
        embed = self.model.language_model.get_input_embeddings()
        device = embed.weight.device
        positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        text_ids = torch.tensor([t for t in ids if t != IMAGE_TOKEN_INDEX], dtype=torch.long, device=device)
        with torch.inference_mode():
            text = embed(text_ids)
            if pixel_values is None or not positions:
                return text[None]
            if len(positions) > 1:
                raise ValueError("The prompt has more than one <image> place; LLMGA takes one image per conversation.")
            features = self._image_features(pixel_values).to(text.device)
            at = positions[0]
            sequence = torch.cat([text[:at], features, text[at:]], dim=0)
        if self._max_positions is not None and sequence.shape[0] > int(self._max_positions):
            notes.append(f"the prompt with the image is {sequence.shape[0]} positions long; as in the original it was "
                         f"cut to the first {int(self._max_positions)}, so the end of the conversation was dropped "
                         "(start a new conversation)")
            sequence = sequence[: int(self._max_positions)]
        return sequence[None]

    # ---------------------------------------------------------------------------------- decoding
    def _place_on_huge_pages(self) -> None:
        from . import huge_pages

        start = time.perf_counter()
        moved = huge_pages.place(self.model.language_model)
        if moved:
            log.info("LLMGA MLLM: %.1f MB of CPU weights moved onto huge pages in %.1f s (once per load)",
                     moved / 1e6, time.perf_counter() - start)

    def _decode(self, embeds: torch.Tensor, temperature: float, top_p: Optional[float], max_new_tokens: int,
                seed: int, counter: "_StepCounter") -> tuple[list[int], bool]:
        from transformers import DynamicCache

        if embeds.device.type == "cpu" and self.huge_pages:
            self._place_on_huge_pages()
        if self.decoder != "dynamic":  # the static cache and compiled step (fast_decode.py), else the dynamic-cache loop
            from . import fast_decode

            try:
                return fast_decode.decode(self, embeds, temperature, top_p, max_new_tokens, seed, counter,
                                          self.decoder)
            except fast_decode.FastDecodeUnavailable as declined:
                # str(): a log record that kept the error would keep its traceback, and with it the cache
                log.log(logging.WARNING if declined.first else logging.DEBUG,
                        "LLMGA MLLM: %s; decoding with the dynamic cache instead.", str(declined))
        lm = self.model.language_model
        device = embeds.device
        top_p = self._sampling.top_p if top_p is None else float(top_p)
        generator = torch.Generator(device=device).manual_seed(int(seed)) if temperature > 0 else None
        eos = set(self._sampling.eos_ids)
        new_ids: list[int] = []
        generated = torch.empty(max_new_tokens, dtype=torch.long, device=device)
        cache_arg, keep_arg = forward_argument_names(lm)
        with torch.inference_mode():
            try:
                cache = DynamicCache(config=lm.config)
            except TypeError:  # transformers 4
                cache = DynamicCache()
            prefill = {cache_arg: cache, "use_cache": True}
            if keep_arg:
                prefill[keep_arg] = 1  # only the last position's logits (the vocabulary head is large)
            out = lm(inputs_embeds=embeds, **prefill)
            for step in range(max_new_tokens):
                logits = out.logits[0, -1].to(torch.float32)
                token = next_token(self._sampling, logits, generated[:step] if step else None, temperature, top_p,
                                   generator)
                generated[step] = token
                token_id = int(token)
                new_ids.append(token_id)
                counter(token_id)
                if token_id in eos:
                    return new_ids, False
                if step + 1 == max_new_tokens:
                    break
                out = lm(input_ids=generated[step:step + 1].view(1, 1), use_cache=True, **{cache_arg: cache})
        return new_ids, True


def load_mllm(folder, *, vision_tower=None, device=None, dtype: Optional[torch.dtype] = None,
              template: Optional[str] = None, quantization: Optional[str] = None) -> LLMGAMLLM:
    """Load a released LLMGA MLLM folder (any of the seven families, safetensors or .bin, sharded or not).

    vision_tower: the openai/clip-vit-large-patch14-336 folder (or its weights as one .safetensors file), else a
    folder of that name beside or inside the model folder. device: where the modules go (default CPU). dtype:
    the LLM's dtype (default float16 on CUDA, float32 elsewhere); CLIP always runs in float32. template: override
    the conversation template by name. quantization: None; "int8", the pack's own 8-bit weights (blocks of 32
    with a float16 scale, LM head included; int8_weights.py), the fast 8-bit choice on CPUs; or "8bit"
    (LLM.int8()) / "4bit" (NF4) for the LLM's decoder layers through bitsandbytes, as the original's
    --load-8bit / --load-4bit (needs bitsandbytes).
    """
    info = recognise(Path(folder))
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; one of {', '.join(TEMPLATES)}.")
    quantization = quantizing.normalise(quantization)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float16, torch.bfloat16 or torch.float32.")
    # everything that can fail cheaply first
    tower_path = find_vision_tower(info.folder, info.config, vision_tower)
    files = checkpoint_files(info.folder)
    check_vision_tower_fits(tower_path, files, info.config)
    if quantization in quantizing.MODES:
        quantizing.check_available(quantization, device, dtype)
    tokenizer = load_tokenizer(info.folder, info.family)
    pixels = vision_tower_pixels(tower_path)

    config = native_config(info, dtype)
    language_model = build_language_model(config, dtype)
    projector = build_projector(info.config, config.hidden_size, dtype)
    if quantization == "int8":
        quantizer = int8_weights.Int8Quantizer(language_model)
    elif quantization is not None:
        quantizer = quantizing.LinearQuantizer(language_model, quantization, dtype, device)
    else:
        quantizer = None
    load_weights(files, language_model, projector, tied=bool(getattr(config, "tie_word_embeddings", False)),
                 on_loaded=quantizer.loaded if quantizer else None)
    shrink_vocabulary(language_model, len(tokenizer))
    if quantizer is not None:
        quantizer.finish()  # after the shrink: the int8 format quantises the LM head too
    if info.family in FP16_ROTARY_FAMILIES and dtype != torch.float16:
        for module in language_model.modules():  # one per model; one per attention layer before transformers 4.48
            if type(module).__name__.endswith("RotaryEmbedding"):
                module.register_forward_hook(_round_through_fp16)
    tower = load_vision_tower(tower_path)
    modules = MLLMModules(language_model, tower, projector).to(device)
    trim_heap_when_freed(modules)  # so the host's /free gives the RAM back
    model = LLMGAMLLM(info, modules, tokenizer, pixels, template or info.template)
    model.quantization = quantization  # None, "int8", "8bit" or "4bit"
    return model
