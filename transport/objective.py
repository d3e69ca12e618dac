"""FlowObjective: SiT's interpolant objective behind the shared `Objective` interface."""

from typing import Any

import torch
from torch import Tensor

from objectives.interface import ModelFn, Objective, SamplerGenerator
from transport.paths import make_path
from transport.predictions import PREDICTIONS, broadcast_time
from transport.samplers import SDE_LAST_STEP_TIME, ode_sample, sde_sample

TIME_SAMPLINGS = ("uniform", "lognormal")
LOGNORMAL_MEAN = 0.0  # log(σ_t/α_t) ~ N(0, 1): REPA/SRA's "lognormal" time weighting (SPEC §2)
LOGNORMAL_STD = 1.0
# Distance kept from the ends where a prediction is singular (SiT's create_transport defaults):
TRAIN_EPS = 1e-3  # noise/score predictions on linear/cosine: σ = 0 at t = 0, α = 0 at t = 1
TRAIN_EPS_VP = 1e-5  # VP: σ'_t is infinite at t = 0
SAMPLE_EPS = 1e-3  # samplers start at 1 - SAMPLE_EPS where the prediction is singular at t = 1
SAMPLING_STEPS = 250  # SDE with 250 steps, the SRA paper's FID setting (SPEC §5)


class FlowObjective(Objective):
    """Continuous t in [0, 1] (0 = data), x_t = α_t·x0 + σ_t·ε on a path; the network predicts the
    velocity (default), the noise or the score. Samplers "sde" (default), "euler", "heun".

    path: "linear" | "cosine" | "vp"; prediction: "velocity" | "noise" | "score";
    time_sampling: "uniform" (t ~ U) or "lognormal" (σ_t/α_t = exp(N(0, 1))).
    Training times lie in [t_low, t_high]: [0, 1], except where the prediction is singular (see
    TRAIN_EPS); sampling starts at t = 1 (1 - SAMPLE_EPS for noise/score on linear/cosine).
    """

    name = "flow"
    discrete_steps = None
    sampler_methods = ("sde", "euler", "heun")
    default_method = "sde"
    default_num_steps = SAMPLING_STEPS
    sampler_options = {"sde": {"last_step_time": SDE_LAST_STEP_TIME}, "euler": {}, "heun": {}}

    def __init__(self, path: str = "linear", prediction: str = "velocity", time_sampling: str = "uniform"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; expected one of {TIME_SAMPLINGS}")
        self.path_name = path
        self.path = make_path(path)
        self.prediction = prediction
        self.time_sampling = time_sampling
        singular_at_noise = prediction != "velocity" and path != "vp"
        if path == "vp":
            self.t_low, self.t_high = TRAIN_EPS_VP, 1.0
        elif prediction != "velocity":
            self.t_low, self.t_high = TRAIN_EPS, 1.0 - TRAIN_EPS
        else:
            self.t_low, self.t_high = 0.0, 1.0
        self.sample_start = 1.0 - SAMPLE_EPS if singular_at_noise else 1.0

    def options(self) -> dict[str, Any]:
        return {"path": self.path_name, "prediction": self.prediction, "time_sampling": self.time_sampling}

    def sample_time(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Training times, float32 (n,), in [t_low, t_high]: uniform, or log-normal in σ_t/α_t."""
        if self.time_sampling == "uniform":
            u = torch.rand(n, device=device, generator=generator)
            return self.t_low + (self.t_high - self.t_low) * u
        log_ratio = LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(n, device=device, generator=generator)
        return self.path.time_from_noise_ratio(log_ratio.exp()).clamp(self.t_low, self.t_high)

    def shift_time(self, t: Tensor, delta: Tensor) -> Tensor:
        """Teacher time max(t - Δ, t_low) (t_low = 0 except where the prediction is singular there)."""
        if t.shape != delta.shape:
            raise ValueError(f"t {tuple(t.shape)} and delta {tuple(delta.shape)} must have the same shape")
        return (t - delta).clamp(min=self.t_low)

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = α_t·x0 + σ_t·eps, in x0's dtype."""
        alpha, sigma = self.path.alpha_sigma(broadcast_time(t, x0))
        return (alpha * x0 + sigma * eps).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """velocity: α'_t·x0 + σ'_t·eps (linear: eps - x0); noise: eps; score: -eps/σ_t."""
        if self.prediction == "noise":
            return eps
        t = broadcast_time(t, x0)
        if self.prediction == "score":
            return -eps / self.path.alpha_sigma(t)[1]
        d_alpha, d_sigma = self.path.alpha_sigma_derivatives(t)
        return d_alpha * x0 + d_sigma * eps

    def model_time(self, t: Tensor) -> Tensor:
        """SiT receives t in [0, 1] unscaled (SPEC §1)."""
        return t

    def loss(self, model_output: Tensor, x0: Tensor, eps: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """Mean over elements of (out - target)² per sample, (N,), on the first C output channels.
        Score prediction is weighted by σ_t² as in SiT, i.e. mean((σ_t·out + eps)²): the plain error
        of a -eps/σ_t target diverges as t -> 0."""
        channels = x0.shape[1]
        if model_output.shape[1] < channels or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit x0 {tuple(x0.shape)}")
        output = model_output[:, :channels]
        if self.prediction == "score":
            sigma = self.path.alpha_sigma(broadcast_time(t, x0))[1]
            error = sigma * output + eps
        else:
            error = output - self.target(x0, eps, t)
        return error.pow(2).mean(dim=(1, 2, 3))

    def _sample(self, model_fn: ModelFn, z: Tensor, method: str, num_steps: int,
                generator: SamplerGenerator, options: dict[str, Any]) -> Tensor:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if method == "sde":
            return sde_sample(model_fn, z, self.path, self.prediction, num_steps, t_start=self.sample_start,
                              last_step_time=options["last_step_time"], generator=generator)
        return ode_sample(model_fn, z, self.path, self.prediction, num_steps, t_start=self.sample_start,
                          heun=method == "heun")
