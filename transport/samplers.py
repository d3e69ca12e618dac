"""ODE (Euler, Heun) and SDE (Euler–Maruyama) samplers from noise (t = 1) to data (t = 0).

As in the public SiT/REPA/SRA samplers, the state is float64 between steps and each model output is
converted to float64; the model itself runs in its own dtype (the caller's model_fn casts). The time
grid is a list of Python floats made before the loop, so no step waits on the device.
"""

import math

import torch
from torch import Tensor

from objectives.interface import ModelFn, SamplerGenerator, standard_normal
from transport.paths import Path
from transport.predictions import to_velocity, velocity_to_score

SDE_LAST_STEP_TIME = 0.04  # the SDE runs stochastically down to t = 0.04, then one mean step to 0 (SPEC §5)


def sde_diffusion(path: Path, t: float) -> float:
    """Squared diffusion g²(t) = 2·σ_t of the reverse SDE: SiT's default "sigma" diffusion form
    (norm 1); on the linear path g² = 2t, the `compute_diffusion` of REPA/SRA's sampler (SPEC §5)."""
    _, sigma = path.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return 2.0 * float(sigma)


def _velocity(model_fn: ModelFn, x: Tensor, t: float, t_frac: float, path: Path, prediction: str) -> Tensor:
    """The model's velocity at (x, t) in float64; model channels beyond x's (learned sigma) are dropped."""
    t_model = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    output = model_fn(x, t_model, t_frac)[:, : x.shape[1]].to(torch.float64)
    return to_velocity(output, x, t, path, prediction)


def ode_sample(model_fn: ModelFn, z: Tensor, path: Path, prediction: str, num_steps: int,
               t_start: float = 1.0, heun: bool = False) -> Tensor:
    """Integrate dx/dt = v(x, t) over linspace(t_start, 0, num_steps + 1) from x = z.

    Euler: num_steps model calls. Heun: a trapezoidal correction on every step but the last, which
    is an Euler step as in the EDM/REPA sampler of the SRA release (2·num_steps - 1 calls); both
    calls of a Heun step pass that step's t_cur as t_frac, so CFG guides whole steps.
    """
    times = torch.linspace(t_start, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        velocity = _velocity(model_fn, x, t_cur, t_cur, path, prediction)
        x_euler = x + (t_next - t_cur) * velocity
        if heun and i < num_steps - 1:
            velocity_next = _velocity(model_fn, x_euler, t_next, t_cur, path, prediction)
            x = x + (t_next - t_cur) * 0.5 * (velocity + velocity_next)
        else:
            x = x_euler
    return x.float()


def sde_sample(model_fn: ModelFn, z: Tensor, path: Path, prediction: str, num_steps: int,
               t_start: float = 1.0, last_step_time: float = SDE_LAST_STEP_TIME,
               generator: SamplerGenerator = None) -> Tensor:
    """Euler–Maruyama on the reverse SDE dx = [v - ½g²·score] dt + g dW̄ (SPEC §5).

    Times linspace(t_start, last_step_time, num_steps) then 0: num_steps - 1 stochastic steps, then
    one deterministic step (the mean) to 0; num_steps model calls. g² = sde_diffusion(path, t).
    """
    if not 0.0 < last_step_time < t_start:
        raise ValueError(f"last_step_time must lie in (0, {t_start}), got {last_step_time}")
    times = torch.linspace(t_start, last_step_time, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        velocity = _velocity(model_fn, x, t_cur, t_cur, path, prediction)
        diffusion = sde_diffusion(path, t_cur)
        drift = velocity - 0.5 * diffusion * velocity_to_score(velocity, x, t_cur, path)
        x = x + (t_next - t_cur) * drift
        if i < num_steps - 1:
            x = x + math.sqrt(diffusion * (t_cur - t_next)) * standard_normal(x, generator)
    return x.float()
