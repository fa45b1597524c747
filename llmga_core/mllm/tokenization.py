"""Tokenizer loading and the `<image>` placeholder tokenization of LLMGA's MLLM.

Ports LLMGA: llmga/llava/mm_utils.py `tokenizer_image_token` and the tokenizer part of
LLMGA: llmga/llava/model/builder.py. Which class the original used per family matters for the ids
(see reference/mllm.md §9 and §12); with transformers 5 every class is the tokenizers-backed one, and
the measured differences are handled here (Phi-3 needs legacy=True).
"""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Ids of `prompt` with `image_token_index` at every `<image>`.

    Each chunk between placeholders is tokenized on its own with the tokenizer's plain call (so a
    SentencePiece tokenizer gives every chunk its own leading "▁", and BOS where the tokenizer adds one);
    when the first chunk starts with BOS it is kept once and the first id of every chunk is dropped.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
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


def read_tokenizer_config(folder: Path) -> dict:
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-download the tokenizer files of this model.") from exc


def load_tokenizer(folder: Path, family: str):
    """The tokenizer as the original's inference loaded it (ids verified against transformers 4.41)."""
    from transformers import AutoTokenizer, PretrainedConfig

    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt); "
            "copy the complete model folder as released.")
    # builder.py: use_fast=False for the LlavaLlama families (slow LlamaTokenizer; Llama-3 has only a fast
    # class); transformers 5 has one class per tokenizer and ignores the flag
    kwargs = {"use_fast": False} if family in ("vicuna", "llama2", "llama3") else {}
    if family == "phi3":
        # Phi-3's tokenizer_config says legacy=false, but the original's ids are those of the legacy
        # behaviour (text after a special token keeps its leading "▁"), measured in reference/mllm.md §12.
        kwargs["legacy"] = True
    # A blank config stops AutoTokenizer from reading config.json (model_type llava_* is unregistered and
    # Phi-3's auto_map would ask for remote code); it then follows tokenizer_config.json's class.
    try:
        return AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig(), local_files_only=True,
                                             trust_remote_code=False, **kwargs)
    except Exception as exc:  # tokenizer libraries raise many kinds
        hint = ""
        if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
            hint = " (a folder with only tokenizer.model needs the sentencepiece and protobuf packages)"
        raise ValueError(f"Could not load the tokenizer of {folder}: {exc}{hint}.") from exc


def clean_up_spaces_flag(folder: Path) -> bool:
    """decode()'s clean_up_tokenization_spaces as the original applied it: the folder's saved value,
    else True (the transformers 4.41 default; transformers 5 changed it)."""
    value = read_tokenizer_config(folder).get("clean_up_tokenization_spaces")
    return True if value is None else bool(value)


def clean_up_tokenization(text: str) -> str:
    """transformers 4.41's PreTrainedTokenizerBase.clean_up_tokenization (transformers 5 skips it for BPE
    tokenizers such as Llama-3's, so it is applied here)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def decode_answer(tokenizer, ids: list[int], clean_up_spaces: bool) -> str:
    """The CLIs' `tokenizer.decode(output_ids[0]).strip()`: special tokens kept, spaces cleaned up when the
    folder says so."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if clean_up_spaces:
        text = clean_up_tokenization(text)
    return text.strip()
