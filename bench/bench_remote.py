"""Throughput of one llama-server shared by 1, 2 and 4 concurrent clients, against the in-process MLLM.

The model is a random LLMGA MLLM with Qwen2-0.5B's layer sizes (hidden 896, 24 layers, 14 heads / 2 KV heads,
MLP 4864; the tests' small tokenizer, so the vocabulary head is small) in the released layout. The pack loads
it in float32 (`load_mllm`, the baseline, in this process); `llmga_core.export.write_gguf` writes it as GGUF
(f32, and q8_0: the CPU serving choice) and llama-server serves it with one slot per client. Each client is
a thread with its own `connect_mllm` (as separate ComfyUI workers are), asking for a text-to-image prompt
with greedy decoding and `--new-tokens` new tokens; every client's tokens are compared with the in-process
model's. Figures: aggregate new tokens per second (all clients' tokens ÷ wall time, prefill included for
every contender; the median of --rounds runs) and the ratio to the in-process model.

    .venv-comfyui-0.33.0/bin/python bench/bench_remote.py [--new-tokens 48] [--clients 1,2,4] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmga_core.export import write_gguf  # noqa: E402
from llmga_core.mllm import connect_mllm, load_mllm  # noqa: E402
from tests.fixtures.llama_server import LlamaServer  # noqa: E402
from tests.fixtures.tiny_mllm import QWEN2_SIZES, make_mllm_folder, make_vision_tower  # noqa: E402

INSTRUCTIONS = ["a lighthouse on a cliff at dusk", "a red fox in the snow", "a busy market in the rain",
                "a quiet library at night"]


def clients_run(url: str, folder: Path, count: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Wall seconds for `count` concurrent clients to each finish one answer, and their token ids."""
    remotes = [connect_mllm(folder, url) for _ in range(count)]
    results: list = [None] * count

    def work(i):
        results[i] = remotes[i].generate(INSTRUCTIONS[i % len(INSTRUCTIONS)], task="text-to-image",
                                         max_new_tokens=new_tokens).token_ids
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the pack and of llama-server")
    parser.add_argument("--dtypes", default="f32,q8_0", help="GGUF types to serve")
    parser.add_argument("--rounds", type=int, default=3, help="runs per client count; the median counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]
    sizes = {k: v for k, v in QWEN2_SIZES["0.5b"].items() if k not in ("vocab_size", "tokenizer_size")}
    with tempfile.TemporaryDirectory(prefix="llmga-bench-remote-") as tmp:
        tmp = Path(tmp)
        folder = make_mllm_folder(tmp, "qwen2", sizes=sizes)
        make_vision_tower(tmp / "clip-vit-large-patch14-336")
        mllm = load_mllm(folder, dtype=torch.float32)
        mllm.generate(INSTRUCTIONS[0], task="text-to-image", max_new_tokens=4)  # compile / warm up
        local, rates = {}, []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for instruction in INSTRUCTIONS[:max(counts)]:
                local[instruction] = mllm.generate(instruction, task="text-to-image",
                                                   max_new_tokens=args.new_tokens).token_ids
            rates.append(sum(len(v) for v in local.values()) / (time.perf_counter() - start))
        local_rate = sorted(rates)[len(rates) // 2]
        print(f"in-process float32 (pack, {args.threads} threads, one answer at a time): {local_rate:.1f} tokens/s")
        del mllm
        for dtype in args.dtypes.split(","):
            gguf = tmp / f"model-{dtype}.gguf"
            started = time.perf_counter()
            write_gguf(folder, gguf, dtype=dtype)
            print(f"\nGGUF {dtype}: {gguf.stat().st_size / 1e6:.0f} MB written in {time.perf_counter() - started:.1f} s")
            exact = ("-ctk", "f32", "-ctv", "f32", "-fa", "off") if dtype == "f32" else ()
            with LlamaServer(gguf, parallel=max(counts), context=1024 * max(counts), threads=args.threads,
                             extra=exact) as server:
                clients_run(server.base_url, folder, 1, 4)  # warm up
                print("| clients | tokens/s (all clients) | × in-process | tokens equal to in-process |")
                print("|---|---|---|---|")
                for count in counts:
                    runs = [clients_run(server.base_url, folder, count, args.new_tokens) for _ in range(args.rounds)]
                    seconds, results = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
                    tokens = sum(len(r) for r in results)
                    equal = sum(r == local[INSTRUCTIONS[i % len(INSTRUCTIONS)]] for i, r in enumerate(results))
                    print(f"| {count} | {tokens / seconds:.1f} | {tokens / seconds / local_rate:.2f} | "
                          f"{equal}/{count} answers |")


if __name__ == "__main__":
    main()
