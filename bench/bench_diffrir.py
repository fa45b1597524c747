"""DiffRIR restore: throughput and peak memory, exact tiling against the whole-image baseline.

Runs llmga_core.diffrir.restore at the released configuration (dim 64, blocks [13,1,1,1], 13
refinement blocks, heads [1,2,4,8], FFN 2.2; random weights) on square images, whole-image (the
original's way, the baseline) and tiled (the exact streamed scheme), in one process, and prints
for each: megapixels per second, peak memory (growth of the process RSS on CPU, sampled every
5 ms; torch.cuda.max_memory_allocated on GPU), the ratio tiled / whole, and the largest
difference between the two outputs. From the per-megapixel slopes it prints the largest square
image each mode fits in a memory budget (24 GB by default).

    python bench/bench_diffrir.py                 # 512², 1024², 2048² (CPU: ~15 minutes)
    python bench/bench_diffrir.py --quick         # 256² and 512², 256-pixel tiles (~1 minute)
    python bench/bench_diffrir.py --sizes 512 1024 --tile 256 --scale 2
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.diffrir import DiffRIRConfig, DiffRIRS2, estimate_memory, restore  # noqa: E402


def _trim_heap():
    """Returns freed heap pages to the OS so RSS baselines of later runs are not inflated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        import psutil

        self._process = psutil.Process(os.getpid())
        self.base = self._process.memory_info().rss
        self._rss_peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
            self.peak = self._rss_peak - self.base
        return False


def inputs(scale: int, side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(1, 3, side, side, generator=g)
    generated = torch.rand(1, 3, side // scale, side // scale, generator=g)
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 4: 3 * side // 4, side // 5: side - side // 3] = 1.0  # a hole crossing many tiles
    return generated, reference, mask


def run(net, scale, side, tile, device):
    generated, reference, mask = inputs(scale, side)
    noise = torch.randn(1, net.config.prior_dim, generator=torch.Generator().manual_seed(1))
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        out = restore(net, generated, reference, mask, noise=noise, tile_size=tile)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, memory.peak


def fit(points):
    """Least-squares line bytes = intercept + slope · MP through (MP, bytes) points."""
    if len(points) == 1:
        mp, peak = points[0]
        return 0.0, peak / mp
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="square output sides")
    parser.add_argument("--tile", type=int, default=512, help="tile size in output pixels for the tiled mode")
    parser.add_argument("--scale", type=int, default=1, choices=[1, 2, 4])
    parser.add_argument("--budget-gb", type=float, default=24.0, help="memory budget for the fit estimate")
    parser.add_argument("--skip-whole-above", type=int, default=None,
                        help="skip whole-image runs above this side (CPU: ~60 s per MP)")
    parser.add_argument("--quick", action="store_true", help="256² and 512² only, with 256-pixel tiles")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.tile = [256, 512], 256
    device = torch.device(args.device)

    torch.manual_seed(0)
    net = DiffRIRS2(DiffRIRConfig(scale=args.scale)).eval().to(device)
    weights_mb = sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 1e6
    print(f"DiffRIR x{args.scale}, released sizes, random weights ({weights_mb:.0f} MB with the duplicated keys); "
          f"device {device}, {torch.get_num_threads()} CPU threads; tile {args.tile} px")
    # warm-up (allocator, kernels) on a small image, not timed
    run(net, args.scale, 128, None, device)
    run(net, args.scale, 128, 64, device)

    header = f"{'size':>10} {'mode':>7} {'seconds':>8} {'MP/s':>8} {'peak MB':>9} {'MB/MP':>7} {'est. MB':>8}"
    print(header)
    whole_points, tiled_points = [], []
    for side in args.sizes:
        mp = side * side / 1e6
        whole = None
        if args.skip_whole_above is None or side <= args.skip_whole_above:
            whole, w_s, w_peak = run(net, args.scale, side, None, device)
            whole_points.append((mp, w_peak))
            print(f"{side:>5}x{side:<4} {'whole':>7} {w_s:8.2f} {mp / w_s:8.4f} {w_peak / 1e6:9.0f} "
                  f"{w_peak / 1e6 / mp:7.0f} {estimate_memory(net, side, side) / 1e6:8.0f}")
        tiled, t_s, t_peak = run(net, args.scale, side, args.tile, device)
        tiled_points.append((mp, t_peak))
        line = (f"{side:>5}x{side:<4} {'tiled':>7} {t_s:8.2f} {mp / t_s:8.4f} {t_peak / 1e6:9.0f} "
                f"{t_peak / 1e6 / mp:7.0f} {estimate_memory(net, side, side, args.tile) / 1e6:8.0f}")
        if whole is not None:
            line += (f"   tiled/whole: time x{t_s / w_s:.2f}, memory x{t_peak / max(w_peak, 1):.2f}, "
                     f"max |diff| {(tiled - whole).abs().max().item():.1e}")
        print(line)
        del whole, tiled
        gc.collect()

    budget = args.budget_gb * 1e9 - weights_mb * 1e6
    for label, points in (("whole image", whole_points), (f"tiled ({args.tile} px)", tiled_points)):
        if len(points) < 2:
            print(f"{label}: run two or more sizes to fit memory per megapixel")
            continue
        if label.startswith("tiled") and min(mp for mp, _ in points) * 1e6 <= args.tile ** 2:
            print("(a size of at most one tile is in the tiled fit: its slope includes tile scratch)")
        intercept, slope = fit(points)
        max_mp = (budget - max(intercept, 0.0)) / slope if slope > 0 else float("inf")
        side = int(max_mp ** 0.5 * 1000)
        print(f"{label}: {slope / 1e6:.0f} MB per output MP (+{max(intercept, 0) / 1e6:.0f} MB); fits "
              f"{args.budget_gb:g} GB up to about {max_mp:.0f} MP ({side}x{side})")


if __name__ == "__main__":
    main()
