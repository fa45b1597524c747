"""8-bit and 4-bit loading of the MLLM's language model through bitsandbytes (an optional dependency).

The original's `--load-8bit` / `--load-4bit` (LLMGA: llmga/llava/model/builder.py) hand transformers a
BitsAndBytesConfig: LLM.int8() with the outlier threshold 6.0, or NF4 with double quantisation and the
LLM dtype as compute dtype. The same bitsandbytes layers are used here, on the decoder's linear layers
only: the LM head stays in the LLM dtype (transformers never converts the output embedding), and so do
the vision tower and the projector (LLaVA loads CLIP apart, unquantised; the projector is kept too, see
docs/fidelity.md). Each linear layer is quantised as soon as the loader has copied its weight, so a quantised load
never holds the whole float model.

bitsandbytes is imported only when a quantisation is asked for. Whether it runs on the target device is
found out by running one small quantised layer there before anything heavy is loaded (bitsandbytes 0.45,
for instance, has no CPU kernels); every failure is one sentence that says what to do.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import warnings
from typing import Optional

import torch
from torch import nn

MODES = ("8bit", "4bit")  # through bitsandbytes
OWN_MODES = ("int8",)  # the pack's own format (int8_weights.py), no extra package
LABELS = {"8bit": "8-bit", "4bit": "4-bit"}
INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold, what load_in_8bit uses
NF4_BLOCKSIZE = 64


class QuantizationUnavailableError(ValueError):
    """8-bit/4-bit loading cannot run here (bitsandbytes missing, broken, or without kernels for the device)."""


def normalise(quantization) -> Optional[str]:
    """None for no quantisation, else "8bit", "4bit" or "int8"; anything else is refused in one sentence."""
    if quantization is None or quantization == "none":
        return None
    if quantization in MODES or quantization in OWN_MODES:
        return quantization
    raise ValueError(f"quantization is {quantization!r}; use None (no quantisation), 'int8' (the pack's 8-bit "
                     "weights, fast on CPUs), '8bit' (bitsandbytes' LLM.int8()) or '4bit' (NF4).")


def install_command(upgrade: bool = False) -> str:
    """The pip command for the Python that runs this code (ComfyUI's own, inside ComfyUI)."""
    return f"{sys.executable} -m pip install {'-U ' if upgrade else ''}bitsandbytes"


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be found, without importing it (importing it takes seconds)."""
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def import_bitsandbytes(mode: str):
    """The bitsandbytes module, or one sentence on why `mode` cannot be used."""
    label = LABELS[mode]
    try:
        import bitsandbytes
    except ImportError as error:
        if error.name == "bitsandbytes":
            raise QuantizationUnavailableError(
                f"{label} loading needs the bitsandbytes package, which is not installed: run "
                f"`{install_command()}` and restart, or load the model without quantization.") from None
        reason = f"{type(error).__name__}: {error}"
    except Exception as error:  # old releases fail in their CUDA set-up with all kinds of errors
        reason = f"{type(error).__name__}: {error}"
    else:
        return bitsandbytes
    raise QuantizationUnavailableError(
        f"{label} loading needs bitsandbytes, but importing the installed one failed ({_short(reason)}); "
        f"reinstall it with `{install_command(upgrade=True)}`, or load the model without quantization.")


def _short(text: str, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


@functools.lru_cache(maxsize=None)
def _layer_classes():
    """bitsandbytes' linear layers, made to keep their int8 state on the weight's device.

    Linear8bitLt moves the int8 matrix to `state.CB` at its first forward and only its own `.to()` moves it;
    a host that moves the whole model (ComfyUI's offload: model.to(offload_device)) reaches the layer through
    `_apply`, which would leave the int8 matrix and its scales behind on the GPU.
    """
    import bitsandbytes as bnb

    class Linear8bit(bnb.nn.Linear8bitLt):
        def _apply(self, fn, *args, **kwargs):
            result = super()._apply(fn, *args, **kwargs)
            weight, state = self.weight, self.state
            device = weight.device
            if getattr(weight, "CB", None) is not None:  # not run yet: the matrix and scales sit on the weight
                weight.CB = weight.data
                weight.SCB = weight.SCB.to(device) if weight.SCB is not None else None
            if state.CB is not None:
                state.CB = weight.data
            if state.SCB is not None:
                state.SCB = state.SCB.to(device)
            return result

    return Linear8bit, bnb.nn.Linear4bit, bnb.nn.Int8Params, bnb.nn.Params4bit


def quantized_layer(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer that takes over `linear`'s weight and bias tensors (no copy); its weight is
    quantised when the layer is moved to a device (`.to(device)`), as bitsandbytes does."""
    linear8bit, linear4bit, int8_params, params4bit = _layer_classes()
    has_bias = linear.bias is not None
    if mode == "8bit":
        layer = linear8bit(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                           threshold=INT8_THRESHOLD, device="meta")
        layer.weight = int8_params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                           compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = params4bit(linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                  compress_statistics=True, quant_type="nf4", module=layer)
        if compute_dtype != torch.bfloat16 or linear.out_features % 32:
            # bitsandbytes' packed AVX512-BF16 CPU kernel computes in bfloat16 whatever compute_dtype says, and
            # asserts an output size divisible by 32; elsewhere its plain path (dequantise, then matmul in the
            # compute dtype) runs
            layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.eval().requires_grad_(False)


def is_quantized(module: nn.Module) -> bool:
    linear8bit, linear4bit, _, _ = _layer_classes()
    return isinstance(module, (linear8bit, linear4bit))


class _QuietCastWarning(logging.Filter):
    """LLM.int8() casts its input to float16 by design and logs that on every call of every layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_QUIET = _QuietCastWarning()


def _quiet_bitsandbytes() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


# ------------------------------------------------------------------------------------------------ the check
@functools.lru_cache(maxsize=None)
def _probe(mode: str, device: str, dtype: torch.dtype) -> Optional[str]:
    """None when a small quantised layer runs on `device` and gives about the float result, else why not."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 128).requires_grad_(False)
    linear.weight.copy_(torch.randn(128, 256, generator=generator) * 0.05)
    linear.bias.copy_(torch.randn(128, generator=generator) * 0.05)
    x = torch.randn(4, 256, generator=generator)
    expected = (x.double() @ linear.weight.double().T + linear.bias.double()).float()
    tolerance = 0.05 if mode == "8bit" else 0.3  # relative error of int8 rows / NF4 blocks, with margin
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            layer = quantized_layer(linear.to(dtype), mode, dtype).to(device)
            stored = layer.weight.dtype
            if stored not in (torch.int8, torch.uint8):
                return f"a test layer kept its {str(stored).removeprefix('torch.')} weights"
            out = layer(x.to(device=device, dtype=dtype)).float().cpu()
    except Exception as error:  # bitsandbytes reports missing kernels with many exception types
        return _short(f"{type(error).__name__}: {error}") or type(error).__name__
    error = float((out - expected).norm() / expected.norm())
    if not error < tolerance:  # also catches NaN
        return f"a test layer's output is off by {error:.0%}"
    return None


def check_available(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses `mode` in one sentence unless bitsandbytes is importable and runs it on `device`."""
    bnb = import_bitsandbytes(mode)
    _quiet_bitsandbytes()
    reason = _probe(mode, str(torch.device(device)), dtype)
    if reason is not None:
        other = "8bit" if mode == "4bit" else "4bit"
        version = getattr(bnb, "__version__", "?")
        raise QuantizationUnavailableError(
            f"{LABELS[mode]} loading does not work on {torch.device(device).type} with the installed bitsandbytes "
            f"{version} ({reason}); choose {other} or no quantization, or upgrade it with "
            f"`{install_command(upgrade=True)}` (bitsandbytes 0.50 runs 8-bit and 4-bit on the CPU too).")


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hands the float copy of a layer just quantised back to the system. glibc serves allocations of up to the
    largest block freed so far from its heap and keeps what is freed there, so without this the float weights
    would stay resident and a quantised load would peak as high as a float one."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ----------------------------------------------------------------------------------------- the conversion
class LinearQuantizer:
    """Swaps the decoder's nn.Linear layers for bitsandbytes layers that share their (still empty) tensors;
    `loaded(key)` quantises a layer on `device` once the loader has copied its weight, so the float copy of
    that layer is freed before the next one is read. The LM head (outside the decoder) is left alone."""

    def __init__(self, language_model: nn.Module, mode: str, dtype: torch.dtype, device: torch.device):
        self.device = torch.device(device)
        self.pending: dict[str, nn.Module] = {}
        for name, module in list(language_model.model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    layer = quantized_layer(child, mode, dtype)
                    setattr(module, child_name, layer)
                    self.pending[".".join(p for p in ("model", name, child_name) if p) + ".weight"] = layer

    def loaded(self, key: str) -> None:
        layer = self.pending.pop(key, None)
        if layer is not None:
            layer.to(self.device)
            if self.device.type == "cpu":
                _return_freed_memory()

    def finish(self) -> None:
        """Quantises the layers whose weight never came (the loader then reports the missing weights)."""
        for key in list(self.pending):
            self.loaded(key)
