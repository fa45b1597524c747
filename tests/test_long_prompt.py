"""llmga_core.long_prompt against LLMGA's encoders (SD1.5: LLMGA: llmga/diffusers/examples/community/
lpw_stable_diffusion.py; SDXL: LLMGA: llmga/diffusers/pipeline_stable_diffusion_xl_lpw.py `encode_prompt`).

Token ids come from the real CLIP BPE vocabulary the host ships; embeddings from tiny seeded CLIP
text models, compared with the reference encoders of tests/long_prompt_reference.py (written the way
LLMGA's code is structured: one flat 75·n+2 id row, windows cut out of it, one model call per window).
"""
from __future__ import annotations

import math
import random
import re
import string
import time
import warnings

import pytest
import torch

from llmga_core.long_prompt import (PromptCharactersDroppedWarning, PromptTruncatedWarning, clip_token_ids,
                                    dropped_characters, encode_prompt, parse_prompt_attention, plan_prompts,
                                    recipe_for, tokenizer_spec)
from tests.fixtures.tiny_clip import (clip_g_tokenizer, clip_l_tokenizer, host_tokenizer_dir,
                                      make_tiny_clip_text_models)
from tests.long_prompt_reference import (BOS, EOS, close, content_ids, fuzz_text, fuzz_weighted, long_weighted,
                                         lpw_reference, original_clip_tokenizers, sdxl_reference, training_reference,
                                         words)

CAT = 2368          # "cat</w>"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_clip_text_models(seed=1)


@pytest.fixture(scope="module")
def tok_l():
    return clip_l_tokenizer()


@pytest.fixture(scope="module")
def tok_g():
    return clip_g_tokenizer()


# ------------------------------------------------------------------------------------------------
# parse_prompt_attention (A1111 rules)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.3 * 1.1 * 1.1], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]),
    ("((x:1.5))", [["x", 1.65]]),
    ("a [b] c", [["a ", 1.0], ["b", 1 / 1.1], [" c", 1.0]]),
    ("[[b]]", [["b", 1 / 1.1 / 1.1]]),
    ("(x:0.5) (y:2)", [["x", 0.5], [" ", 1.0], ["y", 2.0]]),
    ("a \\\\ b", [["a \\ b", 1.0]]),
    ("open ( end", [["open ", 1.0], [" end", 1.1]]),
    ("a:1.3) b", [["a:1.3) b", 1.0]]),
    ("A photo: a cat, ratio 16:9, 4k", [["A photo: a cat, ratio 16:9, 4k", 1.0]]),
    ("(x:abc)", [["x:abc", 1.1]]),
    ("", [["", 1.0]]),
    # deliberate difference: the original raises ValueError on a factor that is not a number
    ("(v:1.2.3) z", [["v:1.2.3", 1.1], [" z", 1.0]]),
])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Id layouts with the real vocabulary
# ------------------------------------------------------------------------------------------------

def plan(text, negative, pipeline, layout="inference"):
    recipe = recipe_for(pipeline, layout)
    specs = {"l": tokenizer_spec(clip_l_tokenizer())}
    if recipe.is_sdxl:
        specs["g"] = tokenizer_spec(clip_g_tokenizer())
    return plan_prompts(text, negative, tokenizers=specs, recipe=recipe)


def test_sd15_ids_are_tokenized_per_weighted_run(tok_l):
    pos, neg = plan("a (red:1.5) cat, [blue] sky", None, "sd15")
    runs = ["a ", "red", " cat, ", "blue", " sky"]
    ids = [i for r in runs for i in content_ids(tok_l, r)]
    assert ids == [320, 736, 2368, 267, 1746, 2390]
    assert pos.chunks == {"l": [[BOS, *ids] + [EOS] * (76 - len(ids))]}
    weights = [1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1, 1.0] + [1.0] * 70
    assert pos.weights == pytest.approx(weights, rel=1e-12)
    assert neg.chunks == {"l": [[BOS] + [EOS] * 76]}
    assert (pos.token_count, neg.token_count) == (6, 0)

    # a run boundary inside a word splits it, as lpw's per-run tokenizer calls do
    pos, _ = plan("(fire)fighter", None, "sd15")
    split = content_ids(tok_l, "fire") + content_ids(tok_l, "fighter")
    assert split != content_ids(tok_l, "firefighter")
    assert pos.chunks["l"][0][1:1 + len(split) + 1] == split + [EOS]


