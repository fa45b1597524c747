"""The random draws of an edit, in the order the original draws them, and the VAE posterior."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from .schedule import MASK_MAPS
from .unet import _shape


class EditNoise(NamedTuple):
    """The random draws of one edit, named by what the original draws them for."""

    posterior: torch.Tensor  # N×C×h×w: the VAE posterior samples of the mask phase (posterior_sample's eps)
    mask: torch.Tensor  # N×C×h×w: the mask phase's noise at MASK_TIMESTEP
    inversion: torch.Tensor  # T×1×C×h×w: inversion[k] noises x0 to timesteps[k]


def draw_noise(seed: int, shape: Sequence[int], *, steps: int = 50, maps: int = MASK_MAPS,
               device=None, dtype: torch.dtype = torch.float32) -> EditNoise:
    """All random draws of an edit from one seed, in the order the original draws them.

    shape: the latent's C×h×w (4×64×64 for 512²). One CPU torch.Generator seeded with `seed` draws
    float32 standard normals: first the `maps` VAE posterior samples (maps×C×h×w, one call), then
    the mask's `maps` noise maps (one call), then the inversion's `steps` maps one by one for
    reversed(timesteps), t = 1 first and the first timestep last (returned in timesteps order).
    The original draws the same tensors in this order but unseeded, on the GPU in float16, so the
    values themselves cannot match an original run; a seed makes the pack's edits repeatable on
    any device. The draws are then moved to `device` and cast to `dtype`.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be the latent's C×h×w, not {shape}.")
    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 1:
        raise ValueError(f"maps must be a positive whole number, not {maps!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, not {steps!r}.")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    posterior = torch.randn((maps, *shape), generator=generator)
    mask = torch.randn((maps, *shape), generator=generator)
    inversion = [torch.randn((1, *shape), generator=generator) for _ in range(int(steps))][::-1]
    return EditNoise(*(x.to(device=device, dtype=dtype) for x in (posterior, mask, torch.stack(inversion))))


def posterior_sample(moments: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Samples of the VAE posterior: mean + exp(½·clamp(logvar, −30, 20))·eps (diffusers'
    DiagonalGaussianDistribution.sample), not yet scaled by LATENT_SCALE.

    moments: the encoder output before sampling, B×2C×h×w (mean and logvar stacked on channels;
    diffusers' latent_dist.parameters, the host's encoder + quant_conv). eps: N×C×h×w draws
    (EditNoise.posterior); a single image's moments broadcast over them. The original encodes the
    image repeated N times, which gives the same moments N times, so encode once.
    """
    if moments.ndim != 4 or moments.shape[1] % 2 or moments.shape[1] // 2 != eps.shape[1] \
            or moments.shape[2:] != eps.shape[2:]:
        raise ValueError(f"moments must be B×2C×h×w for draws of shape N×C×h×w; got {_shape(moments)} "
                         f"and {_shape(eps)}.")
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * eps.to(device=moments.device, dtype=moments.dtype)


