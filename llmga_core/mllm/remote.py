"""LLMGA's MLLM with its language model on a server: llama.cpp's llama-server, shared by many clients.

The pack keeps everything that decides the original's tokens (templates, tokenization, conversations, the end
ids of generation_config.json, the caption parsing); the server only runs the language model on the exact
token ids the pack sends (`connect_mllm`; the folder is read for its config and tokenizer, never its weights).

Each new token is one request to llama-server's `/completion` with the whole sequence as token ids
(`cache_prompt` keeps the server's KV cache, so only the newest token is computed), for three reasons:
- the original applies generation_config.json's repetition_penalty to the generated ids only (the prompt went
  in as embeddings: llmga/serve/cli.py), while llama-server's penalty window covers the prompt too; with one
  request per token the window (`repeat_last_n`) is exactly the tokens generated so far;
- generation ends only at the folder's end ids; llama-server also stops at its own end-of-generation tokens
  (`<end_of_turn>`, `<|end|>`, …), which Gemma and Phi-3 answers run through;
- the streamed and OpenAI-compatible replies drop the id of a token that ends inside a UTF-8 character
  (byte-fallback pieces of Chinese text), while `/completion`'s `tokens` field keeps every id.
Greedy decoding is the server's argmax after the penalty: the in-process model's rule. Sampling runs on the
server with the same processors in transformers' order (penalty, temperature, top-k, top-p) and its own random
generator, so a sampled reply says that the seed does not reproduce the in-process tokens.

Image turns need the CLIP tower, the projector and the splicing of features into the embedding sequence, which
a token-id request cannot carry: they are refused in one sentence that names the local loader.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from .assistant import Assistant, MLLMInputError, _Request
from .loader import recognise
from .model import FP16_ROTARY_FAMILIES, GenerationPlan
from .sampling import sampling_config
from .templates import TEMPLATES
from .tokenization import load_tokenizer, tokenizer_image_token

# tokenized by the server and by the pack at connect: a different tokenizer (another model) gives other ids
TOKENIZER_PROBE = "LLMGA probe: a photo of a red fox in the snow at dawn, 35mm, highly detailed."


class MLLMServerError(RuntimeError):
    """The server could not give an answer: unreachable, refused, stopped mid-answer or too slow. One sentence
    that says what happened and what to do; the caller's process is unaffected and the next request may work."""


