"""Decode speed of the pack's MLLM in float32, bfloat16 and 8-bit against llama.cpp at the same precision.

The model is a random LLMGA MLLM with the real Qwen2-0.5B sizes (hidden 896, 24 layers, 14 heads / 2 KV
heads, MLP 4864, 151936 embedding rows shrunk to the tokenizer's 151646 as the original does; `--size 7b`:
Qwen2-7B's), written in the released layout and loaded through load_mllm. Every contender gets the same
text-to-image prompt and greedy decoding with the folder's repetition penalty (1.1, over the generated ids).
For each precision (`--precisions`, default f32,bf16,q8_0 on a CPU):

  - the pack: `LLMGAMLLM.generate` with the static-cache decoder (fast_decode.py, compiled), and its
    dynamic-cache loop (`decoder = "dynamic"`) as the baseline in the same process; f32 and bf16 load with
    that dtype, q8_0 with `quantization="int8"` (the pack's int8 blocks of 32, LM head included). The first
    CPU decode moves the language model's weights onto transparent huge pages (llmga_core/mllm/huge_pages.py),
    and every in-process contender on that model reads them there; a second load with `huge_pages = False`
    ("4 KiB pages") measures the compiled step on the weights where the loader put them;
  - llama.cpp's llama-server (built by .ci/build_llama_server.sh) on the same weights written as GGUF by
    llmga_core.export (f32, bf16, q8_0), at the same thread count: its decode rate is the server's own
    `timings.predicted_per_second` for one request of N tokens (no HTTP in the figure); its greedy tokens come
    through `connect_mllm`, one token per request, which gives the exact token sequence;
  - with `--transformers`: transformers `generate` on the same language model, eager and static + compile;
    with `--int8`: bitsandbytes' LLM.int8() (`quantization="8bit"`); with `--cpu-linears`: the compiled step
    with other CPU linear kernels.

Decode speed is (N - 1) new tokens over time(N tokens) - time(1 token), so the prompt's prefill cancels out;
rounds alternate the order of the contenders, and the median round counts. The bound is the best of a large
copy (bytes read + written) and a large sum (bytes read) ÷ the weight bytes each token reads. "ids as f32"
counts the leading greedy tokens equal to the pack's float32 answer.

    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py                            # f32, bf16, q8_0; 1 and 2 threads
    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py --precisions bf16 --threads 2
    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py --device cuda --dtype float16 [--size 7b]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.export import write_gguf as write_gguf_file  # noqa: E402
from llmga_core.mllm import fast_decode, huge_pages, load_mllm  # noqa: E402
from llmga_core.mllm.tokenization import tokenizer_image_token  # noqa: E402
from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder, make_vision_tower  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device) -> tuple[float, float]:
    """(copy bytes read + written per second, sum bytes read per second) over 1 GiB, best of 5; on the CPU on
    huge pages where the OS has them, as the pack's CPU decode places its weights (llmga_core/mllm/huge_pages.py)."""
    size = 256 * 1024 * 1024
    buffers = [huge_pages.allocate(size * 4) if device.type == "cpu" else None for _ in range(2)]
    data, out = (torch.empty(size, device=device) if memory is None else memory.view(torch.float32)
                 for memory in buffers)
    del buffers
    data.normal_()  # written, so no page is a shared zero page
    out.normal_()
    rates = {"copy": 0.0, "sum": 0.0}
    for _ in range(5):
        for name, run, moved in (("copy", lambda: out.copy_(data), 2), ("sum", lambda: data.sum(), 1)):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            rates[name] = max(rates[name], moved * data.numel() * 4 / (time.perf_counter() - start))
    del data, out
    return rates["copy"], rates["sum"]


