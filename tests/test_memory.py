"""The MLLM under the host's memory management (CPU), on ComfyUI 0.3.64 and 0.33.

In a real server: ComfyUI's "Free model and node cache" (POST /free) releases the MLLM's memory, and the next
prompt loads it again and answers the same. In-process: the patcher the pack builds (nodes/memory.py) is the
kind the host's manager offloads when another model needs the room, even with 0.33's dynamic VRAM on; the
host's free_memory pushes the MLLM off and its next run loads it back whole.

The model here is big enough (about 160 MB in float32) for its release to stand out of the server's own
allocations; its vision tower and projector are counted in the size the host manages."""
from __future__ import annotations

import importlib
import inspect
import time

import pytest
import torch

from tests import host
from tests.host import ComfyServer, executed_nodes, process_rss_bytes

MODEL = "llmga-Qwen2-memory-test"
SIZES = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 2, "tokenizer_size": 32000, "vocab_size": 32000}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.fixtures.tiny_mllm import make_mllm_folder

    base = host.models_base(tmp_path_factory.mktemp("memory_base"))
    make_mllm_folder(base / "models" / "LLM", "qwen2", name=MODEL, sizes=SIZES)
    srv = ComfyServer(base, env=host.ONE_THREAD).start()
    yield srv
    srv.stop()


