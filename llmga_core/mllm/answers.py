"""Answers a host can reuse: a stable id of everything that shapes an answer, a small memo of replies that
lives only as long as the model that wrote them, and the rule for a prompt the user edited by hand.

A node that lets its user edit the written prompt runs again when the edit changes its inputs; with these it
reuses the answer instead of generating it again, and drops an edit made for an earlier answer.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict

import torch


def answer_id(model, task, instruction, image, mask, conversation, temperature, top_p, max_new_tokens,
              seed) -> str:
    """A stable id of everything that shapes the answer: the model (folder, dtype, template), the request and
    the image and mask the model looks at. The seed counts only when sampling (greedy decoding ignores it)."""
    digest = hashlib.sha256(json.dumps([
        str(model.folder), str(model.dtype), model.template, str(getattr(model, "quantization", None)), task,
        instruction, float(temperature), float(top_p), int(max_new_tokens), int(seed) if temperature > 0 else None,
        None if conversation is None else [conversation.template, conversation.messages,
                                           conversation.image_fingerprint],
    ]).encode())
    for tensor in (image, mask):
        digest.update(b"-" if tensor is None else str(tuple(tensor.shape)).encode())
        if tensor is not None:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def memo_key(answer: str, seed) -> str:
    """The key a remembered reply is kept under: the answer id plus the seed even when decoding is greedy (where
    the id ignores it), so that a new seed (a node's control_after_generate) generates again, as a user asks."""
    return f"{answer}:{int(seed)}"


class AnswerMemo:
    """The last replies by answer id, so running a node again for an edited prompt (which changes its inputs,
    not its answer) does not generate again. An entry lives only as long as its owner (the loaded model that
    wrote it, held weakly): when a host drops or reloads the model its answers go too."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: OrderedDict[str, tuple[weakref.ref, object]] = OrderedDict()

    def get(self, owner, key: str):
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not owner:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, owner, key: str, reply) -> None:
        self._entries[key] = (weakref.ref(owner), reply)
        self._entries.move_to_end(key)
        for stale in [k for k, (ref, _) in self._entries.items() if ref() is None]:
            del self._entries[stale]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def apply_edit(model_prompt: str, edited_prompt: str, edited_from: str, current_answer: str):
    """(prompt, edit state, note) for a prompt edited on the node. An edit is bound to the answer it was made
    from (edited_from = that answer's id; empty = any answer, for API clients): when the answer-shaping inputs
    have changed since, the edit is dropped and the new answer is used."""
    if not (edited_prompt or "").strip():
        return model_prompt, "none", None
    if edited_from and edited_from != current_answer:
        return model_prompt, "dropped", ("The prompt edited on the node was made for an earlier answer (an input "
                                         "that shapes the answer changed since), so it was dropped and the new "
                                         "answer is used.")
    return edited_prompt, "applied", "The prompt was edited on the node; response and conversation keep the " \
                                     "model's own answer."
