"""What the in-process model and a served one share: the checks of a request, the turns of a conversation and
the reply, around a source of new tokens.

The turn is the original's CLI loop (LLMGA: llmga/serve/cli.py): render the conversation with the new user
message, tokenize it with `<image>` as -200, generate, store the decoded answer with its end text, print it
minus the template's cut and read the caption from <gen_image>…</gen_image>. How the new tokens are made is the
subclass's: `LLMGAMLLM` runs the model here (model.py), `RemoteMLLM` asks a server (remote.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from . import images as imaging
from .conversation import Conversation
from .sampling import Sampling
from .prompts import EDITING_FIRST_TURN, TASKS, parse_generation_prompt, user_text
from .templates import cut_output
from .tokenization import IMAGE_TOKEN, decode_answer, tokenizer_image_token


class MLLMInputError(ValueError):
    """A request the model cannot run, in one sentence. str() is worded for Python callers (argument names);
    `for_graph()` for node users (what to connect or disconnect), so a host only translates."""

    def __init__(self, message: str, graph_message: Optional[str] = None):
        super().__init__(message)
        self.graph_message = graph_message or message

    def for_graph(self) -> str:
        return self.graph_message


@dataclass
class _Request:
    """A validated request: the user text, the conversation to continue and the image as the model sees it."""

    task: str
    text: str
    conversation: Conversation
    fingerprint: Optional[str]  # of the image the conversation shows (None: text only)
    seen: Optional[object]  # uint8 H×W×3 of a new image (holes blacked), None when reusing the conversation's
    made_for: tuple = ()  # the arguments it was checked for (objects by identity), so generate can reuse it


@dataclass
class MLLMReply:
    """token_ids: the new tokens; response: the answer as the original prints it; prompt: the caption
    parsed from <gen_image>…</gen_image>; prompt_found: whether <gen_image> occurred; conversation: pass
    it to the next call; notes: warnings in plain words; source_prompt: the source caption (editing)."""

    token_ids: list[int]
    response: str
    prompt: str
    prompt_found: bool
    conversation: Conversation
    notes: list[str] = field(default_factory=list)
    source_prompt: Optional[str] = None


class Assistant:
    """Requests, conversations and replies of an LLMGA MLLM; subclasses make the new tokens (`_new_tokens`) and the
    CLIP pixels of an image (`_pixel_values`). Needs: tokenizer, template, output_template, folder, _sampling."""

    tokenizer: object
    template: str
    output_template: str
    _sampling: Sampling

    def new_conversation(self) -> Conversation:
        return Conversation(self.template)

    def generate(self, instruction: str, *, task: str = "chat", image=None, mask=None,
                 conversation: Optional[Conversation] = None, temperature: float = 0.0, top_p: Optional[float] = None,
                 max_new_tokens: int = 512, seed: int = 0,
                 on_token: Optional[Callable[[int, int], None]] = None, plan=None) -> "MLLMReply":
        """One turn of the conversation (two for task="editing").

        instruction: the user's text. task: "chat" sends it verbatim; "text-to-image" sends "Generate an image
        based on given keywords. " + it; "similar-image" / "inpainting" / "outpainting" send it, or when empty
        "Generate a similar image." / "Please inpaint this image." / "Extend this image."; "editing" runs the
        editing CLI's two turns (image + "Generate a similar image", then the instruction) and returns the
        second with `source_prompt` set. image: PIL image or H×W×3 float tensor in 0..1 (first turn; later
        turns may pass the same image again or none). mask: H×W float tensor or PIL image, 1/white = region to
        generate (blacked before CLIP). conversation: the previous reply's (never modified). temperature 0 is
        greedy; > 0 samples with a torch.Generator seeded with `seed`, the folder's top_k and top_p (or
        `top_p`). on_token(step, token_id): after every new token, step counting from 1; its exceptions
        propagate (how a host interrupts). plan: what `plan(...)` returned for these same arguments (the same
        image, mask and conversation objects): its checked request is used instead of checking them again.
        """
        arguments = _arguments(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        if plan is not None and getattr(plan, "request", None) is not None:
            if plan.request.made_for != arguments:
                raise ValueError("The plan was made for other arguments than this generate call; pass the same "
                                 "instruction, task, image, mask, conversation and settings, or no plan.")
            request = plan.request
        else:
            request = self._request(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        counter = _StepCounter(on_token)
        pixels = self._pixel_values(request)
        if task == "editing":
            return self._edit(request, pixels, temperature, top_p, max_new_tokens, seed, counter)
        return self._turn(request.conversation, request.text, request.fingerprint, pixels, temperature, top_p,
                          max_new_tokens, seed, counter)

    def validate(self, instruction: str, *, task: str = "chat", image=None, mask=None,
                 conversation: Optional[Conversation] = None, temperature: float = 0.0, top_p: Optional[float] = None,
                 max_new_tokens: int = 512) -> None:
        """Raises the MLLMInputError generate would raise for these arguments, without running the model (no
        weights are touched, so a host can call it before moving the model to its device)."""
        self._request(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)

    # ------------------------------------------------------------------------------ the request
    def _request(self, instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens) -> _Request:
        request = self._checked(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens)
        request.made_for = _arguments(instruction, task, image, mask, conversation, temperature, top_p,
                                      max_new_tokens)
        return request

    def _checked(self, instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens) -> _Request:
        """Every check of a generate call that needs no model, in the order a user fixes them."""
        if task not in TASKS:
            raise MLLMInputError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
        if max_new_tokens < 1:
            raise MLLMInputError(f"max_new_tokens is {max_new_tokens}; it must be at least 1.")
        if temperature < 0:
            raise MLLMInputError(f"temperature is {temperature}; use 0 for greedy decoding or a positive value to "
                                 "sample.")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise MLLMInputError(f"top_p is {top_p}; it must be in (0, 1], or None for the model's own setting.")
        instruction = "" if instruction is None else str(instruction)
        if IMAGE_TOKEN in instruction:
            raise MLLMInputError(
                "The instruction contains '<image>', which marks where the image goes; pass the image as `image` "
                "and remove '<image>' from the text.",
                "The instruction contains '<image>', which marks where the image goes; remove '<image>' from the "
                "instruction and connect the picture to the image input.")
        if conversation is not None and not isinstance(conversation, Conversation):
            raise TypeError(f"conversation must be a Conversation from an earlier reply, not "
                            f"{type(conversation).__name__}.")
        if conversation is not None and conversation.template != self.template:
            raise MLLMInputError(
                f"This conversation uses the {conversation.template} template but the model uses {self.template}; "
                "start a new conversation for this model.",
                f"This conversation uses the {conversation.template} template but the model uses {self.template}; "
                "connect the MLLM that started it, or disconnect the conversation input to start a new one.")
        try:
            text = user_text(task, instruction)
        except ValueError as e:
            raise MLLMInputError(str(e)) from None
        if task == "editing":
            if conversation is not None:
                raise MLLMInputError(
                    "The editing task starts a new conversation (an image described, then your edit); pass no "
                    "conversation, or use the chat task to continue one.",
                    "The editing task starts a new conversation, so disconnect the conversation input (or use the "
                    "chat task to continue one).")
            if image is None:
                raise MLLMInputError("The editing task needs the image to edit.",
                                     "The editing task needs the image to edit; connect it to the image input.")
        conv = conversation if conversation is not None else self.new_conversation()
        if image is None:
            if mask is not None:
                raise MLLMInputError(
                    "A mask was given without its image; pass the image together with the mask.",
                    "A mask was given without its image; connect the image together with the mask.")
            if task in ("similar-image", "inpainting", "outpainting") and not conv.has_image:
                extra = " and a mask" if task != "similar-image" else ""
                raise MLLMInputError(f"The {task} task needs an image{extra}.",
                                     f"The {task} task needs an image{extra}; connect one to the image input.")
            return _Request(task, text, conv, conv.image_fingerprint, None)
        if mask is None and task in ("inpainting", "outpainting"):
            raise MLLMInputError(
                f"The {task} task needs a mask (white = the region to generate) with the image.",
                f"The {task} task needs a mask (white = the region to generate) with the image; connect one to the "
                "mask input.")
        rgb = imaging.to_uint8_rgb(image)
        seen = imaging.masked_image(rgb, imaging.to_hole_mask(mask, rgb.shape[:2])) if mask is not None else rgb
        fingerprint = imaging.fingerprint(seen)
        if conv.has_image:
            if fingerprint != conv.image_fingerprint:
                raise MLLMInputError(
                    "This conversation was started with another image; pass the same image (and mask) to continue "
                    "it, or start a new conversation for a new image.",
                    "This conversation was started with another image; connect the same image (and mask) to "
                    "continue it, or disconnect the conversation input to start a new one.")
            return _Request(task, text, conv, conv.image_fingerprint, None)
        if conv.messages:
            raise MLLMInputError(
                "This conversation was started without an image, and LLMGA shows an image only in the first turn; "
                "start a new conversation to talk about an image.",
                "This conversation was started without an image, and LLMGA shows an image only in the first turn; "
                "disconnect the conversation input to start a new one with the image.")
        if task == "text-to-image":
            raise MLLMInputError(
                "The text-to-image task takes no image; use similar-image (or chat) to show the model an image.",
                "The text-to-image task takes no image; choose the similar-image (or chat) task, or disconnect the "
                "image input.")
        return _Request(task, text, conv, fingerprint, seen)

    def _edit(self, request: _Request, pixels, temperature, top_p, max_new_tokens, seed, counter):
        conv, fingerprint = request.conversation, request.fingerprint
        first = self._turn(conv, EDITING_FIRST_TURN, fingerprint, pixels, temperature, top_p, max_new_tokens, seed,
                           counter)
        second = self._turn(first.conversation, request.text, fingerprint, pixels, temperature, top_p,
                            max_new_tokens, seed, counter)
        second.source_prompt = first.prompt
        second.notes = [f"source caption: {n}" for n in first.notes] + second.notes
        return second

    def _turn(self, conv: Conversation, text: str, fingerprint, pixels, temperature, top_p, max_new_tokens, seed,
              counter) -> MLLMReply:
        first_with_image = pixels is not None and not conv.messages
        message = IMAGE_TOKEN + "\n" + text if first_with_image else text
        prompt = conv.prompt(message)
        ids = tokenizer_image_token(prompt, self.tokenizer)
        notes: list[str] = []
        new_ids, hit_limit = self._new_tokens(ids, pixels, notes, temperature, top_p, max_new_tokens, seed, counter)
        stored = decode_answer(self.tokenizer, new_ids)
        response = cut_output(self.output_template, stored)
        caption, found = parse_generation_prompt(response)
        if hit_limit:
            notes.append(f"stopped at max_new_tokens ({max_new_tokens}) before the end token; the answer is "
                         "incomplete (and, as in the original, its last characters were trimmed as if it had ended).")
        if not found:
            notes.append("no <gen_image> tag in the answer; the whole answer is used as the prompt")
        new_conv = conv.with_turn(message, stored, image_fingerprint=fingerprint if first_with_image else None,
                                  pixel_values=pixels if first_with_image else None)
        return MLLMReply(token_ids=new_ids, response=response, prompt=caption, prompt_found=found,
                         conversation=new_conv, notes=notes)


    # ------------------------------------------------------------------------------- for subclasses
    def _pixel_values(self, request: "_Request"):
        raise NotImplementedError

    def _new_tokens(self, ids: list[int], pixels, notes: list[str], temperature: float, top_p: Optional[float],
                    max_new_tokens: int, seed: int, counter: "_StepCounter") -> tuple[list[int], bool]:
        """The answer's token ids for the prompt `ids` (-200 where the image goes) and whether it stopped at
        max_new_tokens; `notes` takes warnings in plain words."""
        raise NotImplementedError


def _arguments(instruction, task, image, mask, conversation, temperature, top_p, max_new_tokens) -> tuple:
    """What a checked request was made for: values, and the image, mask and conversation objects themselves."""
    return (instruction, task, id(image), id(mask), id(conversation), float(temperature),
            None if top_p is None else float(top_p), int(max_new_tokens))


class _StepCounter:
    """Calls on_token(step, token_id) with step = tokens generated so far in this call (1 for the first)."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.steps = 0

    def __call__(self, token_id: int) -> None:
        self.steps += 1
        if self.on_token is not None:
            self.on_token(self.steps, token_id)


