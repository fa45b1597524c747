"""The MLLM's tokenizers exactly as the original ran them, and the `<image>` placeholder tokenization.

The original (LLMGA: llmga/llava/model/builder.py) loads the tokenizer with transformers 4.41: the slow,
SentencePiece-backed `LlamaTokenizer` (`use_fast=False`) for the LlavaLlama families Vicuna and Llama-2, and a
fast, `tokenizers`-backed class for every other family (Llama-3 has only a fast class). Current transformers
rebuilds both kinds differently, which changes the text stored in a conversation
and so every later turn. This module therefore does not go through transformers' tokenizer classes at all; it
reproduces the two 4.41 behaviours with the libraries underneath them:

| family | the original's class | what this module follows |
|---|---|---|
| vicuna, llama2 | LlamaTokenizer (slow) | `sentencepiece` on tokenizer.model, with 4.41's split on special tokens, its `legacy` / `add_prefix_space` rules for encoding, and its decode (SentencePiece per run between special tokens, which are kept as text; each undecodable byte becomes U+FFFD on its own) |
| mistral, phi3 | LlamaTokenizerFast | tokenizer.json as saved (normalizer, pre-tokenizer, decoder); the post-processor rebuilt from add_bos_token / add_eos_token as the class did; without tokenizer.json (or with add_prefix_space set) 4.41's LlamaConverter on tokenizer.model with the folder's `legacy` |
| gemma | GemmaTokenizerFast | tokenizer.json as saved, post-processor from add_bos_token / add_eos_token; without it 4.41's GemmaConverter |
| qwen2 | Qwen2TokenizerFast | tokenizer.json as saved; without it (the released folders) 4.41's Qwen2Converter on vocab.json + merges.txt |
| llama3 | PreTrainedTokenizerFast | tokenizer.json as saved, nothing rebuilt |

Decoding is the CLIs' `tokenizer.decode(ids)`: special tokens kept, then transformers 4.41's space clean-up when
the folder's clean_up_tokenization_spaces (else the class default: False, True for PreTrainedTokenizerFast) says so.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..weights import read_json

IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "\u2581"

SLOW_FAMILIES = ("vicuna", "llama2")  # builder.py: LlavaLlama with use_fast=False (Llama-3 has no slow class)

# transformers 4.41's PreTrainedTokenizerBase.clean_up_tokenization, in its order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text


def _token_content(value) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json write it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json with special_tokens_map.json's entries filled in where the config lacks them (what
    from_pretrained merges)."""
    folder = Path(folder)
    config = {}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = read_json(path)
    special_map = folder / "special_tokens_map.json"
    if special_map.is_file():
        for key, value in read_json(special_map).items():
            config.setdefault(key, value)
    return config


