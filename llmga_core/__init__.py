"""LLMGA for ComfyUI: the host-free library (torch, transformers, safetensors; never imports ComfyUI)."""
