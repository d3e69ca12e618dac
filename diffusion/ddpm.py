"""DDPMObjective: DiT's denoising objective behind the shared `Objective` interface."""

from typing import Any

import torch
from torch import Tensor

from diffusion.gaussian import GaussianDiffusion, linear_beta_schedule
from diffusion.respace import respace, space_timesteps
from diffusion.samplers import ddim_sample, ddpm_sample
from objectives.interface import ModelFn, Objective, SamplerGenerator

NUM_TIMESTEPS = 1000  # DiT / SPEC §2
SAMPLING_STEPS = 250  # DiT's FID setting: 250 respaced DDPM steps (SPEC §5)
BETA_SCHEDULES = {"linear": linear_beta_schedule}


class DDPMObjective(Objective):
    """Integer steps t in [0, T-1], x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, the network predicts ε (and the
    variance range when learn_sigma), trained with DiT's loss; samplers "ddpm" and "ddim".

    num_timesteps: T; beta_schedule: "linear" (1e-4 to 0.02); learn_sigma: the model outputs 2C
    channels, the last C the learned variance range.
    """

    name = "ddpm"
    sampler_methods = ("ddpm", "ddim")
    default_method = "ddpm"
    default_num_steps = SAMPLING_STEPS
    sampler_options = {"ddpm": {}, "ddim": {"eta": 0.0}}

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, beta_schedule: str = "linear",
                 learn_sigma: bool = True):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected {list(BETA_SCHEDULES)}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        self.num_timesteps = self.discrete_steps = num_timesteps
        self.beta_schedule = beta_schedule
        self.diffusion = GaussianDiffusion(BETA_SCHEDULES[beta_schedule](num_timesteps), learn_sigma)
        self._respaced: dict[tuple[int, ...], GaussianDiffusion] = {}

    def options(self) -> dict[str, Any]:
        return {"num_timesteps": self.num_timesteps, "beta_schedule": self.beta_schedule,
                "learn_sigma": self.diffusion.learn_sigma}

    def sample_time(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer steps in [0, T-1], int64 (n,)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def shift_time(self, t: Tensor, delta: Tensor) -> Tensor:
        """clamp(t - Δ, 0, T-1): never noisier than t, equal only at the clamp (the paper's "truncate to 0")."""
        if t.shape != delta.shape:
            raise ValueError(f"t {tuple(t.shape)} and delta {tuple(delta.shape)} must have the same shape")
        return (t - delta).clamp(0, self.num_timesteps - 1)

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·eps, in x0's dtype."""
        return self.diffusion.q_sample(x0, t, eps)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The network predicts the noise: the target is eps."""
        return eps

    def model_time(self, t: Tensor) -> Tensor:
        """DiT receives the integer step itself."""
        return t

    def loss(self, model_output: Tensor, x0: Tensor, eps: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """DiT's loss per sample, (N,): eps-MSE + the VB term of the learned variance in bits per dim
        (mean output detached, not rescaled by T/1000, decoder NLL at t == 0); MSE only without
        learned sigma. See GaussianDiffusion.training_loss."""
        return self.diffusion.training_loss(model_output, x0, eps, t, x_t)

    def respaced(self, num_steps: int | str) -> GaussianDiffusion:
        """The diffusion over the steps that `space_timesteps(T, num_steps)` keeps (cached)."""
        kept = tuple(space_timesteps(self.num_timesteps, num_steps))
        if kept not in self._respaced:
            self._respaced[kept] = respace(self.diffusion, list(kept))
        return self._respaced[kept]

    def _sample(self, model_fn: ModelFn, z: Tensor, method: str, num_steps: int | str,
                generator: SamplerGenerator, options: dict[str, Any]) -> Tensor:
        """num_steps: an int (evenly spaced steps) or a spacing string ("250", "ddim50", "10,20")."""
        diffusion = self.respaced(num_steps)
        if method == "ddim":
            return ddim_sample(diffusion, model_fn, z, eta=options["eta"], generator=generator)
        return ddpm_sample(diffusion, model_fn, z, generator=generator)
