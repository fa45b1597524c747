"""llmga_core.mllm.answers: what identifies an answer, how long a remembered reply lives, and the edit rule."""
from __future__ import annotations

import gc
from types import SimpleNamespace

import torch

from llmga_core.mllm.answers import AnswerMemo, answer_id, apply_edit

MODEL = SimpleNamespace(folder="/m/llmga-Qwen2-0.5B-full-finetune", dtype=torch.float32, template="qwen_2",
                        quantization=None)


def ident(model=MODEL, **changes):
    request = dict(task="text-to-image", instruction="a red boat", image=None, mask=None, conversation=None,
                   temperature=0.0, top_p=1.0, max_new_tokens=64, seed=0)
    request.update(changes)
    return answer_id(model, **request)


def test_the_id_follows_every_input_that_shapes_the_answer():
    base = ident()
    assert ident() == base
    image = torch.rand(8, 8, 3)
    for changed in (dict(instruction="a blue boat"), dict(task="chat"), dict(max_new_tokens=65),
                    dict(temperature=0.5), dict(top_p=0.9), dict(image=image),
                    dict(model=SimpleNamespace(**{**vars(MODEL), "dtype": torch.bfloat16})),
                    dict(model=SimpleNamespace(**{**vars(MODEL), "quantization": "8bit"}))):
        assert ident(**changed) != base, changed
    assert ident(image=image) == ident(image=image.clone())
    other = image.clone()
    other[0, 0, 0] += 0.5
    assert ident(image=other) != ident(image=image)
    # greedy decoding ignores the seed; sampling does not
    assert ident(seed=5) == base
    assert ident(temperature=0.7, seed=5) != ident(temperature=0.7, seed=6)


def test_a_remembered_reply_lives_only_as_long_as_its_model():
    class Owner:
        pass

    memo, first, second = AnswerMemo(size=2), Owner(), Owner()
    memo.put(first, "a", "reply a")
    assert memo.get(first, "a") == "reply a"
    assert memo.get(second, "a") is None  # another (reloaded) model never gets it
    memo.put(first, "b", "reply b")
    memo.put(first, "c", "reply c")
    assert memo.get(first, "a") is None and memo.get(first, "c") == "reply c"  # at most `size` kept
    del first
    gc.collect()
    memo.put(second, "d", "reply d")
    assert len(memo._entries) == 1  # the dropped model's replies went with it


def test_an_edit_applies_to_its_own_answer_only():
    assert apply_edit("model text", "", "", "id1") == ("model text", "none", None)
    prompt, state, note = apply_edit("model text", "my text", "id1", "id1")
    assert (prompt, state) == ("my text", "applied") and "edited on the node" in note
    prompt, state, note = apply_edit("new model text", "my text", "id1", "id2")
    assert (prompt, state) == ("new model text", "dropped") and "dropped" in note
    assert apply_edit("model text", "api text", "", "id9")[:2] == ("api text", "applied")  # API clients: any answer
