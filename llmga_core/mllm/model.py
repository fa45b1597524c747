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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image
from torch import nn

from . import images as imaging
from .conversation import Conversation
from .loader import (FolderInfo, build_language_model, build_projector, checkpoint_files, find_vision_tower,
                     load_vision_tower, load_weights, native_config, recognise, shrink_vocabulary)
from .prompts import EDITING_FIRST_TURN, TASKS, parse_generation_prompt, user_text
from .templates import TEMPLATES, cut_output
from .tokenization import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, decode_answer, load_tokenizer, tokenizer_image_token

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
    "CLIP runs in float32 with eager attention on pixels rounded through float16 when the LLM runs in 16 bits; "
    "features of hidden_states[-2] without CLS, projector in the LLM dtype.",
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


@dataclass
class MLLMReply:
    """token_ids: the new tokens; response: the answer as the original prints it; prompt: the caption
    parsed from <gen_image>…</gen_image>; prompt_found: whether <gen_image> occurred; conversation: pass
    it to the next call; notes: warnings in plain words; source_prompt: the source caption (editing)."""

    token_ids: list[int]
    response: str
    prompt: str
    prompt_found: bool
    conversation: Conversation
    notes: list[str] = field(default_factory=list)
    source_prompt: Optional[str] = None


class MLLMModules(nn.Module):
    """The weights of one MLLM as a plain module, so a host can move or offload it as a whole."""

    def __init__(self, language_model: nn.Module, vision_tower: nn.Module, mm_projector: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector


@dataclass
class _Sampling:
    eos_ids: tuple[int, ...]
    repetition_penalty: float
    top_k: int
    top_p: float


def _round_through_fp16(module, args, output):
    return tuple(t.to(torch.float16).to(t.dtype) for t in output)


class LLMGAMLLM:
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
        self._sampling = self._sampling_config(info)

    # ------------------------------------------------------------------------------------- public
    def size_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def new_conversation(self) -> Conversation:
        return Conversation(self.template)

    def generate(self, instruction: str, *, task: str = "chat", image=None, mask=None,
                 conversation: Optional[Conversation] = None, temperature: float = 0.0, top_p: Optional[float] = None,
                 max_new_tokens: int = 512, seed: int = 0,
                 on_token: Optional[Callable[[int, int], None]] = None) -> MLLMReply:
        """One turn of the conversation (two for task="editing").

        instruction: the user's text. task: "chat" sends it verbatim; "text-to-image" sends "Generate an image
        based on given keywords. " + it; "similar-image" / "inpainting" / "outpainting" send it, or when empty
        "Generate a similar image." / "Please inpaint this image." / "Extend this image."; "editing" runs the
        editing CLI's two turns (image + "Generate a similar image", then the instruction) and returns the
        second with `source_prompt` set. image: PIL image or H×W×3 float tensor in 0..1 (first turn; later
        turns may pass the same image again or none). mask: H×W float tensor or PIL image, 1/white = region to
        generate (blacked before CLIP). conversation: the previous reply's (never modified). temperature 0 is
        greedy; > 0 samples with a torch.Generator seeded with `seed`, the folder's top_k and top_p (or
        `top_p`). on_token(step, token_id): after every new token, step counting from 1; its exceptions
        propagate (how a host interrupts).
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {max_new_tokens}; it must be at least 1.")
        if temperature < 0:
            raise ValueError(f"temperature is {temperature}; use 0 for greedy decoding or a positive value to sample.")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p is {top_p}; it must be in (0, 1], or None for the model's own setting.")
        instruction = "" if instruction is None else str(instruction)
        if IMAGE_TOKEN in instruction:
            raise ValueError("The instruction contains '<image>', which marks where the image goes; pass the image "
                             "as `image` and remove '<image>' from the text.")
        if conversation is not None and not isinstance(conversation, Conversation):
            raise TypeError(f"conversation must be a Conversation from an earlier reply, not {type(conversation).__name__}.")
        if conversation is not None and conversation.template != self.template:
            raise ValueError(f"This conversation uses the {conversation.template} template but the model uses "
                             f"{self.template}; start a new conversation for this model.")
        text = user_text(task, instruction)  # validates the instruction before any heavy work
        if task == "editing":
            return self._edit(text, image, mask, conversation, temperature, top_p, max_new_tokens, seed, on_token)
        conv = conversation if conversation is not None else self.new_conversation()
        fingerprint, pixels = self._image_for_turn(task, image, mask, conv, editing=False)
        counter = _StepCounter(on_token)
        reply = self._turn(conv, text, fingerprint, pixels, temperature, top_p, max_new_tokens, seed, counter)
        return reply

    # ----------------------------------------------------------------------------------- the turns
    def _edit(self, text, image, mask, conversation, temperature, top_p, max_new_tokens, seed, on_token):
        if conversation is not None:
            raise ValueError("The editing task starts a new conversation (an image described, then your edit); "
                             "pass no conversation, or use the chat task to continue one.")
        if image is None:
            raise ValueError("The editing task needs the image to edit.")
        conv = self.new_conversation()
        fingerprint, pixels = self._image_for_turn("editing", image, mask, conv, editing=True)
        counter = _StepCounter(on_token)
        first = self._turn(conv, EDITING_FIRST_TURN, fingerprint, pixels, temperature, top_p, max_new_tokens, seed,
                           counter)
        second = self._turn(first.conversation, text, fingerprint, pixels, temperature, top_p, max_new_tokens, seed,
                            counter)
        second.source_prompt = first.prompt
        second.notes = [f"source caption: {n}" for n in first.notes] + second.notes
        return second

    def _turn(self, conv: Conversation, text: str, fingerprint, pixels, temperature, top_p, max_new_tokens, seed,
              counter) -> MLLMReply:
        first_with_image = pixels is not None and not conv.messages
        message = IMAGE_TOKEN + "\n" + text if first_with_image else text
        prompt = conv.prompt(message)
        ids = tokenizer_image_token(prompt, self.tokenizer)
        notes: list[str] = []
        embeds = self._input_embeddings(ids, pixels, notes)
        new_ids, hit_limit = self._decode(embeds, temperature, top_p, max_new_tokens, seed, counter)
        stored = decode_answer(self.tokenizer, new_ids)
        response = cut_output(self.output_template, stored)
        caption, found = parse_generation_prompt(response)
        if hit_limit:
            notes.append(f"stopped at max_new_tokens ({max_new_tokens}) before the end token; the answer is "
                         "incomplete (and, as in the original, its last characters were trimmed as if it had ended).")
        if not found:
            notes.append("no <gen_image> tag in the answer; the whole answer is used as the prompt")
        new_conv = conv.with_turn(message, stored, image_fingerprint=fingerprint if first_with_image else None,
                                  pixel_values=pixels if first_with_image else None)
        return MLLMReply(token_ids=new_ids, response=response, prompt=caption, prompt_found=found,
                         conversation=new_conv, notes=notes)

    # ----------------------------------------------------------------------------------- the image
    def _image_for_turn(self, task, image, mask, conv: Conversation, *, editing: bool):
        """(fingerprint, pixel_values) for this turn, or (None, None) for a text-only conversation."""
        if image is None:
            if mask is not None:
                raise ValueError("A mask was given without its image; pass the image together with the mask.")
            if task in ("similar-image", "inpainting", "outpainting") and not conv.has_image:
                extra = " and a mask" if task != "similar-image" else ""
                raise ValueError(f"The {task} task needs an image{extra}.")
            return conv.image_fingerprint, conv.pixel_values
        rgb = imaging.to_uint8_rgb(image)
        hole = None
        if mask is not None:
            hole = imaging.to_hole_mask(mask, rgb.shape[:2])
        elif task in ("inpainting", "outpainting"):
            raise ValueError(f"The {task} task needs a mask (white = the region to generate) with the image.")
        seen = imaging.masked_image(rgb, hole) if hole is not None else rgb
        fingerprint = imaging.fingerprint(seen)
        if conv.has_image:
            if fingerprint != conv.image_fingerprint:
                raise ValueError("This conversation was started with another image; pass the same image (and mask) "
                                 "to continue it, or start a new conversation for a new image.")
            return conv.image_fingerprint, conv.pixel_values
        if conv.messages:
            raise ValueError("This conversation was started without an image, and LLMGA shows an image only in the "
                             "first turn; start a new conversation to talk about an image.")
        if task == "text-to-image":
            raise ValueError("The text-to-image task takes no image; use similar-image (or chat) to show the model "
                             "an image.")
        picture = imaging.editing_crop(seen) if editing else imaging.stretch_to_square(Image.fromarray(seen))
        return fingerprint, self._pixels(picture)

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """576×H projected features (LLaVA encode_images) in the LLM dtype."""
        tower = self.model.vision_tower
        tower_param = next(tower.parameters())
        pixels = pixel_values
        if self.dtype != torch.float32:
            pixels = pixels.to(torch.float16)  # the CLIs send `.half()` pixels to the float32 tower
        pixels = pixels.to(device=tower_param.device, dtype=tower_param.dtype)
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
    @staticmethod
    def _sampling_config(info: FolderInfo) -> _Sampling:
        gen = info.generation
        source = gen if gen.get("_from_file") else info.config  # no generation_config.json → config.json
        eos = source.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        top_k = gen.get("top_k", 50)
        return _Sampling(eos_ids=eos_ids, repetition_penalty=float(gen.get("repetition_penalty") or 1.0),
                         top_k=int(top_k) if top_k else 0, top_p=float(gen.get("top_p") or 1.0))

    def _next_token(self, logits: torch.Tensor, generated: Optional[torch.Tensor], temperature: float,
                    top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
        """One step of transformers 4.41's processors and warpers on float32 logits (V,)."""
        penalty = self._sampling.repetition_penalty
        if penalty != 1.0 and generated is not None:
            picked = logits.gather(0, generated)
            logits = logits.scatter(0, generated, torch.where(picked < 0, picked * penalty, picked / penalty))
        if temperature <= 0:
            return logits.argmax()
        logits = logits / temperature
        top_k = min(self._sampling.top_k, logits.shape[0])
        if top_k > 0:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p)
            remove[-1:] = False
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(dim=-1)[None]  # (1, V) as generate samples a batch
        return torch.multinomial(probs, 1, generator=generator)[0, 0]

    def _decode(self, embeds: torch.Tensor, temperature: float, top_p: Optional[float], max_new_tokens: int,
                seed: int, counter: "_StepCounter") -> tuple[list[int], bool]:
        from transformers import DynamicCache

        lm = self.model.language_model
        device = embeds.device
        top_p = self._sampling.top_p if top_p is None else float(top_p)
        generator = torch.Generator(device=device).manual_seed(int(seed)) if temperature > 0 else None
        eos = set(self._sampling.eos_ids)
        new_ids: list[int] = []
        generated = torch.empty(max_new_tokens, dtype=torch.long, device=device)
        cache_arg, keep_arg = _forward_argument_names(lm)
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
                token = self._next_token(logits, generated[:step] if step else None, temperature, top_p, generator)
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


