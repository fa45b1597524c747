"""Decode speed of the pack's MLLM against transformers and llama.cpp on the same weights, and the memory bound.

The model is a random LLMGA MLLM with the real Qwen2-0.5B sizes (hidden 896, 24 layers, 14 heads / 2 KV
heads, MLP 4864, 151936 embedding rows shrunk to the tokenizer's 151646 as the original does; `--size 7b`:
Qwen2-7B's), written in the released layout and loaded through load_mllm. Every contender gets the same
text-to-image prompt and greedy decoding with the folder's repetition penalty (1.1, over the generated ids):

  - the pack: `LLMGAMLLM.generate` with the static-cache decoder (fast_decode.py, compiled) and with today's
    dynamic-cache loop (`decoder = "dynamic"`); with `--int8`, also the pack loaded with quantization="8bit"
  - transformers `generate` on the same language model: eager with its dynamic cache, and with its static cache
    and torch.compile (`cache_implementation="static"`)
  - llama.cpp through llama-cpp-python (optional: `pip install llama-cpp-python gguf`) on the same weights
    written as GGUF by llmga_core.export, at the bench's precision and as q8_0 for reference; the prompt goes in as
    token ids and the penalty and argmax are applied to its logits here, as the pack does

Decode speed is (N - 1) new tokens over time(N tokens) - time(1 token), so the prompt's prefill cancels out;
rounds alternate the order of the contenders, and the median round counts. The bound is the best of a large
copy (bytes read + written) and a large sum (bytes read) ÷ the weight bytes each token reads.

    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py                                   # float32 on CPU, 1 and 2 threads
    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py --dtype bfloat16 --threads 2
    .venv-comfyui-0.33.0/bin/python bench/bench_mllm.py --device cuda --dtype float16 [--size 7b]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.export import write_gguf as write_gguf_file  # noqa: E402
from llmga_core.mllm import fast_decode, load_mllm  # noqa: E402
from llmga_core.mllm.tokenization import tokenizer_image_token  # noqa: E402
from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder, make_vision_tower  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device) -> tuple[float, float]:
    """(copy bytes read + written per second, sum bytes read per second) over 1 GiB, best of 5."""
    data = torch.randn(256 * 1024 * 1024, device=device)  # written, so no page is a shared zero page
    out = torch.randn_like(data)
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
    """Weight bytes one decode step reads: all parameters, less the input embedding when the head is separate
    (only one embedding row is read per token)."""
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


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
def write_gguf(path: Path, folder: Path, kind: str) -> int:
    """The language model as GGUF with matrices in `kind` (F32, F16, BF16, Q8_0), written by the pack's exporter
    (llmga_core.export); returns the bytes of the tensors a token reads (all but the embedding table, which a
    token reads one row of, unless it is also the output head)."""
    import gguf

    write_gguf_file(folder, path, dtype=kind.lower())
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(size for name, size in tensors.items() if name != "token_embd.weight" or tied)


class LlamaCpp:
    """One llama.cpp model (llama-cpp-python) decoding greedily from prompt ids."""

    def __init__(self, path: Path, threads: int, context: int, penalty: float, eos: list[int]):
        from llama_cpp import Llama

        self.model = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, n_gpu_layers=-1, verbose=False)
        self.penalty, self.eos = penalty, set(eos)

    def set_threads(self, threads: int) -> None:
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.model._ctx.ctx, threads, threads)

    def generate(self, prompt_ids: list[int], tokens: int) -> list[int]:
        import numpy as np

        self.model.reset()
        self.model.eval(prompt_ids)
        vocabulary = self.model.n_vocab()
        ids: list[int] = []
        for step in range(tokens):
            logits = np.ctypeslib.as_array(self.model._ctx.get_logits(), shape=(vocabulary,)).copy()
            ids.append(penalised_argmax(logits, ids, self.penalty))
            if ids[-1] in self.eos or step + 1 == tokens:
                break
            self.model.eval([ids[-1]])
        return ids


def llama_cpp_missing() -> str | None:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama.cpp not measured: {error.name} is not installed (pip install llama-cpp-python gguf)"
    return None


# ------------------------------------------------------------------------------------------------ the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="0.5b", choices=sorted(QWEN2_SIZES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="CPU thread counts to measure, comma-separated")
    parser.add_argument("--int8", action="store_true", help="also the pack loaded with quantization='8bit' "
                                                            "(bitsandbytes) against llama.cpp's q8_0")
    parser.add_argument("--cpu-linears", default="",
                        help="also the pack's compiled step with these CPU linear kernels (comma-separated: "
                             "reduction, onednn, default), to measure the alternatives on this machine")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-transformers-static", action="store_true",
                        help="skip transformers' static cache + torch.compile (its compilation is the slowest)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")  # the intended behaviour
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    n = args.new_tokens
    torch.set_num_threads(max(threads))

    tmp = Path(tempfile.mkdtemp(prefix="llmga-bench-"))
    start = time.perf_counter()
    folder = make_mllm_folder(tmp, "qwen2", sizes=QWEN2_SIZES[args.size])
    make_vision_tower(tmp / "clip-vit-large-patch14-336")
    mllm = load_mllm(folder, device=device, dtype=dtype)
    lm = mllm.model.language_model
    print(f"model: random Qwen2-{args.size.upper()}-sized LLMGA MLLM, {args.dtype} on {device} "
          f"(built and loaded in {time.perf_counter() - start:.1f} s); torch {torch.__version__}")
    weight_bytes = bytes_per_token(lm)
    prompt = mllm.new_conversation().prompt("Generate an image based on given keywords. " + PROMPT)
    prompt_ids = tokenizer_image_token(prompt, mllm.tokenizer)
    embeds = mllm._input_embeddings(prompt_ids, None, [])
    eos = list(mllm._sampling.eos_ids)
    penalty = mllm._sampling.repetition_penalty
    print(f"weights read per token: {weight_bytes / 1e9:.3f} GB; prompt {len(prompt_ids)} positions, {n} new "
          f"tokens, {args.rounds} rounds in alternating order, medians")

    def pack(decoder: str, model=mllm, linear=None):
        def run(tokens):
            model.decoder = decoder
            model.cpu_linear = linear
            return model.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids
        return run

    pack_name, before_name = "pack: static cache + compiled step", "pack: dynamic cache (before)"
    contenders = {pack_name: (pack("auto"), dtype, weight_bytes),
                  before_name: (pack("dynamic"), dtype, weight_bytes),
                  "transformers generate, eager": (transformers_generate(lm, embeds, eos, penalty, static=False), dtype,
                                                   weight_bytes)}
    if not args.no_transformers_static:
        contenders["transformers generate, static + compile"] = (
            transformers_generate(lm, embeds, eos, penalty, static=True), dtype, weight_bytes)
    for linear in filter(None, args.cpu_linears.split(",")):
        contenders[f"pack: compiled step, {linear} linear"] = (pack("compiled", linear=linear), dtype, weight_bytes)
    notes = []
    if args.int8:
        try:
            int8 = load_mllm(folder, device=device, dtype=dtype, quantization="8bit")
            int8_bytes = bytes_per_token(int8.model.language_model)
            contenders["pack 8-bit (bitsandbytes)"] = (pack("auto", int8), "int8", int8_bytes)
        except Exception as error:  # bitsandbytes missing or without kernels here
            notes.append(f"pack 8-bit not measured: {error}")
    llama = {}
    missing = None if not args.no_llama_cpp else "llama.cpp not measured (--no-llama-cpp)"
    missing = missing or llama_cpp_missing()
    if missing is None:
        kinds = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[args.dtype]
        for kind in dict.fromkeys([kinds, "Q8_0"]):
            path = tmp / f"model-{kind}.gguf"
            started = time.perf_counter()
            read = write_gguf(path, folder, kind)
            llama[kind] = LlamaCpp(path, max(threads), len(prompt_ids) + n + 16, penalty, eos)
            label = f"llama.cpp {kind.lower()}" + (" (8-bit reference)" if kind == "Q8_0" else "")
            contenders[label] = (lambda tokens, m=llama[kind]: m.generate(prompt_ids, tokens), kind, read)
            print(f"{label}: GGUF written and loaded in {time.perf_counter() - started:.1f} s")
    else:
        notes.append(missing)

    for count in threads:
        if device.type == "cpu":
            torch.set_num_threads(count)
            for model in llama.values():
                model.set_threads(count)
        copy_rate, read_rate = memory_bandwidth(device)
        bandwidth = max(copy_rate, read_rate)
        # warm-up: the first call at N tokens compiles the compiled contenders; its excess is the compile time
        first_call = {}
        for name, (run, _, _) in contenders.items():
            run(1)
            synchronize(device)
            started = time.perf_counter()
            run(n)
            synchronize(device)
            first_call[name] = time.perf_counter() - started
        rates = {name: [] for name in contenders}
        full = {name: [] for name in contenders}
        ids = {}
        for round_ in range(args.rounds):
            order = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
            for name in order:
                run = contenders[name][0]
                times = {}
                for tokens in (1, n):
                    synchronize(device)
                    started = time.perf_counter()
                    ids[name] = run(tokens)
                    synchronize(device)
                    times[tokens] = time.perf_counter() - started
                full[name].append(times[n])
                rates[name].append(max(len(ids[name]) - 1, 1) / max(times[n] - times[1], 1e-9))
        where = f"{count} thread{'s' if count > 1 else ''}" if device.type == "cpu" else str(device)
        print(f"\n{where}: memory copy {copy_rate / 1e9:.1f} GB/s (read + write), sum {read_rate / 1e9:.1f} GB/s "
              f"(read); bound = {bandwidth / 1e9:.1f} GB/s ÷ weight bytes per token")
        ours = statistics.median(rates[pack_name])
        print(f"{'contender':42} {'tokens/s':>9} {'× pack':>7} {'bound':>7} {'% bound':>8} {'compile':>8}  "
              f"ids as before")
        reference = ids[before_name]
        for name, (_, precision, read) in contenders.items():
            rate = statistics.median(rates[name])
            bound = bandwidth / read
            compile_time = first_call[name] - statistics.median(full[name])
            agree = next((i for i, (a, b) in enumerate(zip(ids[name], reference)) if a != b),
                         min(len(ids[name]), len(reference)))
            same = "all" if agree == len(ids[name]) == len(reference) else f"first {agree}"
            shown = f"{compile_time:7.1f}s" if compile_time > 1.0 else "      -"
            print(f"{name:42} {rate:9.2f} {rate / ours:7.2f} {bound:7.1f} {rate / bound:8.0%} {shown:>8}  {same}")
        if len(ids[pack_name]) < n:
            print(f"note: the model emitted its end token after {len(ids[pack_name])} tokens; rates use that count")
    for note in notes:
        print(note)
    if device.type == "cpu":
        print(f"the pack's compiled CPU step multiplies by the weights with the "
              f"{fast_decode.cpu_linear_choice(lm, dtype, compiled=True)} kernel")
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