def test_sd15_two_chunks_and_negative_padded_to_same_count():
    pos, neg = plan("cat " * 80, "", "sd15")
    assert pos.chunks["l"] == [[BOS] + [CAT] * 75 + [EOS], [BOS] + [CAT] * 5 + [EOS] * 71]
    assert neg.chunks["l"] == [[BOS] + [EOS] * 76] * 2
    assert pos.weights == [1.0] * 154


@pytest.mark.parametrize("n_tokens,n_chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (225, 3)])
def test_chunk_count_is_ceil_of_tokens_over_75(n_tokens, n_chunks):
    for pipeline in ("sd15", "sdxl"):
        pos, _ = plan("cat " * n_tokens, None, pipeline)
        assert pos.n_chunks == n_chunks
        flat = [t for row in pos.chunks["l"] for t in row[1:76]]
        assert flat == [CAT] * n_tokens + [EOS] * (75 * n_chunks - n_tokens)


@pytest.mark.parametrize("pipeline,layout", [("sd15", "inference"), ("sd15-inpaint", "inference"),
                                             ("sd15", "training")])
def test_sd15_longer_negative_sets_the_chunk_count(pipeline, layout):
    # lpw pads both to the longer one's chunk count (training's batch padding did the same)
    pos, neg = plan("cat", "cat " * 160, pipeline, layout)
    assert pos.n_chunks == neg.n_chunks == 3
    assert pos.chunks["l"] == [[BOS, CAT] + [EOS] * 75] + [[BOS] + [EOS] * 76] * 2


@pytest.mark.parametrize("pipeline", ["sdxl", "sdxl-inpaint"])
@pytest.mark.parametrize("negative_tokens", [5, 160])
def test_sdxl_negative_is_planned_on_its_own(pipeline, negative_tokens):
    pos, neg = plan("cat " * 80, "cat " * negative_tokens, pipeline)
    alone, _ = plan("cat " * 80, None, pipeline)
    assert pos.chunks == alone.chunks
    assert pos.chunks["g"] == [[BOS] + [CAT] * 75 + [EOS], [BOS] + [CAT] * 5 + [0] * 70 + [EOS]]
    # the negative's own chunk count, its text then pads, EOS at 76 of its own last chunk
    full, rest = divmod(negative_tokens, 75)
    assert neg.chunks["l"] == [[BOS] + [CAT] * 75 + [EOS]] * full + [[BOS] + [CAT] * rest + [EOS] * (76 - rest)]
    assert neg.chunks["g"] == [[BOS] + [CAT] * 75 + [EOS]] * full + [[BOS] + [CAT] * rest + [0] * (75 - rest) + [EOS]]


@pytest.mark.parametrize("pipeline,n_tokens,kept,chunks", [
    ("sd15", 300, 225, 3), ("sd15-inpaint", 320, 300, 4), ("sdxl", 301, 300, 4), ("sdxl-inpaint", 400, 300, 4),
])
def test_caps_warn_with_token_counts(pipeline, n_tokens, kept, chunks):
    with pytest.warns(PromptTruncatedWarning, match=fr"The prompt has {n_tokens} tokens; .*first {kept} "):
        pos, _ = plan("cat " * n_tokens, None, pipeline)
    assert pos.n_chunks == chunks and pos.kept_tokens == kept and pos.token_count == n_tokens
    assert all(row[1:76] == [CAT] * 75 for row in pos.chunks["l"])


def test_negative_over_cap_warns_too():
    with pytest.warns(PromptTruncatedWarning, match="The negative prompt has 230 tokens"):
        plan("cat", "cat " * 230, "sd15")


def test_no_warning_at_the_cap(recwarn):
    plan("cat " * 225, None, "sd15")
    plan("cat " * 300, None, "sdxl")
    assert not [w for w in recwarn if issubclass(w.category, PromptTruncatedWarning)]


def test_sdxl_ids_clip_g_pads_with_zero_and_ends_at_76():
    pos, neg = plan("cat " * 80, None, "sdxl")
    assert neg is None
    assert pos.chunks["l"] == [[BOS] + [CAT] * 75 + [EOS], [BOS] + [CAT] * 5 + [EOS] * 71]
    assert pos.chunks["g"] == [[BOS] + [CAT] * 75 + [EOS], [BOS] + [CAT] * 5 + [0] * 70 + [EOS]]
    assert pos.weights is None


def test_sdxl_and_training_keep_brackets_as_text(tok_l):
    text = "a (cat:1.5) [dog]"
    literal = content_ids(tok_l, text)
    assert len(literal) > 4   # the brackets and the number are tokens
    for pipeline, layout in (("sdxl", "inference"), ("sd15", "training")):
        pos, _ = plan(text, None, pipeline, layout)
        assert pos.chunks["l"][0][1:1 + len(literal)] == literal
        assert pos.weights is None


# ------------------------------------------------------------------------------------------------
# Embeddings against the reference encoders
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline,n_filler,negative,negative_runs,multiples,expected_chunks", [
    ("sd15", 10, None, [("", 1.0)], 3, 1),
    ("sd15", 150, "", [("", 1.0)], 3, 3),
    ("sd15", 300, "blurry, (ugly:1.3)", [("blurry, ", 1.0), ("ugly", 1.3)], 3, 3),
    ("sd15-inpaint", 300, None, [("", 1.0)], 4, 4),
])
def test_sd15_inference_matches_lpw(tiny, pipeline, n_filler, negative, negative_runs, multiples, expected_chunks):
    text, runs = long_weighted(n_filler)
    ref_pos, ref_neg, n = lpw_reference(runs, negative_runs, tiny.tokenizer, tiny.text_encoder, multiples)
    assert n == expected_chunks
    with torch.no_grad(), pytest.warns(PromptTruncatedWarning) if n_filler == 300 else _no_warning():
        out = encode_prompt(text, negative, tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder,
                            pipeline=pipeline)
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds"}
    assert out["prompt_embeds"].shape == (1, 77 * n, 32)
    close(out["prompt_embeds"], ref_pos)
    close(out["negative_prompt_embeds"], ref_neg)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", PromptTruncatedWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_sd15_weights_change_the_embedding(tiny):
    plain = encode_prompt("a photo of red fox", tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder,
                          pipeline="sd15")["prompt_embeds"]
    weighted = encode_prompt("a photo of (red fox:1.5)", tokenizers=tiny.tokenizer,
                             text_encoders=tiny.text_encoder, pipeline="sd15")["prompt_embeds"]
    assert (plain - weighted).abs().max() > 1e-3
    # mean-preserving rescale: the weighted tensor keeps the unweighted mean
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)


