"""Loading a released LLMGA MLLM folder onto native transformers models.

Ports LLMGA: llmga/llava/model/builder.py (`load_pretrained_model`) and the Llava* wrappers of
LLMGA: llmga/llava/model/language_model/*.py and multimodal_encoder/, multimodal_projector/. The
original loads `Llava<Family>ForCausalLM` (the native model plus a CLIP tower and a 2-layer MLP
projector); here the native `<Family>ForCausalLM` is built from the family's own config class
(model_type `llava_*` is not registered in transformers), the projector is a plain
nn.Sequential(Linear, GELU, Linear) with the released keys `model.mm_projector.0/2`, and CLIP comes
from its own folder, as the original loads it from `mm_vision_tower` and ignores the bf16 copy
inside the checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..releases import VISION_TOWER_ID
from ..weights import check_weight_file, iter_weights, read_json, shard_files
from .templates import FAMILY_TEMPLATES

log = logging.getLogger("llmga")


FAMILIES = ("vicuna", "llama2", "llama3", "mistral", "qwen2", "phi3", "gemma")
# family → transformers class name stem
NATIVE_CLASSES = {"vicuna": "Llama", "llama2": "Llama", "llama3": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                  "phi3": "Phi3", "gemma": "Gemma"}
# config.json model_type / architectures of the released folders → base kind
_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral", "llava_gemma": "gemma",
                "llava_qwen2": "qwen2", "llava_phi3": "phi3", "llava_mpt": "mpt"}
_ARCHITECTURES = {"llavallamaforcausalllm": "llama", "llavamistralforcausallm": "mistral",
                  "llavagemmaforcausallm": "gemma", "llavaqwen2forcausallm": "qwen2", "llavaphi3forcausallm": "phi3",
                  "llavampforcausallm": "mpt", "llavamptforcausallm": "mpt"}
# fields the LLaVA code adds to the base config
LLAVA_FIELDS = ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
                "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type",
                "image_aspect_ratio", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
                "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "mm_projector_lr", "image_grid_pinpoints",
                "unfreeze_mm_vision_tower", "mm_vision_tower_lr")


@dataclass
class FolderInfo:
    """What config.json (+ tokenizer, + generation_config.json) of an LLMGA folder says."""

    folder: Path
    config: dict
    family: str
    template: str  # the template the original picks for this family's released folder name
    generation: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- recognition
def _tokenizer_mentions(folder: Path, needle: str) -> bool:
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        path = folder / name
        if path.is_file():
            try:
                if needle in path.read_text(encoding="utf-8", errors="replace"):
                    return True
            except OSError:
                continue
    return False


def recognise(folder: Path) -> FolderInfo:
    """Family and template of an LLMGA MLLM folder from its config.json and tokenizer (not its name).

    For the released folders this agrees with the original's choice by folder name (builder.py and
    cli*.py); a renamed folder keeps working. Llama-2-chat and Vicuna share everything structural,
    so the base model path the training saved in config.json (`_name_or_path`) and then the folder name
    decide between them ("llama-2" → Llama-2, as the original; anything else → Vicuna).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the folder of an LLMGA MLLM (e.g. "
                                "models/LLM/llmga-Qwen2-0.5B-full-finetune).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not an LLMGA MLLM folder: it has no config.json; give the folder of a "
                         "released LLMGA MLLM such as llmga-Qwen2-0.5B-full-finetune.")
    config = read_json(config_path)
    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise ValueError(f"{folder} is not an LLMGA MLLM folder: its config.json has no mm_vision_tower / "
                         "mm_projector_type fields (a plain language model?); give a released LLMGA MLLM folder.")
    kind = _MODEL_TYPES.get(str(config.get("model_type", "")).lower())
    for arch in config.get("architectures") or ():
        kind = kind or _ARCHITECTURES.get(str(arch).lower())
    if kind is None or kind == "mpt":
        raise ValueError(f"{folder}: model_type {config.get('model_type')!r} is not one of the LLMGA MLLM families "
                         "(LLaMA/Vicuna, Llama-2, Llama-3, Mistral, Qwen2, Phi-3, Gemma).")
    if kind == "llama":
        hints = (str(config.get("_name_or_path", "")) + " " + folder.name).lower()
        if int(config.get("vocab_size") or 0) >= 128000 or _tokenizer_mentions(folder, "<|start_header_id|>"):
            family = "llama3"
        elif "llama-2" in hints or "llama2" in hints or "llama_2" in hints:
            family = "llama2"
        else:
            family = "vicuna"
    else:
        family = kind
    generation = {}
    generation_path = folder / "generation_config.json"
    if generation_path.is_file():
        generation = read_json(generation_path)
        generation["_from_file"] = True
    return FolderInfo(folder=folder, config=config, family=family, template=FAMILY_TEMPLATES[family],
                      generation=generation)


