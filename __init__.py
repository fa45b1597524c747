"""LLMGA for ComfyUI: the LLMGA generation assistant (ECCV 2024) as ComfyUI nodes.

The host loads this package by path and calls comfy_entrypoint(); everything inside uses
relative imports because the host has top-level modules named `nodes` and `utils` too.
Importing this package downloads nothing and allocates no GPU memory.
"""
from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
