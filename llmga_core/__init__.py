"""LLMGA for ComfyUI: the host-free library (torch, transformers, diffusers; never imports ComfyUI)."""
