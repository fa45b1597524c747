"""LLMGA checkpoint loader: an LLMGA diffusers SD folder as ComfyUI MODEL, CLIP and VAE.

The original loads these folders with `DiffusionPipeline.from_pretrained` (llmga/serve/cli-sd15*.py,
cli-sdxl*.py). The host's own DiffusersLoader only accepts full-size models from its detection table
and no sharded weights, so this node reads the folder with llmga_core.checkpoints and builds the
host's own classes from the folder's config.json files: comfy.supported_models SD15/SDXL (9-channel
UNets become inpainting models that take InpaintModelConditioning's mask and masked image),
comfy.sd.CLIP with the SD1 or SDXL text encoders, and comfy.sd.VAE. Devices and dtypes are the
host's choices (command-line flags such as --fp32-text-enc apply).
"""
from __future__ import annotations

import logging

import torch

import comfy.diffusers_convert
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
from .paths import SD_FOLDER, list_model_dirs, resolve_model_path

log = logging.getLogger("llmga")

# The text projection of a CLIP-L saved as CLIPTextModel is absent (SD1.5's pooled output is the
# unprojected one, SDXL's comes from CLIP-G); the host checkpoint loader ignores it the same way.
_OPTIONAL_CLIP_L_KEYS = {"text_projection.weight"}


def _examples(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")


def load_unet(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """The folder's UNet as the host's SD15/SDXL model (inpainting when it has 9 input channels)."""
    ldm = dict(info.ldm_config)
    cls = comfy.supported_models.SDXL if info.pipeline == "sdxl" else comfy.supported_models.SD15
    model_config = cls(ldm)
    # the class constructors force SD1.5's 8 heads / SDXL's 64-wide heads; the folder says what it has
    model_config.unet_config["num_heads"] = ldm["num_heads"]
    model_config.unet_config["num_head_channels"] = ldm["num_head_channels"]

    state = load_state_dict(info.unet_files)
    key_map = comfy.utils.unet_to_diffusers(model_config.unet_config)  # diffusers name -> LDM name
    unmapped = [k for k in state if k not in key_map]
    ldm_state = {key_map[k]: v for k, v in state.items() if k in key_map}

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state),
                              supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(state))
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    del state

    model = model_config.get_model({}, "").to(offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(ldm_state, strict=False)
    unexpected = list(unexpected) + unmapped
    if missing or unexpected:
        raise SDFolderError(
            f"{info.path / 'unet'}: the weights do not fit its config.json ({len(missing)} missing, e.g. "
            f"{_examples(missing) or '-'}; {len(unexpected)} unexpected, e.g. {_examples(unexpected) or '-'}); "
            f"download the unet folder again.")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _load_encoder(encoder, state: dict, where, optional=frozenset()) -> None:
    missing, unexpected = encoder.load_sd(state)
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        raise SDFolderError(
            f"{where}: the weights do not fit its config.json ({len(missing)} missing, e.g. {_examples(missing) or '-'}; "
            f"{len(unexpected)} unexpected, e.g. {_examples(unexpected) or '-'}); download that folder again.")


def load_clip(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.sd.CLIP | None:
    """The folder's text encoder(s) as the host's SD1 or SDXL CLIP (None when the folder has none)."""
    if not info.has_clip:
        return None
    state_l = clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_files))
    options = {"clip_l_model_config": clip_text_config(info.text_encoder_config)}
    parameters = comfy.utils.calculate_parameters(state_l)
    state_g = None
    if info.pipeline == "sdxl":
        state_g = clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_2_files))
        options["clip_g_model_config"] = clip_text_config(info.text_encoder_2_config, projected=True)
        parameters += comfy.utils.calculate_parameters(state_g)
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    if dtype is not None:
        options["dtype"] = dtype

    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=parameters, model_options=options)
    encoder_l = clip.cond_stage_model.clip_l
    _load_encoder(encoder_l, state_l, info.path / "text_encoder", _OPTIONAL_CLIP_L_KEYS)
    if "text_projection.weight" not in state_l:
        # unused, but never left as uninitialised memory
        with torch.no_grad():
            projection = encoder_l.transformer.text_projection.weight
            projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype))
    if state_g is not None:
        _load_encoder(clip.cond_stage_model.clip_g, state_g, info.path / "text_encoder_2")
    return clip


def load_vae(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.sd.VAE | None:
    """The folder's VAE as the host's AutoencoderKL, sized from vae/config.json (None when absent)."""
    if not info.has_vae:
        return None
    ddconfig, embed_dim = vae_ddconfig(info.vae_config)
    state = load_state_dict(info.vae_files)
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in state:  # diffusers names, as released
        state = comfy.diffusers_convert.convert_vae_state_dict(state)
    vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": embed_dim}}, dtype=dtype)
    expected = set(vae.first_stage_model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SDFolderError(
            f"{info.path / 'vae'}: the weights do not fit its config.json ({len(missing)} missing, e.g. "
            f"{_examples(missing) or '-'}; {len(unexpected)} unexpected, e.g. {_examples(unexpected) or '-'}); "
            f"download the vae folder again.")
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
