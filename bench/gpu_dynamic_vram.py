"""GPU check: with ComfyUI 0.33's dynamic VRAM on, does SDXL push the pack's MLLM off the GPU, does the next
MLLM run load it back, and does "free memory" (POST /free) release it?

Each variant runs in its own process, which starts the host the way main.py does (the cudaMallocAsync choice
of cuda_malloc.py, comfy-aimdo's init before torch, init_devices, CoreModelPatcher rebound to
ModelPatcherDynamic) and then, in the host's own functions:
  1. MLLM run: an MLLM-sized model of plain torch Linear layers (like the transformers MLLM) behind the
     patcher, load_models_gpu([patcher], memory_required=..., force_full_load=True) as the Prompt Generator
     node does, one forward pass;
  2. SDXL run: the host's SDXL UNet at full size (comfy.supported_models.SDXL, fp16, as comfy/sd.py builds it:
     CoreModelPatcher, initial load device) sampled with comfy.sample.sample (the KSampler's path);
  3. MLLM run again (same output as in 1?);
  4. unload_all_models(), what POST /free does (main.py).
After each step it records how many of the MLLM's bytes are on the GPU, whether the host still lists it, and
the device's peak use (torch.cuda.mem_get_info, sampled every 5 ms: aimdo's VBARs are outside torch's stats).

A ballast tensor leaves --card-gb of the GPU free, so a big GPU behaves like a 16 GB card (default) on which a
12 GB MLLM and SDXL do not fit together. Variants:
  pack          the MLLM behind the pack's patcher (nodes/memory.py model_patcher): expected to be pushed off by
                SDXL, loaded back whole, freed by unload_all_models; the exit status says whether it was.
  host-dynamic  the MLLM behind the host's CoreModelPatcher (ModelPatcherDynamic): shows why the pack does not
                use it for plain torch layers (expected: it stays on the GPU while SDXL samples). Informative.
  legacy        the pack's patcher with --disable-dynamic-vram: the estimate-based manager, for comparison.

usage: LLMGA_COMFYUI_DIR=~/.cache/llmga-comfyui/ComfyUI-0.33.0 .venv-comfyui-0.33.0/bin/python \\
           bench/gpu_dynamic_vram.py [--mllm-gb 12] [--card-gb 16] [--size 1024] [--steps 2] [--variants ...]
       --cpu-smoke: the same steps under --cpu at tiny sizes (checks that the script runs; no verdict)
Exit status: 0 the pack variant passed, 1 it did not, 2 refused (no CUDA GPU).
bench/gpu_check.py runs it as its "memory" part (run_variants), with the other GPU checks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3
VARIANTS = ("pack", "host-dynamic", "legacy")


def cuda_available() -> bool:
    """Asked in a child process, so this process starts CUDA only after comfy-aimdo (as main.py does)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main_py_supports_dynamic_vram(mm) -> bool:
    """main.py dynamic_vram_supported() and its torch >= 2.8 condition."""
    supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0, 0)) >= (7, 14))
    return supported and mm.torch_version_numeric >= (2, 8)


