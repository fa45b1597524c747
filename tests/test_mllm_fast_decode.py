"""The static-cache decoder (llmga_core/mllm/fast_decode.py) against today's dynamic-cache loop and the
independent un-cached reference (tests/mllm_reference.py): same greedy ids on every family in float32, text
only and with an image, with torch's linear kernel and with oneDNN's; the compiled step on Qwen2 (rotary
hook, tied head, biases); seeded sampling; progress and interruption per token (and per block, as a GPU
runs); one compilation per model and shape bucket over many requests, each request's cache freed; weights
that change under a compiled step; the fallback log line.
"""
from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from torch._dynamo.utils import counters  # also imported before any model is built under torch.device("meta"),
# where torch 2.6 cannot import dynamo for the first time (transformers 5 imports it lazily)

from llmga_core.mllm import fast_decode, load_mllm
from tests.fixtures.tiny_mllm import FAMILIES, RELEASED_NAMES, make_mllm_folder, shared_model_root
from tests.mllm_reference import Reference, literal_prompt

MAX_NEW = 24
TEXT = "a red fox in the snow at dawn"


@pytest.fixture(scope="module")
def model_root() -> Path:
    return shared_model_root()


@pytest.fixture(autouse=True)
def fresh_decoder_state(monkeypatch):
    """Each test measures, compiles and fails on its own terms (the choices and failures are per process)."""
    monkeypatch.setattr(fast_decode, "_compile_failures", {})
    monkeypatch.setattr(fast_decode, "_linear_choices", {})


def sample_image() -> Image.Image:
    rng = np.random.RandomState(5)
    return Image.fromarray(rng.randint(0, 256, size=(7, 5, 3)).astype(np.uint8)).resize((50, 70), Image.BILINEAR)


def generate(mllm, decoder: str, text: str = TEXT, **kwargs):
    mllm.decoder = decoder
    steps = []
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    reply = mllm.generate(text, on_token=lambda step, token: steps.append((step, token)), **kwargs)
    return reply, steps


def assert_same_reply(reply, steps, expected, expected_steps):
    assert reply.token_ids == expected.token_ids
    assert reply.response == expected.response and reply.notes == expected.notes
    assert steps == expected_steps == [(i + 1, t) for i, t in enumerate(expected.token_ids)]


@pytest.mark.parametrize("linear", ["default", "onednn"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_step_gives_the_dynamic_loops_greedy_ids(model_root, original_tokenizers, monkeypatch, family,
                                                        with_image, linear):
    folder = model_root / RELEASED_NAMES[family]
    mllm = load_mllm(folder)
    mllm.cpu_linear = linear
    image = sample_image() if with_image else None
    before, before_steps = generate(mllm, "dynamic", image=image, task="chat")
    after, after_steps = generate(mllm, "static", image=image, task="chat")
    assert_same_reply(after, after_steps, before, before_steps)
    # and both are the independent reference's tokens (no cache, eager attention, its own embeddings)
    reference = Reference(folder, model_root / "clip-vit-large-patch14-336", family, original_tokenizers)
    user = ("<image>\n" + TEXT) if with_image else TEXT
    assert after.token_ids == reference.greedy(literal_prompt(family, [(user, None)]),
                                               image, MAX_NEW)


@pytest.mark.parametrize("choice", ["onednn", "reduction"])
def test_cpu_linear_kernels_are_the_linear_layer(model_root, choice):
    """The kernels the CPU step swaps in compute x·Wᵀ + b (against float64 arithmetic), and only inside."""
    if choice == "onednn" and fast_decode._onednn_linear() is None:
        pytest.skip("this torch has no oneDNN")  # pragma: no cover - every x86/ARM torch wheel has it
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 96, generator=generator)
    layer = torch.nn.Linear(96, 200)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 96, generator=generator))
        layer.bias.copy_(torch.randn(200, generator=generator))
    expected = (x.double() @ layer.weight.double().T + layer.bias.double()).float()
    with torch.inference_mode(), fast_decode.linear_kernel(layer, choice):
        assert "forward" in layer.__dict__
        out = layer(x)
    assert "forward" not in layer.__dict__  # the module is left as it was
    assert out.shape == (1, 1, 200)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    mllm = load_mllm(model_root / RELEASED_NAMES["qwen2"])
    linears = [m for m in mllm.model.language_model.modules() if type(m) is torch.nn.Linear]
    with fast_decode.linear_kernel(mllm.model.language_model, choice):
        assert all("forward" in m.__dict__ for m in linears) and len(linears) == 2 * 7 + 1
    assert not any("forward" in m.__dict__ for m in linears)


