"""DDPM ancestral sampling and DDIM over a (possibly respaced) GaussianDiffusion.

The state stays in float32 as in DiT's sampler (float64 if z is float64, for exact tests). The model
sees the ORIGINAL step of each index (DiT's respacing wrapper maps it); the time grid is a list of
Python ints made before the loop, so no step waits on the device.
"""

import math

import torch
from torch import Tensor

from diffusion.gaussian import GaussianDiffusion, working_dtype
from objectives.interface import ModelFn, SamplerGenerator, standard_normal


def _steps(diffusion: GaussianDiffusion) -> list[tuple[int, int]]:
    """(index, original step) pairs from the noisiest to the cleanest."""
    return list(reversed(list(enumerate(diffusion.timestep_map.tolist()))))


def _model_output(model_fn: ModelFn, diffusion: GaussianDiffusion, x: Tensor, step: int) -> Tensor:
    t_model = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
    return model_fn(x, t_model, step / diffusion.original_num_timesteps).to(x.dtype)


def ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, z: Tensor,
                generator: SamplerGenerator = None) -> Tensor:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) from x_T = z; the last step returns the mean."""
    x = z.to(working_dtype(z))
    for index, step in _steps(diffusion):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        x, log_variance, _ = diffusion.p_mean_variance(_model_output(model_fn, diffusion, x, step), x, t)
        if index > 0:
            x = x + torch.exp(0.5 * log_variance) * standard_normal(x, generator)
    return x.float()


def ddim_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, z: Tensor, eta: float = 0.0,
                generator: SamplerGenerator = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) from x_T = z; eta = 0 is deterministic, eta = 1 is DDPM-like.

    x_{t-1} = √ᾱ_{t-1}·x̂0 + √(1 - ᾱ_{t-1} - σ_t²)·ε̂ + σ_t·noise,
    σ_t = eta·√((1 - ᾱ_{t-1}) / (1 - ᾱ_t))·√(1 - ᾱ_t / ᾱ_{t-1}).
    """
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    x = z.to(working_dtype(z))
    alphas_cumprod = diffusion.alphas_cumprod.values.tolist()
    alphas_cumprod_prev = diffusion.alphas_cumprod_prev.values.tolist()
    for index, step in _steps(diffusion):
        eps, _ = diffusion.split_output(_model_output(model_fn, diffusion, x, step), x)
        alpha_bar, alpha_bar_prev = alphas_cumprod[index], alphas_cumprod_prev[index]
        pred_x0 = (x - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
                                * (1.0 - alpha_bar / alpha_bar_prev))
        x = math.sqrt(alpha_bar_prev) * pred_x0 + math.sqrt(1.0 - alpha_bar_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * standard_normal(x, generator)
    return x.float()