def bytes_per_token(lm) -> int:
    """Weight bytes one decode step reads: all parameters and buffers (the int8 layers keep their weights and
    scales as buffers), less the input embedding unless it is also the head (one row of it is read per token)."""
    tensors = {t.data_ptr(): t for t in (*lm.parameters(), *lm.buffers())}
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        tensors.pop(embed.data_ptr(), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def penalised_argmax(logits, generated: list[int], penalty: float) -> int:
    """transformers' RepetitionPenaltyLogitsProcessor over the generated ids, then argmax (numpy logits)."""
    import numpy as np

    if penalty != 1.0 and generated:
        ids = np.unique(np.asarray(generated))
        picked = logits[ids]
        logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return int(np.argmax(logits))


def transformers_generate(lm, embeds, eos: list[int], penalty: float, *, static: bool):
    """run(tokens, on_token=None) -> ids: transformers `generate` on the same language model and embeddings,
    greedy with the folder's penalty and end ids; eager with its dynamic cache, or its static cache compiled
    (the GPU's CUDA graphs as "reduce-overhead"). on_token is accepted and not called (generate has no hook)."""
    extra = {}
    if static:
        from transformers import CompileConfig

        cuda = embeds.device.type == "cuda"
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if cuda else "default")
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        extra = {"cache_implementation": "static", "compile_config": compile_config}

    def run(tokens, on_token=None):
        with torch.inference_mode():
            return lm.generate(inputs_embeds=embeds, max_new_tokens=tokens, do_sample=False, num_beams=1,
                               repetition_penalty=penalty, eos_token_id=eos, pad_token_id=eos[0],
                               use_cache=True, **extra)[0].tolist()
    return run


# ------------------------------------------------------------------------------------------------- GGUF
GGUF_TYPES = {"f32": "f32", "bf16": "bf16", "q8_0": "q8_0", "f16": "f16"}
PACK_LOADS = {"f32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16), "f16": dict(dtype=torch.float16),
              "q8_0": dict(dtype=torch.float32, quantization="int8")}


def write_gguf(path: Path, folder: Path, kind: str) -> int:
    """The language model as GGUF with matrices in `kind` (f32, f16, bf16, q8_0), written by the pack's exporter
    (llmga_core.export); returns the bytes of the tensors a token reads (all but the embedding table, which a
    token reads one row of, unless it is also the output head)."""
    import gguf

    write_gguf_file(folder, path, dtype=kind)
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(size for name, size in tensors.items() if name != "token_embd.weight" or tied)


class LlamaServerContender:
    """llama-server on one GGUF at a thread count: decode rate from the server's own timings, exact greedy ids
    through connect_mllm."""

    def __init__(self, gguf_path: Path, folder: Path, threads: int, context: int):
        from tests.fixtures.llama_server import LlamaServer

        self.server = LlamaServer(gguf_path, threads=threads, context=context).start()
        self.folder = folder

    def rate(self, prompt_ids: list[int], tokens: int, penalty: float) -> float:
        import json
        import urllib.request

        body = {"prompt": prompt_ids, "n_predict": tokens, "samplers": ["penalties", "top_k"], "top_k": 1,
                "repeat_penalty": penalty, "repeat_last_n": tokens, "ignore_eos": True, "cache_prompt": False}
        request = urllib.request.Request(self.server.base_url + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return float(json.load(response)["timings"]["predicted_per_second"])

    def ids(self, tokens: int) -> list[int]:
        from llmga_core.mllm import connect_mllm

        remote = connect_mllm(self.folder, self.server.base_url)
        return remote.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids

    def stop(self) -> None:
        self.server.stop()


def llama_server_missing() -> str | None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "llama.cpp not measured: the gguf package is not installed (pip install gguf)"
    from tests.fixtures.llama_server import llama_server_binary

    try:
        llama_server_binary()
    except BaseException as error:  # pytest.fail's exception, with the command that builds it
        return f"llama.cpp not measured: {error}"
    return None


# ------------------------------------------------------------------------------------------------ the run
def leading_agreement(ids: list[int], reference: list[int]) -> str:
    same = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), min(len(ids), len(reference)))
    return "all" if same == len(ids) == len(reference) else f"first {same}"


