"""TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False), the resize inside the ADM graph.

Output pixel i samples the input at i * (in_size / out_size), with no half-pixel shift; this is not
`torch.nn.functional.interpolate(mode="bilinear")`, which samples at (i + 0.5) * scale - 0.5.
Arithmetic follows TF's kernel in float32: the scale and source coordinates are float32, the
horizontal lerp comes first, then the vertical one, each as `a + (b - a) * t`.
"""

import numpy as np
import torch


def source_coordinates(in_size, out_size, device):
    """Lower and upper source indices and the lerp weight of each output position along one axis."""
    scale = torch.tensor(np.float32(in_size) / np.float32(out_size), dtype=torch.float32, device=device)
    position = torch.arange(out_size, dtype=torch.float32, device=device) * scale  # (out,)
    lower = position.floor()
    upper = torch.minimum(position.ceil(), torch.tensor(in_size - 1.0, device=device))
    return lower.long(), upper.long(), position - lower


def resize_bilinear_tf1(images, size):
    """(N, C, H, W) float32 -> (N, C, size, size), as TF1 `tf.image.resize_bilinear`."""
    height, width = images.shape[-2:]
    top, bottom, y_lerp = source_coordinates(height, size, images.device)
    left, right, x_lerp = source_coordinates(width, size, images.device)
    top_rows, bottom_rows = images[..., top, :], images[..., bottom, :]  # (N, C, size, W) each
    top_row = top_rows[..., left] + (top_rows[..., right] - top_rows[..., left]) * x_lerp
    bottom_row = bottom_rows[..., left] + (bottom_rows[..., right] - bottom_rows[..., left]) * x_lerp
    return top_row + (bottom_row - top_row) * y_lerp[:, None]  # (N, C, size, size)
