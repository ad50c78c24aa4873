"""Unit tests of lesson 01's library section: beta schedules, NoiseSchedule, extract,
q_sample and the forward posterior q(x_{t-1} | x_t, x_0)."""
import math

import numpy as np
import pytest
import torch

import diffusion_utilities as du

F64 = torch.float64


# ── beta schedules ──


@pytest.mark.parametrize("name", du.SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [50, 300, 1000])
def test_schedules_are_float64_betas_in_0_1(name, T):
    betas = du.make_beta_schedule(name, T)
    assert betas.dtype == F64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas < 1).all()
    alpha_bars = du.alpha_bars_from_betas(betas)
    assert (alpha_bars[1:] < alpha_bars[:-1]).all(), "ᾱ_t must decrease"
    assert alpha_bars[-1] < 0.01, "by t = T-1 almost no signal is left"


@pytest.mark.parametrize("fn", [du.cosine_beta_schedule, du.sigmoid_beta_schedule])
def test_short_schedules_work(fn):
    for T in (1, 2, 5):
        betas = fn(T)
        assert betas.shape == (T,) and ((betas > 0) & (betas < 1)).all()


def test_linear_endpoints_scale_with_T():
    ends = lambda betas: betas[[0, -1]].tolist()  # noqa: E731
    assert ends(du.linear_beta_schedule(1000)) == pytest.approx([1e-4, 0.02])
    assert ends(du.linear_beta_schedule(250)) == pytest.approx([4e-4, 0.08])
    betas = du.linear_beta_schedule(100, beta_start=1e-3, beta_end=0.05)
    assert ends(betas) == pytest.approx([1e-2, 0.5])
    assert torch.allclose(betas.diff(), betas.diff()[0].expand(99))  # evenly spaced


def test_linear_schedules_of_any_T_are_comparable():
    """The 1000 / T scaling keeps the total amount of noise about the same."""
    log_final = {T: du.alpha_bars_from_betas(du.linear_beta_schedule(T))[-1].log().item()
                 for T in (100, 250, 1000, 4000)}
    for T, value in log_final.items():
        assert value == pytest.approx(log_final[1000], rel=0.15), (T, log_final)


@pytest.mark.parametrize("T, s", [(10, 0.008), (1000, 0.008), (40, 0.1)])
def test_cosine_alpha_bar_matches_its_closed_form(T, s):
    alpha_bars = du.alpha_bars_from_betas(du.cosine_beta_schedule(T, s=s))
    t = torch.arange(T, dtype=F64)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = torch.tensor([f(u + 1) / f(0) for u in t.tolist()], dtype=F64)
    # Improved DDPM, eq. 17: ᾱ_t = f(t+1) / f(0) with our 0-indexed t; the last beta is clipped
    assert torch.allclose(alpha_bars[:-1], closed[:-1], rtol=1e-10, atol=1e-12)
    assert du.cosine_beta_schedule(T, s=s)[-1] == 0.999


def test_cosine_clipping_follows_max_beta():
    betas = du.cosine_beta_schedule(20, max_beta=0.5)
    assert betas.max() == 0.5
    unclipped = du.cosine_beta_schedule(20, max_beta=1.0)
    assert torch.equal(du.cosine_beta_schedule(20)[:-1], unclipped[:-1])


def test_sigmoid_alpha_bar_matches_its_definition():
    T, start, end, tau = 64, -2.0, 4.0, 0.7
    alpha_bars = du.alpha_bars_from_betas(
        du.sigmoid_beta_schedule(T, start=start, end=end, tau=tau))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [(sig(end / tau) - sig(((u + 1) / T * (end - start) + start) / tau))
                / (sig(end / tau) - sig(start / tau)) for u in range(T)]
    assert torch.allclose(alpha_bars[:-1], torch.tensor(expected[:-1], dtype=F64), rtol=1e-9)


def test_alpha_bars_from_betas_is_the_running_product():
    betas = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float32)
    expected = torch.tensor([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.5])
    out = du.alpha_bars_from_betas(betas)
    assert out.dtype == torch.float32 and torch.allclose(out, expected)


# ── NoiseSchedule ──


