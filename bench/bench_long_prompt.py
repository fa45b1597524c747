"""Long-prompt encoding time: LLMGALongCLIPTextEncode vs the host's CLIPTextEncode on the same CLIP.

Builds a real-size CLIP-L (and with --sdxl also CLIP-G) in-process in the host with seeded random
weights, then times, for one ~300-token caption:
  node     LLMGALongCLIPTextEncode (positive + LLMGA's negative) for each pipeline given
  host     nodes.CLIPTextEncode(prompt), and CLIPTextEncode(prompt) + CLIPTextEncode("") (the two
           nodes a graph needs for positive and negative)
and prints medians and the ratios node / host.

Run from the repository root:  .venv-comfyui-0.33.0/bin/python bench/bench_long_prompt.py [--sdxl] [--fp16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.host import PACK_MODULE, comfyui_dir  # noqa: E402

CAPTION = ("A wide cinematic photograph of an old stone lighthouse standing on a rocky cliff above a stormy "
           "sea at dusk, dramatic purple and orange clouds, waves crashing against the dark rocks and "
           "throwing white spray into the air, a narrow winding path with wooden railings leading up to the "
           "lighthouse door, warm yellow light glowing from the lantern room, seagulls circling overhead, "
           "wet grass and wildflowers bending in the wind, a small fishing boat with a red hull struggling "
           "through the swell in the distance, ")


def import_host(use_gpu: bool):
    host = str(comfyui_dir())
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.cli_args
    comfy.cli_args.args.cpu = not use_gpu
    import comfy.model_management  # noqa: F401  (after args.cpu)


def import_node_module():
    """Only nodes/long_prompt.py, as a submodule of the pack package (relative imports intact)."""
    if PACK_MODULE not in sys.modules:
        pack = types.ModuleType(PACK_MODULE)
        pack.__path__ = [str(REPO)]
        sys.modules[PACK_MODULE] = pack
        sub = types.ModuleType(PACK_MODULE + ".nodes")
        sub.__path__ = [str(REPO / "nodes")]
        sys.modules[PACK_MODULE + ".nodes"] = sub
    return importlib.import_module(PACK_MODULE + ".nodes.long_prompt")


def random_fill(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "layer_norm" in name or name.endswith("norm.weight"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                value = torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02
                param.copy_(value.to(param.dtype))


def build_clip(sdxl: bool, dtype: torch.dtype):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget
    target = (ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel) if sdxl
              else ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel))
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={"dtype": dtype})
    random_fill(clip.cond_stage_model, seed=0)
    return clip


def caption_of(clip, n_tokens: int) -> str:
    tokenizer = clip.tokenizer.clip_l.tokenizer
    words = (CAPTION * 4).split(" ")
    for end in range(1, len(words)):
        text = " ".join(words[:end])
        if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) >= n_tokens:
            return text
    raise RuntimeError("caption too short")


def median_time(fn, repeats: int) -> float:
    fn()   # warm-up (loads the model, allocates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="SDXL CLIP (CLIP-L + CLIP-G, 818M parameters)")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights (the host's default) instead of fp32")
    parser.add_argument("--gpu", action="store_true", help="let the host use CUDA if present")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import_host(args.gpu)
    node = import_node_module().LLMGALongCLIPTextEncode
    import nodes as host_nodes
    logging.getLogger("llmga").setLevel(logging.ERROR)   # the sd15 cut (225 of 300 tokens) is expected here

    dtype = torch.float16 if args.fp16 else torch.float32
    start = time.perf_counter()
    clip = build_clip(args.sdxl, dtype)
    print(f"CLIP {'SDXL (L+G)' if args.sdxl else 'SD1.5 (L)'} {dtype}, built in {time.perf_counter() - start:.1f} s; "
          f"torch threads {torch.get_num_threads()}")

    prompt = caption_of(clip, args.tokens)
    n = len(clip.tokenizer.clip_l.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
    host_rows = len(clip.tokenize(prompt)["l"])
    print(f"prompt: {n} tokens; CLIPTextEncode encodes it as {host_rows} rows of 77")

    encode = host_nodes.CLIPTextEncode()
    t_host = median_time(lambda: encode.encode(clip, prompt), args.repeats)
    t_host_pair = median_time(lambda: (encode.encode(clip, prompt), encode.encode(clip, "")), args.repeats)
    print(f"host CLIPTextEncode(prompt)            {t_host * 1000:8.1f} ms")
    print(f"host CLIPTextEncode(prompt) + ('')     {t_host_pair * 1000:8.1f} ms")

    pipelines = ["sdxl"] if args.sdxl else ["sd15", "sd15-inpaint"]
    for pipeline in pipelines:
        t_node = median_time(lambda: node.execute(clip=clip, text=prompt, pipeline=pipeline), args.repeats)
        print(f"node {pipeline:<13} (positive+negative) {t_node * 1000:8.1f} ms   "
              f"ratio vs CLIPTextEncode x1: {t_node / t_host:.2f}   vs x2 (with ''): {t_node / t_host_pair:.2f}")


if __name__ == "__main__":
    main()
