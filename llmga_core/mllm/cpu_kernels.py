"""The decode step's matrix-vector kernels for x86-64 CPUs with AVX-512 (cpu_kernels.cpp), as torch custom ops.

A one-token step reads every weight once and does two floating-point operations per weight, so it runs at the
rate the weights stream from memory only if the multiply is cheaper than the read. torch's code does not get
there on a CPU in bfloat16 or int8: its bfloat16 kernels widen every weight to float32 first (inductor's
fused reduction, about 18 GB/s on one core of an AVX-512 EPYC), and oneDNN re-lays the weights out at each call
unless they are packed into a second copy. cpu_kernels.cpp multiplies bfloat16 weights with AVX-512 BF16's
VDPBF16PS and int8 weights in blocks of 32 with a float16 scale each, accumulating in float32.

The library is compiled at first use with the C++ compiler torch's inductor uses (the compiled decode step
needs one anyway), into inductor's cache folder, keyed by the source, and loaded with ctypes; the ops are
`torch.ops.llmga.gemv_bf16` and `torch.ops.llmga.gemv_int8`, which a compiled step calls as opaque kernels.
Where the compiler, the processor or the operating system lacks what they need, `available()` says why and the
callers keep torch's code.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("llmga")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BF16, INT8 = 1, 2  # llmga_kernels_available()'s bits
INT8_BLOCK = 32  # values per float16 scale in the int8 format (llama.cpp's q8_0 uses the same block)


class _Library:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.llmga_kernels_available.restype = ctypes.c_int
        lib.llmga_gemv_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.llmga_gemv_int8.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.llmga_gemv_bf16.restype = lib.llmga_gemv_int8.restype = ctypes.c_int
        self.lib = lib
        self.features = int(lib.llmga_kernels_available())


def _cache_folder() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir()) / "llmga"
    except Exception:  # an older torch: its default place
        return Path(tempfile.gettempdir()) / "llmga_kernels"


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:
        return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[_Library], str]:
    """(the library, "") or (None, why it cannot be used here)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return None, f"the AVX-512 kernels are built for x86-64 Linux/macOS, not {platform.system()} {platform.machine()}"
    source = SOURCE.read_bytes()
    compiler = _compiler()
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
    digest = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    folder = _cache_folder()
    path = folder / f"llmga_cpu_kernels_{digest}.so"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                return None, f"compiling the CPU kernels with {compiler} failed ({detail[:200]})"
            os.replace(partial, path)  # atomic: another process may build the same file
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"compiling the CPU kernels with {compiler} failed ({type(error).__name__}: {error})"
    try:
        return _Library(path), ""
    except OSError as error:
        return None, f"loading the CPU kernels failed ({error})"


def available(kind: str) -> tuple[bool, str]:
    """(whether the "bf16" or "int8" kernel runs on this machine, why not)."""
    library, reason = _load()
    if library is None:
        return False, reason
    bit = BF16 if kind == "bf16" else INT8
    if not library.features & bit:
        need = "AVX-512 BF16" if kind == "bf16" else "AVX-512 (F, BW, VL) and F16C"
        return False, f"this processor lacks {need}"
    _define_ops()
    return True, ""


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _check(code: int, kind: str) -> None:
    if code != 0:
        raise RuntimeError(f"the {kind} CPU kernel cannot run on this processor")


_LIBRARY = None  # the op registrations live as long as this object


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.llmga, name)
        return True
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _define_ops() -> None:
    """Registers the two ops with torch's dispatcher directly: a call costs about 7 µs where torch.library.custom_op's
    wrapper costs 12 (a step makes one call per linear layer, 169 for Qwen2-0.5B)."""
    global _LIBRARY
    if _registered("gemv_bf16"):  # by another import of this package in the process (same library file)
        return
    kernels = _load()[0].lib
    library = torch.library.Library("llmga", "FRAGMENT")
    library.define("gemv_bf16(Tensor x, Tensor weight) -> Tensor")
    library.define("gemv_int8(Tensor x, Tensor weight, Tensor scale) -> Tensor")

    def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (…, K) bfloat16 · weight (N, K) bfloat16ᵀ → (…, N) float32."""
        x, weight = x.contiguous(), weight.contiguous()
        out = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
        _check(kernels.llmga_gemv_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), _rows(x), weight.shape[0],
                                       weight.shape[1], torch.get_num_threads()), "bfloat16")
        return out

    def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x (…, K) float32 · (weight (N, K) int8 × scale (N, K/32) float16 per block)ᵀ → (…, N) float32."""
        x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
        out = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
        _check(kernels.llmga_gemv_int8(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), out.data_ptr(), _rows(x),
                                       weight.shape[0], weight.shape[1], torch.get_num_threads()), "int8")
        return out

    def output_like(x, weight, scale=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)

    library.impl("gemv_bf16", gemv_bf16, "CPU")
    library.impl("gemv_int8", gemv_int8, "CPU")
    torch.library.register_fake("llmga::gemv_bf16", output_like, lib=library)
    torch.library.register_fake("llmga::gemv_int8", output_like, lib=library)
    _LIBRARY = library
