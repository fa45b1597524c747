"""DiffRIR restore: input checks, the original's packing, whole-image or tiled inference, compositing.

Input handling ports Zj-BinXia/DiffRIR: inference_diffrir.py (x1) and DiffRIR/models/DiffIR_S2_model.py
(x2, x4). The library owns every decision about tiles (rounding, the out-of-memory retry size) and empty
masks, so a caller only translates its own values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .network import PAD_MULTIPLE, DiffRIRS2, space_to_depth
from .tiled import MIN_TILE_SIZE, TiledRun


def _size(h: int, w: int) -> str:
    return f"{w}×{h}"


def _quarter_tile(tile_size) -> Optional[int]:
    """The tile side on the quarter grid: tile_size rounded down to a multiple of MIN_TILE_SIZE, divided by 4
    (None for the whole image: tile_size None or 0)."""
    if tile_size is None or (tile_size == 0 and not isinstance(tile_size, bool)):
        return None
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < MIN_TILE_SIZE:
        raise ValueError(f"tile_size must be 0 (the whole image at once; None too in Python) or at least "
                         f"{MIN_TILE_SIZE} pixels; got {tile_size!r}.")
    return tile_size // MIN_TILE_SIZE * (MIN_TILE_SIZE // 4)


def smaller_tile_size(tile_size: Optional[int], height: int, width: int) -> Optional[int]:
    """The tile size to retry with after running out of memory at `tile_size` (None = whole image) on a
    height×width output: half of it (of the longer side when whole), rounded down to a multiple of
    MIN_TILE_SIZE; None when that is below MIN_TILE_SIZE (nothing smaller to try). Tiling is exact, so
    only speed changes, as with the host's halving in ImageUpscaleWithModel."""
    half = (max(height, width) if tile_size is None else tile_size) // 2 // MIN_TILE_SIZE * MIN_TILE_SIZE
    return half if half >= MIN_TILE_SIZE else None


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
    if any(n not in (1, max(batches)) for n in batches):
        raise ValueError(f"The batch sizes differ: {batches[0]} generated image(s), {batches[1]} "
                         f"reference(s) and {batches[2]} mask(s); give one of each or the same number of each (one "
                         "reference or mask serves every image).")
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
        expected = (max(batches), net.config.prior_dim)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape {expected}, one {expected[1]}-value starting point of the "
                             f"prior diffusion per image; got {got}.")
    _quarter_tile(tile_size)