# ----------------------------------------------------------------------------------------------- configs
def native_config_values(info: FolderInfo) -> dict:
    """config.json's entries as the family's own config class takes them: the LLaVA fields and the llava
    model_type / architectures dropped, Phi-3's "su" rope scaling renamed, Gemma's activation under the name
    current transformers reads (also what export.py writes as a plain transformers folder's config.json)."""
    values = {k: v for k, v in info.config.items()
              if k not in LLAVA_FIELDS and k not in ("model_type", "architectures", "auto_map", "_name_or_path",
                                                     "transformers_version", "torch_dtype", "dtype")}
    if info.family == "phi3":
        rope = values.get("rope_scaling") or values.get("rope_parameters")
        if isinstance(rope, dict) and (rope.get("type") or rope.get("rope_type")) in ("su", "yarn"):
            # "su" is called "longrope" in transformers ≥ 4.42, same factors and scale; renaming it before
            # the config class sees it keeps `original_max_position_embeddings` where it is expected
            rope = dict(rope)
            rope.pop("rope_type", None)
            rope["type"] = "longrope"
            values["rope_scaling"] = rope
    if info.family == "gemma":
        # transformers 4.41's GemmaMLP used `hidden_activation` (tanh GELU) and ignored `hidden_act`
        values["hidden_act"] = values.pop("hidden_activation", None) or "gelu_pytorch_tanh"
    return values


def native_config(info: FolderInfo, dtype: torch.dtype):
    """The family's own transformers config class, built from the released config.json."""
    import transformers

    values = native_config_values(info)
    config_class = getattr(transformers, NATIVE_CLASSES[info.family] + "Config")
    config = config_class.from_dict(values)
    config._attn_implementation = "sdpa"  # what 4.41 picked by default; eager gives the same tokens (§12)
    config.dtype = dtype
    return config


# ----------------------------------------------------------------------------------------------- weights
def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a folder, checked to exist (sharded via the index, or single)."""
    folder = Path(folder)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            return list(shard_files(folder / index_name))
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder} has no weights (model.safetensors, model-*-of-*.safetensors with "
                            "model.safetensors.index.json, or pytorch_model*.bin); download the model's weight files.")


def no_init_weights():
    """transformers' context that skips weight initialisation (its module moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights as context
    return context()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_language_model(config, dtype: torch.dtype) -> nn.Module:
    """The native causal LM with uninitialised parameters (they are all overwritten by the checkpoint);
    rotary tables and other computed buffers are built on the CPU in float32 as in the original."""
    import transformers

    name = type(config).__name__.removesuffix("Config") + "ForCausalLM"
    model_class = getattr(transformers, name)
    with no_init_weights(), _default_dtype(dtype):
        model = model_class(config)
    return model.eval().requires_grad_(False)


