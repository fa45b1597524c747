"""The image and mask helpers of the CLI: crop, resize, masks between latent and image size."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import IMAGE_SIZE
from .unet import _shape


def mask_to_image(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A latent-size mask shown at image size: float H×W in {0, 1}, each latent pixel a block
    (nearest; the original saves its 64×64 mask as it is)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be h×w, not {_shape(mask)}.")
    return F.interpolate(mask.float()[None, None], size=(int(height), int(width)), mode="nearest")[0, 0]


def mask_from_image(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image-size mask (H×W, values in 0..1, 1 = edit) brought to latent size h×w: the mean of
    each latent pixel's area, kept where it is ≥ 0.5 (the original's binarization). A mask from
    mask_to_image comes back unchanged."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be H×W, not {_shape(mask)}.")
    area = F.interpolate(mask.float()[None, None], size=(int(height), int(width)), mode="area")[0, 0]
    return area >= 0.5


class PreparedImage(NamedTuple):
    image: torch.Tensor  # size×size×3 float in 0..1 (k/255)
    cropped: bool  # the input was not square and lost its edges
    original_size: tuple  # (height, width) of the input

    @property
    def note(self) -> Optional[str]:
        """What the preparation did to the picture, in plain words (None when it was already size×size)."""
        h, w = self.original_size
        size = self.image.shape[0]
        if self.cropped:
            return (f"the {w}×{h} image was centre-cropped to a square and resized to {size}×{size}, as the "
                    "original does")
        if (h, w) != (size, size):
            return f"the image was resized to {size}×{size}, as the original does"
        return None


def prepare_image(image, size: int = IMAGE_SIZE) -> PreparedImage:
    """The CLI's crop_image: centre crop to a square (offset (long − short)//2), then PIL resize to
    size×size (bicubic, Pillow's default). image: a PIL image, or H×W×3 uint8 or float in 0..1
    (numpy or torch). The original feeds this one image to the MLLM and to SD."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image must be H×W×3, not {'×'.join(map(str, array.shape))}.")
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        pixels = array
    h, w = pixels.shape[:2]
    if h < w:
        offset = (w - h) // 2
        pixels = pixels[:, offset:offset + h]
    elif w < h:
        offset = (h - w) // 2
        pixels = pixels[offset:offset + w]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.Resampling.BICUBIC))
    return PreparedImage(torch.from_numpy(resized.astype(np.float32) / 255.0), h != w, (h, w))
