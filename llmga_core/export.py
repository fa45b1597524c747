"""The language model of a released LLMGA MLLM, written for inference engines.

A released folder (LLMGA: llmga/llava/train/train.py saves it) holds a `Llava<Family>ForCausalLM`
(LLMGA: llmga/llava/model/language_model/llava_*.py): the base LLM's weights plus the projector
(`model.mm_projector.*`) and a copy of CLIP (`model.vision_tower.*`), under a config.json whose
model_type (`llava_llama`, `llava_Qwen2`, ...) no engine knows. Engines serve the language model alone
while the pack keeps the templates, tokenization, image features and parsing and sends them token ids,
so this module writes that language model:

- `write_language_model(folder, out_dir)`: a plain transformers folder (native config.json, safetensors,
  generation_config.json and the tokenizer files as released) that vLLM, SGLang or
  `AutoModelForCausalLM.from_pretrained` load without remote code;
- `write_gguf(folder, path, dtype=...)`: one GGUF file (f32, f16, bf16 or q8_0) for llama.cpp's llama-server.

Both take the language model exactly as the pack loads it (mllm/loader.py): the checkpoint's weights, the
vocabulary shrunk to len(tokenizer) as the original's resize_token_embeddings does (LLMGA:
llmga/llava/model/builder.py), Phi-3's "su" rope scaling under its current name. The GGUF follows
llama.cpp's layout: LLaMA-family q/k rows reordered for its interleaved rotary layout, Phi-3's fused qkv /
gate_up with its long/short rope factors, Gemma's RMSNorm weights stored as 1 + w, norms and biases in f32,
and the tokenizer as llama.cpp reads it (SentencePiece pieces, or byte-level BPE with merges and its
pre-tokenizer), with BOS added exactly when the folder's tokenizer adds it. What the pack does at run time
beyond the weights stays with the pack: its float16 rounding of Mistral's and Qwen2's rotary tables (the
original built them in float16) is not in either file, and engines compute them in full precision.

Command line: `python -m llmga_core.export FOLDER (--transformers OUT_DIR | --gguf PATH [--dtype f16])`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from .mllm.loader import (NATIVE_CLASSES, FolderInfo, build_language_model, build_projector, checkpoint_files,
                          load_weights, native_config, native_config_values, recognise, shrink_vocabulary)
from .mllm.tokenization import LLMGATokenizer, _token_content, load_tokenizer, read_tokenizer_config
from .weights import iter_weights, read_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_ARCHITECTURES = {"vicuna": "llama", "llama2": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2",
                      "phi3": "phi3", "gemma": "gemma"}
# the names llama.cpp gives the pre-tokenizers of the byte-level BPE families
BPE_PRE_TOKENIZERS = {"qwen2": "qwen2", "llama3": "llama-bpe"}
MAX_SHARD = "5GB"


# ------------------------------------------------------------------------------------ the language model
def _checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the checkpoint's language-model weights (bf16 in the releases)."""
    for path in files:
        for key, tensor in iter_weights(path):
            if tensor.is_floating_point() and not key.startswith(("model.mm_projector.", "model.vision_tower.")):
                return tensor.dtype if tensor.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


def _language_model(info: FolderInfo):
    """(tokenizer, language model) of the folder as load_mllm builds them, in the checkpoint's dtype."""
    files = checkpoint_files(info.folder)
    tokenizer = load_tokenizer(info.folder, info.family)
    dtype = _checkpoint_dtype(files)
    config = native_config(info, dtype)
    model = build_language_model(config, dtype)
    projector = build_projector(info.config, config.hidden_size, dtype)  # load_weights checks it is there
    load_weights(files, model, projector, tied=bool(getattr(config, "tie_word_embeddings", False)))
    shrink_vocabulary(model, len(tokenizer))
    return tokenizer, model


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------------- transformers folder
def write_language_model(folder, out_dir) -> Path:
    """Write the language model of an LLMGA MLLM folder as a plain transformers folder; returns out_dir."""
    info = recognise(Path(folder))
    out = Path(out_dir)
    if out.exists() and out.resolve() == info.folder.resolve():
        raise ValueError(f"{out} is the MLLM folder itself; give another folder to write the language model to.")
    _, model = _language_model(info)
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # the weights of an earlier export into this folder
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if _tied(model):
        state.pop("lm_head.weight", None)  # the config's tie_word_embeddings makes it the embedding again
    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    dtype = next(model.parameters()).dtype
    _write_json(out / "config.json", _plain_config(info, model.get_input_embeddings().weight.shape[0], dtype))
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        if (info.folder / name).is_file():
            shutil.copyfile(info.folder / name, out / name)
    return out


