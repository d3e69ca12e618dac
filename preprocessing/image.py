"""Reading one image file and the ADM center crop (SPEC §4: "ADM center-crop preprocessing")."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# File types the scanner picks up (compared lower-case; ImageNet ships `.JPEG`).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"})


def load_rgb(path: str | Path) -> Image.Image:
    """Decode the whole file (so truncation raises here, not later) and convert to RGB.

    Grayscale, palette and CMYK images go through PIL's conversion; an alpha channel is dropped,
    as ADM's loader does (`pil_image.convert("RGB")`), so the pixels match the reference pipeline.
    """
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def center_crop_adm(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM center crop (guided-diffusion `center_crop_arr`), returns (resolution, resolution, 3) uint8.

    1. Halve with a box filter while the short side is at least twice the target (cheap anti-aliasing).
    2. Bicubic resize so the short side equals the target (long side rounded with Python's `round`).
    3. Cut the centered square; the extra pixel of an odd margin goes to the right / bottom.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.array(image)  # (H, W, 3)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return pixels[top : top + resolution, left : left + resolution]


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the input range of the SD VAE and of pixel-space models."""
    return pixels.float() / 127.5 - 1.0
