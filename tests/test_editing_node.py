"""LLMGAEdit in the real host (imported in-process) against the library on diffusers models.

The reference runs llmga_core.editing.edit on the same tiny SD1.5 weights loaded by diffusers: the UNet
through diffusers_predict_noise, the VAE posterior from diffusers' AutoencoderKL, the six text encodings
from the transformers CLIP with the library's encode_prompt (lpw) and a plain tokenizer call (inversion).
The node makes all of these through the host's MODEL, CLIP and VAE.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from llmga_core import editing
from llmga_core.long_prompt import encode_prompt
from tests.fixtures.tiny_sd import build_pipeline, make_sd_folder

STEPS, SKIP = 4, 25
SOURCE = "a red fox sitting in the snow"
TARGET = "a red fox sitting on green grass in summer, (sunny:1.2)"


@pytest.fixture(scope="module")
def node_module(llmga_pack):
    return importlib.import_module(llmga_pack.__name__ + ".nodes.editing")


@pytest.fixture(scope="module")
def host_models(llmga_pack, tmp_path_factory):
    checkpoints = importlib.import_module(llmga_pack.__name__ + ".nodes.checkpoints")
    folder = make_sd_folder(tmp_path_factory.mktemp("edit-sd"), "sd15", light=True)
    return checkpoints.load_sd_folder(folder, unet_dtype=torch.float32, clip_dtype=torch.float32,
                                      vae_dtype=torch.float32)


def photo(h=512, w=512, seed=0) -> torch.Tensor:
    rng = np.random.RandomState(seed)
    base = torch.from_numpy(rng.rand(1, 3, 8, 8).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).movedim(1, -1)


def run_node(node_module, host_models, image, **kw):
    model, clip, vae = host_models
    args = dict(model=model, clip=clip, vae=vae, image=image, source_prompt=SOURCE, target_prompt=TARGET,
                steps=STEPS, skip=SKIP, seed=7)
    args.update(kw)
    out = node_module.LLMGAEdit.execute(**args)
    return out.args, out.ui.as_dict()


_PIPE = []


def reference_edit(image: torch.Tensor, seed=7, mask=None):
    """The library on diffusers models, every encoding made with transformers/diffusers."""
    if not _PIPE:
        _PIPE.append(build_pipeline("sd15", seed=0, light=True))
    pipe = _PIPE[0]
    tok, text_encoder = pipe.tokenizer, pipe.text_encoder

    def lpw(prompt, negative, pipeline):
        out = encode_prompt(prompt, negative, tokenizers=[tok], text_encoders=[text_encoder], pipeline=pipeline)
        return out["prompt_embeds"], out["negative_prompt_embeds"]

    def plain(text):  # the diffusers tokenizer call padded to 77, ids sliced to 77
        ids = tok(text, padding="max_length", max_length=77).input_ids[:77]
        with torch.no_grad():
            return text_encoder(torch.tensor([ids]))[0]

    mask_target, mask_source = lpw(TARGET, SOURCE, "sd15")
    target, target_uncond = lpw(TARGET, "", "sd15-inpaint")
    embeds = editing.EditEmbeds(mask_source=mask_source, mask_target=mask_target, inversion_source=plain(SOURCE),
                                inversion_uncond=plain(""), target=target, target_uncond=target_uncond)
    pixels = editing.prepare_image(image[0]).image.movedim(-1, 0)[None] * 2 - 1
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    x0 = posterior.mode() * editing.LATENT_SCALE
    noise = editing.draw_noise(seed, x0.shape[1:], steps=STEPS)
    mask_latents = editing.posterior_sample(posterior.parameters, noise.posterior) * editing.LATENT_SCALE
    result = editing.edit(editing.diffusers_predict_noise(pipe.unet), x0, embeds, noise,
                          alphas_cumprod=editing.scaled_linear_alphas_cumprod(), mask_latents=mask_latents,
                          mask=mask, steps=STEPS, skip=SKIP)
    with torch.no_grad():
        decoded = pipe.vae.decode(result.latents / editing.LATENT_SCALE).sample
    return ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1), result


def test_node_equals_the_library_on_diffusers_models(node_module, host_models):
    image = photo()
    (edited, edit_mask), shown = run_node(node_module, host_models, image)
    expected, result = reference_edit(image)
    assert result.edited and 0 < int(result.mask.sum()) < result.mask.numel()  # a partial mask: both sides tested
    assert torch.equal(edit_mask[0].bool(), editing.mask_to_image(result.mask, 512, 512).bool())
    assert edited.shape == (1, 512, 512, 3) and edit_mask.shape == (1, 512, 512)
    assert (edited - expected).abs().max().item() < 2e-3
    assert (edited - image).abs().max().item() > 1e-2  # the edit changed something
    assert shown["text"][0].startswith("edited (")


def test_a_painted_mask_replaces_the_computed_one_and_round_trips(node_module, host_models):
    image = photo(seed=1)
    painted = torch.zeros(1, 512, 512)
    painted[:, 128:320, 64:256] = 1.0
    (edited, edit_mask), _ = run_node(node_module, host_models, image, mask=painted)
    assert torch.equal(edit_mask, painted)  # block-aligned: comes back as painted
    expected, _ = reference_edit(image, mask=editing.mask_from_image(painted[0], 64, 64))
    assert (edited - expected).abs().max().item() < 2e-3
    (again, again_mask), _ = run_node(node_module, host_models, image, mask=edit_mask)  # fed back
    assert torch.equal(again_mask, edit_mask) and torch.equal(again, edited)


def test_a_mask_that_selects_nothing_returns_the_input_and_says_so(node_module, host_models):
    image = photo(seed=2)
    (edited, edit_mask), shown = run_node(node_module, host_models, image, mask=torch.zeros(1, 512, 512))
    assert torch.equal(edited, editing.prepare_image(image[0]).image[None])
    assert not edit_mask.any()
    assert "the edit mask selects nothing, so the image comes back unchanged" in shown["text"][0]


def test_a_non_square_image_is_cropped_as_the_original_and_said(node_module, host_models):
    image = photo(384, 640, seed=3)
    mask = torch.zeros(1, 384, 640)
    mask[:, 100:300, 200:400] = 1.0  # the image's size: cropped and resized like the image
    (edited, edit_mask), shown = run_node(node_module, host_models, image, mask=mask)
    assert edited.shape == (1, 512, 512, 3)
    assert "the 640×384 image was centre-cropped to a square and resized to 512×512" in shown["text"][0]
    cropped = editing.prepare_image(mask[0, :, :, None].expand(384, 640, 3)).image[..., 0]
    assert torch.equal(edit_mask[0].bool(), editing.mask_to_image(editing.mask_from_image(cropped, 64, 64),
                                                                   512, 512).bool())


def one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith(".")
    return message


@pytest.mark.parametrize("kind,words", [("sdxl", "is an SDXL model"), ("sd15-inpaint", "is an inpainting UNet")])
def test_other_models_are_refused_before_any_work(node_module, llmga_pack, tmp_path, kind, words):
    checkpoints = importlib.import_module(llmga_pack.__name__ + ".nodes.checkpoints")
    model, clip, vae = checkpoints.load_sd_folder(make_sd_folder(tmp_path, kind), unet_dtype=torch.float32)
    with pytest.raises(ValueError) as err:
        node_module.LLMGAEdit.execute(model=model, clip=clip, vae=vae, image=photo(64, 64), source_prompt=SOURCE,
                                      target_prompt=TARGET)
    assert words in one_sentence(err) and "llmga-sd15-t2i" in str(err.value)


@pytest.mark.parametrize("change,words", [
    ({"image": None}, "needs the image to edit"),
    ({"source_prompt": " "}, "source_prompt is empty"),
    ({"target_prompt": ""}, "target_prompt is empty"),
    ({"steps": 0}, "steps"),
    ({"skip": 100}, "skip"),
    ({"mask": torch.ones(1, 100, 80)}, "The mask is 80×100 but the image is 512×512"),
])
def test_bad_input_is_one_sentence(node_module, host_models, change, words):
    with pytest.raises(ValueError) as err:
        change = dict(change)
        run_node(node_module, host_models, change.pop("image") if "image" in change else photo(), **change)
    assert words in one_sentence(err)


def test_progress_per_unet_call_and_the_hosts_interrupt_stop_the_edit(node_module, host_models):
    """The node's ProgressBar advances once per UNet call over the three phases; the host's progress hook
    (which raises on /interrupt in a server) stops the edit where it raises."""
    import comfy.model_management
    import comfy.utils

    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if len(seen) == 3:
            raise comfy.model_management.InterruptProcessingException()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(node_module, host_models, photo(seed=4))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    total = 1 + 2 * STEPS  # one batched mask call, one call per inversion and re-sampling step
    assert seen == [(1, total), (2, total), (3, total)]
