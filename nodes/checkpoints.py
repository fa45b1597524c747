"""LLMGA checkpoint loader: an LLMGA diffusers SD folder as ComfyUI MODEL, CLIP and VAE.

The original loads these folders with `DiffusionPipeline.from_pretrained` (llmga/serve/cli-sd15*.py,
cli-sdxl*.py). llmga_core.checkpoints reads the folder (configs checked, the fp16 variant first, sharded
and .bin weights read safely), and the weights go through the host's own loading functions, the ones its
UNETLoader, CLIPLoader and VAELoader use: comfy.sd.load_diffusion_model_state_dict,
comfy.sd.load_text_encoder_state_dicts and comfy.sd.VAE. So the host's model detection, ModelPatcher and
dtype choice apply (flags such as --fp32-text-enc too); 9-channel UNets become inpainting models that take
InpaintModelConditioning's mask and masked image. Sizes the host does not know are refused in one sentence.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import torch

import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..llmga_core.checkpoints import (SDFolder, SDFolderError, clip_keys_with_text_model_prefix, inspect_sd_folder,
                                      load_state_dict)
from .paths import SD_FOLDER, list_model_dirs, resolve_model_path

log = logging.getLogger("llmga")

# The text projection of a CLIP-L saved as CLIPTextModel is absent (SD1.5's pooled output is the
# unprojected one, SDXL's comes from CLIP-G); the host checkpoint loader ignores it the same way.
_OPTIONAL_CLIP_L_KEYS = {"text_projection.weight"}
# Names in the host's UNet map (comfy/utils.py, unet_to_diffusers) that a UNet of the config may lack: shortcut
# convs exist only where the width changes, no level samples after the last, and only SDXL has an added embedding.
_MAY_BE_ABSENT = re.compile(r"conv_shortcut|samplers|class_embedding|add_embedding")


def _examples(keys) -> str:
    keys = list(keys)
    return (", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")) or "-"


def _refuse_misfit(where, missing, unexpected) -> None:
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise SDFolderError(f"{where}: the weights do not fit its config.json ({len(missing)} missing, e.g. "
                            f"{_examples(missing)}; {len(unexpected)} unexpected, e.g. {_examples(unexpected)}); "
                            f"download that folder again.")


def _check_weights_fit(where, expected, given, optional=frozenset()) -> None:
    """Raises SDFolderError unless the weight names `given` are exactly the `expected` ones."""
    _refuse_misfit(where, set(expected) - set(given) - set(optional), set(given) - set(expected))


@contextmanager
def _host_builds(where):
    """A host loader's refusal of weights it cannot build as one sentence naming the folder: torch's multi-line
    size-mismatch dump, or a ValueError from the constructor of the model it chose."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        wrong = re.findall(r"size mismatch for ([^:\s]+):", str(error))
        if wrong:
            raise SDFolderError(f"{where}: the weights do not fit the model ComfyUI builds for them ({len(wrong)} "
                                f"with other sizes, e.g. {_examples(wrong)}); use that folder as released with the "
                                f"LLMGA checkpoint.") from None
        if type(error) is not ValueError:  # out of memory, device errors: not the folder's fault
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SDFolderError(f"{where}: ComfyUI could not build a model from these weights ({reason}); use that "
                            f"folder as released with the LLMGA checkpoint.") from error


def load_unet(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """The folder's UNet as the host's SD15/SDXL model (inpainting when it has 9 input channels)."""
    where = info.path / "unet"
    state = load_state_dict(info.unet_files)
    # In the LDM names of single-file checkpoints, which the host's detection reads the architecture from
    # (comfy/model_detection.py, detect_unet_config, then its model table); with diffusers names it would
    # only compare against a fixed list of sizes. The map is the host's own, for the sizes config.json gives.
    key_map = comfy.utils.unet_to_diffusers(info.ldm_config)
    # Before the host sees them: names the map does not know, and the blocks of config.json without weights (the
    # host would read another architecture from what is there). The rest is checked on the model it builds.
    _refuse_misfit(where, {key_map[key] for key in key_map if key not in state and not _MAY_BE_ABSENT.search(key)},
                   {key for key in state if key not in key_map})
    ldm = {key_map[key]: tensor for key, tensor in state.items()}
    given = list(ldm)
    with _host_builds(where):
        model = comfy.sd.load_diffusion_model_state_dict(ldm, model_options={} if dtype is None else {"dtype": dtype})
    if model is None:
        config = info.ldm_config
        raise SDFolderError(f"{where}: this ComfyUI has no model class for a UNet of these sizes "
                            f"({config['model_channels']} base channels, {config['context_dim']}-wide text context, "
                            f"{config['in_channels']} input channels), so it cannot load it; use a released LLMGA "
                            f"SD1.5 or SDXL folder, whose sizes ComfyUI knows.")
    _check_weights_fit(where, model.model.diffusion_model.state_dict(), given)
    return model


def load_clip(info: SDFolder, *, dtype: torch.dtype | None = None) -> comfy.sd.CLIP | None:
    """The folder's text encoder(s) as the host's SD1 or SDXL CLIP (None when the folder has none)."""
    if not info.has_clip:
        return None
    states = {"l": clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_files))}
    if info.pipeline == "sdxl":
        states["g"] = clip_keys_with_text_model_prefix(load_state_dict(info.text_encoder_2_files))
    where = {"l": info.path / "text_encoder", "g": info.path / "text_encoder_2"}
    with _host_builds(" and ".join(str(where[key]) for key in states)):
        # the host fills in and reads the dicts it is given (comfy/sd.py), so it gets copies of the mappings
        clip = comfy.sd.load_text_encoder_state_dicts(
            [dict(state) for state in states.values()], embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={} if dtype is None else {"dtype": dtype})
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
    where = info.path / "vae"
    # diffusers names, as released: the host converts them itself (comfy/sd.py, VAE.__init__)
    state = load_state_dict(info.vae_files)
    count = len(state)
    with _host_builds(where):
        vae = comfy.sd.VAE(sd=state, dtype=dtype)
    if vae.first_stage_model is None:  # the host logs "No VAE weights detected" and builds nothing
        raise SDFolderError(f"{where}: ComfyUI found no VAE in these weights; use that folder as released with the "
                            f"LLMGA checkpoint.")
    # the host renames the tensors one for one, so a VAE that fits has as many as the file
    expected = len(vae.first_stage_model.state_dict())
    if count != expected:
        raise SDFolderError(f"{where}: the weights do not fit the VAE ComfyUI builds for them ({count} tensors in "
                            f"the file, {expected} in the model); download that folder again.")
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