def build_projector(config: dict, hidden_size: int, dtype: torch.dtype) -> nn.Sequential:
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {projector_type!r} is not supported; LLMGA's released models use "
                         "mlp2x_gelu.")
    mm_hidden = int(config.get("mm_hidden_size") or 1024)
    with _default_dtype(dtype):
        projector = nn.Sequential(nn.Linear(mm_hidden, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    return projector.eval().requires_grad_(False)


def load_weights(files: list[Path], language_model: nn.Module, projector: nn.Module, *, tied: bool,
                 on_loaded: Optional[Callable[[str], None]] = None) -> None:
    """Copy the checkpoint into the models (cast to their dtype); the bf16 CLIP copy is ignored.
    on_loaded(key) after each copied tensor (the quantizer converts a layer as soon as its weight is in)."""
    for path in files:
        check_weight_file(path)
    targets = dict(language_model.state_dict(keep_vars=True))
    targets.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict(keep_vars=True).items()})
    persistent = set(language_model.state_dict())
    loaded: set[str] = set()
    unexpected = []
    with torch.no_grad():
        for path in files:
            for key, tensor in iter_weights(path):
                if key.startswith("model.vision_tower.") or (tied and key == "lm_head.weight"):
                    continue  # CLIP comes from its own folder; a tied head is the embedding
                target = targets.get(key)
                if target is None:
                    unexpected.append(key)
                    continue
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"{path.name}: {key} has shape {tuple(tensor.shape)} but the model built from "
                                     f"config.json expects {tuple(target.shape)}; config.json and weights disagree.")
                target.copy_(tensor)
                loaded.add(key)
                if on_loaded is not None:
                    on_loaded(key)
    if unexpected:
        log.warning("ignored %d unexpected weights, e.g. %s", len(unexpected), unexpected[:3])
    projector_keys = {f"model.mm_projector.{k}" for k in projector.state_dict()}
    if not projector_keys <= loaded:
        raise ValueError(f"The checkpoint in {files[0].parent} has no mm_projector weights; it is not a complete "
                         "LLMGA MLLM (a text-only LLM or projector-only weights?).")
    missing = sorted(k for k in persistent - loaded if not (tied and k == "lm_head.weight"))
    if missing:
        raise ValueError(f"The checkpoint in {files[0].parent} lacks {len(missing)} weights of the language model "
                         f"(e.g. {missing[:3]}); the download is incomplete or the files belong to another model.")
    if tied:
        language_model.tie_weights()


def shrink_vocabulary(language_model: nn.Module, size: int) -> None:
    """resize_token_embeddings(len(tokenizer)) of the original when it shrinks (Qwen2, Phi-3): only the first
    `size` rows of the embedding and LM head remain, so later ids can never be produced. Growing (never the
    case for the released models) is left alone."""
    embed = language_model.get_input_embeddings()
    if size >= embed.weight.shape[0]:
        return
    head = language_model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.data[:size].clone(), requires_grad=False)
    embed.num_embeddings = size
    if head is not None:
        head.weight = embed.weight if tied else nn.Parameter(head.weight.data[:size].clone(), requires_grad=False)
        head.out_features = size
    language_model.config.vocab_size = size