class LLMGATokenizer:
    """What the MLLM needs of a tokenizer: encode (the plain call, special tokens added), the CLIs' decode, the
    BOS id, len() as resize_token_embeddings saw it, and id → token for inspection."""

    follows: str = ""

    def __init__(self, config: dict, clean_up_default: bool):
        self.config = config
        flag = config.get("clean_up_tokenization_spaces")
        self.clean_up_spaces = clean_up_default if flag is None else bool(flag)
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids)` of transformers 4.41: special tokens kept, spaces cleaned up per the folder."""
        text = self._decode(list(ids))
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


# ------------------------------------------------------------------------------ slow: SentencePiece
class SentencePieceLlamaTokenizer(LLMGATokenizer):
    """transformers 4.41's slow LlamaTokenizer (LLMGA's Vicuna and Llama-2) on the sentencepiece library."""

    follows = ("transformers 4.41 LlamaTokenizer (slow): sentencepiece on tokenizer.model, split on special tokens, "
               "legacy/add_prefix_space rules; decode per run between special tokens, each bad byte U+FFFD")

    def __init__(self, folder: Path, config: dict):
        super().__init__(config, clean_up_default=False)  # LlamaTokenizer's default
        import sentencepiece as spm

        model_file = folder / "tokenizer.model"
        proto = model_file.read_bytes()
        self.legacy = True if config.get("legacy") is None else bool(config["legacy"])
        add_prefix_space = config.get("add_prefix_space")
        self.add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        try:
            if not self.legacy:  # get_spm_processor: the dummy prefix is switched off, the class adds "▁" itself
                proto = _without_dummy_prefix(proto)
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{model_file} is not a SentencePiece model ({exc}); re-download the tokenizer files "
                             f"of this model.") from None
        self.unk_token = _token_content(config.get("unk_token")) or "<unk>"
        # added tokens as from_pretrained registers them: the config's decoder, then missing special tokens
        self._added: dict[str, int] = {}
        self._added_flags: dict[str, dict] = {}
        for index, entry in sorted(((int(k), v) for k, v in (config.get("added_tokens_decoder") or {}).items())):
            content = _token_content(entry)
            if content is not None:
                self._added[content] = index
                self._added_flags[content] = entry if isinstance(entry, dict) else {}
        self.special_tokens = [t for t in (self.bos_token, self.eos_token, self.unk_token,
                                           _token_content(config.get("pad_token"))) if t]
        self.special_tokens += [c for c in map(_token_content, config.get("additional_special_tokens") or []) if c]
        for token in self.special_tokens:
            if token not in self._added:
                index = self.sp.piece_to_id(token)
                if self.sp.id_to_piece(index) != token:  # not a piece: appended after the vocabulary
                    index = self.sp.get_piece_size() + sum(i >= self.sp.get_piece_size() for i in self._added.values())
                self._added[token] = index
                self._added_flags[token] = {}
        self._id_to_added = {i: t for t, i in self._added.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
                                 + ")") if self._added else None
        self._unk_length = len(self.sp.encode(self.unk_token, out_type=str))
        # PreTrainedTokenizer._decode: added tokens that are not special (and additional special tokens beyond
        # the vocabulary) are joined in as text between decoded runs
        additional = [c for c in map(_token_content, config.get("additional_special_tokens") or []) if c]
        self._plain_added = ({t for t in self._added if t not in self.special_tokens}
                             | {t for t in additional if self._added[t] >= self.sp.get_piece_size()})

    # encoding: PreTrainedTokenizer.tokenize + LlamaTokenizer.tokenize / _tokenize of 4.41
    def _tokens(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        parts = [p for p in (self._split.split(text) if self._split else [text])]
        for i, part in enumerate(parts):
            if i % 2 == 1:  # an added token (odd positions of a capturing split)
                flags = self._added_flags.get(part, {})
                if flags.get("rstrip") and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if flags.get("lstrip") and i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            tokens.extend([part] if i % 2 == 1 else self._sp_tokens(part))
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special_tokens:
            tokens = tokens[1:]
        return tokens

    def _sp_tokens(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        # "<unk>" + text keeps sentencepiece from treating the leading space as a dummy prefix
        tokens = self.sp.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_length:] if len(tokens) >= self._unk_length else tokens

    def encode(self, text: str) -> list[int]:
        ids = [self.token_to_id(t) for t in self._tokens(text)]
        if self.add_bos_token and self.bos_token:
            ids = [self.bos_token_id] + ids
        if self.add_eos_token and self.eos_token:
            ids = ids + [self.eos_token_id]
        return ids

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._added:
            return self._added[token]
        return self.sp.piece_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._id_to_added[i] if i in self._id_to_added else self.sp.id_to_piece(i) for i in ids]

    def _decode(self, ids: list[int]) -> str:
        pieces: list[str] = []
        out: list[str] = []
        for token in self.convert_ids_to_tokens(ids):
            if token in self._plain_added:
                if pieces:
                    text = self._pieces_to_string(pieces)
                    if text:
                        out.append(text)
                    pieces = []
                out.append(token)
            else:
                pieces.append(token)
        if pieces:
            out.append(self._pieces_to_string(pieces))
        return " ".join(out)  # 4.41's decode default spaces_between_special_tokens=True (the saved flag is unused)

    def _pieces_to_string(self, tokens: list[str]) -> str:
        """LlamaTokenizer.convert_tokens_to_string of 4.41."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        run: list[str] = []
        out = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in self.special_tokens:  # kept as text, never through sentencepiece
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.decode_pieces(run) + token
                prev_is_special = True
                run = []
            else:
                if prev_is_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                run.append(token)
                prev_is_special = False
        return out + self.sp.decode_pieces(run)

    def __len__(self) -> int:
        return len(set(range(self.sp.get_piece_size())) | set(self._added.values()))


def _without_dummy_prefix(proto: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as 4.41 did for legacy=False

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


# ------------------------------------------------------------------------------ fast: tokenizers
class TokenizersTokenizer(LLMGATokenizer):
    """A 4.41 fast tokenizer on the tokenizers library: its backend pipeline as 4.41 built it."""

    def __init__(self, backend, config: dict, clean_up_default: bool, follows: str):
        super().__init__(config, clean_up_default)
        self.backend = backend
        self.follows = follows

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


_FAST_CLASS = {"mistral": "LlamaTokenizerFast", "phi3": "LlamaTokenizerFast", "gemma": "GemmaTokenizerFast",
               "qwen2": "Qwen2TokenizerFast", "llama3": "PreTrainedTokenizerFast"}


def _fast_tokenizer(folder: Path, family: str, config: dict) -> TokenizersTokenizer:
    from tokenizers import Tokenizer

    cls = _FAST_CLASS[family]
    saved = folder / "tokenizer.json"
    # LlamaTokenizerFast converts from tokenizer.model whenever add_prefix_space is set (from_slow)
    from_slow = cls == "LlamaTokenizerFast" and config.get("add_prefix_space") is not None
    if saved.is_file() and not from_slow:
        try:
            backend = Tokenizer.from_file(str(saved))
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise ValueError(f"{saved} could not be read as a tokenizer ({exc}); re-download the tokenizer files "
                             f"of this model.") from None
        follows = f"transformers 4.41 {cls}: tokenizer.json as saved"
    elif cls == "LlamaTokenizerFast":
        backend = _convert_llama(folder, config)
        follows = f"transformers 4.41 {cls}: LlamaConverter on tokenizer.model (legacy={_legacy(config)})"
    elif cls == "GemmaTokenizerFast":
        backend = _convert_gemma(folder, config)
        follows = f"transformers 4.41 {cls}: GemmaConverter on tokenizer.model"
    elif cls == "Qwen2TokenizerFast":
        backend = _convert_qwen2(folder, config)
        follows = f"transformers 4.41 {cls}: Qwen2Converter on vocab.json + merges.txt"
    else:
        raise FileNotFoundError(f"{folder} has no tokenizer.json, which the {family} tokenizer is made from; copy "
                                f"the complete model folder as released.")
    _add_config_tokens(backend, config)
    if cls in ("LlamaTokenizerFast", "GemmaTokenizerFast"):
        _update_post_processor(backend, config, folder)
        follows += ", post-processor from add_bos_token/add_eos_token"
    return TokenizersTokenizer(backend, config, clean_up_default=cls == "PreTrainedTokenizerFast", follows=follows)


def _legacy(config: dict) -> bool:
    return True if config.get("legacy") is None else bool(config["legacy"])


def _added_token(entry, *, special: bool):
    from tokenizers import AddedToken

    if isinstance(entry, dict):
        return AddedToken(entry["content"], single_word=bool(entry.get("single_word", False)),
                          lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                          normalized=bool(entry.get("normalized", not special)), special=special)
    return AddedToken(entry, normalized=not special, special=special)


def _add_config_tokens(backend, config: dict) -> None:
    """PreTrainedTokenizerFast.__init__ of 4.41: tokens of added_tokens_decoder the backend lacks (by id order),
    then special tokens not yet known, are added to the backend."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    specials = {c for c in (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                                    "pad_token")) if c}
    specials |= {c for c in map(_token_content, config.get("additional_special_tokens") or []) if c}
    entries = sorted(((int(k), v) for k, v in (config.get("added_tokens_decoder") or {}).items()))
    pending = [v for _, v in entries if _token_content(v) and _token_content(v) not in present]
    names = {_token_content(v) for v in pending}
    pending += [t for t in sorted(specials) if t not in present and t not in names]
    for entry in pending:  # one at a time keeps the id order of the config
        content = _token_content(entry)
        special = bool(entry.get("special", False)) if isinstance(entry, dict) else False
        special = special or content in specials
        token = _added_token(entry, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])


def _update_post_processor(backend, config: dict, folder: Path) -> None:
    """LlamaTokenizerFast / GemmaTokenizerFast.update_post_processor of 4.41."""
    from tokenizers import processors

    bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError(f"{folder / 'tokenizer_config.json'} asks for a BOS/EOS token it does not name; re-download "
                         f"the tokenizer files of this model.")
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + ([(eos, backend.token_to_id(eos))] if add_eos
                                                                         else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _sentencepiece_proto(folder: Path):
    from sentencepiece import sentencepiece_model_pb2

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has neither tokenizer.json nor tokenizer.model; copy the complete model "
                                f"folder as released.")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"{path} is not a SentencePiece model ({exc}); re-download the tokenizer files of this "
                         f"model.") from None
    if proto.trainer_spec.model_type != 2:
        raise ValueError(f"{path} is not a BPE SentencePiece model, which LLMGA's tokenizers are.")
    return proto


def _bpe_merges(vocab_scores: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePieceExtractor.extract(vocab_scores) of 4.41: every split of a piece into two pieces, ordered by
    the piece's score (highest first; ties in vocabulary order)."""
    merges = []
    for piece, score in dict(vocab_scores).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(left, right) for left, right, _ in merges]


def _convert_llama(folder: Path, config: dict):
    """LlamaConverter of 4.41 (BPE with byte fallback; legacy → Prepend/Replace normalizer, else Metaspace)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _sentencepiece_proto(folder)
    legacy = _legacy(config)
    add_prefix_space = True if config.get("add_prefix_space") is None else bool(config["add_prefix_space"])
    firsts = [p.piece for p in proto.pieces[:3]]
    vocab_scores = [(piece, 0.0) for piece in firsts] + [(p.piece, p.score) for p in proto.pieces[3:]]
    sp_vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    bpe_vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    backend = Tokenizer(models.BPE(bpe_vocab, _bpe_merges(vocab_scores, sp_vocab), unk_token=proto.trainer_spec.unk_piece,
                                   fuse_unk=True, byte_fallback=True))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in firsts])
    if legacy:
        backend.normalizer = normalizers.Sequence(
            ([normalizers.Prepend(SPIECE_UNDERLINE)] if add_prefix_space else [])
            + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
    else:
        scheme = "first" if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=scheme,
                                                         split=False)
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))
    return backend


def _convert_gemma(folder: Path, config: dict):
    """GemmaConverter of 4.41 (BPE with byte fallback, spaces → "▁", "<0x09>" as a literal tab)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _sentencepiece_proto(folder)
    names = [_token_content(config.get(k)) for k in ("pad_token", "eos_token", "bos_token")]
    vocab_scores = [(name, 0.0) for name in names]
    vocab_scores += [("\t" if p.piece == "<0x09>" else p.piece, p.score) for p in proto.pieces[3:]]
    sp_vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    sp_vocab["\t"] = sp_vocab.get("<0x09>")
    bpe_vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    backend = Tokenizer(models.BPE(bpe_vocab, _bpe_merges(vocab_scores, sp_vocab), unk_token=proto.trainer_spec.unk_piece,
                                   fuse_unk=True, byte_fallback=True, dropout=None))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
    backend.add_tokens([AddedToken(t, normalized=True, special=False) for t in proto.trainer_spec.user_defined_symbols])
    backend.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    return backend


# Qwen2Converter's pre-tokenizer pattern (transformers 4.41)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def _convert_qwen2(folder: Path, config: dict):
    """Qwen2Converter of 4.41 on the slow Qwen2Tokenizer's vocab.json + merges.txt (NFC, byte-level BPE)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no tokenizer.json and lacks {' and '.join(missing)}; copy the complete "
                                f"model folder as released.")
    vocab = read_json(vocab_path)
    ranks: dict[tuple[str, str], None] = {}  # bpe_ranks: later duplicates fold into the first
    for i, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n")):
        line = line.strip()
        if (i == 0 and line.startswith("#version:")) or not line:
            continue
        ranks.setdefault(tuple(line.split()), None)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(ranks), dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


# ------------------------------------------------------------------------------ loading
def load_tokenizer(folder: Path, family: str) -> LLMGATokenizer:
    """The tokenizer of an LLMGA MLLM folder as the original's inference ran it (see the module's table)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt); "
            "copy the complete model folder as released.")
    config = read_tokenizer_config(folder)
    if family in SLOW_FAMILIES:
        if not (folder / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.model, which the {family} tokenizer (SentencePiece, as "
                                    f"the original loads it) is made from; copy the complete model folder as released.")
        return SentencePieceLlamaTokenizer(folder, config)
    if family not in _FAST_CLASS:
        raise ValueError(f"No tokenizer rule for the model family {family!r}.")
    return _fast_tokenizer(folder, family, config)


def tokenizer_image_token(prompt: str, tokenizer: LLMGATokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Ids of `prompt` with `image_token_index` at every `<image>` (LLMGA: llmga/llava/mm_utils.py).

    Each chunk between placeholders is tokenized on its own with the tokenizer's plain call (so a
    SentencePiece tokenizer gives every chunk its own leading "▁", and BOS where the tokenizer adds one);
    when the first chunk starts with BOS it is kept once and the first id of every chunk is dropped.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            # the original inserts [index] * (offset + 1) and then drops `offset` ids of it with the chunk
            ids.extend(([image_token_index] * (offset + 1))[offset:])
        ids.extend(chunk[offset:])
    return ids


def decode_answer(tokenizer: LLMGATokenizer, ids: list[int]) -> str:
    """The CLIs' `tokenizer.decode(output_ids[0]).strip()`: the text stored in the conversation history."""
    return tokenizer.decode(ids).strip()
