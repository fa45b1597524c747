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
No ComfyUI imports; nothing happens at import time.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
]

log = logging.getLogger("llmga")

PredictNoise = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]

LATENT_SCALE = 0.18215  # SD1.5's VAE scaling factor (sd-vae-ft-mse has the same)
MASK_TIMESTEP = 500  # timesteps[25] of the inject scheduler's 50-step linspace grid (strength 0.5)
MASK_MAPS = 10  # generate_mask's num_maps_per_mask
IMAGE_SIZE = 512  # the CLI's crop_image size
NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------------------
# Schedule


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ᾱ of SD1.5's scaled_linear schedule, float32, computed as the original's scheduler does.

    betas = linspace(√beta_start, √beta_end, n, float32)², ᾱ = cumprod(1 − betas) in float32 on the
    CPU. (The host computes its own table in float64; the two differ by float32 rounding, so pass
    this one to reproduce the original.)
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _first_timestep(skip: float, num_train_timesteps: int) -> float:
    # The original's expression in float64 (skip 49.2 gives 506.99…, so the first timestep is 506).
    fraction = skip / 100
    return num_train_timesteps - fraction * num_train_timesteps - 1


def _check_skip(skip) -> float:
    if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not math.isfinite(skip):
        raise ValueError(f"skip must be a number from 0 to 99.8 (the percentage of noise levels skipped), "
                         f"not {skip!r}.")
    if skip < 0 or _first_timestep(skip, NUM_TRAIN_TIMESTEPS) < 1:
        raise ValueError(f"skip must be from 0 to 99.8 (the percentage of noise levels skipped), not {skip}.")
    return skip


def max_steps(skip: float = 25) -> int:
    """The most steps whose int-truncated timesteps are all distinct for this skip (749 at skip 25)."""
    return int(_first_timestep(_check_skip(skip), NUM_TRAIN_TIMESTEPS))


def timesteps(steps: int = 50, skip: float = 25) -> list[int]:
    """The inversion and re-sampling timesteps: int(linspace(1000·(1 − skip/100) − 1, 1, steps)).

    Truncated toward zero, never rounded (749, 733, 718, 703, 687, …, 31, 16, 1 for the defaults).
    Skip lowers the starting noise level and keeps all `steps` steps; the last step goes to t = 0.
    Raises ValueError when skip is outside 0..99.8 or steps outside 1..max_steps(skip).
    """
    _check_skip(skip)
    limit = max_steps(skip)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= limit:
        raise ValueError(f"steps must be a whole number from 1 to {limit} at skip {skip}, not {steps!r}.")
    start = _first_timestep(skip, NUM_TRAIN_TIMESTEPS)
    return [int(t) for t in np.linspace(start, 1, int(steps)).astype(np.int64)]


