"""How each task phrases the user turn, and how the caption is read from the answer.

The phrasings come from LLMGA's training data (LLMGA: llmga/llava/prompt_temp.py, used by
llmga/llava/datasets/*.py, which picked one at random per sample); here each task uses one fixed
phrase so a run is reproducible. The caption rule is the CLIs' (LLMGA: llmga/serve/cli*.py).
"""
from __future__ import annotations

TASKS = ("chat", "text-to-image", "similar-image", "inpainting", "outpainting", "editing")

# The fixed phrase of each task (each one is an entry of the training lists named in the comment).
SIMILAR_IMAGE_PHRASE = "Generate a similar image."  # regen_prompt; also the gradio examples' text
INPAINTING_PHRASE = "Please inpaint this image."  # inpaint_prompt
OUTPAINTING_PHRASE = "Extend this image."  # outpaint_prompt
TEXT_TO_IMAGE_PHRASE = "Generate an image based on given keywords."  # textextend_prompt (phrase + " " + keywords)
EDITING_FIRST_TURN = "Generate a similar image"  # cli-sd15-editing.py's fixed first turn (no period)

GEN_OPEN, GEN_CLOSE = "<gen_image>", "</gen_image>"
_OPEN_SKIP = 12  # the CLIs skip len("<gen_image>") + 1: the tag and the one space they expect after it


def user_text(task: str, instruction: str) -> str:
    """The user message of one turn for `task` (without the `<image>\\n` prefix of a first turn)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    empty = not instruction or not instruction.strip()
    if task == "chat":
        if empty:
            raise ValueError("The instruction is empty; the chat task sends your text to the model as it is, "
                             "so type a message.")
        return instruction
    if task == "text-to-image":
        if empty:
            raise ValueError("The instruction is empty; text-to-image needs keywords or a short description "
                             "of the image to write a prompt for.")
        return TEXT_TO_IMAGE_PHRASE + " " + instruction.strip()
    if task == "editing":
        if empty:
            raise ValueError("The instruction is empty; editing needs the change to make, e.g. 'Make it snowy.'.")
        return instruction
    if not empty:
        return instruction
    return {"similar-image": SIMILAR_IMAGE_PHRASE, "inpainting": INPAINTING_PHRASE,
            "outpainting": OUTPAINTING_PHRASE}[task]


def parse_generation_prompt(text: str) -> tuple[str, bool]:
    """(caption, found) from an answer, by the original's rule: i1 = first `<gen_image>`, i2 = first
    `</gen_image>`; neither → the whole text; only i2 → text[:i2]; only i1 → text[i1+12:]; both →
    text[i1+12:i2] (+12 drops the tag and the character after it; the space before the closing tag
    stays). `found` is whether `<gen_image>` occurs (the CLIs generate an image only then)."""
    start = text.find(GEN_OPEN)
    end = text.find(GEN_CLOSE)
    if start == -1 and end == -1:
        caption = text
    elif start == -1:
        caption = text[:end]
    elif end == -1:
        caption = text[start + _OPEN_SKIP:]
    else:
        caption = text[start + _OPEN_SKIP:end]
    return caption, start != -1
