"""transport/: paths, prediction conversions, samplers and FlowObjective against closed forms.

For Gaussian data x0 ~ N(m, s²) per channel the exact fields are known: with y = x_t - α_t·m and
r² = α_t²s² + σ_t², E[x0 | x_t] = m + α_t·s²·y/r², E[ε | x_t] = σ_t·y/r², score = -y/r². The
probability-flow ODE then maps x_1 = α_1·m + r_1·ζ to x_0 = m + s·ζ exactly, which the samplers must
reproduce when the exact field is plugged in as the "model" (float64 throughout).
"""

import math

import pytest
import torch

from objectives.registry import create_objective
from transport import (
    PATHS,
    PREDICTIONS,
    FlowObjective,
    ReversedTime,
    make_path,
    noise_to_score,
    noise_to_velocity,
    score_to_noise,
    score_to_velocity,
    sde_diffusion,
    velocity_to_noise,
    velocity_to_score,
)

F64 = torch.float64
DATA_MEAN = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=F64).view(1, 4, 1, 1)
DATA_STD = torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=F64).view(1, 4, 1, 1)
CONVERSION_TOL = 1e-6  # the brief: conversions agree to 1e-6
HEUN_100_TOL = 5e-3  # max error of the exact map, 100 Heun steps; measured 4e-4 linear, 1e-3 cosine, 4e-3 vp
EULER_100_TOL = 0.1  # first order: measured 7.5e-2 on the linear path
# SDE, 250 steps: the mean step from t = 0.04 leaves part of the noise σ_0.04 (0.04 linear, 0.06 cosine,
# 0.14 vp), which biases the std of the narrowest channel (s = 0.3) by -2.8%, -4.6%, -12.1%.
SDE_BIAS_TOL = {"linear": 0.03, "cosine": 0.05, "vp": 0.125}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops: a second thread only waits for a core


def gaussian_posterior(path, x, t):
    """E[x0 | x_t], E[ε | x_t] and Var[x_t] for x0 ~ N(DATA_MEAN, DATA_STD²)."""
    alpha, sigma = path.alpha_sigma(t)
    variance = alpha**2 * DATA_STD**2 + sigma**2
    y = x - alpha * DATA_MEAN
    return DATA_MEAN + alpha * DATA_STD**2 * y / variance, sigma * y / variance, variance


def exact_prediction(path, prediction, x, t):
    x0_hat, eps_hat, _ = gaussian_posterior(path, x, t)
    if prediction == "noise":
        return eps_hat
    if prediction == "score":
        return -eps_hat / path.alpha_sigma(t)[1]
    d_alpha, d_sigma = path.alpha_sigma_derivatives(t)
    return d_alpha * x0_hat + d_sigma * eps_hat


class AnalyticModel:
    """model_fn(x, t_model, t_frac) returning the exact prediction; records every call."""

    def __init__(self, path, prediction, extra_channels=0):
        self.path, self.prediction, self.extra_channels = path, prediction, extra_channels
        self.calls = []

    def __call__(self, x, t_model, t_frac):
        self.calls.append((t_model.clone(), t_frac))
        out = exact_prediction(self.path, self.prediction, x, t_model.to(F64).view(-1, 1, 1, 1))
        return torch.cat([out, torch.full_like(out[:, : self.extra_channels], 7.0)], dim=1)


def expected_ode_endpoint(path, z, t_start):
    """x_0 = m + s·ζ with ζ the standardized z at t_start: the exact flow of the Gaussian."""
    alpha, sigma = path.alpha_sigma(torch.tensor(t_start, dtype=F64))
    return DATA_MEAN + DATA_STD * (z - alpha * DATA_MEAN) / torch.sqrt(alpha**2 * DATA_STD**2 + sigma**2)


