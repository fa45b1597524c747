"""Load run: hundreds of mixed prompts through ComfyUI's HTTP API, as a pipeline queues them, on tiny models.

Starts the real ComfyUI (the tests' host: LLMGA_HOST_VERSION, 0.33.0 unless set; --cpu, this pack linked in) on
the tiny models the tests use and queues N prompts at once that mix the shipped workflows at test size: text-to-image (SD1.5, Vicuna), inpainting +
DiffRIR (SD1.5 inpainting, Vicuna), similar-image (SDXL, Llama-3) and instruction editing (SD1.5, Vicuna,
the full-size VAE, 512²), every prompt with its own seed. It prints completed / failed / lost, the server's
RSS after warm-up and at the end, how often each model was loaded, per-prompt time percentiles (the server's
own timestamps) with the ratio to the same workflow run alone, and whether a changed sampler seed re-runs
only the sampler. Then it measures, per cache option of the host, how often alternating workflows reload the
SD checkpoint and the MLLM (baseline: the default cache).

    .venv-comfyui-0.33.0/bin/python bench/bench_load.py                         # 200 prompts, then the cache options (~10 min)
    .venv-comfyui-0.33.0/bin/python bench/bench_load.py --prompts 60 --edit-every 0 --alternating 12
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.host import (ONE_THREAD, ComfyServer, comfyui_dir, executed_nodes, model_loads,  # noqa: E402
                        models_base, process_rss_bytes, prompt_seconds, run_load, shipped_workflow)

MIX = {"t2i": "llmga_t2i_sd15", "inpaint+diffrir": "llmga_inpaint_sd15_diffrir", "similar": "llmga_similar_sdxl",
       "edit": "llmga_edit_sd15"}
ALTERNATING = ["llmga_t2i_sd15", "llmga_similar_sdxl", "llmga_inpaint_sd15_diffrir"]  # SD and MLLM change


def start_server(extra_args=()) -> ComfyServer:
    base = models_base(Path(tempfile.mkdtemp(prefix="llmga-load-")))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    inputs = base / "input"
    inputs.mkdir(exist_ok=True)
    for name in ("llmga_inpaint_example.png", "llmga_similar_example.png", "llmga_edit_example.png"):
        (inputs / name).write_bytes((Path(__file__).resolve().parents[1] / "workflows" / name).read_bytes())
    return ComfyServer(base, extra_args=extra_args, env=ONE_THREAD).start()


class RssPeak:
    """The server's peak RSS, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, process_rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def mixed_labels(prompts: int, edit_every: int) -> list[str]:
    cheap = [k for k in MIX if k != "edit"]
    labels, i = [], 0
    for n in range(prompts):
        if edit_every and n % edit_every == edit_every - 1:
            labels.append("edit")
        else:
            labels.append(cheap[i % len(cheap)])
            i += 1
    return labels


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def mb(n) -> str:
    return f"{n / 2**20:.0f} MB"


