"""LLMGA checkpoint loader: an LLMGA diffusers SD folder as ComfyUI MODEL, CLIP and VAE.

The original loads these folders with `DiffusionPipeline.from_pretrained` (llmga/serve/cli-sd15*.py,
cli-sdxl*.py). llmga_core.checkpoints reads the folder (configs checked, the fp16 variant first, sharded
and .bin weights read safely), and the weights go through the host's own loading functions, the ones its
UNETLoader, CLIPLoader and VAELoader use: comfy.sd.load_diffusion_model_state_dict,
comfy.sd.load_text_encoder_state_dicts and comfy.sd.VAE. So the host's model detection, ModelPatcher and
dtype choice apply (flags such as --fp32-text-enc too); 9-channel UNets become inpainting models that take
InpaintModelConditioning's mask and masked image.

The host recognises only the released sizes (its UNet detection table, its fixed CLIP-L/CLIP-G and VAE
configs). For other sizes, which only the tests' tiny models have, one adapter below builds the same host
classes from the folder's config.json files, and the log says which path each part took.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.diffusers_convert
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..llmga_core.checkpoints import (SDFolder, SDFolderError, clip_keys_with_text_model_prefix, clip_text_config,
                                      inspect_sd_folder, load_state_dict, vae_ddconfig)
from ..llmga_core.weights import read_json
from .paths import SD_FOLDER, list_model_dirs, resolve_model_path

log = logging.getLogger("llmga")

# The text projection of a CLIP-L saved as CLIPTextModel is absent (SD1.5's pooled output is the
# unprojected one, SDXL's comes from CLIP-G); the host checkpoint loader ignores it the same way.
_OPTIONAL_CLIP_L_KEYS = {"text_projection.weight"}
# What comfy.sd.VAE builds from a state dict alone (comfy/sd.py, VAE.__init__): the SD/SDXL AutoencoderKL.
_HOST_VAE_SIZES = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
# The host's own CLIP text configs (comfy/sd1_clip_config.json, comfy/clip_config_bigg.json), by encoder.
_HOST_CLIP_CONFIGS = {"l": "sd1_clip_config.json", "g": "clip_config_bigg.json"}


def _check_weights_fit(where, expected, given, optional=frozenset()) -> None:
    """Raises SDFolderError unless the weight names `given` are exactly the `expected` ones."""
    missing = sorted(set(expected) - set(given) - set(optional))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        def examples(keys):
            return (", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")) or "-"

        raise SDFolderError(f"{where}: the weights do not fit its config.json ({len(missing)} missing, e.g. "
                            f"{examples(missing)}; {len(unexpected)} unexpected, e.g. {examples(unexpected)}); "
                            f"download that folder again.")


def load_unet(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """The folder's UNet as the host's SD15/SDXL model (inpainting when it has 9 input channels)."""
    state = load_state_dict(info.unet_files)
    host_config = comfy.model_detection.model_config_from_diffusers_unet(state)
    # LDM names by the host's own map (names it does not map stay, to be reported); the host pops `state`
    key_map = comfy.utils.unet_to_diffusers(info.ldm_config if host_config is None else host_config.unet_config)
    given = [key_map.get(key, key) for key in state]
    if host_config is None:
        model = _unet_from_config(info, state, key_map, dtype)
    else:
        model = comfy.sd.load_diffusion_model_state_dict(state, model_options={} if dtype is None else {"dtype": dtype})
    _check_weights_fit(info.path / "unet", model.model.diffusion_model.state_dict(), given)
    return model


def _host_knows_clip(info: SDFolder) -> bool:
    """True when every text encoder has the sizes of the host's own CLIP-L / CLIP-G config."""
    for key, config in (("l", info.text_encoder_config), ("g", info.text_encoder_2_config)):
        if config is not None:
            host = comfy.sd1_clip if key == "l" else comfy.sdxl_clip
            host_sizes = clip_text_config(read_json(os.path.join(os.path.dirname(host.__file__),
                                                                 _HOST_CLIP_CONFIGS[key])))
            if clip_text_config(config, projected=key == "g") != host_sizes:
                return False
    return True


def load_clip(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.sd.CLIP | None:
    """The folder's text encoder(s) as the host's SD1 or SDXL CLIP (None when the folder has none)."""
    if not info.has_clip:
        return None
    states = {"l": clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_files))}
    if info.pipeline == "sdxl":
        states["g"] = clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_2_files))
    options = {} if dtype is None else {"dtype": dtype}
    if _host_knows_clip(info):
        clip = comfy.sd.load_text_encoder_state_dicts(
            list(states.values()), embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options=options)
    else:
        clip = _clip_from_config(info, states, options)
    where = {"l": info.path / "text_encoder", "g": info.path / "text_encoder_2"}
    for key, state in states.items():
        encoder = getattr(clip.cond_stage_model, f"clip_{key}")
        _check_weights_fit(where[key], encoder.transformer.state_dict(), state,
                           _OPTIONAL_CLIP_L_KEYS if key == "l" else ())
    if "text_projection.weight" not in states["l"]:
        # unused, but never left as uninitialised memory
        with torch.no_grad():
            projection = clip.cond_stage_model.clip_l.transformer.text_projection.weight
            projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype))
    return clip