def _forward_argument_names(lm: nn.Module) -> tuple[str, Optional[str]]:
    """The KV-cache and logits-to-keep keyword names of this transformers version's forward."""
    import inspect

    names = inspect.signature(lm.forward).parameters
    cache_arg = "cache" if "cache" in names else "past_key_values"
    keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in names), None)
    return cache_arg, keep_arg


class _StepCounter:
    """Calls on_token(step, token_id) with step = tokens generated so far in this call (1 for the first)."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.steps = 0

    def __call__(self, token_id: int) -> None:
        self.steps += 1
        if self.on_token is not None:
            self.on_token(self.steps, token_id)


def load_mllm(folder, *, vision_tower=None, device=None, dtype: Optional[torch.dtype] = None,
              template: Optional[str] = None) -> LLMGAMLLM:
    """Load a released LLMGA MLLM folder (any of the seven families, safetensors or .bin, sharded or not).

    vision_tower: the openai/clip-vit-large-patch14-336 folder, else a folder of that name beside or inside the
    model folder. device: where the modules go (default CPU). dtype: the LLM's dtype (default float16 on CUDA,
    float32 elsewhere); CLIP always runs in float32. template: override the conversation template by name.
    """
    info = recognise(Path(folder))
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; one of {', '.join(TEMPLATES)}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float16, torch.bfloat16 or torch.float32.")
    # everything that can fail cheaply first
    tower_path = find_vision_tower(info.folder, info.config, vision_tower)
    files = checkpoint_files(info.folder)
    tokenizer = load_tokenizer(info.folder, info.family)
    pixels = imaging.ClipPixels(tower_path)

    config = native_config(info, dtype)
    language_model = build_language_model(config, dtype)
    projector = build_projector(info.config, config.hidden_size, dtype)
    load_weights(files, language_model, projector, tied=bool(getattr(config, "tie_word_embeddings", False)))
    shrink_vocabulary(language_model, len(tokenizer))
    if info.family in ("mistral", "qwen2") and dtype != torch.float16:
        language_model.model.rotary_emb.register_forward_hook(_round_through_fp16)
    tower = load_vision_tower(tower_path)
    modules = MLLMModules(language_model, tower, projector).to(device)
    return LLMGAMLLM(info, modules, tokenizer, pixels, template or info.template)
