"""The pack's own 8-bit weights: `load_mllm(..., quantization="int8")`, the fast 8-bit choice on CPUs.

Every linear layer of the language model, the LM head included, keeps its weight as int8 in blocks of 32 values
along the input dimension with one float16 scale per block (scale = the block's largest magnitude / 127, as
llama.cpp's q8_0): 8.5 bits per weight. Biases, norms, the input embedding, the vision tower and the projector
stay in the model's dtype. A one-token step multiplies with cpu_kernels.cpp's int8 kernel on x86-64 CPUs with
AVX-512 (activations rounded to 16-bit integers per block, products exact, sums in float32); elsewhere, and
for the prompt's many rows at once, the weight is dequantised into the model's dtype and multiplied by torch
(inside a compiled step on a GPU, as one fused pass over the int8 weights).

bitsandbytes' LLM.int8() ("8bit") stays for the original's --load-8bit fidelity; this format is the one that
decodes at the machine's memory rate on a CPU (docs/speed-and-memory.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import cpu_kernels
from .quantization import _return_freed_memory  # the loader's heap trimming after each layer

BLOCK = cpu_kernels.INT8_BLOCK
KERNEL_MAX_ROWS = 4  # the kernel streams the weights once per activation row: a prompt's rows go to torch


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values (N, K), float16 scales (N, K/32)) of a float weight (N, K), K a multiple of 32: each block's
    scale is its largest magnitude / 127 rounded to float16, and each value round(w / scale)."""
    rows, width = weight.shape
    blocks = weight.detach().to(torch.float32).reshape(rows, width // BLOCK, BLOCK)
    scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
    divisor = scale.to(torch.float32).unsqueeze(-1)
    values = torch.where(divisor > 0, blocks / divisor.clamp_min(torch.finfo(torch.float32).tiny), 0)
    return values.round().clamp_(-127, 127).to(torch.int8).reshape(rows, width), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, width = values.shape
    blocks = values.reshape(rows, width // BLOCK, BLOCK).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return blocks.reshape(rows, width).to(dtype)


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 in blocks of 32 with float16 scales (parameters without gradients, so
    the host's moves between devices carry them); computes in float32 and returns the input's dtype."""

    def __init__(self, linear: nn.Linear, use_cpu_kernel: bool):
        super().__init__()
        values, scale = quantize(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # parameters (that never take a gradient), not buffers: inside a compiled step dynamo keeps checking every
        # plain tensor input on each call even when told to trust its guards, but not parameters (about 1 ms a
        # step for Qwen2-0.5B's 338 int8 tensors)
        self.weight = nn.Parameter(values, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias  # the same Parameter: a loader may still be copying into it
        self.use_cpu_kernel = use_cpu_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= KERNEL_MAX_ROWS and x.device.type == "cpu" and self.use_cpu_kernel:
            out = torch.ops.llmga.gemv_int8(x.to(torch.float32), self.weight, self.scale)
        elif rows <= KERNEL_MAX_ROWS and torch.compiler.is_compiling():
            # a multiply-and-sum over the int8 blocks, which inductor fuses into one pass over the weights
            blocks = self.weight.view(self.out_features, -1, BLOCK).to(torch.float32)
            products = (x.to(torch.float32).unflatten(-1, (-1, BLOCK)).unsqueeze(-3) * blocks).sum(-1)
            out = (products * self.scale.to(torch.float32)).sum(-1)
        else:
            return nn.functional.linear(x, dequantize(self.weight, self.scale, x.dtype), self.bias)
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {BLOCK}"


def quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.in_features % BLOCK == 0


class Int8Quantizer:
    """Replaces the decoder's nn.Linear layers by Int8Linear as soon as the loader has copied their weight (and
    bias), so the float copy of each layer is freed before the next is read; `finish()` converts the LM head
    (after the vocabulary is shrunk) and anything whose weights never came."""

    def __init__(self, language_model: nn.Module):
        self.language_model = language_model
        # whether a step on the CPU (where the host may offload the model to) uses the int8 kernel
        self.use_cpu_kernel = cpu_kernels.available("int8")[0]
        self.waiting: dict[str, tuple[nn.Module, str, set[str]]] = {}  # key → (parent, child name, keys left)
        for name, module in language_model.model.named_modules():
            for child_name, child in module.named_children():
                if quantizable(child):
                    prefix = ".".join(p for p in ("model", name, child_name) if p)
                    keys = {f"{prefix}.weight"} | ({f"{prefix}.bias"} if child.bias is not None else set())
                    entry = (module, child_name, keys)
                    for key in keys:
                        self.waiting[key] = entry

    def _convert(self, parent: nn.Module, name: str) -> None:
        child = getattr(parent, name)
        if type(child) is nn.Linear:
            setattr(parent, name, Int8Linear(child, self.use_cpu_kernel))
            # the loader holds every parameter object until it returns: empty this one now, so the float weight
            # is freed layer by layer and a load never holds the whole float model
            child.weight.data = torch.empty(0, dtype=child.weight.dtype, device=child.weight.device)

    def loaded(self, key: str) -> None:
        entry = self.waiting.pop(key, None)
        if entry is None:
            return
        parent, name, keys = entry
        keys.discard(key)
        if not keys:
            self._convert(parent, name)
            _return_freed_memory()

    def finish(self) -> None:
        for parent, name, _ in list(self.waiting.values()):
            self._convert(parent, name)
        self.waiting.clear()
        head: Optional[nn.Module] = self.language_model.get_output_embeddings()
        if head is not None and quantizable(head):
            self.language_model.set_output_embeddings(Int8Linear(head, self.use_cpu_kernel))