def load_vae(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.sd.VAE | None:
    """The folder's VAE as the host's AutoencoderKL (None when the folder has none)."""
    if not info.has_vae:
        return None
    ddconfig, embed_dim = vae_ddconfig(info.vae_config)
    state = load_state_dict(info.vae_files)
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in state:  # diffusers names, as released
        state = comfy.diffusers_convert.convert_vae_state_dict(state)
    host_knows = all(ddconfig[key] == value for key, value in _HOST_VAE_SIZES.items())
    # the adapter for other sizes is the config the host accepts beside the state dict
    config = None if host_knows else {"params": {"ddconfig": ddconfig, "embed_dim": embed_dim}}
    vae = comfy.sd.VAE(sd=state, config=config, dtype=dtype)
    _check_weights_fit(info.path / "vae", vae.first_stage_model.state_dict(), state)
    return vae


def load_sd_folder(folder, *, unet_dtype=None, clip_dtype=None, vae_dtype=None):
    """(MODEL, CLIP, VAE) of an LLMGA SD folder; the folder is checked before any weights are read.

    dtypes default to the host's choices; CLIP or VAE is None when the folder lacks it.
    """
    info = inspect_sd_folder(folder)
    model = load_unet(info, dtype=unet_dtype)
    clip = load_clip(info, dtype=clip_dtype)
    vae = load_vae(info, dtype=vae_dtype)
    log.info("LLMGA checkpoint %s: %s UNet%s", info.path, info.kind, "" if clip and vae else
             " (no CLIP or VAE in the folder)")
    return model, clip, vae


# ------------------------------------------------------------- adapter: sizes the host's loaders do not know

def _unet_from_config(info: SDFolder, state: dict, key_map: dict, dtype) -> comfy.model_patcher.ModelPatcher:
    """What load_diffusion_model_state_dict does, with the model class chosen from unet/config.json."""
    log.info("%s: a UNet size the host's detection does not know; built from its config.json", info.path / "unet")
    ldm = dict(info.ldm_config)
    model_config = (comfy.supported_models.SDXL if info.pipeline == "sdxl" else comfy.supported_models.SD15)(ldm)
    # the class constructors force SD1.5's 8 heads / SDXL's 64-wide heads; the folder says what it has
    model_config.unet_config["num_heads"] = ldm["num_heads"]
    model_config.unet_config["num_head_channels"] = ldm["num_head_channels"]
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state),
                              supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(state))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model = model_config.get_model({}, "").to(offload_device)
    mapped = {key_map[k]: v for k, v in state.items() if k in key_map}
    own = model.diffusion_model.state_dict()
    wrong = sorted(k for k, v in mapped.items() if k in own and own[k].shape != v.shape)
    if wrong:  # torch would raise its multi-line size-mismatch dump
        raise SDFolderError(f"{info.path / 'unet'}: the weights do not fit its config.json ({len(wrong)} with "
                            f"other sizes, e.g. {', '.join(wrong[:3])}); download that folder again.")
    model.diffusion_model.load_state_dict(mapped, strict=False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _clip_from_config(info: SDFolder, states: dict, options: dict) -> comfy.sd.CLIP:
    """The host's SD1/SDXL CLIP with the folder's sizes merged into its configs (clip_l/clip_g_model_config)."""
    log.info("%s: text encoder sizes the host's CLIP loader does not know; built from their config.json", info.path)
    options = dict(options, clip_l_model_config=clip_text_config(info.text_encoder_config))
    if info.pipeline == "sdxl":
        options["clip_g_model_config"] = clip_text_config(info.text_encoder_2_config, projected=True)
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=sum(comfy.utils.calculate_parameters(s) for s in states.values()),
                         model_options=options)
    for key, state in states.items():
        getattr(clip.cond_stage_model, f"clip_{key}").load_sd(state)
    return clip


class LLMGACheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMGACheckpointLoader",
            display_name="Load LLMGA Checkpoint",
            category="LLMGA/loaders",
            description="Loads an LLMGA Stable Diffusion folder in diffusers format (llmga-sd15-t2i-v2, "
                        "llmga-sd15-inpainting-v2, llmga-sdxl-t2i, llmga-sdxl-inpainting-v2) from models/diffusers. "
                        "Inpainting checkpoints take their mask through InpaintModelConditioning.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_dirs(SD_FOLDER, "model_index.json"),
                               tooltip="A folder under models/diffusers holding model_index.json, unet/, vae/ "
                                       "and text_encoder/ (+ text_encoder_2/ for SDXL)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The LLMGA UNet (SD1.5 or SDXL; inpainting models have 9 input channels)."),
                io.Clip.Output(tooltip="The folder's CLIP text encoder(s)."),
                io.Vae.Output(tooltip="The folder's VAE."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        folder = resolve_model_path(SD_FOLDER, model_name, want_dir=True)
        model, clip, vae = load_sd_folder(folder)
        return io.NodeOutput(model, clip, vae)


NODES = [LLMGACheckpointLoader]
