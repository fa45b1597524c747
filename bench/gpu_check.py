"""The pack's GPU checks as one command: independent parts, each in its own process with its own time limit, written
to DIR/gpu_check.json (everything), DIR/gpu_check.txt (a short table) and DIR/gpu_check.log (the parts' output)
after every part, so a run cut short keeps what finished. Run from the repository root:

    python -m bench.gpu_check --out DIR             # CUDA: at most --budget 450 s with model building (7-8 min
                                                    # expected on one H100, not measured yet)
    python -m bench.gpu_check --out DIR --parts decode-7b-bfloat16 decode-0.5b-bfloat16     # some parts only
    python -m bench.gpu_check --dry-run --out DIR   # CPU, tiny sizes, about a minute (tests/test_gpu_check.py)

Parts, in this order (random weights at the real sizes, drawn on the device; nothing is downloaded):
  decode-{7b,0.5b}-float16, later -bfloat16: a random LLMGA MLLM of Qwen2-7B's / Qwen2-0.5B's sizes
      (tests/fixtures/tiny_mllm.py QWEN2_SIZES) through load_mllm, 64 new tokens. Contenders: the pack's
      decoders (llmga_core/mllm/fast_decode.py: LLMGAMLLM.decoder "auto", "dynamic", and in float16 also
      "compiled" and "static") and transformers `generate` (eager; in float16 also static cache + torch.compile;
      --all-contenders: every contender in bfloat16 too). Per contender: tokens/s (median of up to 3 rounds),
      % of the bound (bench_mllm.memory_bandwidth ÷ weight bytes per token), greedy tokens agreeing with the
      dynamic loop, compile time (first call − median), CUDA-graph capture time; the pack's fallback log lines.
      Cancel latency of "auto" and "dynamic": another thread asks, on_token raises; the time from the ask to
      generate's return and to the device being idle.
  diffrir: DiffRIR at the released sizes, tiled (512 px), at 1024², 2048², 4096² in float32 without TF32 (the
      reference), float32 (cuDNN's TF32 default), float16, bfloat16: megapixels/s, peak memory, max |Δ|
      (bench_diffrir.run).
  editing: LLMGA editing on SD1.5's UNet layout (random, built on the device), 512², 50 steps, in float32, float16,
      bfloat16: seconds per phase and against img2img, mask agreement and max |Δ| against float32 (bench_editing's
      functions; needs diffusers).
  quantization: a random Qwen2-0.5B-sized MLLM loaded with quantization "int8" (the pack's) / "8bit" / "4bit"
      (bitsandbytes) against float16:
      LM weight bytes, tokens/s, next-token agreement over the float16 answer (bench_quantization's functions).
  memory: bench/gpu_dynamic_vram.py's variants (pack, host-dynamic, legacy): whether SDXL pushes the MLLM off the GPU
      under ComfyUI 0.33's dynamic VRAM with a 16 GB card cap (needs the ComfyUI host, comfy_aimdo, comfy_kitchen,
      torchsde).
A part whose modules are missing says "not run: <module> missing"; a failure inside a part is recorded in its
"errors" and the part goes on; a part that crashes or outlasts its limit is recorded with the end of its output;
a part the budget leaves no time for says "not run: out of time" (run it with --parts).
--dry-run: device cpu, tiny sizes, decode in float16 only, a few tokens, TORCHDYNAMO_DISABLE=1 (the compiled steps
run uncompiled), memory as gpu_dynamic_vram --cpu-smoke with the pack variant only. Exit status: 0 when every part
ran or was not run, 1 when one crashed or timed out, 2 without a CUDA GPU (and no --dry-run).

The GPU machines lent to this project have Python 3.12, torch 2.11 (CUDA 13.0) and transformers 5.17, but not
diffusers, bitsandbytes, ComfyUI or its packages, and no network. Pack those from this checkout's venv into an
ignored folder (.gitignore's bench/out/; at most 64 MiB travel per call, the working tree included):

    .venv-comfyui-0.33.0/bin/python -m bench.gpu_check --pack-carry bench/out/gpu_carry

(carry.tar.gz, about 15 MiB: diffusers, importlib_metadata, bitsandbytes with only its CUDA 13.0 and CPU
libraries, comfy_aimdo, comfy_kitchen without its compiled extensions (optional to it), torchsde, trampoline, and
the ComfyUI host without its tests.) There, with that folder carried:

    python3 -m bench.gpu_check --carry bench/out/gpu_carry --out $OUT

unpacks it under /tmp and gives it to the parts (PYTHONPATH, LLMGA_COMFYUI_DIR).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
CARRY_ARCHIVE = "carry.tar.gz"


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """What a run measures: the GPU run's sizes, or the dry run's tiny ones."""

    dry_run: bool
    device: str
    sizes: tuple = ("7b", "0.5b")  # decode: QWEN2_SIZES keys, or "tiny" (the test fixture's own sizes)
    dtypes: tuple = ("float16", "bfloat16")
    every_decoder: tuple = ("float16",)  # dtypes in which "compiled", "static" and transformers' static cache +
    # torch.compile also run (the others: "auto", "dynamic" and transformers eager)
    new_tokens: int = 64
    rounds: int = 3
    round_seconds: float = 6.0  # fewer rounds for a contender whose rounds would take longer (at least one)
    cancel_trials: int = 2
    quant_size: str = "0.5b"
    quant_tokens: int = 32
    diffrir_sizes: tuple = (1024, 2048, 4096)
    diffrir_tile: int = 512
    diffrir_config: dict = field(default_factory=dict)  # DiffRIRConfig's released sizes, or tiny widths
    edit_width: int = 320  # SD1.5's UNet
    edit_size: int = 512
    edit_steps: int = 50
    memory: dict = field(default_factory=lambda: dict(mllm_gb=12.0, card_gb=16.0, size=1024, steps=2,
                                                      variants=("pack", "host-dynamic", "legacy")))

    @staticmethod
    def make(dry_run: bool, all_contenders: bool = False) -> "Settings":
        every = {"every_decoder": ("float16", "bfloat16")} if all_contenders else {}
        if not dry_run:
            return Settings(dry_run=False, device="cuda", **every)
        return Settings(dry_run=True, device="cpu", **every, sizes=("tiny",), dtypes=("float16",), new_tokens=8,
                        rounds=1, cancel_trials=1,
                        quant_size="tiny", quant_tokens=8, diffrir_sizes=(64, 96), diffrir_tile=32,
                        diffrir_config=dict(dim=8, ffn_hidden=(17, 35, 70, 140), prior_feats=8), edit_width=32,
                        edit_size=64, edit_steps=3,
                        memory=dict(mllm_gb=0.02, card_gb=16.0, size=64, steps=1, variants=("pack",)))


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable  # run(result, settings, **args) in the part's own process
    limit: float  # seconds on the GPU
    dry_limit: float  # seconds in the dry run
    needs: tuple = ()  # modules that must be importable
    host: bool = False  # needs the ComfyUI host
    args: dict = field(default_factory=dict)


def parts_for(settings: Settings) -> list[Part]:
    """The parts in the order they run: decode in the first dtype (float16: every contender), the other parts, then
    decode in the other dtypes (bfloat16), which a tight --budget leaves for a second call (--parts)."""
    def decode(size, dtype):
        limit = {"7b": 150, "0.5b": 120}.get(size, 60) * (1.0 if dtype in settings.every_decoder else 0.55)
        return Part(f"decode-{size}-{dtype}", part_decode, limit, 45, needs=("transformers",),
                    args=dict(size=size, dtype=dtype))

    first = [decode(size, settings.dtypes[0]) for size in settings.sizes]
    rest = [decode(size, dtype) for dtype in settings.dtypes[1:] for size in settings.sizes]
    return first + [
        Part("diffrir", part_diffrir, 50, 30),
        Part("editing", part_editing, 45, 30, needs=("diffusers",)),
        Part("quantization", part_quantization, 80, 40, needs=("transformers", "bitsandbytes")),
        Part("memory", part_memory, 100, 45, needs=("comfy_aimdo", "comfy_kitchen", "torchsde"), host=True),
    ] + rest


# ------------------------------------------------------------------------------------- in the part's process
class Result(dict):
    """A part's findings, saved to its file whenever they grow, so a part stopped at its limit keeps them."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)

    def error(self, where: str, error: BaseException) -> str:
        """Records a failure inside the part (a finding: the part goes on); returns its one-line form."""
        traceback.print_exc()
        text = _short(error)
        self.setdefault("errors", []).append(f"{where}: {text}")
        self.save()
        return text


