"""Calling the caller's UNet: batching, progress and the checks of what it is given."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .schedule import _Schedule
PredictNoise = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]

@dataclass
class _Request:
    latents: torch.Tensor  # B×C×h×w
    embeds: torch.Tensor  # 1×L×C


def _call_batches(batches: Sequence[tuple[int, tuple]], max_batch: Optional[int]) -> list[int]:
    """The latent batch of each UNet call for one evaluation of requests given as (batch, embeds shape):
    consecutive requests whose embeddings have the same shape share calls of at most max_batch latents."""
    groups: list[list] = []
    for batch, embeds_shape in batches:
        if groups and groups[-1][1] == embeds_shape:
            groups[-1][0] += batch
        else:
            groups.append([batch, embeds_shape])
    calls = []
    for batch, _ in groups:
        step = batch if max_batch is None else max_batch
        calls.extend(min(step, batch - i) for i in range(0, batch, step))
    return calls


def _calls_for(batches: Sequence[tuple[int, tuple]], max_batch: Optional[int]) -> int:
    return len(_call_batches(batches, max_batch))


class _UNet:
    """predict_noise behind request batching, a call count and the progress callback."""

    def __init__(self, predict_noise: PredictNoise, max_batch: Optional[int], progress: Optional[Progress],
                 total: int):
        self.predict_noise = predict_noise
        self.max_batch = max_batch
        self.progress = progress
        self.total = total
        self.done = 0
        self.calls = 0

    def __call__(self, requests: Sequence[_Request], t: int, dtype: torch.dtype) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(requests):
            end = start + 1
            while end < len(requests) and requests[end].embeds.shape == requests[start].embeds.shape:
                end += 1
            group = requests[start:end]
            latents = torch.cat([r.latents for r in group])
            embeds = torch.cat([r.embeds.expand(r.latents.shape[0], -1, -1) for r in group])
            step = latents.shape[0] if self.max_batch is None else self.max_batch
            eps = torch.cat([self._call(latents[i:i + step], t, embeds[i:i + step], dtype)
                             for i in range(0, latents.shape[0], step)])
            outputs.extend(eps.split([r.latents.shape[0] for r in group]))
            start = end
        return outputs

    def _call(self, latents: torch.Tensor, t: int, embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        eps = self.predict_noise(latents, int(t), embeds)
        if not isinstance(eps, torch.Tensor) or eps.shape != latents.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"predict_noise returned {got} for latents of shape {tuple(latents.shape)}; "
                             f"it must return ε of the latents' shape.")
        self.calls += 1
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)  # the host's interrupt is raised here and propagates
        return eps.to(device=latents.device, dtype=dtype)


def _check_max_batch(max_batch) -> Optional[int]:
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive whole number or None, not {max_batch!r}.")
    return max_batch


def _shape(x: torch.Tensor) -> str:
    return "×".join(str(d) for d in x.shape)


def _check_embeds(embeds, name: str) -> None:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != 1:
        got = _shape(embeds) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be one text encoding of shape 1×L×C, not {got}.")


def _check_latents(x, name: str, batch: Optional[int] = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or (batch is not None and x.shape[0] != batch):
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        want = f"{batch}×C×h×w" if batch is not None else "N×C×h×w"
        raise ValueError(f"{name} must be a latent tensor of shape {want}, not {got}.")


def _check_timesteps(steps: Sequence[int], schedule: _Schedule) -> list[int]:
    values = [int(t) for t in steps]
    if not values:
        raise ValueError("timesteps is empty; pass timesteps(steps, skip).")
    if any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 1 or values[0] >= len(schedule):
        raise ValueError(f"timesteps must decrease strictly from at most {len(schedule) - 1} to at least 1, "
                         f"as timesteps(steps, skip) gives, not {values[:3]}…{values[-2:]}.")
    return values


def _check_per_step(x, name: str, count: int, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (count, *like.shape):
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must hold one map per timestep, of shape {count}×{_shape(like)}, not {got}.")


