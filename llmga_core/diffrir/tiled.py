"""Exact streamed tiling of DiffRIR: the whole-image result with memory bounded by the tile.

Every convolution is computed on a tile plus the halo it needs; the global statistics (CPEN's mean
over the image, each attention layer's channel Gram matrix and norms) are accumulated over all tiles
before they are used, so tiling changes nothing but memory. TiledRun is the
runner DIRformer.forward calls instead of network.WholeImage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .network import (CPEN, LEAKY_SLOPE, NORMALIZE_EPS, CPENResBlock, DiffRIRConfig, DIRformer,
                      Downsample, PatchEmbed, TransformerBlock, Upsample, bias_free_layer_norm, prior_modulation,
                      space_to_depth)

# Tiles are multiples of 8 quarter-grid pixels so every pixel (un)shuffle stays aligned.
MIN_TILE_SIZE = 32


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


def _level_tile(tile_quarter: int, level: int) -> int:
    # Coarser levels have fewer pixels but more channels; 8 keeps tiles even (aligned shuffles).
    return max(tile_quarter >> level, 8)


def _tail_tile(tile_quarter: int) -> int:
    # The tail works at 512 channels on the ½ grid and 128 on the full grid: per pixel about three
    # times a level-1 block, so it gets a quarter of the tile's area.
    return max(tile_quarter // 2, 8)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class TiledRun:
    """Runs DIRformer and CPEN on one image tile by tile (network.WholeImage's methods, same values).

    tile_quarter: tile side on the quarter grid (coarser levels and the tail use their own, see _level_tile
    and _tail_tile); tick() is called after every tile step; the output is cropped to out_h×out_w.
    """

    def __init__(self, scale: int, tile_quarter: int, tick: Callable[[], None], out_h: int, out_w: int):
        self.factor = 4 // scale  # input grid -> quarter grid
        self.tile_quarter = tile_quarter
        self.tick = tick
        self.out_h, self.out_w = out_h, out_w

    @staticmethod
    def step_count(config: DiffRIRConfig, height_quarter: int, width_quarter: int, tile_quarter: int) -> int:
        """Tile steps for a quarter grid of height_quarter×width_quarter (the progress total)."""
        tiles = [len(_tiles(height_quarter >> level, width_quarter >> level, _level_tile(tile_quarter, level)))
                 for level in range(4)]
        n0, n1, n2, n3 = tiles
        b0, b1, b2, b3 = config.num_blocks
        blocks = 2 * (2 * b0 * n0 + 2 * b1 * n1 + 2 * b2 * n2 + b3 * n3 + config.num_refinement_blocks * n0)
        resampling = n0 + n1 + n2 + n3 + n2 + n1  # three downsamplings, three upsamplings
        tail = len(_tiles(height_quarter, width_quarter, _tail_tile(tile_quarter)))
        return n0 + n0 + blocks + resampling + tail  # + prior and patch embedding

    def _quarter_input(self, packed: torch.Tensor, window: _Window) -> torch.Tensor:
        return space_to_depth(window.scaled(self.factor).of(packed), self.factor)

    def condition(self, cpen: CPEN, packed: torch.Tensor) -> torch.Tensor:
        """CPEN with its mean pooled over tiles (each tile computed with the full receptive halo)."""
        height_quarter, width_quarter = packed.shape[-2] // self.factor, packed.shape[-1] // self.factor
        layers = list(cpen.E)[:-1]  # the pooling is the sum below
        total = None
        for tile in _tiles(height_quarter, width_quarter, self.tile_quarter):
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
        pooled = (total / (height_quarter * width_quarter)).to(packed.dtype)
        return cpen.mlp(pooled)

    def patch_embed(self, patch_embed: PatchEmbed, packed: torch.Tensor, factor: int) -> torch.Tensor:
        proj = patch_embed.proj
        height_quarter, width_quarter = packed.shape[-2] // factor, packed.shape[-1] // factor
        out = packed.new_empty(1, proj.out_channels, height_quarter, width_quarter)
        for tile in _tiles(height_quarter, width_quarter, self.tile_quarter):
            window = tile.grow(1)
            y, inner = _conv3x3(proj, self._quarter_input(packed, window), window)
            tile.of(out).copy_(tile.within(y, inner))
            self.tick()
        return out

    def stage(self, stage: nn.Sequential, x: torch.Tensor, k_v: torch.Tensor, level: int) -> torch.Tensor:
        """Runs the transformer blocks of one stage; consumes `x`."""
        if len(stage) == 0:
            return x
        tiles = _tiles(x.shape[-2], x.shape[-1], _level_tile(self.tile_quarter, level))
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

    def down(self, down: Downsample, x: torch.Tensor, level: int) -> torch.Tensor:
        conv, tile = down.body[0], _level_tile(self.tile_quarter, level)
        out = x.new_empty(1, 2 * x.shape[1], x.shape[-2] // 2, x.shape[-1] // 2)
        for window in _tiles(x.shape[-2], x.shape[-1], tile):
            y, inner = _conv3x3(conv, window.grow(1).of(x), window.grow(1))
            window.halved().of(out).copy_(F.pixel_unshuffle(window.within(y, inner), 2))
            self.tick()
        return out

    def up(self, up: Upsample, x: torch.Tensor, skip: torch.Tensor, reduce: Optional[nn.Conv2d], level: int):
        conv, tile = up.body[0], _level_tile(self.tile_quarter, level)
        channels = reduce.out_channels if reduce is not None else conv.out_channels // 4 + skip.shape[1]
        out = x.new_empty(1, channels, skip.shape[-2], skip.shape[-1])
        for window in _tiles(x.shape[-2], x.shape[-1], tile):
            y, inner = _conv3x3(conv, window.grow(1).of(x), window.grow(1))
            fine = window.scaled(2)
            y = torch.cat([F.pixel_shuffle(window.within(y, inner), 2), fine.of(skip)], dim=1)
            fine.of(out).copy_(y if reduce is None else _conv1x1(reduce, y))
            self.tick()
        return out

    def tail(self, G: DIRformer, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Tail convs (2-px quarter-grid halo), the nearest-upsampled residual, cropped to the output."""
        (conv_a, _, conv_b, _), conv_c = G.tail
        s, out_h, out_w = G.scale, self.out_h, self.out_w
        out = x.new_empty(1, 3, out_h, out_w)
        for tile in _tiles(x.shape[-2], x.shape[-1], _tail_tile(self.tile_quarter)):
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