class _Hide:
    """An import hook that makes modules look missing (--hide: the device machine's view, for the tests)."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by --hide)", name=name)
        return None


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _now() -> float:
    return time.perf_counter()


def _median(values):
    return statistics.median(values) if values else None


class _Warnings:
    """The pack's log lines of WARNING and above (a decoder's fallback, a failed CUDA-graph capture)."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.lines.append(record.getMessage()[:400])
        logging.getLogger("llmga").addHandler(self.handler)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


# ---------------------------------------------------------------------------------------------- decode
@contextlib.contextmanager
def weights_drawn_on(device, seed: int = 0, std: float = 0.02):
    """load_mllm with its language model and projector built on `device` and filled there with seeded random
    weights (norms near 1, biases small, the rest N(0, std)), instead of read from the folder: a 7B-sized model
    in seconds, without writing 15 GB. Everything else (tokenizer, template, vocabulary shrink, vision tower) is
    load_mllm's own."""
    import torch
    from llmga_core.mllm import load_mllm

    module = sys.modules[load_mllm.__module__]
    names = ("build_language_model", "build_projector", "load_weights")
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"{module.__name__} no longer uses {', '.join(missing)}; update weights_drawn_on")
    saved = {name: getattr(module, name) for name in names}

    def build_language_model(config, dtype):
        with torch.device(device):
            return saved["build_language_model"](config, dtype)

    def build_projector(config, hidden_size, dtype):
        with torch.device(device):
            return saved["build_projector"](config, hidden_size, dtype)

    def load_weights(files, language_model, projector, *, tied, on_loaded=None):
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for prefix, part in (("", language_model), ("model.mm_projector.", projector)):
                for name, parameter in part.named_parameters():
                    if "norm" in name and name.endswith("weight"):
                        parameter.normal_(1.0, 0.1, generator=generator)
                    elif name.endswith("bias"):
                        parameter.normal_(0.0, 0.1, generator=generator)
                    else:
                        parameter.normal_(0.0, std, generator=generator)
                    if on_loaded is not None:
                        on_loaded(prefix + name)
        if tied:
            language_model.tie_weights()

    replaced = {"build_language_model": build_language_model, "build_projector": build_projector,
                "load_weights": load_weights}
    for name, value in replaced.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def random_mllm(root: Path, size: str, device, dtype):
    """An LLMGA Qwen2 MLLM at QWEN2_SIZES[size] (or the test fixture's tiny sizes) with weights drawn on the device,
    loaded through load_mllm: the fixture writes the folder (tokenizer padded to the release's 151646 entries,
    config.json) with tiny weights, config.json gets the real sizes, and the weights are drawn, not read."""
    from llmga_core.mllm import load_mllm
    from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder, make_vision_tower

    sizes = dict(QWEN2_SIZES[size]) if size != "tiny" else {}
    tokenizer_size = sizes.pop("tokenizer_size", None)
    folder = make_mllm_folder(root, "qwen2", sizes={"tokenizer_size": tokenizer_size} if tokenizer_size else None)
    make_vision_tower(root / "clip-vit-large-patch14-336")
    if sizes:
        config = json.loads((folder / "config.json").read_text())
        config.update(sizes)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    with weights_drawn_on(device, std=0.5 if size == "tiny" else 0.02):  # the fixture's scales
        return load_mllm(folder, device=device, dtype=dtype)


class _Cancelled(Exception):
    pass


