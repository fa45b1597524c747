"""LLMGA editing: time per phase (mask, inversion, re-sampling) against a plain img2img, one process.

Runs llmga_core.editing at the CLI's defaults (10 mask maps at t = 500, 50 steps from t = 749,
source guidance 3.5, target guidance 7.5) on a UNet2DConditionModel with SD1.5's layout (four
levels, cross-attention on the first three, two layers per block, 8 heads, 768-wide text
context; random weights, seeded), and the baseline on the same model in the same process: an
img2img of the same 50 timesteps (749 → 0) with CFG 7.5, uncond and cond batched per step, and a
DDIM (first-order DPM-Solver++) update. Text encodings are random 1×77×768 tensors; the VAE is
left out of both (each side encodes once and decodes once). Each repeat runs the baseline and
then the edit. Prints, per phase, the UNet calls and the latents they carried, the fastest
repeat's wall time, and a robust time (the median UNet call time per batch size, pooled over all
phases, × the phase's calls, + the phase's own time outside the UNet), which a shared machine's
load disturbs far less; then edit / img2img for both.

    python bench/bench_editing.py                          # CPU: widths 1/5 of SD1.5, 256² (~1.5 minutes)
    python bench/bench_editing.py --width 320 --size 512 --device cuda --dtype float16   # SD1.5 itself
    python bench/bench_editing.py --max-batch 2            # the mask's 20 latents in calls of 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core import editing  # noqa: E402


def sd15_like_unet(width: int, size: int):
    """SD1.5's UNet layout (runwayml/stable-diffusion-v1-5 unet/config.json) at base width `width`
    (320 in SD1.5) for `size`² images; seeded random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


class Counter:
    """predict_noise over the UNet, recording each call's latents and seconds."""

    def __init__(self, unet, device):
        self.unet, self.device = unet, device
        self.reset()

    def __call__(self, x, t, embeds):
        sync(self.device)
        start = time.perf_counter()
        eps = self.unet(x, t, encoder_hidden_states=embeds).sample
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        self.latents.append(x.shape[0])
        return eps

    def reset(self):
        self.seconds: list[float] = []
        self.latents: list[int] = []


