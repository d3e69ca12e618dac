"""diffusion/: the DDPM schedule, posterior, DiT's loss, respacing and the samplers, on closed forms.

For data x0 ~ N(m, s²) the exact noise prediction at step t is
E[ε | x_t] = √(1-ᾱ_t)·(x_t - √ᾱ_t·m) / (ᾱ_t·s² + 1 - ᾱ_t); with s = 0 (a single point) every x0
prediction is exactly m, so DDIM (η = 0) and ancestral sampling must return m from any noise.
"""

import math

import pytest
import torch

from diffusion import DDPMObjective, GaussianDiffusion, respace, space_timesteps
from diffusion.gaussian import discretized_gaussian_log_likelihood, mean_flat
from objectives.registry import create_objective

F64 = torch.float64
T = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: a second thread only waits for a core


@pytest.fixture(scope="module")
def objective():
    return DDPMObjective()


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class GaussianEpsModel:
    """The exact ε-prediction for x0 ~ N(mean, std²) of the ORIGINAL schedule, indexed by t_model;
    `variance_values` fills the learned-range channels. Records every call."""

    def __init__(self, diffusion, mean, std, variance_values=None):
        self.alphas_cumprod = diffusion.alphas_cumprod.values
        self.mean, self.std, self.variance_values = mean, std, variance_values
        self.calls = []

    def __call__(self, x, t_model, t_frac):
        self.calls.append((t_model.clone(), t_frac))
        alpha_bar = self.alphas_cumprod[t_model].view(-1, 1, 1, 1)
        variance = alpha_bar * self.std**2 + 1 - alpha_bar
        eps = (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * self.mean) / variance
        if self.variance_values is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.variance_values)], dim=1)


def test_linear_schedule_in_float64(objective):
    diffusion = objective.diffusion
    betas = diffusion.betas.values
    assert betas.dtype == F64 and betas.shape == (T,)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(diffusion.alphas_cumprod.values, torch.cumprod(1 - betas, 0), rtol=0, atol=1e-15)
    assert float(diffusion.alphas_cumprod.values[-1]) == pytest.approx(4.036e-5, rel=1e-3)


def test_q_sample_formula_and_moments(objective):
    x0 = randn(1, 4, 2, 2, seed=1)
    t = torch.tensor([0, 10, 500, 999])
    eps = randn(4, 4, 2, 2, seed=2)
    alpha_bar = objective.diffusion.alphas_cumprod.values[t].view(-1, 1, 1, 1)
    x_t = objective.noisy(x0.expand(4, -1, -1, -1), eps, t)
    assert torch.allclose(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps, rtol=0, atol=1e-14)
    # Moments over many noise draws at one step: mean √ᾱ·x0, variance 1 - ᾱ.
    t = torch.full((20000,), 300)
    samples = objective.noisy(x0.expand(20000, -1, -1, -1), randn(20000, 4, 2, 2, seed=3), t)
    alpha_bar = float(objective.diffusion.alphas_cumprod.values[300])
    assert torch.allclose(samples.mean(0), math.sqrt(alpha_bar) * x0[0], atol=0.03)
    assert torch.allclose(samples.var(0), torch.full_like(x0[0], 1 - alpha_bar), rtol=0.05)
    assert objective.noisy(x0.float(), eps[:1].float(), t[:1]).dtype == torch.float32


def test_posterior_of_two_chained_steps(objective):
    """q(x_{t-1} | x_t, x0) from Gaussian conditioning of x_{t-1} ~ q(· | x0), x_t = √α_t·x_{t-1} + √β_t·ε."""
    diffusion = objective.diffusion
    t = torch.arange(1, T)
    alpha_bar, alpha_bar_prev = diffusion.alphas_cumprod.values[t], diffusion.alphas_cumprod.values[t - 1]
    alpha = 1 - diffusion.betas.values[t]
    var_prev, var_t, cov = 1 - alpha_bar_prev, 1 - alpha_bar, alpha.sqrt() * (1 - alpha_bar_prev)
    gain = cov / var_t  # regression of x_{t-1} on x_t
    x0, x_t = randn(T - 1, seed=4), randn(T - 1, seed=5)
    expected_mean = alpha_bar_prev.sqrt() * x0 + gain * (x_t - alpha_bar.sqrt() * x0)
    mean, log_variance = diffusion.q_posterior(x0.view(-1, 1, 1, 1), x_t.view(-1, 1, 1, 1), t)
    assert torch.allclose(mean.flatten(), expected_mean, rtol=0, atol=1e-12)
    assert torch.allclose(log_variance.flatten().exp(), var_prev - cov**2 / var_t, rtol=1e-10, atol=0)


