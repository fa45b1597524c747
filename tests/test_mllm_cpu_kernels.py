"""The CPU decode kernels (llmga_core/mllm/cpu_kernels.cpp) and the pack's int8 weights (int8_weights.py).

References: float64 arithmetic on the same bfloat16 / dequantised values; the int8 format (blocks of 32, scale =
largest magnitude / 127 in float16) written out as a plain numpy loop; the float model's own tokens. The kernels
run where the processor has AVX-512 (BF16); elsewhere these tests check the fallback only.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from llmga_core.mllm import cpu_kernels, fast_decode, int8_weights, load_mllm
from llmga_core.mllm.int8_weights import Int8Linear
from tests.fixtures.tiny_mllm import RELEASED_NAMES, shared_model_root

PROMPT = "a red fox in the snow at dawn"
BF16, BF16_WHY = cpu_kernels.available("bf16")
INT8, INT8_WHY = cpu_kernels.available("int8")
needs_bf16 = pytest.mark.skipif(not BF16, reason=f"bfloat16 kernel unavailable: {BF16_WHY}")
needs_int8 = pytest.mark.skipif(not INT8, reason=f"int8 kernel unavailable: {INT8_WHY}")


@pytest.fixture(scope="module")
def root():
    return shared_model_root()


@pytest.fixture(autouse=True)
def fresh_decoder_state(monkeypatch):
    monkeypatch.setattr(fast_decode, "_compile_failures", {})
    monkeypatch.setattr(fast_decode, "_linear_choices", {})


def leading_agreement(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))


# ------------------------------------------------------------------------------------------ the kernels
@needs_bf16
@pytest.mark.parametrize("rows,out_features,width", [(1, 7, 64), (1, 131, 96), (3, 33, 40), (1, 896, 4864),
                                                      (2, 5, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_kernel_is_the_float64_product(rows, out_features, width, threads):
    """Every width (masked tails of 1–63 values included), several rows and threads: the float64 product of the
    same bfloat16 values, to float32 summation's precision."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(rows, width, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, width, generator=generator).to(torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.llmga.gemv_bf16(x, weight)
    finally:
        torch.set_num_threads(previous)
    expected = x.double() @ weight.double().T
    scale = x.double().abs() @ weight.double().abs().T
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    assert bool(((out.double() - expected).abs() <= 2e-6 * scale + 1e-30).all())


def numpy_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 format one block at a time: scale = float16(max |w| / 127), value = round(w / scale)."""
    rows, width = weight.shape
    values = np.zeros((rows, width), np.int8)
    scales = np.zeros((rows, width // 32), np.float16)
    for r in range(rows):
        for b in range(width // 32):
            block = weight[r, 32 * b:32 * b + 32].astype(np.float32)
            scale = np.float16(np.float32(np.abs(block).max()) / np.float32(127))
            scales[r, b] = scale
            if scale != 0:
                values[r, 32 * b:32 * b + 32] = np.clip(np.rint(block / np.float32(scale)), -127, 127)
    return values, scales


def dequantised(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 format's float64 weight, each value times its block's scale."""
    return values.double() * scale.double().repeat_interleave(32, dim=1)


def test_int8_format_is_blocks_of_32_with_float16_scales():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 96, generator=generator) * torch.tensor([1e-3, 1.0, 40.0, 0.02, 3.0, 0.5]).view(6, 1)
    weight[2, 32:64] = 0  # an all-zero block: scale 0, values 0
    values, scale = int8_weights.quantize(weight)
    expected_values, expected_scales = numpy_blocks(weight.numpy())
    assert values.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (6, 3)
    np.testing.assert_array_equal(values.numpy(), expected_values)
    np.testing.assert_array_equal(scale.numpy(), expected_scales)
    # every block's largest magnitude lands on ±127 (up to the float16 rounding of its scale)
    assert int(values.abs().reshape(6, 3, 32).amax(-1).min()) in (0, 126, 127)
    back = int8_weights.dequantize(values, scale, torch.float32)
    blocks_max = weight.abs().reshape(6, 3, 32).amax(-1, keepdim=True)
    assert bool(((back - weight).abs().reshape(6, 3, 32) <= blocks_max / 127 * 0.51).all())