def start_host(*, cpu: bool, dynamic_vram: bool) -> dict:
    """Imports the host in this process as main.py starts it (ComfyUI 0.33: main.py top and the block that
    rebinds comfy.model_patcher.CoreModelPatcher); on 0.3.64 only the legacy manager exists."""
    sys.path.insert(0, str(REPO))
    from tests.host import comfyui_dir

    sys.path.insert(0, str(comfyui_dir()))
    import comfy.options  # noqa: F401  (args_parsing stays off: the defaults of `python main.py`)
    from comfy import cli_args

    cli_args.args.cpu = cpu
    if not dynamic_vram and hasattr(cli_args.args, "disable_dynamic_vram"):
        cli_args.args.disable_dynamic_vram = True
    if not cpu:
        import cuda_malloc  # noqa: F401  (main.py: picks the cudaMallocAsync backend before torch starts CUDA)
    aimdo = None
    if getattr(cli_args, "enables_dynamic_vram", lambda: False)():
        import comfy_aimdo.control as aimdo
        for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
            try:
                aimdo.init(**kwargs)
                break
            except TypeError:  # older comfy-aimdo protocols, as main.py falls back
                continue
    import comfy.model_management as mm
    import comfy.model_patcher

    enabled = False
    if aimdo is not None and main_py_supports_dynamic_vram(mm):
        devices = mm.get_all_torch_devices()
        try:
            enabled = aimdo.init_devices((d.index, 0) for d in devices)
        except TypeError:
            enabled = aimdo.init_devices(d.index for d in devices)
        if enabled:
            import comfy.memory_management

            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
    return {"host": str(comfyui_dir()), "dynamic_vram": enabled, "device": str(mm.get_torch_device()),
            "core_patcher": getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher).__name__}


def pack_memory_module():
    """nodes/memory.py by path (it imports only comfy.model_patcher and torch), as the MLLM loader uses it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmga_nodes_memory", REPO / "nodes" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_mllm(gib: float, width: int):
    """An MLLM-sized stack of plain torch Linear layers (fp16), like the transformers model, filled cheaply with a
    seeded pattern so a forward pass shows whether the weights survived the trip to the CPU and back."""
    import torch

    class PlainMLLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            count = max(1, round(gib * GiB / (width * width * 2)))
            self.layers = torch.nn.ModuleList(torch.nn.utils.skip_init(torch.nn.Linear, width, width, bias=False,
                                                                       dtype=torch.float16) for _ in range(count))
            base = torch.randn(width, width, generator=torch.Generator().manual_seed(0)).half() / width ** 0.5
            with torch.no_grad():
                for i, layer in enumerate(self.layers):
                    layer.weight.copy_(base.roll(i, dims=1))

        def forward(self, x):
            for layer in self.layers:
                x = torch.nn.functional.layer_norm(layer(x), (width,))
            return x

    return PlainMLLM().eval()


def sdxl_unet(full_size: bool):
    """The host's SDXL UNet (fp16) with its patcher, built as comfy/sd.py load_diffusion_model_state_dict does;
    weights zeroed (their values do not matter here). Returns (patcher, context width, pooled width)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from llmga_core.checkpoints import ldm_unet_config

    if full_size:
        from tests.fixtures.full_size_sd import SDXL_UNET as diffusers_config
    else:
        from tests.fixtures.tiny_sd import UNET_CONFIGS

        diffusers_config = dict(UNET_CONFIGS["sdxl"], in_channels=4)
    ldm = ldm_unet_config(diffusers_config)
    config = comfy.supported_models.SDXL(ldm)
    config.unet_config["num_heads"] = ldm["num_heads"]  # as nodes/checkpoints.py: the folder's head layout
    config.unet_config["num_head_channels"] = ldm["num_head_channels"]
    dtype = torch.float16 if not mm.cpu_mode() else torch.float32
    config.set_inference_dtype(dtype, None)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    model = config.get_model({}, "", device=mm.unet_inital_load_device(2_567_000_000, dtype))
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()
    factory = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = factory(model, load_device=load_device, offload_device=offload_device)
    return patcher, ldm["context_dim"], ldm["adm_in_channels"] - 6 * 256


class PeakWatch:
    """The device's used memory (total - free), sampled every 5 ms on a thread."""

    def __init__(self):
        import torch

        self.torch, self.peak, self.stop_flag = torch, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def loop(self):
        while not self.stop_flag.wait(0.005):
            self.peak = max(self.peak, self.used())

    def take_peak(self) -> int:
        peak, self.peak = max(self.peak, self.used()), 0
        return peak

    def stop(self):
        self.stop_flag.set()
        self.thread.join()


