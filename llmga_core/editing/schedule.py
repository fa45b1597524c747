"""The noise schedule of LLMGA's editing: ᾱ, the timesteps, the solver's coefficients."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch



LATENT_SCALE = 0.18215  # SD1.5's VAE scaling factor (sd-vae-ft-mse has the same)
MASK_TIMESTEP = 500  # timesteps[25] of the inject scheduler's 50-step linspace grid (strength 0.5)
MASK_MAPS = 10  # generate_mask's num_maps_per_mask
IMAGE_SIZE = 512  # the CLI's crop_image size
NUM_TRAIN_TIMESTEPS = 1000





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