@needs_int8
@pytest.mark.parametrize("rows,out_features,width", [(1, 7, 64), (2, 131, 96), (1, 896, 4864), (4, 3, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kernel_is_the_dequantised_product(rows, out_features, width, threads):
    """The kernel against float64 arithmetic on the dequantised weights: the only difference allowed is the
    activations' rounding to 16-bit integers per block (half a step of the block's largest |x| / 32767 per
    value) plus float32 summation."""
    generator = torch.Generator().manual_seed(width + rows)
    x = torch.randn(rows, width, generator=generator) * 3
    x[0, :32] *= 100  # an outlier block: its own step, the others keep theirs
    values, scale = int8_weights.quantize(torch.randn(out_features, width, generator=generator) * 0.05)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.llmga.gemv_int8(x, values, scale)
    finally:
        torch.set_num_threads(previous)
    weight = dequantised(values, scale)
    expected = x.double() @ weight.T
    step = x.double().abs().reshape(rows, -1, 32).amax(-1) / 32767  # per row and block
    rounding = (step.repeat_interleave(32, -1) * 0.5) @ weight.abs().T
    summing = 2e-6 * (x.double().abs() @ weight.abs().T)
    error = (out.double() - expected).abs()
    assert bool((error <= rounding + summing).all())
    assert float(error.max()) > 0  # not float arithmetic: the bound above is the one that applies


@needs_int8
def test_int8_layer_paths_agree():
    """One layer, three ways: the kernel (a decode step's row), torch on the dequantised weight (a prompt's
    rows), the fused multiply-and-sum a compiled step uses where the kernel does not run."""
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=generator) * 0.1)
        linear.bias.copy_(torch.randn(40, generator=generator))
    layer = Int8Linear(linear, use_cpu_kernel=True)
    x = torch.randn(1, 1, 96, generator=generator)
    expected = x.double() @ dequantised(layer.weight, layer.scale).T + linear.bias.double()
    with torch.inference_mode():
        kernel = layer(x)
        prompt = layer(x.expand(1, 6, 96))[:, :1]
        layer.use_cpu_kernel = False
        fused = torch.compile(layer, fullgraph=True)(x)
    for out in (kernel, prompt, fused):
        assert out.shape == (1, 1, 40) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- the loader and decoding
def test_int8_load_quantises_every_linear_layer_and_the_head(root):
    folder = root / RELEASED_NAMES["qwen2"]
    plain, own = load_mllm(folder), load_mllm(folder, quantization="int8")
    lm = own.model.language_model
    names = {name for name, m in plain.model.language_model.named_modules() if type(m) is nn.Linear}
    assert {name for name, m in lm.named_modules() if isinstance(m, Int8Linear)} == names  # the head too
    assert not any(type(m) is nn.Linear for m in lm.modules())
    assert own.quantization == "int8" and own.dtype == torch.float32
    # each layer holds its checkpoint weight in the int8 format, its bias as it was
    for name, module in lm.named_modules():
        if isinstance(module, Int8Linear):
            original = plain.model.language_model.get_submodule(name)
            values, scales = numpy_blocks(original.weight.detach().numpy())
            np.testing.assert_array_equal(module.weight.numpy(), values)
            np.testing.assert_array_equal(module.scale.numpy(), scales)
            assert (module.bias is None) == (original.bias is None)
            if module.bias is not None:
                assert torch.equal(module.bias, original.bias)
    linear_values = sum(m.weight.numel() for m in plain.model.language_model.modules() if type(m) is nn.Linear)
    int8_bytes = sum(m.weight.numel() + m.scale.numel() * 2 for m in lm.modules() if isinstance(m, Int8Linear))
    assert int8_bytes == linear_values * 17 // 16  # 8.5 bits per weight
    assert lm.get_input_embeddings().weight.dtype == torch.float32  # the embedding stays (one row per token)
    assert own.size_bytes() < plain.size_bytes()
    reply = own.generate(PROMPT, task="text-to-image", max_new_tokens=8)
    assert len(reply.token_ids) == 8


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma"])
def test_int8_compiled_and_dynamic_decoders_agree(root, family, caplog):
    """The same int8 kernel in both decoders: the compiled step gives the dynamic loop's greedy ids (float32
    activations, as the float decoders are held to), with and without an image."""
    if not fast_decode_compiles():
        pytest.skip("torch 2.6 cannot compile transformers 5's models")
    mllm = load_mllm(root / RELEASED_NAMES[family], quantization="int8")
    for decoder_run in ({}, {"task": "text-to-image"}):
        mllm.decoder = "dynamic"
        expected = mllm.generate(PROMPT, max_new_tokens=16, **decoder_run).token_ids
        mllm.decoder = "compiled"
        with caplog.at_level(logging.WARNING, logger="llmga"):
            assert mllm.generate(PROMPT, max_new_tokens=16, **decoder_run).token_ids == expected
    assert not [r for r in caplog.records if r.name == "llmga" and r.levelno >= logging.WARNING]


def fast_decode_compiles() -> bool:
    import transformers
    from packaging.version import Version

    return Version(torch.__version__).release[:2] >= (2, 7) or Version(transformers.__version__).major < 5


@needs_bf16
def test_bf16_decoding_uses_the_kernel_and_sums_in_float32(root):
    """A bfloat16 model decodes with the AVX-512 BF16 kernel, compiled or not (float32 keeps the fused
    reduction); the step's logits are the float64 product of the bfloat16 layers to float32 precision, where
    torch's own bfloat16 linear rounds its output to bfloat16."""
    mllm = load_mllm(root / RELEASED_NAMES["llama3"], dtype=torch.bfloat16)
    lm = mllm.model.language_model
    assert fast_decode.cpu_linear_choice(lm, torch.bfloat16, compiled=True) == "bf16"
    assert fast_decode.cpu_linear_choice(lm, torch.bfloat16, compiled=False) == "bf16"
    assert fast_decode.cpu_linear_choice(lm, torch.float32, compiled=True) == "reduction"
    head = lm.get_output_embeddings()
    x = torch.randn(1, 1, head.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.inference_mode(), fast_decode.linear_kernel(lm, "bf16"):
        out = head(x)
    expected = (x.double() @ head.weight.double().T).to(torch.bfloat16)  # the layer's output dtype
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    floats = {}
    for decoder in ("dynamic", "static", "compiled"):
        if decoder == "compiled" and not fast_decode_compiles():
            continue
        mllm.decoder = decoder
        floats[decoder] = mllm.generate(PROMPT, task="text-to-image", max_new_tokens=16).token_ids
    # every decoder answers in full; the first token comes from the same prefill. Later tokens of this chaotic
    # tiny model part where bfloat16 rounds differently (fused norms, float32 attention in the compiled step)
    assert all(len(ids) == 16 and ids[0] == floats["dynamic"][0] for ids in floats.values())


def test_without_the_kernels_decoding_keeps_torchs_code(root, monkeypatch):
    """No compiler, another processor: bfloat16 keeps the fused reduction, int8 layers the dequantised /
    fused paths, and the answers come as before."""
    monkeypatch.setattr(cpu_kernels, "available", lambda kind: (False, "this processor lacks AVX-512 BF16"))
    folder = root / RELEASED_NAMES["qwen2"]
    bf16 = load_mllm(folder, dtype=torch.bfloat16)
    assert fast_decode.cpu_linear_choice(bf16.model.language_model, torch.bfloat16, compiled=True) == "reduction"
    bf16.decoder = "static"
    assert len(bf16.generate(PROMPT, max_new_tokens=6).token_ids) == 6
    own = load_mllm(folder, quantization="int8")
    assert not any(m.use_cpu_kernel for m in own.model.language_model.modules() if isinstance(m, Int8Linear))
    own.decoder = "dynamic"
    expected = own.generate(PROMPT, max_new_tokens=12).token_ids
    if fast_decode_compiles():
        own.decoder = "compiled"
        assert leading_agreement(own.generate(PROMPT, max_new_tokens=12).token_ids, expected) >= 4


def test_a_failed_build_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/nonexistent/c++")
    monkeypatch.setattr(cpu_kernels, "_cache_folder", lambda: tmp_path)
    library, reason = cpu_kernels._load.__wrapped__()
    assert library is None
    assert reason.startswith("compiling the CPU kernels with /nonexistent/c++ failed (FileNotFoundError")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to load later


def test_reduction_splits_long_rows_and_stays_the_linear_layer():
    """Rows longer than inductor's 4096-value chunk are summed in parts (the compiled CPU float32 step)."""
    generator = torch.Generator().manual_seed(2)
    for width in (4864, 4099, 96):
        layer = nn.Linear(width, 24)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(24, width, generator=generator))
        x = torch.randn(1, 1, width, generator=generator)
        expected = x.double() @ layer.weight.double().T + layer.bias.double()
        with torch.inference_mode(), fast_decode.linear_kernel(layer, "reduction"):
            out = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
