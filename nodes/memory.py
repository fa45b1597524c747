"""Which of the host's patchers owns a pack model's memory: the pack's one place for that choice.

ComfyUI 0.33's loaders build `comfy.model_patcher.CoreModelPatcher`, which main.py rebinds to
`ModelPatcherDynamic` when dynamic VRAM (comfy-aimdo) starts on a GPU; under --cpu or --disable-dynamic-vram
it stays `ModelPatcher` (and ModelPatcherDynamic.__new__ returns a plain one for a CPU load device).
ComfyUI 0.3.64 has no CoreModelPatcher.

Dynamic VRAM streams only comfy.ops layers (`comfy_cast_weights`): their weights live in an aimdo VBAR that
aimdo empties when other allocations need the GPU. Plain torch layers (the transformers MLLM, DiffRIR)
ModelPatcherDynamic.load copies to the GPU as ordinary tensors, which aimdo cannot evict, and
comfy/model_management.py free_memory never unloads a dynamic patcher for another dynamic model's load
(`for_dynamic`). So a big MLLM under a dynamic patcher would stay on the GPU while SDXL samples. A plain
ModelPatcher is still unloaded there, layer by layer as far as the estimate says; its own load (never
dynamic) shrinks the dynamic models' VBARs; unload_all_models (POST /free) detaches both kinds.
Hence: the host's factory for models made only of comfy.ops layers, the plain ModelPatcher otherwise.
"""
from __future__ import annotations

import comfy.model_patcher
import torch


def streamable(module: torch.nn.Module) -> bool:
    """True when every parameter of `module` sits in a comfy.ops layer, the layers dynamic VRAM streams
    (comfy/ops.py: `comfy_cast_weights`); a model without parameters has nothing to stream."""
    seen = False
    for layer in module.modules():
        own = next(layer.parameters(recurse=False), None)
        if own is None:
            continue
        if not hasattr(layer, "comfy_cast_weights"):
            return False
        seen = True
    return seen


def host_factory():
    """The class the host's own loaders construct for their models now (looked up at call time: main.py
    rebinds it after start-up checks); the plain ModelPatcher where the host has no such factory (0.3.64)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def model_patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                  size: int = 0) -> comfy.model_patcher.ModelPatcher:
    """The patcher that puts `module` under the host's memory management: registered by load_models_gpu,
    offloaded when another model needs the room, loaded back by the next load_models_gpu, released by
    unload_all_models. `size` is the bytes the host counts for it (0: the module's state dict)."""
    factory = host_factory() if streamable(module) else comfy.model_patcher.ModelPatcher
    return factory(module, load_device=load_device, offload_device=offload_device, size=size)