class _Schedule:
    """α = √ᾱ, σ = √(1 − ᾱ), λ = log α − log σ as the original's scheduler holds them, and its
    solver coefficients as Python floats (each the float32 value the original's 0-d tensors hold)."""

    def __init__(self, alphas_cumprod, dtype: torch.dtype):
        precision = torch.float64 if dtype == torch.float64 else torch.float32
        table = torch.as_tensor(alphas_cumprod).detach().to("cpu", precision)
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError(f"alphas_cumprod must be the 1-D table of ᾱ over the training timesteps, "
                             f"not a tensor of shape {tuple(table.shape)}.")
        self.alphas_cumprod = table
        self.alpha = torch.sqrt(table)
        self.sigma = torch.sqrt(1 - table)
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)

    def __len__(self) -> int:
        return self.alphas_cumprod.numel()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        # DDPMScheduler.add_noise: ᾱ cast to the latents' dtype before the square roots.
        a = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t]
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def to_x0(self, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """convert_model_output for ε prediction (DPM-Solver++ works on the data prediction)."""
        return (x - self.sigma[t].item() * eps) / self.alpha[t].item()

    def step(self, s: int, t_next: int, s_prev: Optional[int]) -> tuple[float, float, float, float, float]:
        """(c_x, c_d0, c_d1, d1_scale, c_noise) of the SDE-DPM-Solver++ step s → t_next; first order
        (c_d1 = 0) when s_prev is None, else 2M midpoint with the previous timestep s_prev."""
        lam, alpha, sigma = self.lam, self.alpha, self.sigma
        h = lam[t_next] - lam[s]
        c_x = sigma[t_next] / sigma[s] * torch.exp(-h)
        c_d0 = alpha[t_next] * (1 - torch.exp(-2.0 * h))
        c_noise = sigma[t_next] * torch.sqrt(1.0 - torch.exp(-2 * h))
        if s_prev is None:
            return c_x.item(), c_d0.item(), 0.0, 0.0, c_noise.item()
        r0 = (lam[s] - lam[s_prev]) / h
        return c_x.item(), c_d0.item(), (0.5 * c_d0).item(), (1.0 / r0).item(), c_noise.item()


def _mean(x: torch.Tensor, d0: torch.Tensor, d_prev: Optional[torch.Tensor], coefficients) -> torch.Tensor:
    """μ, the noise-free part of the step, in the original's order of operations."""
    c_x, c_d0, c_d1, d1_scale, _ = coefficients
    mu = c_x * x + c_d0 * d0
    if d_prev is not None:
        mu = mu + c_d1 * (d1_scale * (d0 - d_prev))
    return mu


# --------------------------------------------------------------------------------------------------
# Calling the UNet


@dataclass
class _Request:
    latents: torch.Tensor  # B×C×h×w
    embeds: torch.Tensor  # 1×L×C


def _call_batches(batches: Sequence[tuple[int, tuple]], max_batch: Optional[int]) -> list[int]:
    """The latent batch of each UNet call for one evaluation of requests given as (batch, embeds shape):
    consecutive requests whose embeddings have the same shape share calls of at most max_batch latents."""
    groups: list[list] = []
    for batch, embeds_shape in batches:
        if groups and groups[-1][1] == embeds_shape:
            groups[-1][0] += batch
        else:
            groups.append([batch, embeds_shape])
    calls = []
    for batch, _ in groups:
        step = batch if max_batch is None else max_batch
        calls.extend(min(step, batch - i) for i in range(0, batch, step))
    return calls


def _calls_for(batches: Sequence[tuple[int, tuple]], max_batch: Optional[int]) -> int:
    return len(_call_batches(batches, max_batch))


class _UNet:
    """predict_noise behind request batching, a call count and the progress callback."""

    def __init__(self, predict_noise: PredictNoise, max_batch: Optional[int], progress: Optional[Progress],
                 total: int):
        self.predict_noise = predict_noise
        self.max_batch = max_batch
        self.progress = progress
        self.total = total
        self.done = 0
        self.calls = 0

    def __call__(self, requests: Sequence[_Request], t: int, dtype: torch.dtype) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and requests[end].embeds.shape == requests[start].embeds.shape:
                end += 1
            group = requests[start:end]
            latents = torch.cat([r.latents for r in group])
            embeds = torch.cat([r.embeds.expand(r.latents.shape[0], -1, -1) for r in group])
            step = latents.shape[0] if self.max_batch is None else self.max_batch
            eps = torch.cat([self._call(latents[i:i + step], t, embeds[i:i + step], dtype)
                             for i in range(0, latents.shape[0], step)])
            outputs.extend(eps.split([r.latents.shape[0] for r in group]))
            start = end
        return outputs

    def _call(self, latents: torch.Tensor, t: int, embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        eps = self.predict_noise(latents, int(t), embeds)
        if not isinstance(eps, torch.Tensor) or eps.shape != latents.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"predict_noise returned {got} for latents of shape {tuple(latents.shape)}; "
                             f"it must return ε of the latents' shape.")
        self.calls += 1
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)  # the host's interrupt is raised here and propagates
        return eps.to(device=latents.device, dtype=dtype)


def _check_max_batch(max_batch) -> Optional[int]:
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive whole number or None, not {max_batch!r}.")
    return max_batch


def _shape(x: torch.Tensor) -> str:
    return "×".join(str(d) for d in x.shape)


def _check_embeds(embeds, name: str) -> None:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != 1:
        got = _shape(embeds) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be one text encoding of shape 1×L×C, not {got}.")