@pytest.mark.parametrize("name", du.SCHEDULE_NAMES)
def test_noise_schedule_fields(name):
    schedule = du.NoiseSchedule.create(name, 100)
    assert schedule.T == 100
    for field, value in vars(schedule).items():
        assert value.dtype == torch.float32 and value.shape == (100,), field
        assert torch.isfinite(value).all(), field
    betas64 = du.make_beta_schedule(name, 100)
    alpha_bars64 = torch.cumprod(1 - betas64, 0)
    assert torch.equal(schedule.alpha_bars, alpha_bars64.float())  # computed in float64
    assert torch.allclose(schedule.alphas, 1 - schedule.betas)
    assert schedule.alpha_bar_prev[0] == 1.0
    assert torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bars[:-1])
    assert schedule.posterior_variance[0] == 0.0
    assert (schedule.posterior_variance[1:] > 0).all()
    assert (schedule.posterior_variance <= schedule.betas * (1 + 1e-6)).all()  # β̃_t <= β_t
    clipped = schedule.posterior_log_variance_clipped
    assert clipped[0] == clipped[1]
    assert torch.allclose(clipped[1:], schedule.posterior_variance[1:].log(), atol=1e-5)


def test_noise_schedule_from_betas_accepts_arrays_and_keeps_device():
    betas = np.linspace(1e-3, 0.2, 30)
    a = du.NoiseSchedule.from_betas(betas)
    b = du.NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float32))
    assert a.T == b.T == 30
    assert torch.allclose(a.alpha_bars, b.alpha_bars, rtol=1e-6)
    assert du.NoiseSchedule.create("linear", 50).betas.device.type == "cpu"
    moved = a.to("cpu")
    assert moved is not a and torch.equal(moved.posterior_mean_coef_x0, a.posterior_mean_coef_x0)


def test_noise_schedule_with_one_step():
    schedule = du.NoiseSchedule.create("cosine", 1)
    assert schedule.T == 1 and schedule.posterior_variance[0] == 0
    assert torch.isfinite(schedule.posterior_log_variance_clipped).all()


def test_log_snr_and_snr():
    schedule = du.NoiseSchedule.create("cosine", 200)
    ab = schedule.alpha_bars.double()
    log_snr = schedule.log_snr()
    assert log_snr.shape == (200,) and (log_snr.diff() < 0).all()
    assert torch.allclose(log_snr.double(), (ab / (1 - ab)).log(), atol=1e-4)
    assert torch.allclose(du.snr(schedule).log(), log_snr, rtol=1e-4, atol=1e-4)


# ── extract ──


def test_extract_broadcasts_per_item():
    values = torch.arange(10.0)
    t = torch.tensor([3, 0, 9])
    out = du.extract(values, t, (3, 2, 5, 5))
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [3.0, 0.0, 9.0]
    assert du.extract(values, t, (3, 7)).shape == (3, 1)
    assert du.extract(values, t.to(torch.int32), (3, 1, 1)).shape == (3, 1, 1)


# ── q_sample ──


@pytest.mark.parametrize("t0", [0, 10, 60, 99])
def test_q_sample_mean_and_variance_for_a_constant_image(t0):
    torch.manual_seed(0)
    schedule = du.NoiseSchedule.create("cosine", 100)
    x0 = torch.full((4096, 1, 4, 4), 0.7)
    t = torch.full((4096,), t0)
    xt = du.q_sample(x0, t, torch.randn_like(x0), schedule)
    ab = schedule.alpha_bars[t0].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-6)


def test_q_sample_equals_t_single_steps():
    """One shot (DDPM eq. 4) = t + 1 steps of x_s = sqrt(α_s) x_{s-1} + sqrt(β_s) ε (eq. 2)."""
    torch.manual_seed(1)
    schedule = du.NoiseSchedule.create("linear", 40)
    x = torch.full((20000, 1, 2, 2), -0.5)
    for s in range(25):  # steps 0..24, so x is x_24
        x = schedule.alphas[s].sqrt() * x + schedule.betas[s].sqrt() * torch.randn_like(x)
    ab = schedule.alpha_bars[24].item()
    assert x.mean().item() == pytest.approx(math.sqrt(ab) * -0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - ab, rel=0.03)


def test_q_sample_uses_each_items_timestep_and_follows_dtype():
    schedule = du.NoiseSchedule.create("cosine", 50)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 2, 4, 4, dtype=F64)
    t = torch.tensor([0, 25, 49])
    xt = du.q_sample(x0, t, eps, schedule)
    assert xt.dtype == F64
    alpha_bars64 = torch.cumprod(1 - du.cosine_beta_schedule(50), 0)  # float64 throughout
    for i in range(3):
        ab = alpha_bars64[t[i]]
        assert torch.allclose(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i], rtol=1e-6,
                              atol=1e-7)


