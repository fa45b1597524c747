"""The MLLM's CLIP vision tower: found by name in models/clip_vision as a folder or as the single .safetensors
file ComfyUI users keep there, its config read off the weight shapes, and a tower of the wrong width refused.

References: the folder form of the same tower (config.json written by transformers' CLIPConfig, loaded by the
library's folder path), transformers' own CLIPVisionConfig, and the checkpoint's projector shape read with
safetensors.
"""
from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llmga_core.mllm import load_mllm
from llmga_core.mllm.loader import recognise, vision_config_from_weights
from llmga_core.releases import find_vision_tower, find_vision_tower_in
from tests.fixtures.tiny_mllm import (RELEASED_NAMES, make_mllm_folder, make_vision_tower, make_vision_tower_file,
                                      shared_model_root)

TOWER = "clip-vit-large-patch14-336"
WIDE = {"hidden": 64, "heads": 1}  # head width 64, as every OpenAI ViT (the file form derives heads from it)


def image():
    return Image.fromarray(np.arange(40 * 56 * 3, dtype=np.uint8).reshape(40, 56, 3))


def greedy(folder, **kwargs):
    mllm = load_mllm(folder, **kwargs)
    return mllm, mllm.generate("", task="similar-image", image=image(), max_new_tokens=8).token_ids


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An MLLM whose projector takes 64-wide features, its tower as a folder (beside nothing: kept apart) and the
    same tower as single files (the whole CLIPModel, and vision_model.* only)."""
    base = tmp_path_factory.mktemp("towers")
    model = make_mllm_folder(base / "LLM", "qwen2", sizes={"mm_hidden_size": 64})
    folder = make_vision_tower(base / "folders" / TOWER, seed=5, **WIDE)
    whole = make_vision_tower_file(base / "whole" / f"{TOWER}.safetensors", seed=5, **WIDE)
    vision = make_vision_tower_file(base / "vision" / f"{TOWER}.safetensors", seed=5, vision_only=True, **WIDE)
    return {"model": model, "folder": folder, "whole": whole, "vision": vision, "base": base}


@pytest.mark.parametrize("form", ["whole", "vision"])
def test_a_single_safetensors_file_is_the_same_tower_as_its_folder(wide, form):
    from transformers import CLIPConfig

    by_folder, expected = greedy(wide["model"], vision_tower=wide["folder"])
    by_file, ids = greedy(wide["model"], vision_tower=wide[form])
    assert ids == expected
    ours = by_file.model.vision_tower.config
    theirs = CLIPConfig.from_pretrained(str(wide["folder"])).vision_config  # what transformers reads from config.json
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "image_size", "num_channels", "hidden_act")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    for name, tensor in by_folder.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, by_file.model.vision_tower.state_dict()[name]), name
    # the openai preprocessor at the file's image size: the same pixels as the folder's preprocessor_config.json
    assert torch.equal(by_file._pixels(image()), by_folder._pixels(image()))


def test_geometry_comes_from_the_shapes(tmp_path):
    """Patch size from the patch embedding, image size from the position count, layers from the indices."""
    path = make_vision_tower_file(tmp_path / "t.safetensors", hidden=128, heads=2, image_size=224, patch_size=16)
    config = vision_config_from_weights(path)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.patch_size,
            config.image_size, config.intermediate_size) == (128, 2, 3, 16, 224, 256)


def test_found_by_name_in_clip_vision_as_folder_or_file(wide, tmp_path):
    config = recognise(wide["model"]).config
    roots = [tmp_path / "empty", wide["base"] / "whole"]
    (tmp_path / "empty").mkdir()
    assert find_vision_tower(wide["model"], config, None, search=roots) == wide["whole"]
    assert find_vision_tower_in(roots) == wide["whole"]
    # letter case and the owner_name form of the hub id
    renamed = tmp_path / "named" / "OpenAI_CLIP-ViT-Large-Patch14-336.safetensors"
    renamed.parent.mkdir()
    shutil.copy(wide["whole"], renamed)
    assert find_vision_tower_in([renamed.parent]) == renamed
    # a folder (with config.json) wins over a file, in any of the roots; one beside the model wins over both
    assert find_vision_tower_in([wide["base"] / "whole", wide["base"] / "folders"]) == wide["folder"]
    beside = wide["model"].parent / TOWER
    shutil.copytree(wide["folder"], beside)
    try:
        assert find_vision_tower(wide["model"], config, None, search=roots) == beside
    finally:
        shutil.rmtree(beside)
    # other files there are not taken for the tower
    (tmp_path / "other").mkdir()
    shutil.copy(wide["whole"], tmp_path / "other" / "clip_vision_g.safetensors")
    assert find_vision_tower_in([tmp_path / "other"]) is None


def test_a_tower_of_the_wrong_width_is_refused_before_the_llm_loads(wide, tmp_path):
    root = shared_model_root()
    model = tmp_path / RELEASED_NAMES["vicuna"]
    shutil.copytree(root / RELEASED_NAMES["vicuna"], model)  # its projector takes 32-wide features
    for tower in (wide["folder"], wide["whole"]):
        with pytest.raises(ValueError) as info:
            load_mllm(model, vision_tower=tower)
        assert str(info.value) == (
            f"The vision tower {tower} gives 64-wide features but this MLLM's projector takes 32-wide ones "
            f"(mm_projector.0.weight); use the tower the model was trained with, openai/clip-vit-large-patch14-336.")
    # the check reads only headers: with .bin weights that cannot even be read it still comes first
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(ValueError, match=r"gives 64-wide features but this MLLM's projector takes 32-wide"):
        load_mllm(model, vision_tower=wide["whole"])
    with pytest.raises(ValueError, match="corrupt or incomplete"):  # the fitting tower gets as far as the weights
        load_mllm(model, vision_tower=root / TOWER)


def test_a_file_that_is_not_a_clip_tower_is_one_sentence(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / f"{TOWER}.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError) as info:
        load_mllm(shared_model_root() / RELEASED_NAMES["qwen2"], vision_tower=path)
    assert str(info.value) == (f"{path} is not a CLIP vision tower: it lacks embeddings.class_embedding (and 3 more "
                               "such tensors); use the weights of openai/clip-vit-large-patch14-336 (CLIPVisionModel "
                               "or CLIPModel).")


# ------------------------------------------------------------------------------------------- in the host
@pytest.fixture()
def host_clip_vision(comfy_inprocess, llmga_pack, wide, monkeypatch, tmp_path):
    """The host's clip_vision kind pointing at one folder of this test (what extra_model_paths.yaml sets), and
    models/LLM holding the wide MLLM; both restored afterwards."""
    folder_paths = comfy_inprocess
    clip_vision = tmp_path / "clip_vision"
    clip_vision.mkdir()
    llm = folder_paths.folder_names_and_paths["LLM"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "clip_vision", ([str(clip_vision)], set()))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "LLM", ([str(wide["model"].parent)], llm[1]))
    return clip_vision, importlib.import_module("llmga_pack_under_test.nodes.mllm")


def test_the_loader_node_finds_the_single_file_in_clip_vision(host_clip_vision, wide):
    clip_vision, nodes = host_clip_vision
    name = wide["model"].name
    with pytest.raises(FileNotFoundError) as info:
        nodes.LLMGAMLLMLoader.execute(name, "float32")
    assert f"into {clip_vision / TOWER} (or put its weights alone as {clip_vision / TOWER}.safetensors)" \
        in str(info.value)
    shutil.copy(wide["whole"], clip_vision / f"{TOWER}.safetensors")
    assert nodes.find_vision_tower_in_clip_vision() == str(clip_vision / f"{TOWER}.safetensors")
    loaded = nodes.LLMGAMLLMLoader.execute(name, "float32")[0]
    _, expected = greedy(wide["model"], vision_tower=wide["folder"])
    assert loaded.mllm.generate("", task="similar-image", image=image(), max_new_tokens=8).token_ids == expected


def test_the_loader_node_refuses_the_wrong_width(host_clip_vision, wide, tmp_path, monkeypatch, comfy_inprocess):
    clip_vision, nodes = host_clip_vision
    narrow = make_mllm_folder(tmp_path / "narrow", "gemma")  # projector takes 32
    monkeypatch.setitem(comfy_inprocess.folder_names_and_paths, "LLM", ([str(narrow.parent)], set()))
    shutil.copy(wide["whole"], clip_vision / f"{TOWER}.safetensors")
    with pytest.raises(ValueError, match=fr"The vision tower {clip_vision / TOWER}\.safetensors gives 64-wide "
                                         r"features but this MLLM's projector takes 32-wide ones"):
        nodes.LLMGAMLLMLoader.execute(narrow.name, "float32")
