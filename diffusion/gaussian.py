"""Gaussian diffusion (DDPM) with ε-prediction and an optional learned variance range (Improved DDPM).

Schedule tables are computed in float64, as Improved DDPM / DiT do; a gathered coefficient is cast to
the working dtype (float32, or float64 for float64 inputs) only where it meets a tensor. Each table is
copied once to every device it is used on, so training and sampling steps never copy from the host.
"""

import math

import torch
from torch import Tensor

BETA_START = 1e-4  # linear schedule of DDPM (Ho et al. 2020), used by DiT (SPEC §2)
BETA_END = 0.02
REFERENCE_NUM_TIMESTEPS = 1000  # betas scale by 1000 / T for other T (Improved DDPM get_named_beta_schedule)
DATA_BIN_HALF_WIDTH = 1.0 / 255.0  # decoder NLL bins: 8-bit data scaled to [-1, 1] (Improved DDPM)
DATA_EDGE = 0.999  # |x| beyond this is the first/last bin, integrated to ±infinity (Improved DDPM)
MIN_PROBABILITY = 1e-12  # floor before the log in the decoder NLL (Improved DDPM)
GELU_CDF_CUBIC = 0.044715  # tanh approximation of the normal CDF, as Improved DDPM's decoder NLL uses


def linear_beta_schedule(num_timesteps: int) -> Tensor:
    """Betas from 1e-4 to 0.02 in float64, scaled by 1000 / num_timesteps."""
    scale = REFERENCE_NUM_TIMESTEPS / num_timesteps
    return torch.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=torch.float64)


def working_dtype(x: Tensor) -> torch.dtype:
    """The dtype coefficients take when they multiply x: float32 for half types, float64 stays."""
    return torch.promote_types(x.dtype, torch.float32)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Φ(x) that Improved DDPM's decoder NLL is defined with."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + GELU_CDF_CUBIC * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) elementwise, in nats, of a Gaussian integrated over x's 8-bit bin in [-1, 1]."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + DATA_BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - DATA_BIN_HALF_WIDTH))
    log_cdf_plus = cdf_plus.clamp(min=MIN_PROBABILITY).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=MIN_PROBABILITY).log()
    log_cdf_delta = (cdf_plus - cdf_min).clamp(min=MIN_PROBABILITY).log()
    return torch.where(x < -DATA_EDGE, log_cdf_plus,
                       torch.where(x > DATA_EDGE, log_one_minus_cdf_min, log_cdf_delta))


class Coefficient:
    """A float64 per-step table, copied once to each device it is gathered on."""

    def __init__(self, values: Tensor):
        self.values = values  # (T,) float64 on the CPU
        self._copies = {values.device: values}

    def at(self, t: Tensor, like: Tensor) -> Tensor:
        """values[t] shaped (N, 1, ..., 1) to broadcast against `like`, in like's working dtype."""
        copy = self._copies.get(t.device)
        if copy is None:
            copy = self._copies[t.device] = self.values.to(t.device)
        return copy[t].to(working_dtype(like)).view(-1, *[1] * (like.ndim - 1))


class GaussianDiffusion:
    """The DDPM forward process q and the ε-prediction reverse process p of one beta schedule.

    betas: (T,) float64. learn_sigma: the model's channels C:2C interpolate the log variance between
    the posterior's and β_t (Improved DDPM "learned range"); else the variance is fixed to
    [posterior_var_1, β_1, ..., β_{T-1}] ("fixed large", DiT's choice without learned sigma).
    timestep_map: the original step of each index (identity; a respaced diffusion keeps a subset).
    """

    def __init__(self, betas: Tensor, learn_sigma: bool, timestep_map: Tensor | None = None,
                 original_num_timesteps: int | None = None):
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1]")
        betas = betas.to(torch.float64)
        self.num_timesteps = len(betas)
        self.original_num_timesteps = original_num_timesteps or self.num_timesteps
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map
        self.learn_sigma = learn_sigma

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        posterior_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])

        self.betas = Coefficient(betas)
        self.alphas_cumprod = Coefficient(alphas_cumprod)
        self.alphas_cumprod_prev = Coefficient(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = Coefficient(alphas_cumprod.sqrt())
        self.sqrt_one_minus_alphas_cumprod = Coefficient((1.0 - alphas_cumprod).sqrt())
        self.sqrt_recip_alphas_cumprod = Coefficient(alphas_cumprod.rsqrt())
        self.sqrt_recipm1_alphas_cumprod = Coefficient((1.0 / alphas_cumprod - 1.0).sqrt())
        self.posterior_variance = Coefficient(posterior_variance)
        self.posterior_log_variance_clipped = Coefficient(posterior_variance_clipped.log())
        self.posterior_mean_coef_x0 = Coefficient(betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))
        self.posterior_mean_coef_xt = Coefficient((1.0 - alphas_cumprod_prev) * alphas.sqrt()
                                                  / (1.0 - alphas_cumprod))
        self.log_betas = Coefficient(betas.log())
        self.fixed_large_log_variance = Coefficient(torch.cat([posterior_variance[1:2], betas[1:]]).log())

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·eps, in x0's dtype."""
        x_t = self.sqrt_alphas_cumprod.at(t, x0) * x0 + self.sqrt_one_minus_alphas_cumprod.at(t, x0) * eps
        return x_t.to(x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log variance (broadcastable, (N, 1, 1, 1)) of q(x_{t-1} | x_t, x0)."""
        mean = self.posterior_mean_coef_x0.at(t, x_t) * x0 + self.posterior_mean_coef_xt.at(t, x_t) * x_t
        return mean, self.posterior_log_variance_clipped.at(t, x_t)

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps prediction, variance values in [-1, 1] or None) from the model output's channels."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model output {tuple(model_output.shape)} does not fit x_t {tuple(x_t.shape)}: "
                             f"expected {expected} channels (learn_sigma={self.learn_sigma})")
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - √(1-ᾱ_t)·eps) / √ᾱ_t."""
        return (self.sqrt_recip_alphas_cumprod.at(t, x_t) * x_t
                - self.sqrt_recipm1_alphas_cumprod.at(t, x_t) * eps)

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log variance and x0 prediction of p(x_{t-1} | x_t); x0 is never clipped (SPEC §5)."""
        eps, variance_values = self.split_output(model_output, x_t)
        if variance_values is None:
            log_variance = self.fixed_large_log_variance.at(t, x_t)
        else:
            frac = (variance_values + 1.0) / 2.0
            log_variance = (frac * self.log_betas.at(t, x_t)
                            + (1.0 - frac) * self.posterior_log_variance_clipped.at(t, x_t))
        pred_x0 = self.predict_x0(x_t, t, eps)
        mean, _ = self.q_posterior(pred_x0, x_t, t)
        return mean, log_variance, pred_x0

    def vb_bits_per_dim(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Variational-bound term L_{t}, (N,), in bits per dimension: KL(q posterior || p) for t > 0,
        the discretized Gaussian decoder NLL of x0 at t == 0."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=mean, log_scales=0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_loss(self, model_output: Tensor, x0: Tensor, eps: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """DiT's default loss per sample, (N,): eps-MSE, plus the VB term when sigma is learned.
        The VB term sees the eps prediction detached, so it trains only the variance channels."""
        eps_pred, variance_values = self.split_output(model_output, x_t)
        mse = mean_flat((eps - eps_pred) ** 2)
        if variance_values is None:
            return mse
        frozen_output = torch.cat([eps_pred.detach(), variance_values], dim=1)
        return mse + self.vb_bits_per_dim(frozen_output, x0, x_t, t)
