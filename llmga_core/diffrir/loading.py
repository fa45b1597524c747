"""Loading released DiffRIR weights strictly: sizes and scale read from the state dict, every key checked.

The released files are BasicSR checkpoints (Zj-BinXia/DiffRIR, options/*.yml): a .pth whose `params_ema`
holds the generator's 615 keys, with CPEN and the denoiser stored twice and the diffusion schedule as
buffers. Files are opened by llmga_core.weights (pickles only with torch.load(weights_only=True)).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..memory import trim_heap_when_freed
from ..weights import load_pickle, load_weights
from .network import INPUT_CHANNELS, SHARED_PREFIXES, DiffRIRConfig, DiffRIRS2, diffusion_schedule

log = logging.getLogger("llmga")

HINT = "use a DiffRIR x1/x2/x4 .pth or .safetensors file."


def _read_state_dict(path: Path) -> dict:
    """The flat state dict in a released .pth (BasicSR's dict: `params_ema`, else `params`) or .safetensors."""
    if path.suffix.lower() == ".safetensors":
        return load_weights(path)
    loaded = load_pickle(path)
    if isinstance(loaded, dict) and "params_ema" in loaded:
        loaded = loaded["params_ema"]
    elif isinstance(loaded, dict) and "params" in loaded:
        log.warning("%s has no 'params_ema' (the EMA weights the original loads); using its "
                    "'params' (the non-EMA weights) instead.", path.name)
        loaded = loaded["params"]
    elif not (isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ValueError(f"{path.name} holds no DiffRIR state dict (no 'params_ema' or 'params' entry and no "
                         f"flat dict of tensors); {HINT}")
    if not isinstance(loaded, dict):
        raise ValueError(f"{path.name} holds no DiffRIR state dict; {HINT}")
    return loaded


def _count_from(state: dict, prefix: str, first: int, suffix: str) -> int:
    """How many consecutive indices from `first` have the key prefix<index>suffix."""
    n = 0
    while f"{prefix}{first + n}{suffix}" in state:
        n += 1
    return n


def _count(state: dict, prefix: str, suffix: str) -> int:
    return _count_from(state, prefix, 0, suffix)


def _config_from_state_dict(state: dict, name: str) -> DiffRIRConfig:
    """Reads every size from the tensors; a missing key raises KeyError naming it."""

    def shape(key):
        if key not in state:
            raise KeyError(key)
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' is a {type(state[key]).__name__}, not a "
                             f"tensor; {HINT}")
        return tuple(state[key].shape)

    first_conv = shape("G.patch_embed.proj.weight")
    scales = {channels: scale for scale, channels in INPUT_CHANNELS.items()}
    if len(first_conv) != 4 or first_conv[1] not in scales:
        raise ValueError(f"{name} is not DiffRIR weights: 'G.patch_embed.proj.weight' has shape {first_conv}, "
                         f"while DiffRIR's first convolution takes 96 (x1), 60 (x2) or 51 (x4) channels; "
                         f"{HINT}")
    dim = first_conv[0]
    stages = ("G.encoder_level1.", "G.encoder_level2.", "G.encoder_level3.", "G.latent.")
    num_blocks = tuple(_count(state, p, ".norm1.body.weight") for p in stages)
    heads, hidden = [], []
    for level, prefix in enumerate(stages):
        if num_blocks[level]:
            heads.append(shape(prefix + "0.attn.temperature")[0])
            hidden.append(shape(prefix + "0.ffn.project_out.weight")[1])
        else:  # an empty level leaves its sizes unused
            heads.append(1)
            hidden.append(1)
    if num_blocks[0] == 0:
        raise KeyError("G.encoder_level1.0.norm1.body.weight")
    prior_feats = shape("condition.E.0.weight")[0]
    res_blocks = _count_from(state, "condition.E.", 2, ".body.0.weight")  # E.0 conv, E.1 LeakyReLU
    timesteps = shape("diffusion.betas")[0]
    return DiffRIRConfig(
        scale=scales[first_conv[1]], dim=dim, num_blocks=num_blocks,
        num_refinement_blocks=_count(state, "G.refinement.", ".norm1.body.weight"),
        heads=tuple(heads), ffn_hidden=tuple(hidden), prior_feats=prior_feats,
        prior_res_blocks=res_blocks,
        denoise_res_blocks=_count_from(state, "denoise.resmlp.", 2, ".resmlp.0.weight"),
        timesteps=timesteps,
    )


def _check_state_dict(state: dict, expected: dict, name: str, config: DiffRIRConfig) -> None:
    """Strict comparison with the expected layout: keys, shapes, shared copies, the schedule."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"{name} is not DiffRIR weights: it lacks '{missing[0]}' "
                         f"({len(missing)} of the {len(expected)} expected keys missing); {HINT}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"{name} is not DiffRIR weights: it has the unexpected key '{unexpected[0]}' "
                         f"({len(unexpected)} unexpected in all); {HINT}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' is a {type(tensor).__name__}, "
                             f"not a tensor; {HINT}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{name} does not match the DiffRIR architecture: '{key}' has shape "
                             f"{tuple(tensor.shape)} where {tuple(expected[key].shape)} is expected; {HINT}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} is not DiffRIR weights: '{key}' holds {tensor.dtype} values; {HINT}")
    for copy_prefix, primary_prefix in SHARED_PREFIXES:
        for key in expected:
            if key.startswith(copy_prefix):
                primary = primary_prefix + key[len(copy_prefix):]
                if not torch.equal(state[key], state[primary]):
                    raise ValueError(f"{name} is inconsistent: '{key}' differs from '{primary}', which "
                                     f"the DiffRIR network shares; the file is damaged or not DiffRIR weights.")
    schedule = diffusion_schedule(config.timesteps, config.linear_start, config.linear_end)
    for buffer, value in schedule.items():
        stored = state[f"diffusion.{buffer}"].float()
        if not torch.allclose(stored, value, rtol=1e-5, atol=1e-7):
            raise ValueError(f"{name} has a 'diffusion.{buffer}' that differs from DiffRIR's linear "
                             f"{config.linear_start}–{config.linear_end} schedule over {config.timesteps} "
                             f"steps; the file is damaged or not DiffRIR weights.")


def load_diffrir(path) -> DiffRIRS2:
    """Loads released DiffRIR weights (x1, x2 or x4) strictly; sizes and scale come from the file.

    `.pth`/`.pt`: BasicSR's dict, whose `params_ema` is used (like the original), `params` only
    when there is no `params_ema`; read with torch.load(weights_only=True), so a pickle that
    would run code is refused. `.safetensors`: the flat state dict. Every key and shape must
    match, including the duplicated `diffusion.condition.*` / `diffusion.model.*` copies (which
    must equal the primary copies) and the 12 schedule buffers. Returns the network in eval mode
    on the CPU, in float32, with `.scale` and `.config`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiffRIR weights not found: {path}.")
    state = _read_state_dict(path)
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    try:
        config = _config_from_state_dict(state, path.name)
    except KeyError as error:
        raise ValueError(f"{path.name} is not DiffRIR weights: it lacks '{error.args[0]}'; {HINT}") from None
    with torch.device("meta"):
        expected = DiffRIRS2(config).state_dict()
    _check_state_dict(state, expected, path.name, config)
    net = DiffRIRS2(config)
    net.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    trim_heap_when_freed(net)  # so the host's /free gives the RAM back
    return net.eval()
