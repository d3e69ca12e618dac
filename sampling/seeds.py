"""Per-sample randomness: each sample's noise and class label depend on (seed, global index) only.

So the same --seed gives the same images whatever the number of processes or the batch size (the
public DiT/SiT/REPA scripts seed each process instead, so their samples change with the GPU count).
Every random quantity gets its own stream number, so, say, balanced labels leave the noise unchanged.
Each index seeds its own CPU torch.Generator; drawing 256 latents of 4×32×32 this way took 17 ms on a
2-core CPU, little next to 250 model evaluations of the batch (bench/bench_sampling.py prints both).
"""
import numpy as np
import torch

from errors import UserError

NOISE_STREAM = 0  # the initial noise z of sample i
LABEL_STREAM = 1  # the uniform class label of sample i
BALANCED_STREAM = 2  # the one permutation behind --balanced-classes
SAMPLER_STREAM = 3  # the noise a stochastic sampler adds to sample i while it integrates


def derived_seed(seed: int, stream: int, *keys: int) -> int:
    """A 64-bit seed from (seed, stream, *keys) through numpy's SeedSequence hash: nearby seeds and
    indices give unrelated streams, and the value is stable across numpy versions."""
    if seed < 0:
        raise UserError(f"the seed must be >= 0, got {seed}")
    low, high = np.random.SeedSequence([seed, stream, *keys]).generate_state(2, np.uint32)
    return int(low) | int(high) << 32


def index_generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, stream, index))


def initial_noise(seed: int, indices, sample_shape) -> torch.Tensor:
    """z ~ N(0, I) for each global index, (N, *sample_shape) float32 on the CPU."""
    return torch.stack([
        torch.randn(tuple(sample_shape), generator=index_generator(seed, NOISE_STREAM, index))
        for index in indices
    ])


class ClassLabels:
    """Labels by global index: uniform over the classes, or balanced (every class num_samples / K
    times; where K does not divide num_samples the counts differ by at most one)."""

    def __init__(self, seed: int, num_samples: int, num_classes: int, balanced: bool):
        self.seed, self.num_classes = seed, num_classes
        self.balanced_labels = None
        if balanced:
            # A random permutation of 0..N-1 taken modulo K holds each class equally often.
            generator = torch.Generator().manual_seed(derived_seed(seed, BALANCED_STREAM, num_samples))
            self.balanced_labels = torch.randperm(num_samples, generator=generator) % num_classes

    def __call__(self, indices) -> torch.Tensor:
        """(N,) int64 labels of these global indices, on the CPU."""
        if self.balanced_labels is not None:
            return self.balanced_labels[torch.as_tensor(list(indices), dtype=torch.long)]
        return torch.cat([
            torch.randint(self.num_classes, (1,), generator=index_generator(self.seed, LABEL_STREAM, index))
            for index in indices
        ])


def sampler_generators(seed: int, indices, device) -> list[torch.Generator]:
    """One generator per sample, on `device`, for the noise a stochastic sampler (SDE, DDPM, DDIM with
    eta > 0) adds while it integrates: the samplers draw sample i's noise from generator i, so it too
    depends on (seed, index) only. The price: N small randn calls per step instead of one
    (bench/bench_sampling.py samples with these generators, so its images/s include it)."""
    return [torch.Generator(device=device).manual_seed(derived_seed(seed, SAMPLER_STREAM, index))
            for index in indices]
