"""The original's tokenizers as a line server, for tests.

Runs in the side venv that holds transformers 4.41.2 / tokenizers 0.19.1, the versions the released configs name
(.ci/setup_env.sh builds it as .venv-tok441), so it shares no code with the pack. Each stdin line is a JSON request
{"folder": path, "use_fast": bool, "encode": [text, ...], "decode": [[id, ...], ...]}; each reply line gives what
AutoTokenizer.from_pretrained(folder, use_fast=use_fast) (LLMGA: llmga/llava/model/builder.py) does: its class,
len, bos id, `tokenizer(text).input_ids` per text and `tokenizer.decode(ids)` (the CLIs' call) per id list, or
{"error": message}.
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
        key = (request["folder"], request["use_fast"])
        if key not in cache:
            cache[key] = AutoTokenizer.from_pretrained(request["folder"], use_fast=request["use_fast"])
        tok = cache[key]
        reply = {"class": type(tok).__name__, "len": len(tok), "bos": tok.bos_token_id,
                 "transformers": transformers.__version__,
                 "encode": [tok(text).input_ids for text in request.get("encode", [])],
                 "decode": [tok.decode(ids) for ids in request.get("decode", [])]}
    except Exception as exc:  # reported to the test, which fails with it
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
