"""LLMGA's diffusers-format Stable Diffusion folders: what they hold and how to read them.

LLMGA (llmga/diffusers/train_text_to_image*.py, the SD1.5, SDXL and inpainting variants) fine-tunes
only the UNet and saves the whole pipeline with diffusers' `save_pretrained`, so the released llmga-sd15-t2i-v2,
llmga-sd15-inpainting-v2, llmga-sdxl-t2i and llmga-sdxl-inpainting-v2 are diffusers folders:
model_index.json, unet/, vae/, text_encoder/ (+ text_encoder_2/ for SDXL), tokenizer*/, scheduler/.
The original code loads them with `DiffusionPipeline.from_pretrained` (the SDXL ones with
variant="fp16"); this module picks weight files the way ComfyUI's DiffusersLoader does (fp16 variant
first, safetensors before pickles), adds what that loader lacks (sharded weights, clear errors before
any tensor is read), and translates the diffusers configs into the LDM layout ComfyUI builds its
models from.

Everything here is host-free: configs, file lists and plain state dicts.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .weights import WeightFileError, check_weight_file, load_weights, read_json, shard_files, tensor_shape

__all__ = [
    "SDFolder", "SDFolderError", "inspect_sd_folder", "load_state_dict", "ldm_unet_config",
    "vae_ddconfig", "clip_text_config", "clip_keys_with_text_model_prefix", "find_weight_files",
]

SDXL_TIME_EMBED_DIM = 256  # every SDXL time id is embedded with 256 sinusoidal channels
SDXL_TIME_IDS = 6  # original size, crop, target size; LLMGA's models use no aesthetic score
CLIP_VOCAB = 49408  # the CLIP BPE vocabulary every SD text encoder shares
CLIP_POSITIONS = 77
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")

_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

# Weight file stems: (safetensors stem, pickle stem) per component, as diffusers/transformers name them.
_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}

_LAYOUT_HINT = ("LLMGA SD folders are diffusers pipelines with unet/, vae/, text_encoder/ and model_index.json "
                "(for example llmga-sd15-t2i-v2), so point this at the whole downloaded folder")


class SDFolderError(ValueError):
    """A folder or file that is not a usable LLMGA SD pipeline; the message says what to do."""


@dataclass(frozen=True)
class SDFolder:
    """What an LLMGA SD folder holds, read from its configs and file headers (no tensors loaded)."""

    path: Path
    pipeline: str  # "sd15" or "sdxl"
    inpaint: bool  # UNet with 9 input channels: [noisy latent | mask | masked-image latent]
    unet_config: dict  # unet/config.json as diffusers wrote it
    unet_files: tuple[Path, ...]
    vae_config: dict | None = None
    vae_files: tuple[Path, ...] = ()
    text_encoder_config: dict | None = None
    text_encoder_files: tuple[Path, ...] = ()
    text_encoder_2_config: dict | None = None
    text_encoder_2_files: tuple[Path, ...] = ()
    ldm_config: dict = field(default_factory=dict)  # ldm_unet_config(unet_config)

    @property
    def kind(self) -> str:
        """"sd15", "sd15-inpaint", "sdxl" or "sdxl-inpaint" (the pipeline names long_prompt uses)."""
        return self.pipeline + ("-inpaint" if self.inpaint else "")

    @property
    def has_clip(self) -> bool:
        return bool(self.text_encoder_files)

    @property
    def has_vae(self) -> bool:
        return bool(self.vae_files)


# --------------------------------------------------------------------------- weight files

def _candidates(st_stem: str, bin_stem: str) -> list[str]:
    # The host's DiffusersLoader order (fp16 safetensors, safetensors, fp16 bin, bin), each followed by
    # its sharded form, which diffusers and transformers write for large models.
    return [f"{st_stem}.fp16.safetensors", f"{st_stem}.safetensors.index.fp16.json",
            f"{st_stem}.safetensors", f"{st_stem}.safetensors.index.json",
            f"{bin_stem}.fp16.bin", f"{bin_stem}.bin.index.fp16.json",
            f"{bin_stem}.bin", f"{bin_stem}.bin.index.json"]


@contextmanager
def _as_folder_error():
    """weights.py's file errors raised as SDFolderError, the one error type of this module."""
    try:
        yield
    except WeightFileError as error:
        raise SDFolderError(str(error)) from None


