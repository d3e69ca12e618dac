"""The teacher's time: t_T = t − Δ, with Δ drawn per sample (SPEC §3 step 1)."""
import math

import torch
from torch import Tensor

from errors import UserError

INTERVALS = ("dynamic", "fixed")  # Δ ~ U(0, t_max), or Δ = t_max (the paper's two variants)


def max_delta_steps(discrete_steps: int, t_max: float) -> int:
    """⌊T·t_max⌋ for integer-step objectives; the rounding guards against 1000·0.29 = 289.99…"""
    return math.floor(round(discrete_steps * t_max, 9))


def check_interval(t_max: float, interval: str, discrete_steps: int | None) -> None:
    """A dynamic Δ over integer steps needs at least one step to draw from."""
    if interval == "dynamic" and discrete_steps is not None and max_delta_steps(discrete_steps, t_max) == 0:
        raise UserError(f"--t-max {t_max} leaves no step to draw Δ from: the objective has "
                        f"{discrete_steps} steps, so t_max must be at least {1 / discrete_steps:g}")


def draw_delta(objective, n: int, t_max: float, fixed: bool, device, generator=None) -> Tensor:
    """Δ in the objective's time units, (n,).

    Continuous time: Δ ~ U(0, t_max), float32 (fixed: t_max). Integer steps (T = objective.discrete_steps):
    Δ ~ randint(0, ⌊T·t_max⌋), int64, the upper bound excluded as in the release (fixed: ⌊T·t_max⌋)."""
    steps = objective.discrete_steps
    if steps is None:
        if fixed:
            return torch.full((n,), t_max, device=device)
        return t_max * torch.rand(n, device=device, generator=generator)
    max_delta = max_delta_steps(steps, t_max)
    if fixed:
        return torch.full((n,), max_delta, device=device, dtype=torch.long)
    check_interval(t_max, "dynamic", steps)
    return torch.randint(0, max_delta, (n,), device=device, generator=generator)
