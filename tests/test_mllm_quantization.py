"""8-bit (LLM.int8()) and 4-bit (NF4) loading of the MLLM through bitsandbytes, and every way it is refused.

References: the checkpoint's own tensors (safetensors), LLM.int8()'s row-wise quantisation and the NF4 code book
of the QLoRA paper written out here, bitsandbytes' dequantisation feeding a float model, and the float model
itself. Where bitsandbytes is missing or cannot run, a subprocess: `sys.modules["bitsandbytes"] = None`, or
bitsandbytes 0.45.5 (no CPU kernels) from the side folder .ci/setup_env.sh fills.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmga_core.mllm import load_mllm
from llmga_core.mllm.quantization import is_quantized
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, shared_model_root
from tests.host import REPO

PROMPT = "a red fox in the snow at dawn"
# NF4's 16 levels (Dettmers et al., QLoRA, appendix E): the quantiles of N(0, 1) scaled to [-1, 1]
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


@pytest.fixture(scope="module")
def root():
    return shared_model_root()


def decoder_linears(mllm) -> set[str]:
    return {name for name, m in mllm.model.language_model.named_modules()
            if type(m) is nn.Linear and name.startswith("model.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_8bit_and_4bit_load_and_generate_on_the_cpu(root, family):
    folder = root / RELEASED_NAMES[family]
    plain = load_mllm(folder)
    layers = decoder_linears(plain)
    for mode, stored, bits in (("8bit", torch.int8, 8), ("4bit", torch.uint8, 4)):
        mllm = load_mllm(folder, quantization=mode)
        lm = mllm.model.language_model
        assert {name for name, m in lm.named_modules() if is_quantized(m)} == layers
        for name in layers:
            layer = lm.get_submodule(name)
            assert layer.weight.dtype == stored
            assert layer.weight.numel() * 8 == layer.in_features * layer.out_features * bits
        # the LM head, the embeddings, the projector and CLIP stay float (32-bit on the CPU)
        assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight.dtype == torch.float32
        assert {p.dtype for p in mllm.model.mm_projector.parameters()} == {torch.float32}
        assert {p.dtype for p in mllm.model.vision_tower.parameters()} == {torch.float32}
        assert mllm.dtype == torch.float32 and mllm.size_bytes() < plain.size_bytes()
        # what the float load does still happens: the vocabulary shrink, the float16-rounded rotary tables
        assert lm.get_input_embeddings().weight.shape[0] == lm.lm_head.weight.shape[0] == len(mllm.tokenizer)
        assert bool(lm.model.rotary_emb._forward_hooks) == (family in ("mistral", "qwen2"))
        reply = mllm.generate(PROMPT, task="text-to-image", max_new_tokens=6)
        assert 1 <= len(reply.token_ids) <= 6 and max(reply.token_ids) < len(mllm.tokenizer)


def test_8bit_layers_hold_llm_int8_of_the_checkpoint(root):
    """Each layer holds its own checkpoint weight, row-wise: int8 = round(w · 127 / max|row|) of the float16
    weight, the scale = max|row| (LLM.int8(), Dettmers et al. 2022)."""
    from safetensors.torch import load_file

    folder = root / RELEASED_NAMES["llama3"]
    checkpoint = load_file(str(folder / "model.safetensors"))
    mllm = load_mllm(folder, quantization="8bit")
    for name, layer in mllm.model.language_model.named_modules():
        if not is_quantized(layer):
            continue
        weight = checkpoint[name + ".weight"].to(torch.float16).float()
        scale = weight.abs().amax(dim=1)
        expected = torch.round(weight * 127 / scale[:, None])
        assert torch.equal(layer.weight.SCB.float(), scale), name
        assert (layer.weight.data.float() - expected).abs().max() <= 1, name  # float16 rounding at .5
        assert (layer.weight.data.float() == expected).float().mean() > 0.99, name


def test_4bit_is_nf4_weights_and_float_arithmetic(root):
    """The 4-bit model is exactly the float model with NF4 weights: greedy tokens and logits equal those of a
    float32 model whose linear weights are bitsandbytes' dequantisation; every block of 64 values is one scale
    times NF4 levels, and close to the checkpoint's."""
    import bitsandbytes.functional as bnbf

    folder = root / RELEASED_NAMES["mistral"]
    quantized, plain = load_mllm(folder, quantization="4bit"), load_mllm(folder)
    levels = torch.tensor(NF4)
    for name, layer in quantized.model.language_model.named_modules():
        if not is_quantized(layer):
            continue
        target = plain.model.language_model.get_submodule(name).weight
        weights = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert (weights - target).norm() / target.norm() < 0.15, name
        blocks = weights.reshape(-1, 64)
        ratios = blocks / blocks.abs().amax(dim=1, keepdim=True)
        assert (ratios[..., None] - levels).abs().amin(dim=-1).max() < 1e-3, name
        target.data.copy_(weights)
    assert quantized.generate(PROMPT, max_new_tokens=24).token_ids == plain.generate(PROMPT, max_new_tokens=24).token_ids
    ids = torch.tensor([quantized.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        torch.testing.assert_close(quantized.model.language_model(input_ids=ids).logits,
                                   plain.model.language_model(input_ids=ids).logits, rtol=0, atol=1e-5)


def next_token_agreement(ours, theirs, ids: list[int]) -> float:
    """Share of positions where both models pick the same next token, given the same text (teacher forcing)."""
    with torch.inference_mode():
        a = ours.model.language_model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
        b = theirs.model.language_model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
    return float((a == b).float().mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_8bit_picks_the_float_models_next_token_at_most_positions(root, family):
    """On the float model's own greedy answer (bench/bench_quantization.py gives the figures): these tiny random
    models are chaotic (weights of std 0.5), so every error grows, and still LLM.int8() keeps three quarters
    (measured 0.83–0.98; 4-bit gets about 0.3 here, a random pick 0.002)."""
    folder = root / RELEASED_NAMES[family]
    plain, quantized = load_mllm(folder), load_mllm(folder, quantization="8bit")
    answer = plain.generate(PROMPT, task="text-to-image", max_new_tokens=40).token_ids
    ids = plain.tokenizer.encode(PROMPT) + answer
    assert next_token_agreement(quantized, plain, ids) >= 0.75


def test_the_int8_matrix_follows_the_weight_when_the_host_moves_the_model(root):
    """After its first forward an 8-bit layer keeps the int8 matrix on `state`; ComfyUI offloads with model.to(),
    which reaches the layer through _apply only, so the matrix (and its scales) must follow the weight there, or
    the old copy stays alive on the GPU and is the one used."""
    mllm = load_mllm(root / RELEASED_NAMES["qwen2"], quantization="8bit")
    first = mllm.generate(PROMPT, max_new_tokens=8).token_ids
    layers = [m for m in mllm.model.modules() if is_quantized(m)]
    assert all(m.state.CB is not None for m in layers)  # moved off the weight by the forward
    mllm.model._apply(lambda t: t.clone())  # what .to(device) does to every tensor: new storage
    for layer in layers:
        assert layer.state.CB.data_ptr() == layer.weight.data_ptr()
    assert mllm.generate(PROMPT, max_new_tokens=8).token_ids == first


def test_unknown_quantization_is_one_sentence(root):
    with pytest.raises(ValueError) as info:
        load_mllm(root / RELEASED_NAMES["qwen2"], quantization="int4")
    assert str(info.value) == ("quantization is 'int4'; use None (no quantisation), 'int8' (the pack's 8-bit "
                               "weights, fast on CPUs), '8bit' (bitsandbytes' LLM.int8()) or '4bit' (NF4).")


# ------------------------------------------------------------------------------------------- in the host
def test_the_loader_node_loads_8bit_under_host_memory_management(comfy_inprocess, llmga_pack, tmp_path, monkeypatch):
    import importlib

    import comfy.model_management as mm
    from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower

    folder_paths = comfy_inprocess
    make_mllm_folder(tmp_path / "LLM", "gemma")
    make_vision_tower(tmp_path / "LLM" / "clip-vit-large-patch14-336")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "LLM", ([str(tmp_path / "LLM")], set()))
    nodes = importlib.import_module("llmga_pack_under_test.nodes.mllm")
    schema = nodes.LLMGAMLLMLoader.define_schema()
    # choices of the dtype combo, so saved workflows keep their widget values
    assert [i.id for i in schema.inputs] == ["model_name", "dtype"]
    assert schema.inputs[1].options == ["auto", "float16", "bfloat16", "float32", "int8", "8bit", "4bit"]
    name = RELEASED_NAMES["gemma"]
    plain = nodes.LLMGAMLLMLoader.execute(name, "auto")[0]
    loaded = nodes.LLMGAMLLMLoader.execute(name, "8bit")[0]
    assert (loaded.mllm.quantization, loaded.mllm.dtype, plain.mllm.dtype) == ("8bit", torch.float32, torch.float32)
    assert loaded.patcher.model_size() == loaded.mllm.size_bytes() < plain.patcher.model_size()
    args = dict(task="text-to-image", instruction=PROMPT, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    out = nodes.LLMGAPromptGenerator.execute(loaded, **args)
    assert any(lm.model is loaded.patcher for lm in mm.current_loaded_models)
    mm.unload_all_models()  # the host's "free model memory"
    assert nodes.LLMGAPromptGenerator.execute(loaded, **args).args[1] == out.args[1]
    direct = loaded.mllm.generate(PROMPT, task="text-to-image", max_new_tokens=6)
    assert out.args[1] == direct.response
    # the pack's own int8 weights: no bitsandbytes check, a smaller model under the host, the same answer as
    # the library's
    own = nodes.LLMGAMLLMLoader.execute(name, "int8")[0]
    assert (own.mllm.quantization, own.mllm.dtype) == ("int8", torch.float32)
    assert own.patcher.model_size() == own.mllm.size_bytes() < plain.patcher.model_size()
    out = nodes.LLMGAPromptGenerator.execute(own, **args)
    assert out.args[1] == own.mllm.generate(PROMPT, task="text-to-image", max_new_tokens=6).response
    # the first CPU decode moved the language model onto huge pages (huge_pages.py); the host's loads and
    # unloads leave it there, so later runs do not copy it again
    from llmga_core.mllm import huge_pages

    if huge_pages.unavailable() is None:
        head = own.mllm.model.language_model.get_output_embeddings()
        address = head.weight.data_ptr()
        assert huge_pages.place(own.mllm.model.language_model) == 0
        mm.unload_all_models()
        nodes.LLMGAPromptGenerator.execute(own, **args)
        assert head.weight.data_ptr() == address


# ------------------------------------------------------------------------------------------- refusals
def run_python(code: str, *, extra_path: str | None = None) -> dict:
    """Runs `code` in a fresh interpreter of this venv (the checkout importable); it prints one JSON line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(REPO)) if p))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


REFUSALS = """
import json, sys, torch
from llmga_core.mllm import load_mllm
out = {}
for mode in ("8bit", "4bit"):
    try:
        load_mllm(sys.argv[1] if len(sys.argv) > 1 else %r, quantization=mode)
    except Exception as error:
        out[mode] = [type(error).__name__, str(error)]
out["plain"] = len(load_mllm(%r).generate("hi", max_new_tokens=2).token_ids)
print(json.dumps(out))
"""


@pytest.mark.host  # the node's choice, in a subprocess that imports the host
def test_without_bitsandbytes_the_choice_says_how_to_install_it(root, tmp_path):
    folder = str(root / RELEASED_NAMES["qwen2"])
    library = run_python('import sys; sys.modules["bitsandbytes"] = None\n' + REFUSALS % (folder, folder))
    command = f"{sys.executable} -m pip install bitsandbytes"
    for mode, label in (("8bit", "8-bit"), ("4bit", "4-bit")):
        assert library[mode] == ["QuantizationUnavailableError",
                                 f"{label} loading needs the bitsandbytes package, which is not installed: run "
                                 f"`{command}` and restart, or load the model without quantization."]
    assert library["plain"] == 2  # the float load is unaffected

    # the node: its tooltip says how to install it, and choosing 8bit refuses with the same sentence
    models = tmp_path / "LLM"
    shutil_copy(root / RELEASED_NAMES["qwen2"], models / RELEASED_NAMES["qwen2"])
    shutil_copy(root / "clip-vit-large-patch14-336", models / "clip-vit-large-patch14-336")
    node = run_python(f"""
import sys, json
sys.modules["bitsandbytes"] = None
from tests.host import import_pack_inprocess
import_pack_inprocess()
import folder_paths, importlib
folder_paths.add_model_folder_path("LLM", {str(models)!r}, is_default=True)
nodes = importlib.import_module("llmga_pack_under_test.nodes.mllm")
schema = nodes.LLMGAMLLMLoader.define_schema()
tooltip = schema.inputs[1].tooltip
try:
    nodes.LLMGAMLLMLoader.execute({RELEASED_NAMES["qwen2"]!r}, "8bit")
    error = None
except Exception as e:
    error = [type(e).__name__, str(e)]
print(json.dumps({{"tooltip": tooltip, "error": error, "options": schema.inputs[1].options}}))
""")
    assert node["options"][-2:] == ["8bit", "4bit"]  # listed, so a shared workflow still validates
    assert node["tooltip"].endswith(f"8bit/4bit need bitsandbytes, which is not installed: run `{command}` and "
                                    "restart ComfyUI.")
    assert node["error"] == library["8bit"]


def shutil_copy(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target)


def old_bitsandbytes() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(os.environ.get("LLMGA_OLD_BITSANDBYTES") or cache / "llmga-comfyui" / "bitsandbytes-0.45.5")
    if not (path / ".llmga-ready").is_file():
        raise RuntimeError(f"bitsandbytes 0.45.5 is missing from {path}; run `bash .ci/setup_env.sh` to install it.")
    return path


def test_a_bitsandbytes_that_cannot_run_on_this_device_is_refused_in_one_sentence(root):
    """bitsandbytes 0.45.5 has no CPU kernels: asked for 4-bit (or 8-bit) on the CPU it is refused before the
    model is loaded, naming the version and what to do."""
    folder = str(root / RELEASED_NAMES["gemma"])
    out = run_python("import bitsandbytes; assert bitsandbytes.__version__ == '0.45.5', bitsandbytes.__version__\n"
                     + REFUSALS % (folder, folder), extra_path=str(old_bitsandbytes()))
    upgrade = f"{sys.executable} -m pip install -U bitsandbytes"
    for mode, label, other in (("4bit", "4-bit", "8bit"), ("8bit", "8-bit", "4bit")):
        kind, message = out[mode]
        assert kind == "QuantizationUnavailableError"
        assert message.startswith(f"{label} loading does not work on cpu with the installed bitsandbytes 0.45.5 (")
        assert message.endswith(f"); choose {other} or no quantization, or upgrade it with `{upgrade}` "
                                "(bitsandbytes 0.50 runs 8-bit and 4-bit on the CPU too).")
        assert "\n" not in message
    assert out["plain"] == 2