class Phase:
    """One phase over the repeats: its calls, wall times, and time outside the UNet calls."""

    def __init__(self):
        self.walls: list[float] = []
        self.outside: list[float] = []
        self.latents: list[int] = []

    def add(self, wall: float, counter: Counter, pool: dict):
        self.walls.append(wall)
        self.outside.append(wall - sum(counter.seconds))
        self.latents = list(counter.latents)
        for batch, seconds in zip(counter.latents, counter.seconds):
            pool.setdefault(batch, []).append(seconds)

    @property
    def calls(self) -> int:
        return len(self.latents)

    @property
    def wall(self) -> float:
        return min(self.walls)

    def robust(self, pool: dict) -> float:
        """Robust to other processes taking the cores of a shared machine: the median time of a UNet
        call of each batch size, pooled over all phases and repeats (the same work wherever it is
        called), × this phase's calls, plus the fastest repeat's time outside the UNet calls."""
        return sum(statistics.median(pool[b]) for b in self.latents) + max(0.0, min(self.outside))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def img2img(predict, x0, noise, cond, uncond, acp, steps, guidance):
    """A plain img2img over the same timesteps: x_749 = α·x0 + σ·n, then CFG and a DDIM step."""
    alpha = lambda t: acp[t].sqrt().item()  # noqa: E731
    sigma = lambda t: (1 - acp[t]).sqrt().item()  # noqa: E731
    x = alpha(steps[0]) * x0 + sigma(steps[0]) * noise
    embeds = torch.cat([uncond, cond])
    for k, s in enumerate(steps):
        t = steps[k + 1] if k + 1 < len(steps) else 0
        eps_u, eps_c = predict(torch.cat([x, x]), s, embeds).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0_pred = (x - sigma(s) * eps) / alpha(s)
        x = alpha(t) * x0_pred + sigma(t) * eps
    return x


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="UNet base width (SD1.5: 320)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip", type=float, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = sd15_like_unet(args.width, args.size).to(device, dtype)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    shape = (4, args.size // 8, args.size // 8)
    steps = editing.timesteps(args.steps, args.skip)
    acp = editing.scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    text = [torch.randn((1, 77, 768), generator=g).to(device, dtype) for _ in range(3)]
    source, target, uncond = text
    x0 = (torch.randn((1, *shape), generator=g) * 0.8).to(device, dtype)
    noise = editing.draw_noise(0, shape, steps=len(steps), device=device, dtype=dtype)
    mask_latents = (x0 + 0.05 * noise.posterior).to(dtype)  # stands in for the VAE posterior samples
    predict = Counter(unet, device)

    print(f"UNet: SD1.5 layout, base width {args.width} ({params:.1f} M parameters), {args.size}² images "
          f"({shape[1]}² latents), {args.dtype} on {device}, {torch.get_num_threads()} threads; "
          f"{len(steps)} steps from t = {steps[0]}, {editing.MASK_MAPS} mask maps")
    with torch.inference_mode():
        predict(torch.cat([x0, x0]), 500, torch.cat([uncond, source]))  # warm-up
        phases = {name: Phase() for name in ("img2img", "mask", "inversion", "resample")}
        pool: dict[int, list[float]] = {}
        computed = None
        for _ in range(args.repeats):
            runs = {
                "img2img": lambda: img2img(predict, x0, noise.inversion[0], target, uncond, acp, steps, 7.5),
                "mask": lambda: editing.edit_mask(predict, mask_latents, noise.mask, source, target,
                                                  alphas_cumprod=acp, max_batch=args.max_batch),
                "inversion": lambda: editing.invert(predict, x0, noise.inversion, source, uncond, alphas_cumprod=acp,
                                                    timesteps=steps, guidance=3.5, max_batch=args.max_batch),
                # Random weights give a smooth map, often an empty mask; re-sampling costs the same for
                # any mask, so it is timed over a full one then.
                "resample": lambda: editing.resample(predict, *results["inversion"], target, uncond,
                                                     computed if computed.any() else torch.ones_like(computed),
                                                     alphas_cumprod=acp, timesteps=steps, guidance=7.5,
                                                     max_batch=args.max_batch),
            }
            results = {}
            for name, fn in runs.items():
                predict.reset()
                results[name], wall = timed(fn, device)
                phases[name].add(wall, predict, pool)
                if name == "mask":
                    computed = results["mask"]

    print(f"computed mask covers {computed.float().mean().item():.0%} of the latent"
          + ("" if computed.any() else "; re-sampling timed with a full mask"))
    edit_phases = ("mask", "inversion", "resample")
    print(f"{'phase':<12}{'UNet calls':>11}{'latents':>9}{'wall s':>9}{'robust s':>10}")
    rows = [(name, phases[name]) for name in edit_phases]
    for name, phase in rows + [("img2img", phases["img2img"])]:
        print(f"{name:<12}{phase.calls:>11}{sum(phase.latents):>9}{phase.wall:>9.2f}{phase.robust(pool):>10.2f}")
    edit_calls = sum(p.calls for _, p in rows)
    edit_latents = sum(sum(p.latents) for _, p in rows)
    edit_wall, edit_robust = sum(p.wall for _, p in rows), sum(p.robust(pool) for _, p in rows)
    print(f"{'edit':<12}{edit_calls:>11}{edit_latents:>9}{edit_wall:>9.2f}{edit_robust:>10.2f}")
    base = phases["img2img"]
    print(f"edit / img2img: {edit_wall / base.wall:.2f}x wall, {edit_robust / base.robust(pool):.2f}x robust "
          f"(goal: at most 2.5x; UNet latents alone: {edit_latents / sum(base.latents):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
