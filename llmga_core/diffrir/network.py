"""The DiffRIR network (DiffRIRS2) with the released sizes and key names.

Port of Zj-BinXia/DiffRIR: DiffRIR/archs/S2_arch.py, with the DDPM of ldm/ddpm.py at inference. How the
parts connect is written once, in DIRformer.forward; a runner (WholeImage here, tiled.TiledRun) executes
each part, so the whole-image and the tiled path share that one forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# First-convolution width per scale: the packed input (3 generated + 3·s² masked-reference
# channels) space-to-depth'd onto the quarter grid of the output.
INPUT_CHANNELS = {1: 96, 2: 60, 4: 51}
# Reflect-pad multiple on the input grid; makes the quarter grid divisible by 8 (three 2x downsamplings).
PAD_MULTIPLE = {1: 32, 2: 16, 4: 8}
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

    def forward(self, packed, k_v, run: "WholeImage" = None):
        """The U-Net on the padded packed input; `run` executes each part (whole map, or tiled.py's tiles)."""
        run = run or WHOLE_IMAGE
        x = run.patch_embed(self.patch_embed, packed, 4 // self.scale)
        enc1 = run.stage(self.encoder_level1, x, k_v, 0)
        enc2 = run.stage(self.encoder_level2, run.down(self.down1_2, enc1, 0), k_v, 1)
        enc3 = run.stage(self.encoder_level3, run.down(self.down2_3, enc2, 1), k_v, 2)
        x = run.stage(self.latent, run.down(self.down3_4, enc3, 2), k_v, 3)
        x = run.up(self.up4_3, x, enc3, self.reduce_chan_level3, 3)
        del enc3  # each skip is dropped once used: they are the largest maps held
        x = run.stage(self.decoder_level3, x, k_v, 2)
        x = run.up(self.up3_2, x, enc2, self.reduce_chan_level2, 2)
        del enc2
        x = run.stage(self.decoder_level2, x, k_v, 1)
        x = run.up(self.up2_1, x, enc1, None, 1)
        del enc1
        x = run.stage(self.decoder_level1, x, k_v, 0)
        x = run.stage(self.refinement, x, k_v, 0)
        return run.tail(self, x, packed)


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
        # computed in float32 as the original, then in the network's dtype (float16/bfloat16 runs)
        t = (t.float() / self.max_period).to(x.dtype).view(-1, 1)
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

    def prior(self, packed: torch.Tensor, noise: torch.Tensor, run: "WholeImage" = None) -> torch.Tensor:
        """The image prior k_v: CPEN's code c of the packed input, then the 4-step diffusion from `noise`."""
        return self.diffusion.sample((run or WHOLE_IMAGE).condition(self.condition, packed), noise)

    def forward(self, packed: torch.Tensor, noise: torch.Tensor, run: "WholeImage" = None) -> torch.Tensor:
        """The padded output of the padded packed input; `run` = tiled.TiledRun streams it in tiles."""
        return self.G(packed, self.prior(packed, noise, run), run)


class WholeImage:
    """Runs each part of DIRformer and CPEN on the whole map at once: the original's forward.

    tiled.TiledRun has the same methods and computes the same values tile by tile; DIRformer.forward is
    the one description of how the parts connect, for both.
    """

    def condition(self, cpen: CPEN, packed):
        return cpen(packed)

    def patch_embed(self, patch_embed: PatchEmbed, packed, factor: int):
        return patch_embed(space_to_depth(packed, factor))

    def stage(self, stage: TransformerStage, x, k_v, level: int):
        return stage(x, k_v)

    def down(self, down: Downsample, x, level: int):
        return down(x)

    def up(self, up: Upsample, x, skip, reduce, level: int):
        joined = torch.cat([up(x), skip], 1)
        return joined if reduce is None else reduce(joined)

    def tail(self, G: DIRformer, x, packed):
        """The x4 tail plus the nearest-upsampled generated image (padded size)."""
        return G.tail(x) + F.interpolate(packed[:, :3], scale_factor=G.scale, mode="nearest")


WHOLE_IMAGE = WholeImage()