def test_vb_term_is_zero_at_the_true_posterior(objective):
    diffusion = objective.diffusion
    t = torch.arange(0, T, 37)
    x0, eps = randn(len(t), 4, 4, 4, seed=6), randn(len(t), 4, 4, 4, seed=7)
    x_t = objective.noisy(x0, eps, t)
    # ε output = the true ε gives the true posterior mean; variance value -1 gives the posterior variance.
    exact = torch.cat([eps, -torch.ones_like(eps)], dim=1)
    vb = diffusion.vb_bits_per_dim(exact, x0, x_t, t)
    assert vb.shape == (len(t),)
    assert vb[1:].abs().max() < 1e-10
    # At t == 0 the term is the decoder NLL in bits per dim.
    mean, log_variance, _ = diffusion.p_mean_variance(exact, x_t, t)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance))[0] / math.log(2)
    assert t[0] == 0 and torch.allclose(vb[0], nll) and vb[0] > 0
    # Any other variance costs bits (where the posterior variance and β_t still differ).
    other = diffusion.vb_bits_per_dim(torch.cat([eps, torch.zeros_like(eps)], 1), x0, x_t, t)
    assert (other[(t > 0) & (t < 300)] > 1e-6).all()


def test_loss_is_mse_plus_vb_with_the_mean_detached(objective):
    t = torch.tensor([0, 1, 250, 999])
    x0, eps = randn(4, 4, 4, 4, seed=8), randn(4, 4, 4, 4, seed=9)
    x_t = objective.noisy(x0, eps, t)
    output = randn(4, 8, 4, 4, seed=10).mul(0.5).requires_grad_()
    loss = objective.loss(output, x0, eps, t, x_t)
    mse = mean_flat((eps - output[:, :4]) ** 2)
    vb = objective.diffusion.vb_bits_per_dim(output.detach(), x0, x_t, t)
    assert loss.shape == (4,)
    assert torch.allclose(loss, mse + vb, rtol=0, atol=1e-12)
    loss.sum().backward()
    # The ε channels get the MSE gradient only; the variance channels get the VB gradient.
    assert torch.allclose(output.grad[:, :4], 2 * (output[:, :4] - eps).detach() / (4 * 4 * 4))
    assert output.grad[:, 4:].abs().sum() > 0
    fixed_variance = DDPMObjective(learn_sigma=False)
    assert torch.equal(fixed_variance.loss(output[:, :4], x0, eps, t, x_t), mse)
    assert torch.equal(objective.target(x0, eps, t), eps) and torch.equal(objective.model_time(t), t)


def test_space_timesteps_matches_the_public_spacing():
    kept = space_timesteps(T, 250)
    assert len(kept) == 250 and kept[:4] == [0, 4, 8, 12] and kept[-1] == 999
    assert space_timesteps(T, "250") == kept
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, "2,3") == [0, 499, 500, 750, 999]
    assert space_timesteps(T, T) == list(range(T))
    for bad in ["abc", "ddim999", 1001, 0, 2.5]:
        with pytest.raises(ValueError):
            space_timesteps(T, bad)


@pytest.mark.parametrize("spacing", ["250", "ddim50", "25", "10,5,3"])
def test_respaced_betas_reproduce_alpha_bar_at_the_kept_steps(objective, spacing):
    kept = space_timesteps(T, spacing)
    respaced = respace(objective.diffusion, kept)
    assert respaced.timestep_map.tolist() == kept and respaced.original_num_timesteps == T
    original = objective.diffusion.alphas_cumprod.values[kept]
    assert torch.allclose(torch.cumprod(1 - respaced.betas.values, 0), original, rtol=1e-12, atol=0)
    assert torch.allclose(respaced.alphas_cumprod.values, original, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("num_steps", [50, "ddim25"])
def test_samplers_return_the_single_data_point(objective, method, num_steps):
    point = randn(1, 4, 2, 2, seed=11)
    model = GaussianEpsModel(objective.diffusion, point, 0.0, variance_values=0.3)
    z = randn(8, 4, 2, 2, seed=12)
    x0 = objective.sample(model, z, method=method, num_steps=num_steps,
                          generator=torch.Generator().manual_seed(0))
    assert x0.dtype == torch.float32
    assert (x0.double() - point).abs().max() < 1e-6
    kept = space_timesteps(T, num_steps)
    assert [int(t_model[0]) for t_model, _ in model.calls] == kept[::-1]  # original steps, noisiest first
    assert [t_frac for _, t_frac in model.calls] == [step / T for step in kept[::-1]]
    assert all(t_model.dtype == torch.long and t_model.shape == (8,) for t_model, _ in model.calls)


def test_ddim_eta_zero_is_a_deterministic_map(objective):
    model = GaussianEpsModel(objective.diffusion, 1.0, 0.5, variance_values=0.0)
    z = randn(256, 4, 2, 2, seed=13)
    runs = [objective.sample(model, z, method="ddim", num_steps=50, generator=generator)
            for generator in (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))]
    assert torch.equal(runs[0], runs[1])
    # For Gaussian data the map is affine, x0 = a + b·z, with b just below s = 0.5 (50 steps contract).
    design = torch.stack([torch.ones(z.numel(), dtype=F64), z.flatten()], dim=1)
    fit = torch.linalg.lstsq(design, runs[0].double().flatten().unsqueeze(1)).solution
    assert (design @ fit - runs[0].double().flatten().unsqueeze(1)).abs().max() < 1e-5
    assert 0.46 < float(fit[1]) < 0.5


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ancestral_sampling_reproduces_gaussian_moments(learn_sigma):
    objective = DDPMObjective(learn_sigma=learn_sigma)
    model = GaussianEpsModel(objective.diffusion, 1.5, 0.5, variance_values=0.0 if learn_sigma else None)
    x0 = objective.sample(model, randn(4096, 4, 2, 2, seed=14), generator=torch.Generator().manual_seed(2))
    assert abs(float(x0.mean()) - 1.5) < 0.01
    assert abs(float(x0.std()) / 0.5 - 1) < 0.02


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddim_with_eta_one_is_ancestral_sampling_with_the_posterior_variance(objective, num_steps):
    """DDIM's σ_t at η = 1 is the posterior's (DDIM paper, §4.1); learned-range value -1 selects it."""
    model = GaussianEpsModel(objective.diffusion, 1.5, 0.5, variance_values=-1.0)
    z = randn(64, 4, 2, 2, seed=15)
    ddim = objective.sample(model, z, method="ddim", num_steps=num_steps, eta=1.0,
                            generator=torch.Generator().manual_seed(3))
    ddpm = objective.sample(model, z, method="ddpm", num_steps=num_steps,
                            generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddim, ddpm, rtol=0, atol=1e-6)
    assert not torch.allclose(ddim, objective.sample(model, z, method="ddim", num_steps=num_steps))


