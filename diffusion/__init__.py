"""Denoising diffusion (DDPM) for DiT: the Gaussian diffusion, respacing, samplers and its `Objective`."""

from diffusion.ddpm import DDPMObjective
from diffusion.gaussian import GaussianDiffusion, linear_beta_schedule
from diffusion.respace import respace, space_timesteps
from diffusion.samplers import ddim_sample, ddpm_sample

__all__ = [
    "DDPMObjective",
    "GaussianDiffusion",
    "ddim_sample",
    "ddpm_sample",
    "linear_beta_schedule",
    "respace",
    "space_timesteps",
]