def run_variant(variant: str, *, mllm_gb: float, card_gb: float, size: int, steps: int, smoke: bool) -> dict:
    """Steps 1-4 of the module docstring in this process; returns what was seen after each."""
    info = start_host(cpu=smoke, dynamic_vram=variant != "legacy")
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample

    device = mm.get_torch_device()
    gpu = device.type == "cuda"
    result = {"variant": variant, **info, "mllm_gb": mllm_gb, "card_gb": card_gb, "phases": []}
    if gpu:
        result["gpu"] = torch.cuda.get_device_name(device)
    ballast = None
    if gpu and card_gb > 0:
        free, _ = torch.cuda.mem_get_info(device)
        spare = free - int(card_gb * GiB)
        if spare > 0:
            ballast = torch.empty(spare, dtype=torch.uint8, device=device)
        result["ballast_gb"] = round(spare / GiB, 2) if spare > 0 else 0
    watch = PeakWatch() if gpu else None

    mllm = plain_mllm(mllm_gb, 8192 if not smoke else 256)
    mllm_size = sum(p.numel() * p.element_size() for p in mllm.parameters())
    load, offload = device, mm.text_encoder_offload_device()  # the MLLM loader's devices (nodes/mllm.py)
    if variant == "host-dynamic":
        factory = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        mllm_patcher = factory(mllm, load_device=load, offload_device=offload, size=mllm_size)
    else:
        mllm_patcher = pack_memory_module().model_patcher(mllm, load, offload, size=mllm_size)
    unet, context_width, pooled_width = sdxl_unet(full_size=not smoke)
    result["mllm_patcher"] = type(mllm_patcher).__name__
    result["sdxl_patcher"] = type(unet).__name__
    result["mllm_bytes"] = mllm_size
    probe = torch.randn(1, mllm.layers[0].in_features, generator=torch.Generator().manual_seed(1)).half()

    def listed(patcher) -> bool:
        return any(lm.model is patcher for lm in mm.current_loaded_models)

    def record(phase: str, seconds: float, **extra) -> dict:
        on_gpu = sum(p.numel() * p.element_size() for p in mllm.parameters() if p.device.type != "cpu")
        entry = {"phase": phase, "seconds": round(seconds, 2), "mllm_on_device": on_gpu,
                 "mllm_listed": listed(mllm_patcher), "mllm_loaded_size": mllm_patcher.loaded_size(),
                 "sdxl_listed": listed(unet), "sdxl_loaded_size": unet.loaded_size(), **extra}
        if watch is not None:
            entry["device_used"] = watch.used()
            entry["device_peak"] = watch.take_peak()
        result["phases"].append(entry)
        print(json.dumps(entry), flush=True)
        return entry

    def mllm_run():
        start = time.perf_counter()
        mm.load_models_gpu([mllm_patcher], memory_required=512 * 1024 ** 2, force_full_load=True)
        with torch.inference_mode():
            out = mllm(probe.to(device, mllm.layers[0].weight.dtype)).float().cpu()
        if gpu:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    first, seconds = mllm_run()
    record("mllm", seconds)

    latent = torch.zeros(1, 4, size // 8, size // 8)
    cond = [[torch.zeros(1, 77, context_width), {"pooled_output": torch.zeros(1, pooled_width),
                                                 "width": size, "height": size}]]
    start, error = time.perf_counter(), None
    try:
        with torch.inference_mode():
            comfy.sample.sample(unet, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "normal", cond,
                                cond, latent, seed=0, disable_pbar=True)
        if gpu:
            torch.cuda.synchronize(device)
    except Exception as e:  # an out-of-memory here is a finding (host-dynamic), not a crash of the check
        error = f"{type(e).__name__}: {str(e)[:300]}"
        mm.soft_empty_cache()
    record("sdxl", time.perf_counter() - start, error=error)

    again, seconds = mllm_run()
    record("mllm again", seconds, same_output=bool(torch.equal(first, again)))

    start = time.perf_counter()
    mm.unload_all_models()  # POST /free (main.py prompt_worker: unload_models)
    mm.soft_empty_cache()
    record("free", time.perf_counter() - start)
    if watch is not None:
        watch.stop()
    del ballast
    result["verdict"] = verdict(result) if not smoke else None
    return result


def verdict(result: dict) -> dict:
    """What the pack needs from the host's manager (for the pack and legacy variants)."""
    mllm, sdxl, again, freed = result["phases"]
    size = result["mllm_bytes"]
    checks = {
        "mllm loaded whole": mllm["mllm_on_device"] == size,
        "sdxl sampled": sdxl["error"] is None,
        "mllm pushed off for sdxl": sdxl["mllm_on_device"] < size,
        "mllm loaded back whole": again["mllm_on_device"] == size and again["mllm_listed"],
        "mllm output unchanged": again["same_output"],
        "free released it": freed["mllm_on_device"] == 0 and not freed["mllm_listed"]
                            and again["device_used"] - freed["device_used"] > 0.9 * size,
    }
    return {"passed": all(checks.values()), **checks}


def run_variants(variants, *, mllm_gb: float, card_gb: float, size: int, steps: int, smoke: bool,
                 timeout: float | None = None, on_result=None, log=print) -> list[dict]:
    """Each variant in its own process (steps 1-4 there); returns their results in order. A variant that fails or
    outlasts `timeout` seconds gives {"variant", "failed"} (and "output": the end of what it printed).
    on_result(result) after each variant (bench/gpu_check.py saves there as it goes)."""
    results = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--mllm-gb", str(mllm_gb), "--card-gb", str(card_gb),
               "--size", str(size), "--steps", str(steps), *(["--cpu-smoke"] if smoke else [])]
        log(f"== {variant}")
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or b"")[-3000:], (expired.stderr or b"")[-3000:]
            results.append({"variant": variant, "failed": f"timed out after {timeout:.0f} s",
                            "output": "".join(o.decode(errors="replace") if isinstance(o, bytes) else o
                                              for o in output)})
        else:
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                log(proc.stdout[-3000:] + proc.stderr[-6000:])
                results.append({"variant": variant, "failed": f"exit status {proc.returncode}",
                                "output": proc.stderr[-3000:]})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
                log(json.dumps(results[-1], indent=1))
        if on_result is not None:
            on_result(results[-1])
    return results


