"""Interpolation paths x_t = α_t·x0 + σ_t·ε between data (t = 0) and noise (t = 1).

The convention is SRA's release (SPEC §2): t = 0 is data, t = 1 is noise. Each path gives α_t, σ_t,
their time derivatives, and the inverse of the noise-to-signal ratio σ_t/α_t (for log-normal time
sampling). Times are tensors broadcastable against the data: (N, 1, 1, 1), or 0-d (a CPU float64
scalar in the samplers, which combines with tensors on any device without a copy).
"""

import abc
import math

import torch
from torch import Tensor

VP_BETA_MIN = 0.1  # VP SDE of Song et al. 2021, as SiT's VPCPlan (sigma_min)
VP_BETA_MAX = 20.0  # (SiT's sigma_max)


class Path(abc.ABC):
    """α_t, σ_t and their derivatives; α_0 = 1, σ_0 = 0 (data) and σ grows with t."""

    name: str

    @abc.abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t)."""

    @abc.abstractmethod
    def alpha_sigma_derivatives(self, t: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(dα_t/dt, dσ_t/dt)."""

    @abc.abstractmethod
    def time_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        """The t at which σ_t/α_t = ratio (ratio >= 0)."""


class LinearPath(Path):
    """α_t = 1 - t, σ_t = t (rectified flow; SiT's and SRA's default)."""

    name = "linear"

    def alpha_sigma(self, t):
        return 1.0 - t, t

    def alpha_sigma_derivatives(self, t):
        return -1.0, 1.0

    def time_from_noise_ratio(self, ratio):
        return ratio / (1.0 + ratio)


class CosinePath(Path):
    """α_t = cos(πt/2), σ_t = sin(πt/2) (SiT's GVP path)."""

    name = "cosine"

    def alpha_sigma(self, t):
        angle = 0.5 * math.pi * t
        return torch.cos(angle), torch.sin(angle)

    def alpha_sigma_derivatives(self, t):
        angle = 0.5 * math.pi * t
        return -0.5 * math.pi * torch.sin(angle), 0.5 * math.pi * torch.cos(angle)

    def time_from_noise_ratio(self, ratio):
        return torch.atan(ratio) * (2.0 / math.pi)


class VPPath(Path):
    """Variance preserving: log α_t = -¼t²(β_max - β_min) - ½t·β_min, σ_t = √(1 - α_t²)
    (SiT's VPCPlan with its time reversed into this convention). α_1 ≈ 0.0066, not 0."""

    name = "vp"

    def __init__(self, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t):
        log_alpha = self._log_alpha(t)
        # -expm1 keeps σ accurate near t = 0, where 1 - α² cancels.
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))

    def alpha_sigma_derivatives(self, t):
        alpha, sigma = self.alpha_sigma(t)
        d_alpha = -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * alpha
        return d_alpha, -alpha * d_alpha / sigma

    def time_from_noise_ratio(self, ratio):
        # Solve ¼(β_max - β_min)t² + ½β_min·t + log α = 0 for the α = 1/√(1 + ratio²).
        log_alpha = -0.5 * torch.log1p(ratio**2)
        half_range = 0.5 * (self.beta_max - self.beta_min)
        root = torch.sqrt(0.25 * self.beta_min**2 - 2.0 * half_range * log_alpha)
        return (root - 0.5 * self.beta_min) / half_range


PATHS = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}


def make_path(name: str) -> Path:
    """The path called `name`: "linear", "cosine" or "vp"."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {list(PATHS)}")
    return PATHS[name]()