def ends_early(mllm, prompts, max_new):
    """A prompt whose greedy answer ends with an end token before max_new (found, not hard-coded)."""
    mllm.decoder = "dynamic"
    for text in prompts:
        reply = mllm.generate(text, task="chat", max_new_tokens=max_new)
        if len(reply.token_ids) < max_new:
            return text, reply
    raise AssertionError("no prompt ended before max_new_tokens; pick other prompts")


PROMPTS = ("Now at night", "a cat", "hello", "a red fox in snow", "Make it snowy.", "a bowl of ramen")


@pytest.mark.parametrize("block", [1, 8], ids=["per-token", "per-block"])
def test_end_token_progress_and_interruption(model_root, monkeypatch, block):
    """The end token stops both decoders at the same place; on_token sees every token in order; an exception
    from on_token stops generation: per token on the CPU, within a block of tokens as on a GPU."""
    monkeypatch.setattr(fast_decode, "_tokens_per_sync", lambda device: block)
    mllm = load_mllm(model_root / RELEASED_NAMES["qwen2"])
    text, expected = ends_early(mllm, PROMPTS, 40)
    assert expected.token_ids[-1] in mllm._sampling.eos_ids
    assert not any("stopped at max_new_tokens" in note for note in expected.notes)
    reply, steps = generate(mllm, "static", text, task="chat", max_new_tokens=40)
    assert reply.token_ids == expected.token_ids
    assert steps == [(i + 1, t) for i, t in enumerate(expected.token_ids)]
    # max_new_tokens of 1: the prefill's token alone, on both paths
    one, one_steps = generate(mllm, "static", text, task="chat", max_new_tokens=1)
    assert one.token_ids == expected.token_ids[:1] and one_steps == [(1, expected.token_ids[0])]
    assert "stopped at max_new_tokens (1)" in one.notes[0]

    class Stop(Exception):
        pass

    forwards = []
    hook = mllm.model.language_model.register_forward_hook(lambda *a: forwards.append(1))

    def interrupt(step, token):
        seen.append(token)
        if step == 3:
            raise Stop

    counts = {}
    for decoder in ("dynamic", "static"):
        mllm.decoder, seen = decoder, []
        forwards.clear()
        with pytest.raises(Stop):
            mllm.generate(text, task="chat", max_new_tokens=40, on_token=interrupt)
        assert seen == expected.token_ids[:3]
        counts[decoder] = len(forwards)
    hook.remove()
    # the prefill and the steps behind tokens 2 and 3; a block of steps runs to its end before it is reported
    assert counts["dynamic"] == 3
    assert counts["static"] == 2 + block


