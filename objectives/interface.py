"""The objective interface shared by DDPM (DiT, diffusion/) and flow matching (SiT, transport/).

Training and representation guidance are written once against `Objective`: sample a time, build the
noisy input, compare the network output with the target, and convert or shift times (a guidance
method may ask for the same x0 and ε at a lower noise level). Sampling goes through
`Objective.sample` with a `model_fn(x, t_model, t_frac)`. Nothing here knows about alignment.
"""

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, float], Tensor]
"""model_fn(x, t_model, t_frac) -> output. x: the sampler's state (N, C, H, W); t_model: (N,) times in
the network's units; t_frac: the noise level of this step in [0, 1], for the CFG guidance interval."""

SamplerGenerator = torch.Generator | Sequence[torch.Generator] | None
"""The source of a stochastic sampler's noise: the global RNG (None), one generator for the batch,
or one generator per sample, so that a sample's noise does not depend on the batch it is in."""


class Objective(abc.ABC):
    """What training, guidance and sampling need from a generative objective. Times are (N,) tensors
    in the objective's own units: float in [0, 1] for flow (0 = data), int64 steps in [0, T-1] for
    DDPM; `discrete_steps` says which (T, or None for continuous time)."""

    name: str
    discrete_steps: int | None
    sampler_methods: tuple[str, ...]
    default_method: str
    default_num_steps: int
    sampler_options: Mapping[str, Mapping[str, Any]]
    """Per sampler method: the keyword options `sample` accepts, with their defaults."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this objective: type(self)(**options()). Checkpoints
        record them with `name`, so sampling uses exactly the objective a model was trained with."""

    @abc.abstractmethod
    def sample_time(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Training times for n samples, shape (n,), drawn on `device` (a generator must live there)."""

    @abc.abstractmethod
    def shift_time(self, t: Tensor, delta: Tensor) -> Tensor:
        """t − Δ (a lower noise level) kept inside the time range: flow max(t-Δ, t_low); DDPM
        clamp(t-Δ, min_step, T-1), min_step a constructor option (default 0)."""

    @abc.abstractmethod
    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t for clean x0 and noise eps at times t (N,); same dtype as x0. Calling it again with the
        same x0 and eps at another time gives the same sample at that noise level."""

    @abc.abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network output at x_t = noisy(x0, eps, t)."""

    @abc.abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """What the network receives as its time input (flow: t as float; DDPM: the integer step)."""

    @abc.abstractmethod
    def loss(self, model_output: Tensor, x0: Tensor, eps: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """Per-sample generative loss, shape (N,). Flow: mean over elements of (out - target)^2.
        DDPM: eps-MSE (mean over C,H,W of the first C output channels) + VB term for the learned
        variance (output channels C:2C, mean output detached), exactly DiT's default loss
        (loss_type MSE with learn_sigma: vb in bits per dim, mean over dims, NOT rescaled by T/1000,
        discretized Gaussian decoder NLL at t == 0). Without learned sigma: MSE only."""

    def sample(self, model_fn: ModelFn, z: Tensor, *, method: str | None = None,
               num_steps: int | None = None, generator: SamplerGenerator = None,
               **method_options) -> Tensor:
        """Run a sampler from noise z (N, C, H, W) to data; returns float32 x0.

        method: one of `sampler_methods` (default `default_method`); num_steps: sampling steps
        (default `default_num_steps`); generator: for the sampler's noise, on z's device: one
        generator, or a sequence of N (one per sample; EDM2's seeding, batch-size independent);
        method_options: the options of `sampler_options[method]`, defaults filled in.
        """
        method = self.default_method if method is None else method
        if method not in self.sampler_methods:
            raise ValueError(f"unknown {self.name} sampler {method!r}; expected {self.sampler_methods}")
        accepted = self.sampler_options[method]
        unknown = sorted(set(method_options) - set(accepted))
        if unknown:
            raise ValueError(f"sampler {method!r} does not take option(s) {unknown}; "
                             f"it takes {sorted(accepted) or 'none'}")
        if z.ndim != 4 or not z.is_floating_point():
            raise ValueError(f"z must be a float (N, C, H, W) tensor, got {tuple(z.shape)} {z.dtype}")
        if not (generator is None or isinstance(generator, torch.Generator)) and len(generator) != len(z):
            raise ValueError(f"got {len(generator)} per-sample generators for {len(z)} samples")
        num_steps = self.default_num_steps if num_steps is None else num_steps
        return self._sample(model_fn, z, method, num_steps, generator, {**accepted, **method_options})

    @abc.abstractmethod
    def _sample(self, model_fn: ModelFn, z: Tensor, method: str, num_steps, generator,
                options: dict[str, Any]) -> Tensor:
        """The sampler itself, called by `sample` with checked arguments and all options filled in."""


def standard_normal(like: Tensor, generator: SamplerGenerator) -> Tensor:
    """N(0, I) noise of like's shape, dtype and device, from `generator` (see SamplerGenerator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.stack([torch.randn(like.shape[1:], generator=sample_generator, device=like.device,
                                    dtype=like.dtype) for sample_generator in generator])
