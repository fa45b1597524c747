"""The fault matrix: bad inputs, damaged model files, interrupts and /free against a real ComfyUI server.

Every case asserts the message the user sees (the node's error, the server's refusal of the prompt, or the
note the node shows), that the server process lives on, and that the next prompt succeeds. The cases are
the bad inputs of issues 7-11 that exist in the pack, plus /interrupt during MLLM generation, DiffRIR tiles
and editing, a model file deleted between two runs, truncated files, pickles that try to run code (a marker
file proves nothing ran), model names that leave the model folders, a 10,000-character instruction, a batch
of 8 images, RGBA, grayscale and 1-pixel images, and /free during a run.

Set LLMGA_FAULT_TABLE=<file> to write the matrix as a Markdown table (case, message, server alive, next
prompt ok).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.host import (DIFFRIR_X1, EDIT_VAE, ONE_THREAD, REPO, VISION_TOWER, ComfyServer, ProgressWatch,
                        comfyui_version, execution_error, executed_nodes, models_base)

QWEN = "llmga-Qwen2-0.5B-full-finetune"
LLAMA3 = "llmga-llama3-8b-it-full-finetune"
SD15 = "llmga-sd15-t2i-v2"
SD15_INPAINT = "llmga-sd15-inpainting-v2"
SDXL = "llmga-sdxl-t2i"
LONG_TEXT = ("a red house on a green hill under a blue sky, " * 230)[:10000]
ROWS: list[tuple[str, str, bool, bool]] = []  # (case, message, server alive, next prompt ok)
_seeds = itertools.count(1000)


# ----------------------------------------------------------------------------------------------- graphs
def mllm_loader(model=QWEN):
    return {"class_type": "LLMGAMLLMLoader", "inputs": {"model_name": model, "dtype": "float32"}}


def generator(mllm, task, instruction, *, image=None, mask=None, conversation=None, tokens=8):
    inputs = {"mllm": mllm, "task": task, "instruction": instruction, "temperature": 0.0, "top_p": 1.0,
              "max_new_tokens": tokens, "seed": next(_seeds)}
    for name, link in (("image", image), ("mask", mask), ("conversation", conversation)):
        if link is not None:
            inputs[name] = link
    return {"class_type": "LLMGAPromptGenerator", "inputs": inputs}


def show(source):
    return {"class_type": "PreviewAny", "inputs": {"source": source}}


def load_image(name):
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def solid_mask(value, width=64, height=64):
    return {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}


def repeat(image, amount):
    return {"class_type": "RepeatImageBatch", "inputs": {"image": image, "amount": amount}}


def with_alpha(image, alpha):
    return {"class_type": "JoinImageWithAlpha", "inputs": {"image": image, "alpha": alpha}}


def ask(task="text-to-image", instruction="a red boat", *, model=QWEN, tokens=8, **links) -> dict:
    """Loader + Prompt Generator + a display of its prompt; links as (node, output) of images added by extra."""
    extra = links.pop("extra", {})
    return {**extra, "m": mllm_loader(model), "g": generator(["m", 0], task, instruction, tokens=tokens, **links),
            "s": show(["g", 0])}


def restore(image, reference, mask, *, extra, tile=32, model=DIFFRIR_X1, seed=None) -> dict:
    return {**extra, "dl": {"class_type": "DiffRIRLoader", "inputs": {"model_name": model}},
            "dr": {"class_type": "DiffRIRRestore", "inputs": {
                "diffrir_model": ["dl", 0], "image": image, "reference": reference, "mask": mask,
                "seed": next(_seeds) if seed is None else seed, "tile_size": tile}},
            "ds": {"class_type": "SaveImage", "inputs": {"images": ["dr", 0], "filename_prefix": "fault"}}}


def render(*, mllm=QWEN, sd=SD15, instruction="a red boat", text=None, pipeline="sd15", tokens=8) -> dict:
    """Text to image: an MLLM prompt (or `text`) through the long-prompt encoder, sampled and saved."""
    graph = {"c": {"class_type": "LLMGACheckpointLoader", "inputs": {"model_name": sd}},
             "e": {"class_type": "LLMGALongCLIPTextEncode", "inputs": {
                 "clip": ["c", 1], "text": text, "pipeline": pipeline, "negative_text": "", "layout": "inference"}},
             "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "k": {"class_type": "KSampler", "inputs": {
                 "model": ["c", 0], "positive": ["e", 0], "negative": ["e", 1], "latent_image": ["l", 0],
                 "seed": next(_seeds), "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                 "denoise": 1.0}},
             "v": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["c", 2]}},
             "o": {"class_type": "SaveImage", "inputs": {"images": ["v", 0], "filename_prefix": "fault"}}}
    if text is None:
        graph.update({"m": mllm_loader(mllm), "g": generator(["m", 0], "text-to-image", instruction, tokens=tokens)})
        graph["e"]["inputs"]["text"] = ["g", 0]
    return graph


def edit(*, model=SD15, source="a house on a hill", target="a house on a hill in snow", steps=2, skip=25,
         image="llmga_edit_example.png", mask=None, extra=None) -> dict:
    graph = {**(extra or {}), "ei": load_image(image),
             "ec": {"class_type": "LLMGACheckpointLoader", "inputs": {"model_name": model}},
             "ev": {"class_type": "VAELoader", "inputs": {"vae_name": EDIT_VAE}},
             "es": {"class_type": "PrimitiveString", "inputs": {"value": source}},
             "et": {"class_type": "PrimitiveString", "inputs": {"value": target}},
             "ee": {"class_type": "LLMGAEdit", "inputs": {
                 "model": ["ec", 0], "clip": ["ec", 1], "vae": ["ev", 0], "image": ["ei", 0],
                 "source_prompt": ["es", 0], "target_prompt": ["et", 0], "steps": steps, "skip": skip,
                 "source_guidance": 3.5, "target_guidance": 7.5, "mask_threshold_ratio": 3.0, "seed": next(_seeds)}},
             "eo": {"class_type": "SaveImage", "inputs": {"images": ["ee", 0], "filename_prefix": "fault"}}}
    if mask is not None:
        graph["ee"]["inputs"]["mask"] = mask
    return graph


FLUSH = {"f1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "f2": {"class_type": "PreviewImage", "inputs": {"images": ["f1", 0]}}}


def flush(server):
    """A prompt without the pack's nodes: the host's default cache drops every output the next prompt does not
    share, so loaders of the prompt after it run again (as after switching workflows)."""
    assert server.run(FLUSH)["status"]["status_str"] == "success"


# ----------------------------------------------------------------------------------------------- the server
class Evil:
    """Unpickling this calls open(marker, "w"), which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def real_copy(link: Path, target: Path) -> Path:
    shutil.copytree(os.path.realpath(link), target)
    return target


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from PIL import Image
    import numpy as np

    from tests.fixtures.tiny_diffrir import make_diffrir_weights
    from tests.fixtures.tiny_mllm import make_mllm_folder
    from tests.fixtures.tiny_sd import make_sd_folder

    base = models_base(tmp_path_factory.mktemp("fault_base"))
    models, marker = base / "models", base / "code_ran.marker"
    llm, sd, rir = models / "LLM", models / "diffusers", models / "diffrir"
    # models of the matrix's own, to damage
    real_copy(llm / QWEN, llm / "fault-qwen2")
    sharded = make_mllm_folder(llm, "qwen2", name="fault-sharded", sharded=True)
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a download cut short
    pickled = real_copy(llm / QWEN, llm / "fault-pickle")
    (pickled / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil(marker)}, pickled / "pytorch_model.bin")
    no_tokenizer = real_copy(llm / QWEN, llm / "fault-no-tokenizer")
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    bad_tokenizer = real_copy(llm / LLAMA3, llm / "fault-bad-tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    plain = real_copy(llm / QWEN, llm / "fault-plain-llm")
    config = json.loads((plain / "config.json").read_text())
    for key in [k for k in config if k.startswith("mm_")]:
        del config[key]
    (plain / "config.json").write_text(json.dumps(config))
    sd_pickle = real_copy(sd / SD15, sd / "fault-pickle-sd")
    for file in (sd_pickle / "unet").glob("*.safetensors"):
        file.unlink()
    torch.save({"conv_in.weight": Evil(marker)}, sd_pickle / "unet" / "diffusion_pytorch_model.bin")
    sd_truncated = real_copy(sd / SD15, sd / "fault-truncated-sd")
    unet_file = next((sd_truncated / "unet").glob("*.safetensors"))
    unet_file.write_bytes(unet_file.read_bytes()[: unet_file.stat().st_size // 3])
    outside = make_sd_folder(sd, "sd15", name="fault-outside-shard", sharded=True, light=True)
    index = next((outside / "unet").glob("*.index.json"))
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../../outside.safetensors"
    index.write_text(json.dumps(data))
    mixed = real_copy(sd / SD15, sd / "fault-mixed-sd")
    shutil.copy(os.path.realpath(sd / SDXL / "unet" / "config.json"), mixed / "unet" / "config.json")
    mismatched = real_copy(sd / SD15, sd / "fault-mismatch-sd")
    unet_config = json.loads((mismatched / "unet" / "config.json").read_text())
    unet_config["layers_per_block"] += 1  # a second res block per level the weights do not have
    (mismatched / "unet" / "config.json").write_text(json.dumps(unet_config))
    torch.save({"params_ema": Evil(marker)}, rir / "fault_pickle.pth")
    make_diffrir_weights(rir / "fault_truncated.pth", scale=1)
    (rir / "fault_truncated.pth").write_bytes((rir / "fault_truncated.pth").read_bytes()[:4000])
    torch.save({"params_ema": {"conv.weight": torch.zeros(3, 3)}}, rir / "fault_not_diffrir.pth")
    # input pictures
    inputs = base / "input"
    inputs.mkdir(exist_ok=True)
    for name in ("llmga_inpaint_example.png", "llmga_similar_example.png", "llmga_edit_example.png"):
        shutil.copy(REPO / "workflows" / name, inputs / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype("uint8")).save(inputs / "rgb64.png")
    Image.fromarray(rng.integers(0, 256, (48, 64)).astype("uint8"), "L").save(inputs / "gray.png")
    Image.fromarray((rng.integers(0, 65536, (64, 64))).astype("uint16")).save(inputs / "gray16.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(inputs / "pixel.png")
    Image.new("RGBA", (1, 1), (200, 30, 30, 0)).save(inputs / "pixel_rgba.png")
    return base


@pytest.fixture(scope="module")
def server(base):
    srv = ComfyServer(base, env=ONE_THREAD).start()
    yield srv
    srv.stop()
    table = os.environ.get("LLMGA_FAULT_TABLE")
    if table:
        lines = ["| case | message the user sees | server alive | next prompt ok |", "|---|---|---|---|"]
        lines += [f"| {case} | {msg.replace('|', '/')} | {'yes' if alive else 'NO'} | {'yes' if ok else 'NO'} |"
                  for case, msg, alive, ok in ROWS]
        Path(table).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def watch(server):
    return ProgressWatch(server)


def next_prompt_ok(server) -> bool:
    """A normal prompt right after the fault: the MLLM writes a prompt and SD renders it."""
    entry = server.run(render())
    return entry["status"]["status_str"] == "success"


def record(server, case: str, message: str) -> None:
    alive = server.alive()
    ok = alive and next_prompt_ok(server)
    ROWS.append((case, " ".join(message.split()), alive, ok))
    assert alive, f"the server died after {case}:\n{server.log()[-3000:]}"
    assert ok, f"the next prompt failed after {case}:\n{server.log()[-3000:]}"


# ----------------------------------------------------------------------------------------------- the cases
@dataclass
class Fault:
    id: str
    prompt: Callable[[], dict]
    node: str  # the class_type whose message the user sees
    says: str  # part of that message
    outcome: str = "error"  # error: the node fails; refused: /prompt answers 400; note: runs, the node says it
    check: Callable[[dict, Path], str | None] | None = None  # more to assert (may return what the user sees)


def saved_images(count):
    def check(entry, base):
        images = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
        assert len(images) == count, entry["outputs"]
        return f"runs; {count} image(s) saved"
    return check


def nothing_ran(entry, base):
    assert not (base / "code_ran.marker").exists(), "unpickling ran code"


def name_outside_the_list(id: str, prompt: Callable[[], dict], node: str, widget: str, name: str, says: str) -> Fault:
    """A model name that is not in the loader's list. ComfyUI 0.33 checks V3 combo values at /prompt (execution.py
    validate_inputs: value_not_in_list) and refuses the prompt naming the value; 0.3.64 does not, so the loader's
    own check refuses it with `says` before anything is read."""
    if comfyui_version() >= (0, 4):
        return Fault(id, prompt, node, f"Value not in list: {widget}: {name!r} not in", "refused")
    return Fault(id, prompt, node, says)


RGB = {"i": load_image("rgb64.png")}
EDIT_CAPTIONS = dict(source="a house on a hill", target="a house on a hill in snow")

FAULTS = [
    # --- Prompt Generator inputs (issues 8, 10, 11)
    Fault("empty instruction", lambda: ask(instruction="   "), "LLMGAPromptGenerator", "The instruction is empty"),
    Fault("similar-image without an image", lambda: ask("similar-image", ""), "LLMGAPromptGenerator",
          "needs an image; connect one to the image input"),
    Fault("inpainting without a mask", lambda: ask("inpainting", "", image=["i", 0], extra=RGB),
          "LLMGAPromptGenerator", "needs a mask"),
    Fault("mask without its image", lambda: ask("chat", "describe", mask=["mk", 0], extra={"mk": solid_mask(1.0)}),
          "LLMGAPromptGenerator", "A mask was given without its image; connect the image"),
    Fault("editing without an image", lambda: ask("editing", "Make it snowy."), "LLMGAPromptGenerator",
          "The editing task needs the image to edit; connect it to the image input"),
    Fault("editing continuing a conversation", lambda: {
        **ask("similar-image", "", image=["i", 0], extra=RGB),
        "g2": generator(["m", 0], "editing", "Make it snowy.", image=["i", 0], conversation=["g", 2]),
        "s2": show(["g2", 0])}, "LLMGAPromptGenerator", "disconnect the conversation input"),
    Fault("text-to-image with an image", lambda: ask(image=["i", 0], extra=RGB), "LLMGAPromptGenerator",
          "The text-to-image task takes no image"),
    Fault("'<image>' typed in the instruction", lambda: ask("chat", "look at <image> here"), "LLMGAPromptGenerator",
          "contains '<image>'"),
    Fault("conversation continued on another model", lambda: {
        **ask(), "m2": mllm_loader(LLAMA3), "g2": generator(["m2", 0], "chat", "more", conversation=["g", 2]),
        "s2": show(["g2", 0])}, "LLMGAPromptGenerator",
          "connect the MLLM that started it, or disconnect the conversation input to start a new one"),
    Fault("conversation continued with another image", lambda: {
        **ask("similar-image", "", image=["i", 0], extra={**RGB, "j": load_image("llmga_similar_example.png")}),
        "g2": generator(["m", 0], "chat", "more", image=["j", 0], conversation=["g", 2]), "s2": show(["g2", 0])},
          "LLMGAPromptGenerator", "This conversation was started with another image"),
    Fault("mask of another size than the image", lambda: ask(
        "inpainting", "", image=["i", 0], mask=["mk", 0], extra={**RGB, "mk": solid_mask(1.0, 32, 32)}),
          "LLMGAPromptGenerator", "The mask is 32×32 but the image is 64×64"),
    Fault("answer without <gen_image>", lambda: ask(), "LLMGAPromptGenerator",
          "no <gen_image> tag in the answer; the whole answer is used as the prompt", "note"),
    Fault("10,000-character instruction", lambda: ask(instruction=LONG_TEXT, tokens=4), "LLMGAPromptGenerator",
          "stopped at max_new_tokens (4)", "note"),
    Fault("batch of 8 images to the MLLM", lambda: ask(
        "similar-image", "", image=["b", 0], extra={**RGB, "b": repeat(["i", 0], 8)}), "LLMGAPromptGenerator",
          "The image batch has 8 images; the assistant looks at the first", "note"),
    Fault("RGBA image to the MLLM", lambda: ask(
        "similar-image", "", image=["a", 0],
        extra={**RGB, "mk": solid_mask(0.5), "a": with_alpha(["i", 0], ["mk", 0])}),
          "LLMGAPromptGenerator", "no <gen_image> tag", "note"),
    Fault("grayscale PNG to the MLLM",
          lambda: ask("similar-image", "", image=["i", 0], extra={"i": load_image("gray.png")}),
          "LLMGAPromptGenerator", "no <gen_image> tag", "note"),
    Fault("1-pixel image to the MLLM",
          lambda: ask("similar-image", "", image=["i", 0], extra={"i": load_image("pixel.png")}),
          "LLMGAPromptGenerator", "no <gen_image> tag", "note"),
    Fault("1-pixel RGBA image to inpainting", lambda: ask(
        "inpainting", "", image=["i", 0], mask=["i", 1], extra={"i": load_image("pixel_rgba.png")}),
          "LLMGAPromptGenerator", "no <gen_image> tag", "note"),
    # --- long-prompt encoder
    Fault("10,000-character prompt to the long-prompt encoder", lambda: render(text=LONG_TEXT),
          "LLMGALongCLIPTextEncode", "pipeline encodes at most 225, so it keeps the first 225 and drops the rest", "note"),
    Fault("SDXL pipeline on an SD1.5 CLIP", lambda: render(pipeline="sdxl"), "LLMGALongCLIPTextEncode",
          "needs an SDXL CLIP (CLIP-L + CLIP-G), but the connected CLIP is an SD1.5 CLIP"),
    # --- DiffRIR inputs
    Fault("batch of 8 images to DiffRIR", lambda: restore(
        ["b", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0), "b": repeat(["i", 0], 8)}),
          "DiffRIRRestore", "", "ok", saved_images(8)),
    Fault("RGBA reference and grayscale 16-bit image to DiffRIR", lambda: restore(
        ["g", 0], ["a", 0], ["mk", 0], extra={**RGB, "g": load_image("gray16.png"), "mk": solid_mask(1.0),
                                              "a": with_alpha(["i", 0], ["mk", 0])}),
          "DiffRIRRestore", "", "ok", saved_images(1)),
    Fault("1-pixel image to DiffRIR",
          lambda: restore(["i", 0], ["i", 0], ["i", 1], extra={"i": load_image("pixel_rgba.png")}),
          "DiffRIRRestore", "The reference is 1×1 pixels, too small for DiffRIR's reflect padding"),
    Fault("DiffRIR mask of another size", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0, 32, 32)}),
          "DiffRIRRestore", "The mask is 32×32 pixels but the reference is 64×64"),
    Fault("DiffRIR batches that do not pair", lambda: restore(
        ["b", 0], ["c", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0), "b": repeat(["i", 0], 8),
                                               "c": repeat(["i", 0], 3)}),
          "DiffRIRRestore", "The batch sizes differ: 8 generated image(s), 3 reference(s) and 1 mask(s)"),
    Fault("DiffRIR tile_size below the minimum", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0)}, tile=5),
          "DiffRIRRestore", "tile_size must be 0 (the whole image at once; None too in Python) or at least 32 pixels; got 5"),
    Fault("DiffRIR generated image of the wrong size", lambda: restore(
        ["j", 0], ["i", 0], ["mk", 0], extra={**RGB, "j": load_image("gray.png"), "mk": solid_mask(1.0)}),
          "DiffRIRRestore", "The generated image is 64×48 pixels but this x1 DiffRIR model needs 64×64"),
    Fault("DiffRIR empty mask", lambda: restore(["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(0.0)}),
          "DiffRIRRestore", "is empty, so nothing was restored", "note"),
    # --- LLMGA Edit inputs (issue 8)
    Fault("SDXL MODEL to LLMGA Edit", lambda: edit(model=SDXL, **EDIT_CAPTIONS), "LLMGAEdit",
          "the connected MODEL is an SDXL model; load the llmga-sd15-t2i checkpoint"),
    Fault("inpainting MODEL to LLMGA Edit", lambda: edit(model=SD15_INPAINT, **EDIT_CAPTIONS), "LLMGAEdit",
          "the connected MODEL is an inpainting UNet"),
    Fault("LLMGA Edit steps out of range for skip", lambda: edit(steps=999, skip=99), "LLMGAEdit",
          "steps must be a whole number from 1 to"),
    Fault("LLMGA Edit with an empty source caption", lambda: edit(source=" "), "LLMGAEdit", "source_prompt is empty"),
    Fault("LLMGA Edit mask of another size", lambda: edit(mask=["mk", 0], extra={"mk": solid_mask(1.0, 32, 32)}),
          "LLMGAEdit", "The mask is 32×32 but the image is"),
    # --- model names and model files (issues 9, 10, 11)
    name_outside_the_list("MLLM name with ../", lambda: ask(model="../../etc"), "LLMGAMLLMLoader", "model_name",
                          "../../etc", "Model name '../../etc' must be a path inside the LLM model folders (no "
                                       "absolute paths, no '..')"),
    name_outside_the_list("MLLM name as an absolute path", lambda: ask(model="/etc"), "LLMGAMLLMLoader", "model_name",
                          "/etc", "Model name '/etc' must be a path inside the LLM model folders"),
    name_outside_the_list("checkpoint name with ../", lambda: render(sd="../diffusers/" + SD15),
                          "LLMGACheckpointLoader", "model_name", "../diffusers/" + SD15,
                          "must be a path inside the diffusers model folders"),
    name_outside_the_list("DiffRIR name as an absolute path", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0)}, model="/etc/passwd"),
          "DiffRIRLoader", "model_name", "/etc/passwd", "must be a path inside the diffrir model folders"),
    Fault("MLLM pickle that runs code", lambda: ask(model="fault-pickle"), "LLMGAMLLMLoader",
          "holds pickled objects other than tensors", check=nothing_ran),
    Fault("SD UNet pickle that runs code", lambda: render(sd="fault-pickle-sd"), "LLMGACheckpointLoader",
          "holds pickled objects other than tensors", check=nothing_ran),
    Fault("DiffRIR pickle that runs code", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0)}, model="fault_pickle.pth"),
          "DiffRIRLoader", "holds pickled objects other than tensors", check=nothing_ran),
    Fault("truncated MLLM shard", lambda: ask(model="fault-sharded"), "LLMGAMLLMLoader", "model-00002-of-00002"),
    Fault("truncated SD UNet file", lambda: render(sd="fault-truncated-sd"), "LLMGACheckpointLoader",
          "diffusion_pytorch_model.safetensors is corrupt or incomplete"),
    Fault("truncated DiffRIR file", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0)}, model="fault_truncated.pth"),
          "DiffRIRLoader", "fault_truncated.pth"),
    Fault("SD shard named outside its folder", lambda: render(sd="fault-outside-shard"), "LLMGACheckpointLoader",
          "names a shard outside its folder"),
    Fault("SD folder with an SDXL UNet and an SD1.5 text encoder", lambda: render(sd="fault-mixed-sd"),
          "LLMGACheckpointLoader", "SDXL needs both CLIP text encoders"),
    Fault("SD UNet weights that do not fit its config.json", lambda: render(sd="fault-mismatch-sd"),
          "LLMGACheckpointLoader", "the weights do not fit its config.json"),
    Fault("weights that are not DiffRIR", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], extra={**RGB, "mk": solid_mask(1.0)}, model="fault_not_diffrir.pth"),
          "DiffRIRLoader", "is not DiffRIR weights"),
    Fault("MLLM folder without tokenizer files", lambda: ask(model="fault-no-tokenizer"), "LLMGAMLLMLoader",
          "has no tokenizer files"),
    Fault("tokenizer.json that does not parse", lambda: ask(model="fault-bad-tokenizer"), "LLMGAMLLMLoader",
          "tokenizer.json"),
    Fault("plain LLM folder (not LLMGA)", lambda: ask(model="fault-plain-llm"), "LLMGAMLLMLoader",
          "is not an LLMGA MLLM folder"),
]


