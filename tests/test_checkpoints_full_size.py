"""Full-size SD1.5 and SDXL folders through the Load LLMGA Checkpoint node, as users run it.

At the released sizes the node hands the weights to the host's own loaders (load_diffusion_model_state_dict,
load_text_encoder_state_dicts, comfy.sd.VAE), so the host's detection, patcher and dtype choice apply. The
references are diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel loaded
from the same fp16 files in float32. The folders (random weights) are built once into a cache folder by
tests/fixtures/full_size_sd.py. The SDXL UNet is 10.3 GB in float32, so its reference is built only after
the host's copy is gone, and that test runs before the SD1.5 models are loaded (peak RSS 16 GB).
The test host plugin that teaches the host the tiny sizes (tests/host_plugins/llmga_tiny_models) is loaded in
this process too; it leaves the released sizes to the host, which is what the class checks below see.
"""
from __future__ import annotations

import gc
import importlib

import pytest
import torch

from llmga_core.checkpoints import inspect_sd_folder
from tests.fixtures.full_size_sd import full_size_folder

TOL = 1e-4  # float32 against float32 on the same fp16 weights
HOST_LOADERS = ("load_diffusion_model_state_dict", "load_text_encoder_state_dicts", "VAE")


@pytest.fixture(scope="module")
def ckpt(llmga_pack):
    return importlib.import_module(f"{llmga_pack.__name__}.nodes.checkpoints")


def load_by_name(ckpt, folder_paths, folder, monkeypatch):
    """MODEL, CLIP, VAE from the node's execute with models/diffusers at the cache folder, and the
    host loaders it called (recorded around the real functions)."""
    import comfy.sd

    calls = []
    for name in HOST_LOADERS:
        def record(*args, _real=getattr(comfy.sd, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(comfy.sd, name, record)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(folder.parent)], {"folder"}))
    model, clip, vae = ckpt.LLMGACheckpointLoader.execute(model_name=folder.name).result
    monkeypatch.undo()
    return (model, clip, vae), calls


def unet_inputs(context_dim, pooled_dim=None):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, context_dim, generator=g)
    pooled = torch.randn(1, pooled_dim, generator=g) if pooled_dim else None
    return x, torch.tensor([421.0]), context, pooled


def host_unet_call(model, x, timestep, context, pooled):
    extra = {}
    if pooled is not None:  # the sampler's y: pooled text plus (H, W, crop, target) time ids
        extra["y"] = model.model.encode_adm(pooled_output=pooled, width=128, height=96, crop_w=8, crop_h=4,
                                            target_width=120, target_height=88)
    with torch.no_grad():
        return model.model.diffusion_model(x, timestep, context=context, **extra)


def diffusers_unet_call(unet_dir, x, timestep, context, pooled):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir, variant="fp16", torch_dtype=torch.float32).eval()
    extra = {}
    if pooled is not None:  # diffusers' SDXL time ids: original (h, w), crop (top, left), target (h, w)
        extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                      "time_ids": torch.tensor([[96.0, 128.0, 4.0, 8.0, 88.0, 120.0]])}
    with torch.no_grad():
        return unet(x, timestep, encoder_hidden_states=context, **extra).sample


def test_sdxl_through_the_host_loaders_matches_diffusers(ckpt, comfy_inprocess, monkeypatch):
    import comfy.sdxl_clip
    import comfy.supported_models

    folder = full_size_folder("sdxl")
    (model, clip, vae), calls = load_by_name(ckpt, comfy_inprocess, folder, monkeypatch)
    assert calls == list(HOST_LOADERS)
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    assert type(model.model).__name__ == "SDXL" and model.model.latent_format.scale_factor == pytest.approx(0.13025)
    assert type(clip.cond_stage_model) is comfy.sdxl_clip.SDXLClipModel
    assert clip.cond_stage_model.clip_g.transformer.text_projection.weight.shape == (1280, 1280)
    assert vae is not None
    inputs = unet_inputs(2048, 1280)
    ours = host_unet_call(model, *inputs)
    del model, clip, vae  # 10.3 GB in float32: the reference gets the memory
    gc.collect()
    expected = diffusers_unet_call(folder / "unet", *inputs)
    assert ours.shape == expected.shape == (1, 4, 16, 16)
    assert expected.abs().max() > 0.1
    assert (ours - expected).abs().max().item() < TOL


@pytest.fixture(scope="module")
def sd15(ckpt, comfy_inprocess):
    folder = full_size_folder("sd15")
    with pytest.MonkeyPatch.context() as monkeypatch:
        loaded, calls = load_by_name(ckpt, comfy_inprocess, folder, monkeypatch)
    return folder, loaded, calls


def test_sd15_host_loaders_build_all_three(sd15):
    import comfy.model_management as mm
    import comfy.sd1_clip
    import comfy.supported_models

    _, (model, clip, vae), calls = sd15
    assert calls == list(HOST_LOADERS)
    assert type(model.model.model_config) is comfy.supported_models.SD15  # the host's detection table
    assert model.model.concat_keys == ()
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert params > 850e6
    assert model.model.diffusion_model.dtype == mm.unet_dtype(
        model_params=params, weight_dtype=torch.float16,
        supported_dtypes=model.model.model_config.supported_inference_dtypes)
    assert (model.load_device, model.offload_device) == (mm.get_torch_device(), mm.unet_offload_device())
    assert type(clip.cond_stage_model) is comfy.sd1_clip.SD1ClipModel
    weight = clip.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight
    assert weight.dtype == mm.text_encoder_dtype(clip.patcher.load_device)  # fp16 unless a flag says otherwise
    assert vae.first_stage_model.encoder.conv_in.weight.shape == (128, 3, 3, 3)


def test_sd15_unet_call_matches_diffusers(sd15):
    folder, (model, _, _), _ = sd15
    inputs = unet_inputs(768)
    ours = host_unet_call(model, *inputs)
    expected = diffusers_unet_call(folder / "unet", *inputs)
    assert ours.shape == expected.shape == (1, 4, 16, 16)
    assert expected.abs().max() > 0.1
    assert (ours - expected).abs().max().item() < TOL


def test_sd15_clip_and_vae_match_transformers_and_diffusers(sd15, ckpt):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    folder, (_, _, vae), _ = sd15
    clip = ckpt.load_clip(inspect_sd_folder(folder), dtype=torch.float32)  # the same host loader, in fp32
    tokens = clip.tokenize("a lighthouse on a cliff in a storm, oil painting")
    cond = clip.encode_from_tokens(tokens)
    ids = torch.tensor([[token for token, *_ in row] for row in tokens["l"]])
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", variant="fp16", torch_dtype=torch.float32)
    with torch.no_grad():
        expected = encoder.eval()(ids).last_hidden_state
    assert (cond - expected).abs().max().item() < TOL

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = AutoencoderKL.from_pretrained(folder / "vae", variant="fp16", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.decode(latent).sample
        ours = vae.first_stage_model.decode(latent.to(vae.vae_dtype)).float()
    assert ours.shape == (1, 3, 64, 64)
    assert (ours - expected).abs().max().item() < TOL
