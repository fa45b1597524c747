"""DiffRIR: the network that repairs the seams between generated and preserved regions.

LLMGA (Xia et al., ECCV 2024) runs DiffRIR after inpainting and outpainting to remove the texture,
brightness and contrast differences between the region Stable Diffusion regenerated and the
pixels it kept. This module is an own implementation of the released stage-2 generator DiffRIRS2,
ported from Zj-BinXia/DiffRIR: DiffRIR/archs/S2_arch.py (with the DDPM of ldm/ddpm.py at
inference) and the input handling of inference_diffrir.py (x1) and
DiffRIR/models/DiffIR_S2_model.py (x2, x4). Its parts carry the paper's names:

- ``condition``: CPEN, the prior encoder; convolutions on the quarter grid, mean-pooled over the
  whole image, then an MLP -> c.
- ``denoise`` / ``diffusion``: the prior denoiser and its 4-step DDPM; from noise z and c to the
  256-value image prior k_v (deterministic given z).
- ``G``: DIRformer, a Restormer-style U-Net on the quarter grid whose transformer blocks are
  modulated by k_v, with a x4 pixel-shuffle tail and a nearest-upsampled residual.

``restore`` packs the generated image with the masked reference exactly as the original does,
runs the network on the whole image or in an exact streamed tiled scheme (the global prior and
every attention layer's statistics are accumulated over tiles, so tiling does not change the
result), and composites the regenerated pixels over the reference.
No ComfyUI imports; nothing happens at import time.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DiffRIRConfig",
    "DiffRIRS2",
    "load_diffrir",
    "restore",
    "empty_masks",
    "check_inputs",
    "pack_input",
    "estimate_memory",
    "diffusion_schedule",
    "MIN_TILE_SIZE",
]

log = logging.getLogger(__name__)

# First-convolution width per scale: the packed input (3 generated + 3·s² masked-reference
# channels) space-to-depth'd onto the quarter grid of the output.
INPUT_CHANNELS = {1: 96, 2: 60, 4: 51}
# Reflect-pad multiple on the input grid; makes the quarter grid divisible by 8 (three 2x downsamplings).
PAD_MULTIPLE = {1: 32, 2: 16, 4: 8}
# Tiles are multiples of 8 quarter-grid pixels so every pixel (un)shuffle stays aligned.
MIN_TILE_SIZE = 32
LEAKY_SLOPE = 0.1
LAYER_NORM_EPS = 1e-5
NORMALIZE_EPS = 1e-12  # F.normalize's eps, used by the original for q and k
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
# Shared modules: the original registers CPEN and the denoiser twice, so their weights appear twice.
SHARED_PREFIXES = (("diffusion.condition.", "condition."), ("diffusion.model.", "denoise."))


@dataclass(frozen=True)
class DiffRIRConfig:
    """Sizes of DiffRIRS2. The defaults are the released x1/x2/x4 models (inference_diffrir.py)."""

    scale: int = 1
    dim: int = 64
    num_blocks: tuple = (13, 1, 1, 1)
    num_refinement_blocks: int = 13
    heads: tuple = (1, 2, 4, 8)
    # FFN hidden width for the widths dim, 2·dim, 4·dim, 8·dim: int(width · 2.2) in the release.
    ffn_hidden: tuple = (140, 281, 563, 1126)
    prior_feats: int = 64  # CPEN width n_feats; the prior k_v has 4·prior_feats values
    prior_res_blocks: int = 9
    denoise_res_blocks: int = 1
    timesteps: int = 4
    linear_start: float = 0.1
    linear_end: float = 0.99

    @property
    def prior_dim(self) -> int:
        return 4 * self.prior_feats

    @property
    def input_channels(self) -> int:
        return INPUT_CHANNELS[self.scale]

    @property
    def widths(self) -> tuple:
        return tuple(self.dim * 2 ** level for level in range(4))


# ----------------------------------------------------------------------------- the network


def bias_free_layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-pixel LayerNorm over channels without mean-centring the numerator (the original's BiasFree)."""
    variance = x.var(dim=1, keepdim=True, unbiased=False)
    return x / torch.sqrt(variance + LAYER_NORM_EPS) * weight.view(1, -1, 1, 1)


def prior_modulation(kernel: nn.Sequential, k_v: torch.Tensor, channels: int):
    """Per-channel scale and shift from the prior: [s, b] = Linear(k_v); applied as y·s + b."""
    scale_shift = kernel(k_v).view(-1, 2 * channels, 1, 1)
    return scale_shift.chunk(2, dim=1)


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.pixel_unshuffle(x, factor)


