"""What a flow network may predict, and the exact conversions between the predictions.

On x_t = α_t·x0 + σ_t·ε the three targets are the velocity v = α'_t·x0 + σ'_t·ε, the noise ε and
the score ∇log p_t(x_t) = -E[ε | x_t]/σ_t. With D = α_t·σ'_t - σ_t·α'_t (> 0 on every path here):
    ε = (α_t·v - α'_t·x_t) / D,    v = (α'_t·x_t + D·ε) / α_t,    score = -ε / σ_t.
They hold pointwise for any x_t, so they convert model outputs as well as exact fields.
`t` is a Python float, a 0-d tensor, an (N,) tensor of times, or a time map (N, 1, H, W) with a time
per position (dual-time training, dts/).
"""

import torch
from torch import Tensor

from transport.paths import Path

PREDICTIONS = ("velocity", "noise", "score")


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor:
    """t as a tensor that broadcasts against `like` (N, C, H, W), in like's working dtype.
    A Python float becomes a 0-d CPU float64 tensor: it mixes with tensors on any device, no copy."""
    if not isinstance(t, Tensor):
        return torch.tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        return t
    dtype = torch.promote_types(like.dtype, torch.float32)
    if t.ndim == like.ndim and t.shape[0] == like.shape[0] and t.shape[1] == 1 and t.shape[2:] == like.shape[2:]:
        return t.to(dtype)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t {tuple(t.shape)} must be 0-d, ({like.shape[0]},) or a map "
                         f"({like.shape[0]}, 1, {', '.join(map(str, like.shape[2:]))}) for x {tuple(like.shape)}")
    return t.to(dtype).view(-1, *[1] * (like.ndim - 1))


def _coefficients(path: Path, t: Tensor | float, like: Tensor):
    t = broadcast_time(t, like)
    alpha, sigma = path.alpha_sigma(t)
    d_alpha, d_sigma = path.alpha_sigma_derivatives(t)
    return alpha, sigma, d_alpha, d_sigma, alpha * d_sigma - sigma * d_alpha


def velocity_to_noise(velocity: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """ε = (α·v - α'·x_t) / D."""
    alpha, _, d_alpha, _, det = _coefficients(path, t, x_t)
    return (alpha * velocity - d_alpha * x_t) / det


def noise_to_velocity(noise: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """v = (α'·x_t + D·ε) / α (undefined where α = 0: t = 1 on the linear and cosine paths)."""
    alpha, _, d_alpha, _, det = _coefficients(path, t, x_t)
    return (d_alpha * x_t + det * noise) / alpha


def noise_to_score(noise: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """score = -ε / σ (undefined at t = 0)."""
    _, sigma = path.alpha_sigma(broadcast_time(t, x_t))
    return -noise / sigma


def score_to_noise(score: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """ε = -σ·score."""
    _, sigma = path.alpha_sigma(broadcast_time(t, x_t))
    return -sigma * score


def velocity_to_score(velocity: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """score = -(α·v - α'·x_t) / (σ·D)."""
    return noise_to_score(velocity_to_noise(velocity, x_t, t, path), x_t, t, path)


def score_to_velocity(score: Tensor, x_t: Tensor, t: Tensor | float, path: Path) -> Tensor:
    """v = (α'·x_t - D·σ·score) / α."""
    return noise_to_velocity(score_to_noise(score, x_t, t, path), x_t, t, path)


def to_velocity(output: Tensor, x_t: Tensor, t: Tensor | float, path: Path, prediction: str) -> Tensor:
    """The velocity implied by a network output of kind `prediction`."""
    if prediction == "velocity":
        return output
    if prediction == "noise":
        return noise_to_velocity(output, x_t, t, path)
    if prediction == "score":
        return score_to_velocity(output, x_t, t, path)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
