"""LLMGA instruction editing as a ComfyUI node (LLMGAEdit).

The algorithm is llmga_core.editing (the original's llmga/serve/cli-sd15-editing.py: DiffEdit-style
mask, edit-friendly inversion on SDE-DPM-Solver++(2M), masked re-sampling). This node supplies its
backends from the graph: the UNet is the host's MODEL (its LoRA and model patches apply, the host's
memory management loads it, progress and interruption go through the host's ProgressBar), the text
encodings are made on the host's CLIP as the original makes them per phase, and the image goes through
the host's VAE.
"""
from __future__ import annotations

import warnings

import torch

import comfy.latent_formats
import comfy.model_management as model_management
import comfy.model_sampling
from comfy_api.latest import io, ui

from ..llmga_core import editing
from ..llmga_core.long_prompt import PromptTruncatedWarning, encode_with_backend, plain_chunk_ids, recipe_for
from .host_clip import clip_family, host_chunk_encoder, host_tokenizer_specs
from .notes import log_notes, shown_text
from .progress import step_reporter

# ---------------------------------------------------------------------------------------- checks
def check_sd15_t2i(model) -> None:
    """LLMGA edits with its SD1.5 text-to-image UNet only (cli-sd15-editing.py); one sentence otherwise."""
    latent_format = model.get_model_object("latent_format")
    sampling = model.get_model_object("model_sampling")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    if isinstance(latent_format, comfy.latent_formats.SDXL):
        raise ValueError("LLMGA Edit runs on LLMGA's SD1.5 text-to-image UNet, as the original does, but the "
                         "connected MODEL is an SDXL model; load the llmga-sd15-t2i checkpoint for editing.")
    if unet_config.get("in_channels", 4) != 4:
        raise ValueError("LLMGA Edit runs on LLMGA's SD1.5 text-to-image UNet, but the connected MODEL is an "
                         "inpainting UNet (9 input channels); load the llmga-sd15-t2i checkpoint for editing.")
    if (not isinstance(latent_format, comfy.latent_formats.SD15) or not isinstance(sampling, comfy.model_sampling.EPS)
            or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)):
        raise ValueError(f"LLMGA Edit runs on LLMGA's SD1.5 text-to-image UNet (epsilon prediction, "
                         f"SD1.5 latents), but the connected MODEL is {type(model.model).__name__}; load the "
                         f"llmga-sd15-t2i checkpoint for editing.")


def check_captions(source_prompt: str, target_prompt: str) -> None:
    if not (source_prompt or "").strip():
        raise ValueError("source_prompt is empty; connect the source_prompt output of an LLMGA Prompt Generator "
                         "running the editing task (or type a caption of the input image).")
    if not (target_prompt or "").strip():
        raise ValueError("target_prompt is empty; connect the prompt output of an LLMGA Prompt Generator running "
                         "the editing task (or type a caption of the edited image).")


def given_mask(mask, image_hw: tuple[int, int], prepared: editing.PreparedImage) -> torch.Tensor:
    """A MASK input as the latent-size bool mask: at the input image's size (cropped and resized like
    the image) or at the edit's size (LLMGA Edit's own edit_mask output, 512×512)."""
    plane = mask[0] if mask.ndim == 3 else mask
    size = editing.IMAGE_SIZE
    hw = tuple(plane.shape[-2:])
    if hw == image_hw and hw != (size, size):
        plane = editing.prepare_image(plane[..., None].expand(*hw, 3)).image[..., 0]
    elif hw != (size, size):
        raise ValueError(f"The mask is {hw[1]}×{hw[0]} but the image is {image_hw[1]}×{image_hw[0]}; give a mask "
                         f"of the image's size or LLMGA Edit's own {size}×{size} edit_mask.")
    latent = size // 8
    return editing.mask_from_image(plane.float().cpu(), latent, latent)


# ---------------------------------------------------------------------------------------- text
def inversion_chunk(clip, text: str) -> torch.Tensor:
    """The inversion phase's source / "" encoding: a plain 77-token tokenizer call (BOS + the first 76
    ids, no EOS when longer; brackets literal) through the last CLIP layer."""
    spec = host_tokenizer_specs(clip, ("l",))["l"]
    ids = plain_chunk_ids(text, spec)
    hidden, _ = host_chunk_encoder(clip, recipe_for("sd15"))({"l": [ids]})
    return hidden.reshape(1, -1, hidden.shape[-1])


