"""Peak memory of one graph with the MLLM and a full-size SD UNet in a real ComfyUI server, per memory option.

The graph is the shipped text-to-image workflow: a random LLMGA MLLM of Qwen2-0.5B's real sizes (or 7B's with
--mllm 7b) writes the prompt, the long-prompt encoder and a full-size SD1.5 (or SDXL with --sd sdxl) pipeline
with random weights render it (1 step, small canvas: the weights dominate). Each option starts its own server
and runs the graph twice (the second run shows what stays resident), then POST /free.

On the CPU (default) it reports the server's peak RSS (VmHWM, reset per phase) and RSS after each step; the
baseline is ComfyUI's default, which keeps every loaded model (both stay resident, as on a GPU without
offloading), against --cache-none, which releases a model once its consumers have run. With --gpu (a machine
with CUDA) it starts ComfyUI on the GPU and reads the device's used memory from /system_stats while the graph
runs, for the default (offloading: the MLLM leaves the GPU when SD needs the room), --highvram (no offloading)
and --lowvram.

usage: .venv-comfyui-0.33.0/bin/python bench/bench_memory.py [--mllm 0.5b|7b] [--sd sd15|sdxl] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import host  # noqa: E402
from tests.fixtures.full_size_sd import full_size_folder  # noqa: E402
from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder  # noqa: E402



def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def graph(mllm: str, sd: str, sdxl: bool, seed: int) -> dict:
    workflow = json.loads((REPO / "workflows" / "api" / ("llmga_t2i_sdxl.json" if sdxl else "llmga_t2i_sd15.json"))
                          .read_text())
    for node in workflow.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LLMGAMLLMLoader":
            inputs["model_name"], inputs["dtype"] = mllm, "auto"
        elif kind == "LLMGACheckpointLoader":
            inputs["model_name"] = sd
        elif kind == "LLMGAPromptGenerator":
            inputs["max_new_tokens"], inputs["seed"] = 16, seed
        elif kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"], inputs["seed"] = 1, seed
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 128
    return workflow


class GpuWatch:
    """Samples the server's device memory in use (/system_stats) on a thread; keeps the maximum."""

    def __init__(self, server):
        self.server, self.peak, self.stop_flag = server, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def used(self) -> int:
        device = self.server.get("/system_stats")["devices"][0]
        return device["vram_total"] - device["vram_free"]

    def loop(self):
        while not self.stop_flag.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except OSError:
                pass
            time.sleep(0.05)

    def __enter__(self):
        self.peak = self.used()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join()


def measure(base: Path, option: list[str], args, mllm_name: str, sd_name: str) -> dict:
    server = host.ComfyServer(base, extra_args=option, env=None if args.gpu else host.ONE_THREAD, cpu=not args.gpu)
    server.start(timeout=600)
    try:
        pid, row = server.proc.pid, {}
        row["idle"] = status_kb(pid, "VmRSS") / 1024
        for run in (1, 2):
            reset_peak(pid)
            started = time.perf_counter()
            if args.gpu:
                with GpuWatch(server) as watch:
                    entry = server.run(graph(mllm_name, sd_name, args.sd == "sdxl", seed=run), timeout=3600)
                row[f"gpu peak {run}"] = watch.peak / 2**20
                row[f"gpu after {run}"] = GpuWatch(server).used() / 2**20
            else:
                entry = server.run(graph(mllm_name, sd_name, args.sd == "sdxl", seed=run), timeout=3600)
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"{option}: the graph failed:\n{server.log()[-3000:]}")
            row[f"seconds {run}"] = time.perf_counter() - started
            row[f"peak {run}"] = status_kb(pid, "VmHWM") / 1024
            row[f"after {run}"] = status_kb(pid, "VmRSS") / 1024
        server.free(unload_models=True, free_memory=True)
        time.sleep(5)
        row["after /free"] = status_kb(pid, "VmRSS") / 1024
        if args.gpu:
            row["gpu after /free"] = GpuWatch(server).used() / 2**20
        return row
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mllm", choices=list(QWEN2_SIZES), default="0.5b")
    parser.add_argument("--sd", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--gpu", action="store_true", help="run ComfyUI on the GPU (needs CUDA)")
    args = parser.parse_args()
    options = ([["--normalvram"], ["--highvram"], ["--lowvram"]] if args.gpu else [[], ["--cache-none"]])

    tmp = Path(tempfile.mkdtemp(prefix="llmga-bench-memory-"))
    try:
        started = time.perf_counter()
        base = host.models_base(tmp / "base")
        mllm_name = f"llmga-Qwen2-{args.mllm}-sized-random"
        make_mllm_folder(base / "models" / "LLM", "qwen2", name=mllm_name, sizes=QWEN2_SIZES[args.mllm])
        sd_folder = full_size_folder(args.sd)
        sd_name = sd_folder.name
        (base / "models" / "diffusers" / sd_name).symlink_to(sd_folder, target_is_directory=True)
        print(f"models: random Qwen2-{args.mllm}-sized LLMGA MLLM (tiny vision tower; the real CLIP ViT-L/336 adds "
              f"0.3 B parameters), full-size random {args.sd} folder; built in {time.perf_counter() - started:.0f} s")
        rows = {}
        for option in options:
            label = " ".join(option) or "default cache"
            rows[label] = measure(base, option, args, mllm_name, sd_name)
            print(label, {k: round(v, 1) for k, v in rows[label].items()}, flush=True)
        baseline = rows[next(iter(rows))]
        print()
        unit = "MB (RSS)"
        print(f"| option | idle {unit} | peak run 1 | after run 1 | peak run 2 | after /free | peak ÷ baseline |")
        print("|---|---|---|---|---|---|---|")
        for label, row in rows.items():
            print(f"| {label} | {row['idle']:.0f} | {row['peak 1']:.0f} | {row['after 1']:.0f} | {row['peak 2']:.0f} | "
                  f"{row['after /free']:.0f} | {row['peak 1'] / baseline['peak 1']:.2f} |")
        if args.gpu:
            print("\n| option | GPU peak run 1 MB | GPU after run 1 | GPU peak run 2 | GPU after /free |")
            print("|---|---|---|---|---|")
            for label, row in rows.items():
                print(f"| {label} | {row['gpu peak 1']:.0f} | {row['gpu after 1']:.0f} | {row['gpu peak 2']:.0f} | "
                      f"{row['gpu after /free']:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
