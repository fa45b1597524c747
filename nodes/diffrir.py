"""DiffRIR nodes: load the restoration network and repair inpainted or outpainted images.

The ComfyUI face of Zj-BinXia/DiffRIR: inference_diffrir.py; the network, the input packing,
the exact tiling and the compositing live in llmga_core.diffrir. The restore node follows the
host's ImageUpscaleWithModel (comfy_extras/nodes_upscale_model.py): free_memory for the library's
memory plan, a ProgressBar per tile, the library's tile halving on the host's out-of-memory
exception, the model back to the offload device afterwards.
"""
from __future__ import annotations

import logging

import comfy.model_management as model_management
from comfy_api.latest import io, ui

from ..llmga_core.diffrir import MIN_TILE_SIZE, load_diffrir, plan_restore, restore
from .paths import DIFFRIR_FOLDER, list_model_files, register_model_folders, resolve_model_path
from .notes import log_notes, shown_text
from .progress import step_reporter

register_model_folders()  # idempotent; lets the combo list models/diffrir even if imported alone

log = logging.getLogger("llmga")

DiffRIRModel = io.Custom("DIFFRIR_MODEL")


class DiffRIRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffRIRLoader",
            display_name="Load DiffRIR Model",
            category="LLMGA/restoration",
            description="Loads released DiffRIR weights (x1, x2 or x4; .pth or .safetensors) from models/diffrir.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_files(DIFFRIR_FOLDER),
                               tooltip="DiffRIR weights under models/diffrir; the scale is read from the file."),
            ],
            outputs=[DiffRIRModel.Output(display_name="diffrir_model")],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        net = load_diffrir(resolve_model_path(DIFFRIR_FOLDER, model_name, want_dir=False))
        log.info("Loaded DiffRIR x%d from %s", net.scale, model_name)
        return io.NodeOutput(net)


class DiffRIRRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffRIRRestore",
            display_name="DiffRIR Restore (Inpaint Seams)",
            category="LLMGA/restoration",
            description="Removes texture, brightness and contrast differences between the regenerated region "
                        "and the preserved pixels, which come back exactly as in the reference; an image whose "
                        "mask is empty comes back as the reference, and the node says so.",
            inputs=[
                DiffRIRModel.Input("diffrir_model"),
                io.Image.Input("image", tooltip="The generated (inpainted or outpainted) image. For an x2 or x4 "
                                                "model, at 1/2 or 1/4 of the reference's size."),
                io.Image.Input("reference", tooltip="The original image; its pixels outside the mask are kept."),
                io.Mask.Input("mask", tooltip="White (>= 0.5) where the image was regenerated; the reference's size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the prior's starting noise (the original draws it unseeded)."),
                io.Int.Input("tile_size", default=512, min=0, max=16384, step=MIN_TILE_SIZE,
                             tooltip="Output pixels per tile; 0 runs the whole image at once. Tiling gives the "
                                     "same result and only bounds memory."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, diffrir_model, image, reference, mask, seed, tile_size) -> io.NodeOutput:
        net = diffrir_model
        generated = image[..., :3].movedim(-1, 1)
        original = reference[..., :3].movedim(-1, 1)
        mask = mask if mask.dim() == 3 else mask.unsqueeze(0)
        mask = mask.unsqueeze(1)
        plan = plan_restore(net, generated, original, mask, tile_size=tile_size)  # every check, before work
        device = model_management.get_torch_device()
        if plan.needs_network:  # with only empty masks the network is not moved at all
            model_management.free_memory(plan.memory_bytes, device)
            net.to(device)
        report = step_reporter(plan.images)

        def retry(tile: int) -> None:
            log.warning("DiffRIR ran out of memory; retrying with %d-pixel tiles.", tile)
            model_management.soft_empty_cache()

        try:
            restored = restore(net, generated, original, mask, seed=seed, tile_size=tile_size,
                               progress=report,  # after every tile: Cancel is checked there
                               out_of_memory=(model_management.OOM_EXCEPTION,), on_retry=retry, plan=plan)
        finally:
            if plan.needs_network:
                net.to(model_management.unet_offload_device())
        notes = log_notes("DiffRIR Restore", plan.notes)
        out = restored.movedim(1, -1).to(model_management.intermediate_device())
        return io.NodeOutput(out, ui=ui.PreviewText(shown_text("", notes)) if notes else None)


NODES = [DiffRIRLoader, DiffRIRRestore]