def test_derived_quantities_keep_float64_precision_near_t0():
    """1 - ᾱ_t recomputed in float32 loses digits where ᾱ_t is close to 1; the schedule's
    derived fields are computed in float64 before they are stored."""
    schedule = du.NoiseSchedule.create("linear", 1000)
    alpha_bars64 = torch.cumprod(1 - du.linear_beta_schedule(1000), 0)
    exact = (1 - alpha_bars64).sqrt()
    stored = schedule.sqrt_one_minus_alpha_bars.double()
    recomputed = (1 - schedule.alpha_bars).sqrt().double()
    assert ((stored - exact).abs() / exact).max() < 1e-6
    assert ((recomputed - exact).abs() / exact).max() > 1e-5  # what the fields avoid
    eps_coef = du.linear_beta_schedule(1000) / exact
    assert torch.allclose(schedule.eps_coef.double(), eps_coef, rtol=1e-6)


@pytest.mark.parametrize("betas", [du.cosine_beta_schedule(100, max_beta=1.0),
                                   torch.tensor([0.1, 1.0, 0.2])])
def test_a_beta_of_one_is_refused_with_the_reason(betas):
    with pytest.raises(ValueError, match=r"β = 1 erases the signal.*max_beta=0.999"):
        du.NoiseSchedule.from_betas(betas)


# ── the posterior q(x_{t-1} | x_t, x_0) ──


