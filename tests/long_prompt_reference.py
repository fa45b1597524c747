"""Reference long-prompt encoders written the way LLMGA's code is structured (SD1.5: LLMGA:
llmga/diffusers/examples/community/lpw_stable_diffusion.py; SDXL: LLMGA: llmga/diffusers/pipeline_stable_diffusion_xl_lpw.py
`encode_prompt`): one flat 75·n+2 id row, windows cut out of it, one model call per window. Shared by the library's
tests (transformers models) and the host node's tests (the host CLIP).
"""
from __future__ import annotations

import torch

BOS, EOS = 49406, 49407
WORDS = ["red", "fox", "snowy", "forest", "dawn", "light", "soft", "tall", "trees", "river", "stone", "cloud"]


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def content_ids(tokenizer, text: str) -> list[int]:
    """What LLMGA takes from the tokenizer: input_ids without BOS/EOS."""
    return tokenizer(text).input_ids[1:-1]


def final_norm(model):
    return getattr(model, "text_model", model).final_layer_norm


def lpw_reference(runs, negative_runs, tokenizer, model, multiples, layer=None):
    """lpw_stable_diffusion's get_weighted_text_embeddings for explicit (text, weight) runs."""
    cap = 75 * multiples

    def tokenize(run_list):
        ids, weights = [], []
        for text, weight in run_list:
            t = content_ids(tokenizer, text)
            ids += t
            weights += [weight] * len(t)
        return ids[:cap], weights[:cap]

    pos, neg = tokenize(runs), tokenize(negative_runs)
    longest = max(len(pos[0]), len(neg[0]))
    n = max(1, min(multiples, (longest - 1) // 75 + 1))

    def embed(ids, weights):
        flat = torch.tensor([[BOS] + ids + [EOS] * (75 * n - len(ids)) + [EOS]])
        outs = []
        for i in range(n):
            window = flat[:, 75 * i: 75 * i + 77].clone()
            window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
            with torch.no_grad():
                if layer is None:
                    outs.append(model(window).last_hidden_state)
                else:
                    outs.append(final_norm(model)(model(window, output_hidden_states=True).hidden_states[layer]))
        emb = torch.cat(outs, dim=1)
        w = torch.ones(77 * n)
        for t, weight in enumerate(weights):
            w[77 * (t // 75) + 1 + t % 75] = weight
        before = emb.mean()
        emb = emb * w[None, :, None]
        return emb * (before / emb.mean())

    return embed(*pos), embed(*neg), n


def training_reference(text, tokenizer, model):
    """get_text_index + get_unweighted_text_embeddings(no_boseos_middle=True) for one caption."""
    ids = tokenizer(text, max_length=302, truncation=True).input_ids[1:-1]
    n = max(1, min(4, (len(ids) - 1) // 75 + 1))
    flat = torch.tensor([[BOS] + ids + [EOS] * (75 * n - len(ids)) + [EOS]])
    if n == 1:
        with torch.no_grad():
            return model(flat).last_hidden_state
    outs = []
    for i in range(n):
        window = flat[:, 75 * i: 75 * i + 77].clone()
        window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
        with torch.no_grad():
            out = model(window).last_hidden_state
        outs.append(out[:, :-1] if i == 0 else out[:, 1:] if i == n - 1 else out[:, 1:-1])
    return torch.cat(outs, dim=1)


def sdxl_reference(text, tiny, layer=-2):
    """pipeline_stable_diffusion_xl_lpw encode_prompt: both encoders, penultimate, 75·n+2, pooled rule."""
    hidden_parts, pooled = [], None
    for tokenizer, model in ((tiny.tokenizer, tiny.text_encoder), (tiny.tokenizer_2, tiny.text_encoder_2)):
        ids = tokenizer(text, max_length=302, truncation=True).input_ids[1:-1]
        n = max(1, min(4, (len(ids) - 1) // 75 + 1))
        pad = tokenizer.pad_token_id
        flat = torch.tensor([[BOS] + ids + [pad] * (75 * n - len(ids)) + [EOS]])
        outs, first_max = [], None
        for i in range(n):
            window = flat[:, 75 * i: 75 * i + 77].clone() if n > 1 else flat
            window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
            with torch.no_grad():
                out = model(window, output_hidden_states=True)
            h = out.hidden_states[layer]
            if n > 1:
                h = h[:, :-1] if i == 0 else h[:, 1:] if i == n - 1 else h[:, 1:-1]
            outs.append(h)
            if model is tiny.text_encoder_2:
                # _SDXL2: keep the earlier pooled only where chunk 0's largest id beats this chunk's
                now_max = window.max(dim=1, keepdim=True).values
                if first_max is None:
                    pooled, first_max = out.text_embeds, now_max
                else:
                    pooled = torch.where(first_max > now_max, pooled, out.text_embeds)
        hidden_parts.append(torch.cat(outs, dim=1))
    return torch.cat(hidden_parts, dim=-1), pooled


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def long_weighted(n_filler):
    runs = [("a photo of ", 1.0), ("red fox", 1.5), (", " + words(n_filler) + " ", 1.0), ("bright", 1 / 1.1),
            (" end", 1.0)]
    text = f"a photo of (red fox:1.5), {words(n_filler)} [bright] end"
    return text, runs


# ------------------------------------------------------------------------------------------------
# The original's CLIP tokenizer (tests/oracles) and seeded non-English prompts
# ------------------------------------------------------------------------------------------------

class _Encoding(dict):
    @property
    def input_ids(self):
        return self["input_ids"]


class OracleClipTokenizer:
    """transformers 4.41's slow CLIPTokenizer (no ftfy) on the host's CLIP vocabulary, answering from one batched
    oracle request; called like a transformers tokenizer, on the texts it was asked for."""

    def __init__(self, ids_by_text: dict[str, list[int]], pad_token_id: int):
        self.ids_by_text, self.pad_token_id = ids_by_text, pad_token_id
        self.bos_token_id, self.eos_token_id = BOS, EOS

    def __call__(self, text, max_length=None, truncation=False, add_special_tokens=True, **_):
        ids = list(self.ids_by_text[text])
        if truncation and max_length is not None and len(ids) > max_length:
            ids = ids[:max_length - 1] + ids[-1:]  # transformers cuts the content, BOS and EOS stay
        return _Encoding(input_ids=ids if add_special_tokens else ids[1:-1])


def original_clip_tokenizers(oracle, folder, texts) -> tuple[OracleClipTokenizer, OracleClipTokenizer]:
    """The original's `tokenizer` (CLIP-L, pad <|endoftext|>) and SDXL `tokenizer_2` (pad "!") for `texts`,
    from ONE request to the oracle process."""
    texts = list(dict.fromkeys(texts))
    reply = oracle.ask(folder, False, encode=texts, variants=[{"pad_token": "!"}])
    assert reply["class"] == "CLIPTokenizer" and reply["fix_text"] is False   # the slow tokenizer, without ftfy
    return (OracleClipTokenizer(dict(zip(texts, reply["encode"])), EOS),
            OracleClipTokenizer(dict(zip(texts, reply["variants"][0])), 0))


def _chars(*ranges):
    return [chr(c) for low, high in ranges for c in range(low, high + 1)]


FUZZ_POOLS = {
    "chinese": _chars((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF))
               + ["一只红狐狸坐在雪地里", "清晨的阳光", "超高清", "细节丰富"],
    "japanese": _chars((0x3041, 0x3096), (0x30A1, 0x30FA), (0xFF66, 0xFF9D)) + ["ー", "雪の中の赤いキツネ", "ｶﾀｶﾅ"],
    "korean": _chars((0xAC00, 0xD7A3), (0x3131, 0x318E)) + ["눈 속의 붉은 여우", "\u1100\u1161\u11a8", "\u1112\u1161"],
    "emoji": _chars((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F900, 0x1F9FF))
             + ["👍🏽", "👨\u200d👩\u200d👧", "❤\ufe0f", "1\ufe0f\u20e3", "🇨🇳", "🏳\ufe0f\u200d🌈"],
    "control": _chars((0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x7F, 0x9F)),
    "format": ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u200f", "\u202a", "\u202e",
               "\u2066", "\u2069", "\u061c", "\u180e", "\U000e0001", "\U000e0041", "\ufff9"],
    "private/unassigned": ["\ue000", "\uf8ff", "\U000f0000", "\U00100001", "\u0378", "\ufffe", "\uffff",
                           "\U0002fffe", "\ufffd", "\ud800", "\udfff"],
    "whitespace": [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2028", "\u2029", "\u1680", "\u2002",
                   "\u202f", "\x85", "\x1c"],
    "accents": ["é", "È", "ñ", "Ç", "ü", "Ö", "å", "ø", "e\u0301", "a\u0308", "A\u030a", "n\u0303", "o\u0301\u0316",
                "Tiếng Việt", "ΟΔΟΣ", "ΣΑΣ σας", "İstanbul", "straße", "ẞ", "ﬁne", "ſ", "\u212a", "\u2126", "ǅ",
                "ПРИВЕТ мир", "مرحبا", "שָׁלוֹם", "สวัสดี", "नमस्ते", "Ǆemal", "ﾟ", "\u0301"],
    "punctuation": list(",.;:?'\"-_/&%$#@*+=<>|~^`!") + ["。", "，", "、", "！", "？", "「", "」", "『", "（", "）", "【",
                   "】", "《", "…", "—", "～", "！＂＃", "'s", "'S", "'ll", "don't", "IT'S", "'ſ", "!!!", "?!", "..."],
    "digits": list("0123456789") + ["１２３", "٠١٢", "²³", "½", "Ⅻ", "4k", "16:9", "1024x1024"],
    "special": ["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|endof\u200btext|>", "!"],
    "english": ["red", "fox", "Snowy", "FOREST", "dawn", "light", "a photo of", "highly detailed", "8K", "HDR"],
}
_WEIGHTS = {name: 1 for name in FUZZ_POOLS} | {"chinese": 4, "english": 4, "japanese": 2, "korean": 2,
                                                "punctuation": 3, "whitespace": 3}


def _fragment(rng) -> str:
    names = list(FUZZ_POOLS)
    name = rng.choices(names, weights=[_WEIGHTS[n] for n in names])[0]
    pool = FUZZ_POOLS[name]
    if name in ("chinese", "japanese", "korean", "emoji") and rng.random() < 0.6:
        return "".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
    return rng.choice(pool)


def fuzz_text(rng, max_fragments: int = 40, min_fragments: int = 1) -> str:
    """One seeded prompt of mixed scripts, emoji, controls, zero-width characters, accents and punctuation."""
    parts = [_fragment(rng) for _ in range(rng.randint(min_fragments, max_fragments))]
    return "".join(p + rng.choice(["", "", " ", " ", ", "]) for p in parts)


_A1111 = str.maketrans({c: None for c in "()[]\\:"})


def fuzz_weighted(rng, max_runs: int = 8) -> tuple[str, list[tuple[str, float]]]:
    """A seeded A1111 prompt and the (text, weight) runs lpw's parser gives it, known by construction: each run
    written plain, as (x), [x], (x:w), ((x)), [(x)] or ([x]), literal brackets escaped."""
    text, runs = "", []
    for _ in range(rng.randint(1, max_runs)):
        literal = fuzz_text(rng, 6).translate(_A1111)
        if rng.random() < 0.2:
            literal += rng.choice(["(", ")", "[", "]", "\\"])
        if not literal:
            continue
        escaped = "".join("\\" + c if c in "()[]\\" else c for c in literal)
        form = rng.choice(["plain", "plain", "round", "square", "weight", "round2", "square-round", "round-square"])
        w = rng.choice([0.5, 0.8, 1.2, 1.3, 1.5])
        written, factors = {
            "plain": (escaped, []), "round": (f"({escaped})", [1.1]), "square": (f"[{escaped}]", [1 / 1.1]),
            "weight": (f"({escaped}:{w})", [w]), "round2": (f"(({escaped}))", [1.1, 1.1]),
            "square-round": (f"[({escaped})]", [1.1, 1 / 1.1]), "round-square": (f"([{escaped}])", [1 / 1.1, 1.1]),
        }[form]
        weight = 1.0
        for factor in factors:   # inner bracket first, as the parser multiplies at each closing bracket
            weight *= factor
        text += written
        if runs and runs[-1][1] == weight:   # lpw merges neighbours of equal weight
            runs[-1] = (runs[-1][0] + literal, weight)
        else:
            runs.append((literal, weight))
    return text, runs or [("", 1.0)]
