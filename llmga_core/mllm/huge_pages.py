"""The language model's CPU weights on transparent huge pages (Linux).

A decode step reads every weight once, so its speed is the rate at which the weights stream from memory. With 4 KiB
pages that stream misses the TLB once every 4 KiB, and under a hypervisor each miss walks two page tables: reading
a 136 MB int8 head took 9.7 ms on 4 KiB pages and 6.6 ms on 2 MiB pages on the same core. torch's allocator gives
huge pages only when THP_MEM_ALLOC_ENABLE=1 is set before its first allocation, which a pack loaded into a running
ComfyUI cannot arrange, and advising memory that is already written (MADV_COLLAPSE) copies it at a few hundred MB/s.
So `place` copies the weights once into one private anonymous mapping that is advised for huge pages before it is
first written, one tensor at a time (the old storage is freed as each parameter moves, so the peak grows by one
tensor), and points each parameter and buffer at its slice. The module tree, the Parameter objects and their
values stay as they were; a model the host later moves off the CPU and back is placed again at its next decode.

Where the kernel offers no transparent huge pages (another OS, `never` in /sys/kernel/mm/transparent_hugepage/
enabled, a failed madvise), nothing is moved.
"""
from __future__ import annotations

import functools
import logging
import mmap
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("llmga")

HUGE_PAGE = 2 * 1024 * 1024
ALIGN = 64  # each tensor starts on a cache line
_ARENA = "_llmga_huge_page_arena"  # the module attribute holding the (first, end) addresses of its weights


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """None where anonymous memory can be advised onto transparent huge pages here, else why not."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are a Linux feature (this is {sys.platform})"
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "this kernel has no transparent huge pages"
    if "[never]" in mode:
        return "transparent huge pages are switched off (/sys/kernel/mm/transparent_hugepage/enabled: never)"
    return None


def allocate(size: int, *, inference: bool = False) -> Optional[torch.Tensor]:
    """`size` bytes (uint8) of private anonymous memory advised for transparent huge pages before anything is
    written to it, starting on a huge page boundary; None where the OS offers none. Every view of the tensor keeps
    the mapping alive, and the last one to go unmaps it. `inference`: an inference tensor (torch.inference_mode),
    whatever the mode of the caller."""
    if unavailable() is not None:
        return None
    length = (size + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE + HUGE_PAGE  # room to start on a boundary
    try:
        mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as error:
        log.debug("LLMGA MLLM: no huge pages (%s)", error)
        return None
    with torch.inference_mode(inference):
        memory = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + size]


def _holders(module: nn.Module) -> list[list[tuple[nn.Module, str, bool]]]:
    """The plain CPU parameters and buffers to move, each as the list of (module, name, is_parameter) that hold it
    (a tied or shared tensor is held by several). An input embedding is left where it is unless another module
    also uses its weight (a tied output head): a decode step reads one row of it."""
    groups: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    used_elsewhere: set[int] = set()
    embeddings: set[int] = set()
    for owner in module.modules():
        for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
                    continue
                # quantised parameter classes (bitsandbytes) carry state beside .data: left alone
                if type(tensor) is not (nn.Parameter if is_parameter else torch.Tensor):
                    continue
                groups.setdefault(id(tensor), []).append((owner, name, is_parameter))
                (embeddings if isinstance(owner, nn.Embedding) else used_elsewhere).add(id(tensor))
    return [holders for key, holders in groups.items() if key not in embeddings or key in used_elsewhere]


def _current(holders: list[tuple[nn.Module, str, bool]]) -> torch.Tensor:
    owner, name, is_parameter = holders[0]
    return (owner._parameters if is_parameter else owner._buffers)[name]


def _placed(module: nn.Module, groups) -> bool:
    spans = getattr(module, _ARENA, ())
    for holders in groups:
        tensor = _current(holders)
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        if not any(first <= start <= end <= last for first, last in spans):
            return False
    return True


def place(module: nn.Module) -> int:
    """Moves `module`'s CPU weights onto transparent huge pages unless they are there already; returns the bytes
    moved (0 when nothing moved)."""
    if unavailable() is not None:
        return 0
    groups = _holders(module)
    if not groups or _placed(module, groups):
        return 0
    spans, moved = [], 0
    # A model loaded under torch.inference_mode (ComfyUI runs every node so) has inference tensors for weights, and
    # a parameter made so cannot take a normal tensor as its data (nor the reverse): each kind gets memory of its own.
    for inference in (False, True):
        chosen = [holders for holders in groups if _current(holders).is_inference() == inference]
        span = _move(chosen, inference) if chosen else None
        if span is not None:
            spans.append(span)
            moved += span[1] - span[0]
    setattr(module, _ARENA, tuple(spans))
    return moved


def _move(groups, inference: bool) -> Optional[tuple[int, int]]:
    """Copies the tensors of `groups` into one new huge-page mapping and points their holders at the copies;
    returns the (first, end) addresses of the copies, or None where no such memory could be had."""
    sizes = [_current(holders).numel() * _current(holders).element_size() for holders in groups]
    total = sum((size + ALIGN - 1) // ALIGN * ALIGN for size in sizes)
    memory = allocate(total, inference=inference)
    if memory is None:
        return None
    first, offset = memory.data_ptr(), 0
    with torch.inference_mode(inference), torch.no_grad():
        for holders, size in zip(groups, sizes):
            tensor = _current(holders)
            target = memory[offset:offset + size].view(tensor.dtype).view(tensor.shape)
            target.copy_(tensor)
            for owner, name, is_parameter in holders:
                if is_parameter:
                    owner._parameters[name].data = target  # the same Parameter object: the module tree is kept
                else:
                    owner._buffers[name] = target
            del tensor  # the old storage goes now, so the peak grows by one tensor
            offset += (size + ALIGN - 1) // ALIGN * ALIGN
    return first, first + total
