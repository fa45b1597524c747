"""LLMGA for ComfyUI: the LLMGA generation assistant (ECCV 2024) as ComfyUI nodes.

The host loads this package by path and calls comfy_entrypoint(); everything inside uses
relative imports because the host has top-level modules named `nodes` and `utils` too.
Importing this package imports nothing of the host, downloads nothing and allocates no GPU
memory: the nodes are imported when the host asks for them.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_entrypoint as entrypoint

    return await entrypoint()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
