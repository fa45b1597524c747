"""Decode speed of LLMGAMLLM.generate against plain transformers `generate` on the same model.

The model is a random LLMGA MLLM with the real Qwen2-0.5B sizes (hidden 896, 24 layers, 14 heads / 2 KV
heads, MLP 4864, 151936 embedding rows shrunk to the tokenizer's 151646 as the original does), written in
the released layout and loaded through load_mllm. Both sides get the same prompt embeddings and greedy
settings (the folder's repetition penalty 1.1); decode speed is (N - 1) new tokens over the time after
the first one, taken as time(N tokens) - time(1 token), best of --repeats. Their token ids must agree.

    .venv/bin/python bench/bench_mllm.py                      # bf16 on CPU, 24 new tokens
    .venv/bin/python bench/bench_mllm.py --device cuda --dtype float16 --new-tokens 64
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.mllm import load_mllm  # noqa: E402
from llmga_core.mllm.tokenization import tokenizer_image_token  # noqa: E402
from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower  # noqa: E402

QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tokenizer_size": 151646, "max_window_layers": 24}
PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run, repeats: int, device: torch.device) -> float:
    """Shortest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measured_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    data = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    out = torch.empty_like(data)
    out.copy_(data)
    seconds = best_time(lambda: out.copy_(data), 5, device)
    return 2 * data.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 by default because on a shared machine multi-threaded timings of the "
                             "same work vary by tens of percent (0: torch's default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")  # the intended behaviour
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens

    with tempfile.TemporaryDirectory(prefix="llmga-bench-") as tmp:
        start = time.perf_counter()
        folder = make_mllm_folder(Path(tmp), "qwen2", sizes=QWEN2_05B)
        make_vision_tower(Path(tmp) / "clip-vit-large-patch14-336")
        mllm = load_mllm(folder, device=device, dtype=dtype)
        print(f"model: random Qwen2-0.5B-sized LLMGA MLLM, {args.dtype} on {device} "
              f"(built and loaded in {time.perf_counter() - start:.1f} s)")
    lm = mllm.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())  # tied head counted once
    print(f"language model weights: {weight_bytes / 1e9:.3f} GB, vocabulary {lm.get_input_embeddings().weight.shape[0]}")

    # the embeddings generate() builds for a text-to-image turn, given to both sides
    prompt = mllm.new_conversation().prompt("Generate an image based on given keywords. " + PROMPT)
    embeds = mllm._input_embeddings(tokenizer_image_token(prompt, mllm.tokenizer), None, [])
    print(f"prompt: {embeds.shape[1]} positions, {n} new tokens, best of {args.repeats} alternating rounds")
    eos = list(mllm._sampling.eos_ids)

    def ours(tokens):
        return mllm.generate(PROMPT, task="text-to-image", max_new_tokens=tokens).token_ids

    def plain(tokens):
        with torch.inference_mode():
            return lm.generate(inputs_embeds=embeds, max_new_tokens=tokens, do_sample=False, num_beams=1,
                               repetition_penalty=mllm._sampling.repetition_penalty, eos_token_id=eos,
                               pad_token_id=eos[0], use_cache=True)[0].tolist()

    ours(2), plain(2)  # warm-up
    # Rounds alternate the two sides so a busy machine slows both alike; the best round of each counts.
    # On the CPU the process time is reported too: on a shared machine it is the steadier figure.
    runs = {"LLMGAMLLM.generate": ours, "transformers generate": plain}
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    best = {(name, clock, tokens): float("inf") for name in runs for clock in clocks for tokens in (1, n)}
    ids = {}
    for round_ in range(args.repeats):
        for name, run in (list(runs.items()) if round_ % 2 == 0 else list(runs.items())[::-1]):
            for tokens in (1, n):
                synchronize(device)
                started = {clock: read() for clock, read in clocks.items()}
                ids[name, tokens] = run(tokens)
                synchronize(device)
                for clock, read in clocks.items():
                    best[name, clock, tokens] = min(best[name, clock, tokens], read() - started[clock])
    ours_ids, plain_ids = ids["LLMGAMLLM.generate", n], ids["transformers generate", n]
    same = ours_ids == plain_ids
    print(f"token ids identical: {same}" + ("" if same else f"\n  ours  {ours_ids}\n  plain {plain_ids}"))
    if len(ours_ids) < n:
        print(f"note: the model emitted its end token after {len(ours_ids)} tokens; rates use that count")
    steps = max(len(ours_ids) - 1, 1)
    results = {}
    for clock in (("wall", "cpu") if device.type == "cpu" else ("wall",)):
        for name in runs:
            first, full = best[name, clock, 1], best[name, clock, n]
            results[name, clock] = rate = steps / max(full - first, 1e-9)
            print(f"{name:>22} ({clock:4} time): prefill+1 token {first * 1000:8.1f} ms, {n} tokens "
                  f"{full * 1000:8.1f} ms, decode {rate:7.2f} tokens/s")
        ratio = results["LLMGAMLLM.generate", clock] / results["transformers generate", clock]
        print(f"ratio of decode speeds by {clock} time (ours / plain transformers generate): {ratio:.3f}")
    results = {name: results[name, "wall"] for name in runs}

    if device.type == "cuda":
        bandwidth = measured_bandwidth(device)
        bound = bandwidth / weight_bytes
        print(f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s → bound {bound:.0f} tokens/s "
              f"(weights read once per token); ours reaches {results['LLMGAMLLM.generate'] / bound:.1%}, "
              f"plain generate {results['transformers generate'] / bound:.1%}")


if __name__ == "__main__":
    main()
