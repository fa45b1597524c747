"""LLMGA SD folders → the host's MODEL, CLIP and VAE (llmga_core.checkpoints + nodes/checkpoints.py).

References are independent of the code under test: diffusers' UNet2DConditionModel and AutoencoderKL
and transformers' CLIP text models loaded from the same folders, and the host's own detection table
for the full-size configs.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmga_core.checkpoints import (SDFolderError, clip_keys_with_text_model_prefix, inspect_sd_folder,
                                    ldm_unet_config, load_state_dict)
from tests.fixtures.full_size_sd import SD15_UNET, SDXL_UNET
from tests.fixtures.tiny_sd import RELEASED_NAMES, make_sd_folder

KINDS = ["sd15", "sd15-inpaint", "sdxl", "sdxl-inpaint"]
UNET_TOL = 1e-4
CLIP_TOL = 1e-5
VAE_TOL = 1e-4


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The four tiny released folders, built once for the module."""
    root = tmp_path_factory.mktemp("diffusers")
    return {kind: make_sd_folder(root, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ckpt(llmga_pack):
    """nodes/checkpoints.py imported inside the pack, as the host imports it."""
    return importlib.import_module(f"{llmga_pack.__name__}.nodes.checkpoints")


@pytest.fixture(scope="module")
def tiny_sizes(llmga_pack):
    """The test host plugin that registers the tiny sizes (imported beside the pack by tests/host.py)."""
    import sys

    return sys.modules["llmga_tiny_models"]


@pytest.fixture(scope="module")
def loaded(folders, ckpt):
    """MODEL/CLIP/VAE per kind; text encoders and VAE in float32 for parity with the references."""
    return {kind: ckpt.load_sd_folder(folders[kind], clip_dtype=torch.float32, vae_dtype=torch.float32)
            for kind in KINDS}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _message(exc_info) -> str:
    return str(exc_info.value)


# --------------------------------------------------------------------------- folder inspection

@pytest.mark.parametrize("kind", KINDS)
def test_inspect_released_layout(folders, kind):
    folder = folders[kind]
    info = inspect_sd_folder(folder)
    assert folder.name == RELEASED_NAMES[kind]
    assert info.kind == kind
    assert info.pipeline == kind.split("-")[0]
    assert info.inpaint == kind.endswith("inpaint")
    assert info.unet_config == json.loads((folder / "unet/config.json").read_text())
    assert info.unet_files == (folder / "unet/diffusion_pytorch_model.safetensors",)
    assert info.vae_files == (folder / "vae/diffusion_pytorch_model.safetensors",)
    assert info.text_encoder_files == (folder / "text_encoder/model.safetensors",)
    assert info.text_encoder_config["hidden_size"] == 32
    if info.pipeline == "sdxl":
        assert info.text_encoder_2_files == (folder / "text_encoder_2/model.safetensors",)
        assert info.text_encoder_2_config["projection_dim"] == 32
    else:
        assert info.text_encoder_2_files == () and info.text_encoder_2_config is None
    assert info.ldm_config["in_channels"] == (9 if info.inpaint else 4)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("in_channels", [4, 9])
def test_ldm_config_of_released_bases_equals_host_detection(comfy_inprocess, base, in_channels):
    """For the full-size SD1.5/SDXL UNets (meta tensors) the host's own detection table agrees."""
    import comfy.model_detection
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET if base == "sd15" else SDXL_UNET, in_channels=in_channels)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = unet.state_dict()
    host = comfy.model_detection.unet_config_from_diffusers_unet(shapes)
    host_class = type(comfy.model_detection.model_config_from_diffusers_unet(shapes)).__name__
    mine = ldm_unet_config(config)
    assert host_class == {"sd15": "SD15", "sdxl": "SDXL"}[base]
    assert {k: mine[k] for k in host if k != "dtype"} == {k: v for k, v in host.items() if k != "dtype"}
    # the head rule the host adds for each class (SD15: 8 heads; SDXL: 64-wide heads)
    if base == "sd15":
        assert (mine["num_heads"], mine["num_head_channels"]) == (8, -1)
    else:
        assert (mine["num_heads"], mine["num_head_channels"]) == (-1, 64)


# --------------------------------------------------------------------------- UNet parity

def _unet_inputs(kind, cross_attention_dim, in_channels):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    timesteps = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 77, cross_attention_dim, generator=g)
    pooled = torch.randn(2, 32, generator=g) if kind.startswith("sdxl") else None
    return x, timesteps, context, pooled


