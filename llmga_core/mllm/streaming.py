"""The answer while it is being written, for live display (a host shows it on screen as tokens arrive).

Feed it the ids that `LLMGAMLLM.generate(on_token=...)` reports; it decodes them with the library's own rule
(`decode_answer`, the text the conversation stores), so the live text ends as the stored answer does.
"""
from __future__ import annotations

from .tokenization import decode_answer


class RunningAnswer:
    """The turns written so far, each as its token ids. One generate call writes one turn, editing two (the
    source caption, then the target); a turn ends where the decode loop stops it: at an end token of the
    model or after max_new_tokens tokens."""

    def __init__(self, mllm, max_new_tokens: int):
        self._tokenizer = mllm.tokenizer
        self._end_ids = frozenset(mllm._sampling.eos_ids)
        self._max_new_tokens = int(max_new_tokens)
        self.turns: list[list[int]] = [[]]

    def add(self, token_id: int) -> None:
        turn = self.turns[-1]
        if turn and (turn[-1] in self._end_ids or len(turn) >= self._max_new_tokens):
            turn = []
            self.turns.append(turn)
        turn.append(int(token_id))

    def texts(self) -> list[str]:
        """Each turn's text so far, decoded as the finished turn will be stored."""
        return [decode_answer(self._tokenizer, ids) for ids in self.turns]
