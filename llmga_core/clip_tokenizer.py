"""The CLIP tokenizer as LLMGA's pipelines ran it, on any transformers: transformers 4's slow CLIPTokenizer
without ftfy, with only the BPE of each word taken from the caller's (the host's) tokenizer.
"""
from __future__ import annotations

import unicodedata
from typing import NamedTuple

import regex


class TokenizerSpec(NamedTuple):
    """A CLIP BPE tokenizer (transformers CLIPTokenizer) and the special ids one encoder uses."""

    tokenizer: object
    bos: int
    eos: int
    pad: int


def tokenizer_spec(tokenizer, pad: int | None = None) -> TokenizerSpec:
    """Special ids from a transformers tokenizer; pad defaults to its pad_token_id as LLMGA reads it
    (49407 for SD1.5 and SDXL's CLIP-L tokenizer, 0 = "!" for SDXL's tokenizer_2)."""
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizerSpec(tokenizer, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(pad))


# LLMGA's pipelines run transformers 4's slow CLIPTokenizer (LLMGA: requirements.txt pins transformers 4.37.2 and
# lists no ftfy). Without ftfy it (transformers: models/clip/tokenization_clip.py, tokenization_utils.py):
# 1. splits the text at its special tokens (BOS, EOS and the pad token: "!" for SDXL's tokenizer_2), each one id;
# 2. cleans every other piece with BasicTokenizer(strip_accents=False, do_split_on_punc=False): drops NUL, U+FFFD
#    and category C* except tab/LF/CR, turns tab/LF/CR and Zs into spaces, puts spaces around CJK ideographs,
#    NFC, splits on whitespace, lower-cases each word (accents kept, punctuation not split);
# 3. cuts the words joined by spaces with its pattern `pat` and byte-level BPEs each match.
# transformers 5's CLIPTokenizer does only NFC, whitespace and lower-casing, so steps 1-3 are done here and only
# the BPE of each match is the host tokenizer's.

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))   # BasicTokenizer._is_chinese_char

# CLIPTokenizer.pat, compiled with the `regex` module and IGNORECASE as there ("'ſ" is a "'s" match).
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)

# CLIP's special tokens by id, for tokenizers that cannot say (ids of CLIP's vocabulary)
_CLIP_SPECIAL_TEXT = {49406: "<|startoftext|>", 49407: "<|endoftext|>", 0: "!"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet, which CLIP's BPE vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_BYTE_TO_UNICODE = _bytes_to_unicode()


def is_dropped_character(char: str) -> bool:
    """Whether the original's CLIP tokenizer drops `char` (BasicTokenizer._clean_text): NUL, U+FFFD and every
    category C* character (control, format, surrogate, private use, unassigned) except tab, LF and CR."""
    return char in "\x00\ufffd" or (unicodedata.category(char)[0] == "C" and char not in "\t\n\r")


def clean_clip_text(text: str) -> str:
    """`" ".join(BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize(text))`, the text that
    transformers 4's CLIPTokenizer without ftfy cuts into words."""
    out = []
    for char in text:
        if is_dropped_character(char):
            continue
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            out.append(" ")
        elif any(low <= ord(char) <= high for low, high in _CJK_RANGES):
            out.append(f" {char} ")
        else:
            out.append(char)
    return " ".join(word.lower() for word in unicodedata.normalize("NFC", "".join(out)).split())


def _special_texts(spec: TokenizerSpec) -> dict[str, int]:
    convert = getattr(spec.tokenizer, "convert_ids_to_tokens", None)
    out = {}
    for token_id in dict.fromkeys((spec.bos, spec.eos, spec.pad)):
        text = convert(token_id) if callable(convert) else _CLIP_SPECIAL_TEXT.get(token_id)
        if text:
            out[text] = token_id
    return out


def _bpe_ids(tokenizer, words: list[str]) -> dict[str, list[int]]:
    """Each word's ids from the tokenizer's own byte-level BPE (no normalisation or splitting of its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "end_of_word_suffix"):            # tokenizers' BPE (fast tokenizers)
        return {w: [t.id for t in model.tokenize("".join(_BYTE_TO_UNICODE[b] for b in w.encode("utf-8")))]
                for w in words}
    if callable(getattr(tokenizer, "bpe", None)) and hasattr(tokenizer, "byte_encoder"):   # transformers 4 slow
        return {w: tokenizer.convert_tokens_to_ids(
                    tokenizer.bpe("".join(tokenizer.byte_encoder[b] for b in w.encode("utf-8"))).split(" "))
                for w in words}
    # any other tokenizer: each word on its own, which its own pattern keeps whole
    rows = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
    return {w: list(row) for w, row in zip(words, rows)}


def clip_token_ids(text: str, spec: TokenizerSpec) -> list[int]:
    """The ids (no BOS/EOS) that LLMGA's CLIP tokenizer, transformers 4's slow CLIPTokenizer without ftfy, gives
    `text`, over the vocabulary of `spec.tokenizer` (see the steps above). For English text these are the ids
    every CLIP tokenizer gives; for other text they differ from transformers 5's (CJK ideographs are words of
    their own, C* characters are dropped, and SDXL's tokenizer_2, whose pad token is "!", makes every "!" id 0)."""
    specials = _special_texts(spec)
    pieces = regex.split("(" + "|".join(regex.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")",
                         text) if specials else [text]
    items: list[int | str] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            items.append(specials[piece])
            continue
        for word in _CLIP_PATTERN.findall(clean_clip_text(piece)):
            # BPE's cache hands these two back whole: the special ids
            items.append({"<|startoftext|>": spec.bos, "<|endoftext|>": spec.eos}.get(word, word))
    bpe = _bpe_ids(spec.tokenizer, list(dict.fromkeys(w for w in items if isinstance(w, str))))
    return [i for item in items for i in ([item] if isinstance(item, int) else bpe[item])]
