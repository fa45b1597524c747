"""predict_noise over a diffusers UNet or a ComfyUI-style denoiser."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .unet import PredictNoise


def diffusers_predict_noise(unet) -> PredictNoise:
    """predict_noise over a diffusers UNet2DConditionModel (ε prediction): inputs cast to the UNet's
    dtype and device, ε returned as the UNet gives it (the phases cast it to the latents' dtype)."""
    def predict_noise(latents: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
        return unet(latents.to(unet.device, unet.dtype), t,
                    encoder_hidden_states=embeds.to(unet.device, unet.dtype)).sample
    return predict_noise


def predict_noise_from_denoiser(denoise: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
                                alphas_cumprod) -> PredictNoise:
    """predict_noise over a k-diffusion-style denoiser (ComfyUI's model: denoised D for x = x0 + σ·n).

    For the VP latent x_t, σ = √((1 − ᾱ_t)/ᾱ_t) and the denoiser's input is x_t/√ᾱ_t (its ε model
    then sees x_t itself, since it divides by √(σ² + 1)); ε = (x_t/√ᾱ_t − D)/σ. denoise(x, sigma,
    embeds) -> D gets σ as a float; the host maps it back to t by nearest log σ, exact here.
    """
    table = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)

    def predict_noise(latents: torch.Tensor, t: int, embeds: torch.Tensor) -> torch.Tensor:
        a = table[t].item()
        sigma = math.sqrt((1 - a) / a)
        x = latents / math.sqrt(a)
        return (x - denoise(x, sigma, embeds).to(x)) / sigma
    return predict_noise


