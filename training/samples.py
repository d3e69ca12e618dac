"""Periodic sample grids from the EMA model, with fixed noise and conditions across the run, and the
random conditions that grids and FID-K sample with."""
import math

import torch
from torchvision.utils import save_image

from conditioning import CLASS
from models import guided_model_fn

GRID_SEED = 0  # the same noise and conditions at every grid, so grids compare across steps


class ConditionDraws:
    """Random conditions for grids and FID-K, (n,) labels or (n, L, D) contexts on the CPU: labels uniform
    over the classes; for text, the context of a caption of a random training sample (its caption of
    epoch 0), as REPA's training script samples its grids with captions of its training batch."""

    def __init__(self, condition, dataset=None):
        if condition.kind != CLASS and dataset is None:
            raise ValueError("text conditions are drawn from a dataset's captions")
        self.condition, self.dataset = condition, dataset

    def __call__(self, n, generator):
        if self.condition.kind == CLASS:
            return torch.randint(0, self.condition.num_classes, (n,), generator=generator)
        indices = torch.randint(0, len(self.dataset), (n,), generator=generator).tolist()
        return self.dataset.get_batch(indices, epochs=[0] * n)[1].float()


def grid_inputs(count, sample_shape, draws, device):
    """(noise (count, C, H, W), conditions) of the grids, the same at every grid of a run."""
    generator = torch.Generator().manual_seed(GRID_SEED)
    z = torch.randn(count, *sample_shape, generator=generator)
    y = draws(count, generator)
    return z.to(device), y.to(device)


@torch.no_grad()
def save_sample_grid(model, objective, decode, z, y, path, num_steps):
    """Sample with the objective's default sampler (no guidance), decode to [-1, 1], save a PNG. path None:
    sample only (a process taking part in a sharded model's forwards)."""
    samples = objective.sample(guided_model_fn(model, y), z, num_steps=num_steps)
    if path is None:
        return
    images = decode(samples).clamp(-1, 1)
    save_image((images + 1) / 2, path, nrow=int(math.ceil(math.sqrt(len(images)))))