class _ChannelWeight(nn.Module):
    """Holds the per-channel weight that the released keys call `<norm>.body.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))


class BiasFreeLayerNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = _ChannelWeight(channels)

    def forward(self, x):
        return bias_free_layer_norm(x, self.body.weight)


class TransposedAttention(nn.Module):
    """Restormer's MDTA with prior modulation: attention between channels, over all pixels.

    q and k are L2-normalised along the flattened spatial axis, so each (C/heads)² attention
    matrix depends on every pixel of the image.
    """

    def __init__(self, channels: int, heads: int, prior_dim: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.kernel = nn.Sequential(nn.Linear(prior_dim, 2 * channels, bias=False))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x, k_v):
        b, c, h, w = x.shape
        scale, shift = prior_modulation(self.kernel, k_v, c)
        q, k, v = self.qkv_dwconv(self.qkv(x * scale + shift)).chunk(3, dim=1)
        per_head = (b, self.heads, c // self.heads, h * w)
        q = F.normalize(q.reshape(per_head), dim=-1)
        k = F.normalize(k.reshape(per_head), dim=-1)
        attention = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        out = attention @ v.reshape(per_head)
        return self.project_out(out.reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """Restormer's GDFN with prior modulation: 1x1 in, depthwise 3x3, GELU gate, 1x1 out."""

    def __init__(self, channels: int, hidden: int, prior_dim: int):
        super().__init__()
        self.project_in = nn.Conv2d(channels, 2 * hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)
        self.kernel = nn.Sequential(nn.Linear(prior_dim, 2 * channels, bias=False))

    def forward(self, x, k_v):
        scale, shift = prior_modulation(self.kernel, k_v, x.shape[1])
        gate, value = self.dwconv(self.project_in(x * scale + shift)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    def __init__(self, channels: int, heads: int, hidden: int, prior_dim: int):
        super().__init__()
        self.norm1 = BiasFreeLayerNorm(channels)
        self.attn = TransposedAttention(channels, heads, prior_dim)
        self.norm2 = BiasFreeLayerNorm(channels)
        self.ffn = GatedFeedForward(channels, hidden, prior_dim)

    def forward(self, x, k_v):
        x = x + self.attn(self.norm1(x), k_v)
        return x + self.ffn(self.norm2(x), k_v)


class TransformerStage(nn.Sequential):
    def forward(self, x, k_v):
        for block in self:
            x = block(x, k_v)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class DIRformer(nn.Module):
    """The restoration backbone G: a 4-level transformer U-Net on the quarter grid, x4 tail."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        self.scale = config.scale
        c0, c1, c2, c3 = config.widths
        h0, h1, h2, h3 = config.heads
        f0, f1, f2, f3 = config.ffn_hidden
        n0, n1, n2, n3 = config.num_blocks
        p = config.prior_dim

        def stage(channels, heads, hidden, count):
            return TransformerStage(*[TransformerBlock(channels, heads, hidden, p) for _ in range(count)])

        self.patch_embed = PatchEmbed(config.input_channels, c0)
        self.encoder_level1 = stage(c0, h0, f0, n0)
        self.down1_2 = Downsample(c0)
        self.encoder_level2 = stage(c1, h1, f1, n1)
        self.down2_3 = Downsample(c1)
        self.encoder_level3 = stage(c2, h2, f2, n2)
        self.down3_4 = Downsample(c2)
        self.latent = stage(c3, h3, f3, n3)
        self.up4_3 = Upsample(c3)
        self.reduce_chan_level3 = nn.Conv2d(c3, c2, 1, bias=False)
        self.decoder_level3 = stage(c2, h2, f2, n2)
        self.up3_2 = Upsample(c2)
        self.reduce_chan_level2 = nn.Conv2d(c2, c1, 1, bias=False)
        self.decoder_level2 = stage(c1, h1, f1, n1)
        self.up2_1 = Upsample(c1)  # the level-1 decoder works at 2·dim: no channel reduction
        self.decoder_level1 = stage(c1, h0, f1, n0)
        self.refinement = stage(c1, h0, f1, config.num_refinement_blocks)
        self.tail = nn.Sequential(
            nn.Sequential(nn.Conv2d(c1, 4 * c1, 3, padding=1), nn.PixelShuffle(2),
                          nn.Conv2d(c1, 4 * c1, 3, padding=1), nn.PixelShuffle(2)),
            nn.Conv2d(c1, 3, 3, padding=1),
        )

    def forward(self, packed, k_v):
        x = self.patch_embed(space_to_depth(packed, 4 // self.scale))
        enc1 = self.encoder_level1(x, k_v)
        enc2 = self.encoder_level2(self.down1_2(enc1), k_v)
        enc3 = self.encoder_level3(self.down2_3(enc2), k_v)
        x = self.latent(self.down3_4(enc3), k_v)
        x = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(x), enc3], 1)), k_v)
        x = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], 1)), k_v)
        x = self.decoder_level1(torch.cat([self.up2_1(x), enc1], 1), k_v)
        x = self.refinement(x, k_v)
        residual = F.interpolate(packed[:, :3], scale_factor=self.scale, mode="nearest")
        return self.tail(x) + residual


class CPENResBlock(nn.Module):
    def __init__(self, feats: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
                                  nn.Conv2d(feats, feats, 3, padding=1))

    def forward(self, x):
        return self.body(x) + x


class CPEN(nn.Module):
    """The compact prior encoder: 3x3 convolutions, a mean over every pixel, then an MLP -> c."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        self.scale = config.scale
        n = config.prior_feats
        layers = [nn.Conv2d(config.input_channels, n, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
        layers += [CPENResBlock(n) for _ in range(config.prior_res_blocks)]
        layers += [nn.Conv2d(n, 2 * n, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
                   nn.Conv2d(2 * n, 2 * n, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
                   nn.Conv2d(2 * n, 4 * n, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
                   nn.AdaptiveAvgPool2d(1)]
        self.E = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(4 * n, 4 * n), nn.LeakyReLU(LEAKY_SLOPE),
                                 nn.Linear(4 * n, 4 * n), nn.LeakyReLU(LEAKY_SLOPE))

    @property
    def receptive_halo(self) -> int:
        """Quarter-grid pixels one output pixel of E (before pooling) sees on each side."""
        return sum(1 for m in self.E.modules() if isinstance(m, nn.Conv2d))

    def forward(self, packed):
        return self.mlp(self.E(space_to_depth(packed, 4 // self.scale)).flatten(1))


class PriorResMLP(nn.Module):
    """The original's "ResMLP": Linear + LeakyReLU, without a skip connection."""

    def __init__(self, width: int):
        super().__init__()
        self.resmlp = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(LEAKY_SLOPE))

    def forward(self, x):
        return self.resmlp(x)


class PriorDenoiser(nn.Module):
    """Predicts the clean prior x0 from (c, t / (10·T), x_t)."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        d = config.prior_dim
        self.max_period = config.timesteps * 10
        layers = [nn.Linear(2 * d + 1, d), nn.LeakyReLU(LEAKY_SLOPE)]
        layers += [PriorResMLP(d) for _ in range(config.denoise_res_blocks)]
        self.resmlp = nn.Sequential(*layers)

    def forward(self, x, t, c):
        t = (t.float() / self.max_period).view(-1, 1)
        return self.resmlp(torch.cat([c, t, x], dim=1))


def diffusion_schedule(timesteps: int, linear_start: float, linear_end: float) -> dict:
    """The 12 buffers of ldm's DDPM for the "linear" schedule: float64 maths, stored as float32."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64,
                           device="cpu").numpy() ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(values[name], dtype=torch.float32, device="cpu") for name in SCHEDULE_BUFFERS}


class PriorDiffusion(nn.Module):
    """ldm's DDPM as DiffRIR uses it at inference: x0-parameterised, T deterministic steps from z.

    `model` and `condition` are the very modules DiffRIRS2 holds as `denoise` and `condition`
    (registered twice, as in the original, so the state dict has the released 615-key layout).
    """

    def __init__(self, denoise: PriorDenoiser, condition: CPEN, config: DiffRIRConfig):
        super().__init__()
        self.model = denoise
        self.condition = condition
        self.num_timesteps = config.timesteps
        for name, value in diffusion_schedule(config.timesteps, config.linear_start, config.linear_end).items():
            self.register_buffer(name, value)

    def sample(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The prior k_v: x <- coef1[t]·x0 + coef2[t]·x for t = T-1 … 0 (the step noise is never added)."""
        x = z
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            x0 = self.model(x, t, c)
            x = self.posterior_mean_coef1[step] * x0 + self.posterior_mean_coef2[step] * x
        return x


class DiffRIRS2(nn.Module):
    """The released DiffRIR generator: prior (CPEN + diffusion) then DIRformer."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        if config.scale not in INPUT_CHANNELS:
            raise ValueError(f"DiffRIR scale must be 1, 2 or 4; got {config.scale}.")
        self.config = config
        self.scale = config.scale
        self.G = DIRformer(config)
        self.condition = CPEN(config)
        self.denoise = PriorDenoiser(config)
        self.diffusion = PriorDiffusion(self.denoise, self.condition, config)

    def prior(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.diffusion.sample(self.condition(packed), noise)

    def forward(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Whole-image forward on the padded packed input; returns the padded output."""
        return self.G(packed, self.prior(packed, noise))


# ----------------------------------------------------------------------------- loading


def _read_state_dict(path: Path) -> tuple:
    """(state dict, which part of the file it came from)."""
    name = path.name
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{name} is not a readable safetensors file; use a DiffRIR x1/x2/x4 .pth or "
                             f".safetensors file.") from error
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:  # weights_only met an import: a function or class the pickle wants to call
            what = f" ({found.group(1)})"
            raise ValueError(f"{name} was refused because it contains code{what} rather than only "
                             f"tensors; nothing in it was run, use the released weights or a "
                             f".safetensors file.") from None
        raise ValueError(f"{name} is not a PyTorch weights file or is damaged; use a DiffRIR x1/x2/x4 "
                         f".pth or .safetensors file.") from error
    except (RuntimeError, KeyError, EOFError, OSError) as error:
        raise ValueError(f"{name} is not a PyTorch weights file or is damaged; use a DiffRIR x1/x2/x4 "
                         f".pth or .safetensors file.") from error
    if isinstance(loaded, dict) and "params_ema" in loaded:
        return loaded["params_ema"], "params_ema"
    if isinstance(loaded, dict) and "params" in loaded:
        log.warning("%s has no 'params_ema' (the EMA weights the original loads); using its "
                    "'params' (the non-EMA weights) instead.", name)
        return loaded["params"], "params"
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded, "state_dict"
    raise ValueError(f"{name} holds no DiffRIR state dict (no 'params_ema' or 'params' entry and no "
                     f"flat dict of tensors); use a DiffRIR x1/x2/x4 .pth or .safetensors file.")


def _count_from(state: dict, prefix: str, first: int, suffix: str) -> int:
    """How many consecutive indices from `first` have the key prefix<index>suffix."""
    n = 0
    while f"{prefix}{first + n}{suffix}" in state:
        n += 1
    return n


def _count(state: dict, prefix: str, suffix: str) -> int:
    return _count_from(state, prefix, 0, suffix)


def _config_from_state_dict(state: dict, name: str) -> DiffRIRConfig:
    """Reads every size from the tensors; a missing key raises KeyError naming it."""

    def shape(key):
        if key not in state:
            raise KeyError(key)
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' is a {type(state[key]).__name__}, not a "
                             f"tensor; use a DiffRIR x1/x2/x4 .pth or .safetensors file.")
        return tuple(state[key].shape)

    first_conv = shape("G.patch_embed.proj.weight")
    scales = {channels: scale for scale, channels in INPUT_CHANNELS.items()}
    if len(first_conv) != 4 or first_conv[1] not in scales:
        raise ValueError(f"{name} is not DiffRIR weights: 'G.patch_embed.proj.weight' has shape {first_conv}, "
                         f"while DiffRIR's first convolution takes 96 (x1), 60 (x2) or 51 (x4) channels; "
                         f"use a DiffRIR x1/x2/x4 .pth or .safetensors file.")
    dim = first_conv[0]
    stages = ("G.encoder_level1.", "G.encoder_level2.", "G.encoder_level3.", "G.latent.")
    num_blocks = tuple(_count(state, p, ".norm1.body.weight") for p in stages)
    heads, hidden = [], []
    for level, prefix in enumerate(stages):
        if num_blocks[level]:
            heads.append(shape(prefix + "0.attn.temperature")[0])
            hidden.append(shape(prefix + "0.ffn.project_out.weight")[1])
        else:  # an empty level leaves its sizes unused
            heads.append(1)
            hidden.append(1)
    if num_blocks[0] == 0:
        raise KeyError("G.encoder_level1.0.norm1.body.weight")
    prior_feats = shape("condition.E.0.weight")[0]
    res_blocks = _count_from(state, "condition.E.", 2, ".body.0.weight")  # E.0 conv, E.1 LeakyReLU
    timesteps = shape("diffusion.betas")[0]
    return DiffRIRConfig(
        scale=scales[first_conv[1]], dim=dim, num_blocks=num_blocks,
        num_refinement_blocks=_count(state, "G.refinement.", ".norm1.body.weight"),
        heads=tuple(heads), ffn_hidden=tuple(hidden), prior_feats=prior_feats,
        prior_res_blocks=res_blocks,
        denoise_res_blocks=_count_from(state, "denoise.resmlp.", 2, ".resmlp.0.weight"),
        timesteps=timesteps,
    )


def _check_state_dict(state: dict, expected: dict, name: str, config: DiffRIRConfig) -> None:
    """Strict comparison with the expected layout: keys, shapes, shared copies, the schedule."""
    hint = "use a DiffRIR x1/x2/x4 .pth or .safetensors file."
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"{name} is not DiffRIR weights: it lacks '{missing[0]}' "
                         f"({len(missing)} of the {len(expected)} expected keys missing); {hint}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"{name} is not DiffRIR weights: it has the unexpected key '{unexpected[0]}' "
                         f"({len(unexpected)} unexpected in all); {hint}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' is a {type(tensor).__name__}, "
                             f"not a tensor; {hint}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{name} does not match the DiffRIR architecture: '{key}' has shape "
                             f"{tuple(tensor.shape)} where {tuple(expected[key].shape)} is expected; {hint}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' holds {tensor.dtype} values; {hint}")
    for copy_prefix, primary_prefix in SHARED_PREFIXES:
        for key in expected:
            if key.startswith(copy_prefix):
                primary = primary_prefix + key[len(copy_prefix):]
                if not torch.equal(state[key], state[primary]):
                    raise ValueError(f"{name} is inconsistent: '{key}' differs from '{primary}', which "
                                     f"the DiffRIR network shares; the file is damaged or not DiffRIR weights.")
    schedule = diffusion_schedule(config.timesteps, config.linear_start, config.linear_end)
    for buffer, value in schedule.items():
        stored = state[f"diffusion.{buffer}"].float()
        if not torch.allclose(stored, value, rtol=1e-5, atol=1e-7):
            raise ValueError(f"{name} has a 'diffusion.{buffer}' that differs from DiffRIR's linear "
                             f"{config.linear_start}–{config.linear_end} schedule over {config.timesteps} "
                             f"steps; the file is damaged or not DiffRIR weights.")


def load_diffrir(path) -> DiffRIRS2:
    """Loads released DiffRIR weights (x1, x2 or x4) strictly; sizes and scale come from the file.

    `.pth`/`.pt`: BasicSR's dict, whose `params_ema` is used (like the original), `params` only
    when there is no `params_ema`; read with torch.load(weights_only=True), so a pickle that
    would run code is refused. `.safetensors`: the flat state dict. Every key and shape must
    match, including the duplicated `diffusion.condition.*` / `diffusion.model.*` copies (which
    must equal the primary copies) and the 12 schedule buffers. Returns the network in eval mode
    on the CPU, in float32, with `.scale` and `.config`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiffRIR weights not found: {path}.")
    state, source = _read_state_dict(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds no DiffRIR state dict; use a DiffRIR x1/x2/x4 .pth or "
                         f".safetensors file.")
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    try:
        config = _config_from_state_dict(state, path.name)
    except KeyError as error:
        raise ValueError(f"{path.name} is not DiffRIR weights: it lacks '{error.args[0]}'; use a DiffRIR "
                         f"x1/x2/x4 .pth or .safetensors file.") from None
    with torch.device("meta"):
        expected = DiffRIRS2(config).state_dict()
    _check_state_dict(state, expected, path.name, config)
    net = DiffRIRS2(config)
    net.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    net.weights_source = source
    return net.eval()


# ----------------------------------------------------------------------------- inputs


def _size(h: int, w: int) -> str:
    return f"{w}×{h}"


def _quarter_tile(tile_size) -> Optional[int]:
    if tile_size is None:
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < MIN_TILE_SIZE:
        raise ValueError(f"tile_size must be None (the whole image at once) or at least {MIN_TILE_SIZE} "
                         f"output pixels; got {tile_size!r}.")
    return tile_size // MIN_TILE_SIZE * (MIN_TILE_SIZE // 4)


def check_inputs(net: DiffRIRS2, generated, reference, mask, *, noise=None, tile_size=None) -> None:
    """Raises one clear ValueError for inputs `restore` cannot use (before any heavy work)."""
    s = net.scale
    for label, tensor, layout in (("generated image", generated, "B×3×h×w"),
                                  ("reference", reference, "B×3×H×W"),
                                  ("mask", mask, "B×1×H×W")):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"The {label} must be a {layout} tensor; got {got}.")
    if generated.shape[1] != 3 or reference.shape[1] != 3:
        raise ValueError(f"The generated image and the reference must have 3 (RGB) channels; got "
                         f"{generated.shape[1]} and {reference.shape[1]}.")
    if mask.shape[1] not in (1, 3):
        raise ValueError(f"The mask must have 1 channel (or 3, one per colour); got {mask.shape[1]}.")
    batches = (generated.shape[0], reference.shape[0], mask.shape[0])
    if len(set(batches)) != 1:
        raise ValueError(f"The batch sizes differ: {batches[0]} generated image(s), {batches[1]} "
                         f"reference(s) and {batches[2]} mask(s); give the same number of each.")
    H, W = reference.shape[-2:]
    if H % s or W % s:
        raise ValueError(f"The reference is {_size(H, W)} pixels, which this x{s} DiffRIR model cannot use: "
                         f"its width and height must be multiples of {s}; crop or resize it.")
    h, w = generated.shape[-2:]
    if (h, w) != (H // s, W // s):
        needed = "the reference's size" if s == 1 else f"the {_size(H, W)} reference divided by {s}"
        raise ValueError(f"The generated image is {_size(h, w)} pixels but this x{s} DiffRIR model needs "
                         f"{_size(H // s, W // s)} ({needed}).")
    if tuple(mask.shape[-2:]) != (H, W):
        raise ValueError(f"The mask is {_size(*mask.shape[-2:])} pixels but the reference is {_size(H, W)}; "
                         f"give a mask of the reference's size.")
    half = PAD_MULTIPLE[s] // 2
    if min(h, w) <= half:
        raise ValueError(f"The reference is {_size(H, W)} pixels, too small for DiffRIR's reflect padding; "
                         f"a x{s} model needs at least {(half + 1) * s} pixels on each side.")
    if noise is not None:
        expected = (generated.shape[0], net.config.prior_dim)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape {expected}, one {expected[1]}-value starting point of the "
                             f"prior diffusion per image; got {got}.")
    _quarter_tile(tile_size)


def pack_input(generated, reference, regenerated, scale: int) -> torch.Tensor:
    """The network input: generated image + reference with the hole zeroed, reflect-padded.

    x1 (inference_diffrir.py): concat(generated, (1 - mask)·reference) at full size.
    x2/x4 (DiffIR_S2_model.py): concat(LR generated, PixelUnshuffle(s)((1 - mask)·reference)).
    Then reflect padding on the right and bottom of the concatenated tensor to a multiple of
    32/16/8 on the input grid.
    """
    kept = (1 - regenerated) * reference
    packed = torch.cat([generated, space_to_depth(kept, scale)], dim=1)
    m = PAD_MULTIPLE[scale]
    h, w = packed.shape[-2:]
    return F.pad(packed, (0, (-w) % m, 0, (-h) % m), mode="reflect")


# ----------------------------------------------------------------------------- exact streamed tiling


@dataclass(frozen=True)
class _Window:
    """Rows [top, bottom) and columns [left, right) of a map that is height×width."""

    top: int
    left: int
    bottom: int
    right: int
    height: int
    width: int

    def grow(self, halo: int) -> "_Window":
        return _Window(max(0, self.top - halo), max(0, self.left - halo), min(self.height, self.bottom + halo),
                       min(self.width, self.right + halo), self.height, self.width)

    def scaled(self, factor: int) -> "_Window":
        return _Window(self.top * factor, self.left * factor, self.bottom * factor, self.right * factor,
                       self.height * factor, self.width * factor)

    def halved(self) -> "_Window":
        return _Window(self.top // 2, self.left // 2, self.bottom // 2, self.right // 2,
                       self.height // 2, self.width // 2)

    def of(self, full: torch.Tensor) -> torch.Tensor:
        return full[..., self.top:self.bottom, self.left:self.right]

    def within(self, tensor: torch.Tensor, holder: "_Window") -> torch.Tensor:
        """This window cut out of `tensor`, which holds the window `holder`."""
        return tensor[..., self.top - holder.top:self.bottom - holder.top,
                      self.left - holder.left:self.right - holder.left]


def _tiles(height: int, width: int, tile: int) -> list:
    return [_Window(top, left, min(top + tile, height), min(left + tile, width), height, width)
            for top in range(0, height, tile) for left in range(0, width, tile)]


def _conv3x3(conv: nn.Conv2d, x: torch.Tensor, window: _Window):
    """A padding-1 convolution of a window of a map: zero padding only where the map ends.

    Returns the output and the (smaller) window it is exact on.
    """
    # Zero-padded on every side (no padded copy of x); the outputs on sides where the window does
    # not reach the map's border saw that padding instead of the real neighbours and are dropped.
    y = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=conv.groups)
    inner = _Window(window.top + (window.top > 0), window.left + (window.left > 0),
                    window.bottom - (window.bottom < window.height), window.right - (window.right < window.width),
                    window.height, window.width)
    return inner.within(y, window), inner


def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias)


def _level_tile(tile_q: int, level: int) -> int:
    # Coarser levels have fewer pixels but more channels; 8 keeps tiles even (aligned shuffles).
    return max(tile_q >> level, 8)


def _tail_tile(tile_q: int) -> int:
    # The tail works at 512 channels on the ½ grid and 128 on the full grid: per pixel about three
    # times a level-1 block, so it gets a quarter of the tile's area.
    return max(tile_q // 2, 8)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class _Stream:
    """One image through the network tile by tile; the result equals the whole-image forward."""

    def __init__(self, net: DiffRIRS2, tile_q: int, tick: Callable[[], None]):
        self.net = net
        self.tile_q = tile_q
        self.tick = tick

    @staticmethod
    def step_count(config: DiffRIRConfig, hq: int, wq: int, tile_q: int) -> int:
        """Tile steps for a quarter grid of hq×wq (the progress total)."""
        tiles = [len(_tiles(hq >> level, wq >> level, _level_tile(tile_q, level))) for level in range(4)]
        n0, n1, n2, n3 = tiles
        b0, b1, b2, b3 = config.num_blocks
        blocks = 2 * (2 * b0 * n0 + 2 * b1 * n1 + 2 * b2 * n2 + b3 * n3 + config.num_refinement_blocks * n0)
        resampling = n0 + n1 + n2 + n3 + n2 + n1  # three downsamplings, three upsamplings
        tail = len(_tiles(hq, wq, _tail_tile(tile_q)))
        return n0 + n0 + blocks + resampling + tail  # + prior and patch embedding

    def run(self, packed: torch.Tensor, noise: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        net, G, t = self.net, self.net.G, self.tile_q
        k_v = net.diffusion.sample(self.condition(packed), noise)
        x = self.patch_embed(packed)
        enc1 = self.blocks(G.encoder_level1, x, k_v, _level_tile(t, 0))
        enc2 = self.blocks(G.encoder_level2, self.down(G.down1_2, enc1, _level_tile(t, 0)), k_v, _level_tile(t, 1))
        enc3 = self.blocks(G.encoder_level3, self.down(G.down2_3, enc2, _level_tile(t, 1)), k_v, _level_tile(t, 2))
        x = self.blocks(G.latent, self.down(G.down3_4, enc3, _level_tile(t, 2)), k_v, _level_tile(t, 3))
        x = self.up(G.up4_3, x, enc3, G.reduce_chan_level3, _level_tile(t, 3))
        del enc3
        x = self.blocks(G.decoder_level3, x, k_v, _level_tile(t, 2))
        x = self.up(G.up3_2, x, enc2, G.reduce_chan_level2, _level_tile(t, 2))
        del enc2
        x = self.blocks(G.decoder_level2, x, k_v, _level_tile(t, 1))
        x = self.up(G.up2_1, x, enc1, None, _level_tile(t, 1))
        del enc1
        x = self.blocks(G.decoder_level1, x, k_v, _level_tile(t, 0))
        x = self.blocks(G.refinement, x, k_v, _level_tile(t, 0))
        return self.tail(x, packed, out_h, out_w)

    def _quarter_input(self, packed: torch.Tensor, window: _Window) -> torch.Tensor:
        r = 4 // self.net.scale
        return space_to_depth(window.scaled(r).of(packed), r)

    def condition(self, packed: torch.Tensor) -> torch.Tensor:
        """CPEN with its mean pooled over tiles (each tile computed with the full receptive halo)."""
        cpen = self.net.condition
        r = 4 // self.net.scale
        hq, wq = packed.shape[-2] // r, packed.shape[-1] // r
        layers = list(cpen.E)[:-1]  # the pooling is the sum below
        total = None
        for tile in _tiles(hq, wq, self.tile_q):
            window = tile.grow(cpen.receptive_halo)
            x = self._quarter_input(packed, window)
            for layer in layers:
                if isinstance(layer, nn.Conv2d):
                    x, window = _conv3x3(layer, x, window)
                elif isinstance(layer, CPENResBlock):
                    conv_a, _, conv_b = layer.body
                    y, inner = _conv3x3(conv_a, x, window)
                    y, inner = _conv3x3(conv_b, F.leaky_relu(y, LEAKY_SLOPE), inner)
                    x, window = y + inner.within(x, window), inner
                else:
                    x = layer(x)
            part = tile.within(x, window).sum(dim=(2, 3), dtype=_accumulator_dtype(x.device))
            total = part if total is None else total + part
            self.tick()
        pooled = (total / (hq * wq)).to(packed.dtype)
        return cpen.mlp(pooled)

    def patch_embed(self, packed: torch.Tensor) -> torch.Tensor:
        proj = self.net.G.patch_embed.proj
        r = 4 // self.net.scale
        hq, wq = packed.shape[-2] // r, packed.shape[-1] // r
        out = packed.new_empty(1, proj.out_channels, hq, wq)
        for tile in _tiles(hq, wq, self.tile_q):
            window = tile.grow(1)
            y, inner = _conv3x3(proj, self._quarter_input(packed, window), window)
            tile.of(out).copy_(tile.within(y, inner))
            self.tick()
        return out

    def blocks(self, stage: nn.Sequential, x: torch.Tensor, k_v: torch.Tensor, tile: int) -> torch.Tensor:
        """Runs the transformer blocks of one stage; consumes `x`."""
        if len(stage) == 0:
            return x
        tiles = _tiles(x.shape[-2], x.shape[-1], tile)
        nxt, values = torch.empty_like(x), torch.empty_like(x)
        for block in stage:
            self.block(block, x, nxt, values, k_v, tiles)
            x, nxt = nxt, x
        return x

    def block(self, block: TransformerBlock, x, out, values, k_v, tiles) -> None:
        """x + Attn(LN1 x), then + FFN(LN2 ·), with the attention statistics summed over all tiles.

        Pass A (1-px halo for the depthwise conv) accumulates per head G = q kᵀ, Σq², Σk² and stores
        v; the softmax of temperature·G/(‖q‖‖k‖) is the whole-image attention matrix. Pass B
        (1-px halo for the FFN's depthwise conv) applies it and writes the block output.
        """
        attn, ffn = block.attn, block.ffn
        channels, heads = x.shape[1], attn.heads
        per_head = channels // heads
        attn_scale, attn_shift = prior_modulation(attn.kernel, k_v, channels)
        ffn_scale, ffn_shift = prior_modulation(ffn.kernel, k_v, channels)
        acc = _accumulator_dtype(x.device)
        gram = torch.zeros(heads, per_head, per_head, dtype=acc, device=x.device)
        q_sq = torch.zeros(heads, per_head, dtype=acc, device=x.device)
        k_sq = torch.zeros(heads, per_head, dtype=acc, device=x.device)
        for tile in tiles:
            window = tile.grow(1)
            y = bias_free_layer_norm(window.of(x), block.norm1.body.weight) * attn_scale + attn_shift
            qkv, inner = _conv3x3(attn.qkv_dwconv, _conv1x1(attn.qkv, y), window)
            q, k, v = tile.within(qkv, inner).chunk(3, dim=1)
            q, k = q.reshape(heads, per_head, -1), k.reshape(heads, per_head, -1)
            gram += (q @ k.transpose(-2, -1)).to(acc)
            q_sq += q.square().sum(-1, dtype=acc)
            k_sq += k.square().sum(-1, dtype=acc)
            tile.of(values).copy_(v)
            self.tick()
        q_norm = q_sq.sqrt().clamp_min(NORMALIZE_EPS)
        k_norm = k_sq.sqrt().clamp_min(NORMALIZE_EPS)
        logits = gram / (q_norm[:, :, None] * k_norm[:, None, :]) * attn.temperature.to(acc)
        attention = logits.softmax(dim=-1).to(x.dtype)
        for tile in tiles:
            window = tile.grow(1)
            v = window.of(values)
            mixed = (attention @ v.reshape(heads, per_head, -1)).reshape(v.shape)
            x1 = window.of(x) + _conv1x1(attn.project_out, mixed)
            y = bias_free_layer_norm(x1, block.norm2.body.weight) * ffn_scale + ffn_shift
            hidden, inner = _conv3x3(ffn.dwconv, _conv1x1(ffn.project_in, y), window)
            gate, value = tile.within(hidden, inner).chunk(2, dim=1)
            tile.of(out).copy_(tile.within(x1, window) + _conv1x1(ffn.project_out, F.gelu(gate) * value))
            self.tick()

    def down(self, down: Downsample, x: torch.Tensor, tile: int) -> torch.Tensor:
        conv = down.body[0]
        out = x.new_empty(1, 2 * x.shape[1], x.shape[-2] // 2, x.shape[-1] // 2)
        for window in _tiles(x.shape[-2], x.shape[-1], tile):
            y, inner = _conv3x3(conv, window.grow(1).of(x), window.grow(1))
            window.halved().of(out).copy_(F.pixel_unshuffle(window.within(y, inner), 2))
            self.tick()
        return out

    def up(self, up: Upsample, x: torch.Tensor, skip: torch.Tensor, reduce: Optional[nn.Conv2d], tile: int):
        conv = up.body[0]
        channels = reduce.out_channels if reduce is not None else conv.out_channels // 4 + skip.shape[1]
        out = x.new_empty(1, channels, skip.shape[-2], skip.shape[-1])
        for window in _tiles(x.shape[-2], x.shape[-1], tile):
            y, inner = _conv3x3(conv, window.grow(1).of(x), window.grow(1))
            fine = window.scaled(2)
            y = torch.cat([F.pixel_shuffle(window.within(y, inner), 2), fine.of(skip)], dim=1)
            fine.of(out).copy_(y if reduce is None else _conv1x1(reduce, y))
            self.tick()
        return out

    def tail(self, x: torch.Tensor, packed: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """Tail convs (2-px quarter-grid halo), the nearest-upsampled residual, cropped to the output."""
        (conv_a, _, conv_b, _), conv_c = self.net.G.tail
        s = self.net.scale
        out = x.new_empty(1, 3, out_h, out_w)
        for tile in _tiles(x.shape[-2], x.shape[-1], _tail_tile(self.tile_q)):
            full = tile.scaled(4)
            if full.top < out_h and full.left < out_w:  # tiles wholly in the padding are not computed
                window = tile.grow(2)
                y, window = _conv3x3(conv_a, window.of(x), window)
                y, window = _conv3x3(conv_b, F.pixel_shuffle(y, 2), window.scaled(2))
                y, window = _conv3x3(conv_c, F.pixel_shuffle(y, 2), window.scaled(2))
                residual = packed[:, :3, full.top // s:full.bottom // s, full.left // s:full.right // s]
                if s > 1:
                    residual = residual.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
                y = full.within(y, window) + residual
                rows, cols = min(full.bottom, out_h) - full.top, min(full.right, out_w) - full.left
                out[..., full.top:full.top + rows, full.left:full.left + cols] = y[..., :rows, :cols]
            self.tick()
        return out


# ----------------------------------------------------------------------------- restore


def empty_masks(mask: torch.Tensor) -> list[int]:
    """Indices of the images whose B×1×H×W mask marks no pixel as regenerated (none ≥ 0.5);
    `restore` returns their reference unchanged."""
    return [b for b in range(mask.shape[0]) if not bool((mask[b] >= 0.5).any())]


def restore(net: DiffRIRS2, generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
            noise: Optional[torch.Tensor] = None, seed: int = 0, tile_size: Optional[int] = None,
            composite: bool = True, progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Repairs the regenerated region of each image against its reference.

    generated: B×3×h×w, the inpainted/outpainted image (h×w = reference size / net.scale);
    reference: B×3×H×W, the original image (its hole content is never used);
    mask: B×1×H×W (or B×3×H×W), 1 = regenerated, binarised at ≥ 0.5. All floats in 0..1.
    noise: the B×D starting point of the prior diffusion (the tensor the original draws with
    torch.randn); otherwise one torch.randn(B, D) on a CPU generator seeded with `seed`.
    tile_size: output pixels per tile (rounded down to a multiple of 32), None for the whole
    image at once; tiling is exact (same result within float rounding), it only bounds memory.
    composite: paste the network's pixels into the reference where the mask is set (the
    original's final step); preserved pixels then come back bit-identical to the reference. A
    mask without any regenerated pixel returns the reference itself without running the network.
    progress(done, total) is called after every tile step (every image when not tiled).
    Returns B×3×H×W in 0..1, on the reference's device and in its dtype.
    """
    check_inputs(net, generated, reference, mask, noise=noise, tile_size=tile_size)
    tile_q = _quarter_tile(tile_size)
    batch = generated.shape[0]
    parameter = next(net.parameters())
    device, dtype = parameter.device, parameter.dtype
    if noise is None:
        noise = torch.randn(batch, net.config.prior_dim, generator=torch.Generator().manual_seed(seed))
    regenerated = mask >= 0.5
    empty = set(empty_masks(mask)) if composite else set()
    H, W = reference.shape[-2:]
    m = PAD_MULTIPLE[net.scale]
    padded_in = (math.ceil(H // net.scale / m) * m, math.ceil(W // net.scale / m) * m)
    hq, wq = padded_in[0] * net.scale // 4, padded_in[1] * net.scale // 4
    per_image = 1 if tile_q is None else _Stream.step_count(net.config, hq, wq, tile_q)
    total, done = batch * per_image, 0

    def tick(steps: int = 1):
        nonlocal done
        done += steps
        if progress is not None:
            progress(done, total)

    results = []
    with torch.inference_mode():
        for b in range(batch):
            ref = reference[b:b + 1]
            if b in empty:
                results.append(ref.clone())
                tick(per_image)
                continue
            packed = pack_input(generated[b:b + 1].to(device, dtype), ref.to(device, dtype),
                                regenerated[b:b + 1].to(device, dtype), net.scale)
            z = noise[b:b + 1].to(device, dtype)
            if tile_q is None:
                sr = net(packed, z)[..., :H, :W]
                tick()
            else:
                sr = _Stream(net, tile_q, tick).run(packed, z, H, W)
            sr = sr.clamp(0, 1).to(ref.device, ref.dtype)
            results.append(torch.where(regenerated[b:b + 1].to(ref.device), sr, ref) if composite else sr)
            del packed, sr
    return torch.cat(results, dim=0)


# ----------------------------------------------------------------------------- memory


# Measured on CPU, float32 (bench/bench_diffrir.py; reference/diffrir.md §5): a whole-image
# forward peaks at 1.3–1.7 GB per output megapixel; the streamed scheme keeps about 0.14 GB per
# output megapixel resident plus scratch proportional to the tile (0.64 GB for 512² tiles, about
# 2.4 GB per tile megapixel). GPUs add allocator and cuDNN overhead, hence the margins.
WHOLE_BYTES_PER_MP = 1.8e9
RESIDENT_BYTES_PER_MP = 0.16e9
TILE_BYTES_PER_MP = 2.8e9


def estimate_memory(net: DiffRIRS2, height: int, width: int, tile_size: Optional[int] = None) -> int:
    """Working memory (bytes, excluding the weights) to restore one height×width output image."""
    width_factor = net.config.dim / 64  # the figures are for the released width
    megapixels = height * width / 1e6
    if tile_size is None:
        return int(WHOLE_BYTES_PER_MP * megapixels * width_factor)
    tile_mp = min(tile_size * tile_size / 1e6, megapixels)
    return int((RESIDENT_BYTES_PER_MP * megapixels + TILE_BYTES_PER_MP * tile_mp) * width_factor)