def find_weight_files(component_dir: Path, component: str = "unet") -> tuple[Path, ...]:
    """The weight file(s) of one pipeline component folder, the way the host and diffusers pick them.

    `component` is "unet", "vae", "text_encoder" or "text_encoder_2" (it decides the file stem).
    Returns one file or the shards of a `*.index.json`; empty if the folder has no weights.
    Headers are checked, so a missing shard or a corrupt file is reported here, by name.
    """
    component_dir = Path(component_dir)
    st_stem, bin_stem = _STEMS[component]
    for name in _candidates(st_stem, bin_stem):
        path = component_dir / name
        if not path.is_file():
            continue
        with _as_folder_error():
            files = shard_files(path) if name.endswith(".json") else (path,)
            for file in files:
                check_weight_file(file)
        return files
    return ()


def load_state_dict(files) -> dict[str, torch.Tensor]:
    """All tensors of a weight file or its shards, on the CPU (read as llmga_core.weights reads them)."""
    with _as_folder_error():
        return load_weights(files)


# --------------------------------------------------------------------------- UNet

class _NotSD(Exception):
    """Internal: a UNet config outside SD1.5/SDXL; the text is the reason."""


def _per_level(value, levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise _NotSD(f"{name} has {len(value)} entries for {levels} blocks")
        return list(value)
    return [value] * levels


def _unet_family(cfg: dict) -> str:
    """"sd15" or "sdxl" for a UNet2DConditionModel config, else raises _NotSD with the reason."""
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _NotSD(f"class {cfg.get('_class_name')}")
    add = cfg.get("addition_embed_type")
    if add == "text_time":
        family = "sdxl"
    elif add is None and not cfg.get("use_linear_projection", False):
        family = "sd15"
    elif add is None:
        raise _NotSD("linear attention projections without SDXL's text_time embedding, as in SD2")
    else:
        raise _NotSD(f"addition_embed_type {add!r}")
    fixed = {  # key: (value SD1.5/SDXL have, default when absent)
        "act_fn": ("silu", "silu"), "norm_num_groups": (32, 32), "flip_sin_to_cos": (True, True),
        "freq_shift": (0, 0), "conv_in_kernel": (3, 3), "conv_out_kernel": (3, 3),
        "center_input_sample": (False, False), "class_embed_type": (None, None), "num_class_embeds": (None, None),
        "encoder_hid_dim": (None, None), "encoder_hid_dim_type": (None, None), "time_cond_proj_dim": (None, None),
        "time_embedding_type": ("positional", "positional"), "time_embedding_dim": (None, None),
        "timestep_post_act": (None, None), "resnet_time_scale_shift": ("default", "default"),
        "dual_cross_attention": (False, False), "only_cross_attention": (False, False),
        "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
        "attention_type": ("default", "default"), "reverse_transformer_layers_per_block": (None, None),
        "out_channels": (4, 4), "class_embeddings_concat": (False, False), "norm_eps": (1e-5, 1e-5),
        "time_embedding_act_fn": (None, None), "resnet_skip_time_act": (False, False),
        "resnet_out_scale_factor": (1.0, 1.0), "mid_block_scale_factor": (1, 1), "downsample_padding": (1, 1),
        "cross_attention_norm": (None, None), "mid_block_only_cross_attention": (None, None),
    }
    for key, (want, default) in fixed.items():
        if cfg.get(key, default) != want:
            raise _NotSD(f"{key} {cfg.get(key)!r}")
    if cfg.get("in_channels") not in (4, 9):
        raise _NotSD(f"{cfg.get('in_channels')} input channels; 4 (text-to-image) or 9 (inpainting) expected")
    if family == "sdxl" and cfg.get("addition_time_embed_dim") != SDXL_TIME_EMBED_DIM:
        raise _NotSD(f"addition_time_embed_dim {cfg.get('addition_time_embed_dim')}; SDXL uses {SDXL_TIME_EMBED_DIM}")
    return family


def ldm_unet_config(cfg: dict, *, where="This UNet") -> dict:
    """The LDM `unet_config` (ComfyUI's UNetModel arguments) of a diffusers SD1.5/SDXL UNet config.

    For the released SD1.5 and SDXL configs this equals the host's detection table; smaller models of
    the same families map the same way. Raises SDFolderError for other architectures, naming `where`.
    """
    try:
        return _ldm_config(cfg, _unet_family(cfg))
    except (_NotSD, KeyError, TypeError) as e:
        reason = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise SDFolderError(f"{where} is not an SD1.5 or SDXL UNet ({reason}); LLMGA's checkpoints are SD1.5 or "
                            f"SDXL UNets with 4 or 9 input channels.") from None


def _ldm_config(cfg: dict, family: str) -> dict:
    boc = list(cfg["block_out_channels"])
    levels = len(boc)
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise _NotSD("block type lists do not match block_out_channels")
    for name in down:
        if name not in _DOWN_BLOCKS:
            raise _NotSD(f"down block {name}")
    for name in up:
        if name not in _UP_BLOCKS:
            raise _NotSD(f"up block {name}")
    if any(c % 32 for c in boc) or any(c % boc[0] for c in boc):
        raise _NotSD(f"block_out_channels {boc} (multiples of 32 and of the first entry expected)")
    res_blocks = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(not isinstance(d, int) for d in depth):
        raise _NotSD("nested transformer_layers_per_block")
    heads_cfg = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' legacy naming
    heads = _per_level(heads_cfg, levels, "attention_head_dim")

    input_depth, output_depth = [], []
    for level in range(levels):
        input_depth += [depth[level] if _DOWN_BLOCKS[down[level]] else 0] * res_blocks[level]
        up_has_attention = _UP_BLOCKS[up[levels - 1 - level]]
        output_depth += [depth[level] if up_has_attention else 0] * (res_blocks[level] + 1)

    # LDM has one head rule for the whole net: a fixed head count (SD1.5: 8) or a fixed head width
    # (SDXL: 64). Levels with attention (and the middle block, at the last level) must share one.
    attn_levels = sorted({lv for lv in range(levels) if _DOWN_BLOCKS[down[lv]] or _UP_BLOCKS[up[levels - 1 - lv]]}
                         | {levels - 1})
    for lv in attn_levels:
        if boc[lv] % heads[lv]:
            raise _NotSD(f"{boc[lv]} channels do not split into {heads[lv]} heads")
    counts = {heads[lv] for lv in attn_levels}
    widths = {boc[lv] // heads[lv] for lv in attn_levels}
    if len(counts) == 1:
        num_heads, num_head_channels = counts.pop(), -1
    elif len(widths) == 1:
        num_heads, num_head_channels = -1, widths.pop()
    else:
        raise _NotSD("attention heads vary in both count and width across blocks")

    adm = cfg.get("projection_class_embeddings_input_dim") if family == "sdxl" else None
    if family == "sdxl" and not adm:
        raise _NotSD("SDXL text_time embedding without projection_class_embeddings_input_dim")
    out = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": adm, "in_channels": int(cfg["in_channels"]),
        "model_channels": boc[0], "num_res_blocks": res_blocks, "transformer_depth": input_depth,
        "channel_mult": [c // boc[0] for c in boc], "transformer_depth_middle": depth[-1],
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": int(cfg["cross_attention_dim"]), "num_heads": num_heads,
        "num_head_channels": num_head_channels, "transformer_depth_output": output_depth,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if adm:
        out["num_classes"] = "sequential"
    return out


# --------------------------------------------------------------------------- VAE and CLIP

def vae_ddconfig(cfg: dict) -> tuple[dict, int]:
    """(ddconfig, embed_dim) of the LDM AutoencoderKL equal to a diffusers SD/SDXL AutoencoderKL config."""
    boc = list(cfg.get("block_out_channels", [64]))
    problems = []
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"class {cfg.get('_class_name')}")
    if len(boc) != 4:
        problems.append(f"{len(boc)} levels (SD VAEs have 4, for 8x downscaling)")
    if any(c % 32 for c in boc) or any(c % boc[0] for c in boc):
        problems.append(f"block_out_channels {boc}")
    if cfg.get("layers_per_block", 2) not in (1, 2):
        problems.append(f"layers_per_block {cfg.get('layers_per_block')}")
    if cfg.get("latent_channels", 4) != 4:
        problems.append(f"{cfg.get('latent_channels')} latent channels")
    if cfg.get("norm_num_groups", 32) != 32 or cfg.get("act_fn", "silu") != "silu":
        problems.append("norm/activation other than GroupNorm(32)/SiLU")
    for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
        if not cfg.get(key, True):
            problems.append(f"{key} false")
    if any(b != "DownEncoderBlock2D" for b in cfg.get("down_block_types", [])) or \
            any(b != "UpDecoderBlock2D" for b in cfg.get("up_block_types", [])):
        problems.append("block types other than DownEncoderBlock2D/UpDecoderBlock2D")
    if problems:
        raise SDFolderError(f"This VAE is not a Stable Diffusion AutoencoderKL ({'; '.join(problems)}); use the "
                            f"vae/ folder that came with the LLMGA checkpoint.")
    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": int(cfg.get("sample_size", 256)),
        "in_channels": int(cfg.get("in_channels", 3)), "out_ch": int(cfg.get("out_channels", 3)),
        "ch": boc[0], "ch_mult": [c // boc[0] for c in boc], "num_res_blocks": int(cfg.get("layers_per_block", 2)),
        "attn_resolutions": [], "dropout": 0.0,
    }
    return ddconfig, 4


def clip_text_config(cfg: dict, *, projected: bool = False) -> dict:
    """The sizes of a CLIP text model config (the keys ComfyUI reads from its own CLIP configs), checked to
    be a Stable Diffusion text encoder; raises SDFolderError otherwise.

    ComfyUI builds vocabulary and positions from its bundled tokenizer (49408 tokens, 77 positions),
    uses the penultimate layer for SDXL, and a square text projection for CLIP-G (`projected`).
    """
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act")
    problems = [f"no {key}" for key in sizes if key not in cfg]
    if problems:
        raise SDFolderError(f"This text encoder config lacks CLIP sizes ({'; '.join(problems)}); use the "
                            f"text_encoder folders that came with the LLMGA checkpoint.")
    if cfg.get("vocab_size") != CLIP_VOCAB:
        problems.append(f"vocab_size {cfg.get('vocab_size')} (CLIP's is {CLIP_VOCAB})")
    if cfg.get("max_position_embeddings") != CLIP_POSITIONS:
        problems.append(f"{cfg.get('max_position_embeddings')} positions (CLIP's is {CLIP_POSITIONS})")
    if cfg.get("hidden_act") not in CLIP_ACTIVATIONS:
        problems.append(f"activation {cfg.get('hidden_act')!r}")
    if int(cfg.get("num_hidden_layers", 0)) < 3:
        problems.append(f"{cfg.get('num_hidden_layers')} layers (at least 3 needed)")
    if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_eps {cfg.get('layer_norm_eps')}")
    if cfg.get("hidden_size", 1) % cfg.get("num_attention_heads", 1):
        problems.append("hidden size not divisible by the head count")
    if projected and cfg.get("projection_dim") != cfg.get("hidden_size"):
        problems.append(f"projection_dim {cfg.get('projection_dim')} differs from hidden_size {cfg.get('hidden_size')}")
    if problems:
        raise SDFolderError(f"This text encoder is not a Stable Diffusion CLIP text model ({'; '.join(problems)}); "
                            f"use the text_encoder folders that came with the LLMGA checkpoint.")
    return {key: cfg[key] for key in sizes}


def clip_keys_with_text_model_prefix(state: dict) -> dict:
    """HF CLIP text-model keys in the `text_model.`-prefixed layout (transformers 4 and the releases).

    transformers 5 saves CLIPTextModel without the prefix; both layouts hold the same tensors.
    The position_ids buffer some old files carry is dropped.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith("text_model.") and key not in ("text_projection.weight", "logit_scale"):
            key = "text_model." + key
        out[key] = value
    return out


# --------------------------------------------------------------------------- the folder

def _component(folder: Path, name: str) -> tuple[dict | None, tuple[Path, ...]]:
    sub = folder / name
    if not sub.is_dir():
        return None, ()
    files = find_weight_files(sub, name)
    config_path = sub / "config.json"
    if not files:
        stem = _STEMS[name][0]
        raise SDFolderError(f"{sub} holds no weights ({stem}.safetensors, {stem}.fp16.safetensors, a sharded "
                            f"{stem}.safetensors.index.json or .bin); download that folder again.")
    if not config_path.is_file():
        raise SDFolderError(f"{sub} has no config.json; download that folder again.")
    with _as_folder_error():
        return read_json(config_path), files


def inspect_sd_folder(folder) -> SDFolder:
    """Reads an LLMGA SD folder's configs and weight-file headers; raises SDFolderError on bad input."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SDFolderError(f"{folder} is not a folder; give the path of an LLMGA SD pipeline folder "
                            f"such as models/diffusers/llmga-sd15-t2i-v2.")
    if not (folder / "unet").is_dir():
        raise SDFolderError(f"{folder} has no unet/ folder; {_LAYOUT_HINT}.")
    unet_config, unet_files = _component(folder, "unet")
    ldm = ldm_unet_config(unet_config, where=folder / "unet")
    family = "sdxl" if ldm["adm_in_channels"] else "sd15"

    # the weights must be the UNet the config describes (a cheap header read)
    with _as_folder_error():
        shape = next((s for s in (tensor_shape(f, "conv_in.weight") for f in unet_files) if s is not None), None)
    if shape is not None and shape[:2] != [ldm["model_channels"], ldm["in_channels"]]:
        raise SDFolderError(f"{folder / 'unet'} weights do not match its config.json (conv_in is {shape}, the config "
                            f"says {ldm['model_channels']} channels from {ldm['in_channels']} inputs); download it again.")

    vae_config, vae_files = _component(folder, "vae")
    te_config, te_files = _component(folder, "text_encoder")
    te2_config, te2_files = _component(folder, "text_encoder_2") if family == "sdxl" else (None, ())
    try:
        if vae_config is not None:
            vae_ddconfig(vae_config)
        if te_config is not None:
            clip_text_config(te_config)
        if te2_config is not None:
            clip_text_config(te2_config, projected=True)
    except SDFolderError as e:
        raise SDFolderError(f"{folder}: {e}") from None

    context = ldm["context_dim"]
    if family == "sdxl" and bool(te_files) != bool(te2_files):
        missing = "text_encoder_2" if te_files else "text_encoder"
        raise SDFolderError(f"{folder} is an SDXL pipeline without {missing}/; SDXL needs both CLIP text encoders, "
                            f"so download the whole folder.")
    if te_config is not None:
        width = te_config["hidden_size"] + (te2_config["hidden_size"] if te2_config else 0)
        if width != context:
            raise SDFolderError(f"{folder}: the text encoders give {width}-wide tokens but the UNet attends to "
                                f"{context}; the folders do not belong together.")
    if te2_config is not None:
        want = te2_config["projection_dim"] + SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM
        if ldm["adm_in_channels"] != want:
            raise SDFolderError(f"{folder}: the UNet expects a {ldm['adm_in_channels']}-wide SDXL vector, but the "
                                f"pooled text ({te2_config['projection_dim']}) plus 6 time ids give {want}; "
                                f"refiner-style UNets with aesthetic scores are not LLMGA checkpoints.")

    return SDFolder(path=folder, pipeline=family, inpaint=ldm["in_channels"] == 9, unet_config=unet_config,
                    unet_files=unet_files, vae_config=vae_config, vae_files=vae_files,
                    text_encoder_config=te_config, text_encoder_files=te_files,
                    text_encoder_2_config=te2_config, text_encoder_2_files=te2_files, ldm_config=ldm)