def test_seeded_sampling_draws_the_dynamic_loops_tokens(model_root):
    mllm = load_mllm(model_root / RELEASED_NAMES["mistral"])
    for seed, top_p in ((7, None), (11, 0.8)):
        before, _ = generate(mllm, "dynamic", task="chat", temperature=0.9, top_p=top_p, seed=seed, max_new_tokens=30)
        after, steps = generate(mllm, "static", task="chat", temperature=0.9, top_p=top_p, seed=seed,
                                max_new_tokens=30)
        assert after.token_ids == before.token_ids
        assert [t for _, t in steps] == before.token_ids
    greedy, _ = generate(mllm, "dynamic", task="chat", max_new_tokens=30)
    assert before.token_ids != greedy.token_ids  # it did sample


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (its own counter, bumped once per compilation)."""
    return counters["stats"]["unique_graphs"]


def compiles_here() -> bool:
    """torch 2.6's dynamo cannot trace transformers 5's model code (its config-defaults decorator reads
    func.__code__, then dict.get through super()); every other pairing the pack supports compiles."""
    return Version(torch.__version__).release[:2] >= (2, 7) or Version(transformers.__version__).major < 5


# ten requests of different lengths, all in the first shape bucket (prompt + max_new_tokens <= BUCKET)
TEN_REQUESTS = (("a red fox in the snow at dawn", 24), ("a cat", 9), ("hello", 30), ("Make it snowy.", 17),
                ("Now at night", 12), ("a bowl of ramen on a wooden table", 28), ("two dogs", 6),
                ("a lighthouse in a storm, waves breaking", 21), ("Generate a similar image.", 15),
                ("a castle", 26))


def test_one_compilation_per_model_over_ten_requests(model_root, monkeypatch, caplog):
    """Ten requests of different lengths on Qwen2, then ten on Llama-3 (a second family, with another RMSNorm
    epsilon): one compiled graph per model, reused by all ten on every torch (before torch 2.9, transformers'
    identity guards on each new cache recompiled every request; on 2.7 the second family's epsilon failed to
    compile), the dynamic loop's greedy ids, and each request's cache freed when it ends. On torch 2.6 with
    transformers 5, the fallback instead: the same ids, no graph, one log line per model."""
    caches = []
    new_cache = fast_decode._new_static_cache

    def tracked(*args, **kwargs):  # watches the caches the decoder makes (it still makes them itself)
        cache = new_cache(*args, **kwargs)
        caches.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(fast_decode, "_new_static_cache", tracked)
    torch._dynamo.reset()  # graphs of earlier tests would serve these models without compiling
    compiles = {}
    try:
        for family in ("qwen2", "llama3"):
            mllm = load_mllm(model_root / RELEASED_NAMES[family])
            expected = [generate(mllm, "dynamic", text, max_new_tokens=n)[0].token_ids for text, n in TEN_REQUESTS]
            assert all(len(ids) <= n for ids, (_, n) in zip(expected, TEN_REQUESTS))
            start = compiled_graphs()
            with caplog.at_level(logging.WARNING, logger="llmga"):
                for (text, n), ids in zip(TEN_REQUESTS, expected):
                    reply, steps = generate(mllm, "compiled", text, max_new_tokens=n)
                    assert reply.token_ids == ids and [t for _, t in steps] == ids
                    gc.collect()
                    assert caches and all(ref() is None for ref in caches)  # nothing keeps a finished cache
            compiles[family] = compiled_graphs() - start
    finally:
        torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmga" and r.levelno >= logging.WARNING]
    if compiles_here():
        assert compiles == {"qwen2": 1, "llama3": 1}
        assert len(caches) == 20 and warnings == []
    else:
        assert compiles == {"qwen2": 0, "llama3": 0}
        assert len(caches) == 2  # one try per model class; later requests go straight to the dynamic loop
        assert len(warnings) == 2 and all(w.startswith("LLMGA MLLM: compiling the decode step failed on cpu (")
                                          for w in warnings)


def test_compiled_step(model_root, tmp_path):
    """Qwen2 (tied head, q/k/v biases, the float16 rounding hook on its rotary tables) through the compiled
    step with its CPU linear kernel (the fused multiply-and-sum): greedy ids of the dynamic loop, text and
    image; one compilation per shape bucket; seeded sampling; and weights that change after compiling (as moving
    the model between devices does) are used, not baked in."""
    if not compiles_here():
        pytest.skip("torch 2.6 cannot compile transformers 5's models; the fallback is checked by "
                    "test_one_compilation_per_model_over_ten_requests")
    assert fast_decode.cpu_linear_choice(None, torch.float32, compiled=True) == "reduction"
    mllm = load_mllm(model_root / RELEASED_NAMES["qwen2"])
    expected, expected_steps = generate(mllm, "dynamic")
    start = compiled_graphs()
    reply, steps = generate(mllm, "compiled")
    assert_same_reply(reply, steps, expected, expected_steps)
    assert compiled_graphs() == start + 1
    old_weights_ids = expected.token_ids
    # another prompt in the same bucket of cache positions runs the same compiled step
    other, _ = generate(mllm, "dynamic", "a cat", max_new_tokens=30)
    again, _ = generate(mllm, "compiled", "a cat", max_new_tokens=30)
    assert again.token_ids == other.token_ids
    assert compiled_graphs() == start + 1

    image = sample_image()
    expected, expected_steps = generate(mllm, "dynamic", "Generate a similar image.", image=image)
    reply, steps = generate(mllm, "compiled", "Generate a similar image.", image=image)
    assert_same_reply(reply, steps, expected, expected_steps)
    assert compiled_graphs() == start + 2  # the image's 576 features: the next bucket of cache positions
    other, _ = generate(mllm, "dynamic", "Make it snowy.", image=image)
    again, _ = generate(mllm, "compiled", "Make it snowy.", image=image)
    assert again.token_ids == other.token_ids
    assert compiled_graphs() == start + 2

    before, _ = generate(mllm, "dynamic", temperature=0.9, seed=3)
    after, _ = generate(mllm, "compiled", temperature=0.9, seed=3)
    assert after.token_ids == before.token_ids
    assert compiled_graphs() == start + 3  # sampling's step returns the logits: another function

    # new tensors (as a move between devices makes) holding new weights: the compiled step reads them
    other_folder = make_mllm_folder(tmp_path, "qwen2", seed=9)
    other_lm = load_mllm(other_folder, vision_tower=model_root / "clip-vit-large-patch14-336").model.language_model
    lm = mllm.model.language_model
    lm.to(torch.float64).to(torch.float32)
    with torch.no_grad():
        for mine, theirs in zip(lm.parameters(), other_lm.parameters()):
            mine.copy_(theirs)
    new_expected, _ = generate(mllm, "dynamic")
    assert new_expected.token_ids != old_weights_ids
    assert generate(mllm, "compiled")[0].token_ids == new_expected.token_ids
    assert compiled_graphs() == start + 3  # the weights are inputs of the step


def test_failed_compilation_falls_back_with_one_log_line(model_root, caplog):
    """Where the step cannot be compiled (here: no C++ compiler for inductor's CPU code, as on a machine without
    one) generation still gives today's tokens, and says so once."""
    import torch._inductor.config as inductor_config

    # the config's own patch (monkeypatch's undo deleted force_disable_caches on torch 2.14, so later tests could
    # not compile); caches disabled: a cached kernel needs no compiler
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++"), "force_disable_caches": True}):
            mllm = load_mllm(model_root / RELEASED_NAMES["llama3"])
            expected, expected_steps = generate(mllm, "dynamic")
            with caplog.at_level(logging.DEBUG, logger="llmga"):
                first, first_steps = generate(mllm, "compiled")
                second, second_steps = generate(mllm, "compiled")
    finally:
        torch._dynamo.reset()
    assert_same_reply(first, first_steps, expected, expected_steps)
    assert_same_reply(second, second_steps, expected, expected_steps)
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmga" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("LLMGA MLLM: compiling the decode step failed on cpu (")
    assert warnings[0].endswith("); decoding with the dynamic cache instead.")
    assert "\n" not in warnings[0]


def test_decoder_choice_is_checked(model_root):
    mllm = load_mllm(model_root / RELEASED_NAMES["gemma"])
    assert mllm.decoder == "auto"
    mllm.decoder = "fastest"
    with pytest.raises(ValueError, match=r"^decoder is 'fastest'; use one of auto, compiled, static, dynamic\.$"):
        mllm.generate(TEXT, max_new_tokens=2)