def _check_latents(x, name: str, batch: Optional[int] = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or (batch is not None and x.shape[0] != batch):
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        want = f"{batch}×C×h×w" if batch is not None else "N×C×h×w"
        raise ValueError(f"{name} must be a latent tensor of shape {want}, not {got}.")


def _check_timesteps(steps: Sequence[int], schedule: _Schedule) -> list[int]:
    values = [int(t) for t in steps]
    if not values:
        raise ValueError("timesteps is empty; pass timesteps(steps, skip).")
    if any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 1 or values[0] >= len(schedule):
        raise ValueError(f"timesteps must decrease strictly from at most {len(schedule) - 1} to at least 1, "
                         f"as timesteps(steps, skip) gives, not {values[:3]}…{values[-2:]}.")
    return values


def _check_per_step(x, name: str, count: int, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (count, *like.shape):
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must hold one map per timestep, of shape {count}×{_shape(like)}, not {got}.")


# --------------------------------------------------------------------------------------------------
# Noise


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


# --------------------------------------------------------------------------------------------------
# The three phases


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


# --------------------------------------------------------------------------------------------------
# The whole edit


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


def mask_latents(x0: torch.Tensor, moments: Optional[torch.Tensor], noise: "EditNoise") -> tuple[torch.Tensor, bool]:
    """The mask phase's VAE posterior samples × LATENT_SCALE, and whether they are the real posterior's. moments:
    the encoder's B×2C×h×w output (mean, logvar) when the VAE exposes it; without it every sample is the mean
    (x0 ÷ LATENT_SCALE with a logvar of −30, the clamp's floor), which the caller should say."""
    usable = moments is not None and moments.shape[1] == 2 * x0.shape[1] and moments.shape[2:] == x0.shape[2:]
    if not usable:
        moments = torch.cat([x0 / LATENT_SCALE, torch.full_like(x0, -30.0)], dim=1)
    return posterior_sample(moments, noise.posterior) * LATENT_SCALE, usable


@dataclass
class EditResult:
    """latents: 1×C×h×w, resample's output (VP scaling at t = 0) or, when the mask selects nothing,
    x0 itself; mask: the bool h×w mask used; edited: False when the mask selected nothing and
    neither inversion nor re-sampling ran; unet_calls: predict_noise calls per phase."""

    latents: torch.Tensor
    mask: torch.Tensor
    edited: bool
    unet_calls: dict = field(default_factory=dict)


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
        return EditResult(x0, mask, False, {**calls, "inversion": 0, "resample": 0})
    x_start, zs = _invert(unet, schedule, x0, noise.inversion, embeds.inversion_source, embeds.inversion_uncond,
                          steps_list, source_guidance)
    calls["inversion"] = unet.calls - calls["mask"]
    latents = _resample(unet, schedule, x_start, zs, embeds.target, embeds.target_uncond, mask, steps_list,
                        target_guidance)
    calls["resample"] = unet.calls - calls["mask"] - calls["inversion"]
    return EditResult(latents, mask, True, calls)


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


# --------------------------------------------------------------------------------------------------
# Image and mask helpers


def mask_to_image(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A latent-size mask shown at image size: float H×W in {0, 1}, each latent pixel a block
    (nearest; the original saves its 64×64 mask as it is)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be h×w, not {_shape(mask)}.")
    return F.interpolate(mask.float()[None, None], size=(int(height), int(width)), mode="nearest")[0, 0]


def mask_from_image(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image-size mask (H×W, values in 0..1, 1 = edit) brought to latent size h×w: the mean of
    each latent pixel's area, kept where it is ≥ 0.5 (the original's binarization). A mask from
    mask_to_image comes back unchanged."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be H×W, not {_shape(mask)}.")
    area = F.interpolate(mask.float()[None, None], size=(int(height), int(width)), mode="area")[0, 0]
    return area >= 0.5


class PreparedImage(NamedTuple):
    image: torch.Tensor  # size×size×3 float in 0..1 (k/255)
    cropped: bool  # the input was not square and lost its edges
    original_size: tuple  # (height, width) of the input


def prepare_image(image, size: int = IMAGE_SIZE) -> PreparedImage:
    """The CLI's crop_image: centre crop to a square (offset (long − short)//2), then PIL resize to
    size×size (bicubic, Pillow's default). image: a PIL image, or H×W×3 uint8 or float in 0..1
    (numpy or torch). The original feeds this one image to the MLLM and to SD."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be H×W×3, not {'×'.join(map(str, array.shape))}.")
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        pixels = array
    h, w = pixels.shape[:2]
    if h < w:
        offset = (w - h) // 2
        pixels = pixels[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        pixels = pixels[offset:offset + w]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.Resampling.BICUBIC))
    return PreparedImage(torch.from_numpy(resized.astype(np.float32) / 255.0), h != w, (h, w))
