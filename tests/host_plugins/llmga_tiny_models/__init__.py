"""Test-only ComfyUI custom node package: teaches the host the tiny SD sizes of tests/fixtures/tiny_sd.py.

The pack loads LLMGA's diffusers folders only through the host's own loaders (comfy.sd), which know only the
released sizes. The tests' tiny folders need sizes no host knows, so this package registers them the way the
host holds its own: when the host imports it (a server's custom_nodes/, or tests/host.py in-process)

- UNet: one model class per tiny UNet of tiny_sd.UNET_CONFIGS, a subclass of comfy.supported_models.SD15 or
  SDXL with the tiny `unet_config` match and heads, appended to comfy.supported_models.models, the table
  comfy/model_detection.py (model_config_from_unet_config) searches for weights in LDM layout;
- CLIP: comfy.sd.load_text_encoder_state_dicts builds SD1/SDXL CLIPs narrower than the host's configs
  (comfy/sd1_clip_config.json, comfy/clip_config_bigg.json) with their sizes merged in through the host's own
  `clip_l_model_config` / `clip_g_model_config` options (comfy/sd1_clip.py, SDClipModel); other text encoders
  go to the host's function unchanged;
- VAE: comfy.sd.VAE builds an SD AutoencoderKL of other widths from the host's own `config=` argument, read
  from the weights; other VAEs are built by the host unchanged.

It adds no nodes. `without_tiny_sizes()` undoes all three for a test that needs the bare host.
Works with ComfyUI 0.3.64 and 0.33.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
from pathlib import Path

import comfy.diffusers_convert
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

NODE_CLASS_MAPPINGS = {}  # loaded by the host as a custom node package; it has no nodes


def _tiny_sd():
    """tests/fixtures/tiny_sd.py, by path: the host imports this package from its custom_nodes/ link, where
    the `tests` package is not importable (the link resolves to the checkout)."""
    path = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_sd.py"
    spec = importlib.util.spec_from_file_location("llmga_tiny_models_sizes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SIZES = _tiny_sd()


# ----------------------------------------------------------------------------------------------- UNet

def _per_level(value, levels):
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _model_class(name: str, config: dict):
    """The host model class for one tiny diffusers UNet config: what comfy/supported_models.py would hold."""
    boc = list(config["block_out_channels"])
    levels = len(boc)
    heads = _per_level(config["attention_head_dim"], levels)  # diffusers' legacy name for the head count
    attention = [level for level, block in enumerate(config["down_block_types"]) if block.startswith("CrossAttn")]
    match = {"model_channels": boc[0], "context_dim": config["cross_attention_dim"],
             "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
             "use_temporal_attention": False}
    if config.get("addition_embed_type") == "text_time":
        depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
        lpb = _per_level(config["layers_per_block"], levels)
        # SDXL's classes tell their sizes apart by the input-side transformer depths (SSD-1B, Vega, KOALA)
        match["transformer_depth"] = [n for level in range(levels)
                                      for n in [depth[level] if level in attention else 0] * lpb[level]]
        match["adm_in_channels"] = config["projection_class_embeddings_input_dim"]
        widths = {boc[level] // heads[level] for level in attention}
        assert len(widths) == 1, f"{name}: SDXL's rule is one head width, these have {sorted(widths)}"
        base, extra = comfy.supported_models.SDXL, {"num_heads": -1, "num_head_channels": widths.pop()}
    else:
        counts = {heads[level] for level in attention}
        assert len(counts) == 1, f"{name}: SD1.5's rule is one head count, these have {sorted(counts)}"
        match["adm_in_channels"] = None
        base, extra = comfy.supported_models.SD15, {"num_heads": counts.pop(), "num_head_channels": -1}
    return type(f"Tiny_{name.replace('-', '_')}", (base,), {"unet_config": match, "unet_extra_config": extra})


def _model_classes():
    classes = {}
    for name, config in _SIZES.UNET_CONFIGS.items():
        cls = _model_class(name, config)
        key = json.dumps([cls.__mro__[1].__name__, cls.unet_config], sort_keys=True)
        if key in classes:  # the first class that matches wins in the host, so the heads must agree
            assert classes[key].unet_extra_config == cls.unet_extra_config, f"{name}: same sizes, other heads"
            continue
        classes[key] = cls
    return list(classes.values())


MODEL_CLASSES = _model_classes()


# ----------------------------------------------------------------------------------------------- CLIP

def _host_clip_width(config_file: str) -> int:
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), config_file)) as f:
        return json.load(f)["hidden_size"]


_HOST_WIDTHS = {"l": _host_clip_width("sd1_clip_config.json"), "g": _host_clip_width("clip_config_bigg.json")}


def _clip_sizes(state: dict) -> dict:
    """The sizes a CLIP text model's weights show, plus the head count, which they do not (tiny_sd's)."""
    layers = 0
    while f"text_model.encoder.layers.{layers}.mlp.fc1.weight" in state:
        layers += 1
    return {"hidden_size": state["text_model.embeddings.token_embedding.weight"].shape[1],
            "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": layers, "num_attention_heads": _SIZES.CLIP_HEADS,
            "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0]}


def _tiny_clip_roles(state_dicts, clip_type) -> dict | None:
    """{"l": sd} or {"l": sd, "g": sd} when these are SD1/SDXL CLIP text models narrower than the host's."""
    if clip_type != comfy.sd.CLIPType.STABLE_DIFFUSION or len(state_dicts) not in (1, 2):
        return None
    if not all("text_model.embeddings.token_embedding.weight" in sd for sd in state_dicts):
        return None
    if len(state_dicts) == 1:
        roles = {"l": state_dicts[0]}
    else:  # CLIP-G is the one saved with its text projection (CLIPTextModelWithProjection)
        projected = [sd for sd in state_dicts if "text_projection.weight" in sd]
        if len(projected) != 1:
            return None
        roles = {"l": next(sd for sd in state_dicts if sd is not projected[0]), "g": projected[0]}
    widths = {key: sd["text_model.embeddings.token_embedding.weight"].shape[1] for key, sd in roles.items()}
    return roles if any(widths[key] != _HOST_WIDTHS[key] for key in roles) else None