@pytest.mark.parametrize(("method", "options"), [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_per_sample_generators_make_samples_independent_of_the_batch(objective, method, options):
    model = GaussianEpsModel(objective.diffusion, 1.5, 0.5, variance_values=0.2)
    z = randn(4, 4, 2, 2, seed=16)

    def sample(rows):
        generators = [torch.Generator().manual_seed(100 + i) for i in rows]
        return objective.sample(model, z[rows], method=method, num_steps=20, generator=generators, **options)

    whole = sample([0, 1, 2, 3])
    assert torch.equal(whole, torch.cat([sample([0, 1]), sample([2, 3])]))
    assert torch.equal(whole[3:], sample([3]))


def test_shift_time_stays_in_range_and_lowers_the_noise():
    objective = DDPMObjective()
    generator = torch.Generator().manual_seed(0)
    t = torch.cat([objective.sample_time(2000, "cpu", generator), torch.tensor([0, 1, 999])])
    delta = torch.cat([torch.randint(0, 200, (2000,), generator=generator), torch.tensor([0, 5, 200])])
    t_teacher = objective.shift_time(t, delta)
    assert t_teacher.dtype == torch.long
    assert int(t_teacher.min()) == 0 and int(t_teacher.max()) <= T - 1
    above_floor = t - delta >= 0
    assert not bool(above_floor.all())  # the clamp at 0 is exercised
    assert torch.equal(t_teacher[above_floor], (t - delta)[above_floor])
    assert bool((t_teacher <= t).all())


def test_time_sampling(objective):
    generator = torch.Generator().manual_seed(0)
    t = objective.sample_time(20000, "cpu", generator)
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == T - 1
    assert objective.discrete_steps == T


def test_bad_input_raises_a_clear_error(objective):
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMObjective(beta_schedule="cosine")
    x0 = randn(2, 4, 2, 2)
    with pytest.raises(ValueError, match="expected 8 channels"):
        objective.loss(randn(2, 4, 2, 2), x0, x0, torch.tensor([1, 2]), x0)
    model = GaussianEpsModel(objective.diffusion, 0.0, 1.0, variance_values=0.0)
    with pytest.raises(ValueError, match="unknown ddpm sampler"):
        objective.sample(model, x0, method="euler")
    with pytest.raises(ValueError, match="does not take"):
        objective.sample(model, x0, method="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="spacing"):
        objective.sample(model, x0, num_steps="fast")
    with pytest.raises(ValueError, match="eta"):
        objective.sample(model, x0, method="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1]), learn_sigma=False)
    assert not model.calls


def test_create_objective_builds_ddpm_with_options():
    objective = create_objective("ddpm", learn_sigma=False)
    assert isinstance(objective, DDPMObjective)
    assert (objective.name, objective.diffusion.learn_sigma) == ("ddpm", False)
    assert objective.options() == {"num_timesteps": T, "beta_schedule": "linear", "learn_sigma": False}
    rebuilt = create_objective(objective.name, **objective.options())
    assert torch.equal(rebuilt.diffusion.betas.values, objective.diffusion.betas.values)
    assert (objective.default_method, objective.default_num_steps) == ("ddpm", 250)
    assert objective.sampler_methods == ("ddpm", "ddim")
