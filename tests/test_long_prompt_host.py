"""LLMGALongCLIPTextEncode on the real host (in-process, CPU) with a tiny host CLIP.

The host CLIP holds the same weights as the transformers models, so the node must give what
llmga_core.long_prompt.encode_prompt gives, and host features that patch the CLIP (clip-skip,
LoRA) must change the result exactly as the same change made to the transformers model does.
"""
from __future__ import annotations

import copy
import importlib
import logging
import random
import warnings

import pytest
import torch

from llmga_core.long_prompt import PromptCharactersDroppedWarning, encode_prompt
from tests.fixtures.tiny_clip import TinyClip, build_host_clip, host_tokenizer_dir, make_tiny_clip_text_models
from tests.long_prompt_reference import (close, fuzz_text, fuzz_weighted, long_weighted, lpw_reference,
                                         original_clip_tokenizers, sdxl_reference, words)


@pytest.fixture(scope="module")
def node(llmga_pack):
    return importlib.import_module(llmga_pack.__name__ + ".nodes.long_prompt").LLMGALongCLIPTextEncode


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_clip_text_models(seed=2)


@pytest.fixture(scope="module")
def clips(llmga_pack, tiny):
    return {"sd15": build_host_clip(tiny, "sd15"), "sdxl": build_host_clip(tiny, "sdxl")}


def encode(node, clip, text, **kw):
    positive, negative = node.execute(clip=clip, text=text, **kw).args
    assert len(positive) == 1 and len(negative) == 1
    return positive[0], negative[0]


def library(tiny, text, negative, pipeline, **models):
    sdxl = pipeline.startswith("sdxl")
    l_model = models.get("l", tiny.text_encoder)
    g_model = models.get("g", tiny.text_encoder_2)
    return encode_prompt(text, negative or None,
                         tokenizers=[tiny.tokenizer, tiny.tokenizer_2] if sdxl else tiny.tokenizer,
                         text_encoders=[l_model, g_model] if sdxl else l_model, pipeline=pipeline)


def test_schema_is_the_public_contract(node):
    schema = node.define_schema()
    schema.validate()
    assert (schema.node_id, schema.category) == ("LLMGALongCLIPTextEncode", "LLMGA/conditioning")
    assert schema.display_name == "LLMGA Long-Prompt CLIP Text Encode"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs)[:3] == ["clip", "text", "pipeline"]
    assert inputs["text"].multiline and inputs["text"].dynamic_prompts is False
    assert inputs["negative_text"].optional and inputs["negative_text"].default == ""
    assert inputs["pipeline"].options == ["auto", "sd15", "sd15-inpaint", "sdxl", "sdxl-inpaint"]
    assert inputs["pipeline"].default == "auto"
    assert [(o.id, o.io_type) for o in schema.outputs] == [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]


@pytest.mark.parametrize("pipeline,n_filler,negative", [
    ("sd15", 150, ""), ("sd15", 20, "blurry, (ugly:1.3)"), ("sd15-inpaint", 260, ""),
    ("sdxl", 150, ""), ("sdxl-inpaint", 40, ""),
])
def test_node_equals_encode_prompt(node, clips, tiny, pipeline, n_filler, negative):
    text, _ = long_weighted(n_filler)
    clip = clips["sdxl" if pipeline.startswith("sdxl") else "sd15"]
    (pos, pos_extra), (neg, neg_extra) = encode(node, clip, text, pipeline=pipeline, negative_text=negative)
    want = library(tiny, text, negative, pipeline)
    close(pos, want["prompt_embeds"])
    close(neg, want["negative_prompt_embeds"])
    if pipeline.startswith("sdxl"):
        close(pos_extra["pooled_output"], want["pooled_prompt_embeds"])
        assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(neg_extra["pooled_output"]) == 0
        assert neg_extra["pooled_output"].shape == pos_extra["pooled_output"].shape == (1, 32)
        # the sampler fills the size from the latent: (H, W, 0, 0, H, W) like LLMGA's add_time_ids
        assert not {"width", "height", "crop_w", "crop_h"} & set(pos_extra)
    else:
        assert "pooled_output" not in pos_extra


def test_auto_follows_the_clip(node, clips, tiny):
    text = words(100)
    pos, _ = encode(node, clips["sd15"], text)
    close(pos[0], library(tiny, text, "", "sd15")["prompt_embeds"])
    assert pos[0].shape == (1, 154, 32)
    pos, _ = encode(node, clips["sdxl"], text, pipeline="auto")
    close(pos[0], library(tiny, text, "", "sdxl")["prompt_embeds"])
    assert pos[0].shape == (1, 152, 64)


