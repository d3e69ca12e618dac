"""Decoded images in [-1, 1] -> uint8 NHWC, the way the public sampling scripts round them."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import UserError

# The two conventions differ by half a grey level: compare FIDs computed with the same one.
ROUNDINGS = {
    "nearest": "DiT/SiT sample_ddp.py: clamp(127.5·x + 128, 0, 255) truncated, i.e. 127.5·(x + 1) rounded",
    "floor": "REPA/SRA generate.py: clamp(255·(x + 1)/2, 0, 255) truncated",
}


def to_uint8(images: torch.Tensor, rounding: str) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 numpy, on the host."""
    if rounding == "nearest":
        scaled = 127.5 * images + 128.0
    elif rounding == "floor":
        scaled = 255.0 * (images + 1.0) / 2.0
    else:
        raise UserError(f"unknown rounding {rounding!r}; expected one of {sorted(ROUNDINGS)}")
    # Casting a float in [0, 255] to uint8 truncates it, as both releases do.
    pixels = scaled.clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def save_pngs(images: np.ndarray, start: int, folder: Path) -> None:
    """Write images (N, H, W, 3) uint8 as folder/{index}.png for the indices start, start + 1, ..."""
    for offset, image in enumerate(images):
        Image.fromarray(image).save(folder / png_name(start + offset))