def message_of(entry_or_body, fault: Fault) -> str:
    if fault.outcome == "refused":
        errors = [e for node in entry_or_body["node_errors"].values() for e in node["errors"]]
        return "; ".join(f"{e['message']}: {e.get('details', '')}" for e in errors)
    if fault.outcome in ("note", "ok"):
        shown = []
        for node_id, out in entry_or_body["outputs"].items():
            if entry_or_body["prompt"][2][node_id]["class_type"] == fault.node:
                # the Prompt Generator's notes on their own, without the (random) prompt they follow
                shown += list(out["notes"]) if "notes" in out else list(out.get("text", []))
        return "\n".join(shown)
    error = execution_error(entry_or_body)
    return f"{error['node_type']}: {error['exception_message'].strip()}" if error else ""


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault(server, base, fault):
    prompt = fault.prompt()
    if fault.outcome == "refused":
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": server.client_id})
        assert status == 400, body
        bad = [node["class_type"] for node in body["node_errors"].values()]
        assert bad == [fault.node], body
        message = message_of(body, fault)
    else:
        entry = server.run(prompt)
        message = message_of(entry, fault)
        if fault.outcome == "error":
            error = execution_error(entry)
            assert entry["status"]["status_str"] == "error" and error, json.dumps(entry["status"])[:2000]
            assert error["node_type"] == fault.node, message
            assert "\n" not in error["exception_message"].strip(), "one sentence, not a dump: " + message
        else:
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        if fault.check:
            message = fault.check(entry, base) or message
    assert fault.says in message, message
    record(server, fault.id, message)