def test_clip_set_last_layer_applies(node, clips, tiny):
    import nodes as host_nodes
    text, runs = long_weighted(100)
    skipped = host_nodes.CLIPSetLastLayer().set_last_layer(clips["sd15"], -2)[0]
    (pos, _), (neg, _) = encode(node, skipped, text, pipeline="sd15")
    ref_pos, ref_neg, _ = lpw_reference(runs, [("", 1.0)], tiny.tokenizer, tiny.text_encoder, 3, layer=-2)
    close(pos, ref_pos)
    close(neg, ref_neg)
    last_pos, _, _ = lpw_reference(runs, [("", 1.0)], tiny.tokenizer, tiny.text_encoder, 3)
    assert (pos - last_pos).abs().max() > 1e-3

    skipped = host_nodes.CLIPSetLastLayer().set_last_layer(clips["sdxl"], -3)[0]
    (pos, extra), _ = encode(node, skipped, text, pipeline="sdxl")
    ref_hidden, ref_pooled = sdxl_reference(text, tiny, layer=-3)
    close(pos, ref_hidden)
    close(extra["pooled_output"], ref_pooled)


def _lora_pair(name, out_features, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    rank = 4
    up = 0.3 * torch.randn(out_features, rank, generator=g)
    down = 0.3 * torch.randn(rank, in_features, generator=g)
    alpha = 2.0
    lora = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(alpha)}
    return lora, (alpha / rank) * (up @ down)


def _layers(model):
    return getattr(model, "text_model", model).encoder.layers


def test_clip_lora_applies(node, clips, tiny):
    import comfy.sd
    strength = 0.8
    text, _ = long_weighted(100)

    lora, delta = _lora_pair("lora_te_text_model_encoder_layers_1_self_attn_q_proj", 32, 32, seed=5)
    patched = comfy.sd.load_lora_for_models(None, clips["sd15"], lora, 0.0, strength)[1]
    model = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        _layers(model)[1].self_attn.q_proj.weight += strength * delta
    (pos, _), (neg, _) = encode(node, patched, text, pipeline="sd15")
    want = library(tiny, text, "", "sd15", l=model)
    close(pos, want["prompt_embeds"])
    close(neg, want["negative_prompt_embeds"])
    unpatched = library(tiny, text, "", "sd15")["prompt_embeds"]
    assert (pos - unpatched).abs().max() > 1e-3
    (base, _), _ = encode(node, clips["sd15"], text, pipeline="sd15")   # the LoRA stays on its clone
    close(base, unpatched)

    lora_g, delta_g = _lora_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 37, 32, seed=6)
    patched = comfy.sd.load_lora_for_models(None, clips["sdxl"], lora_g, 0.0, strength)[1]
    model_g = copy.deepcopy(tiny.text_encoder_2)
    with torch.no_grad():
        _layers(model_g)[0].mlp.fc1.weight += strength * delta_g
    (pos, extra), _ = encode(node, patched, text, pipeline="sdxl")
    want = library(tiny, text, "", "sdxl", g=model_g)
    close(pos, want["prompt_embeds"])
    close(extra["pooled_output"], want["pooled_prompt_embeds"])
    assert (extra["pooled_output"] - library(tiny, text, "", "sdxl")["pooled_prompt_embeds"]).abs().max() > 1e-3


def test_brackets_are_llmga_syntax_not_host_weights(node, clips, tiny):
    import nodes as host_nodes
    text = "a photo of a (cat:1.5) on a sofa"
    runs = [("a photo of a ", 1.0), ("cat", 1.5), (" on a sofa", 1.0)]
    (pos, _), _ = encode(node, clips["sd15"], text, pipeline="sd15")
    ref, _, _ = lpw_reference(runs, [("", 1.0)], tiny.tokenizer, tiny.text_encoder, 3)
    close(pos, ref)
    host_weighted = host_nodes.CLIPTextEncode().encode(clips["sd15"], text)[0][0][0]
    assert host_weighted.shape == pos.shape and (host_weighted - pos).abs().max() > 1e-3

    (pos, extra), _ = encode(node, clips["sdxl"], text, pipeline="sdxl")
    ref_hidden, ref_pooled = sdxl_reference(text, tiny)   # literal "(", ":", "1.5", ")" tokens
    close(pos, ref_hidden)
    close(extra["pooled_output"], ref_pooled)


def test_truncated_prompt_is_logged_not_fatal(node, clips, tiny, caplog):
    text = "cat " * 260
    with caplog.at_level(logging.WARNING, logger="llmga"):
        (pos, _), (neg, _) = encode(node, clips["sd15"], text, pipeline="sd15")
    assert pos.shape == neg.shape == (1, 231, 32)
    assert "The prompt has 260 tokens; LLMGA's SD1.5 text-to-image pipeline encodes at most 225, so it keeps the first 225" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmga"):
        (pos, _), _ = encode(node, clips["sdxl"], "cat " * 310, pipeline="sdxl")
    assert pos.shape == (1, 302, 64)
    assert "The prompt has 310 tokens; LLMGA's SDXL text-to-image pipeline encodes at most 300, so it keeps the first 300" in caplog.text