def prompt_graph(seed: int = 0) -> dict:
    return {"m": {"class_type": "LLMGAMLLMLoader", "inputs": {"model_name": MODEL, "dtype": "float32"}},
            "g": {"class_type": "LLMGAPromptGenerator",
                  "inputs": {"mllm": ["m", 0], "task": "text-to-image", "instruction": "a red boat",
                             "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "seed": seed}},
            "s": {"class_type": "PreviewAny", "inputs": {"source": ["g", 0]}}}


def settled_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS after the server has been idle a moment (the worker applies /free between prompts)."""
    time.sleep(seconds)
    return process_rss_bytes(pid)


def test_free_releases_the_mllm_and_the_next_prompt_loads_it_again(server):
    from llmga_core.mllm import load_mllm

    folder = server.base / "models" / "LLM" / MODEL
    mllm = load_mllm(folder, vision_tower=server.base / "models" / "clip_vision" / host.VISION_TOWER)
    size = mllm.size_bytes()
    parts = sum(t.numel() * t.element_size() for module in (mllm.model.language_model, mllm.model.vision_tower,
                                                           mllm.model.mm_projector)
                for t in [*module.parameters(), *module.buffers()])
    assert size == parts > 150e6  # the tower and the projector are in the size the host manages
    del mllm

    before = settled_rss(server.proc.pid, 0.5)
    first = server.run(prompt_graph())
    assert first["status"]["status_str"] == "success", server.log()[-3000:]
    loaded = settled_rss(server.proc.pid)
    assert loaded - before > 0.7 * size, (before, loaded, size)

    status, _ = server.free(unload_models=True, free_memory=True)
    assert status == 200
    deadline = time.time() + 30
    freed = loaded
    while time.time() < deadline and loaded - freed < 0.7 * size:
        freed = settled_rss(server.proc.pid, 1.0)
    assert loaded - freed > 0.7 * size, f"RSS {loaded / 1e6:.0f} MB -> {freed / 1e6:.0f} MB; model {size / 1e6:.0f} MB"

    second = server.run(prompt_graph())
    assert second["status"]["status_str"] == "success"
    assert {"m", "g"} <= executed_nodes(second)  # loaded and generated again, not served from a cache
    assert second["outputs"]["g"]["prompt"] == first["outputs"]["g"]["prompt"]
    assert settled_rss(server.proc.pid) - freed > 0.7 * size


# ---- in-process: the pack's patchers and the host's memory manager ----

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": 1,
             "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
             "use_linear_in_transformer": True, "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
             "transformer_depth_output": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def nodes(llmga_pack, tmp_path_factory):
    """The pack's mllm and memory modules, with the memory-test MLLM under models/LLM."""
    from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower

    import folder_paths

    root = tmp_path_factory.mktemp("memory_inprocess")
    make_mllm_folder(root / "LLM", "qwen2", name=MODEL, sizes=SIZES)
    make_vision_tower(root / "LLM" / MODEL / host.VISION_TOWER)
    paths, extensions = folder_paths.folder_names_and_paths["LLM"]
    with pytest.MonkeyPatch.context() as patch:  # this module's model only while it runs (others list models/LLM)
        patch.setitem(folder_paths.folder_names_and_paths, "LLM", ([*paths, str(root / "LLM")], extensions))
        yield (importlib.import_module(host.PACK_MODULE + ".nodes.mllm"),
               importlib.import_module(host.PACK_MODULE + ".nodes.memory"))


@pytest.fixture()
def mllm(nodes):
    import comfy.model_management as mm

    mm.unload_all_models()
    loaded = nodes[0].LLMGAMLLMLoader.execute(MODEL, "float32")[0]
    yield loaded
    mm.unload_all_models()


def generate(mllm_nodes, loaded, seed=0):
    """One greedy answer through the node; a new seed bypasses the node's answer memo, so the model runs."""
    return mllm_nodes.LLMGAPromptGenerator.execute(loaded, task="text-to-image", instruction="a red boat",
                                                   temperature=0.0, top_p=1.0, max_new_tokens=6, seed=seed).args[0]


def registered(patcher) -> bool:
    import comfy.model_management as mm

    return any(lm.model is patcher for lm in mm.current_loaded_models)


def host_unet() -> torch.nn.Module:
    """A model of the host's own making (an SD1.5 UNet at a tiny width): every weight in a comfy.ops layer."""
    import comfy.supported_models

    return comfy.supported_models.SD15(dict(SD15_UNET)).get_model({}, "")


def test_the_host_s_own_factory_is_used_where_the_host_has_one(nodes):
    """0.33's loaders build CoreModelPatcher (comfy/sd.py); 0.3.64 has none and builds ModelPatcher; under
    --cpu main.py leaves CoreModelPatcher the plain ModelPatcher, so every patcher here is the plain one."""
    import comfy.model_patcher

    _, memory = nodes
    core = getattr(comfy.model_patcher, "CoreModelPatcher", None)
    assert (core is not None) == (host.comfyui_version() >= (0, 33))
    assert memory.host_factory() is (core or comfy.model_patcher.ModelPatcher)
    cpu = torch.device("cpu")
    assert type(memory.model_patcher(host_unet(), cpu, cpu)) is comfy.model_patcher.ModelPatcher


def test_with_dynamic_vram_on_only_comfy_ops_models_get_the_dynamic_patcher(nodes, monkeypatch):
    """main.py rebinds CoreModelPatcher to ModelPatcherDynamic when comfy-aimdo starts on a GPU. That class
    cannot be built without CUDA, so a ModelPatcher subclass stands in for it: the host's comfy.ops models get
    whatever the factory is at call time; the MLLM's plain torch layers, and a model with any plain layer, get
    the plain ModelPatcher, which the host's manager can push off for a dynamic model (next test)."""
    import comfy.model_patcher
    import comfy.ops

    _, memory = nodes

    class Dynamic(comfy.model_patcher.ModelPatcher):
        pass

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Dynamic, raising=False)
    cpu = torch.device("cpu")
    unet = host_unet()
    assert memory.streamable(unet) and type(memory.model_patcher(unet, cpu, cpu)) is Dynamic
    mixed = torch.nn.Sequential(comfy.ops.manual_cast.Linear(8, 8), torch.nn.Linear(8, 8))
    assert not memory.streamable(mixed)
    assert type(memory.model_patcher(mixed, cpu, cpu)) is comfy.model_patcher.ModelPatcher
    fresh = nodes[0].LLMGAMLLMLoader.execute(MODEL, "float32")[0]  # the loader node, with the factory rebound
    assert not memory.streamable(fresh.mllm.model)
    assert type(fresh.patcher) is comfy.model_patcher.ModelPatcher
    assert fresh.patcher.model_size() == fresh.mllm.size_bytes()


def test_a_dynamic_model_s_load_pushes_the_mllm_off_and_the_next_run_loads_it_back(nodes, mllm):
    """What load_models_gpu does on a GPU before it loads SDXL: free_memory(what SDXL needs, device) —
    on 0.33 with for_dynamic=True when every model it loads is dynamic, which unloads plain patchers by the
    estimate and leaves dynamic ones to aimdo (comfy/model_management.py free_memory). On the CPU the device
    is the RAM, so asking for more than is free puts the same pressure on the MLLM."""
    import comfy.model_management as mm

    mllm_nodes, _ = nodes
    first = generate(mllm_nodes, mllm)
    size = mllm.patcher.model_size()
    assert registered(mllm.patcher) and mllm.patcher.loaded_size() == size
    cpu = torch.device("cpu")
    dynamic = {"for_dynamic": True} if "for_dynamic" in inspect.signature(mm.free_memory).parameters else {}
    assert bool(dynamic) == (host.comfyui_version() >= (0, 33))

    mm.free_memory(mm.get_free_memory(cpu) + size // 2, cpu, **dynamic)  # about half of it is needed elsewhere
    offloaded = size - mllm.patcher.loaded_size()
    assert registered(mllm.patcher) and size // 4 < offloaded < size, (size, offloaded)  # layer by layer

    assert generate(mllm_nodes, mllm, seed=1) == first  # the node's load_models_gpu brought all of it back
    assert registered(mllm.patcher) and mllm.patcher.loaded_size() == size

    mm.free_memory(mm.get_free_memory(cpu) + 2 * size, cpu, **dynamic)  # more than all of it
    assert not registered(mllm.patcher) and mllm.patcher.loaded_size() == 0
    assert generate(mllm_nodes, mllm, seed=2) == first
    assert registered(mllm.patcher)
    mm.unload_all_models()  # what POST /free does first (main.py)
    assert not registered(mllm.patcher)


def test_a_dynamic_load_would_leave_a_dynamic_mllm_on_the_device(nodes, mllm):
    """Why memory.py keeps plain torch models off the dynamic patcher: on 0.33 free_memory(for_dynamic=True)
    skips every patcher whose is_dynamic() is true (aimdo evicts those on demand, but only weights in its VBARs,
    which plain torch layers never are) while it unloads a plain one. If a host changes this, revisit
    nodes/memory.py. 0.3.64 has no dynamic patchers: its free_memory unloads whatever it needs."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mllm_nodes, _ = nodes
    generate(mllm_nodes, mllm)
    cpu = torch.device("cpu")
    if host.comfyui_version() < (0, 33):
        assert not hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")
        mm.free_memory(mm.get_free_memory(cpu) + 2 * mllm.patcher.model_size(), cpu)
        assert not registered(mllm.patcher)
        return

    class Dynamic(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):  # the flag free_memory reads; the real class needs CUDA and comfy-aimdo
            return True

    stand_in = Dynamic(host_unet(), load_device=cpu, offload_device=cpu)
    mm.load_models_gpu([stand_in])
    assert registered(stand_in) and registered(mllm.patcher)
    mm.free_memory(mm.get_free_memory(cpu) + 2 * mllm.patcher.model_size(), cpu, for_dynamic=True)
    assert registered(stand_in) and stand_in.loaded_size() == stand_in.model_size()
    assert not registered(mllm.patcher)
    mm.unload_all_models()  # POST /free: dynamic models go too
    assert not registered(stand_in)