# ----------------------------------------------------------------------------------------------- in flight
@dataclass
class Interrupt:
    id: str
    prompt: Callable[[], dict]
    node: str  # the node id that reports progress while the interrupt arrives


INTERRUPTS = [
    Interrupt("MLLM generation", lambda: ask(tokens=4096), "g"),
    Interrupt("DiffRIR tiles", lambda: restore(
        ["i", 0], ["i", 0], ["mk", 0], tile=32, extra={
            "i": {"class_type": "EmptyImage",
                  "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 8421504}},
            "mk": solid_mask(1.0, 512, 512)}), "dr"),
    # a painted full mask: with random tiny weights a computed mask may select nothing and end the edit at once
    Interrupt("editing", lambda: edit(steps=200, mask=["em", 0], extra={"em": solid_mask(1.0, 512, 512)},
                                      **EDIT_CAPTIONS), "ee"),
]


@pytest.mark.parametrize("case", INTERRUPTS, ids=lambda c: c.id)
def test_interrupt(server, watch, case):
    prompt_id = server.queue(case.prompt())
    first = watch.wait_progress(prompt_id, case.node, at_least=2, timeout=180)
    sent = time.time()
    status, _ = server.interrupt()
    assert status == 200
    entry = server.wait(prompt_id, timeout=120)
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert entry["status"]["status_str"] == "error" and interrupted, json.dumps(entry["status"])[:2000]
    assert interrupted[0]["node_id"] == case.node  # stopped inside the node, not after it
    last = watch.last_progress(prompt_id, case.node)
    assert last["value"] < first["max"], "it ran to the end"
    # the server stamps its messages with its clock (ms), the same machine's as `sent`
    latency = interrupted[0]["timestamp"] / 1000 - sent
    record(server, f"/interrupt during {case.id}",
           f"execution_interrupted in {interrupted[0]['node_type']} at step {last['value']} of {first['max']}, "
           f"{latency:.2f} s after POST /interrupt")


def test_free_during_a_run_lets_it_finish_and_the_next_prompt_reloads(server, watch):
    prompt = ask(tokens=300)
    prompt_id = server.queue(prompt)
    watch.wait_progress(prompt_id, "g", at_least=5)
    status, _ = server.free()
    assert status == 200
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    again = server.run(prompt)  # the same graph: cached, unless /free dropped it
    assert again["status"]["status_str"] == "success"
    assert "m" in executed_nodes(again), "the MLLM was not loaded again after /free"
    record(server, "/free during MLLM generation", "the run finishes; the next prompt loads the MLLM again")


def test_model_file_deleted_between_two_runs(server, base):
    weights = base / "models" / "LLM" / "fault-qwen2" / "model.safetensors"
    prompt = ask(model="fault-qwen2")
    assert server.run(prompt)["status"]["status_str"] == "success"
    kept = weights.with_suffix(".kept")
    weights.rename(kept)
    try:
        prompt["g"]["inputs"]["seed"] = next(_seeds)
        cached = server.run(prompt)  # the loaded model is still in the cache: it runs without the file
        assert cached["status"]["status_str"] == "success" and "m" not in executed_nodes(cached)
        flush(server)  # another workflow in between: the loader has to read the folder again
        entry = server.run(prompt)
        error = execution_error(entry)
        assert error and error["node_type"] == "LLMGAMLLMLoader", json.dumps(entry["status"])[:2000]
        assert "has no weights" in error["exception_message"] and "fault-qwen2" in error["exception_message"]
    finally:
        kept.rename(weights)
    assert server.run(prompt)["status"]["status_str"] == "success"  # the file back: it loads again
    record(server, "model file deleted between two runs", f"{error['node_type']}: {error['exception_message']}")


def test_missing_vision_tower_tells_node_users_where_to_put_it(server, base):
    flush(server)  # the loader below must read its folder
    tower = base / "models" / "clip_vision" / VISION_TOWER
    away = tower.with_name("moved-away")
    tower.rename(away)
    try:
        entry = server.run(ask(model="fault-qwen2"))
    finally:
        away.rename(tower)
    error = execution_error(entry)
    assert error and error["node_type"] == "LLMGAMLLMLoader", json.dumps(entry["status"])[:2000]
    message = error["exception_message"]
    assert f"into {tower}" in message and "beside the model folder" in message
    assert "pass its folder" not in message and "vision_tower" not in message  # a Python argument, not a node input
    record(server, "vision tower missing", f"{error['node_type']}: {message}")


def test_vision_tower_beside_the_mllms_is_not_listed_as_an_mllm(server, base):
    beside = base / "models" / "LLM" / VISION_TOWER
    beside.symlink_to(os.path.realpath(base / "models" / "clip_vision" / VISION_TOWER), target_is_directory=True)
    try:
        info = server.get("/object_info/LLMGAMLLMLoader")["LLMGAMLLMLoader"]
        options = info["input"]["required"]["model_name"][1]["options"]
        assert VISION_TOWER not in options and QWEN in options and "fault-qwen2" in options
    finally:
        beside.unlink()


# ----------------------------------------------------------------------------------------------- under load
def test_thirty_mixed_prompts_queued_at_once_none_lost_and_memory_flat(server):
    """The CI cut of bench/bench_load.py: text-to-image, inpainting + DiffRIR and similar-image (editing, ~25 s
    a prompt on this CPU, is left to the benchmark) queued together, each with its own seed, after one warm-up
    round. Every prompt completes, and the server's RSS after the run is within 50 MB of the RSS after warm-up
    (the run ends on the same workflow as the warm-up, so the same models are cached at both points)."""
    from tests.host import process_rss_bytes, run_load, shipped_workflow

    mix = ["llmga_t2i_sd15", "llmga_inpaint_sd15_diffrir", "llmga_similar_sdxl"]
    for name in mix:
        assert server.run(shipped_workflow(name, next(_seeds)))["status"]["status_str"] == "success"
    warm = process_rss_bytes(server.proc.pid)
    result = run_load(server, [(name, shipped_workflow(name, next(_seeds))) for name in mix * 10], timeout=600)
    assert server.alive()
    end = process_rss_bytes(server.proc.pid)
    failed = [(label, execution_error(entry)) for label, entry in result["failed"]]
    assert (len(result["completed"]), failed, result["lost"], result["refused"]) == (30, [], [], 0)
    assert end - warm < 50 * 2**20, f"RSS grew by {(end - warm) / 2**20:.0f} MB over 30 prompts"
    record(server, "30 mixed prompts queued at once",
           f"30 completed, 0 failed, 0 lost; RSS {warm / 2**20:.0f} -> {end / 2**20:.0f} MB")