def test_truncation_is_shown_on_the_node(node, clips):
    out = node.execute(clip=clips["sd15"], text="cat " * 260, pipeline="sd15")
    assert out.ui.as_dict()["text"][0].startswith("The prompt has 260 tokens; LLMGA's SD1.5 text-to-image pipeline encodes at most 225, so it keeps the first 225")
    assert node.execute(clip=clips["sd15"], text="a cat", pipeline="sd15").ui is None


def test_training_layout_option(node, clips, tiny):
    text = "a (cat) " + words(120)
    (pos, _), _ = encode(node, clips["sd15"], text, pipeline="sd15", layout="training")
    want = encode_prompt(text, tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder, pipeline="sd15",
                         layout="training")
    close(pos, want["prompt_embeds"])
    assert pos.shape == (1, 152, 32)


def test_mismatched_pipeline_is_refused(node, clips):
    with pytest.raises(ValueError, match=r"Pipeline 'sdxl' needs an SDXL CLIP \(CLIP-L \+ CLIP-G\), but the "
                                         r"connected CLIP is an SD1.5 CLIP; choose 'auto'"):
        encode(node, clips["sd15"], "x", pipeline="sdxl")
    with pytest.raises(ValueError, match=r"Pipeline 'sd15-inpaint' needs an SD1.5 CLIP \(CLIP-L\), but the "
                                         r"connected CLIP is an SDXL CLIP"):
        encode(node, clips["sdxl"], "x", pipeline="sd15-inpaint")


def test_other_clip_families_are_refused(node, tiny):
    import comfy.sd
    import comfy.text_encoders.sd2_clip as sd2_clip
    from comfy.supported_models_base import ClipTarget
    config = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
              "max_position_embeddings": 77, "hidden_act": "gelu"}
    sd2 = comfy.sd.CLIP(ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel),
                        model_options={"dtype": torch.float32, "clip_h_model_config": config})
    with pytest.raises(ValueError, match="needs an SD1.5 CLIP .CLIP-L. or an SDXL CLIP .CLIP-L . CLIP-G., but the "
                                         "connected CLIP is SD2ClipModel"):
        encode(node, sd2, "x")


@pytest.mark.parametrize("pipeline", ["sdxl", "sdxl-inpaint"])
@pytest.mark.parametrize("text_tokens,negative_tokens", [(160, 3), (10, 200)])
def test_sdxl_negative_is_encoded_on_its_own(node, clips, tiny, pipeline, text_tokens, negative_tokens):
    """Positive and negative keep their own lengths, EOS and pooled chunk (reference §6); the host batches them."""
    text, negative = words(text_tokens), "blurry, " + words(negative_tokens)
    (pos, pos_extra), (neg, neg_extra) = encode(node, clips["sdxl"], text, pipeline=pipeline, negative_text=negative)
    (alone, alone_extra), _ = encode(node, clips["sdxl"], text, pipeline=pipeline)
    assert torch.equal(pos, alone) and torch.equal(pos_extra["pooled_output"], alone_extra["pooled_output"])
    for cond, extra, source in ((pos, pos_extra, text), (neg, neg_extra, negative)):
        ref_hidden, ref_pooled = sdxl_reference(source, tiny)
        close(cond, ref_hidden)
        close(extra["pooled_output"], ref_pooled)
    assert (pos.shape[1], neg.shape[1]) == ((227, 77) if text_tokens > negative_tokens else (77, 227))