def _load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None,
                                   clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}, **kwargs):
    roles = _tiny_clip_roles(state_dicts, clip_type)
    if roles is None:
        return _HOST["load_text_encoder_state_dicts"](state_dicts, embedding_directory=embedding_directory,
                                                      clip_type=clip_type, model_options=model_options, **kwargs)
    # what the host's function does for STABLE_DIFFUSION (comfy/sd.py), with the sizes in the options
    if "g" in roles:
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = dict(model_options, **{f"clip_{key}_model_config": _clip_sizes(sd) for key, sd in roles.items()})
    full = {f"clip_{key}.transformer.{name}": tensor for key, sd in roles.items() for name, tensor in sd.items()}
    parameters = sum(comfy.utils.calculate_parameters(sd) for sd in roles.values())
    if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
        # 0.33 loads the weights inside the constructor, before it places the model (dynamic VRAM)
        return comfy.sd.CLIP(target, embedding_directory=embedding_directory, parameters=parameters,
                             state_dict=full, model_options=options, **kwargs)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, parameters=parameters, model_options=options)
    clip.load_sd(full, full_model=True)
    return clip


# ----------------------------------------------------------------------------------------------- VAE

_HOST_VAE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}  # what comfy.sd.VAE builds without config


def _vae_config(sd: dict) -> dict | None:
    """config= for an SD AutoencoderKL (LDM names) of widths other than the host's, read from its shapes."""
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight", "quant_conv.weight")
    if not all(key in sd for key in needed):
        return None
    ch = sd["encoder.conv_in.weight"].shape[0]
    ch_mult, level = [], 0
    while f"encoder.down.{level}.block.0.conv1.weight" in sd:
        ch_mult.append(sd[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] // ch)
        level += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
        blocks += 1
    sizes = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": blocks}
    if sizes == _HOST_VAE or len(ch_mult) != 4:  # the host's own size; or not SD's 8x downscale
        return None
    ddconfig = {"double_z": True, "z_channels": sd["decoder.conv_in.weight"].shape[1], "resolution": 256,
                "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_ch": sd["decoder.conv_out.weight"].shape[0],
                "attn_resolutions": [], "dropout": 0.0, **sizes}
    return {"params": {"ddconfig": ddconfig, "embed_dim": sd["post_quant_conv.weight"].shape[1]}}


def _vae_init(self, *args, **kwargs):
    bound = inspect.signature(_HOST["VAE.__init__"]).bind(self, *args, **kwargs)
    sd, config = bound.arguments.get("sd"), bound.arguments.get("config")
    if config is None and sd:
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:  # diffusers names, which the host converts too
            sd = comfy.diffusers_convert.convert_vae_state_dict(sd)
        config = _vae_config(sd)
        if config is not None:
            bound.arguments["sd"], bound.arguments["config"] = sd, config
    _HOST["VAE.__init__"](*bound.args, **bound.kwargs)


# ----------------------------------------------------------------------------------------------- install

def _unwrapped(function):
    return getattr(function, "__wrapped__", function)  # a second import of this file wraps the host's, not ours


_HOST = {"load_text_encoder_state_dicts": _unwrapped(comfy.sd.load_text_encoder_state_dicts),
         "VAE.__init__": _unwrapped(comfy.sd.VAE.__init__)}
_load_text_encoder_state_dicts.__wrapped__ = _HOST["load_text_encoder_state_dicts"]
_vae_init.__wrapped__ = _HOST["VAE.__init__"]


def install() -> None:
    """Registers the tiny sizes with the host (idempotent)."""
    comfy.supported_models.models.extend(cls for cls in MODEL_CLASSES if cls not in comfy.supported_models.models)
    comfy.sd.load_text_encoder_state_dicts = _load_text_encoder_state_dicts
    comfy.sd.VAE.__init__ = _vae_init


def uninstall() -> None:
    for cls in MODEL_CLASSES:
        while cls in comfy.supported_models.models:
            comfy.supported_models.models.remove(cls)
    comfy.sd.load_text_encoder_state_dicts = _HOST["load_text_encoder_state_dicts"]
    comfy.sd.VAE.__init__ = _HOST["VAE.__init__"]


@contextlib.contextmanager
def without_tiny_sizes():
    """The bare host for the duration (a test of what the pack does with sizes the host does not know)."""
    uninstall()
    try:
        yield
    finally:
        install()


install()