# ------------------------------------------------------------------------------------------ vision tower
# The openai/clip-vit-large-patch14-336 preprocessor_config.json (LLaVA's image processor), sized for a tower
# that comes as a single weight file: resize the short side, centre-crop, CLIP's mean and std.
def openai_preprocessor(image_size: int = 336) -> dict:
    return {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": image_size}


_VISION_PREFIXES = ("vision_model.", "")


def _vision_key(names: set[str], key: str) -> Optional[str]:
    for prefix in _VISION_PREFIXES:
        if prefix + key in names:
            return prefix + key
    return None


def vision_config_from_weights(path: Path):
    """A CLIPVisionConfig read off the tensor shapes of a single CLIPVisionModel / CLIPModel safetensors file:
    width (class embedding), layers (encoder layer indices), heads = width / 64 (every OpenAI ViT), MLP width,
    patch size (patch embedding) and image size (√(positions − 1) × patch); OpenAI's quick_gelu."""
    from transformers import CLIPVisionConfig

    from ..weights import tensor_shape

    names = set(check_weight_file(path) or ())
    needed = {"width": "embeddings.class_embedding", "patch": "embeddings.patch_embedding.weight",
              "positions": "embeddings.position_embedding.weight", "mlp": "encoder.layers.0.mlp.fc1.weight"}
    keys = {what: _vision_key(names, key) for what, key in needed.items()}
    if None in keys.values():
        missing = [needed[what] for what, key in keys.items() if key is None]
        raise ValueError(f"{path} is not a CLIP vision tower: it lacks {missing[0]} (and {len(missing) - 1} more "
                         f"such tensors); use the weights of {VISION_TOWER_ID} (CLIPVisionModel or CLIPModel).")
    prefix = keys["width"].removesuffix(needed["width"])
    width = tensor_shape(path, keys["width"])[0]
    patch = tensor_shape(path, keys["patch"])
    positions = tensor_shape(path, keys["positions"])[0]
    layer_ids = {int(name[len(prefix) + len("encoder.layers."):].split(".")[0]) for name in names
                 if name.startswith(prefix + "encoder.layers.")}
    side = math.isqrt(positions - 1)
    if side * side != positions - 1 or width % 64:
        raise ValueError(f"{path} is not a ViT vision tower of CLIP's layout ({positions} position embeddings, "
                         f"width {width}); use the weights of {VISION_TOWER_ID}.")
    projection = tensor_shape(path, "visual_projection.weight") if "visual_projection.weight" in names else None
    return CLIPVisionConfig(hidden_size=width, intermediate_size=tensor_shape(path, keys["mlp"])[0],
                            num_hidden_layers=max(layer_ids) + 1, num_attention_heads=width // 64,
                            patch_size=patch[-1], image_size=side * patch[-1], num_channels=patch[1],
                            projection_dim=projection[0] if projection else 768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def vision_tower_width(path: Path) -> Optional[int]:
    """The width of the features a tower gives (its hidden size), from config.json or the file's shapes."""
    path = Path(path)
    if path.is_file():
        return vision_config_from_weights(path).hidden_size
    config = read_json(path / "config.json")
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
    width = vision.get("hidden_size")
    if width is None and (config.get("model_type") == "clip" or "vision_config" in config):
        from transformers import CLIPConfig

        width = CLIPConfig.from_dict(config).vision_config.hidden_size  # a CLIP config that leaves the default
    return int(width) if width is not None else None


def projector_input_width(files: list[Path], config: dict) -> int:
    """The projector's input width: mm_projector.0.weight's second dimension where the checkpoint's header says
    it (safetensors), else config.json's mm_hidden_size."""
    from ..weights import tensor_shape

    for path in files:
        shape = tensor_shape(path, "model.mm_projector.0.weight")
        if shape is not None:
            return int(shape[1])
    return int(config.get("mm_hidden_size") or 1024)


def check_vision_tower_fits(tower: Path, files: list[Path], config: dict) -> None:
    """Refuses a tower whose features do not have the width the projector takes, before anything is loaded."""
    width, wanted = vision_tower_width(tower), projector_input_width(files, config)
    if width is not None and width != wanted:
        raise ValueError(f"The vision tower {tower} gives {width}-wide features but this MLLM's projector takes "
                         f"{wanted}-wide ones (mm_projector.0.weight); use the tower the model was trained with, "
                         f"{config.get('mm_vision_tower') or VISION_TOWER_ID}.")


def vision_tower_pixels(tower: Path):
    """CLIP's image preprocessing for this tower: its preprocessor_config.json, or for a single weight file
    the openai preprocessor at the file's image size."""
    from .images import ClipPixels

    tower = Path(tower)
    if tower.is_file():
        return ClipPixels(tower.parent, preprocessor=openai_preprocessor(vision_config_from_weights(tower).image_size))
    return ClipPixels(tower)


def load_vision_tower(path: Path) -> nn.Module:
    """CLIPVisionModel in float32 with eager attention (as transformers 4.41 ran it), from a whole-CLIP
    (openai/… as published) or a vision-only folder, or from one safetensors file of either."""
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    if path.is_file():  # one CLIPVisionModel / CLIPModel safetensors file: sizes from its shapes
        vision_config = vision_config_from_weights(path)
    else:
        config_dict = read_json(path / "config.json")
        if config_dict.get("model_type") == "clip" or "vision_config" in config_dict:
            vision_config = CLIPConfig.from_dict(config_dict).vision_config
        elif config_dict.get("model_type") in ("clip_vision_model", None):
            vision_config = CLIPVisionConfig.from_dict(config_dict)
        else:
            raise ValueError(f"{path} holds a {config_dict.get('model_type')!r} model, not the CLIP vision tower "
                             f"{VISION_TOWER_ID}.")
    vision_config._attn_implementation = "eager"
    with no_init_weights(), _default_dtype(torch.float32):
        model = CLIPVisionModel(vision_config)
    targets = model.state_dict(keep_vars=True)
    if path.is_file():
        files = [path]
    else:
        singles = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        files = singles[:1] or checkpoint_files(path)
    for file in files:
        check_weight_file(file)
    loaded = set()
    with torch.no_grad():
        for file in files:
            for key, tensor in iter_weights(file):
                for name in (key, key.removeprefix("vision_model."), "vision_model." + key):
                    if name in targets:
                        targets[name].copy_(tensor)
                        loaded.add(name)
                        break
    missing = [k for k in model.state_dict() if k not in loaded and "position_ids" not in k]
    if missing:
        raise ValueError(f"The vision tower weights in {path} lack {len(missing)} tensors (e.g. {missing[:3]}); "
                         f"it is not a complete {VISION_TOWER_ID} download.")
    return model.eval().requires_grad_(False)