def _host_unet(model, x, timesteps, context, pooled):
    extra = {}
    if pooled is not None:
        extra["y"] = model.model.encode_adm(pooled_output=pooled, width=128, height=96, crop_w=8, crop_h=4,
                                            target_width=120, target_height=88)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps, context=context, **extra)


def _diffusers_unet(unet_dir, x, timesteps, context, pooled):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32).eval()
    extra = {}
    if pooled is not None:
        # diffusers' SDXL time ids: original (h, w), crop (top, left), target (h, w)
        time_ids = torch.tensor([[96.0, 128.0, 4.0, 8.0, 88.0, 120.0]]).repeat(x.shape[0], 1)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        return unet(x, timesteps, encoder_hidden_states=context, **extra).sample


@pytest.mark.parametrize("kind", KINDS)
def test_unet_matches_diffusers(folders, loaded, kind):
    model = loaded[kind][0]
    config = json.loads((folders[kind] / "unet/config.json").read_text())
    inputs = _unet_inputs(kind, config["cross_attention_dim"], config["in_channels"])
    ours = _host_unet(model, *inputs)
    ref = _diffusers_unet(folders[kind] / "unet", *inputs)
    assert ours.shape == ref.shape == (2, 4, 16, 16)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() < UNET_TOL
    assert type(model.model).__name__ == ("SDXL" if kind.startswith("sdxl") else "BaseModel")
    assert model.model.concat_keys == (("mask", "masked_image") if kind.endswith("inpaint") else ())


def test_unet_uses_host_devices_and_dtype(loaded):
    import comfy.model_management as mm

    model = loaded["sdxl"][0]
    assert model.load_device == mm.get_torch_device()
    assert model.offload_device == mm.unet_offload_device()
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert model.model.diffusion_model.dtype == mm.unet_dtype(model_params=params,
                                                              weight_dtype=torch.float32)
    assert model.model.latent_format.scale_factor == pytest.approx(0.13025)
    assert loaded["sd15"][0].model.latent_format.scale_factor == pytest.approx(0.18215)


# --------------------------------------------------------------------------- CLIP and VAE parity