def edit_embeddings(clip, source_prompt: str, target_prompt: str, notes: list[str]) -> editing.EditEmbeds:
    """The edit's encodings on the host's CLIP, per phase as llmga_core.editing.caption_embeddings says."""
    if clip_family(clip) != "sd15":
        raise ValueError("LLMGA Edit needs the SD1.5 CLIP (CLIP-L) of LLMGA's SD1.5 checkpoint; connect the "
                         "checkpoint loader's CLIP.")
    specs = host_tokenizer_specs(clip, ("l",))

    def long_prompt(prompt: str, negative: str, pipeline: str, phase: str):
        recipe = recipe_for(pipeline)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            embeds = encode_with_backend(prompt, negative, tokenizers=specs, recipe=recipe,
                                         encode_chunks=host_chunk_encoder(clip, recipe))
        for w in caught:
            if issubclass(w.category, PromptTruncatedWarning):
                notes.append(f"{phase}: {w.message}")
        return embeds["prompt_embeds"], embeds["negative_prompt_embeds"]

    return editing.caption_embeddings(source_prompt, target_prompt, long_prompt=long_prompt,
                                      plain_prompt=lambda text: inversion_chunk(clip, text))


# ---------------------------------------------------------------------------------------- UNet and VAE
def host_denoiser(model):
    """denoise(x, sigma, embeds) -> D over the host's MODEL, as its samplers call it: apply_model with the
    model's transformer options and model_function_wrapper patches (LoRA weights are patched at load)."""
    base = model.model
    options = model.model_options
    transformer_options = options.get("transformer_options", {})
    wrapper = options.get("model_function_wrapper")
    device = model.load_device

    def denoise(x: torch.Tensor, sigma: float, embeds: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.to(device=device, dtype=torch.float32)
        timestep = torch.full((batch,), float(sigma), device=device)
        c = {"c_crossattn": embeds.to(device).expand(batch, *embeds.shape[1:]),
             "transformer_options": transformer_options}
        if wrapper is not None:
            return wrapper(base.apply_model, {"input": x, "timestep": timestep, "c": c,
                                              "cond_or_uncond": [0] * batch})
        return base.apply_model(x, timestep, **c)

    return denoise


class _MomentsOfEncode:
    """Records the VAE encoder's posterior moments (mean, logvar) while the host's VAE.encode runs, which
    itself returns only the mode; the mask phase needs posterior samples, as the original draws them."""

    def __init__(self, vae):
        self.module = getattr(vae.first_stage_model, "regularization", None)
        self.captured: list[torch.Tensor] = []

    def __enter__(self):
        self.handle = None
        if self.module is not None:
            self.handle = self.module.register_forward_pre_hook(
                lambda module, args: self.captured.append(args[0].detach().float().cpu()))
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


def encode_image(vae, model, pixels: torch.Tensor):
    """x0 (VAE mode × 0.18215) and the posterior moments (None when the VAE did not expose them)."""
    latent_format = model.get_model_object("latent_format")
    with _MomentsOfEncode(vae) as record:
        mode = vae.encode(pixels[None])
    x0 = latent_format.process_in(mode.float())
    return x0, record.captured[0] if len(record.captured) == 1 else None


# ---------------------------------------------------------------------------------------- the node
class LLMGAEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LLMGAEdit",
            display_name="LLMGA Edit (Instruction Editing)",
            category="LLMGA/editing",
            description="Edits an image from the source and target captions of LLMGA's editing task, as the "
                        "original does: an edit mask where the captions disagree, inversion of the image under "
                        "the source caption, re-sampling with the target caption guided only inside the mask. "
                        "Use LLMGA's SD1.5 text-to-image MODEL and CLIP, and the sd-vae-ft-mse VAE.",
            inputs=[
                io.Model.Input("model", tooltip="LLMGA's SD1.5 text-to-image UNet (llmga-sd15-t2i)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The original replaces the VAE with stabilityai/sd-vae-ft-mse."),
                io.Image.Input("image", tooltip="The image to edit (first of a batch); centre-cropped to a "
                                                "square and resized to 512×512 as the original does."),
                io.String.Input("source_prompt", multiline=True, force_input=True,
                                tooltip="Caption of the input image: the Prompt Generator's source_prompt "
                                        "(editing task)."),
                io.String.Input("target_prompt", multiline=True, force_input=True,
                                tooltip="Caption of the edited image: the Prompt Generator's prompt (editing "
                                        "task)."),
                io.Int.Input("steps", default=50, min=1, max=editing.max_steps(0),
                             tooltip="Inversion and re-sampling steps (the original's --steps, 50)."),
                io.Int.Input("skip", default=25, min=0, max=99,
                             tooltip="Percent of the noise schedule skipped: 25 starts at t = 749 (--skip)."),
                io.Float.Input("source_guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance of the inversion under the source caption (--src_cfg_scale)."),
                io.Float.Input("target_guidance", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance of the re-sampling, inside the mask only (--tar_cfg_scale)."),
                io.Float.Input("mask_threshold_ratio", default=3.0, min=0.01, max=100.0, step=0.1,
                               tooltip="The mask keeps latent pixels whose noise difference exceeds ratio/2 × "
                                       "its mean (generate_mask's mask_thresholding_ratio)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds every draw (VAE samples, mask noise, inversion noise); the "
                                     "original draws them unseeded."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Replaces the computed edit mask (white = edit): the image's size, or "
                                      "this node's own 512×512 edit_mask, painted over."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The edited image, 512×512."),
                io.Mask.Output(display_name="edit_mask", tooltip="Where the edit applied, 512×512 (each latent "
                                                                 "pixel an 8×8 block)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, target_prompt, steps=50, skip=25,
                source_guidance=3.5, target_guidance=7.5, mask_threshold_ratio=3.0, seed=0,
                mask=None) -> io.NodeOutput:
        # every cheap check first, before a model moves
        if image is None:
            raise ValueError("LLMGA Edit needs the image to edit; connect it to the image input.")
        check_captions(source_prompt, target_prompt)
        check_sd15_t2i(model)
        steps_list = editing.timesteps(steps, skip)  # one sentence for steps/skip out of range
        rgb = image[0, ..., :3]
        prepared = editing.prepare_image(rgb)
        notes: list[str] = [prepared.note] if prepared.note else []
        latent_mask = given_mask(mask, tuple(rgb.shape[:2]), prepared) if mask is not None else None
        if image.shape[0] > 1:
            notes.append(f"edited the first of {image.shape[0]} images")

        embeds = edit_embeddings(clip, source_prompt, target_prompt, notes)
        x0, moments = encode_image(vae, model, prepared.image)
        noise = editing.draw_noise(seed, x0.shape[1:], steps=len(steps_list))
        mask_latents = None
        if latent_mask is None:
            mask_latents, posterior_note = editing.mask_latents(x0, moments, noise)
            notes += [posterior_note] if posterior_note else []

        planned = editing.unet_calls(len(steps_list), mask=latent_mask is None, embeds=embeds)
        report = step_reporter(sum(planned.values()))
        batch = editing.largest_unet_batch(mask=latent_mask is None, embeds=embeds)
        memory = model.model.memory_required([batch, *x0.shape[1:]])
        model_management.load_models_gpu([model], memory_required=memory)
        alphas_cumprod = editing.scaled_linear_alphas_cumprod()
        result = editing.edit(
            editing.predict_noise_from_denoiser(host_denoiser(model), alphas_cumprod), x0.to(model.load_device),
            embeds, noise, alphas_cumprod=alphas_cumprod,
            mask_latents=None if mask_latents is None else mask_latents.to(model.load_device),
            mask=latent_mask, step_timesteps=steps_list, source_guidance=source_guidance,
            target_guidance=target_guidance, threshold_ratio=mask_threshold_ratio,
            progress=report)  # after every UNet call: Cancel is checked there

        size = editing.IMAGE_SIZE
        edit_mask = editing.mask_to_image(result.mask.cpu(), size, size)[None]
        if result.edited:
            latent_format = model.get_model_object("latent_format")
            edited = vae.decode(latent_format.process_out(result.latents.float().cpu()))[..., :3]
            edited = edited.reshape(1, size, size, 3).float().clamp(0, 1)
        else:
            edited = prepared.image[None].clone()
        notes = log_notes("LLMGA Edit", notes + result.notes)
        shown = shown_text(("edited " if result.edited else "not edited ")
                           + f"({int(result.mask.sum())} of {result.mask.numel()} latent pixels in the mask)", notes)
        return io.NodeOutput(edited, edit_mask, ui=ui.PreviewText(shown))


NODES = [LLMGAEdit]
