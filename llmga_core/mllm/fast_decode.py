"""Static-cache decoding: a KV cache preallocated for the request and a compiled one-token step.

Today's loop (`LLMGAMLLM._decode` in model.py, the "dynamic" decoder) runs one Python-driven forward per token on
a growing DynamicCache. Here the cache is a transformers StaticCache sized to the request (its prompt positions +
max_new_tokens, rounded up to a multiple of BUCKET), the prompt is prefilled into it eagerly as today, and every
later token is one call of a step function with fixed shapes, which torch.compile compiles (once per model
architecture, dtype, device and shape, see docs/speed-and-memory.md) and which a GPU replays as a CUDA graph captured per
request. Greedy decoding applies the repetition penalty (over a mask of the tokens seen), picks the token with
argmax and writes it into the next step's input on the device, so the host reads tokens only to report them:
each token on the CPU, where reading is free, and each GPU_BLOCK tokens on a GPU, where it is a synchronisation.
The end-token check runs on the tokens read. Sampling keeps sampling.py's `next_token` after the compiled forward,
so the same generator draws give the same tokens.

On the CPU, torch's default matrix-vector kernel (MKL's sgemm at one row, in float32) uses one core. A compiled
step writes each linear layer as a multiply-and-sum over the weight rows, which inductor turns into one
vectorised pass over the weights on every core; an uncompiled one uses oneDNN's linear where a short measurement
finds it faster (`cpu_linear_choice`). A bfloat16 model uses cpu_kernels' AVX-512 BF16 kernel instead, compiled
or not, where the processor has it: inductor's fused loop widens every bfloat16 weight to float32 and stays well
below the memory rate. The pack's int8 layers (int8_weights.py) bring their own kernel.

Attention at the one query row packs the query heads per key/value head instead of repeating the cache for every
head (`decode_attention`), and after a request's first step the compiled step's guards are trusted
(`_trusted_guards`).

Nothing here changes the model: the prefill, the weights and the module tree stay as loaded; the linear kernel and
the attention implementation are swapped only for the duration of a decode.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import cpu_kernels
from .int8_weights import Int8Linear
from .sampling import forward_argument_names, next_token

log = logging.getLogger("llmga")

DECODERS = ("auto", "compiled", "static", "dynamic")
"""auto: compiled for models of at least COMPILE_MIN_BYTES of language-model weights, else the static step
uncompiled; compiled: always compile; static: the static cache with the step uncompiled; dynamic: the dynamic-cache loop (model.py)."""

BUCKET = 256  # cache positions are rounded up to this, so requests of similar length share one compiled shape
GPU_BLOCK = 8  # tokens per host synchronisation on a GPU (progress and interruption granularity there)
COMPILE_MIN_BYTES = 64 * 1024 * 1024  # below this a compilation costs more than it can save
RECOMPILE_LIMIT = 64  # dynamo's per-function limit (8 by default) would silently stop compiling new models

_compile_failures: dict[tuple, str] = {}  # (device type, dtype, model class) → why compiling failed there
_compiled_steps: dict[str, Callable] = {}
_linear_choices: dict[tuple, str] = {}  # (dtype, threads, weight shape) → "onednn" | "default"


class FastDecodeUnavailable(RuntimeError):
    """The static-cache decoder cannot run this request here; no token was reported yet, so the caller decodes
    with the dynamic-cache loop. `first` is False when the same reason was already given in this process."""

    def __init__(self, reason: str, first: bool = True):
        super().__init__(reason)
        self.first = first


# ------------------------------------------------------------------------------------------ the steps
def _logits_step(lm: nn.Module, cache, token: torch.Tensor, position: Optional[torch.Tensor], cache_arg: str,
                 keep_arg: Optional[str]) -> torch.Tensor:
    """The float32 logits (V,) after feeding `token` (1×1) at the cache's next position. `position` (1,): the
    cache position of the token where the forward takes one (transformers 4), advanced here on the device;
    None where the cache counts its positions itself (transformers 5)."""
    kwargs = {cache_arg: cache, "use_cache": True}
    if keep_arg:
        kwargs[keep_arg] = 1
    if position is not None:
        kwargs["cache_position"] = position
    logits = lm(input_ids=token, **kwargs).logits[0, -1].to(torch.float32)
    if position is not None:
        position.add_(1)
    return logits


def _greedy_step(lm: nn.Module, cache, token: torch.Tensor, position: Optional[torch.Tensor], seen: torch.Tensor,
                 penalty: float, cache_arg: str, keep_arg: Optional[str]) -> torch.Tensor:
    """One greedy token, written into `token` for the next step and marked in `seen`; returns it (0-dim).

    The penalty is transformers 4.41's RepetitionPenaltyLogitsProcessor, as `next_token` applies it with
    gather/scatter over the generated ids: the same operation on the same values, over a mask of the ids."""
    logits = _logits_step(lm, cache, token, position, cache_arg, keep_arg)
    if penalty != 1.0:
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    chosen = logits.argmax()
    token.copy_(chosen.view(1, 1))
    seen.index_fill_(0, chosen.view(1), True)
    return chosen


def _step_function(kind: str, compiled: bool) -> Callable:
    plain = _greedy_step if kind == "greedy" else _logits_step
    if not compiled:
        return plain
    step = _compiled_steps.get(kind)
    if step is None:
        # fullgraph: a graph break would leave Python (and host synchronisations) inside the step
        step = _compiled_steps[kind] = torch.compile(plain, fullgraph=True)
    return step


# ---------------------------------------------------------------------------------- the CPU linear kernel
def _define_onednn_linear():
    """A custom op around oneDNN's linear on plain (not pre-packed) weights: inductor lowers
    mkldnn._linear_pointwise only for frozen constant weights, and freezing would copy the weights."""
    if not (hasattr(torch, "library") and hasattr(torch.library, "custom_op")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None

    @torch.library.custom_op("llmga::onednn_linear", mutates_args=(), device_types="cpu")
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @onednn_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return onednn_linear


@functools.lru_cache(maxsize=None)
def _onednn_linear():
    try:
        return _define_onednn_linear()
    except Exception as error:  # an old torch without custom ops, or an op that changed
        log.debug("oneDNN linear unavailable: %s", error)
        return None


def _onednn_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.llmga.onednn_linear(x, module.weight, module.bias)  # defined by _onednn_linear()


REDUCTION_CHUNK = 4096  # inductor sums longer reductions with a slower cascade (codegen/cpp.py's chunk size)


def _reduction_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ + b written as a multiply-and-sum over each weight row, which inductor fuses into one pass over W,
    parallel over the output features, accumulating in float32. Only for compiled steps: run eagerly it would
    materialise x * W. Rows longer than REDUCTION_CHUNK are summed in equal parts, then the parts (Qwen2-0.5B's
    4864-wide down projection read at 11 GB/s as one cascade sum, at the rate of the others in two parts)."""
    weight = module.weight.to(torch.float32)
    width = weight.shape[-1]
    parts = 1  # a plain loop: torch 2.6's dynamo cannot trace next() with a default
    if width > REDUCTION_CHUNK:
        for candidate in range(-(-width // REDUCTION_CHUNK), 65):
            if width % candidate == 0:
                parts = candidate
                break
    if parts == 1:
        out = (x.unsqueeze(-2).to(torch.float32) * weight).sum(-1)
    else:
        pieces = x.to(torch.float32).unflatten(-1, (parts, width // parts)).unsqueeze(-3)
        out = (pieces * weight.unflatten(-1, (parts, width // parts))).sum(-1).sum(-1)
    if module.bias is not None:
        out = out + module.bias.to(torch.float32)
    return out.to(x.dtype)


def _bf16_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ + b with cpu_kernels' AVX-512 BF16 kernel (bfloat16 products, float32 sums); falls back to torch's
    linear for weights of another dtype."""
    if module.weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
        return nn.functional.linear(x, module.weight, module.bias)
    out = torch.ops.llmga.gemv_bf16(x, module.weight)
    if module.bias is not None:
        out = out + module.bias.to(torch.float32)
    return out.to(x.dtype)


_FORWARDS = {"onednn": _onednn_forward, "reduction": _reduction_forward, "bf16": _bf16_forward}


def _plain_linears(lm: nn.Module) -> list[nn.Linear]:
    # exactly nn.Linear: quantised subclasses (bitsandbytes) keep their own forward
    return [m for m in lm.modules() if type(m) is nn.Linear]


def cpu_linear_choice(lm: nn.Module, dtype: torch.dtype, compiled: bool, chosen: Optional[str] = None) -> str:
    """The matrix-vector kernel of the CPU step. bfloat16 where cpu_kernels' AVX-512 BF16 kernel runs: "bf16"
    (compiled or not; it reads the weights at the memory rate). Otherwise compiled: "reduction" (on 2 cores of
    an AVX-512 EPYC, docs/speed-and-memory.md: ×1.3–1.8 faster than oneDNN's and ×1.7–2.3 than torch's default,
    which uses one core). Uncompiled: "onednn" or "default", the faster for this model's largest linear layer
    at the current thread count, measured once per process and shape (interleaved runs, best of five). chosen:
    the model's `cpu_linear` ("bf16", "reduction", "onednn" or "default"), which wins where it can run."""
    if chosen == "bf16" and not cpu_kernels.available("bf16")[0]:
        chosen = None
    if chosen is not None:
        return chosen if compiled or chosen != "reduction" else "default"
    if dtype == torch.bfloat16 and _plain_linears(lm) and cpu_kernels.available("bf16")[0]:
        return "bf16"
    if compiled:
        return "reduction"
    onednn = _onednn_linear()
    linears = _plain_linears(lm)
    if onednn is None or not linears or dtype not in (torch.float32, torch.bfloat16):
        return "default"
    largest = max(linears, key=lambda m: m.weight.numel())
    key = (dtype, torch.get_num_threads(), tuple(largest.weight.shape))
    if key not in _linear_choices:
        x = torch.randn(1, 1, largest.in_features, dtype=dtype)
        kernels = {"default": lambda: torch.nn.functional.linear(x, largest.weight, largest.bias),
                   "onednn": lambda: onednn(x, largest.weight, largest.bias)}
        best = {name: float("inf") for name in kernels}
        with torch.inference_mode():
            try:
                for name, run in kernels.items():
                    run()  # first-call set-up
                for _ in range(5):
                    for name, run in kernels.items():
                        start = time.perf_counter()
                        run()
                        best[name] = min(best[name], time.perf_counter() - start)
            except Exception as error:
                log.debug("oneDNN linear failed on this machine: %s", error)
                best["onednn"] = float("inf")
        choice = _linear_choices[key] = "onednn" if best["onednn"] < 0.95 * best["default"] else "default"
        log.info("LLMGA MLLM: %s linear kernel for CPU decoding in %s with %d threads (%.2f ms oneDNN vs %.2f ms "
                 "default for a %dx%d weight)", choice, str(dtype).removeprefix("torch."), key[1],
                 best["onednn"] * 1e3, best["default"] * 1e3, largest.out_features, largest.in_features)
    return _linear_choices[key]


@contextlib.contextmanager
def linear_kernel(lm: nn.Module, choice: str):
    """Runs the model's plain linear layers through `choice` ("default", "onednn", "reduction") in the block."""
    forward = _FORWARDS.get(choice)
    if forward is None:
        yield
        return
    linears = _plain_linears(lm)
    _onednn_linear()  # defines the op (outside any compiled region)
    if choice == "bf16":
        cpu_kernels.available("bf16")  # builds and registers the op, likewise
    for module in linears:
        module.forward = forward.__get__(module)
    try:
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------- attention
GQA_DECODE = "llmga_gqa_decode"  # the attention implementation the decode steps run under


def _gqa_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one query position without repeating the key/value heads: each key/value head's query heads
    become its rows (transformers' own `pack_gqa`, which it skips inside torch.compile and then copies the whole
    cache to every query head: for Qwen2-0.5B, 14 × 256 × 64 values twice per layer and step, a fifth of a step's
    time). Written out (scores, mask, softmax, weighted sum) in float32, which inductor fuses into the step; torch's
    CPU flash-attention kernel costs more than the rest of the attention at one query row. Anything else goes to
    transformers' sdpa function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                            and attention_mask.shape[2] == 1)
    if (query.shape[2] != 1 or groups == 1 or not plain_mask or dropout
            or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "sinks", "s_aux"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, width = query.shape
    packed = query.reshape(batch, heads // groups, groups, width).to(torch.float32)
    scores = packed @ key.to(torch.float32).transpose(-1, -2) * (width ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # sdpa's mask: True where a position is attended; or an additive one
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    out = (scores.softmax(-1) @ value.to(torch.float32)).to(query.dtype)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def _register_gqa_decode() -> bool:
    """Registers the attention (and its mask, sdpa's) with transformers; False where it has no such registries
    (before 4.53)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(GQA_DECODE, _gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)
    return True


@contextlib.contextmanager
def decode_attention(lm: nn.Module):
    """Runs the model's sdpa attention as `_gqa_decode_attention` in the block (a model on another
    implementation, or a transformers without the registries, is left alone)."""
    config = lm.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _register_gqa_decode():
        yield
        return
    config._attn_implementation = GQA_DECODE
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------------------- CUDA graphs
class _GraphStep:
    """The compiled step captured as a CUDA graph: replay() runs it on the static inputs it was captured with."""

    def __init__(self, step: Callable, args: tuple, state: list[torch.Tensor]):
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(*args)  # warm-up on a side stream, as capture requires; it advanced the state, so restore it
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*args)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


# ------------------------------------------------------------------------------------------- the decoder
@dataclass
class _Plan:
    compiled: bool
    linear: str


def _static_cache_support(lm: nn.Module) -> tuple[Optional[str], bool]:
    """(why this transformers cannot run the static cache, or None; whether its forward takes the cache positions).

    transformers 5 keeps the position count in the cache (StaticLayer.cumulative_length); 4.x's forward takes
    `cache_position`, and without it would count the filled positions on the host at every step."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        import transformers

        return f"transformers {transformers.__version__} has no StaticCache", False
    return None, "cache_position" in inspect.signature(lm.forward).parameters


def _new_static_cache(lm: nn.Module, length: int, device: torch.device, dtype: torch.dtype):
    """A StaticCache of `length` positions for one sequence. transformers 5 and 4.56+ take (config, max_cache_len)
    and allocate at the first update; 4.48–4.55 allocate here and need the batch size, device and dtype."""
    from transformers import StaticCache

    names = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": lm.config, "max_cache_len": length}
    if "max_batch_size" in names:
        kwargs.update(max_batch_size=1, device=device, dtype=dtype)
    return StaticCache(**kwargs)


def _unguard(cache) -> None:
    """Drops the identity guards on the cache's tensors. transformers marks them with
    torch._dynamo.mark_static_address, whose `guard` defaults to True before torch 2.9: the compiled step then
    guards on each tensor's id, so the next request's new cache recompiled the step (until dynamo's recompile
    limit, then the step was no longer compiled). Unguarded, the tensors stay inputs of the compiled step and
    one compilation serves every cache of the same shape."""
    for holder in (cache, *getattr(cache, "layers", ())):
        for value in vars(holder).values():
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and hasattr(tensor, "_dynamo_static_input_type"):
                    torch._dynamo.mark_static_address(tensor, guard=False)


def _cache_state(cache) -> list[torch.Tensor]:
    """The position counters the step advances inside the cache (transformers 5's StaticLayer.cumulative_length)."""
    return [layer.cumulative_length for layer in getattr(cache, "layers", ())
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]


def _dynamo_settings():
    """dynamo's configuration for the block, where this torch has the setting:
    - the per-function recompile limit raised (torch 2.6 calls it cache_size_limit), since every model and
      shape bucket compiles the same step function;
    - floats specialised: the models' constants (RMSNorm epsilon, rope scaling) and the repetition penalty are
      compiled in and guarded by value. Otherwise a float that differs from the previous compilation (Llama-3's
      epsilon after Qwen2's) is turned into a tensor input, which torch 2.7 reads back with .item() in the
      graph and then fails to compile ("Data dependent operator aten._local_scalar_dense")."""
    config = torch._dynamo.config
    settings = {"specialize_float": True} if hasattr(config, "specialize_float") else {}
    limit = next((name for name in ("recompile_limit", "cache_size_limit") if hasattr(config, name)), None)
    if limit:
        settings[limit] = max(int(getattr(config, limit)), RECOMPILE_LIMIT)
    return config.patch(**settings)


def _trusted_guards(compiled: bool):
    """After a request's first step has passed dynamo's guards, its later steps call the compiled step with the
    same objects (model, cache, token, mask), so re-checking every guard (about 1.5 ms a step for Qwen2-0.5B's
    300 weights on one core of an AVX-512 EPYC) can only repeat the first answer: torch's
    `skip_guard_eval_unsafe` stance keeps only the guards that tell its compiled entries apart. The block holds
    no other compiled code (the token callbacks run between blocks)."""
    stance = getattr(torch.compiler, "set_stance", None)
    if not compiled or stance is None:
        return contextlib.nullcontext()
    try:
        return stance("default", skip_guard_eval_unsafe=True)
    except TypeError:  # a torch whose set_stance has no such option
        return contextlib.nullcontext()


def _known_compile_gap() -> str:
    """What to say first when a compilation fails where it is known to: torch 2.6's dynamo cannot trace
    transformers 5's model code (its decorators read `func.__code__` and call dict methods through super())."""
    import transformers

    torch_version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if torch_version < (2, 7) and int(transformers.__version__.split(".")[0]) >= 5:
        return "torch 2.6 cannot compile transformers 5's models; torch 2.7 or later can: "
    return ""


def _decline(key: tuple, reason: str, remember: bool = True) -> FastDecodeUnavailable:
    """The FastDecodeUnavailable for `reason`, remembered under `key`; `first` only the first time."""
    first = _compile_failures.get(key) != reason
    if remember:
        _compile_failures[key] = reason
    return FastDecodeUnavailable(reason, first=first)


def _plan(lm: nn.Module, device: torch.device, dtype: torch.dtype, mode: str, chosen_linear: Optional[str]) -> _Plan:
    if mode == "compiled":
        compiled = True
    else:
        weights = sum(p.numel() * p.element_size() for p in lm.parameters())
        compiled = mode == "auto" and weights >= COMPILE_MIN_BYTES
    linear = cpu_linear_choice(lm, dtype, compiled, chosen_linear) if device.type == "cpu" else "default"
    return _Plan(compiled=compiled, linear=linear)


def _tokens_per_sync(device: torch.device) -> int:
    """Tokens computed between two reads of the device: reading is a synchronisation only on a GPU."""
    return GPU_BLOCK if device.type == "cuda" else 1


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    first = text.split(". ")[0]
    return f"{type(error).__name__}: {first[:200]}"


def decode(mllm, embeds: torch.Tensor, temperature: float, top_p: Optional[float], max_new_tokens: int, seed: int,
           counter: Callable[[int], None], mode: str) -> tuple[list[int], bool]:
    """(new token ids, whether max_new_tokens was reached before an end token), as model.py's dynamic loop.

    Raises FastDecodeUnavailable, before any token is reported, where the static cache or its compiled step
    cannot run (the reason is remembered per device, dtype and model class, so it is not tried again);
    exceptions of `counter` (progress, interruption) propagate."""

    if mode not in DECODERS or mode == "dynamic":
        raise ValueError(f"decoder is {mode!r}; use one of {', '.join(DECODERS)}.")
    lm = mllm.model.language_model
    device, dtype = embeds.device, next(lm.parameters()).dtype
    cache_arg, keep_arg = forward_argument_names(lm)
    reason, positional = _static_cache_support(lm)
    if reason:
        raise _decline(("unsupported",), reason)
    plan = _plan(lm, device, dtype, mode, getattr(mllm, "cpu_linear", None))
    quantised = any((isinstance(m, nn.Linear) and type(m) is not nn.Linear) or isinstance(m, Int8Linear)
                    for m in lm.modules())
    static_key = (device.type, dtype, type(lm).__name__, quantised)  # where the static cache itself failed
    failure_key = static_key + ("compiled",) if plan.compiled else static_key
    for key in {static_key, failure_key}:
        if key in _compile_failures:
            raise FastDecodeUnavailable(_compile_failures[key], first=False)
    if plan.compiled and not torch._dynamo.is_dynamo_supported():
        raise _decline(failure_key, "torch.compile is not supported on this Python/torch")

    sampling = mllm._sampling
    top_p = sampling.top_p if top_p is None else float(top_p)
    generator = torch.Generator(device=device).manual_seed(int(seed)) if temperature > 0 else None
    eos = set(sampling.eos_ids)
    prompt = embeds.shape[1]
    length = -(-(prompt + max_new_tokens) // BUCKET) * BUCKET
    greedy = temperature <= 0
    with torch.inference_mode():
        try:  # what differs between transformers versions: the cache's constructor and the prefill's arguments
            cache = _new_static_cache(lm, length, device, dtype)
            prefill = {cache_arg: cache, "use_cache": True}
            if keep_arg:
                prefill[keep_arg] = 1
            if positional:
                prefill["cache_position"] = torch.arange(prompt, device=device)
            logits = lm(inputs_embeds=embeds, **prefill).logits[0, -1].to(torch.float32)
            _unguard(cache)  # after the prefill: transformers 5 allocates the tensors at the first update
        except Exception as error:
            out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)  # this request only: not remembered
            raise _decline(static_key, f"the static cache failed on {device.type} ({_short(error)})",
                           remember=not out_of_memory) from error
        first = next_token(sampling, logits, None, temperature, top_p, generator)
        del logits
        first_id = int(first)
        if first_id in eos or max_new_tokens == 1:
            counter(first_id)
            return [first_id], first_id not in eos
        out = torch.empty(max_new_tokens, dtype=torch.long, device=device)  # the tokens, on the device
        out[0] = first
        token = first.view(1, 1).clone()
        position = torch.tensor([prompt], dtype=torch.long, device=device) if positional else None
        vocabulary = lm.get_output_embeddings().weight.shape[0]
        seen = torch.zeros(vocabulary, dtype=torch.bool, device=device)
        seen[first] = True
        step = _step_function("greedy" if greedy else "logits", plan.compiled)
        args = (lm, cache, token, position, seen, sampling.repetition_penalty, cache_arg, keep_arg) if greedy else \
            (lm, cache, token, position, cache_arg, keep_arg)

        def advance(run: Callable[[], torch.Tensor], count: int) -> torch.Tensor:
            """Token `count` (0-based) from the step's output; sampling draws it here as the dynamic loop does."""
            result = run()
            if greedy:
                return result
            chosen = next_token(sampling, result, out[:count], temperature, top_p, generator)
            token.copy_(chosen.view(1, 1))
            return chosen

        with linear_kernel(lm, plan.linear), decode_attention(lm), _dynamo_settings():
            try:  # the first step compiles; nothing has been reported yet, so a failure can still fall back
                out[1] = advance(lambda: step(*args), 1)
            except Exception as error:
                what = "compiling the decode step" if plan.compiled else "the static-cache decode step"
                out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
                hint = _known_compile_gap() if plan.compiled else ""
                raise _decline(failure_key, f"{what} failed on {device.type} ({hint}{_short(error)})",
                               remember=not out_of_memory) from error
            run = functools.partial(step, *args)
            if device.type == "cuda" and plan.compiled:
                state = [token] + ([position] if positional else []) + ([seen] if greedy else []) + _cache_state(cache)
                try:
                    run = _GraphStep(step, args, state)
                except Exception as error:  # the compiled step still runs, launched per kernel
                    key = ("cuda graph",) + failure_key
                    if key not in _compile_failures:
                        _compile_failures[key] = str(error)
                        log.warning("LLMGA MLLM: capturing the decode step as a CUDA graph failed (%s); "
                                    "decoding with the compiled step alone.", _short(error))
            block = _tokens_per_sync(device)
            ids = [first_id]
            counter(first_id)
            done = 2  # tokens in `out`
            while True:
                for token_id in out[len(ids):done].tolist():  # one synchronisation per block
                    ids.append(token_id)
                    counter(token_id)
                    if token_id in eos:
                        return ids, False
                if done == max_new_tokens:
                    return ids, True
                with _trusted_guards(plan.compiled):
                    for _ in range(min(block, max_new_tokens - done)):
                        out[done] = advance(run, done)
                        done += 1
