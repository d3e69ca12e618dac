"""Periodic sample grids from the EMA model, with fixed noise and labels across the run."""
import math

import torch
from torchvision.utils import save_image

from models import guided_model_fn

GRID_SEED = 0  # the same noise and labels at every grid, so grids compare across steps


def grid_inputs(count, sample_shape, num_classes, device):
    generator = torch.Generator().manual_seed(GRID_SEED)
    z = torch.randn(count, *sample_shape, generator=generator)
    y = torch.randint(0, num_classes, (count,), generator=generator)
    return z.to(device), y.to(device)


@torch.no_grad()
def save_sample_grid(model, objective, decode, z, y, path, num_steps):
    """Sample with the objective's default sampler (no guidance), decode to [-1, 1], save a PNG."""
    samples = objective.sample(guided_model_fn(model, y), z, num_steps=num_steps)
    images = decode(samples).clamp(-1, 1)
    save_image((images + 1) / 2, path, nrow=int(math.ceil(math.sqrt(len(images)))))
