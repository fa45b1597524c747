"""Instruction-based editing as LLMGA does it (llmga/serve/cli-sd15-editing.py).

LLMGA edits an image with three published pieces, run over a Stable Diffusion 1.5 UNet
(reference: LLMGA commit 7e32eb6, class ``SemanticStableDiffusionImg2ImgPipeline_DPMSolver`` in
llmga/diffusers/pipeline_semantic_stable_diffusion_img2img_solver_lpw_mask.py and its scheduler
llmga/diffusers/scheduling_dpmsolver_multistep_inject.py):

- a DiffEdit-style edit mask (Couairon et al., arXiv 2210.11427) from the difference of the noise
  predicted under the target and the source caption (``edit_mask``);
- edit-friendly DDPM-noise-space inversion (Huberman-Spiegelglas et al., arXiv 2304.06140) on the
  SDE-DPM-Solver++(2M) with midpoint corrections, which stores one noise map per step (``invert``);
- re-sampling from the inverted latent with those noise maps and the target caption, classifier-free
  guidance applied only inside the mask (``resample``).

Every latent is in the VP (DDPM) scaling x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·n of the original, x0 being the
VAE latent × 0.18215. The model is a ``predict_noise(latents, t, embeds) -> ε`` callable, so any
UNet serves (the host's MODEL, a diffusers UNet2DConditionModel). Every random draw is an argument;
``draw_noise`` draws them from a seed in the order the original draws them. The original itself
draws them unseeded (torch's global CUDA generator, float16), so an edit equals an original run
given the same noise, never given the same seed.

The arithmetic follows the original operation by operation: solver coefficients are computed in
float32 from float32 ᾱ (float64 when the latents are float64), latents stay in the caller's dtype
(float32, or the model's float16 as LLMGA ran), and the inversion feeds each step the latent its
"correction" wrote back, so re-sampling with the inversion's own prompt and guidance retraces it.
No ComfyUI imports; nothing happens at import time. Modules: schedule (ᾱ, timesteps, the solver), unet
(batching the caller's UNet), noise (the draws, the VAE posterior), phases (mask, inversion, re-sampling),
recipe (the encodings per phase and the whole edit), backends (diffusers / ComfyUI-style UNets), images.
"""
from __future__ import annotations

from .backends import diffusers_predict_noise, predict_noise_from_denoiser
from .images import PreparedImage, mask_from_image, mask_to_image, prepare_image
from .noise import EditNoise, draw_noise, posterior_sample
from .phases import edit_mask, invert, resample
from .recipe import EditEmbeds, EditResult, caption_embeddings, edit, largest_unet_batch, mask_latents, unet_calls
from .schedule import (IMAGE_SIZE, LATENT_SCALE, MASK_MAPS, MASK_TIMESTEP, NUM_TRAIN_TIMESTEPS, max_steps,
                       scaled_linear_alphas_cumprod, timesteps)
from .unet import PredictNoise, Progress

__all__ = [
    "LATENT_SCALE",
    "MASK_TIMESTEP",
    "MASK_MAPS",
    "IMAGE_SIZE",
    "PredictNoise",
    "Progress",
    "scaled_linear_alphas_cumprod",
    "timesteps",
    "max_steps",
    "draw_noise",
    "EditNoise",
    "posterior_sample",
    "caption_embeddings",
    "mask_latents",
    "edit_mask",
    "invert",
    "resample",
    "EditEmbeds",
    "EditResult",
    "edit",
    "unet_calls",
    "diffusers_predict_noise",
    "predict_noise_from_denoiser",
    "mask_from_image",
    "mask_to_image",
    "prepare_image",
    "PreparedImage",
    "largest_unet_batch",
    "NUM_TRAIN_TIMESTEPS",
]