def noise(n, seed=0, size=2):
    return torch.randn(n, 4, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_heun_maps_noise_to_gaussian_data_exactly(path_name, prediction):
    objective = FlowObjective(path=path_name, prediction=prediction)
    z = noise(64)
    x0 = objective.sample(AnalyticModel(objective.path, prediction), z, method="heun", num_steps=100)
    expected = expected_ode_endpoint(objective.path, z, objective.sample_start)
    assert x0.dtype == torch.float32
    assert (x0.double() - expected).abs().max() < HEUN_100_TOL


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_at_their_order(method, order):
    objective = FlowObjective()
    z = noise(64)

    def error(num_steps):
        model = AnalyticModel(objective.path, "velocity")
        x0 = objective.sample(model, z, method=method, num_steps=num_steps)
        return float((x0.double() - (DATA_MEAN + DATA_STD * z)).abs().max())

    coarse, fine = error(100), error(400)
    assert coarse < (EULER_100_TOL if method == "euler" else HEUN_100_TOL)
    assert fine < coarse / (0.75 * 4**order)  # 4x the steps: 4x (Euler) or 16x (Heun) less error


def exact_sde_moments(path, num_steps, last_step_time=0.04):
    """Mean and std per channel of the SPEC §5 Euler–Maruyama output for Gaussian data, propagated
    in closed form: with the exact fields the drift is affine, d(x) = α'·m + k·(x - α·m)."""
    times = torch.linspace(1.0, last_step_time, num_steps, dtype=F64).tolist() + [0.0]
    mean, variance = torch.zeros_like(DATA_MEAN), torch.ones_like(DATA_STD)
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        t, dt = torch.tensor(t_cur, dtype=F64), t_next - t_cur
        alpha, sigma = path.alpha_sigma(t)
        d_alpha, d_sigma = path.alpha_sigma_derivatives(t)
        g2 = 2 * sigma  # the documented general form; 2t on the linear path
        k = (d_alpha * alpha * DATA_STD**2 + d_sigma * sigma + 0.5 * g2) / (alpha**2 * DATA_STD**2 + sigma**2)
        mean = mean + dt * (d_alpha * DATA_MEAN + k * (mean - alpha * DATA_MEAN))
        variance = (1 + dt * k) ** 2 * variance + (g2 * -dt if i < num_steps - 1 else 0.0)
    return mean.flatten(), variance.sqrt().flatten()


@pytest.mark.parametrize("path_name", list(PATHS))
def test_sde_reproduces_gaussian_mean_and_std(path_name):
    objective = FlowObjective(path=path_name)
    z = noise(2048)
    model = AnalyticModel(objective.path, "velocity")
    x0 = objective.sample(model, z, generator=torch.Generator().manual_seed(1)).double()
    assert len(model.calls) == 250
    num_values = x0.numel() // 4
    sample_mean, sample_std = x0.mean(dim=(0, 2, 3)), x0.std(dim=(0, 2, 3))
    exact_mean, exact_std = exact_sde_moments(objective.path, 250)
    # The sampler is the SPEC §5 recursion: within 4 standard errors of its closed-form moments.
    assert ((sample_mean - exact_mean).abs() < 4 * exact_std / num_values**0.5).all()
    assert ((sample_std / exact_std - 1).abs() < 4 / (2 * num_values) ** 0.5).all()
    # And that recursion reproduces the data's m and s to within SDE_BIAS_TOL (relative to s).
    data_mean, data_std = DATA_MEAN.flatten(), DATA_STD.flatten()
    assert ((exact_mean - data_mean).abs() / data_std).max() < SDE_BIAS_TOL[path_name]
    assert (exact_std / data_std - 1).abs().max() < SDE_BIAS_TOL[path_name]


def test_sde_time_grid_and_diffusion_follow_spec():
    objective = FlowObjective()
    model = AnalyticModel(objective.path, "velocity")
    objective.sample(model, noise(2), num_steps=5)
    expected_times = torch.linspace(1.0, 0.04, 5, dtype=F64).tolist()  # then one mean step to 0
    assert [t_frac for _, t_frac in model.calls] == expected_times
    assert all(isinstance(t_frac, float) for _, t_frac in model.calls)
    for t_model, t_frac in model.calls:
        assert t_model.shape == (2,) and t_model.dtype == torch.float32
        assert torch.equal(t_model, torch.full((2,), t_frac, dtype=torch.float32))
    assert sde_diffusion(objective.path, 0.3) == pytest.approx(0.6)  # g² = 2t on the linear path
    assert sde_diffusion(make_path("cosine"), 0.3) == pytest.approx(2 * math.sin(0.15 * math.pi))


def test_sde_is_reproducible_with_a_generator():
    objective = FlowObjective()
    z = noise(4)
    runs = [objective.sample(AnalyticModel(objective.path, "velocity"), z, num_steps=10,
                             generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_per_sample_generators_make_samples_independent_of_the_batch():
    objective = FlowObjective()
    z = noise(4, seed=14)

    def generators(indices):
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    def sample(rows):
        model = AnalyticModel(objective.path, "velocity")
        return objective.sample(model, z[rows], num_steps=10, generator=generators(rows))

    whole = sample([0, 1, 2, 3])
    assert torch.equal(whole, torch.cat([sample([0, 1]), sample([2, 3])]))
    assert torch.equal(whole[1:2], sample([1]))
    with pytest.raises(ValueError, match="per-sample generators"):
        objective.sample(AnalyticModel(objective.path, "velocity"), z, generator=generators([0, 1]))


@pytest.mark.parametrize(("method", "calls"), [("euler", 10), ("heun", 19), ("sde", 10)])
def test_model_call_count_and_learned_sigma_channels(method, calls):
    objective = FlowObjective()
    z = noise(3)
    model = AnalyticModel(objective.path, "velocity", extra_channels=4)
    with_sigma = objective.sample(model, z, method=method, num_steps=10,
                                  generator=torch.Generator().manual_seed(0))
    without_sigma = objective.sample(AnalyticModel(objective.path, "velocity"), z, method=method,
                                     num_steps=10, generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == calls
    assert torch.equal(with_sigma, without_sigma)


def test_heun_corrector_passes_the_step_start_as_t_frac():
    objective = FlowObjective()
    model = AnalyticModel(objective.path, "velocity")
    objective.sample(model, noise(2), method="heun", num_steps=4)
    t0, t1, t2, t3, _ = torch.linspace(1.0, 0.0, 5, dtype=F64).tolist()
    model_times = [float(t_model[0]) for t_model, _ in model.calls]
    assert [t_frac for _, t_frac in model.calls] == [t0, t0, t1, t1, t2, t2, t3]
    assert model_times == pytest.approx([t0, t1, t1, t2, t2, t3, t3])


@pytest.mark.parametrize("path_name", list(PATHS))
def test_conversions_agree_with_exact_fields(path_name):
    path = make_path(path_name)
    x = noise(16, seed=1)
    t = torch.linspace(0.05, 0.95, 16, dtype=F64)
    t4 = t.view(-1, 1, 1, 1)
    velocity, eps, score = (exact_prediction(path, p, x, t4) for p in PREDICTIONS)
    pairs = [
        (velocity_to_noise(velocity, x, t, path), eps),
        (velocity_to_score(velocity, x, t, path), score),
        (noise_to_velocity(eps, x, t, path), velocity),
        (noise_to_score(eps, x, t, path), score),
        (score_to_velocity(score, x, t, path), velocity),
        (score_to_noise(score, x, t, path), eps),
    ]
    for converted, exact in pairs:
        assert (converted - exact).abs().max() < CONVERSION_TOL


@pytest.mark.parametrize("path_name", list(PATHS))
def test_conversions_invert_each_other_pointwise(path_name):
    path = make_path(path_name)
    x, v = noise(8, seed=2), noise(8, seed=3)  # arbitrary, not a Gaussian field
    t = 0.37
    assert (noise_to_velocity(velocity_to_noise(v, x, t, path), x, t, path) - v).abs().max() < CONVERSION_TOL
    assert (score_to_velocity(velocity_to_score(v, x, t, path), x, t, path) - v).abs().max() < CONVERSION_TOL
    eps = velocity_to_noise(v, x, t, path)
    # v is the velocity of x = α·x0 + σ·ε for the x0 that this ε implies.
    alpha, sigma = path.alpha_sigma(torch.tensor(t, dtype=F64))
    d_alpha, d_sigma = path.alpha_sigma_derivatives(torch.tensor(t, dtype=F64))
    x0 = (x - sigma * eps) / alpha
    assert (d_alpha * x0 + d_sigma * eps - v).abs().max() < CONVERSION_TOL


@pytest.mark.parametrize("path_name", list(PATHS))
def test_paths_boundaries_derivatives_and_noise_ratio(path_name):
    path = make_path(path_name)
    alpha0, sigma0 = path.alpha_sigma(torch.tensor(0.0, dtype=F64))
    assert float(alpha0) == 1.0 and float(sigma0) == 0.0
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    d_alpha, d_sigma = path.alpha_sigma_derivatives(t)
    (a_plus, s_plus), (a_minus, s_minus) = path.alpha_sigma(t + h), path.alpha_sigma(t - h)
    assert torch.allclose((a_plus - a_minus) / (2 * h) + 0 * t, d_alpha + 0 * t, atol=1e-6)
    assert torch.allclose((s_plus - s_minus) / (2 * h) + 0 * t, d_sigma + 0 * t, atol=1e-6)
    alpha, sigma = path.alpha_sigma(t)
    assert torch.allclose(path.time_from_noise_ratio(sigma / alpha), t, atol=1e-12)
    if path_name != "vp":
        alpha1, sigma1 = path.alpha_sigma(torch.tensor(1.0, dtype=F64))
        assert float(alpha1) == pytest.approx(0.0, abs=1e-15) and float(sigma1) == 1.0


@pytest.mark.parametrize("path_name", list(PATHS))
def test_velocity_target_is_the_time_derivative_of_the_path(path_name):
    objective = FlowObjective(path=path_name)
    x0, eps = noise(8, seed=4), noise(8, seed=5)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    h = 1e-6
    derivative = (objective.noisy(x0, eps, t + h) - objective.noisy(x0, eps, t - h)) / (2 * h)
    assert (objective.target(x0, eps, t) - derivative).abs().max() < 1e-6
    if path_name == "linear":
        assert torch.equal(objective.target(x0, eps, t), eps - x0)
        t4 = t.view(-1, 1, 1, 1)
        assert torch.equal(objective.noisy(x0, eps, t), (1 - t4) * x0 + t4 * eps)


def test_noise_and_score_targets_and_losses():
    x0, eps = noise(4, seed=6), noise(4, seed=7)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    noise_objective = FlowObjective(prediction="noise")
    assert torch.equal(noise_objective.target(x0, eps, t), eps)
    score_objective = FlowObjective(prediction="score")
    score_target = score_objective.target(x0, eps, t)
    assert torch.allclose(score_target, -eps / t.view(-1, 1, 1, 1))
    x_t = score_objective.noisy(x0, eps, t)
    assert torch.allclose(score_objective.loss(score_target, x0, eps, t, x_t), torch.zeros(4, dtype=F64))
    output = score_target + 1.0  # error 1 everywhere, weighted by σ_t² = t²
    assert torch.allclose(score_objective.loss(output, x0, eps, t, x_t), t**2)


def test_velocity_loss_is_the_per_sample_mean_square_on_the_first_channels():
    objective = FlowObjective()
    x0, eps = noise(3, seed=8), noise(3, seed=9)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    x_t = objective.noisy(x0, eps, t)
    target = objective.target(x0, eps, t)
    output = torch.cat([target + 0.5, torch.randn_like(target)], dim=1)  # 8 channels: learned sigma
    loss = objective.loss(output, x0, eps, t, x_t)
    assert loss.shape == (3,)
    assert torch.allclose(loss, torch.full((3,), 0.25, dtype=F64))
    with pytest.raises(ValueError, match="does not fit"):
        objective.loss(output[:, :2], x0, eps, t, x_t)


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_shift_time_stays_in_range_and_lowers_the_noise(path_name, prediction):
    objective = FlowObjective(path=path_name, prediction=prediction)
    generator = torch.Generator().manual_seed(0)
    t = torch.cat([objective.sample_time(1000, "cpu", generator), torch.tensor([objective.t_low, 1.0])])
    delta = torch.cat([0.2 * torch.rand(1000, generator=generator), torch.tensor([0.2, 1.0])])
    t_teacher = objective.shift_time(t, delta)
    assert bool((t_teacher >= objective.t_low).all()) and bool((t_teacher <= t).all())
    above_floor = t - delta >= objective.t_low
    assert torch.equal(t_teacher[above_floor], (t - delta)[above_floor])
    assert bool((objective.path.alpha_sigma(t_teacher)[1] <= objective.path.alpha_sigma(t)[1]).all())
    # The teacher input is the same x0 and eps at the teacher time.
    x0, eps = noise(1002, seed=10).float(), noise(1002, seed=11).float()
    alpha, sigma = objective.path.alpha_sigma(t_teacher.view(-1, 1, 1, 1))
    assert torch.allclose(objective.noisy(x0, eps, t_teacher), alpha * x0 + sigma * eps)


def test_time_sampling():
    objective = FlowObjective()
    generator = torch.Generator().manual_seed(0)
    t = objective.sample_time(10000, "cpu", generator)
    assert t.dtype == torch.float32 and t.shape == (10000,)
    assert 0 <= float(t.min()) and float(t.max()) <= 1 and abs(float(t.mean()) - 0.5) < 0.02
    lognormal = FlowObjective(time_sampling="lognormal").sample_time(10000, "cpu", generator).double()
    log_ratio = torch.log(lognormal / (1 - lognormal))  # σ_t/α_t on the linear path
    assert abs(float(log_ratio.mean())) < 0.05 and abs(float(log_ratio.std()) - 1) < 0.05
    assert objective.discrete_steps is None


def test_sampling_starts_where_the_prediction_is_defined():
    assert FlowObjective().sample_start == 1.0
    assert FlowObjective(path="vp", prediction="noise").sample_start == 1.0
    assert FlowObjective(prediction="score").sample_start == pytest.approx(0.999)
    assert (FlowObjective(path="vp").t_low, FlowObjective(prediction="noise").t_high) == (1e-5, 0.999)


class SiTReleaseVelocity(torch.nn.Module):
    """The exact Gaussian velocity in the SiT release's convention: t = 1 data, v = d/dt of
    x_t = t·x0 + (1 - t)·ε."""

    num_classes, in_channels, learn_sigma = 10, 4, False

    def forward(self, x, t, y):
        our_t = (1 - t).view(-1, 1, 1, 1)
        return -exact_prediction(make_path("linear"), "velocity", x, our_t)


def test_reversed_time_runs_a_sit_release_model_in_this_convention():
    model = SiTReleaseVelocity()
    wrapped = ReversedTime(model)
    assert (wrapped.num_classes, wrapped.in_channels, wrapped.learn_sigma) == (10, 4, False)
    x, t, y = noise(5, seed=12), torch.rand(5, dtype=F64), torch.zeros(5, dtype=torch.long)
    assert torch.equal(wrapped(x, t, y), -model(x, 1 - t, y))
    z = noise(32, seed=13)
    x0 = FlowObjective().sample(lambda x, t_model, _: wrapped(x, t_model.double(), None), z,
                                method="heun", num_steps=100)
    assert (x0.double() - (DATA_MEAN + DATA_STD * z)).abs().max() < HEUN_100_TOL


def test_bad_input_raises_a_clear_error():
    with pytest.raises(ValueError, match="unknown path"):
        FlowObjective(path="cos")
    with pytest.raises(ValueError, match="unknown prediction"):
        FlowObjective(prediction="eps")
    with pytest.raises(ValueError, match="unknown time_sampling"):
        FlowObjective(time_sampling="logit")
    objective = FlowObjective()
    model = AnalyticModel(objective.path, "velocity")
    with pytest.raises(ValueError, match="unknown flow sampler"):
        objective.sample(model, noise(2), method="dopri5")
    with pytest.raises(ValueError, match="does not take"):
        objective.sample(model, noise(2), method="euler", last_step_time=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        objective.sample(model, noise(2), num_steps=0)
    with pytest.raises(ValueError, match="last_step_time"):
        objective.sample(model, noise(2), last_step_time=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        objective.sample(model, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        objective.shift_time(torch.rand(3), torch.rand(2))
    assert not model.calls


def test_create_objective_builds_flow_with_options():
    objective = create_objective("flow", path="cosine", prediction="noise", time_sampling="lognormal")
    assert isinstance(objective, FlowObjective)
    assert (objective.name, objective.path.name, objective.prediction) == ("flow", "cosine", "noise")
    assert (objective.default_method, objective.default_num_steps) == ("sde", 250)
    assert objective.sampler_methods == ("sde", "euler", "heun")
    assert objective.options() == {"path": "cosine", "prediction": "noise", "time_sampling": "lognormal"}
    with pytest.raises(ValueError, match="unknown objective 'edm'"):
        create_objective("edm")