def cancel_latency(run, delay: float, tokens: int, device) -> dict:
    """Cancel as ComfyUI does it: another thread sets a flag `delay` s after the first token, on_token raises
    when it sees it. Returns the seconds from the flag to generate's return and to the device being idle."""
    from bench.bench_mllm import synchronize

    state = {"asked": None, "timer": None, "tokens": 0}

    def ask():
        state["asked"] = _now()

    def on_token(step, token_id):
        state["tokens"] = step
        if state["asked"] is not None:
            raise _Cancelled()
        if state["timer"] is None:
            state["timer"] = threading.Timer(delay, ask)
            state["timer"].start()

    try:
        run(tokens, on_token)
    except _Cancelled:
        returned = _now()
        synchronize(device)
        idle = _now()
        return {"delay_s": round(delay, 4), "latency_s": returned - state["asked"], "idle_s": idle - state["asked"],
                "tokens_before_return": state["tokens"]}
    finally:
        if state["timer"] is not None:
            state["timer"].cancel()
    return {"delay_s": round(delay, 4), "latency_s": None,
            "note": f"the answer ended ({state['tokens']} tokens) before the request"}


def part_decode(result: Result, settings: Settings, size: str, dtype: str) -> None:
    import torch
    from bench.bench_mllm import PROMPT, bytes_per_token, memory_bandwidth, synchronize
    from llmga_core.mllm import fast_decode
    from llmga_core.mllm.tokenization import tokenizer_image_token

    device, torch_dtype = torch.device(settings.device), getattr(torch, dtype)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    n, rounds = settings.new_tokens, settings.rounds
    warnings = _Warnings()
    result.update(size=size, dtype=dtype, device=str(device), new_tokens=n, rounds=rounds, contenders={},
                  cancel={})
    started = _now()
    with tempfile.TemporaryDirectory(prefix="llmga-gpu-check-") as tmp:
        mllm = random_mllm(Path(tmp), size, device, torch_dtype)
    synchronize(device)
    lm = mllm.model.language_model
    weight_bytes = bytes_per_token(lm)
    copy_rate, read_rate = memory_bandwidth(device)
    bound = max(copy_rate, read_rate) / weight_bytes
    prompt = mllm.new_conversation().prompt("Generate an image based on given keywords. " + PROMPT)
    prompt_ids = tokenizer_image_token(prompt, mllm.tokenizer)
    embeds = mllm._input_embeddings(prompt_ids, None, [])
    eos, penalty = list(mllm._sampling.eos_ids), mllm._sampling.repetition_penalty
    auto_compiles = fast_decode._plan(lm, device, torch_dtype, "auto", None).compiled
    result.update(build_s=_now() - started, weight_bytes_per_token=weight_bytes, copy_GBps=copy_rate / 1e9,
                  sum_GBps=read_rate / 1e9, bound_tokens_per_s=bound, prompt_positions=len(prompt_ids),
                  auto_picks="compiled" if auto_compiles else "static",
                  torch=torch.__version__, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    result.save()

    captures: list[float] = []

    class TimedGraphStep(fast_decode._GraphStep):  # the per-request CUDA-graph capture, timed
        def __init__(self, *args, **kwargs):
            begin = _now()
            super().__init__(*args, **kwargs)
            torch.cuda.synchronize()
            captures.append(_now() - begin)

    fast_decode._GraphStep = TimedGraphStep

    def pack(decoder):
        def run(tokens, on_token=None):
            mllm.decoder = decoder
            return mllm.generate(PROMPT, task="text-to-image", max_new_tokens=tokens, on_token=on_token).token_ids
        return run

    def transformers_generate(static: bool):  # bench_mllm.py's contender
        from bench.bench_mllm import transformers_generate as contender

        return contender(lm, embeds, eos, penalty, static=static)

    ids: dict[str, list[int]] = {}
    reference = "pack dynamic"

    def agreement():
        if reference not in ids:
            return
        for name, entry in result["contenders"].items():
            if name in ids:
                mine, theirs = ids[name], ids[reference]
                agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
                entry.update(greedy_agree=agree, greedy_of=len(theirs), greedy_all=agree == len(mine) == len(theirs))

    def measure(name, run, kind):
        entry = result["contenders"][name] = {"kind": kind}
        captures.clear()
        try:
            run(1)
            synchronize(device)
            begin = _now()
            ids[name] = run(n)
            synchronize(device)
            first = _now() - begin
            rates, fulls = [], []
            for _ in range(max(1, min(rounds, int(settings.round_seconds / max(first, 1e-3))))):
                times = {}
                for tokens in (1, n):
                    synchronize(device)
                    begin = _now()
                    out = run(tokens)
                    synchronize(device)
                    times[tokens] = _now() - begin
                ids[name] = out
                fulls.append(times[n])
                if len(out) > 1 and times[n] > times[1]:  # else too short to time (a tiny model's early end)
                    rates.append((len(out) - 1) / (times[n] - times[1]))
            rate = _median(rates)
            entry.update(tokens_per_s=rate, pct_bound=None if rate is None else 100 * rate / bound, first_call_s=first,
                         compile_s=max(first - _median(fulls), 0.0), tokens=len(ids[name]), rounds=len(fulls),
                         capture_s=_median(captures))
        except Exception as error:
            entry["error"] = result.error(name, error)
        entry["log"] = warnings.take()
        pack_rate = result["contenders"].get("pack auto", {}).get("tokens_per_s")
        for other in result["contenders"].values():
            if pack_rate and other.get("tokens_per_s"):
                other["x_pack_auto"] = other["tokens_per_s"] / pack_rate
        agreement()
        result["compile_failures"] = {" ".join(map(str, key)): reason
                                      for key, reason in fast_decode._compile_failures.items()}
        result.save()
        print(f"{name}: {json.dumps(entry, default=str)}", flush=True)

    pack_contenders = {"pack auto": pack("auto"), "pack dynamic": pack("dynamic")}
    measure("pack auto", pack_contenders["pack auto"], f"pack, decoder auto ({result['auto_picks']})")
    measure("pack dynamic", pack_contenders["pack dynamic"], "pack, decoder dynamic (the old loop)")
    measure("transformers eager", transformers_generate(False), "transformers generate, dynamic cache, eager")

    # Cancel: within the request's cache bucket, so the compiled step is not compiled again for a new shape
    tokens = max(n, -(-(len(prompt_ids) + n) // fast_decode.BUCKET) * fast_decode.BUCKET - len(prompt_ids) - 1)
    for decoder in ("auto", "dynamic"):
        rate = result["contenders"][f"pack {decoder}"].get("tokens_per_s")
        if not rate:
            continue
        trials = []
        for trial in range(settings.cancel_trials):
            delay = (0.35 + 0.3 * trial) * n / rate
            try:
                trials.append(cancel_latency(pack_contenders[f"pack {decoder}"], delay, tokens, device))
            except Exception as error:
                trials.append({"error": result.error(f"cancel, decoder {decoder}", error)})
        latencies = [t["latency_s"] for t in trials if t.get("latency_s") is not None]
        result["cancel"][decoder] = {"trials": trials, "median_s": _median(latencies),
                                     "max_s": max(latencies) if latencies else None,
                                     "max_new_tokens": tokens, "tokens_per_block": fast_decode._tokens_per_sync(device)}
        result.save()

    if dtype in settings.every_decoder:
        measure("pack compiled", pack("compiled"), "pack, decoder compiled")
        measure("pack static", pack("static"), "pack, decoder static (uncompiled step)")
        measure("transformers static+compile", transformers_generate(True),
                "transformers generate, static cache + torch.compile")
    result["seconds"] = _now() - started
    result.save()


# ---------------------------------------------------------------------------------------------- memory
def part_memory(result: Result, settings: Settings) -> None:
    from bench import gpu_dynamic_vram

    memory = settings.memory
    variants = list(memory["variants"])
    result.update(mllm_gb=memory["mllm_gb"], card_gb=memory["card_gb"], sdxl_size=memory["size"],
                  steps=memory["steps"], smoke=settings.dry_run, variants={})
    deadline = float(os.environ.get("LLMGA_GPU_CHECK_DEADLINE", "0")) or None

    def on_result(variant_result):
        result["variants"][variant_result["variant"]] = variant_result
        result.save()

    results = []
    for index, variant in enumerate(variants):
        timeout = None if deadline is None else max(10.0, (deadline - time.time()) / (len(variants) - index))
        results += gpu_dynamic_vram.run_variants([variant], mllm_gb=memory["mllm_gb"], card_gb=memory["card_gb"],
                                                 size=memory["size"], steps=memory["steps"], smoke=settings.dry_run,
                                                 timeout=timeout, on_result=on_result,
                                                 log=lambda text: print(text, flush=True))
    result["summary"] = gpu_dynamic_vram.summary(results)
    result["pack_passed"] = None if settings.dry_run else gpu_dynamic_vram.pack_passed(results)
    result.save()
    for failed in (r for r in results if "failed" in r):
        result.setdefault("errors", []).append(f"variant {failed['variant']}: {failed['failed']}")
    result.save()


# ---------------------------------------------------------------------------------------- quantization
def _plausible(rate: float) -> Optional[float]:
    """bench_quantization.decode_rate's rate, or None where N tokens took no longer than 1 (too short to time)."""
    return rate if rate < 1e8 else None


def part_quantization(result: Result, settings: Settings) -> None:
    import logging

    import torch
    from bench.bench_quantization import decode_rate, lm_weight_bytes, next_tokens, PROMPT
    from llmga_core.mllm import load_mllm
    from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder, make_vision_tower

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings = _Warnings()
    device = settings.device
    base_dtype = torch.float16 if device == "cuda" else torch.float32
    tokens = settings.quant_tokens
    result.update(size=settings.quant_size, device=device, tokens=tokens, variants={})
    import bitsandbytes

    result["bitsandbytes"] = getattr(bitsandbytes, "__version__", "?")
    with tempfile.TemporaryDirectory(prefix="llmga-gpu-check-q-") as tmp:
        started = _now()
        sizes = QWEN2_SIZES[settings.quant_size] if settings.quant_size != "tiny" else None
        folder = make_mllm_folder(Path(tmp), "qwen2", sizes=sizes)
        make_vision_tower(Path(tmp) / "clip-vit-large-patch14-336")
        result["folder_s"] = _now() - started
        baseline = load_mllm(folder, device=device, dtype=base_dtype)
        base_ids, base_rate = decode_rate(baseline, tokens)
        base_rate = _plausible(base_rate)
        text = baseline.tokenizer.encode(PROMPT) + base_ids
        reference = next_tokens(baseline, text)
        base_bytes = lm_weight_bytes(baseline)
        result["baseline"] = {"dtype": str(base_dtype).removeprefix("torch."), "weight_bytes": base_bytes,
                              "tokens_per_s": base_rate, "tokens": len(base_ids), "positions_compared": len(text),
                              "log": warnings.take()}
        result.save()
        del baseline
        for quantization in ("int8", "8bit", "4bit"):  # the pack's own int8 (its CUDA path: the fused reduction)
            entry = result["variants"][quantization] = {}
            try:
                model = load_mllm(folder, device=device, dtype=base_dtype, quantization=quantization)
                ids, rate = decode_rate(model, tokens)
                rate = _plausible(rate)
                agree = float((next_tokens(model, text) == reference).float().mean())
                prefix = next((i for i, (a, b) in enumerate(zip(ids, base_ids)) if a != b),
                              min(len(ids), len(base_ids)))
                size = lm_weight_bytes(model)
                entry.update(weight_bytes=size, x_weight_bytes=size / base_bytes, tokens_per_s=rate,
                             x_tokens_per_s=rate / base_rate if rate and base_rate else None,
                             next_token_agreement=agree, greedy_prefix=prefix,
                             greedy_of=len(base_ids))
                del model
            except Exception as error:
                entry["error"] = result.error(quantization, error)
            entry["log"] = warnings.take()
            result.save()
            if device == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- DiffRIR
@contextlib.contextmanager
def _tf32(allowed: bool):
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def part_diffrir(result: Result, settings: Settings) -> None:
    import torch
    from bench.bench_diffrir import run as restore_run
    from llmga_core.diffrir import DiffRIRConfig, DiffRIRS2

    device = torch.device(settings.device)
    tile = settings.diffrir_tile
    torch.manual_seed(0)
    base = DiffRIRS2(DiffRIRConfig(scale=1, **settings.diffrir_config)).eval()
    cuda = device.type == "cuda"
    # the reference: float32 without TF32 (on a GPU, cuDNN's convolutions use TF32 by default, as "float32" here)
    variants = [("float32 no TF32", torch.float32, False)] if cuda else []
    variants += [("float32", torch.float32, None), ("float16", torch.float16, None),
                 ("bfloat16", torch.bfloat16, None)]
    result.update(device=str(device), tile=tile, sizes=list(settings.diffrir_sizes), reference=variants[0][0],
                  config="released" if not settings.diffrir_config else settings.diffrir_config,
                  cudnn_tf32_default=bool(torch.backends.cudnn.allow_tf32) if cuda else None, rows=[])
    references = {}
    for label, dtype, tf32 in variants:
        net = copy.deepcopy(base).to(device, dtype)
        with _tf32(tf32) if tf32 is not None else contextlib.nullcontext():
            try:
                if not settings.dry_run:
                    restore_run(net, 1, 128, 64, device)  # warm-up (allocator, kernels), as bench_diffrir
                for side in settings.diffrir_sizes:
                    out, seconds, peak = restore_run(net, 1, side, tile, device)
                    row = {"variant": label, "side": side, "seconds": seconds, "mp_per_s": side * side / 1e6 / seconds,
                           "peak_mb": peak / 1e6, "finite": bool(torch.isfinite(out).all())}
                    if side in references:
                        row["max_abs_diff"] = float((out - references[side]).abs().max())
                    else:
                        references[side] = out
                    result["rows"].append(row)
                    result.save()
                    del out
            except Exception as error:
                result["rows"].append({"variant": label, "error": result.error(label, error)})
        del net
        if cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- editing
def part_editing(result: Result, settings: Settings) -> None:
    import torch
    from bench.bench_editing import Counter, img2img, sd15_like_unet, timed
    from llmga_core import editing

    device = torch.device(settings.device)
    width, size, steps_count = settings.edit_width, settings.edit_size, settings.edit_steps
    with torch.device(device):  # the UNet built and initialised on the device
        base = sd15_like_unet(width, size)
    shape = (4, size // 8, size // 8)
    steps = editing.timesteps(steps_count, 25)
    acp = editing.scaled_linear_alphas_cumprod()
    generator = torch.Generator().manual_seed(0)
    source, target, uncond = (torch.randn((1, 77, 768), generator=generator) for _ in range(3))
    x0 = torch.randn((1, *shape), generator=generator) * 0.8
    noise = editing.draw_noise(0, shape, steps=len(steps))
    mask_latents = x0 + 0.05 * noise.posterior
    result.update(device=str(device), unet_width=width, size=size, steps=len(steps),
                  unet_parameters=sum(p.numel() for p in base.parameters()), dtypes={})
    outputs = {}
    for name in ("float32", "float16", "bfloat16"):
        dtype = getattr(torch, name)
        entry = result["dtypes"][name] = {}
        try:
            unet = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
            predict = Counter(unet, device)
            cast = lambda t: t.to(device, dtype)  # noqa: E731
            s, t, u, x = cast(source), cast(target), cast(uncond), cast(x0)
            with torch.inference_mode():
                predict(torch.cat([x, x]), 500, torch.cat([u, s]))  # warm-up
                phases = {}
                plain, phases["img2img"] = timed(lambda: img2img(predict, x, cast(noise.inversion[0]), t, u, acp,
                                                                 steps, 7.5), device)
                mask, phases["mask"] = timed(lambda: editing.edit_mask(predict, cast(mask_latents), cast(noise.mask),
                                                                       s, t, alphas_cumprod=acp), device)
                inverted, phases["inversion"] = timed(lambda: editing.invert(
                    predict, x, cast(noise.inversion), s, u, alphas_cumprod=acp, timesteps=steps, guidance=3.5),
                    device)
                used = mask if mask.any() else torch.ones_like(mask)  # a random UNet's mask is often empty
                edited, phases["resample"] = timed(lambda: editing.resample(
                    predict, *inverted, t, u, used, alphas_cumprod=acp, timesteps=steps, guidance=7.5), device)
            edit_s = phases["mask"] + phases["inversion"] + phases["resample"]
            outputs[name] = {"img2img": plain.float().cpu(), "mask": mask.cpu(), "edit": edited.float().cpu()}
            entry.update({f"{phase}_s": seconds for phase, seconds in phases.items()})
            entry.update(edit_s=edit_s, x_img2img=edit_s / phases["img2img"], mask_fraction=float(mask.float().mean()),
                         finite=bool(torch.isfinite(outputs[name]["edit"]).all()
                                     and torch.isfinite(outputs[name]["img2img"]).all()))
            if name != "float32" and "float32" in outputs:
                ref = outputs["float32"]
                entry.update(
                    mask_agreement=float((outputs[name]["mask"] == ref["mask"]).float().mean()),
                    edit_max_abs_diff=float((outputs[name]["edit"] - ref["edit"]).abs().max()),
                    img2img_max_abs_diff=float((outputs[name]["img2img"] - ref["img2img"]).abs().max()),
                    reference_max_abs=float(ref["edit"].abs().max()))
            unet = predict = None  # the copy goes before the next dtype's
        except Exception as error:
            entry["error"] = result.error(name, error)
        result.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ environment
def environment_probe() -> dict:
    """Versions and the device, in a process of its own (the parent never starts CUDA)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 2 ** 30, 1),
                    capability=f"{properties.major}.{properties.minor}",
                    multiprocessors=properties.multi_processor_count)
    for name in ("transformers", "tokenizers", "safetensors", "diffusers", "bitsandbytes", "triton"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception as error:
            info[name] = f"missing ({type(error).__name__})"
    return info


# ------------------------------------------------------------------------------------------ the parent
def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_reason(part: Part, hidden=()) -> Optional[str]:
    """Why the part cannot run here ("<module>, <module> missing"), or None."""
    missing = [name for name in part.needs if name in hidden or not importable(name)]
    if part.host:
        try:
            from tests.host import comfyui_dir

            comfyui_dir()
        except RuntimeError as error:
            missing.append(f"the ComfyUI host ({error})")
    return f"{', '.join(missing)} missing" if missing else None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


def run_part(part: Part, args, settings: Settings, timeout: float, work: Path, env: dict) -> dict:
    """The part in its own process (its own process group, killed whole at the limit)."""
    result_path, log_path = work / f"{part.name}.json", work / f"{part.name}.log"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--worker", part.name, "--result", str(result_path),
           *(["--dry-run"] if settings.dry_run else []), *(["--hide", *args.hide] if args.hide else []),
           *(["--all-contenders"] if args.all_contenders else [])]
    child_env = dict(env, LLMGA_GPU_CHECK_DEADLINE=str(time.time() + timeout - 5))
    started = _now()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timed out"
        finally:  # the part's group, whatever is left of it (compile workers, the memory part's variants)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = _now() - started
    try:
        found = json.loads(result_path.read_text())
    except (OSError, ValueError):
        found = {}
    output = _tail(log_path)
    entry = {"status": status, "seconds": round(seconds, 1), "limit_s": round(timeout, 1), "result": found,
             "errors": len(found.get("errors", []))}
    if status == "timed out":
        entry["reason"] = f"stopped at its limit of {timeout:.0f} s; the result holds what it measured before"
    elif status == "failed":
        lines = [line for line in output.splitlines() if line.strip()]
        entry["reason"] = f"exit status {code}: " + (lines[-1][:300] if lines else "no output")
    if status != "ok":
        entry["output_tail"] = output
    return entry


def _fmt(value, digits=1, scale=1.0, suffix=""):
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}{suffix}"


def text_report(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"LLMGA GPU check ({'dry run, CPU' if report['dry_run'] else 'CUDA'}): "
             f"{env.get('gpu') or 'cpu'}, torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers "
             f"{env.get('transformers')}, Python {env.get('python')}; {report.get('started')}, "
             f"{report.get('wall_s', 0):.0f} s in all", ""]
    lines.append(f"{'part':28} {'status':16} {'seconds':>8} {'limit':>6}  reason")
    for name, part in report["parts"].items():
        status = part["status"] + (f", {part['errors']} error{'s' if part['errors'] > 1 else ''}"
                                   if part.get("errors") else "")
        lines.append(f"{name:28} {status:16} {_fmt(part.get('seconds')):>8} {_fmt(part.get('limit_s'), 0):>6}"
                     f"  {part.get('reason') or ''}"[:200])
    decode = {name: part for name, part in report["parts"].items() if name.startswith("decode-") and part.get("result")}
    if decode:
        lines += ["", "decode: tokens/s (median), % of bound, × pack auto, greedy tokens = the dynamic loop's, "
                      "compile s, CUDA-graph capture ms"]
        lines.append(f"{'size/dtype':16} {'contender':28} {'tok/s':>8} {'%bound':>7} {'×auto':>6} {'agree':>7} "
                     f"{'compile':>8} {'capture':>8}")
        for name, part in decode.items():
            res = part["result"]
            where = f"{res.get('size')} {res.get('dtype')}"
            lines.append(f"{where:16} bound {_fmt(res.get('bound_tokens_per_s'))} tok/s "
                         f"({_fmt(res.get('weight_bytes_per_token'), 3, 1e-9)} GB/token, "
                         f"{_fmt(max(res.get('copy_GBps') or 0, res.get('sum_GBps') or 0))} GB/s), "
                         f"built in {_fmt(res.get('build_s'))} s, auto = {res.get('auto_picks')}")
            for contender, c in res.get("contenders", {}).items():
                if "error" in c:
                    lines.append(f"{'':16} {contender:28} error: {c['error']}"[:200])
                    continue
                agree = f"{c['greedy_agree']}/{c['greedy_of']}" if "greedy_agree" in c else "-"
                lines.append(f"{'':16} {contender:28} {_fmt(c.get('tokens_per_s')):>8} "
                             f"{_fmt(c.get('pct_bound'), 0, 1, '%'):>7} {_fmt(c.get('x_pack_auto'), 2):>6} "
                             f"{agree:>7} {_fmt(c.get('compile_s')):>8} {_fmt(c.get('capture_s'), 1, 1e3):>8}")
            for decoder, cancel in res.get("cancel", {}).items():
                lines.append(f"{'':16} Cancel, decoder {decoder}: median {_fmt(cancel.get('median_s'), 1, 1e3)} ms, "
                             f"max {_fmt(cancel.get('max_s'), 1, 1e3)} ms over {len(cancel.get('trials', []))} "
                             f"trial(s), {cancel.get('tokens_per_block')} token(s) per read")
            for key, reason in res.get("compile_failures", {}).items():
                lines.append(f"{'':16} fallback [{key}]: {reason}"[:200])
    memory = report["parts"].get("memory", {}).get("result")
    if memory and memory.get("variants"):
        lines += ["", f"memory (card cap {memory.get('card_gb')} GB, MLLM {memory.get('mllm_gb')} GiB, "
                      f"SDXL {memory.get('sdxl_size')}²): pack passed = {memory.get('pack_passed')}"]
        for variant, res in memory["variants"].items():
            if "failed" in res:
                lines.append(f"  {variant:13} failed: {res['failed']}")
                continue
            phases = ", ".join(f"{p['phase']} {p['mllm_on_device'] / 2 ** 30:.1f} GiB on GPU"
                               + (f" (peak {p['device_peak'] / 2 ** 30:.1f})" if "device_peak" in p else "")
                               for p in res.get("phases", []))
            verdict = res.get("verdict")
            if verdict:
                failed = [check for check, ok in verdict.items() if check != "passed" and not ok]
                verdict = "passed" if verdict.get("passed") else f"FAILED ({', '.join(failed)})"
            lines.append(f"  {variant:13} dynamic VRAM {res.get('dynamic_vram')}, {res.get('mllm_patcher')}: {phases}"
                         + (f"; verdict {verdict}" if verdict else ""))
    quant = report["parts"].get("quantization", {}).get("result")
    if quant and quant.get("baseline"):
        base = quant["baseline"]
        lines += ["", f"quantization ({quant.get('size')}, bitsandbytes {quant.get('bitsandbytes')}): "
                      f"{base['dtype']} {base['weight_bytes'] / 1e6:.0f} MB LM weights, "
                      f"{_fmt(base['tokens_per_s'])} tok/s"]
        for name, res in quant.get("variants", {}).items():
            if "error" in res:
                lines.append(f"  {name}: error: {res['error']}"[:200])
            elif res:
                lines.append(f"  {name}: weights ×{res['x_weight_bytes']:.2f}, {_fmt(res['tokens_per_s'])} tok/s "
                             f"(×{_fmt(res['x_tokens_per_s'], 2)}), next-token agreement "
                             f"{res['next_token_agreement']:.3f}, "
                             f"greedy identical for {res['greedy_prefix']}/{res['greedy_of']}")
    diffrir = report["parts"].get("diffrir", {}).get("result")
    if diffrir and diffrir.get("rows"):
        lines += ["", f"DiffRIR tiled restore (tile {diffrir.get('tile')}): MP/s, max |Δ| against "
                      f"{diffrir.get('reference')}"]
        for row in diffrir["rows"]:
            if "error" in row:
                lines.append(f"  {row['variant']:16} error: {row['error']}"[:200])
            else:
                lines.append(f"  {row['variant']:16} {row['side']:>5}²  {row['mp_per_s']:8.2f} MP/s  peak "
                             f"{row['peak_mb']:7.0f} MB  max |Δ| {_fmt(row.get('max_abs_diff'), 2, 1, '')}"
                             f"{'' if row['finite'] else '  NOT FINITE'}")
    edit = report["parts"].get("editing", {}).get("result")
    if edit and edit.get("dtypes"):
        lines += ["", f"editing (UNet width {edit.get('unet_width')}, {edit.get('size')}², {edit.get('steps')} "
                      "steps): "
                      "edit s, img2img s, ratio, vs float32: mask agreement, max |Δ| edit latents"]
        for name, res in edit["dtypes"].items():
            if "error" in res:
                lines.append(f"  {name:9} error: {res['error']}"[:200])
            elif res:
                lines.append(f"  {name:9} {res['edit_s']:7.2f} {res['img2img_s']:7.2f}  ×{res['x_img2img']:.2f}  "
                             f"mask {res['mask_fraction']:.0%}  {_fmt(res.get('mask_agreement'), 3)}  "
                             f"{_fmt(res.get('edit_max_abs_diff'), 3)} "
                             f"(|x| ≤ {_fmt(res.get('reference_max_abs'), 2)})"
                             f"{'' if res['finite'] else '  NOT FINITE'}")
    errors = [(name, error) for name, part in report["parts"].items()
              for error in (part.get("result") or {}).get("errors", [])]
    if errors:
        lines += ["", "errors inside parts (recorded; the part went on):"]
        lines += [f"  {name}: {error}"[:240] for name, error in errors]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.txt").write_text(text_report(report))


def unpack_carry(folder: Path) -> dict:
    """Unpacks --pack-carry's archive under /tmp; returns the environment the parts need to see it."""
    archive = folder / CARRY_ARCHIVE
    if not archive.is_file():
        raise SystemExit(f"gpu_check: {archive} not found (make it with --pack-carry {folder})")
    target = Path(tempfile.gettempdir()) / "llmga-gpu-carry"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(target)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(target / "site"), os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(target / "site"))
    importlib.invalidate_caches()
    hosts = sorted(target.glob("ComfyUI-*"))
    if hosts and not os.environ.get("LLMGA_COMFYUI_DIR"):
        env["LLMGA_COMFYUI_DIR"] = str(hosts[-1])
        os.environ["LLMGA_COMFYUI_DIR"] = str(hosts[-1])
    print(f"gpu_check: unpacked {archive} ({archive.stat().st_size / 2 ** 20:.1f} MiB) into {target}", flush=True)
    return env


# What the device machine lacks (KINDS.md's package list), as found in this interpreter. Per package: the files
# left out. bitsandbytes keeps its CUDA 13.0 library (the device's torch is built for CUDA 13.0) and the CPU one;
# comfy_kitchen's compiled extensions are optional to it (it falls back to its eager and triton backends).
CARRY_PACKAGES = {
    "diffusers": None, "importlib_metadata": None, "torchsde": None, "trampoline": None, "comfy_aimdo": None,
    "comfy_kitchen": lambda name: name.endswith((".so", ".pyd")),
    "bitsandbytes": lambda name: name.startswith("libbitsandbytes_") and not name.startswith(
        ("libbitsandbytes_cuda130", "libbitsandbytes_cpu")),
}
HOST_LEFT_OUT = {"tests", "tests-unit", "blueprints", "comfy_api_nodes", ".git", ".github", "__pycache__"}


def pack_carry(folder: Path) -> Path:
    """Writes folder/carry.tar.gz: site/ (CARRY_PACKAGES with their dist-info) and the ComfyUI host."""
    import importlib.metadata

    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / CARRY_ARCHIVE
    distributions = importlib.metadata.packages_distributions()

    def skip(name: str) -> bool:
        return name == "__pycache__" or name.endswith(".pyc")

    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        for package, left_out in CARRY_PACKAGES.items():
            spec = importlib.util.find_spec(package) if importable(package) else None
            if spec is None:
                print(f"warning: {package} is not installed in {sys.executable}; not carried", file=sys.stderr)
                continue
            if spec.submodule_search_locations:  # a package (comfy_aimdo is a namespace package: no origin)
                root = Path(next(iter(spec.submodule_search_locations)))
            else:  # a single module
                root = Path(spec.origin)
            tar.add(root, arcname=f"site/{root.name}",
                    filter=lambda info: None if skip(Path(info.name).name) or (
                        left_out and left_out(Path(info.name).name)) else info)
            for distribution in distributions.get(package, []):
                dist = importlib.metadata.distribution(distribution)
                info_dir = Path(dist._path) if hasattr(dist, "_path") else None
                if info_dir is not None and info_dir.is_dir():
                    tar.add(info_dir, arcname=f"site/{info_dir.name}")
        from tests.host import comfyui_dir

        host = comfyui_dir()
        tar.add(host, arcname=host.name, filter=lambda info: None if (
            set(Path(info.name).parts[1:2]) & HOST_LEFT_OUT or skip(Path(info.name).name)
            or "__pycache__" in Path(info.name).parts) else info)
    size = archive.stat().st_size
    print(f"{archive}: {size / 2 ** 20:.1f} MiB (packages: {', '.join(CARRY_PACKAGES)}; host: {host.name})")
    if size > 56 * 2 ** 20:
        print("warning: with the working tree this may pass the device's 64 MiB limit", file=sys.stderr)
    return archive


def worker(args) -> int:
    if args.hide:
        sys.meta_path.insert(0, _Hide(args.hide))
    settings = Settings.make(args.dry_run, args.all_contenders)
    result = Result(Path(args.result))
    if args.worker == "environment":
        result.update(environment_probe())
        result.save()
        return 0
    part = next(p for p in parts_for(settings) if p.name == args.worker)
    if settings.dry_run:
        import torch

        torch.set_num_threads(1)
    try:
        part.run(result, settings, **part.args)
    finally:
        result.save()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.txt and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (checks the script)")
    parser.add_argument("--parts", nargs="+", help="run only these parts (names as in the table)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together (default 450 on a GPU, 240 dry); each part gets at "
                             "most its own limit and leaves the later ones at least 20 s each")
    parser.add_argument("--all-contenders", action="store_true",
                        help="every decoder and transformers' compiled generate in bfloat16 too (float16 only "
                             "by default)")
    parser.add_argument("--carry", type=Path, help="a folder with --pack-carry's archive, unpacked for the parts")
    parser.add_argument("--pack-carry", type=Path, metavar="FOLDER",
                        help="write FOLDER/carry.tar.gz with what the device machine lacks, then stop")
    parser.add_argument("--hide", nargs="+", default=[], metavar="MODULE",
                        help="treat these modules as missing (to check the parts' skips)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.pack_carry:
        pack_carry(args.pack_carry)
        return 0
    if args.out is None:
        parser.error("--out is required")
    settings = Settings.make(args.dry_run, args.all_contenders)
    env = {**os.environ, **OFFLINE}
    if settings.dry_run:
        env.update(TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    if args.carry:
        carried = unpack_carry(args.carry)
        env.update(carried)
    budget = args.budget or (240.0 if settings.dry_run else 450.0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = parts_for(settings)
    if args.parts:
        unknown = set(args.parts) - {p.name for p in parts} - {"decode"}
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; the parts are {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in args.parts or ("decode" in args.parts and p.name.startswith("decode-"))]
    started_wall, started = datetime.datetime.now().isoformat(timespec="seconds"), _now()
    report = {"schema": 1, "command": [sys.executable, "-m", "bench.gpu_check", *(argv or sys.argv[1:])],
              "dry_run": settings.dry_run, "started": started_wall, "budget_s": budget,
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
              "environment": {}, "parts": {}}
    reasons = {p.name: missing_reason(p, args.hide) for p in parts}
    for p in parts:
        report["parts"][p.name] = ({"status": "not run", "reason": reasons[p.name]} if reasons[p.name] else
                                   {"status": "pending"})
    with tempfile.TemporaryDirectory(prefix="llmga-gpu-check-") as tmp:
        work = Path(tmp)
        probe = run_part(Part("environment", None, 60, 60), args, settings, 60, work, env)
        report["environment"] = probe["result"]
        write_report(out, report)
        if not settings.dry_run and not report["environment"].get("cuda_available"):
            for p in parts:
                report["parts"][p.name] = {"status": "not run", "reason": "no CUDA device (use --dry-run on a CPU)"}
            report["wall_s"] = _now() - started
            write_report(out, report)
            print(text_report(report))
            print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        runnable = [p for p in parts if not reasons[p.name]]
        with open(out / "gpu_check.log", "w") as log:
            for index, part in enumerate(runnable):
                left = budget - (_now() - started)
                later = sum(min(p.dry_limit if settings.dry_run else p.limit, 20.0) for p in runnable[index + 1:])
                limit = part.dry_limit if settings.dry_run else part.limit
                timeout = min(limit, left - later)
                if timeout < 10:
                    report["parts"][part.name] = {"status": "not run",
                                                  "reason": f"out of time (--budget {budget:.0f} s)"}
                    write_report(out, report)
                    continue
                report["parts"][part.name] = {"status": "running", "limit_s": round(timeout, 1)}
                write_report(out, report)
                print(f"gpu_check: {part.name} (at most {timeout:.0f} s)", flush=True)
                entry = run_part(part, args, settings, timeout, work, env)
                report["parts"][part.name] = entry
                report["wall_s"] = _now() - started
                write_report(out, report)
                log.write(f"===== {part.name}: {entry['status']} in {entry['seconds']} s\n")
                log.write(_tail(work / f"{part.name}.log", 200_000) + "\n")
                log.flush()
                print(f"gpu_check: {part.name}: {entry['status']} in {entry['seconds']} s"
                      + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
    report["wall_s"] = _now() - started
    write_report(out, report)
    print(text_report(report), flush=True)
    bad = [name for name, part in report["parts"].items() if part["status"] in ("failed", "timed out")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