def summary(results: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("variant", "dynamic_vram", "mllm_patcher", "verdict", "failed")} for r in results]


def pack_passed(results: list[dict]) -> bool:
    """Whether the pack variant ran and passed its verdict (the exit status of a GPU run)."""
    pack = next((r for r in results if r["variant"] == "pack"), None)
    return pack is not None and bool((pack.get("verdict") or {}).get("passed"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mllm-gb", type=float, default=12.0, help="size of the MLLM stand-in (fp16 GiB)")
    parser.add_argument("--card-gb", type=float, default=16.0,
                        help="GiB left free for the run (a ballast takes the rest); 0: the whole GPU")
    parser.add_argument("--size", type=int, default=1024, help="SDXL image side")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--cpu-smoke", action="store_true", help="run the steps under --cpu at tiny sizes")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = dict(mllm_gb=0.02 if args.cpu_smoke else args.mllm_gb, card_gb=args.card_gb,
                 size=64 if args.cpu_smoke else args.size, steps=1 if args.cpu_smoke else args.steps,
                 smoke=args.cpu_smoke)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, **sizes)), flush=True)
        return 0
    if not args.cpu_smoke and not cuda_available():
        print("gpu_dynamic_vram: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.",
              file=sys.stderr)
        return 2
    results = run_variants(args.variants, mllm_gb=args.mllm_gb, card_gb=args.card_gb, size=args.size,
                           steps=args.steps, smoke=args.cpu_smoke, log=lambda text: print(text, flush=True))
    print("SUMMARY " + json.dumps(summary(results)))
    if args.cpu_smoke:
        return 0 if all("failed" not in r for r in results) else 1
    return 0 if pack_passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
