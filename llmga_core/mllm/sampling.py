"""How the next token is chosen: the folder's decoding settings and transformers 4.41's processors and warpers.

One home for the in-process decode loops (model.py's dynamic-cache loop and fast_decode.py's static-cache step)
and what they need from transformers' forward. The original called `generate(inputs_embeds=…)` with the settings
of the folder's generation_config.json (llmga/serve/cli.py).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .loader import FolderInfo


@dataclass
class Sampling:
    """The folder's end ids and the settings generate applied: repetition penalty (greedy too), top_k, top_p."""

    eos_ids: tuple[int, ...]
    repetition_penalty: float
    top_k: int
    top_p: float


def sampling_config(info: FolderInfo) -> Sampling:
    """The folder's end ids and decoding settings, as transformers 4.41's generate read them."""
    gen = info.generation
    source = gen if gen.get("_from_file") else info.config  # no generation_config.json → config.json
    eos = source.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    top_k = gen.get("top_k", 50)
    return Sampling(eos_ids=eos_ids, repetition_penalty=float(gen.get("repetition_penalty") or 1.0),
                     top_k=int(top_k) if top_k else 0, top_p=float(gen.get("top_p") or 1.0))


def next_token(sampling: Sampling, logits: torch.Tensor, generated: Optional[torch.Tensor], temperature: float,
           top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One step of transformers 4.41's processors and warpers on float32 logits (V,)."""
    penalty = sampling.repetition_penalty
    if penalty != 1.0 and generated is not None:
        picked = logits.gather(0, generated)
        logits = logits.scatter(0, generated, torch.where(picked < 0, picked * penalty, picked / penalty))
    if temperature <= 0:
        return logits.argmax()
    logits = logits / temperature
    top_k = min(sampling.top_k, logits.shape[0])
    if top_k > 0:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1:] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)[None]  # (1, V) as generate samples a batch
    return torch.multinomial(probs, 1, generator=generator)[0, 0]


def forward_argument_names(lm: nn.Module) -> tuple[str, Optional[str]]:
    """The KV-cache and logits-to-keep keyword names of this transformers version's forward."""
    names = inspect.signature(lm.forward).parameters
    cache_arg = "cache" if "cache" in names else "past_key_values"
    keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in names), None)
    return cache_arg, keep_arg