def _plain_config(info: FolderInfo, rows: int, dtype: torch.dtype) -> dict:
    values = native_config_values(info)
    stem = NATIVE_CLASSES[info.family]
    values.update(model_type=stem.lower(), architectures=[stem + "ForCausalLM"], vocab_size=rows,
                  torch_dtype=str(dtype).removeprefix("torch."))
    if info.family == "gemma":  # transformers 4.38-4.44 read the activation from `hidden_activation`
        values["hidden_activation"] = values["hidden_act"]
    if "transformers_version" in info.config:
        values["transformers_version"] = info.config["transformers_version"]
    return dict(sorted(values.items()))


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------------------- GGUF
def write_gguf(folder, path, *, dtype: str = "f16") -> Path:
    """Write the language model of an LLMGA MLLM folder as a GGUF file for llama.cpp; returns path.
    dtype: "f32", "f16", "bf16" or "q8_0" for the weight matrices (norms, biases and rope factors stay f32)."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}; pick one of them.")
    try:
        import gguf
    except ImportError:
        raise ImportError("Writing GGUF needs the gguf package: pip install gguf") from None
    info = recognise(Path(folder))
    tokenizer, model = _language_model(info)
    arch = GGUF_ARCHITECTURES[info.family]
    config, tied, rows = model.config, _tied(model), model.get_input_embeddings().weight.shape[0]
    state = model.state_dict()
    del model  # each tensor is freed once converted
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _gguf_parameters(writer, gguf, info, config, arch, dtype, rows)
        _gguf_vocabulary(writer, gguf, info, tokenizer, rows)
        for name, array in _gguf_tensors(gguf, state, config, arch, tied):
            data, kind = _gguf_encode(gguf, name, array, dtype)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # no half-written file that a server would then refuse
        raise
    return path


def _rope(config) -> dict:
    """Rotary settings of a transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`) config."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if getattr(config, key, None) is not None:
            params.setdefault(key, getattr(config, key))
    return params


def _gguf_parameters(writer, gguf, info: FolderInfo, config, arch: str, dtype: str, rows: int) -> None:
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rope = _rope(config)
    writer.add_type(gguf.GGUFType.MODEL)
    name = info.folder.name
    if arch == "phi3" and not any(s in name.lower() for s in ("phi3", "phi-3")):
        name += " (phi3)"  # llama.cpp recognises Phi-3 by its name to give the added tokens their rstrip
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == "phi3":
        original = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor", 1.0)) * hidden) // heads)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # llama.cpp runs Phi-3 without SWA
        if rope["rope_type"] in ("longrope", "su") and rope.get("long_factor"):
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
        elif rope["rope_type"] != "default":
            raise ValueError(f"{info.folder}: rope scaling {rope['rope_type']!r} of this Phi-3 model cannot be written "
                             "to GGUF; LLMGA's Phi-3 release uses longrope (\"su\").")
        return
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(rows)
        writer.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] != "default":
        raise ValueError(f"{info.folder}: rope scaling {rope['rope_type']!r} cannot be written to GGUF by this exporter; "
                         "LLMGA's releases of this family use none.")


def _interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows of each head (first half, second half) → llama.cpp's interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _gguf_tensors(gguf, state: dict, config, arch: str, tied: bool):
    """(GGUF name, float32 numpy array) of every tensor of the language model's state, in llama.cpp's layout
    (the state is emptied as it goes)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for key in list(state):
        tensor = state.pop(key)
        if tied and key == "lm_head.weight":
            continue  # llama.cpp takes the embedding when output.weight is absent
        data = tensor.detach().to(torch.float32)
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = _interleave_rotary_rows(data, heads)
        elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = _interleave_rotary_rows(data, kv_heads)
        elif arch == "gemma" and key.endswith("norm.weight"):
            data = data + 1  # GemmaRMSNorm scales by (1 + w); llama.cpp's RMS norm by w
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"The language model's tensor {key} has no GGUF name for llama.cpp's {arch} "
                             "architecture; this model cannot be written to GGUF.")
        yield name, data.numpy()
    if arch == "phi3":
        rope = _rope(config)
        if rope["rope_type"] in ("longrope", "su") and rope.get("long_factor"):
            for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, rope["long_factor"]),
                                 (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, rope["short_factor"])):
                yield gguf.TENSOR_NAMES[key] + ".weight", torch.tensor(factors, dtype=torch.float32).numpy()


def _gguf_encode(gguf, name: str, array, dtype: str):
    """The stored form of one tensor as llama.cpp's converter chooses it: norms, biases and vectors in f32,
    matrices in the file's type (q8_0 only where rows are whole 32-value blocks, else f16)."""
    import numpy as np

    kinds = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), kinds.F32
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[kinds.Q8_0][0] == 0:
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kinds.Q8_0), kinds.Q8_0
    if dtype == "bf16":  # the released weights' own type, stored as it is
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kinds.BF16), kinds.BF16
    return np.ascontiguousarray(array, dtype=np.float16), kinds.F16


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when they are not marked special."""
    return (token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _gguf_vocabulary(writer, gguf, info: FolderInfo, tokenizer: LLMGATokenizer, rows: int) -> None:
    kinds = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [kinds.UNUSED] * rows
    config = read_tokenizer_config(info.folder)
    if info.family in BPE_PRE_TOKENIZERS:
        backend = getattr(tokenizer, "backend", None)
        if backend is None:
            raise ValueError(f"{info.folder}: the {info.family} tokenizer is not a byte-level BPE tokenizer; copy the "
                             "tokenizer files as released.")
        for token, index in backend.get_vocab(with_added_tokens=True).items():
            if index < rows:
                tokens[index], types[index] = token, kinds.NORMAL
        for index, added in backend.get_added_tokens_decoder().items():
            if index < rows:
                special = added.special or _looks_special(added.content)
                tokens[index] = added.content if special else added.content.replace("\u2581", " ")
                types[index] = kinds.CONTROL if special else kinds.USER_DEFINED
        merges = json.loads(backend.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(BPE_PRE_TOKENIZERS[info.family])
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
                                 for m in merges])
    else:
        scores = [-10000.0] * rows
        add_space_prefix = _sentencepiece_pieces(info.folder, rows, tokens, scores, types, kinds)
        for index, content, special in _added_tokens(info.folder, config):
            if index < rows:
                special = special or _looks_special(content)
                tokens[index] = content if special else content.replace("\u2581", " ")
                types[index] = kinds.CONTROL if special else kinds.USER_DEFINED
                scores[index] = -1000.0
        if config.get("add_prefix_space") is not None:
            add_space_prefix = bool(config["add_prefix_space"])
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(add_space_prefix)
    ids = _special_ids(info, tokenizer, config, rows)
    for kind, index in ids.items():
        getattr(writer, f"add_{kind}_token_id")(index)
    probe = tokenizer.encode("a")  # what the folder's tokenizer adds around a text
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]))


def _sentencepiece_pieces(folder: Path, rows: int, tokens, scores, types, kinds) -> bool:
    """Fills tokens/scores/types from tokenizer.model; returns its add_dummy_prefix."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.model, which the GGUF vocabulary of this family is made "
                                "from; copy the tokenizer files as released.")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    for index in range(min(sp.get_piece_size(), rows)):
        tokens[index], scores[index] = sp.id_to_piece(index), sp.get_score(index)
        types[index] = (kinds.UNKNOWN if sp.is_unknown(index) else kinds.CONTROL if sp.is_control(index)
                        else kinds.UNUSED if sp.is_unused(index) else kinds.BYTE if sp.is_byte(index)
                        else kinds.NORMAL)
    return bool(proto.normalizer_spec.add_dummy_prefix)


def _added_tokens(folder: Path, config: dict):
    """(id, content, special) of the added tokens: added_tokens.json, tokenizer_config.json's decoder, then
    tokenizer.json's list (later entries win, as in llama.cpp's converter)."""
    if (folder / "added_tokens.json").is_file():
        for content, index in read_json(folder / "added_tokens.json").items():
            yield int(index), content, False
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is not None:
            yield int(index), content, bool(isinstance(entry, dict) and entry.get("special"))
    if (folder / "tokenizer.json").is_file():
        for entry in read_json(folder / "tokenizer.json").get("added_tokens") or ():
            yield int(entry["id"]), entry["content"], bool(entry.get("special"))


def _special_ids(info: FolderInfo, tokenizer: LLMGATokenizer, config: dict, rows: int) -> dict:
    """bos/eos/unk/padding ids: the tokenizer's own tokens, else config.json's ids."""
    ids = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad")):
        content = _token_content(config.get(f"{key}_token"))
        index = tokenizer.token_to_id(content) if content else None
        if index is None and isinstance(info.config.get(f"{key}_token_id"), int):
            index = info.config[f"{key}_token_id"]
        if index is not None and 0 <= index < rows:
            ids[kind] = int(index)
    return ids


# ------------------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmga_core.export",
        description="Write the language model of a released LLMGA MLLM folder for an inference engine: a plain "
                    "transformers folder (vLLM, SGLang) or a GGUF file (llama.cpp's llama-server).")
    parser.add_argument("folder", type=Path, help="the LLMGA MLLM folder, e.g. models/LLM/llmga-Qwen2-0.5B-full-finetune")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--transformers", type=Path, metavar="OUT_DIR", help="write a transformers folder here")
    target.add_argument("--gguf", type=Path, metavar="PATH", help="write a GGUF file here")
    parser.add_argument("--dtype", choices=GGUF_DTYPES, default="f16", help="GGUF weight type (default f16)")
    args = parser.parse_args(argv)
    try:
        if args.transformers is not None:
            written = write_language_model(args.folder, args.transformers)
        else:
            written = write_gguf(args.folder, args.gguf, dtype=args.dtype)
    except (ValueError, OSError, ImportError) as error:
        print(f"[llmga] error: {error}", file=sys.stderr)
        return 2
    print(f"[llmga] wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
