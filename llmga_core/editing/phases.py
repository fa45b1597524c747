"""The three phases: the edit mask, the inversion and the masked re-sampling."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .schedule import MASK_TIMESTEP, _Schedule, _mean
from .unet import (PredictNoise, Progress, _Request, _UNet, _calls_for, _check_embeds, _check_latents,
                   _check_max_batch, _check_per_step, _check_timesteps, _shape)


def _mask_requests(latents: torch.Tensor, source_embeds: torch.Tensor, target_embeds: torch.Tensor):
    return [_Request(latents, source_embeds), _Request(latents, target_embeds)]


def _mask_calls(n: int, source_embeds, target_embeds, max_batch) -> int:
    return _calls_for([(n, tuple(source_embeds.shape)), (n, tuple(target_embeds.shape))], max_batch)


def _step_calls(cond_embeds, uncond_embeds, max_batch) -> int:
    return _calls_for([(1, tuple(uncond_embeds.shape)), (1, tuple(cond_embeds.shape))], max_batch)


@torch.no_grad()
def edit_mask(predict_noise: PredictNoise, latents: torch.Tensor, noise: torch.Tensor,
              source_embeds: torch.Tensor, target_embeds: torch.Tensor, *, alphas_cumprod,
              timestep: int = MASK_TIMESTEP, threshold_ratio: float = 3.0,
              progress: Optional[Progress] = None, max_batch: Optional[int] = None) -> torch.Tensor:
    """The edit mask of generate_mask: where the target and source captions disagree about the noise.

    latents: the N VAE posterior samples × LATENT_SCALE (N×C×h×w; N = 10 in the original); noise:
    the N draws (N×C×h×w) that noise them to `timestep` as x = √ᾱ·latents + √(1−ᾱ)·noise. embeds:
    1×L×C each, the lpw encodings of the captions (at most 3 chunks, padded to a common length).
    The map m is the mean over draws and channels of |ε(x, target) − ε(x, source)|; with
    c = threshold_ratio·mean(m), the mask is clamp(m, 0, c)/c > 0.5, i.e. m > 1.5·mean(m) at the
    default ratio. (The original's CFG against "" scales both terms alike, so it cancels.) When m
    is 0 everywhere (identical predictions) the original's 0/0 makes the mask full; so does this.
    Returns a bool h×w tensor (latent size). All 2N predictions share one predict_noise call when
    the two embeddings have the same length (else one call per caption), split into calls of at
    most max_batch latents; progress(done, total) follows each call.
    """
    _check_latents(latents, "latents", batch=None)
    if not isinstance(noise, torch.Tensor) or noise.shape != latents.shape:
        got = _shape(noise) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have the latents' shape {_shape(latents)}, not {got}.")
    _check_embeds(source_embeds, "source_embeds")
    _check_embeds(target_embeds, "target_embeds")
    schedule = _Schedule(alphas_cumprod, latents.dtype)
    _check_mask_settings(threshold_ratio, timestep, schedule)
    max_batch = _check_max_batch(max_batch)
    unet = _UNet(predict_noise, max_batch, progress,
                 _mask_calls(latents.shape[0], source_embeds, target_embeds, max_batch))
    return _edit_mask(unet, schedule, latents, noise, source_embeds, target_embeds, int(timestep), threshold_ratio)


def _check_mask_settings(threshold_ratio, timestep, schedule: _Schedule) -> None:
    if isinstance(threshold_ratio, bool) or not isinstance(threshold_ratio, (int, float)) or not threshold_ratio > 0:
        raise ValueError(f"threshold_ratio must be a positive number, not {threshold_ratio!r}.")
    if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)) or not 0 <= timestep < len(schedule):
        raise ValueError(f"timestep must be a whole number from 0 to {len(schedule) - 1}, not {timestep!r}.")


def _edit_mask(unet: _UNet, schedule: _Schedule, latents, noise, source_embeds, target_embeds, timestep,
               threshold_ratio) -> torch.Tensor:
    dtype = latents.dtype
    x = schedule.add_noise(latents, noise.to(latents), timestep)
    eps_source, eps_target = unet(_mask_requests(x, source_embeds, target_embeds), timestep, dtype)
    guidance_map = torch.abs(eps_target - eps_source).mean(dim=(0, 1))
    clamp_magnitude = guidance_map.mean() * threshold_ratio
    return (guidance_map.clamp(0, clamp_magnitude) / clamp_magnitude).le(0.5).logical_not()


@torch.no_grad()
def invert(predict_noise: PredictNoise, x0: torch.Tensor, noise: torch.Tensor, source_embeds: torch.Tensor,
           uncond_embeds: torch.Tensor, *, alphas_cumprod, timesteps: Sequence[int], guidance: float = 3.5,
           progress: Optional[Progress] = None, max_batch: Optional[int] = None):
    """Edit-friendly DDPM inversion on the SDE-DPM-Solver++(2M): the noise maps that regenerate x0.

    x0: the VAE mode × LATENT_SCALE (1×C×h×w). noise: T×1×C×h×w, noise[k] the independent draw that
    noises x0 to timesteps[k] (T = len(timesteps)). source_embeds: the source caption as plain 77
    tokens; uncond_embeds: "" (1×L×C each). Each step from s = timesteps[k] to t′ (the next one, 0
    after the last) predicts ε = ε_∅ + guidance·(ε_src − ε_∅) at x_s, takes the solver's mean μ
    (first order at k = 0, 2M midpoint after) and stores z_k = (x_t′ − μ)/(σ_t′·√(1 − e^(−2h))),
    x_t′ being the next independently noised latent and, for the last step, x0 itself. x_s is the
    latent the original's correction writes back (μ + σ·z of the step before, equal to the noised
    one up to rounding). Returns (x_start, zs): x_start = the noised latent at timesteps[0]
    (1×C×h×w), zs T×1×C×h×w with zs[k] the map of the step from timesteps[k]. Both predictions of a
    step share one predict_noise call (two if the embeddings differ in length or max_batch is 1);
    progress(done, total) follows each call.
    """
    schedule = _check_phase(x0, "x0", noise, "noise", alphas_cumprod, timesteps, source_embeds,
                            "source_embeds", uncond_embeds, "uncond_embeds")
    max_batch = _check_max_batch(max_batch)
    steps = list(timesteps)
    unet = _UNet(predict_noise, max_batch, progress,
                 len(steps) * _step_calls(source_embeds, uncond_embeds, max_batch))
    return _invert(unet, schedule, x0, noise, source_embeds, uncond_embeds, [int(t) for t in steps], guidance)


def _check_phase(x, x_name, maps, maps_name, alphas_cumprod, steps, cond, cond_name, uncond, uncond_name):
    _check_latents(x, x_name)
    _check_embeds(cond, cond_name)
    _check_embeds(uncond, uncond_name)
    schedule = _Schedule(alphas_cumprod, x.dtype)
    steps = _check_timesteps(steps, schedule)
    _check_per_step(maps, maps_name, len(steps), x)
    return schedule


def _invert(unet: _UNet, schedule: _Schedule, x0, noise, source_embeds, uncond_embeds, steps, guidance):
    dtype = x0.dtype
    noised = [schedule.add_noise(x0, noise[k].to(x0), t) for k, t in enumerate(steps)]
    zs = torch.empty((len(steps), *x0.shape), dtype=dtype, device=x0.device)
    x, d_prev = noised[0], None
    for k, s in enumerate(steps):
        eps_uncond, eps_source = unet([_Request(x, uncond_embeds), _Request(x, source_embeds)], s, dtype)
        eps = eps_uncond + guidance * (eps_source - eps_uncond)
        d0 = schedule.to_x0(x, eps, s)
        last = k == len(steps) - 1
        coefficients = schedule.step(s, 0 if last else steps[k + 1], None if k == 0 else steps[k - 1])
        mu = _mean(x, d0, d_prev, coefficients)
        c_noise = coefficients[4]
        zs[k] = ((x0 if last else noised[k + 1]) - mu) / c_noise
        x = mu + c_noise * zs[k]  # the original's "correction", the next step's input
        d_prev = d0
    return noised[0], zs


@torch.no_grad()
def resample(predict_noise: PredictNoise, x_start: torch.Tensor, zs: torch.Tensor, target_embeds: torch.Tensor,
             uncond_embeds: torch.Tensor, mask: torch.Tensor, *, alphas_cumprod, timesteps: Sequence[int],
             guidance: float = 7.5, progress: Optional[Progress] = None,
             max_batch: Optional[int] = None) -> torch.Tensor:
    """Re-sampling from the inverted latent with the stored noise maps and the target caption.

    x_start: invert's first return (1×C×h×w); zs: its noise maps (T×1×C×h×w). target_embeds: the
    target caption in lpw (at most 4 chunks); uncond_embeds: "" padded to the same length (1×L×C
    each). mask: bool h×w at latent size (a float mask is binarized at 0.5, as the original's
    preprocess_mask does). Each step predicts ε = ε_∅ + (guidance·(ε_tgt − ε_∅))·M, purely
    unconditional outside the mask, and takes the SDE-DPM-Solver++(2M) step with z_k as its noise:
    x_t′ = μ + σ_t′·√(1 − e^(−2h))·z_k; the first step is first order, and with fewer than 15
    timesteps the last one is too (the original's lower_order_final). The last step lands at t = 0,
    a noisy latent at σ = 0.029155, not the clean x0. Returns 1×C×h×w latents in the VP scaling at
    t = 0, ready for ÷ LATENT_SCALE and the VAE decoder. An empty mask gives the purely
    unconditional replay, which is not the input (inversion used the guided source prediction);
    ``edit`` returns the input instead. Both predictions of a step share one predict_noise call
    (two if the embeddings differ in length or max_batch is 1); progress(done, total) follows
    each call and its exceptions propagate.
    """
    schedule = _check_phase(x_start, "x_start", zs, "zs", alphas_cumprod, timesteps, target_embeds,
                            "target_embeds", uncond_embeds, "uncond_embeds")
    mask = _latent_mask(mask, x_start)
    max_batch = _check_max_batch(max_batch)
    steps = list(timesteps)
    unet = _UNet(predict_noise, max_batch, progress,
                 len(steps) * _step_calls(target_embeds, uncond_embeds, max_batch))
    return _resample(unet, schedule, x_start, zs, target_embeds, uncond_embeds, mask,
                     [int(t) for t in steps], guidance)


def _latent_mask(mask, latents: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        got = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be an h×w tensor at latent size, not {got}.")
    if tuple(mask.shape) != tuple(latents.shape[-2:]):
        raise ValueError(f"mask is {_shape(mask)} but the latents are {_shape(latents[0, 0])}; "
                         f"bring an image-size mask to latent size with mask_from_image.")
    if mask.dtype != torch.bool:
        if mask.is_complex() or mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask values must lie in 0..1 (or be bool).")
        mask = mask >= 0.5
    return mask


def _resample(unet: _UNet, schedule: _Schedule, x_start, zs, target_embeds, uncond_embeds, mask, steps, guidance):
    dtype = x_start.dtype
    m = mask.to(device=x_start.device, dtype=dtype)[None, None]
    lower_order_final = len(steps) < 15
    x, d_prev = x_start, None
    for k, s in enumerate(steps):
        eps_uncond, eps_target = unet([_Request(x, uncond_embeds), _Request(x, target_embeds)], s, dtype)
        eps = eps_uncond + guidance * (eps_target - eps_uncond) * m
        d0 = schedule.to_x0(x, eps, s)
        last = k == len(steps) - 1
        first_order = k == 0 or (last and lower_order_final)
        coefficients = schedule.step(s, 0 if last else steps[k + 1], None if first_order else steps[k - 1])
        mu = _mean(x, d0, None if first_order else d_prev, coefficients)
        x = mu + coefficients[4] * zs[k].to(x)
        d_prev = d0
    return x