@pytest.mark.parametrize("text_tokens", [20, 160, 330])
def test_sd15_training_layout_matches_stage2(tiny, text_tokens):
    text = "a (cat) " + words(text_tokens)
    ref = training_reference(text, tiny.tokenizer, tiny.text_encoder)
    ctx = pytest.warns(PromptTruncatedWarning) if text_tokens > 300 else _no_warning()
    with ctx:
        out = encode_prompt(text, tokenizers=[tiny.tokenizer], text_encoders=[tiny.text_encoder],
                            pipeline="sd15", layout="training")
    n = math.ceil(min(300, len(content_ids(tiny.tokenizer, text))) / 75)
    assert out["prompt_embeds"].shape == (1, 75 * n + 2 if n > 1 else 77, 32)
    close(out["prompt_embeds"], ref)
    # the negative "" padded to the same chunks, trimmed the same way
    close(out["negative_prompt_embeds"], training_reference_padded("", n, tiny))


def training_reference_padded(text, n, tiny):
    """A caption padded to n chunks by a longer one in its batch (training's batch padding)."""
    ids = content_ids(tiny.tokenizer, text)
    flat = torch.tensor([[BOS] + ids + [EOS] * (75 * n - len(ids)) + [EOS]])
    outs = []
    for i in range(n):
        window = flat[:, 75 * i: 75 * i + 77].clone()
        window[:, 0], window[:, -1] = BOS, EOS
        with torch.no_grad():
            out = tiny.text_encoder(window).last_hidden_state
        outs.append(out if n == 1 else out[:, :-1] if i == 0 else out[:, 1:] if i == n - 1 else out[:, 1:-1])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("text_tokens,negative", [(10, None), (160, ""), (230, None)])