def main_run(args) -> None:
    labels = mixed_labels(args.prompts, args.edit_every)
    kinds = sorted(set(labels), key=list(MIX).index)
    server = start_server()
    try:
        seed = iter(range(1, 10**6))
        alone = {}
        for kind in kinds:  # warm-up: cold once, then once more alone = the baseline
            for _ in range(2):
                entry = server.run(shipped_workflow(MIX[kind], next(seed)), timeout=900)
                assert entry["status"]["status_str"] == "success", entry["status"]
            alone[kind] = prompt_seconds(entry)
        rss_warm = process_rss_bytes(server.proc.pid)
        peak = RssPeak(server.proc.pid)
        wall = time.perf_counter()
        result = run_load(server, [(kind, shipped_workflow(MIX[kind], next(seed))) for kind in labels],
                          timeout=args.timeout)
        wall = time.perf_counter() - wall
        peak_rss = peak.stop()
        rss_end = process_rss_bytes(server.proc.pid) if server.alive() else 0

        # a changed sampler seed: what re-runs?
        graph = shipped_workflow("llmga_t2i_sd15", next(seed))
        server.run(graph)
        sampler = next(n for n, node in graph.items() if node["class_type"] == "KSampler")
        graph[sampler]["inputs"]["seed"] = next(seed)
        again = server.run(graph)
        reran = sorted(graph[n]["class_type"] for n in executed_nodes(again))
        alive = server.alive()
    finally:
        server.stop()

    counts = Counter(labels)
    print(f"LLMGA load run: {len(labels)} prompts queued at once ("
          + ", ".join(f"{k} {counts[k]}" for k in kinds) + "), tiny models, ComfyUI --cpu, 1 OpenMP thread, "
          "default cache")
    print(f"  completed {len(result['completed'])}, failed {len(result['failed'])}, lost {len(result['lost'])}"
          f" (refused at /prompt: {result['refused']}); server alive afterwards: {alive}; wall {wall:.0f} s")
    for label, entry in result["failed"][:3]:
        print(f"    failed {label}: {entry['status']['messages'][-1]}")
    print(f"  server RSS: after warm-up {mb(rss_warm)}, at the end {mb(rss_end)} "
          f"({(rss_end - rss_warm) / 2**20:+.0f} MB), peak during the run {mb(peak_rss)}")
    loads = Counter(load for _, entry in result["completed"] + result["failed"] for load in model_loads(entry))
    print("  model loads during the run:")
    for (loader, name), n in sorted(loads.items()):
        print(f"    {n:4d}  {loader} {name}")
    times = [t for _, e in result["completed"] if (t := prompt_seconds(e)) is not None]
    print(f"  per-prompt time (s): p50 {percentile(times, 50):.2f}, p90 {percentile(times, 90):.2f}, "
          f"p99 {percentile(times, 99):.2f}, max {max(times):.2f}")
    for kind in kinds:
        own = [prompt_seconds(e) for label, e in result["completed"] if label == kind]
        p50 = statistics.median(own)
        print(f"    {kind:16s} p50 {p50:6.2f} s   alone, models cached {alone[kind]:6.2f} s   "
              f"ratio {p50 / alone[kind]:.2f}")
    only = reran == sorted(["KSampler", "VAEDecode", "SaveImage"])
    print(f"  a changed sampler seed re-ran: {', '.join(reran)}"
          + (" (the sampler and what follows it only)" if only else " (more than the sampler!)"))


def cache_options() -> list[tuple[str, list[str]]]:
    options = [("default (classic)", []), ("--cache-lru 64", ["--cache-lru", "64"]), ("--cache-none", ["--cache-none"])]
    if "--cache-ram" in (comfyui_dir() / "comfy" / "cli_args.py").read_text():  # newer hosts
        options.insert(2, ("--cache-ram", ["--cache-ram"]))
    return options


def cache_run(args) -> None:
    print(f"\nalternating {' -> '.join(ALTERNATING)} ({args.alternating} prompts, each its own seed), "
          f"loads per cache option (baseline: the default cache):")
    print(f"  {'option':18s} {'SD checkpoint':>13s} {'MLLM':>5s} {'DiffRIR':>7s} {'wall s':>7s} {'RSS end':>8s}"
          f"  vs default (SD+MLLM loads, wall)")
    baseline = None
    for title, flags in cache_options():
        server = start_server(flags)
        try:
            seed = iter(range(1, 10**6))
            for name in ALTERNATING:  # warm-up: every model loaded once
                server.run(shipped_workflow(name, next(seed)), timeout=900)
            wall = time.perf_counter()
            prompts = [(name, shipped_workflow(name, next(seed)))
                       for name in (ALTERNATING * args.alternating)[: args.alternating]]
            result = run_load(server, prompts, timeout=args.timeout)
            wall = time.perf_counter() - wall
            rss = process_rss_bytes(server.proc.pid)
        finally:
            server.stop()
        loads = Counter(loader for _, e in result["completed"] for loader, _ in model_loads(e))
        sd, mllm = loads["LLMGACheckpointLoader"], loads["LLMGAMLLMLoader"]
        baseline = baseline or (sd + mllm, wall)
        bad = len(result["failed"]) + len(result["lost"]) + result["refused"]
        print(f"  {title:18s} {sd:13d} {mllm:5d} {loads['DiffRIRLoader']:7d} {wall:7.1f} {mb(rss):>8s}"
              f"  ×{(sd + mllm) / max(baseline[0], 1):.2f}, ×{wall / baseline[1]:.2f}"
              + (f"  ({bad} not completed!)" if bad else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts in the mixed run")
    parser.add_argument("--edit-every", type=int, default=20,
                        help="every Nth prompt is an edit (512², full-size VAE: the slow one); 0 = no editing")
    parser.add_argument("--alternating", type=int, default=24, help="prompts per cache option")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    if args.prompts:
        main_run(args)
    if args.alternating:
        cache_run(args)


if __name__ == "__main__":
    main()