def measure(contenders: dict, n: int, rounds: int, device: torch.device) -> tuple[dict, dict, dict]:
    """(median decode rate, first-call excess (compile) time, last ids) per contender. A contender is
    run(tokens) -> ids, or a LlamaServerContender-style object measured by its own rate."""
    first_call, rates, full, ids = {}, {name: [] for name in contenders}, {name: [] for name in contenders}, {}
    for name, run in contenders.items():  # warm-up: the first call at N tokens compiles
        run(1)
        synchronize(device)
        started = time.perf_counter()
        ids[name] = run(n)
        synchronize(device)
        first_call[name] = time.perf_counter() - started
    for round_ in range(rounds):
        for name in (list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]):
            times = {}
            for tokens in (1, n):
                synchronize(device)
                started = time.perf_counter()
                ids[name] = contenders[name](tokens)
                synchronize(device)
                times[tokens] = time.perf_counter() - started
            full[name].append(times[n])
            rates[name].append(max(len(ids[name]) - 1, 1) / max(times[n] - times[1], 1e-9))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    compile_times = {name: first_call[name] - statistics.median(full[name]) for name in contenders}
    return medians, compile_times, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="one precision (the default on a GPU: float16); --precisions names several")
    parser.add_argument("--precisions", default=None, help="comma-separated among f32, bf16, q8_0 (pack: int8), f16")
    parser.add_argument("--size", default="0.5b", choices=sorted(QWEN2_SIZES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="CPU thread counts to measure, comma-separated")
    parser.add_argument("--transformers", action="store_true",
                        help="also transformers generate (eager, and static cache + torch.compile)")
    parser.add_argument("--int8", action="store_true", help="also bitsandbytes' LLM.int8() (quantization='8bit')")
    parser.add_argument("--cpu-linears", default="",
                        help="also the pack's compiled step with these CPU linear kernels (comma-separated: "
                             "bf16, reduction, onednn, default), to measure the alternatives on this machine")
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")  # the intended behaviour
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    if args.precisions:
        precisions = args.precisions.split(",")
    elif args.dtype:
        precisions = [names[args.dtype]]
    else:
        precisions = ["f32", "bf16", "q8_0"] if device.type == "cpu" else ["f16"]
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    n = args.new_tokens
    torch.set_num_threads(max(threads))

    tmp = Path(tempfile.mkdtemp(prefix="llmga-bench-"))
    start = time.perf_counter()
    folder = make_mllm_folder(tmp, "qwen2", sizes=QWEN2_SIZES[args.size])
    make_vision_tower(tmp / "clip-vit-large-patch14-336")
    reference = load_mllm(folder, device=device, dtype=torch.float32 if device.type == "cpu" else torch.float16)
    prompt = reference.new_conversation().prompt("Generate an image based on given keywords. " + PROMPT)
    prompt_ids = tokenizer_image_token(prompt, reference.tokenizer)
    penalty = reference._sampling.repetition_penalty
    reference_ids = reference.generate(PROMPT, task="text-to-image", max_new_tokens=n).token_ids
    reference_label = "f32" if device.type == "cpu" else "f16"
    del reference
    print(f"model: random Qwen2-{args.size.upper()}-sized LLMGA MLLM on {device} (built in "
          f"{time.perf_counter() - start:.1f} s); torch {torch.__version__}; prompt {len(prompt_ids)} positions, "
          f"{n} new tokens, {args.rounds} rounds in alternating order, medians")
    notes = []
    missing = "llama.cpp not measured (--no-llama-cpp)" if args.no_llama_cpp or device.type != "cpu" else None
    missing = missing or llama_server_missing()
    if missing:
        notes.append(missing)

    def pack(model, decoder: str, linear=None):
        def run(tokens):
            model.decoder = decoder
            model.cpu_linear = linear
            return model.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids
        return run

    rows = []  # (threads, precision, name, rate, bound, compile, agreement, × baseline)
    for precision in precisions:
        mllm = load_mllm(folder, device=device, **PACK_LOADS[precision])
        small_pages = None
        lm = mllm.model.language_model
        read = bytes_per_token(lm)
        pack_name, before_name = "pack: compiled step", "pack: dynamic loop (baseline)"
        contenders = {pack_name: (pack(mllm, "auto"), read), before_name: (pack(mllm, "dynamic"), read)}
        if args.transformers:
            embeds = mllm._input_embeddings(prompt_ids, None, [])
            eos = list(mllm._sampling.eos_ids)
            for static in (False, True):
                label = "transformers generate, " + ("static + compile" if static else "eager")
                contenders[label] = (transformers_generate(lm, embeds, eos, penalty, static=static), read)
        if device.type == "cpu" and huge_pages.unavailable() is None:
            small_pages = load_mllm(folder, device=device, **PACK_LOADS[precision])
            small_pages.huge_pages = False  # the weights where the loader put them (4 KiB pages)
            contenders["pack: compiled step, 4 KiB pages"] = (pack(small_pages, "auto"), read)
        for linear in filter(None, args.cpu_linears.split(",")):
            contenders[f"pack: compiled step, {linear} linear"] = (pack(mllm, "compiled", linear), read)
        if args.int8 and precision == "q8_0":
            try:
                bnb = load_mllm(folder, device=device, quantization="8bit")
                contenders["pack 8-bit (bitsandbytes)"] = (pack(bnb, "auto"), bytes_per_token(bnb.model.language_model))
            except Exception as error:  # bitsandbytes missing or without kernels here
                notes.append(f"bitsandbytes 8-bit not measured: {error}")
        gguf_path, gguf_read = None, None
        if missing is None and precision in GGUF_TYPES:
            gguf_path = tmp / f"model-{precision}.gguf"
            gguf_read = write_gguf(gguf_path, folder, GGUF_TYPES[precision])
        print(f"\n{precision}: the pack reads {read / 1e9:.3f} GB per token"
              + (f", llama.cpp {gguf_read / 1e9:.3f} GB" if gguf_read else "")
              + (f"; CPU linear kernel: {fast_decode.cpu_linear_choice(lm, mllm.dtype, compiled=True)}"
                 if device.type == "cpu" and precision != "q8_0" else ""))
        for count in threads:
            if device.type == "cpu":
                torch.set_num_threads(count)
            copy_rate, read_rate = memory_bandwidth(device)
            bandwidth = max(copy_rate, read_rate)
            rates, compile_times, ids = measure({k: v[0] for k, v in contenders.items()}, n, args.rounds, device)
            for name, (_, weight_bytes) in contenders.items():
                rows.append((count, precision, name, rates[name], bandwidth / weight_bytes, compile_times[name],
                             leading_agreement(ids[name], reference_ids), rates[name] / rates[before_name]))
            if gguf_path is not None:
                server = LlamaServerContender(gguf_path, folder, count, len(prompt_ids) + 2 * n + 64)
                try:
                    server_rates = [server.rate(prompt_ids, n, penalty) for _ in range(args.rounds + 1)][1:]
                    server_ids = server.ids(n)
                finally:
                    server.stop()
                rate = statistics.median(server_rates)
                rows.append((count, precision, f"llama.cpp {precision} (llama-server)", rate, bandwidth / gguf_read,
                             0.0, leading_agreement(server_ids, reference_ids), rate / rates[before_name]))
            where = f"{count} thread{'s' if count > 1 else ''}" if device.type == "cpu" else str(device)
            print(f"  {where}: memory copy {copy_rate / 1e9:.1f} GB/s (read + write), sum {read_rate / 1e9:.1f} "
                  "GB/s (read)")
        del mllm, contenders, small_pages
        gc.collect()

    print(f"\n{'threads':>7} {'prec.':>5} {'contender':44} {'tok/s':>7} {'× base':>7} {'bound':>7} {'% bound':>8} "
          f"{'compile':>8}  ids as {reference_label}")
    for count, precision, name, rate, bound, compile_time, agreement, ratio in rows:
        shown = f"{compile_time:7.1f}s" if compile_time > 1.0 else "      -"
        print(f"{count:>7} {precision:>5} {name:44} {rate:7.2f} {ratio:7.2f} {bound:7.1f} {rate / bound:8.0%} "
              f"{shown:>8}  {agreement}")
    for note in notes:
        print(note)
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
