"""8-bit (the pack's int8 blocks; bitsandbytes' LLM.int8()) and 4-bit (NF4) MLLM loading against the float model.

For each model: the language model's weight bytes, how often the quantised model picks the float model's next
token given the same text (teacher forcing over the float model's own greedy answer: prompt + N new tokens),
how many greedy tokens agree before the first difference, and decode tokens/s, each as a ratio to the float32
baseline (and 8-bit also against a float16 load, the original's dtype, beside llama.cpp's q8_0 of the same
weights served by llama-server: its argmax after each prefix). Models: the seven tiny test families
(weights of std 0.5, chaotic on purpose) and a random model of Qwen2-0.5B's real sizes (std 0.02), both in the
released layout through load_mllm. Random weights give flat next-token distributions, far less decided than a
trained model's, so these agreements are a lower bound of what a released checkpoint shows.

    .venv-comfyui-0.33.0/bin/python bench/bench_quantization.py                 # tiny families + Qwen2-0.5B size, CPU
    .venv-comfyui-0.33.0/bin/python bench/bench_quantization.py --no-big        # tiny families only (seconds)
    .venv-comfyui-0.33.0/bin/python bench/bench_quantization.py --device cuda   # on a GPU (float16 baseline there)
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.mllm import load_mllm  # noqa: E402
from tests.fixtures.tiny_mllm import FAMILIES, QWEN2_SIZES, make_mllm_folder, make_vision_tower  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"


def lm_weight_bytes(mllm) -> int:
    """The language model's parameters and buffers (the pack's int8 layers keep weights and scales as buffers)."""
    lm = mllm.model.language_model
    return sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))


def llama_cpp_next_tokens(folder: Path, ids: list[int], kind: str = "q8_0") -> Optional[torch.Tensor]:
    """llama.cpp's own argmax after each prefix of `ids` (teacher forcing, as next_tokens), on the folder written
    as a `kind` GGUF and served by llama-server; None where llama-server or gguf is missing."""
    import json
    import urllib.request

    from bench.bench_mllm import llama_server_missing
    from llmga_core.export import write_gguf
    from tests.fixtures.llama_server import LlamaServer

    if llama_server_missing():
        return None
    path = folder / f"model-{kind}.gguf"
    write_gguf(folder, path, dtype=kind)
    chosen = []
    with LlamaServer(path, threads=torch.get_num_threads() or 1, context=len(ids) + 16) as server:
        for end in range(1, len(ids) + 1):
            body = {"prompt": ids[:end], "n_predict": 1, "samplers": ["top_k"], "top_k": 1, "cache_prompt": True,
                    "return_tokens": True}
            request = urllib.request.Request(server.base_url + "/completion", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                chosen.append(json.load(response)["tokens"][0])
    path.unlink(missing_ok=True)
    return torch.tensor(chosen)


def next_tokens(mllm, ids: list[int]) -> torch.Tensor:
    lm = mllm.model.language_model
    with torch.inference_mode():
        return lm(input_ids=torch.tensor([ids], device=lm.device)).logits[0].argmax(-1).cpu()


def decode_rate(mllm, tokens: int) -> tuple[list[int], float]:
    """Greedy ids of `tokens` new tokens and the decode rate (tokens after the first, per second)."""
    mllm.generate(PROMPT, task="text-to-image", max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    mllm.generate(PROMPT, task="text-to-image", max_new_tokens=1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    ids = mllm.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids
    full = time.perf_counter() - start
    return ids, (len(ids) - 1) / max(full - first, 1e-9)


def compare(label: str, folder: Path, device: str, tokens: int, float16: bool) -> dict:
    base_dtype = torch.float16 if device == "cuda" else torch.float32
    baseline = load_mllm(folder, device=device, dtype=base_dtype)
    base_ids, base_rate = decode_rate(baseline, tokens)
    text = baseline.tokenizer.encode(PROMPT) + base_ids
    reference = next_tokens(baseline, text)
    rows = {}
    variants = [("int8", base_dtype, "int8"), ("8bit", base_dtype, "8bit"), ("4bit", base_dtype, "4bit")]
    if float16 and base_dtype != torch.float16:
        variants.append(("float16", torch.float16, None))
    for name, dtype, quantization in variants:
        model = load_mllm(folder, device=device, dtype=dtype, quantization=quantization)
        ids, rate = decode_rate(model, tokens)
        agree = float((next_tokens(model, text) == reference).float().mean())
        prefix = next((i for i, (a, b) in enumerate(zip(ids, base_ids)) if a != b), min(len(ids), len(base_ids)))
        rows[name] = (agree, prefix, lm_weight_bytes(model) / lm_weight_bytes(baseline), rate / base_rate)
        del model
    if float16 and base_dtype != torch.float16:  # 8-bit against the original's float16 too, llama.cpp's q8_0 as well
        f16 = load_mllm(folder, device=device, dtype=torch.float16)
        f16_ids = f16.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids
        f16_text = f16.tokenizer.encode(PROMPT) + f16_ids
        f16_next = next_tokens(f16, f16_text)
        for name in ("int8", "8bit"):
            quantized = load_mllm(folder, device=device, dtype=torch.float16, quantization=name)
            rows[f"{name}-vs-float16"] = (float((next_tokens(quantized, f16_text) == f16_next).float().mean()),
                                          None, None, None)
            del quantized
        if device == "cpu":
            served = llama_cpp_next_tokens(folder, f16_text)
            if served is not None:
                rows["llama.cpp-q8_0-vs-float16"] = (float((served == f16_next).float().mean()), None, None, None)
        del f16
    print(f"{label}: float {str(base_dtype).removeprefix('torch.')} baseline {lm_weight_bytes(baseline) / 1e6:.1f} MB "
          f"LM weights, {base_rate:.2f} tokens/s, {len(text)} positions compared")
    for name, (agree, prefix, size, speed) in rows.items():
        extra = "" if prefix is None else (f", greedy identical for the first {prefix}/{len(base_ids)} tokens, "
                                           f"weights ×{size:.2f}, decode speed ×{speed:.2f}")
        print(f"  {name:>15}: next-token agreement {agree:.3f}{extra}")
    return rows


LOAD_RSS = """
import sys, torch, transformers
sys.path.insert(0, {repo!r})
from llmga_core.mllm import load_mllm