def test_sdxl_matches_llmga(tiny, text_tokens, negative):
    text = "a (cat:1.5) photo, " + words(text_tokens)
    ref_hidden, ref_pooled = sdxl_reference(text, tiny)
    out = encode_prompt(text, negative, tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                        text_encoders=[tiny.text_encoder, tiny.text_encoder_2], pipeline="sdxl")
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds"}
    close(out["prompt_embeds"], ref_hidden)
    close(out["pooled_prompt_embeds"], ref_pooled)
    assert out["pooled_prompt_embeds"].shape == (1, 32)
    assert torch.count_nonzero(out["negative_prompt_embeds"]) == 0
    assert out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape
    assert torch.count_nonzero(out["negative_pooled_prompt_embeds"]) == 0
    assert out["negative_pooled_prompt_embeds"].shape == (1, 32)


def test_sdxl_pooled_is_last_chunk_position_76(tiny):
    text = words(160)   # 3 chunks; the last holds 10 tokens, then "!" pads, EOS at 76
    out = encode_prompt(text, tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                        text_encoders=[tiny.text_encoder, tiny.text_encoder_2], pipeline="sdxl-inpaint")
    ids = content_ids(tiny.tokenizer_2, text)
    assert len(ids) == 160
    m = tiny.text_encoder_2
    last = torch.tensor([[BOS] + ids[150:] + [0] * 65 + [EOS]])
    first = torch.tensor([[BOS] + ids[:75] + [EOS]])
    with torch.no_grad():
        at_76 = m.text_projection(m(last, output_hidden_states=True).last_hidden_state[:, 76])
        first_pooled = m(first).text_embeds
    close(out["pooled_prompt_embeds"], at_76)
    assert (out["pooled_prompt_embeds"] - first_pooled).abs().max() > 1e-3
    assert out["prompt_embeds"].shape == (1, 227, 64)


def test_backend_contract_pools_the_chunk_sent_at_pooled_chunk(tok_l, tok_g):
    """Backends get each distinct chunk once and pool the one at POOLED_CHUNK, which is the prompt's last."""
    from llmga_core.long_prompt import POOLED_CHUNK, encode_with_backend

    recipe = recipe_for("sdxl")
    specs = {"l": tokenizer_spec(tok_l), "g": tokenizer_spec(tok_g)}
    sent = []

    def backend(chunks):  # hidden rows carry the first content id of each chunk; pooled its first id too
        sent.append(chunks["g"])
        hidden = torch.tensor([[[float(chunk[1])] * 2] * 77 for chunk in chunks["l"]])
        return hidden, torch.tensor([[float(chunks["g"][POOLED_CHUNK][1])]])

    text = words(160)  # 3 chunks
    out = encode_with_backend(text, None, tokenizers=specs, recipe=recipe, encode_chunks=backend)
    ids = content_ids(tok_g, text)
    (chunks,) = sent
    assert sorted(chunk[1] for chunk in chunks) == sorted([ids[0], ids[75], ids[150]])
    assert chunks[POOLED_CHUNK][1] == ids[150]
    assert out["pooled_prompt_embeds"].item() == ids[150]
    # rows back in prompt order: chunk 0 keeps BOS + 75 rows, the middle 75, the last 76 (75·3 + 2)
    firsts = out["prompt_embeds"][0, :, 0].tolist()
    assert firsts[0] == firsts[75] == ids[0] and firsts[76] == ids[75] and firsts[-1] == ids[150]