def test_posterior_is_the_product_of_the_two_gaussians():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): add the precisions."""
    schedule = du.NoiseSchedule.create("cosine", 100)
    betas = du.cosine_beta_schedule(100)
    alpha_bars = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 5, 50, 99])
    x0, xt = torch.randn(4, 3, 2, 2, dtype=F64), torch.randn(4, 3, 2, 2, dtype=F64)
    mean, var = du.q_posterior_mean_variance(x0, xt, t, schedule)
    for i, step in enumerate(t.tolist()):
        beta, prev = betas[step], alpha_bars[step - 1]
        precision = (1 - beta) / beta + 1 / (1 - prev)
        weighted = (1 - beta).sqrt() / beta * xt[i] + prev.sqrt() / (1 - prev) * x0[i]
        expected_mean = weighted / precision
        assert var[i].item() == pytest.approx(1 / precision.item(), rel=1e-4)
        assert torch.allclose(mean[i], expected_mean, rtol=1e-4, atol=1e-5)


def test_posterior_at_t0_is_x0_with_no_variance():
    schedule = du.NoiseSchedule.create("linear", 100)
    x0, xt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, var = du.q_posterior_mean_variance(x0, xt, torch.tensor([0, 0]), schedule)
    assert var.shape == (2, 1, 1, 1) and (var == 0).all()
    assert torch.allclose(mean, x0, atol=1e-6)


def test_posterior_agrees_with_sampling_and_regression():
    """Sample x_{t-1} ~ q(x_{t-1} | x_0), then x_t ~ q(x_t | x_{t-1}); regress x_{t-1} on x_t."""
    torch.manual_seed(2)
    schedule = du.NoiseSchedule.create("cosine", 50)
    step, x0_value, n = 20, 0.8, 200_000
    ab_prev = schedule.alpha_bars[step - 1].double()
    x_prev = ab_prev.sqrt() * x0_value + (1 - ab_prev).sqrt() * torch.randn(n, dtype=F64)
    beta = schedule.betas[step].double()
    xt = (1 - beta).sqrt() * x_prev + beta.sqrt() * torch.randn(n, dtype=F64)
    design = torch.stack([torch.ones(n, dtype=F64), xt], dim=1)
    coef = torch.linalg.lstsq(design, x_prev[:, None]).solution.flatten()  # [intercept, slope]
    residual_var = (x_prev - design @ coef).var()
    x0, t = torch.full((1, 1, 1, 1), x0_value), torch.tensor([step])
    mean0, var = du.q_posterior_mean_variance(x0, torch.zeros_like(x0), t, schedule)
    mean1, _ = du.q_posterior_mean_variance(x0, torch.ones_like(x0), t, schedule)
    assert coef[0].item() == pytest.approx(mean0.item(), abs=0.01)
    assert coef[1].item() == pytest.approx((mean1 - mean0).item(), abs=0.01)
    assert residual_var.item() == pytest.approx(var.item(), rel=0.02)


# ── every ValueError names what was expected ──


@pytest.mark.parametrize("fn", [du.linear_beta_schedule, du.cosine_beta_schedule,
                                du.sigmoid_beta_schedule,
                                lambda T: du.make_beta_schedule("cosine", T)])
@pytest.mark.parametrize("T", [0, -3, 2.5, True, "10"])
def test_schedules_reject_bad_T(fn, T):
    with pytest.raises(ValueError, match=r"integer >= 1"):
        fn(T)


@pytest.mark.parametrize("call, message", [
    (lambda: du.linear_beta_schedule(20), r"beta_end \* 1000 / T < 1.*try T >= 21"),
    (lambda: du.linear_beta_schedule(100, beta_start=0.1, beta_end=0.01),
     r"beta_start <= beta_end"),
    (lambda: du.cosine_beta_schedule(10, s=-0.1), r"s >= 0"),
    (lambda: du.cosine_beta_schedule(10, max_beta=1.5), r"0 < max_beta <= 1"),
    (lambda: du.sigmoid_beta_schedule(10, start=3.0, end=-3.0), r"start < end"),
    (lambda: du.sigmoid_beta_schedule(10, tau=0.0), r"tau > 0"),
    (lambda: du.make_beta_schedule("quadratic", 10),
     r"expected one of \('linear', 'cosine', 'sigmoid'\)"),
    (lambda: du.alpha_bars_from_betas(torch.rand(2, 5)),
     r"1-D tensor of shape \(T,\), got \(2, 5\)"),
    (lambda: du.alpha_bars_from_betas([0.1, 0.2]), r"1-D tensor of shape \(T,\), got list"),
    (lambda: du.NoiseSchedule.from_betas(torch.rand(2, 5)), r"1-D tensor of shape \(T,\)"),
    (lambda: du.NoiseSchedule.from_betas(torch.tensor([])), r"T >= 1"),
    (lambda: du.NoiseSchedule.from_betas(torch.tensor([0.1, 1.5])), r"lie in \(0, 1\)"),
    (lambda: du.NoiseSchedule.from_betas(torch.tensor([0.0, 0.1])), r"lie in \(0, 1\)"),
    (lambda: du.NoiseSchedule.create("cosin", 10), r"expected one of"),
])
def test_value_errors_name_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


SCHEDULE = du.NoiseSchedule.create("cosine", 10)
X = torch.zeros(2, 3, 4, 4)


def extract(t):
    return du.extract(SCHEDULE.betas, t, X.shape)


def posterior(xt, t):
    return du.q_posterior_mean_variance(X, xt, t, SCHEDULE)


@pytest.mark.parametrize("call, message", [
    (lambda: extract(torch.tensor([0.0, 1.0])), r"integer tensor.*float32"),
    (lambda: extract(torch.tensor([[0, 1]])), r"1-D integer tensor.*\(1, 2\)"),
    (lambda: extract(3), r"1-D integer tensor.*got int"),
    (lambda: extract(torch.tensor([True, False])), r"integer tensor"),
    (lambda: extract(torch.tensor([0, 10])), r"\[0, T\) = \[0, 10\).*\[0, 10\]"),
    (lambda: extract(torch.tensor([-1, 3])), r"\[0, T\) = \[0, 10\)"),
    (lambda: extract(torch.tensor([1, 2, 3])),
     r"one timestep per batch item: expected shape \(2,\), got \(3,\)"),
    (lambda: du.q_sample(X, torch.tensor([0, 10]), torch.zeros_like(X), SCHEDULE), r"\[0, 10\)"),
    (lambda: du.q_sample(X, torch.tensor([0, 1]), torch.zeros(2, 3, 4), SCHEDULE),
     r"eps must have the shape of x0, \(2, 3, 4, 4\), got \(2, 3, 4\)"),
    (lambda: du.q_sample(X, torch.tensor([0]), torch.zeros_like(X), SCHEDULE),
     r"expected shape \(2,\), got \(1,\)"),
    (lambda: du.q_sample(X, torch.tensor([0.5, 1.0]), torch.zeros_like(X), SCHEDULE),
     r"integer tensor"),
    (lambda: posterior(torch.zeros(2, 3, 4, 5), torch.tensor([0, 1])),
     r"xt must have the shape of x0"),
    (lambda: posterior(X, torch.tensor([1, 11])), r"\[0, T\) = \[0, 10\)"),
    (lambda: posterior(X, torch.tensor([1, 2, 3])), r"one timestep per batch item"),
])
def test_value_errors_for_timesteps_and_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()
