"""DiffRIR: the network that repairs the seams between generated and preserved regions.

LLMGA (Xia et al., ECCV 2024) runs DiffRIR after inpainting and outpainting to remove the texture,
brightness and contrast differences between the region Stable Diffusion regenerated and the
pixels it kept. This package is an own implementation of the released stage-2 generator DiffRIRS2,
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
Modules: network (DiffRIRS2 and its config), loading (load_diffrir), tiled (the exact tiled run),
restoration (check_inputs, pack_input, plan_restore, restore, the tile, out-of-memory, empty-mask
and memory rules). No ComfyUI imports;
nothing happens at import time.
"""
from .loading import load_diffrir
from .network import DiffRIRConfig, DiffRIRS2, diffusion_schedule
from .restoration import (RestorePlan, check_inputs, empty_masks, estimate_memory, pack_input, plan_restore,
                          restore, smaller_tile_size)
from .tiled import MIN_TILE_SIZE

__all__ = [
    "DiffRIRConfig",
    "DiffRIRS2",
    "load_diffrir",
    "restore",
    "plan_restore",
    "RestorePlan",
    "empty_masks",
    "check_inputs",
    "pack_input",
    "estimate_memory",
    "smaller_tile_size",
    "diffusion_schedule",
    "MIN_TILE_SIZE",
]