def sdxl_encode(tiny, text, negative=None, pipeline="sdxl"):
    return encode_prompt(text, negative, tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                         text_encoders=[tiny.text_encoder, tiny.text_encoder_2], pipeline=pipeline)


@pytest.mark.parametrize("pipeline", ["sdxl", "sdxl-inpaint"])
@pytest.mark.parametrize("text_tokens,negative_tokens,chunks", [(160, 5, (3, 1)), (20, 230, (1, 4)),
                                                                (100, 140, (2, 2))])
def test_sdxl_negative_is_encoded_on_its_own(tiny, pipeline, text_tokens, negative_tokens, chunks):
    """LLMGA's SDXL encoder encodes the prompt and a negative each on its own (reference §6)."""
    text, negative = "a photo, " + words(text_tokens), "blurry, low quality, " + words(negative_tokens)
    out = sdxl_encode(tiny, text, negative, pipeline)
    alone = sdxl_encode(tiny, text, None, pipeline)
    assert torch.equal(out["prompt_embeds"], alone["prompt_embeds"])
    assert torch.equal(out["pooled_prompt_embeds"], alone["pooled_prompt_embeds"])
    for source, n, embeds, pooled in ((text, chunks[0], "prompt_embeds", "pooled_prompt_embeds"),
                                      (negative, chunks[1], "negative_prompt_embeds", "negative_pooled_prompt_embeds")):
        assert math.ceil(len(content_ids(tiny.tokenizer, source)) / 75) == n
        assert out[embeds].shape == (1, 75 * n + 2 if n > 1 else 77, 64)
        ref_hidden, ref_pooled = sdxl_reference(source, tiny)
        close(out[embeds], ref_hidden)
        close(out[pooled], ref_pooled)


def test_bad_arguments_are_refused_with_one_sentence(tiny):
    with pytest.raises(ValueError, match="Unknown pipeline 'sd21'"):
        encode_prompt("x", tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder, pipeline="sd21")
    with pytest.raises(ValueError, match=r"needs 2 tokenizer\(s\) and 2 text encoder\(s\) \(SDXL\); got 1 and 1"):
        encode_prompt("x", tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder, pipeline="sdxl")
    with pytest.raises(ValueError, match="must be a CLIPTextModelWithProjection"):
        encode_prompt("x", tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                      text_encoders=[tiny.text_encoder, tiny.text_encoder], pipeline="sdxl")
    with pytest.raises(ValueError, match="Unknown layout 'train'"):
        encode_prompt("x", tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder, pipeline="sd15",
                      layout="train")


# ------------------------------------------------------------------------------------------------
# pipe(**embeds) in diffusers
# ------------------------------------------------------------------------------------------------

def _tiny_unet_vae(cross_dim, sdxl):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(0)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32) if sdxl else {}
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=4, norm_num_groups=32, **extra)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    return unet, vae


