"""LLMGA editing: time per phase (mask, inversion, re-sampling) against a plain img2img, one process.

Runs llmga_core.editing at the CLI's defaults (10 mask maps at t = 500, 50 steps from t = 749,
source guidance 3.5, target guidance 7.5) on a UNet2DConditionModel with SD1.5's layout (four
levels, cross-attention on the first three, two layers per block, 8 heads, 768-wide text
context; random weights, seeded), and the baseline on the same model in the same process: an
img2img of the same 50 timesteps (749 → 0) with CFG 7.5, uncond and cond batched per step, and a
DDIM (first-order DPM-Solver++) update. Text encodings are random 1×77×768 tensors; the VAE is
left out of both (each side encodes once and decodes once). Each repeat runs the baseline and
then the edit; the fastest repeat of each phase is reported. Prints the UNet calls and latents
of every phase, wall and process CPU seconds, and edit / img2img.

    python bench/bench_editing.py                          # CPU: widths 1/5 of SD1.5, 256² (~1 minute)
    python bench/bench_editing.py --width 320 --size 512 --device cuda --dtype float16   # SD1.5 itself
    python bench/bench_editing.py --max-batch 2            # the mask's 20 latents in calls of 2
"""
from __future__ import annotations

import argparse
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
    """predict_noise over the UNet, counting calls and the latents they carried."""

    def __init__(self, unet, device):
        self.unet, self.device = unet, device
        self.calls, self.latents = 0, 0

    def __call__(self, x, t, embeds):
        self.calls += 1
        self.latents += x.shape[0]
        return self.unet(x, t, encoder_hidden_states=embeds).sample

    def reset(self):
        self.calls, self.latents = 0, 0


def _fastest(previous, seconds):
    return seconds if previous is None else tuple(min(a, b) for a, b in zip(previous, seconds))


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
    """fn's result, wall seconds and process CPU seconds (all threads; less sensitive than wall time
    to other processes taking the cores of a shared machine)."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - start, time.process_time() - start_cpu)


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
        best: dict[str, tuple[float, float]] = {}
        calls: dict[str, tuple[int, int]] = {}
        computed = mask = None
        for _ in range(args.repeats):
            phases = {
                "img2img": lambda: img2img(predict, x0, noise.inversion[0], target, uncond, acp, steps, 7.5),
                "mask": lambda: editing.edit_mask(predict, mask_latents, noise.mask, source, target,
                                                  alphas_cumprod=acp, max_batch=args.max_batch),
                "inversion": lambda: editing.invert(predict, x0, noise.inversion, source, uncond, alphas_cumprod=acp,
                                                    timesteps=steps, guidance=3.5, max_batch=args.max_batch),
            }
            results = {}
            for name, fn in phases.items():
                predict.reset()
                results[name], seconds = timed(fn, device)
                best[name] = _fastest(best.get(name), seconds)
                calls[name] = (predict.calls, predict.latents)
            computed = results["mask"]
            # Random weights give a smooth map, often an empty mask; re-sampling costs the same for any
            # mask, so it is timed over a full one then.
            mask = computed if computed.any() else torch.ones_like(computed)
            x_start, zs = results["inversion"]
            predict.reset()
            _, seconds = timed(lambda: editing.resample(predict, x_start, zs, target, uncond, mask, alphas_cumprod=acp,
                                                        timesteps=steps, guidance=7.5, max_batch=args.max_batch),
                               device)
            best["resample"] = _fastest(best.get("resample"), seconds)
            calls["resample"] = (predict.calls, predict.latents)

    phases = ("mask", "inversion", "resample")
    edit = tuple(sum(best[n][i] for n in phases) for i in range(2))
    print(f"{'phase':<12}{'UNet calls':>11}{'latents':>9}{'wall s':>9}{'CPU s':>9}")
    for name in phases:
        print(f"{name:<12}{calls[name][0]:>11}{calls[name][1]:>9}{best[name][0]:>9.2f}{best[name][1]:>9.2f}")
    total_calls = sum(calls[n][0] for n in phases)
    total_latents = sum(calls[n][1] for n in phases)
    print(f"{'edit':<12}{total_calls:>11}{total_latents:>9}{edit[0]:>9.2f}{edit[1]:>9.2f}")
    base = best["img2img"]
    print(f"{'img2img':<12}{calls['img2img'][0]:>11}{calls['img2img'][1]:>9}{base[0]:>9.2f}{base[1]:>9.2f}")
    print(f"edit / img2img: {edit[0] / base[0]:.2f}x wall, {edit[1] / base[1]:.2f}x CPU (goal: at most 2.5x; "
          f"UNet latents alone: {total_latents / calls['img2img'][1]:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
