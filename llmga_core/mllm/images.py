"""Image input of LLMGA's MLLM: conversion, masking, the square stretch and CLIP pixels.

Ports the image handling of LLMGA: llmga/serve/cli.py (stretch to a max(w, h) square with LANCZOS),
cli-sd15-inpainting.py `read_image` (mask ≥ 125 → hole, holes black at the original resolution) and
cli-sd15-editing.py `crop_image` (centre crop to a square, 512×512 with PIL's default filter). The
pixel values come from `CLIPImageProcessorPil` (transformers 5), which gives the same numbers as the
PIL-based CLIPImageProcessor of transformers 4.41 the original ran.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8_rgb(image) -> np.ndarray:
    """H×W×3 uint8 from a PIL image or an H×W×3 (or 1×H×W×3) float tensor/array in 0..1."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        array = image.detach().to("cpu", torch.float32).numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"image must be a PIL image or an H×W×3 float tensor in 0..1, not {type(image).__name__}.")
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image must be H×W×3 (got shape {tuple(array.shape)}); pass one image, channels last.")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    # round, not truncate: a float image made from uint8 (k/255) comes back as exactly k
    return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_hole_mask(mask, size_hw: tuple[int, int]) -> np.ndarray:
    """H×W uint8 0/1 hole mask (1 = region to generate) from a PIL image or an H×W float tensor in 0..1,
    thresholded as the original thresholds its mask file: value ≥ 125 of 255 is a hole."""
    if isinstance(mask, Image.Image):
        values = np.array(mask.convert("L"))
    else:
        array = mask.detach().to("cpu", torch.float32).numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 2:
            raise ValueError(f"mask must be H×W (got shape {tuple(array.shape)}); pass one single-channel mask.")
        values = array if array.dtype == np.uint8 else np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255)
    if tuple(values.shape) != tuple(size_hw):
        raise ValueError(f"The mask is {values.shape[1]}×{values.shape[0]} but the image is {size_hw[1]}×{size_hw[0]}; "
                         "give a mask of the image's size.")
    return (values >= 125).astype(np.uint8)


def masked_image(rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """image × (1 − mask) at the original resolution: holes become black."""
    return (rgb * (1 - hole)[:, :, None]).astype(np.uint8)


def stretch_to_square(image: Image.Image) -> Image.Image:
    """The CLIs' resize to (S, S), S = max(w, h), with Image.ANTIALIAS (= LANCZOS): a stretch, not a pad."""
    side = max(image.width, image.height)
    return image.resize((side, side), Image.LANCZOS)


def editing_crop(rgb: np.ndarray) -> Image.Image:
    """cli-sd15-editing.py crop_image (centre crop to a square, 512×512 with PIL's default filter): the one
    picture the original shows the MLLM and edits, so the editing library's preparation is used as it is."""
    from ..editing import prepare_image

    prepared = prepare_image(rgb).image.numpy()
    return Image.fromarray(np.rint(prepared * 255).astype(np.uint8))


def fingerprint(*arrays: np.ndarray | None) -> str:
    """A short content hash identifying an image (and its mask) across calls."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


class ClipPixels:
    """CLIP pixel values exactly as the original's CLIPImageProcessor (PIL) computed them."""

    def __init__(self, vision_folder: Path, preprocessor: dict | None = None):
        """From the folder's preprocessor_config.json, or from `preprocessor` (that file's contents) for a
        tower that came as a single weight file."""
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as processor_class
        except ImportError:  # transformers 4: CLIPImageProcessor is the PIL implementation the original used
            from transformers import CLIPImageProcessor as processor_class

        if preprocessor is not None:
            self.processor = processor_class.from_dict(dict(preprocessor))
            return
        config = Path(vision_folder) / "preprocessor_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing; the vision tower folder must be the complete "
                                    "openai/clip-vit-large-patch14-336 download.")
        self.processor = processor_class.from_pretrained(str(vision_folder), local_files_only=True)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """1×3×336×336 float32."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"].to(torch.float32)