def test_embeds_drive_a_diffusers_pipeline(tiny):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    text = "a (red:1.2) fox, " + words(120)

    unet, vae = _tiny_unet_vae(32, sdxl=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    embeds = encode_prompt(text, tokenizers=tiny.tokenizer, text_encoders=tiny.text_encoder, pipeline="sd15")
    latents = pipe(**embeds, num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()

    unet, vae = _tiny_unet_vae(64, sdxl=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tiny.text_encoder, text_encoder_2=tiny.text_encoder_2,
                                     tokenizer=tiny.tokenizer, tokenizer_2=tiny.tokenizer_2, unet=unet,
                                     scheduler=sched)
    embeds = encode_prompt(text, tokenizers=[tiny.tokenizer, tiny.tokenizer_2],
                           text_encoders=[tiny.text_encoder, tiny.text_encoder_2], pipeline="sdxl")
    latents = pipe(**embeds, num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()

    # what the docstring tells diffusers users: a negative with the prompt's chunk count batches for CFG
    embeds = sdxl_encode(tiny, text, "blurry, " + words(100))
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape == (1, 152, 64)
    latents = pipe(**embeds, num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


# ------------------------------------------------------------------------------------------------
# Non-English text: ids of the original's CLIP tokenizer (transformers 4.41, slow, no ftfy; tests/oracles)
# ------------------------------------------------------------------------------------------------

FUZZ_SEED = 19


def _layout(ids, n, pad):
    """LLMGA's windows of one encoder's ids (reference §1.2 step 4, §2.1): BOS, 75 ids or pads, EOS."""
    body = ids + [pad] * (75 * n - len(ids))
    return [[BOS, *body[75 * i:75 * i + 75], EOS] for i in range(n)]


def _dropped_message_codes(caught):
    messages = [str(w.message) for w in caught if issubclass(w.category, PromptCharactersDroppedWarning)]
    assert len(messages) <= 1, messages
    return re.findall(r"U\+([0-9A-F]{4,6}) ", messages[0]) if messages else []


def test_fuzzed_non_english_prompts_get_the_original_clip_tokenizers_ids(original_tokenizers, tok_l, tok_g):
    """Seeded prompts of Chinese, Japanese, Korean, emoji, control and zero-width characters, accents, punctuation
    and special-token text, plus A1111 bracket prompts: every id equals the original's CLIPTokenizer on the host's
    vocabulary, CLIP-L (pad <|endoftext|>) and SDXL's tokenizer_2 (pad "!"), laid out as LLMGA lays them out; the
    dropped-characters note names exactly what the original drops."""
    started = time.perf_counter()
    rng = random.Random(FUZZ_SEED)
    raw = [fuzz_text(rng) for _ in range(300)] + [fuzz_text(rng, 200) for _ in range(20)]   # some over 300 tokens
    weighted = [fuzz_weighted(rng) for _ in range(180)]
    chars = sorted({c for text in raw + [t for t, _ in weighted] for c in text})
    probes = chars + ["a" + c + "b" for c in chars] + ["ab"]
    run_texts = [run for _, runs in weighted for run, _ in runs]
    orig_l, orig_g = original_clip_tokenizers(original_tokenizers, host_tokenizer_dir(), raw + run_texts + probes)

    def original_ids(tok, text):
        return tok(text).input_ids[1:-1]

    # what the original drops: no token alone, and "a<c>b" reads as "ab" (whitespace would give "a b")
    dropped = {c for c in chars if not original_ids(orig_l, c) and original_ids(orig_l, "a" + c + "b")
               == original_ids(orig_l, "ab")}
    spec_l, spec_g = tokenizer_spec(tok_l), tokenizer_spec(tok_g)
    sdxl, sd15 = recipe_for("sdxl"), recipe_for("sd15")
    compared = equal = texts = 0
    count_mismatch, mismatches = 0, []

    def check(label, text, got, want):
        nonlocal compared
        compared += len(want)
        if got != want:
            mismatches.append((label, text, got, want))
        return got == want

    for text in raw:
        texts += 1
        ids_l, ids_g = original_ids(orig_l, text), original_ids(orig_g, text)
        ok = check("CLIP-L ids", text, clip_token_ids(text, spec_l), ids_l)
        ok &= check("tokenizer_2 ids", text, clip_token_ids(text, spec_g), ids_g)
        expected_dropped = [c for c in dict.fromkeys(text) if c in dropped]
        ok &= check("dropped", text, dropped_characters(text), expected_dropped)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, _ = plan_prompts(text, None, tokenizers={"l": spec_l, "g": spec_g}, recipe=sdxl)
        ok &= check("note", text, _dropped_message_codes(caught), [f"{ord(c):04X}" for c in expected_dropped[:6]])
        # get_text_index per encoder: 300 ids, n = ceil(L/75); different n for the two encoders is a torch.concat
        # error in the original, so the layout is compared where the original has one
        n_l, n_g = (max(1, math.ceil(min(len(ids), 300) / 75)) for ids in (ids_l, ids_g))
        if n_l != n_g:
            count_mismatch += 1
        else:
            ok &= check("sdxl layout", text, plan.chunks, {"l": _layout(ids_l[:300], n_l, EOS),
                                                            "g": _layout(ids_g[:300], n_g, 0)})
        equal += ok

    for text, runs in weighted:
        texts += 1
        ids, weights = [], []
        for run, weight in runs:   # lpw: each run tokenized on its own
            run_ids = original_ids(orig_l, run)
            ids += run_ids
            weights += [weight] * len(run_ids)
        n = max(1, min(3, math.ceil(len(ids) / 75)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, _ = plan_prompts(text, None, tokenizers={"l": spec_l}, recipe=sd15)
        ok = check("sd15 ids", text, plan.chunks["l"], _layout(ids[:225], n, EOS))
        body = weights[:225] + [1.0] * (75 * n - len(weights[:225]))
        want_weights = [w for i in range(n) for w in [1.0, *body[75 * i:75 * i + 75], 1.0]]
        ok &= check("sd15 weights", text, plan.weights, want_weights)
        ok &= check("sd15 count", text, [plan.token_count], [len(ids)])
        equal += ok

    seconds = time.perf_counter() - started
    print(f"\nlong-prompt fuzz vs transformers 4.41 CLIPTokenizer (slow, no ftfy), seed {FUZZ_SEED}: {texts} texts "
          f"({len(raw)} raw x CLIP-L and tokenizer_2, {len(weighted)} A1111 for sd15), {compared} ids compared, "
          f"{equal}/{texts} texts equal; {len(chars)} characters probed, {len(dropped)} dropped by the original; "
          f"{count_mismatch} SDXL texts with different CLIP-L/tokenizer_2 chunk counts (the original raises there); "
          f"{seconds:.1f} s")
    assert not mismatches, [(label, text, got, want) for label, text, got, want in mismatches[:3]]
    assert texts >= 400 and equal == texts


def test_english_text_keeps_the_tokenizers_own_ids(tok_l, tok_g):
    """Printable ASCII (letters of both cases, digits, punctuation, spaces, tabs, newlines) gets exactly the ids the
    tokenizer itself gives, for CLIP-L and for tokenizer_2 (whose "!" is its pad token)."""
    rng = random.Random(5)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    \t\n"
    texts = [words(rng.randint(0, 90)).title() + " " + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
             for _ in range(200)] + ["don't STOP, it's 4K!!", "a (red:1.3) fox [blurry]", "x\n\ty  z"]
    for tok in (tok_l, tok_g):
        spec = tokenizer_spec(tok)
        for text in texts:
            assert clip_token_ids(text, spec) == tok(text, add_special_tokens=False, verbose=False)["input_ids"], text


def test_a_transformers_4_tokenizer_with_ftfy_gives_the_same_ids():
    """transformers 4's CLIPTokenizer runs ftfy when it is installed; the encoder uses only its BPE, so the ids stay
    the original's (which had no ftfy). Runs where the host tokenizer is that slow class."""
    tok = clip_l_tokenizer()
    if not hasattr(tok, "fix_text"):
        pytest.skip("the host's CLIPTokenizer has no ftfy step (transformers 5)")
    text = "一只红狐狸\u200b ﬁne Ｆｕｌｌｗｉｄｔｈ &amp; Café!"
    want = clip_token_ids(text, tokenizer_spec(tok))
    tok.fix_text = lambda t: "fixed " + t.upper()   # what an installed ftfy would get to change
    assert clip_token_ids(text, tokenizer_spec(tok)) == want
    assert tok(text, add_special_tokens=False)["input_ids"][:1] != want[:1]
