"""The original's tokenizers as a line server, for tests.

Runs in the side venv that holds transformers 4.41.2 / tokenizers 0.19.1, the versions the released configs name
(.ci/setup_env.sh builds it as .venv-tok441), so it shares no code with the pack. Each stdin line is a JSON request
{"folder": path, "use_fast": bool, "encode": [text, ...], "decode": [[id, ...], ...]}; each reply line gives what
AutoTokenizer.from_pretrained(folder, use_fast=use_fast) (LLMGA: llmga/llava/model/builder.py) does: its class,
len, bos id, `tokenizer(text).input_ids` per text and `tokenizer.decode(ids)` (the CLIs' call) per id list, or
{"error": message}. An optional "variants": [{from_pretrained keyword: value}, ...] also encodes the same texts with
the tokenizer loaded with each (e.g. {"pad_token": "!"}, SDXL's tokenizer_2): reply "variants": [[ids per text], ...].
"fix_text" says whether a CLIPTokenizer runs ftfy (LLMGA lists no ftfy; this venv has none).
"""
import json
import sys

import transformers
from transformers import AutoTokenizer

transformers.logging.set_verbosity_error()
cache = {}
for line in sys.stdin:
    request = json.loads(line)
    try:
        def load(options):
            key = (request["folder"], request["use_fast"], json.dumps(options, sort_keys=True))
            if key not in cache:
                cache[key] = AutoTokenizer.from_pretrained(request["folder"], use_fast=request["use_fast"], **options)
            return cache[key]

        tok = load({})
        reply = {"class": type(tok).__name__, "len": len(tok), "bos": tok.bos_token_id,
                 "transformers": transformers.__version__, "fix_text": getattr(tok, "fix_text", None) is not None,
                 "encode": [tok(text).input_ids for text in request.get("encode", [])],
                 "decode": [tok.decode(ids) for ids in request.get("decode", [])]}
        if "variants" in request:
            reply["variants"] = [[load(options)(text).input_ids for text in request.get("encode", [])]
                                 for options in request["variants"]]
    except Exception as exc:  # reported to the test, which fails with it
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