def test_sdxl_samples_with_a_long_positive_and_a_short_negative(llmga_pack, tmp_path):
    """A real KSampler run (euler, 1 step, CFG 5) on a tiny SDXL checkpoint with conds of 227 and 77 rows
    equals classifier-free guidance computed with diffusers' UNet on each conditioning separately."""
    import nodes as host_nodes

    from tests.fixtures.tiny_clip import TinyClip
    from tests.fixtures.tiny_sd import build_pipeline, make_sd_folder

    checkpoints = importlib.import_module(llmga_pack.__name__ + ".nodes.checkpoints")
    model, clip, _ = checkpoints.load_sd_folder(make_sd_folder(tmp_path, "sdxl"), unet_dtype=torch.float32,
                                                clip_dtype=torch.float32)
    node = importlib.import_module(llmga_pack.__name__ + ".nodes.long_prompt").LLMGALongCLIPTextEncode
    text, negative = words(160), "blurry, ugly"
    positive, negative_cond = node.execute(clip=clip, text=text, pipeline="sdxl", negative_text=negative).args
    assert (positive[0][0].shape[1], negative_cond[0][0].shape[1]) == (227, 77)

    contexts = []

    def record(apply_model, args):
        contexts.append(args["c"]["c_crossattn"].shape[1])
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(record)
    seed, cfg = 3, 5.0
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    samples = host_nodes.common_ksampler(patched, seed, 1, cfg, "euler", "simple", positive, negative_cond,
                                         latent)[0]["samples"]
    # 227 and 77 rows cannot be repeated to one length within the host's 4x limit: two UNet calls
    assert sorted(contexts) == [77, 227]

    # independent: the same weights in diffusers, LLMGA's encoding written out, the Euler step by hand
    pipe = build_pipeline("sdxl", seed=0)
    ref = TinyClip(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    sigma = float(((1 - alphas_cumprod[-1]) / alphas_cumprod[-1]) ** 0.5)   # simple, 1 step: t = 999 -> 0
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    x = noise * (1 + sigma ** 2) ** 0.5           # full denoise starts at sigma_max
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])   # (H, W, 0, 0, H, W) of the latent

    def eps(source):
        hidden, pooled = sdxl_reference(source, ref)
        with torch.no_grad():
            return pipe.unet(x / (1 + sigma ** 2) ** 0.5, 999, encoder_hidden_states=hidden,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    eps_pos, eps_neg = eps(text), eps(negative)
    assert (eps_pos - eps_neg).abs().max() > 1e-2   # the negative matters, so the check can see it
    guided = eps_neg + cfg * (eps_pos - eps_neg)
    # one Euler step to sigma 0 lands on the denoised latent x - sigma·guided; compare on the ε scale
    host_guided = (x - samples * pipe.vae.config.scaling_factor) / sigma
    assert samples.shape == (1, 4, 16, 16)
    assert (host_guided - guided).abs().max().item() < 1e-4


def test_non_english_prompts_through_the_node_equal_the_library_and_the_original(node, clips, tiny,
                                                                                 original_tokenizers):
    """Chinese, Japanese, Korean, emoji, zero-width and control characters, accents and A1111 brackets: the node on
    the host CLIP gives the library's embeddings, and both equal LLMGA's encoders run on the ids of the original's
    CLIPTokenizer (transformers 4.41 without ftfy, tests/oracles), not the host tokenizer's."""
    rng = random.Random(23)
    weighted = [("一只(红狐狸:1.3)坐在雪地里\u200b, [ぼかし] 눈 속의 여우 🦊\x07 Café ((ΟΔΟΣ))",
                 [("一只", 1.0), ("红狐狸", 1.3), ("坐在雪地里\u200b, ", 1.0), ("ぼかし", 1 / 1.1),
                  (" 눈 속의 여우 🦊\x07 Café ", 1.0), ("ΟΔΟΣ", 1.1 * 1.1)])] + [fuzz_weighted(rng) for _ in range(2)]
    raw = ["一只红狐狸坐在雪地里，清晨的阳光!! 🦊\u200b<|endoftext|> İstanbul e\u0301", fuzz_text(rng),
           fuzz_text(rng, 80, 60)]
    runs = [run for _, text_runs in weighted for run, _ in text_runs]
    orig_l, orig_g = original_clip_tokenizers(original_tokenizers, host_tokenizer_dir(),
                                              [text for text, _ in weighted] + runs + raw + [""])
    original = TinyClip(orig_l, orig_g, tiny.text_encoder, tiny.text_encoder_2)
    assert content_length(orig_l, raw[2]) > 75   # several chunks: the pooled vector comes from the last

    for text, text_runs in weighted:
        out = node.execute(clip=clips["sd15"], text=text, pipeline="sd15")
        (pos, _), (neg, _) = out.args[0][0], out.args[1][0]
        want = quiet_library(tiny, text, "sd15")
        close(pos, want["prompt_embeds"])
        close(neg, want["negative_prompt_embeds"])
        ref_pos, ref_neg, _ = lpw_reference(text_runs, [("", 1.0)], orig_l, tiny.text_encoder, 3)
        close(pos, ref_pos)
        close(neg, ref_neg)
        if "\u200b" in text:   # the note names what the original dropped
            assert "U+200B (zero width space), U+0007 (unnamed)" in out.ui.as_dict()["text"][0]

    for text in raw:
        (pos, extra), _ = encode(node, clips["sdxl"], text, pipeline="sdxl")
        want = quiet_library(tiny, text, "sdxl")
        close(pos, want["prompt_embeds"])
        close(extra["pooled_output"], want["pooled_prompt_embeds"])
        ref_hidden, ref_pooled = sdxl_reference(text, original)
        close(pos, ref_hidden)
        close(extra["pooled_output"], ref_pooled)


def quiet_library(tiny, text, pipeline):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptCharactersDroppedWarning)
        return library(tiny, text, "", pipeline)


def content_length(tokenizer, text):
    return len(tokenizer(text).input_ids) - 2