def high_water():  # VmHWM of this process (ru_maxrss would keep the parent's from before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


before = high_water()
mllm = load_mllm({folder!r}, dtype=getattr(torch, {dtype!r}), quantization={quantization!r})
print(before, high_water(), mllm.size_bytes())
"""


def load_peaks(folder: Path) -> None:
    """Peak RSS of a fresh process that loads the model, float32 / float16 / 8-bit / 4-bit (the weights are
    quantised layer by layer as they are read, so a quantised load never holds the float model)."""
    import subprocess

    repo = str(Path(__file__).resolve().parents[1])
    base = None
    for dtype, quantization in (("float32", None), ("float16", None), ("float32", "int8"), ("float32", "8bit"),
                                ("float32", "4bit")):
        code = LOAD_RSS.format(repo=repo, folder=str(folder), dtype=dtype, quantization=quantization)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        before, peak, size = (int(v) for v in done.stdout.split()[-3:])
        grown = (peak - before) / 1024  # KiB → MiB
        base = base or grown
        print(f"  load {dtype:>7} {quantization or 'unquantized':>11}: peak RSS {peak / 1024:7.0f} MB "
              f"(+{grown:6.0f} MB over the imports, ×{grown / base:.2f}), model {size / 1e6:7.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens of the greedy answers")
    parser.add_argument("--no-big", action="store_true", help="skip the Qwen2-0.5B-sized model")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llmga-bench-q-") as tmp:
        root = Path(tmp)
        make_vision_tower(root / "clip-vit-large-patch14-336")
        summary = {}
        for family in FAMILIES:
            summary[family] = compare(f"tiny {family}", make_mllm_folder(root, family), args.device, args.tokens,
                                      float16=True)
        for mode in ("int8", "8bit", "4bit", "int8-vs-float16", "8bit-vs-float16", "llama.cpp-q8_0-vs-float16"):
            values = [rows[mode][0] for rows in summary.values() if mode in rows]
            if not values:
                continue
            print(f"tiny families, {mode}: next-token agreement {min(values):.3f}–{max(values):.3f} "
                  f"(mean {sum(values) / len(values):.3f})")
        if not args.no_big:
            start = time.perf_counter()
            folder = make_mllm_folder(root / "big", "qwen2", sizes=QWEN2_SIZES["0.5b"])
            make_vision_tower(root / "big" / "clip-vit-large-patch14-336")
            print(f"(Qwen2-0.5B-sized random model written in {time.perf_counter() - start:.0f} s)")
            compare("Qwen2-0.5B-sized", folder, args.device, args.tokens, float16=True)
            if args.device == "cpu":
                load_peaks(folder)


if __name__ == "__main__":
    main()
