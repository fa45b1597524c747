"""Loading LLMGA MLLM folders: layouts, recognition without the folder name, and every bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llmga_core.mllm import load_mllm
from llmga_core.mllm.loader import recognise
from tests.fixtures.tiny_mllm import (FAMILIES, RELEASED_NAMES, make_mllm_folder, make_vision_tower,
                                      shared_model_root)
from tests.original_folder_names import template_from_model_name


@pytest.fixture(scope="module")
def root():
    return shared_model_root()



def greedy(folder, **kwargs):
    """Greedy ids of a similar-image turn (exercises tokenizer, CLIP, projector and LLM)."""
    image = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    return load_mllm(folder, **kwargs).generate("", task="similar-image", image=image, max_new_tokens=8).token_ids


CN_NAMES = {"vicuna": "llmga-cn-vicuna-7b-v1.5-full-finetune", "llama3": "llmga-cn-llama3-8b-it-full-finetune",
            "gemma": "llmga-cn-gemma-2b-it-full-finetune", "qwen2": "llmga-cn-Qwen2-0.5B-full-finetune"}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_recognition_agrees_with_the_originals_name_rules(root, tmp_path, family):
    info = recognise(root / RELEASED_NAMES[family])
    assert info.family == family
    assert info.template == template_from_model_name(RELEASED_NAMES[family])
    if family in CN_NAMES:
        cn = make_mllm_folder(tmp_path, family, name=CN_NAMES[family])
        assert recognise(cn).template == template_from_model_name(CN_NAMES[family]) == info.template


@pytest.mark.parametrize("family", ["vicuna", "llama2", "qwen2", "gemma"])
def test_renamed_folder_still_works(root, tmp_path, family):
    renamed = tmp_path / "my-assistant"
    shutil.copytree(root / RELEASED_NAMES[family], renamed)
    shutil.copytree(root / "clip-vit-large-patch14-336", tmp_path / "clip-vit-large-patch14-336")
    mllm = load_mllm(renamed)
    assert (mllm.family, mllm.template) == (recognise(root / RELEASED_NAMES[family]).family,
                                            template_from_model_name(RELEASED_NAMES[family]))
    assert template_from_model_name("my-assistant") == "llava_v0"  # what the original would have done instead
    assert greedy(renamed) == greedy(root / RELEASED_NAMES[family])


@pytest.mark.parametrize("sharded,weights", [(True, "safetensors"), (False, "bin"), (True, "bin")])
def test_weight_layouts_give_the_same_model(root, tmp_path, sharded, weights):
    folder = make_mllm_folder(tmp_path, "qwen2", sharded=sharded, weights=weights)
    names = sorted(p.name for p in folder.iterdir() if "model" in p.name and p.suffix in (".safetensors", ".bin", ".json"))
    if sharded:
        index = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
        assert index in names and len(names) == 3
    assert greedy(folder, vision_tower=root / "clip-vit-large-patch14-336") == greedy(root / RELEASED_NAMES["qwen2"])


def test_model_container_dtype_and_size(root):
    mllm = load_mllm(root / RELEASED_NAMES["gemma"], dtype=torch.bfloat16)
    from transformers import PreTrainedModel

    assert isinstance(mllm.model, torch.nn.Module) and not isinstance(mllm.model, PreTrainedModel)
    assert {name for name, _ in mllm.model.named_children()} == {"language_model", "vision_tower", "mm_projector"}
    assert mllm.dtype == torch.bfloat16 and mllm.model.mm_projector[0].weight.dtype == torch.bfloat16
    assert next(mllm.model.vision_tower.parameters()).dtype == torch.float32  # CLIP always float32
    expected = sum(t.numel() * t.element_size() for t in list(mllm.model.parameters()) + list(mllm.model.buffers()))
    assert mllm.size_bytes() == expected > 0
    assert (mllm.family, mllm.template, mllm.folder) == ("gemma", "gemma", root / RELEASED_NAMES["gemma"])
    assert load_mllm(root / RELEASED_NAMES["gemma"]).dtype == torch.float32  # CPU default
    assert len(mllm.generate("hi", max_new_tokens=3).token_ids) == 3


def test_clip_comes_from_its_folder_not_the_bf16_copy(root):
    from safetensors.torch import load_file

    mllm = load_mllm(root / RELEASED_NAMES["vicuna"])
    tower = load_file(str(root / "clip-vit-large-patch14-336" / "model.safetensors"))
    copy = load_file(str(root / RELEASED_NAMES["vicuna"] / "model.safetensors"))
    key = "embeddings.patch_embedding.weight"
    ours = dict(mllm.model.vision_tower.named_parameters())
    ours = ours.get(key, ours.get("vision_model." + key))
    assert torch.equal(ours, tower["vision_model." + key])
    assert not torch.equal(ours, copy["model.vision_tower.vision_tower.vision_model." + key].float())


def test_vision_tower_places(root, tmp_path):
    model = tmp_path / "models" / RELEASED_NAMES["phi3"]
    shutil.copytree(root / RELEASED_NAMES["phi3"], model)
    tower = root / "clip-vit-large-patch14-336"
    expected = greedy(root / RELEASED_NAMES["phi3"])
    assert greedy(model, vision_tower=tower) == expected  # explicit
    shutil.copytree(tower, model / "openai" / "clip-vit-large-patch14-336")  # inside, hub id layout
    assert greedy(model) == expected


def test_missing_vision_tower(root, tmp_path):
    model = tmp_path / RELEASED_NAMES["mistral"]
    shutil.copytree(root / RELEASED_NAMES["mistral"], model)
    with pytest.raises(FileNotFoundError) as info:
        load_mllm(model)
    message = str(info.value)
    assert message.startswith("The CLIP vision tower openai/clip-vit-large-patch14-336 was not found: download")
    assert str(tmp_path / "clip-vit-large-patch14-336") in message and "models/clip_vision/" in message
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_mllm(model, vision_tower=tmp_path / "nowhere")


def test_not_an_llmga_folder(root, tmp_path):
    with pytest.raises(ValueError) as info:
        load_mllm(tmp_path)
    assert str(info.value) == (f"{tmp_path} is not an LLMGA MLLM folder: it has no config.json; give the folder of a "
                               "released LLMGA MLLM such as llmga-Qwen2-0.5B-full-finetune.")
    plain = tmp_path / "qwen2-plain"
    shutil.copytree(root / RELEASED_NAMES["qwen2"], plain)
    config = json.loads((plain / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("mm_")}
    config["model_type"] = "qwen2"
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its config.json has no mm_vision_tower / mm_projector_type fields"):
        load_mllm(plain)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_mllm(tmp_path / "missing")


def test_missing_and_corrupt_shards(root, tmp_path):
    folder = make_mllm_folder(tmp_path, "llama3", sharded=True)
    shutil.copytree(root / "clip-vit-large-patch14-336", tmp_path / "clip-vit-large-patch14-336")
    second = folder / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mllm(folder)
    assert str(info.value) == (f"Shard model-00002-of-00002.safetensors listed in "
                               f"{folder / 'model.safetensors.index.json'} is missing; download it again.")
    index = folder / "model.safetensors.index.json"
    saved = index.read_text()
    escaping = json.loads(saved)
    escaping["weight_map"] = {key: "../" + name for key, name in escaping["weight_map"].items()}
    index.write_text(json.dumps(escaping))
    with pytest.raises(ValueError) as info:  # a shard name that leaves the folder is never opened
        load_mllm(folder)
    assert str(info.value) == (f"{index} names a shard outside its folder ('../model-00001-of-00002.safetensors'); "
                               f"download it again.")
    index.write_text(saved)
    second.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError) as info:
        load_mllm(folder)
    assert str(info.value) == (f"{second} is corrupt or incomplete (not a readable safetensors file); "
                               f"download it again.")
    bins = make_mllm_folder(tmp_path / "b", "gemma", weights="bin")
    shutil.copytree(root / "clip-vit-large-patch14-336", tmp_path / "b" / "clip-vit-large-patch14-336")
    (bins / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError) as info:
        load_mllm(bins)
    assert str(info.value) == (f"{bins / 'pytorch_model.bin'} is corrupt or incomplete (not a readable PyTorch "
                               f"file); download it again.")


def test_checkpoint_without_projector_or_with_missing_weights(root, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / RELEASED_NAMES["qwen2"]
    shutil.copytree(root / RELEASED_NAMES["qwen2"], folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "mm_projector" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="has no mm_projector weights; it is not a complete LLMGA MLLM"):
        load_mllm(folder, vision_tower=root / "clip-vit-large-patch14-336")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 12 weights of the language model"):
        load_mllm(folder, vision_tower=root / "clip-vit-large-patch14-336")


def test_unknown_family_and_template(root, tmp_path):
    folder = tmp_path / "llmga-mpt-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_mpt", "mm_vision_tower": "x"}))
    with pytest.raises(ValueError, match="model_type 'llava_mpt' is not one of the LLMGA MLLM families"):
        load_mllm(folder)
    with pytest.raises(ValueError, match="Unknown template 'chatgpt'"):
        load_mllm(root / RELEASED_NAMES["qwen2"], template="chatgpt")


def test_vision_tower_vision_only_layout(root, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig

    tower = tmp_path / "clip-vit-large-patch14-336"
    make_vision_tower(tower)
    full = json.loads((tower / "config.json").read_text())
    vision = CLIPConfig.from_dict(full).vision_config.to_dict()
    vision.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    (tower / "config.json").write_text(json.dumps(vision))
    state = load_file(str(tower / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k.startswith("vision_model.")}, str(tower / "model.safetensors"))
    assert greedy(root / RELEASED_NAMES["llama2"], vision_tower=tower) == greedy(root / RELEASED_NAMES["llama2"])


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_build_keeps_the_computed_buffers_of_a_plain_build(root, family):
    """The LLM is built in its dtype without initialisation; rotary tables (and Gemma's scale) must still be what
    the config class computes in a normal float32 build."""
    import transformers

    mllm = load_mllm(root / RELEASED_NAMES[family], dtype=torch.float16)
    built = mllm.model.language_model
    plain = getattr(transformers, type(built).__name__)(built.config)
    ours = dict(built.named_buffers())
    for name, buffer in plain.named_buffers():
        if name.endswith("inv_freq"):
            assert ours[name].dtype == torch.float32 and torch.equal(ours[name], buffer), name
        elif name.endswith("embed_scale"):
            assert float(ours[name].to(torch.float16)) == float(buffer.to(torch.float16)) == 8.0  # sqrt(64)


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_tables_are_rounded_through_float16_only_where_the_original_built_them_so(root, family):
    """Mistral and Qwen2 built cos/sin in float16 at load in the original (transformers 4.41), so a
    float32 run must see float16-rounded tables; Llama, Gemma and Phi-3 computed them on the fly."""
    mllm = load_mllm(root / RELEASED_NAMES[family], dtype=torch.float32)
    rotary = mllm.model.language_model.model.rotary_emb
    x = torch.zeros(1, 5, 1)
    position_ids = torch.arange(300, 305).unsqueeze(0)  # late positions: float16 rounding shows
    cos, sin = rotary(x, position_ids)
    inv_freq = rotary.inv_freq.float()
    angles = position_ids[0, :, None].float() * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0)
    exact_cos, exact_sin = emb.cos() * scale, emb.sin() * scale
    if family in ("mistral", "qwen2"):
        assert torch.equal(cos[0], exact_cos.half().float()) and torch.equal(sin[0], exact_sin.half().float())
        assert not torch.equal(cos[0], exact_cos)
    elif family != "phi3":  # Phi-3's longrope tables use scaled frequencies; only check they are unrounded
        assert torch.allclose(cos[0], exact_cos, atol=1e-6) and not torch.equal(cos[0], exact_cos.half().float())
    else:
        assert not torch.equal(cos[0], cos[0].half().float())