class ServerClient:
    """llama-server's HTTP API, one keep-alive connection per thread."""

    def __init__(self, base_url: str, *, api_key: Optional[str] = None, timeout: Optional[float] = None):
        parts = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"The MLLM server address {base_url!r} is not an http(s) URL; give one like "
                             "http://127.0.0.1:8080.")
        self.base_url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.api_key = api_key or None
        self.timeout = float(timeout) if timeout else 600.0
        self._local = threading.local()

    # ---------------------------------------------------------------------------------------- http
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: Optional[dict] = None, *, what: str = "the request") -> dict:
        """The JSON reply, or MLLMServerError in one sentence. A keep-alive connection the server closed while
        idle is reopened once; a failure after the request was sent is the server's (stopped, too slow)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (socket.timeout, TimeoutError):
                self.close()
                raise MLLMServerError(
                    f"The MLLM server at {self.base_url} did not answer {what} within {self.timeout:g} s (busy or "
                    "overloaded); queue the prompt again later, or raise the request timeout.") from None
            except (ConnectionRefusedError, socket.gaierror) as e:
                self.close()
                raise MLLMServerError(
                    f"Cannot reach the MLLM server at {self.base_url} ({_reason(e)}); start it (llama-server -m "
                    "<model>.gguf --port …) or correct the base URL, then queue the prompt again.") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self.close()
                if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError)):
                    continue  # an idle keep-alive connection the server had closed: try once on a new one
                raise MLLMServerError(
                    f"The MLLM server at {self.base_url} closed the connection during {what} ({_reason(e)}); check "
                    "that it is still running, then queue the prompt again.") from None
            except OSError as e:
                self.close()
                raise MLLMServerError(
                    f"The MLLM server at {self.base_url} failed during {what} ({_reason(e)}); check that it is "
                    "running, then queue the prompt again.") from None
        else:  # both attempts met a closed connection
            raise MLLMServerError(f"The MLLM server at {self.base_url} closed the connection during {what}; check "
                                  "that it is still running, then queue the prompt again.")
        try:
            reply = json.loads(payload) if payload else {}
        except ValueError:
            reply = {"error": {"message": payload[:200].decode(errors="replace")}}
        if response.status == 401:
            raise MLLMServerError(f"The MLLM server at {self.base_url} refused the API key (401 Unauthorized); give "
                                  "the key it was started with (llama-server --api-key).")
        if response.status == 404 and path in ("/tokenize", "/completion", "/props"):
            raise MLLMServerError(f"The server at {self.base_url} has no {path} endpoint, so it is not llama.cpp's "
                                  "llama-server; LLMGA Remote MLLM talks to llama-server only.")
        if response.status >= 400:
            message = _error_message(reply) or f"HTTP {response.status}"
            if response.status == 503:
                raise MLLMServerError(f"The MLLM server at {self.base_url} is not ready ({message}); wait until it "
                                      "has loaded its model, then queue the prompt again.")
            raise MLLMServerError(f"The MLLM server at {self.base_url} refused {what}: {message}.")
        return reply


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _error_message(reply) -> str:
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "").strip().rstrip(".")
    return str(error or "").strip().rstrip(".")


class RemoteMLLM(Assistant):
    """An LLMGA MLLM whose language model runs on llama-server (see the module's docstring). `generate`,
    `validate` and `plan` take the arguments of the in-process model's (model.py)."""

    def __init__(self, info, tokenizer, template: str, client: ServerClient, model: str, context: Optional[int]):
        self.info = info
        self.folder = info.folder
        self.family = info.family
        self.tokenizer = tokenizer
        self.template = template
        self.output_template = info.template
        self._sampling = sampling_config(info)
        self.client = client
        self.served_model = model
        self.context = context  # positions of one server slot, when the server says
        self.dtype = f"served by {client.base_url} as {model}"  # what answer ids and logs name as the precision
        self.quantization = None

    def __repr__(self):
        return f"RemoteMLLM({self.folder}, {self.family}, {self.client.base_url}, {self.served_model})"

    # ------------------------------------------------------------------------------------- public
    def size_bytes(self) -> int:
        return 0  # nothing of the model is held here

    def plan(self, instruction: str, *, task: str = "chat", image=None, mask=None, conversation=None,
             max_new_tokens: int = 512, temperature: float = 0.0, top_p: Optional[float] = None) -> GenerationPlan:
        """Validates the request (as validate) and says what it needs here: progress steps, and no memory."""
        request = self._request(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        prompt_ids = tokenizer_image_token(request.conversation.prompt(request.text), self.tokenizer)
        return GenerationPlan(progress_steps=max_new_tokens, positions=len(prompt_ids) + max_new_tokens,
                              weights_bytes=0, kv_cache_bytes=0, activation_bytes=0, request=request)

    # ------------------------------------------------------------------------------------- the turn
    def _checked(self, instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens) -> _Request:
        request = super()._checked(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        if request.fingerprint is not None or task == "editing":
            raise MLLMInputError(
                f"The {task} task shows the model an image, and a served MLLM takes text turns only (the image "
                "features are spliced into the model's input, which a token-id request cannot carry); load the "
                "MLLM locally with load_mllm for image tasks.",
                f"The {task} task shows the model an image, and LLMGA Remote MLLM takes text turns only; load the "
                "MLLM with LLMGA MLLM Loader for image tasks (or disconnect the image to chat in text).")
        return request

    def _pixel_values(self, request: _Request):
        return None

    def _new_tokens(self, ids, pixels, notes, temperature, top_p, max_new_tokens, seed, counter):
        if self.context is not None and len(ids) + max_new_tokens > self.context:
            raise MLLMServerError(
                f"The prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) does not fit the "
                f"{self.context} positions of one slot of the MLLM server at {self.client.base_url}; lower "
                "max_new_tokens, start a new conversation, or start llama-server with a larger -c (or fewer -np "
                "slots).")
        sampling = self._sampling
        top_p = sampling.top_p if top_p is None else float(top_p)
        eos = set(sampling.eos_ids)
        sequence = list(ids)
        new_ids: list[int] = []
        if self.family in FP16_ROTARY_FAMILIES:
            notes.append(f"approximate: llama-server computes {self.family.capitalize()}'s rotary position "
                         "embedding in float32, while the original rounds its cos/sin through float16, so a token "
                         "can differ where two candidates are nearly tied")
        if temperature > 0:
            notes.append(f"sampled on the MLLM server with its own random generator (seed {seed}): the same "
                         "processors as the original's sampling, but approximate, since the seed does not give "
                         "the in-process model's tokens")
        for step in range(max_new_tokens):
            body = {
                "prompt": sequence, "n_predict": 1, "cache_prompt": True, "return_tokens": True, "stream": False,
                # the original's processors and warpers in transformers' order; the penalty sees the new ids only
                "samplers": ["penalties", "temperature", "top_k", "top_p"] if temperature > 0 else ["penalties", "top_k"],
                "repeat_penalty": sampling.repetition_penalty, "repeat_last_n": len(new_ids),
                "frequency_penalty": 0.0, "presence_penalty": 0.0,
                "top_k": (sampling.top_k if temperature > 0 else 1), "top_p": top_p if temperature > 0 else 1.0,
                "temperature": float(temperature) if temperature > 0 else 1.0,
                "seed": _step_seed(seed, len(sequence)), "ignore_eos": False,
            }
            if self.served_model:
                body["model"] = self.served_model
            try:
                reply = self.client.request("POST", "/completion", body, what=f"token {step + 1} of the answer")
            except MLLMServerError as e:
                if step == 0:
                    raise
                raise MLLMServerError(f"{e} ({step} tokens of the answer had arrived.)") from None
            tokens = reply.get("tokens")
            if not isinstance(tokens, list) or len(tokens) != 1:
                raise MLLMServerError(f"The MLLM server at {self.client.base_url} answered without the token id "
                                      "(no 'tokens' field); it is not a llama-server that LLMGA Remote MLLM supports.")
            token = int(tokens[0])
            sequence.append(token)
            new_ids.append(token)
            counter(token)
            if token in eos:
                return new_ids, False
        return new_ids, True


def _step_seed(seed: int, position: int) -> int:
    """A different 32-bit seed per position, fixed by the user's seed: every request restarts the server's
    generator, and one seed for all would draw the same number at every step."""
    digest = hashlib.sha256(f"{int(seed)}:{position}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def connect_mllm(folder, base_url: str, *, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: Optional[float] = None, template: Optional[str] = None) -> RemoteMLLM:
    """An LLMGA MLLM whose language model llama-server serves at `base_url` (the GGUF that
    `python -m llmga_core.export FOLDER --gguf …` writes). folder: the released MLLM folder (config, tokenizer,
    generation_config.json; weights are not read). model: the served model's name (default: the one it serves).
    api_key: the server's --api-key. timeout: seconds one request may take (default 600).

    Checks at once, in one sentence each: that the server answers and accepts the key, that it is llama-server,
    that it serves `model`, and that its tokenizer gives the folder's ids for a probe text and has the same
    vocabulary size (a GGUF of another model is refused)."""
    info = recognise(Path(folder))
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; one of {', '.join(TEMPLATES)}.")
    tokenizer = load_tokenizer(info.folder, info.family)
    client = ServerClient(base_url, api_key=api_key, timeout=timeout)
    models = client.request("GET", "/v1/models", what="the model list").get("data") or []
    served = {str(m.get("id")): m for m in models if isinstance(m, dict)}
    if not served:
        raise MLLMServerError(f"The MLLM server at {client.base_url} lists no model; start it with the exported "
                              "GGUF (llama-server -m <model>.gguf).")
    name = model or next(iter(served))
    if name not in served:
        raise MLLMServerError(f"The MLLM server at {client.base_url} does not serve {name!r} (it serves "
                              f"{', '.join(repr(n) for n in served)}); give one of those as the model name.")
    owner = served[name].get("owned_by")
    if owner != "llamacpp":
        raise MLLMServerError(
            f"The server at {client.base_url} serves {name!r} with {owner or 'an unknown engine'}, not llama.cpp's "
            "llama-server; LLMGA Remote MLLM talks to llama-server only (vLLM and SGLang can load the exported "
            "transformers folder, but the pack does not drive them yet).")
    n_vocab = (served[name].get("meta") or {}).get("n_vocab")
    if n_vocab is not None and int(n_vocab) != len(tokenizer):
        raise MLLMServerError(
            f"The MLLM server at {client.base_url} serves {name!r} with a vocabulary of {n_vocab} tokens, but "
            f"{info.folder.name} has {len(tokenizer)}: it serves another model; export this folder with "
            "`python -m llmga_core.export` and serve that GGUF.")
    probe = client.request("POST", "/tokenize", {"content": TOKENIZER_PROBE, "add_special": True},
                           what="the tokenizer check").get("tokens")
    expected = tokenizer.encode(TOKENIZER_PROBE)
    if probe != expected:
        raise MLLMServerError(
            f"The MLLM server at {client.base_url} tokenizes differently from {info.folder.name} (a probe text gave "
            f"other ids), so it serves another model or tokenizer; export this folder with "
            "`python -m llmga_core.export` and serve that GGUF.")
    props = client.request("GET", "/props", what="the server settings")
    context = (props.get("default_generation_settings") or {}).get("n_ctx")
    return RemoteMLLM(info, tokenizer, template or info.template, client, name, int(context) if context else None)


__all__ = ["connect_mllm", "RemoteMLLM", "MLLMServerError", "TOKENIZER_PROBE"]
