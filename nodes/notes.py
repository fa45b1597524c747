"""How every node of the pack tells its user something: the library's notes (plain-word strings on what it
returns, or the warnings of the long-prompt encoder) are logged under the node's name and shown on the node
after its own text, each as a sentence."""
from __future__ import annotations

import logging
from typing import Iterable

log = logging.getLogger("llmga")


def as_sentence(note: str) -> str:
    note = str(note).strip()
    return note if note.endswith((".", "!", "?", ":")) else note + "."


def log_notes(node: str, notes: Iterable[str]) -> list[str]:
    """The notes as sentences, each logged as a warning under `node` (the node's display name)."""
    sentences = [as_sentence(n) for n in notes if str(n).strip()]
    for sentence in sentences:
        log.warning("%s: %s", node, sentence)
    return sentences


def shown_text(text: str, notes: list[str]) -> str:
    """What the node shows: its text, then the notes in brackets; the notes alone, a line each, without text."""
    if not text:
        return "\n".join(notes)
    return text + ("\n\n[" + " ".join(notes) + "]" if notes else "")