def _host_ids(rows):
    return [[token for token, *_ in row] for row in rows]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_clip_matches_transformers(folders, loaded, kind):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder, clip = folders[kind], loaded[kind][1]
    prompt = "a watercolor painting of a lighthouse at dusk"
    tokens = clip.tokenize(prompt)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)

    tok_l = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids_l = tok_l(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert _host_ids(tokens["l"]) == ids_l.tolist()
    enc_l = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out_l = enc_l(ids_l, output_hidden_states=True)
    if kind == "sd15":
        # SD1: last layer after the final layer norm; pooled = EOS state, unprojected
        assert (cond - out_l.last_hidden_state).abs().max().item() < CLIP_TOL
        assert (pooled - out_l.pooler_output).abs().max().item() < CLIP_TOL
        return
    tok_g = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    ids_g = tok_g(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert _host_ids(tokens["g"]) == ids_g.tolist()
    enc_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out_g = enc_g(ids_g, output_hidden_states=True)
    # SDXL: penultimate layers of both encoders side by side; pooled = projected CLIP-G EOS state
    ref = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    assert cond.shape == (1, 77, 64)
    assert (cond - ref).abs().max().item() < CLIP_TOL
    assert (pooled - out_g.text_embeds).abs().max().item() < CLIP_TOL


def test_clip_default_dtype_is_the_hosts(folders, ckpt):
    import comfy.model_management as mm

    clip = ckpt.load_clip(inspect_sd_folder(folders["sd15"]))
    weight = clip.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight
    assert weight.dtype == mm.text_encoder_dtype(clip.patcher.load_device)
    cond = clip.encode_from_tokens(clip.tokenize("a cat"))
    assert cond.shape == (1, 77, 32) and torch.isfinite(cond).all()


def test_clip_loads_transformers5_key_layout(folders, ckpt, tmp_path):
    """Files saved by transformers 5 lack the `text_model.` prefix; they load the same."""
    from safetensors.torch import save_file

    folder = _copy(folders["sd15"], tmp_path)
    path = folder / "text_encoder/model.safetensors"
    state = load_file(path)
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, path, metadata={"format": "pt"})
    assert not any(k.startswith("text_model.") for k in load_file(path))
    clip = ckpt.load_clip(inspect_sd_folder(folder), dtype=torch.float32)
    tokens = clip.tokenize("a cat")
    ref = ckpt.load_clip(inspect_sd_folder(folders["sd15"]), dtype=torch.float32)
    assert torch.equal(clip.encode_from_tokens(tokens), ref.encode_from_tokens(tokens))
    assert clip_keys_with_text_model_prefix({"encoder.x": 1, "text_projection.weight": 2,
                                             "text_model.embeddings.position_ids": 3}) == \
        {"text_model.encoder.x": 1, "text_projection.weight": 2}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_vae_matches_diffusers(folders, loaded, kind):
    from diffusers import AutoencoderKL

    vae = loaded[kind][2]
    ref = AutoencoderKL.from_pretrained(folders[kind] / "vae", torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    pixels = torch.rand(1, 64, 64, 3, generator=g)
    with torch.no_grad():
        ref_raw = ref.decode(latent).sample
        ref_latent = ref.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        raw = vae.first_stage_model.decode(latent)
    assert (raw - ref_raw).abs().max().item() < VAE_TOL
    decoded = vae.decode(latent)
    assert decoded.shape == (1, 64, 64, 3)
    assert (decoded - (ref_raw.movedim(1, -1) + 1).div(2).clamp(0, 1)).abs().max().item() < VAE_TOL
    assert (vae.encode(pixels) - ref_latent).abs().max().item() < VAE_TOL


# --------------------------------------------------------------------------- weight files

def test_fp16_variant_is_preferred(tmp_path, ckpt):
    folder = make_sd_folder(tmp_path, "sdxl", fp16_variant=True)
    info = inspect_sd_folder(folder)
    assert info.unet_files == (folder / "unet/diffusion_pytorch_model.fp16.safetensors",)
    assert info.vae_files == (folder / "vae/diffusion_pytorch_model.fp16.safetensors",)
    assert info.text_encoder_files == (folder / "text_encoder/model.fp16.safetensors",)
    assert info.text_encoder_2_files == (folder / "text_encoder_2/model.fp16.safetensors",)
    fp16 = load_file(folder / "unet/diffusion_pytorch_model.fp16.safetensors")["conv_in.weight"]
    fp32 = load_file(folder / "unet/diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert fp16.dtype == torch.float16 and not torch.equal(fp16.float(), fp32)
    model = ckpt.load_unet(info)
    loaded_weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(loaded_weight.float(), fp16.float())


def test_sharded_safetensors_load(folders, tmp_path, ckpt, loaded):
    folder = make_sd_folder(tmp_path, "sdxl-inpaint", sharded=True)
    info = inspect_sd_folder(folder)
    index = json.loads((folder / "unet/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(info.unet_files) > 1
    assert set(info.unet_files) == {folder / "unet" / name for name in index["weight_map"].values()}
    assert len(info.text_encoder_2_files) > 1
    model, clip, vae = ckpt.load_sd_folder(folder, clip_dtype=torch.float32, vae_dtype=torch.float32)
    # same seed, same weights as the single-file folder
    ref_model, ref_clip, _ = loaded["sdxl-inpaint"]
    inputs = _unet_inputs("sdxl-inpaint", 64, 9)
    assert torch.equal(_host_unet(model, *inputs), _host_unet(ref_model, *inputs))
    tokens = clip.tokenize("a cat")
    assert torch.equal(clip.encode_from_tokens(tokens), ref_clip.encode_from_tokens(tokens))
    assert vae is not None


def test_bin_weights_load_with_weights_only(folders, tmp_path, ckpt):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = _copy(folders["sd15"], tmp_path)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(folder / sub)
        (folder / sub / "diffusion_pytorch_model.safetensors").unlink()
        model.save_pretrained(folder / sub, safe_serialization=False)
    # transformers 5 writes safetensors only; transformers 4 wrote this pickle of the state dict
    text_encoder = folder / "text_encoder"
    torch.save(load_file(text_encoder / "model.safetensors"), text_encoder / "pytorch_model.bin")
    (text_encoder / "model.safetensors").unlink()
    info = inspect_sd_folder(folder)
    assert info.unet_files == (folder / "unet/diffusion_pytorch_model.bin",)
    assert info.text_encoder_files == (folder / "text_encoder/pytorch_model.bin",)
    model, clip, vae = ckpt.load_sd_folder(folder)
    inputs = _unet_inputs("sd15", 32, 4)
    assert (_host_unet(model, *inputs) - _diffusers_unet(folders["sd15"] / "unet", *inputs)).abs().max() < UNET_TOL

    # a pickle that needs more than tensors is refused, not executed
    evil = folder / "unet/diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "hook": _Unpicklable()}, evil)
    with pytest.raises(SDFolderError) as e:
        load_state_dict(info.unet_files)
    assert _message(e) == (f"{evil} holds pickled objects other than tensors ({_Unpicklable.__module__}._Unpicklable), "
                           f"so it was refused and nothing in it was run; use the model's .safetensors files or "
                           f"download it again from its release.")


class _Unpicklable:
    """Any class outside torch's weights_only allow-list."""


# --------------------------------------------------------------------------- bad input

def test_not_a_folder(tmp_path):
    for path in (tmp_path / "missing", tmp_path / "file.txt"):
        if path.name == "file.txt":
            path.write_text("x")
        with pytest.raises(SDFolderError) as e:
            inspect_sd_folder(path)
        assert _message(e) == (f"{path} is not a folder; give the path of an LLMGA SD pipeline folder such as "
                               f"models/diffusers/llmga-sd15-t2i-v2.")


def test_no_unet_folder(folders, tmp_path):
    folder = _copy(folders["sd15"], tmp_path)
    shutil.rmtree(folder / "unet")
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{folder} has no unet/ folder; LLMGA SD folders are diffusers pipelines with unet/, "
                           f"vae/, text_encoder/ and model_index.json (for example llmga-sd15-t2i-v2), so point this "
                           f"at the whole downloaded folder.")


def test_unet_without_weights(folders, tmp_path):
    folder = _copy(folders["sd15"], tmp_path)
    (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{folder / 'unet'} holds no weights (diffusion_pytorch_model.safetensors, "
                           f"diffusion_pytorch_model.fp16.safetensors, a sharded "
                           f"diffusion_pytorch_model.safetensors.index.json or .bin); download that folder again.")


def test_missing_shard(tmp_path):
    folder = make_sd_folder(tmp_path, "sd15", sharded=True)
    shard = sorted((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    index = folder / "unet/diffusion_pytorch_model.safetensors.index.json"
    assert _message(e) == f"Shard {shard.name} listed in {index} is missing; download it again."


def test_corrupt_safetensors(folders, tmp_path):
    folder = _copy(folders["sdxl"], tmp_path)
    path = folder / "text_encoder_2/model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{path} is corrupt or incomplete (not a readable safetensors file); "
                           f"download it again.")


def test_corrupt_bin(folders, tmp_path):
    folder = _copy(folders["sd15"], tmp_path)
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    path = folder / "vae/diffusion_pytorch_model.bin"
    torch.save(load_file(folders["sd15"] / "vae/diffusion_pytorch_model.safetensors"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == f"{path} is corrupt or incomplete (not a readable PyTorch file); download it again."


@pytest.mark.parametrize("change, reason", [
    ({"in_channels": 8}, "8 input channels; 4 (text-to-image) or 9 (inpainting) expected"),
    ({"use_linear_projection": True, "cross_attention_dim": 1024},
     "linear attention projections without SDXL's text_time embedding, as in SD2"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim 256"),
])
def test_unknown_unet(folders, tmp_path, change, reason):
    folder = _copy(folders["sd15"], tmp_path)
    config_path = folder / "unet/config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{folder / 'unet'} is not an SD1.5 or SDXL UNet ({reason}); LLMGA's checkpoints are "
                           f"SD1.5 or SDXL UNets with 4 or 9 input channels.")
    with pytest.raises(SDFolderError) as e:
        ldm_unet_config(json.loads(config_path.read_text()))
    assert _message(e) == (f"This UNet is not an SD1.5 or SDXL UNet ({reason}); LLMGA's checkpoints are "
                           f"SD1.5 or SDXL UNets with 4 or 9 input channels.")


def test_weights_that_do_not_fit_the_config(folders, tmp_path):
    folder = _copy(folders["sd15-inpaint"], tmp_path)
    config_path = folder / "unet/config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 4}))
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{folder / 'unet'} weights do not match its config.json (conv_in is [32, 9, 3, 3], "
                           f"the config says 32 channels from 4 inputs); download it again.")


def test_tiny_folders_load_through_the_host_loaders_with_the_test_sizes_registered(folders, ckpt, tiny_sizes,
                                                                                  monkeypatch):
    """The node code has no path of its own for sizes: the tiny folders reach the host's three loaders, and its
    detection picks the model classes the test plugin registered (tests/host_plugins/llmga_tiny_models)."""
    import comfy.sd

    calls = []
    for name in ("load_diffusion_model_state_dict", "load_text_encoder_state_dicts", "VAE"):
        def record(*args, _real=getattr(comfy.sd, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(comfy.sd, name, record)
    for kind in ("sd15", "sdxl-inpaint"):
        model, _, _ = ckpt.load_sd_folder(folders[kind])
        assert type(model.model.model_config) in tiny_sizes.MODEL_CLASSES
    assert calls == ["load_diffusion_model_state_dict", "load_text_encoder_state_dicts", "VAE"] * 2


def test_a_unet_the_host_does_not_know_is_refused_in_one_sentence(folders, ckpt, tiny_sizes):
    folder = folders["sd15-inpaint"]
    with tiny_sizes.without_tiny_sizes(), pytest.raises(ValueError) as e:
        ckpt.load_unet(inspect_sd_folder(folder))
    assert _message(e) == (f"{folder / 'unet'}: this ComfyUI has no model class for a UNet of these sizes (32 base "
                           f"channels, 32-wide text context, 9 input channels), so it cannot load it; use a released "
                           f"LLMGA SD1.5 or SDXL folder, whose sizes ComfyUI knows.")


def test_text_encoder_and_vae_the_host_builds_otherwise_are_refused_in_one_sentence(folders, ckpt, tiny_sizes):
    """The bare host builds its 768-wide CLIP-L and 128-channel VAE for these weights; torch's size-mismatch dump
    becomes one sentence naming the folder."""
    folder = folders["sd15"]
    info = inspect_sd_folder(folder)
    clip_tensors = len(load_file(folder / "text_encoder/model.safetensors"))
    with tiny_sizes.without_tiny_sizes():
        with pytest.raises(ValueError) as clip_error:
            ckpt.load_clip(info)
        with pytest.raises(ValueError) as vae_error:
            ckpt.load_vae(info)
    # every tensor of a 32-wide encoder has another size than the host's 768-wide one (named in the order of
    # its modules, comfy/clip_model.py)
    assert _message(clip_error) == (
        f"{folder / 'text_encoder'}: the weights do not fit the model ComfyUI builds for them ({clip_tensors} with "
        f"other sizes, e.g. text_model.embeddings.token_embedding.weight, "
        f"text_model.embeddings.position_embedding.weight, text_model.encoder.layers.0.layer_norm1.weight, …); "
        f"use that folder as released with the LLMGA checkpoint.")
    # 0.3.64 builds its 128-channel VAE (sizes do not fit); 0.33 takes the decoder's width from decoder.conv_in
    # (32 / 4 = 8 channels) and its GroupNorm(32) refuses them (comfy/sd.py, VAE.__init__)
    assert re.fullmatch(re.escape(f"{folder / 'vae'}: ") +
                        r"(the weights do not fit the model ComfyUI builds for them \(\d+ with other sizes, e\.g\. "
                        r"encoder\.conv_in\.weight, .+, …\)|ComfyUI could not build a model from these weights "
                        r"\(num_channels \(16\) must be divisible by num_groups \(32\)\)); use that folder as "
                        r"released with the LLMGA checkpoint\.", _message(vae_error)), _message(vae_error)


def test_unet_weight_of_another_size_is_refused_in_one_sentence(folders, tmp_path, ckpt):
    from safetensors.torch import save_file

    folder = _copy(folders["sd15"], tmp_path)
    path = folder / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_out.weight"] = state["conv_out.weight"][:, :, :1, :1].contiguous()  # 1×1 instead of 3×3
    save_file(state, path)
    with pytest.raises(ValueError) as e:
        ckpt.load_unet(inspect_sd_folder(folder))
    assert _message(e) == (f"{folder / 'unet'}: the weights do not fit the model ComfyUI builds for them (1 with other "
                           f"sizes, e.g. out.2.weight); use that folder as released with the LLMGA checkpoint.")


def test_vae_weights_that_do_not_fit_are_refused(folders, tmp_path, ckpt):
    from safetensors.torch import save_file

    folder = _copy(folders["sd15"], tmp_path)
    path = folder / "vae/diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["decoder.conv_out.bias"]
    save_file(state, path)
    with pytest.raises(ValueError) as e:
        ckpt.load_vae(inspect_sd_folder(folder))
    assert _message(e) == (f"{folder / 'vae'}: the weights do not fit the VAE ComfyUI builds for them "
                           f"({len(state)} tensors in the file, {len(state) + 1} in the model); download that folder "
                           f"again.")

    save_file({"not_a_vae.weight": torch.zeros(2)}, path)  # what a wrong file in vae/ looks like to the host
    with pytest.raises(ValueError) as e:
        ckpt.load_vae(inspect_sd_folder(folder))
    assert _message(e) == (f"{folder / 'vae'}: ComfyUI found no VAE in these weights; use that folder as released "
                           f"with the LLMGA checkpoint.")


def test_weights_that_do_not_fit_are_refused(folders, tmp_path, ckpt):
    from safetensors.torch import save_file

    folder = _copy(folders["sd15"], tmp_path)
    path = folder / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["extra.weight"] = torch.zeros(1)
    del state["conv_out.bias"]
    save_file(state, path)
    with pytest.raises(ValueError) as e:  # the pack's own SDFolderError (imported under the pack's name)
        ckpt.load_sd_folder(folder)
    assert _message(e) == (f"{folder / 'unet'}: the weights do not fit its config.json (1 missing, e.g. out.2.bias; "
                           f"1 unexpected, e.g. extra.weight); download that folder again.")


def test_a_config_with_blocks_the_weights_lack_is_refused_before_the_host_reads_them(folders, tmp_path, ckpt,
                                                                                    monkeypatch):
    """One res block more per level than the weights have: the host would read a smaller UNet from what is
    there, so the folder is refused first, with the block names the host's map gives."""
    import comfy.sd

    folder = _copy(folders["sd15"], tmp_path)
    config_path = folder / "unet/config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "layers_per_block": config["layers_per_block"] + 1}))
    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict", lambda *a, **k: pytest.fail("host called"))
    with pytest.raises(ValueError) as e:
        ckpt.load_unet(inspect_sd_folder(folder))
    message = _message(e)
    head = f"{folder / 'unet'}: the weights do not fit its config.json ("
    assert message.startswith(head) and message.endswith("; 0 unexpected, e.g. -); download that folder again.")
    # the third res block of the first level is LDM input block 3 (input block 0 is conv_in)
    assert " missing, e.g. input_blocks.3.0." in message and int(message[len(head):].split(" ")[0]) > 10


def test_sdxl_without_second_text_encoder(folders, tmp_path):
    folder = _copy(folders["sdxl"], tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(SDFolderError) as e:
        inspect_sd_folder(folder)
    assert _message(e) == (f"{folder} is an SDXL pipeline without text_encoder_2/; SDXL needs both CLIP text "
                           f"encoders, so download the whole folder.")


def test_unet_only_folder_gives_no_clip_or_vae(folders, tmp_path, ckpt):
    """Like the host's checkpoint loaders: absent parts come back as None (downstream nodes say so)."""
    folder = _copy(folders["sd15"], tmp_path)
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "text_encoder")
    model, clip, vae = ckpt.load_sd_folder(folder)
    assert clip is None and vae is None
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape == (32, 4, 3, 3)


# --------------------------------------------------------------------------- the node

@pytest.fixture
def diffusers_root(folders, monkeypatch, comfy_inprocess):
    """models/diffusers pointing at the module's tiny folders (restored afterwards)."""
    folder_paths = comfy_inprocess
    root = next(iter(folders.values())).parent
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], {"folder"}))
    return root


def test_node_schema_lists_folders(ckpt, diffusers_root):
    assert [node.GET_SCHEMA().node_id for node in ckpt.NODES] == ["LLMGACheckpointLoader"]
    schema = ckpt.LLMGACheckpointLoader.GET_SCHEMA()
    assert schema.category == "LLMGA/loaders"
    assert [i.id for i in schema.inputs] == ["model_name"]
    assert schema.inputs[0].options == sorted(RELEASED_NAMES.values())
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "VAE"]


def test_node_loads_by_name_and_refuses_escapes(ckpt, diffusers_root):
    out = ckpt.LLMGACheckpointLoader.execute(model_name="llmga-sd15-inpainting-v2")
    model, clip, vae = out.result
    assert model.model.concat_keys == ("mask", "masked_image")
    assert clip.tokenize("a cat")["l"][0][0][0] == 49406
    assert vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 64, 64, 3)
    for name in ("../llmga-sd15-t2i-v2", "llmga-sd15-t2i-v2/../../etc"):
        with pytest.raises(ValueError) as e:
            ckpt.LLMGACheckpointLoader.execute(model_name=name)
        assert "no '..'" in str(e.value)


def test_model_kinds_keep_extra_model_paths_roots_and_list_only_weight_files(llmga_pack, comfy_inprocess, tmp_path,
                                                                            monkeypatch):
    """nodes/paths.py registers its kinds with add_model_folder_path only: a root extra_model_paths.yaml gave first
    stays first, and the file kind lists (and loads) its weight files only, which the host cannot be told."""
    import os

    paths = importlib.import_module(f"{llmga_pack.__name__}.nodes.paths")
    folder_paths = comfy_inprocess
    for kind in ("LLM", "diffrir"):  # a host that has not seen the pack yet
        monkeypatch.delitem(folder_paths.folder_names_and_paths, kind, raising=False)
    monkeypatch.setattr(paths, "_registered", False)
    yaml_root = tmp_path / "elsewhere"
    folder_paths.add_model_folder_path("diffrir", str(yaml_root))  # what main.py does for a `diffrir:` yaml key
    paths.register_model_folders()
    assert folder_paths.get_folder_paths("diffrir") == [str(yaml_root),
                                                        os.path.join(folder_paths.models_dir, "diffrir")]
    assert folder_paths.get_folder_paths("LLM") == [os.path.join(folder_paths.models_dir, "LLM")]

    for name in ("x1.pth", "sub/x2.safetensors", "x4.PT", "README.md", "x1.pth.part"):
        (yaml_root / name).parent.mkdir(parents=True, exist_ok=True)
        (yaml_root / name).write_bytes(b"")
    assert paths.list_model_files("diffrir") == ["sub/x2.safetensors", "x1.pth", "x4.PT"]
    assert paths.resolve_model_path("diffrir", "sub/x2.safetensors", want_dir=False) == \
        str(yaml_root / "sub" / "x2.safetensors")
    with pytest.raises(ValueError) as e:
        paths.resolve_model_path("diffrir", "README.md", want_dir=False)
    assert _message(e) == ("'README.md' is not a diffrir weight file (.pth, .pt, .safetensors); choose one of the "
                           "files the node lists.")


@pytest.mark.parametrize("kind", ["sd15-inpaint", "sdxl-inpaint"])
def test_inpaint_model_takes_host_inpaint_conditioning(loaded, kind):
    import nodes as host_nodes  # the host's nodes.py (its folder comes first on sys.path)

    from tests.host import comfyui_dir

    assert Path(host_nodes.__file__).parent == comfyui_dir()

    model, clip, vae = loaded[kind]
    positive = host_nodes.CLIPTextEncode().encode(clip, "a red barn in a field")[0]
    negative = host_nodes.CLIPTextEncode().encode(clip, "")[0]
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(1, 64, 64, 3, generator=g)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    pos, neg, latent = host_nodes.InpaintModelConditioning().encode(positive, negative, pixels, vae, mask,
                                                                    noise_mask=False)
    seen = []

    def record(apply_model, args):
        seen.append((args["input"].shape, args["c"]["c_concat"].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(record)
    samples = host_nodes.common_ksampler(patched, 1, 1, 3.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    # the UNet saw [latent | mask | masked-image latent]: 4 + 1 + 4 channels
    (shape, concat), = seen
    assert shape[1] == 4 and concat.shape[1] == 5
    latent_mask = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear").round()
    assert torch.equal(concat[:1, :1], latent_mask)
    masked_pixels = (pixels - 0.5) * (1 - mask.round())[..., None] + 0.5
    masked_latent = model.model.process_latent_in(vae.encode(masked_pixels))
    assert (concat[:1, 1:] - masked_latent).abs().max().item() < 1e-5
