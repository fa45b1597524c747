"""The whole edit: LLMGA's encodings per phase, the mask's latents, the UNet-call plan and `edit`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from .noise import EditNoise, posterior_sample
from .phases import _check_mask_settings, _edit_mask, _invert, _latent_mask, _mask_calls, _resample, _step_calls
from .schedule import LATENT_SCALE, MASK_MAPS, MASK_TIMESTEP, _Schedule, timesteps
from .unet import (PredictNoise, Progress, _UNet, _call_batches, _check_embeds, _check_latents, _check_max_batch,
                   _check_per_step, _check_timesteps, _shape)

log = logging.getLogger("llmga")


@dataclass(frozen=True)
class EditEmbeds:
    """The text encodings of an edit, each as the original makes it (1×L×C each)."""

    mask_source: torch.Tensor  # source caption, lpw, ≤ 3 chunks, padded to mask_target's length
    mask_target: torch.Tensor  # target caption, lpw, ≤ 3 chunks
    inversion_source: torch.Tensor  # source caption, plain 77 tokens (BOS + first 76, no EOS when longer)
    inversion_uncond: torch.Tensor  # "", 77 tokens
    target: torch.Tensor  # target caption, lpw, ≤ 4 chunks
    target_uncond: torch.Tensor  # "", padded to target's length


def caption_embeddings(source_prompt: str, target_prompt: str, *, long_prompt, plain_prompt) -> EditEmbeds:
    """The six encodings of an edit, per phase as the original makes them (llmga/serve/cli-sd15-editing.py):
    the mask phase encodes target and source captions in one long-prompt batch with the SD1.5 text-to-image
    pipeline's recipe (at most 225 tokens); the inversion a plain 77-token call of the source caption and of "";
    the re-sampling the target caption and "" with the editing pipeline's long-prompt call, whose 4-chunk limit
    (300 tokens) is the SD1.5 inpainting recipe's.

    long_prompt(prompt, negative_prompt, pipeline, phase) -> (embeds, negative_embeds): LLMGA's long-prompt
    encoding (llmga_core.long_prompt) on the caller's CLIP; phase ("edit mask" or "re-sampling") names the step
    in any note. plain_prompt(text) -> 1×77×C: the plain tokenizer call through the last CLIP layer."""
    mask_target, mask_source = long_prompt(target_prompt, source_prompt, "sd15", "edit mask")
    target, target_uncond = long_prompt(target_prompt, "", "sd15-inpaint", "re-sampling (editing allows 300 tokens)")
    return EditEmbeds(mask_source=mask_source, mask_target=mask_target,
                      inversion_source=plain_prompt(source_prompt), inversion_uncond=plain_prompt(""),
                      target=target, target_uncond=target_uncond)


def mask_latents(x0: torch.Tensor, moments: Optional[torch.Tensor],
                 noise: "EditNoise") -> tuple[torch.Tensor, Optional[str]]:
    """The mask phase's VAE posterior samples × LATENT_SCALE, and a note when they are not the real posterior's.
    moments: the encoder's B×2C×h×w output (mean, logvar) when the VAE exposes it; without it every sample is the
    mean (x0 ÷ LATENT_SCALE with a logvar of −30, the clamp's floor)."""
    usable = moments is not None and moments.shape[1] == 2 * x0.shape[1] and moments.shape[2:] == x0.shape[2:]
    note = None
    if not usable:
        moments = torch.cat([x0 / LATENT_SCALE, torch.full_like(x0, -30.0)], dim=1)
        note = "the VAE did not expose its posterior, so the mask used its mean for every sample"
    return posterior_sample(moments, noise.posterior) * LATENT_SCALE, note


@dataclass
class EditResult:
    """latents: 1×C×h×w, resample's output (VP scaling at t = 0) or, when the mask selects nothing,
    x0 itself; mask: the bool h×w mask used; edited: False when the mask selected nothing and
    neither inversion nor re-sampling ran; unet_calls: predict_noise calls per phase."""

    latents: torch.Tensor
    mask: torch.Tensor
    edited: bool
    unet_calls: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # plain words for the user (an empty mask)


def unet_calls(steps: int, *, maps: int = MASK_MAPS, max_batch: Optional[int] = None, mask: bool = True,
               embeds: Optional[EditEmbeds] = None) -> dict:
    """predict_noise calls of an edit per phase ("mask", "inversion", "resample"), for a progress
    total: 1 + steps + steps by default (each phase batches its predictions; an embedding pair of
    different lengths, or max_batch, splits them). mask=False: the mask is given, not computed."""
    max_batch = _check_max_batch(max_batch)
    if embeds is None:
        same = torch.empty(1, 77, 1)
        embeds = EditEmbeds(*(same,) * 6)
    calls = {"mask": _mask_calls(maps, embeds.mask_source, embeds.mask_target, max_batch) if mask else 0,
             "inversion": steps * _step_calls(embeds.inversion_source, embeds.inversion_uncond, max_batch),
             "resample": steps * _step_calls(embeds.target, embeds.target_uncond, max_batch)}
    return calls


def largest_unet_batch(*, maps: int = MASK_MAPS, max_batch: Optional[int] = None, mask: bool = True,
                       embeds: Optional[EditEmbeds] = None) -> int:
    """The most latents one predict_noise call of an edit gets, so a host can make room for that batch
    before the first call: the mask phase batches the `maps` draws of both captions when their encodings
    have the same length; inversion and re-sampling batch the conditional and unconditional prediction.
    Arguments as unet_calls."""
    max_batch = _check_max_batch(max_batch)
    if embeds is None:
        same = torch.empty(1, 77, 1)
        embeds = EditEmbeds(*(same,) * 6)
    pairs = [(embeds.inversion_source, embeds.inversion_uncond), (embeds.target, embeds.target_uncond)]
    batches = [_call_batches([(1, tuple(uncond.shape)), (1, tuple(cond.shape))], max_batch) for cond, uncond in pairs]
    if mask:
        batches.append(_call_batches([(maps, tuple(embeds.mask_source.shape)),
                                      (maps, tuple(embeds.mask_target.shape))], max_batch))
    return max(max(b) for b in batches)


@torch.no_grad()
def edit(predict_noise: PredictNoise, x0: torch.Tensor, embeds: EditEmbeds, noise: EditNoise, *, alphas_cumprod,
         mask_latents: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, steps: int = 50,
         skip: float = 25, source_guidance: float = 3.5, target_guidance: float = 7.5,
         threshold_ratio: float = 3.0, mask_timestep: int = MASK_TIMESTEP,
         progress: Optional[Progress] = None, max_batch: Optional[int] = None,
         step_timesteps: Optional[list[int]] = None) -> EditResult:
    """The CLI's edit: edit_mask, invert, resample with its defaults, checked before any UNet call.

    step_timesteps: what timesteps(steps, skip) returned, when the caller made it already (steps and skip are
    then not read).

    x0: the VAE mode × LATENT_SCALE (1×C×h×w). mask_latents: the posterior samples × LATENT_SCALE
    (posterior_sample(moments, noise.posterior) × LATENT_SCALE), needed unless `mask` (bool h×w at
    latent size, e.g. mask_from_image of a painted mask) replaces the computed one. noise: draw_noise's
    tensors (noise.posterior is only read through mask_latents). When the mask selects nothing there
    is nothing to edit: x0 is returned unchanged with edited=False, a log line says so, and neither
    inversion nor re-sampling runs (the original would re-sample unconditionally, which does not
    give the input back). progress(done, total) counts predict_noise calls over all phases
    (unet_calls gives the total); after a computed empty mask it jumps to total, and a given empty
    mask calls nothing. Its exceptions (the host's interrupt) propagate.
    """
    _check_latents(x0, "x0")
    steps_list = timesteps(steps, skip) if step_timesteps is None else list(step_timesteps)
    for name in EditEmbeds.__dataclass_fields__:
        _check_embeds(getattr(embeds, name), f"embeds.{name}")
    schedule = _Schedule(alphas_cumprod, x0.dtype)
    _check_timesteps(steps_list, schedule)
    _check_per_step(noise.inversion, "noise.inversion", len(steps_list), x0)
    if mask is not None:
        mask = _latent_mask(mask, x0)
    else:
        if mask_latents is None:
            raise ValueError("edit needs mask_latents (the VAE posterior samples) to compute the mask, or a mask.")
        _check_latents(mask_latents, "mask_latents", batch=None)
        if mask_latents.shape[1:] != x0.shape[1:] or noise.mask.shape != mask_latents.shape:
            raise ValueError(f"mask_latents ({_shape(mask_latents)}) and noise.mask ({_shape(noise.mask)}) must be "
                             f"N×{_shape(x0[0])} like x0.")
        _check_mask_settings(threshold_ratio, mask_timestep, schedule)
    max_batch = _check_max_batch(max_batch)
    n_maps = 0 if mask is not None else mask_latents.shape[0]
    planned = unet_calls(len(steps_list), maps=max(n_maps, 1), max_batch=max_batch, mask=mask is None, embeds=embeds)
    unet = _UNet(predict_noise, max_batch, progress, sum(planned.values()))
    calls = {}
    if mask is None:
        mask = _edit_mask(unet, _Schedule(alphas_cumprod, mask_latents.dtype), mask_latents, noise.mask,
                          embeds.mask_source, embeds.mask_target, int(mask_timestep), threshold_ratio)
    calls["mask"] = unet.calls
    if not bool(mask.any()):
        log.info("The edit mask selects nothing, so the image is returned unchanged.")
        if progress is not None and unet.calls:
            progress(unet.total, unet.total)  # completes the bar; the inversion and re-sampling are skipped
        return EditResult(x0, mask, False, {**calls, "inversion": 0, "resample": 0},
                          ["the edit mask selects nothing, so the image comes back unchanged (paint a mask over the "
                           "region to edit, or lower mask_threshold_ratio)"])
    x_start, zs = _invert(unet, schedule, x0, noise.inversion, embeds.inversion_source, embeds.inversion_uncond,
                          steps_list, source_guidance)
    calls["inversion"] = unet.calls - calls["mask"]
    latents = _resample(unet, schedule, x_start, zs, embeds.target, embeds.target_uncond, mask, steps_list,
                        target_guidance)
    calls["resample"] = unet.calls - calls["mask"] - calls["inversion"]
    return EditResult(latents, mask, True, calls)