def broadcast_batch(generated, reference, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three inputs at the largest batch size: one image, reference or mask serves every image (a view)."""
    batch = max(generated.shape[0], reference.shape[0], mask.shape[0])
    return tuple(t if t.shape[0] == batch else t.expand(batch, *t.shape[1:]) for t in (generated, reference, mask))


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


def empty_masks(mask: torch.Tensor) -> list[int]:
    """Indices of the images whose B×1×H×W mask marks no pixel as regenerated (none ≥ 0.5);
    `restore` returns their reference unchanged."""
    return [b for b in range(mask.shape[0]) if not bool((mask[b] >= 0.5).any())]


@dataclass(frozen=True)
class RestorePlan:
    """What a restore call will do, known before it runs: the images whose mask is empty (they come back as
    their reference, and the network is not needed for them), the memory to make room for (bytes: weights,
    working memory at the requested tile size and the input and output images) and the notes to show."""

    images: int  # the batch after a batch of one is broadcast
    empty: tuple[int, ...]
    needs_network: bool
    memory_bytes: int
    notes: tuple[str, ...]  # plain words for the user (empty masks)
    made_for: tuple = field(default=(), repr=False, compare=False)  # restore(plan=...) reuses the checks

    @property
    def note(self) -> Optional[str]:
        """The notes as one text (None when there are none)."""
        return " ".join(self.notes) or None


def _arguments(net, generated, reference, mask, noise, tile_size) -> tuple:
    return (id(net), id(generated), id(reference), id(mask), id(noise), tile_size)


def plan_restore(net: DiffRIRS2, generated, reference, mask, *, noise=None, tile_size=None) -> RestorePlan:
    """Checks the inputs as `restore` does (one ValueError, before any work) and plans the call; `restore(...,
    plan=the plan)` with the same arguments does not check them again."""
    made_for = _arguments(net, generated, reference, mask, noise, tile_size)
    check_inputs(net, generated, reference, mask, noise=noise, tile_size=tile_size)
    generated, reference, mask = broadcast_batch(generated, reference, mask)
    empty = tuple(empty_masks(mask))
    batch = generated.shape[0]
    note = None
    if len(empty) == 1:
        note = (f"DiffRIR: the mask of image {empty[0] + 1} is empty, so nothing was restored there; it is returned "
                f"as the reference.")
    elif empty:
        numbers = ", ".join(str(b + 1) for b in empty)
        note = (f"DiffRIR: the masks of images {numbers} are empty, so nothing was restored there; they are returned "
                f"as the references.")
    needs_network = len(empty) < batch
    memory = 0
    if needs_network:
        weights = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
        height, width = reference.shape[-2:]
        tile = None if _quarter_tile(tile_size) is None else tile_size
        images = (generated.nelement() + 2 * reference.nelement() + mask.nelement()) * 4  # + the result
        memory = weights + estimate_memory(net, height, width, tile) + images
    return RestorePlan(images=batch, empty=empty, needs_network=needs_network, memory_bytes=memory,
                       notes=(note,) if note else (), made_for=made_for)


def restore(net: DiffRIRS2, generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
            noise: Optional[torch.Tensor] = None, seed: int = 0, tile_size: Optional[int] = None,
            composite: bool = True, progress: Optional[Callable[[int, int], None]] = None,
            out_of_memory: tuple = (torch.OutOfMemoryError,),
            on_retry: Optional[Callable[[int], None]] = None, plan: Optional[RestorePlan] = None) -> torch.Tensor:
    """Repairs the regenerated region of each image against its reference.

    generated: B×3×h×w, the inpainted/outpainted image (h×w = reference size / net.scale);
    reference: B×3×H×W, the original image (its hole content is never used);
    mask: B×1×H×W (or B×3×H×W), 1 = regenerated, binarised at ≥ 0.5. All floats in 0..1. Any of the three
    may have a batch of 1, which then serves every image.
    noise: the B×D starting point of the prior diffusion (the tensor the original draws with
    torch.randn); otherwise one torch.randn(B, D) on a CPU generator seeded with `seed`.
    tile_size: output pixels per tile (rounded down to a multiple of 32), None or 0 for the whole
    image at once; tiling is exact (same result within float rounding), it only bounds memory.
    composite: paste the network's pixels into the reference where the mask is set (the
    original's final step); preserved pixels then come back bit-identical to the reference. A
    mask without any regenerated pixel returns the reference itself without running the network.
    progress(done, total) is called after every tile step (every image when not tiled).
    out_of_memory: the exceptions that mean the device ran out of memory; the image is then run again
    with smaller_tile_size's tile (on_retry(tile) is called first, e.g. to empty a cache) until it fits
    or no smaller tile exists (then the exception propagates). Pass () to never retry.
    plan: what plan_restore returned for these same arguments; its checks are not repeated.
    Returns B×3×H×W in 0..1, on the reference's device and in its dtype.
    """
    if plan is None or plan.made_for != _arguments(net, generated, reference, mask, noise, tile_size):
        check_inputs(net, generated, reference, mask, noise=noise, tile_size=tile_size)
    generated, reference, mask = broadcast_batch(generated, reference, mask)
    tile_quarter = _quarter_tile(tile_size)
    tile_size = None if tile_quarter is None else tile_size
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
    height_quarter, width_quarter = padded_in[0] * net.scale // 4, padded_in[1] * net.scale // 4

    def steps_per_image(q):
        return 1 if q is None else TiledRun.step_count(net.config, height_quarter, width_quarter, q)

    finished = 0  # steps of the images already done, which a retry does not repeat
    done = 0

    def tick(steps: int = 1):
        nonlocal done
        done += steps
        if progress is not None:
            progress(done, finished + (batch - b) * steps_per_image(tile_quarter))

    results = []
    with torch.inference_mode():
        for b in range(batch):
            ref = reference[b:b + 1]
            if b in empty:
                results.append(ref.clone())
                tick(steps_per_image(tile_quarter))
                finished = done
                continue
            while True:
                try:
                    sr = _restore_one(net, generated[b:b + 1], ref, regenerated[b:b + 1], noise[b:b + 1], device,
                                      dtype, tile_quarter, tick, H, W)
                    break
                except out_of_memory:
                    smaller = smaller_tile_size(tile_size, H, W)
                    if smaller is None:
                        raise
                    tile_size, tile_quarter, done = smaller, _quarter_tile(smaller), finished
                    if on_retry is not None:
                        on_retry(smaller)
            finished = done
            results.append(torch.where(regenerated[b:b + 1].to(ref.device), sr, ref) if composite else sr)
            del sr
    return torch.cat(results, dim=0)


def _restore_one(net, generated, reference, regenerated, noise, device, dtype, tile_quarter, tick, H, W):
    """The network's B=1 output for one image, clamped, on the reference's device and dtype."""
    packed = pack_input(generated.to(device, dtype), reference.to(device, dtype), regenerated.to(device, dtype),
                        net.scale)
    run = None if tile_quarter is None else TiledRun(net.scale, tile_quarter, tick, H, W)
    sr = net(packed, noise.to(device, dtype), run)[..., :H, :W]
    if run is None:
        tick()
    return sr.clamp(0, 1).to(reference.device, reference.dtype)


# Measured on CPU, float32 (bench/bench_diffrir.py): a whole-image
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
