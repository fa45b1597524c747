"""An immutable LLMGA conversation: template, stored messages and the image of its first turn.

Mirrors the state the original CLIs keep between turns (LLMGA: llmga/serve/cli.py: `conv.messages`
with the decoded answers stored WITH their end text, and one image tensor passed again every turn),
as a value: every turn returns a new Conversation, so ComfyUI can cache and fan out outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .templates import TEMPLATES


@dataclass(frozen=True)
class Conversation:
    """template: the template name; messages: ((role, text), …) of finished turns (user, assistant, …);
    image_fingerprint / pixel_values: the first turn's image (what the model saw, after masking) and
    its CLIP pixels, reused on every later turn."""

    template: str
    messages: tuple[tuple[str, str], ...] = ()
    image_fingerprint: Optional[str] = None
    pixel_values: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"Unknown conversation template {self.template!r}; one of {', '.join(TEMPLATES)}.")

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None

    def prompt(self, user_message: str) -> str:
        """The prompt for the next turn: the whole conversation plus `user_message` and the open answer."""
        roles = TEMPLATES[self.template].roles
        return TEMPLATES[self.template].render(list(self.messages) + [(roles[0], user_message), (roles[1], None)])

    def with_turn(self, user_message: str, answer: str, *, image_fingerprint: Optional[str] = None,
                  pixel_values: Optional[torch.Tensor] = None) -> "Conversation":
        roles = TEMPLATES[self.template].roles
        changes = {"messages": self.messages + ((roles[0], user_message), (roles[1], answer))}
        if pixel_values is not None and self.pixel_values is None:
            changes.update(image_fingerprint=image_fingerprint, pixel_values=pixel_values.detach().to("cpu").clone())
        return replace(self, **changes)
