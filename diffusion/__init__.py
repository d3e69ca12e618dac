"""Denoising diffusion (DDPM) for DiT, and the objective interface shared with transport/ (SiT)."""

from diffusion.ddpm import DDPMObjective
from diffusion.gaussian import GaussianDiffusion, linear_beta_schedule
from diffusion.objective import ModelFn, Objective, SamplerGenerator, create_objective
from diffusion.respace import respace, space_timesteps
from diffusion.samplers import ddim_sample, ddpm_sample

__all__ = [
    "DDPMObjective",
    "GaussianDiffusion",
    "ModelFn",
    "Objective",
    "SamplerGenerator",
    "create_objective",
    "ddim_sample",
    "ddpm_sample",
    "linear_beta_schedule",
    "respace",
    "space_timesteps",
]
