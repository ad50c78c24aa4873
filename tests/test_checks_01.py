"""Tests of lesson 01's exercise checks: the reference passes, a stub is "not attempted", a
missing return is named, right versions written in other forms pass, and each planted mistake
(the ones learners make, an input changed in place, a tensor made on the CPU, a NaN) fails with
a hint that names it."""
import math

import numpy as np
import pytest
import torch

import diffusion_checks as dc
import diffusion_utilities as du
from check_helpers import cases

F64 = torch.float64
GENERIC = "differs from the reference"
IN_PLACE = "in place (an in-place operation"
DEVICE = "is created on the CPU inside your code"
NAN = "contains NaN values"

pytestmark = pytest.mark.usefixtures("one_thread")


def stub(*args, **kwargs):
    raise NotImplementedError()


def returns_none(*args, **kwargs):
    return None


CHECKS = {  # check -> the library's reference
    "linear": (dc.check_linear_beta_schedule, du.linear_beta_schedule),
    "cosine": (dc.check_cosine_beta_schedule, du.cosine_beta_schedule),
    "sigmoid": (dc.check_sigmoid_beta_schedule, du.sigmoid_beta_schedule),
    "alpha_bars": (dc.check_alpha_bars, du.alpha_bars_from_betas),
    "q_sample": (dc.check_q_sample, du.q_sample),
    "posterior": (dc.check_q_posterior, du.q_posterior_mean_variance),
}


@pytest.mark.parametrize("name", CHECKS)
def test_reference_passes(name, capsys):
    check, reference = CHECKS[name]
    assert check(reference) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKS)
def test_stub_is_not_attempted(name, capsys):
    check, _ = CHECKS[name]
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKS)
def test_missing_return_is_named(name):
    check, _ = CHECKS[name]
    with pytest.raises(AssertionError, match="forget the `return`"):
        check(returns_none)


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _ in CHECKS.values()] == [
        "Exercise 1 · The linear schedule", "Exercise 2 · The cosine schedule",
        "Exercise 3 · The sigmoid schedule", "Exercise 4 · How much signal is left: ᾱ_t",
        "Exercise 5 · q_sample: jump straight to step t",
        "Exercise 6 · One step back: the posterior"]


# ── the schedules ──


def scale(T):
    return 1000 / T


def linear_from(ramp):
    """A learner's linear schedule returning ``ramp(beta_start, beta_end, T)``."""
    def linear_beta_schedule(T, *, beta_start=1e-4, beta_end=0.02):
        return ramp(beta_start, beta_end, T)
    return linear_beta_schedule


def right_ramp(a, b, T):
    return torch.linspace(a * scale(T), b * scale(T), T, dtype=F64)


def linear_float32_then_float64(a, b, T):
    return torch.linspace(a * scale(T), b * scale(T), T).double()


def linear_arange(a, b, T):
    step = (b - a) * scale(T) / (T - 1) if T > 1 else 0.0
    return a * scale(T) + torch.arange(T, dtype=F64) * step


def linear_clamped_in_place(a, b, T):
    betas = torch.linspace(a * scale(T), b * scale(T), T, dtype=F64)
    return betas.clamp_(min=0.0, max=0.999)  # in place on its own tensor: fine


def cosine(T, s=0.008, max_beta=0.999, *, square=True, points=None, clip=True, out="betas",
           angle=math.pi / 2):
    steps = torch.linspace(0, T, T + 1 if points is None else points, dtype=F64)
    f = torch.cos((steps / T + s) / (1 + s) * angle)
    f = f ** 2 if square else f
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    betas = betas.clamp(max=max_beta) if clip else betas
    return {"betas": betas, "alpha_bar_next": alpha_bar[1:], "alpha_bar": alpha_bar,
            "one_minus_next": (1 - alpha_bar[1:]).clamp(max=max_beta),
            "upside_down": (1 - alpha_bar[:-1] / alpha_bar[1:]).clamp(max=max_beta),
            "alphas": 1 - betas}[out]


def cosine_from(**options):
    def cosine_beta_schedule(T, *, s=0.008, max_beta=0.999):
        return cosine(T, s, max_beta, **options)
    return cosine_beta_schedule


def cosine_float32(T, *, s=0.008, max_beta=0.999):
    steps = torch.arange(T + 1) / T  # float32 all the way, converted at the end
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta).double()


def cosine_python_loop(T, *, s=0.008, max_beta=0.999):
    def f(t):  # not normalised by f(0): the ratios are the same
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return torch.tensor([min(1 - f(t + 1) / f(t), max_beta) for t in range(T)], dtype=F64)


def cosine_minimum(T, *, s=0.008, max_beta=0.999):
    tau = torch.arange(T + 1, dtype=F64) / T
    alpha_bar = torch.cos((tau + s) / (1 + s) * torch.pi / 2).pow(2)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return torch.minimum(betas, torch.tensor(max_beta, dtype=F64))


def cosine_misaligned(T, *, s=0.008, max_beta=0.999):
    alpha_bar = cosine(T, s, max_beta, out="alpha_bar")
    return (1 - alpha_bar[1:] / alpha_bar[:-2]).clamp(max=max_beta)


def cosine_generic(T, *, s=0.008, max_beta=0.999):
    steps = torch.arange(T + 1, dtype=F64)
    f = torch.cos((steps + s) / (T + s) * math.pi / 2) ** 2  # s in the wrong place
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid(T, start=-3.0, end=3.0, tau=1.0, max_beta=0.999, *, ends_tau=True, offset=True,
            clip=True, points=None, rising=False, grid_end=1.0, upside_down=False,
            out="betas", times_tau=False):
    steps = torch.linspace(0, grid_end, T + 1 if points is None else points, dtype=F64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    v_start = sig(start / tau if ends_tau else start)
    v_end = sig(end / tau if ends_tau else end)
    arg = steps * (end - start) + (start if offset else 0.0)
    v = torch.sigmoid(arg * tau if times_tau else arg / tau)
    alpha_bar = ((v - v_start) if rising else (v_end - v)) / (v_end - v_start)
    if out == "alpha_bar_next":
        return alpha_bar[1:]
    betas = (1 - alpha_bar[:-1] / alpha_bar[1:]) if upside_down else (
        1 - alpha_bar[1:] / alpha_bar[:-1])
    return betas.clamp(max=max_beta) if clip else betas


def sigmoid_from(**options):
    def sigmoid_beta_schedule(T, *, start=-3.0, end=3.0, tau=1.0, max_beta=0.999):
        opts = dict(options)
        if opts.pop("tau_off", False):
            tau_used = 1.0
        else:
            tau_used = tau
        if opts.get("points") == "T":
            opts["points"] = T
        if opts.get("grid_end") == "T":
            opts["grid_end"] = float(T)
        return sigmoid(T, start, end, tau_used, max_beta, **opts)
    return sigmoid_beta_schedule


def sigmoid_expit_float64(T, *, start=-3.0, end=3.0, tau=1.0, max_beta=0.999):
    t = torch.arange(T + 1, dtype=F64) / T
    ends = torch.special.expit(torch.tensor([start, end], dtype=F64) / tau)
    alpha_bar = (ends[1] - torch.special.expit((t * (end - start) + start) / tau)) / (
        ends[1] - ends[0])
    return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)


def sigmoid_python_loop(T, *, start=-3.0, end=3.0, tau=1.0, max_beta=0.999):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    alpha_bar = [(v_end - sig((t / T * (end - start) + start) / tau)) / (v_end - v_start)
                 for t in range(T + 1)]
    return torch.tensor([min(1 - alpha_bar[t + 1] / alpha_bar[t], max_beta) for t in range(T)],
                        dtype=F64)


# ── ᾱ_t ──


def alpha_bars_loop(betas):
    out, running = torch.empty_like(betas), 1.0
    for t, beta in enumerate(betas):
        running = running * (1 - beta)
        out[t] = running
    return out


def alpha_bars_from_logs(betas):
    return torch.exp(torch.cumsum(torch.log1p(-betas), dim=0))


def alpha_bars_float64(betas):
    return torch.cumprod(1 - betas.double(), dim=0).to(betas.dtype)


def alpha_bars_in_place(betas):
    return torch.cumprod(betas.neg_().add_(1), dim=0)


def alpha_bars_mean_beta(betas):  # approximates every β_s by their mean
    return (1 - betas.mean()) ** torch.arange(1, len(betas) + 1)


# ── q_sample ──


def q_sample_with(signal_var, *, signal_sqrt=True, noise_sqrt=True, swap=False):
    """A learner's q_sample where ᾱ_t is looked up by ``signal_var(schedule, t)``."""
    def fn(x0, t, eps, schedule):
        a = signal_var(schedule, t).view(-1, 1, 1, 1)
        signal = a.sqrt() if signal_sqrt else a
        noise = (1 - a).sqrt() if noise_sqrt else 1 - a
        return signal * eps + noise * x0 if swap else signal * x0 + noise * eps
    return fn


def alpha_bar(schedule, t):
    return schedule.alpha_bars[t]


def q_sample_view(x0, t, eps, schedule):
    alpha_bar_t = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def q_sample_gather_float64(x0, t, eps, schedule):
    a = torch.gather(schedule.alpha_bars.double(), 0, t)[:, None, None, None]
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()


def q_sample_index_select(x0, t, eps, schedule):
    a = schedule.alpha_bars.index_select(0, t).reshape(len(t), 1, 1, 1)
    return torch.sqrt(a) * x0 + torch.sqrt(1.0 - a) * eps


def q_sample_loop(x0, t, eps, schedule):
    return torch.stack([schedule.sqrt_alpha_bars[ti] * x0[i]
                        + schedule.sqrt_one_minus_alpha_bars[ti] * eps[i]
                        for i, ti in enumerate(t)])


def q_sample_extract(x0, t, eps, schedule):
    signal = du.extract(schedule.sqrt_alpha_bars, t, x0.shape)
    return signal * x0 + du.extract(schedule.sqrt_one_minus_alpha_bars, t, x0.shape) * eps


def q_sample_unshaped(x0, t, eps, schedule):
    return schedule.alpha_bars[t].sqrt() * x0 + (1 - schedule.alpha_bars[t]).sqrt() * eps


def q_sample_one_minus_sqrt(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a.sqrt()) * eps


def q_sample_double_sqrt(x0, t, eps, schedule):
    signal = schedule.sqrt_alpha_bars[t].view(-1, 1, 1, 1).sqrt()
    return signal * x0 + schedule.sqrt_one_minus_alpha_bars[t].view(-1, 1, 1, 1).sqrt() * eps


def q_sample_no_noise(x0, t, eps, schedule):
    return schedule.alpha_bars[t].view(-1, 1, 1, 1).sqrt() * x0


def q_sample_sqrt_of_product(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return torch.sqrt(a * x0) + torch.sqrt((1 - a) * eps)


def q_sample_fresh_noise(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)


def q_sample_in_place(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return x0.mul_(a.sqrt()) + (1 - a).sqrt() * eps


def q_sample_schedule_in_place(x0, t, eps, schedule):
    root = schedule.alpha_bars.sqrt_()[t].view(-1, 1, 1, 1)
    return root * x0 + (1 - root ** 2).sqrt() * eps


def q_sample_cpu_ones(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (torch.ones(x0.shape) - a).sqrt() * eps


def q_sample_nan(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (a - 1).sqrt() * eps


def q_sample_own_schedule(x0, t, eps, schedule):
    alpha_bars = du.alpha_bars_from_betas(du.cosine_beta_schedule(schedule.T)).float()
    return q_sample_view(x0, t, eps, du.NoiseSchedule.from_betas(1 - alpha_bars / torch.cat(
        [alpha_bars.new_ones(1), alpha_bars[:-1]])))


# ── q_posterior_mean_variance ──


def posterior_with(*, prev=None, sqrt_prev=True, sqrt_alpha=True, swap=False, variance="posterior",
                   squeeze=False, only_mean=False, coef_x0=None, coef_xt=None, order="mean_var"):
    def fn(x0, xt, t, schedule):
        shape = (-1, 1, 1, 1)
        beta, alpha = schedule.betas[t].view(shape), schedule.alphas[t].view(shape)
        ab = schedule.alpha_bars[t].view(shape)
        ab_prev = (schedule.alpha_bar_prev[t] if prev is None else prev(schedule, t)).view(shape)
        c0 = beta * (ab_prev.sqrt() if sqrt_prev else ab_prev) / (1 - ab)
        ct = (alpha.sqrt() if sqrt_alpha else alpha) * (1 - ab_prev) / (1 - ab)
        c0 = c0 if coef_x0 is None else coef_x0(beta, alpha, ab, ab_prev)
        ct = ct if coef_xt is None else coef_xt(beta, alpha, ab, ab_prev)
        mean = c0 * xt + ct * x0 if swap else c0 * x0 + ct * xt
        posterior = beta * (1 - ab_prev) / (1 - ab)
        var = {"posterior": posterior, "beta": beta, "std": posterior.sqrt(),
               "upside_down": beta * (1 - ab) / (1 - ab_prev), "one_minus_ab": 1 - ab,
               "log": posterior.log(),
               "log_clipped": schedule.posterior_log_variance_clipped[t].view(shape),
               "full": posterior * torch.ones_like(x0), "nan": (posterior - 1).sqrt()}[variance]
        if only_mean:
            return mean
        var = var.flatten() if squeeze else var
        return (var, mean) if order == "var_mean" else (mean, var)
    return fn


def posterior_view(x0, xt, t, schedule):
    shape = (-1, 1, 1, 1)
    beta = schedule.betas[t].view(shape)
    alpha = schedule.alphas[t].view(shape)
    ab, prev = schedule.alpha_bars[t].view(shape), schedule.alpha_bar_prev[t].view(shape)
    mean = beta * prev.sqrt() / (1 - ab) * x0 + alpha.sqrt() * (1 - prev) / (1 - ab) * xt
    return mean, beta * (1 - prev) / (1 - ab)


def posterior_fields_index_select(x0, xt, t, schedule):
    def per_item(values):
        return values.index_select(0, t).view(len(t), 1, 1, 1)
    mean = per_item(schedule.posterior_mean_coef_x0) * x0 + per_item(
        schedule.posterior_mean_coef_xt) * xt
    return mean, per_item(schedule.posterior_variance)


def posterior_loop_float64(x0, xt, t, schedule):
    means, variances = [], []
    for i, ti in enumerate(t.tolist()):
        beta = schedule.betas[ti].double()
        ab = schedule.alpha_bars[ti].double()
        prev = ab / (1 - beta)  # ᾱ_{t-1} = ᾱ_t / α_t: 1 at t = 0
        means.append(beta * prev.sqrt() / (1 - ab) * x0[i].double()
                     + (1 - beta).sqrt() * (1 - prev) / (1 - ab) * xt[i].double())
        variances.append(beta * (1 - prev) / (1 - ab))
    return torch.stack(means).float(), torch.stack(variances).float().view(-1, 1, 1, 1)


def posterior_precision_form(x0, xt, t, schedule):
    """β̃_t = 1 / (α_t / β_t + 1 / (1 - ᾱ_{t-1})), the form completing the square gives."""
    mean, _ = posterior_view(x0, xt, t, schedule)
    beta = schedule.betas[t].view(-1, 1, 1, 1)
    prev = schedule.alpha_bar_prev[t].view(-1, 1, 1, 1)
    return mean, 1 / ((1 - beta) / beta + 1 / (1 - prev))


def posterior_precision_mean(x0, xt, t, schedule):
    """Both from completing the square: the mean is β̃_t (...), NaN at t = 0 (0 · inf)."""
    beta = schedule.betas[t].view(-1, 1, 1, 1)
    prev = schedule.alpha_bar_prev[t].view(-1, 1, 1, 1)
    variance = 1 / ((1 - beta) / beta + 1 / (1 - prev))
    mean = variance * ((1 - beta).sqrt() / beta * xt + prev.sqrt() / (1 - prev) * x0)
    return mean, variance


def posterior_sample(x0, xt, t, schedule):
    mean, var = posterior_view(x0, xt, t, schedule)
    return mean + var.sqrt() * torch.randn_like(mean), var


def posterior_in_place(x0, xt, t, schedule):
    mean, var = posterior_view(x0, xt, t, schedule)
    shape = (-1, 1, 1, 1)
    coef_xt = (schedule.alphas[t].sqrt() * (1 - schedule.alpha_bar_prev[t])
               / (1 - schedule.alpha_bars[t])).view(shape)
    xt.mul_(coef_xt)
    return mean, var


def posterior_cpu_zeros(x0, xt, t, schedule):
    mean, var = posterior_view(x0, xt, t, schedule)
    return mean + torch.zeros(x0.shape), var


def posterior_own_schedule(x0, xt, t, schedule):
    own = du.NoiseSchedule.create("cosine", schedule.T)
    return posterior_view(x0, xt, t, own)


# ── every planted mistake and every right version, by check ──

LINEAR_MISTAKES = [
    ("unscaled", linear_from(lambda a, b, T: torch.linspace(a, b, T, dtype=F64)),
     "not scaled by 1000 / T"),
    ("T_plus_one_points", linear_from(lambda a, b, T: torch.linspace(
        a * scale(T), b * scale(T), T + 1, dtype=F64)), "one beta per step"),
    ("falling", linear_from(lambda a, b, T: right_ramp(b, a, T)), "they should rise"),
    ("alphas", linear_from(lambda a, b, T: 1 - right_ramp(a, b, T)), "alphas (1 - β_t)"),
    ("float32", linear_from(lambda a, b, T: right_ramp(a, b, T).float()), "dtype torch.float64"),
    ("scaled_by_T_over_1000", linear_from(lambda a, b, T: torch.linspace(
        a / scale(T), b / scale(T), T, dtype=F64)), "scaled by T / 1000"),
    ("only_end_scaled", linear_from(lambda a, b, T: torch.linspace(
        a, b * scale(T), T, dtype=F64)), "only beta_end is scaled"),
    ("only_start_scaled", linear_from(lambda a, b, T: torch.linspace(
        a * scale(T), b, T, dtype=F64)), "only beta_start is scaled"),
    ("arange_step_short", linear_from(lambda a, b, T: a * scale(T) + torch.arange(
        T, dtype=F64) * (b - a) * scale(T) / T), "stops one step short of beta_end"),
    ("column", linear_from(lambda a, b, T: right_ramp(a, b, T)[:, None]),
     "got (1000, 1) — there is one beta per step: a 1-D tensor of shape (T,)"),
    ("numpy", linear_from(lambda a, b, T: np.linspace(a * scale(T), b * scale(T), T)),
     "should be a torch.Tensor"),
    ("nan", linear_from(lambda a, b, T: right_ramp(a, b, T) * (torch.tensor(0.0) / 0)), NAN),
    ("end_off", linear_from(lambda a, b, T: right_ramp(a, b * 1.05, T)),
     f"{GENERIC} (largest difference 0.001 at item 999 (t = 999)); β_t rises in equal steps"),
]
LINEAR_RIGHT = [("float32_then_float64", linear_from(linear_float32_then_float64)),
                ("arange", linear_from(linear_arange)),
                ("clamped_in_place", linear_from(linear_clamped_in_place))]

COSINE_MISTAKES = [
    ("no_s", lambda T, *, s=0.008, max_beta=0.999: cosine(T, 0.0, max_beta),
     "offset s is missing"),
    ("cos", cosine_from(square=False), "it should be cos²"),
    ("no_clip", cosine_from(clip=False), "not clipped"),
    ("grid_T_points", lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, points=T),
     "T + 1 points"),
    ("alpha_bar_next", cosine_from(out="alpha_bar_next"), "these are ᾱ(t+1), not the betas"),
    ("alpha_bar_grid", cosine_from(out="alpha_bar"), "holds the T + 1 values of ᾱ"),
    ("fixed_clip", lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, 0.999),
     "instead of max_beta"),
    ("angle_pi", cosine_from(angle=math.pi), "the angle runs up to π"),
    ("one_minus_alpha_bar", cosine_from(out="one_minus_next"), "1 - ᾱ(t+1) is all the noise"),
    ("upside_down", cosine_from(out="upside_down"), "the ratio is upside down"),
    ("alphas", cosine_from(out="alphas"), "these are α_t = 1 - β_t"),
    ("nan", lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta).log().log(), NAN),
    ("ratio_misaligned", cosine_misaligned, "each one with the next: T ratios"),
    ("s_in_the_wrong_place", cosine_generic,
     f"{GENERIC} (largest difference 0.00309 at item 0 (t = 0)); compare ᾱ(t) = f(t) / f(0)"),
]
COSINE_RIGHT = [("float32", cosine_float32), ("python_loop", cosine_python_loop),
                ("minimum", cosine_minimum)]

SIGMOID_MISTAKES = [
    ("no_tau", sigmoid_from(tau_off=True), "tau is missing"),
    ("ends_without_tau", sigmoid_from(ends_tau=False), "v_start and v_end must use tau"),
    ("no_start", sigmoid_from(offset=False), "the + start is missing"),
    ("no_clip", sigmoid_from(clip=False), "not clipped"),
    ("grid_T_points", sigmoid_from(points="T"), "T + 1 points"),
    ("rising", sigmoid_from(rising=True), "ᾱ must fall from 1 to 0"),
    ("grid_to_T", sigmoid_from(grid_end="T"), "runs from 0 to 1"),
    ("upside_down", sigmoid_from(upside_down=True), "contains NaN or inf: the ratio is upside down"),
    ("alpha_bar_next", sigmoid_from(out="alpha_bar_next"), "these are ᾱ(t+1), not the betas"),
    ("times_tau", sigmoid_from(times_tau=True),
     f"{GENERIC} (largest difference 0.77 at item 29 (t = 29)); compare ᾱ(τ) on the grid"),
]
SIGMOID_RIGHT = [("helper", sigmoid_from()), ("expit_float64", sigmoid_expit_float64),
                 ("python_loop", sigmoid_python_loop)]

ALPHA_BARS_MISTAKES = [
    ("cumsum", lambda betas: torch.cumsum(1 - betas, dim=0), "cumulative sum"),
    ("prod_betas", lambda betas: torch.cumprod(betas, dim=0), "product of the betas"),
    ("shifted", lambda betas: torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)[:-1]]),
     "shifted by one step"),
    ("one_minus_sum", lambda betas: 1 - torch.cumsum(betas, dim=0), "first-order approximation"),
    ("alphas", lambda betas: 1 - betas, "α_t = 1 - β_t themselves"),
    ("float32", lambda betas: torch.cumprod(1 - betas, dim=0).float(), "dtype torch.float64"),
    ("noise_share", lambda betas: 1 - torch.cumprod(1 - betas, dim=0), "the noise's share"),
    ("backwards", lambda betas: torch.cumprod((1 - betas).flip(0), 0).flip(0),
     "from the last step backwards"),
    ("prod", lambda betas: torch.prod(1 - betas), "a single number"),
    ("leading_one", lambda betas: torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)]),
     "don't add a leading 1"),
    ("in_place", alpha_bars_in_place, f"input `betas` {IN_PLACE}"),
    ("nan", lambda betas: torch.cumprod(1 - betas, 0) * (betas - 1).log(), NAN),
    ("mean_beta", alpha_bars_mean_beta,
     f"{GENERIC} (largest difference 0.674 at item 12 (t = 12)); ᾱ_t = (1 - β_0)(1 - β_1)"),
]
ALPHA_BARS_RIGHT = [("loop", alpha_bars_loop), ("logs", alpha_bars_from_logs),
                    ("float64", alpha_bars_float64)]

Q_SAMPLE_MISTAKES = [
    ("noise_no_sqrt", q_sample_with(alpha_bar, noise_sqrt=False), "noise is scaled by (1 - ᾱ_t)"),
    ("signal_no_sqrt", q_sample_with(alpha_bar, signal_sqrt=False), "signal is scaled by ᾱ_t"),
    ("alphas", q_sample_with(lambda s, t: s.alphas[t]), "α_t = 1 - β_t (one step)"),
    ("betas", q_sample_with(lambda s, t: s.betas[t]), "β_t where ᾱ_t belongs"),
    ("t_minus_1", q_sample_with(lambda s, t: s.alpha_bars[t - 1]), "off by one: you used ᾱ_{t-1}"),
    ("prev", q_sample_with(lambda s, t: s.alpha_bar_prev[t]), "off by one: you used ᾱ_{t-1}"),
    ("t_plus_1", q_sample_with(lambda s, t: s.alpha_bars[t + 1]), "ᾱ_{t+1}"),
    ("t0_for_batch", q_sample_with(lambda s, t: s.alpha_bars[t[0]].expand(len(t))),
     "first item's timestep"),
    ("swapped", q_sample_with(alpha_bar, swap=True), "x0 and eps are swapped"),
    ("no_reshape", q_sample_unshaped, "reshaped to (B, 1, 1, 1)"),
    ("one_minus_sqrt", q_sample_one_minus_sqrt, "the noise is scaled by 1 - sqrt(ᾱ_t)"),
    ("double_sqrt", q_sample_double_sqrt, "the square root is taken twice"),
    ("no_noise", q_sample_no_noise, "the noise term sqrt(1 - ᾱ_t) ε is missing"),
    ("reversed_t", q_sample_with(lambda s, t: s.alpha_bars[s.T - 1 - t]),
     "the timesteps run backwards"),
    ("sqrt_of_product", q_sample_sqrt_of_product, "NaN values where x0 or eps is negative"),
    ("fresh_noise", q_sample_fresh_noise, "use the eps passed in"),
    ("in_place", q_sample_in_place, f"input `x0` {IN_PLACE}"),
    ("schedule_in_place", q_sample_schedule_in_place, f"input `schedule.alpha_bars` {IN_PLACE}"),
    ("cpu_ones", q_sample_cpu_ones, DEVICE),
    ("nan", q_sample_nan, NAN),
    ("own_schedule", q_sample_own_schedule,
     f"{GENERIC} (largest difference 1.17 at item 2 (t = 100)); the coefficient of x0 is "
     "0.6972 at item 2 (t = 100); it should be sqrt(ᾱ_t) = 0.2698"),
]
Q_SAMPLE_RIGHT = [("view", q_sample_view), ("gather_float64", q_sample_gather_float64),
                  ("index_select", q_sample_index_select), ("loop", q_sample_loop),
                  ("extract", q_sample_extract)]

POSTERIOR_MISTAKES = [
    ("swapped", posterior_with(swap=True), "coefficients are swapped"),
    ("alpha_bar_for_prev", posterior_with(prev=lambda s, t: s.alpha_bars[t]),
     "ᾱ_t where ᾱ_{t-1} belongs"),
    ("no_sqrt_prev", posterior_with(sqrt_prev=False), "x_0 coefficient has sqrt(ᾱ_{t-1})"),
    ("no_sqrt_alpha", posterior_with(sqrt_alpha=False), "x_t coefficient has sqrt(α_t)"),
    ("beta_variance", posterior_with(variance="beta"), "the variance is β_t"),
    ("std", posterior_with(variance="std"), "standard deviation"),
    ("wrapped_prev", posterior_with(prev=lambda s, t: s.alpha_bars[t - 1]),
     "wraps around to the last step"),
    ("only_mean", posterior_with(only_mean=True), "pair (mean, variance)"),
    ("flat_variance", posterior_with(squeeze=True), "got (4,) — one number per item, reshaped"),
    ("sqrt_alpha_bar_in_xt", posterior_with(
        coef_xt=lambda b, a, ab, prev: ab.sqrt() * (1 - prev) / (1 - ab)),
     "sqrt(ᾱ_t) where sqrt(α_t) belongs"),
    ("alpha_for_beta", posterior_with(coef_x0=lambda b, a, ab, prev: a * prev.sqrt() / (1 - ab)),
     "α_t where β_t belongs"),
    ("denominators_prev", posterior_with(
        coef_x0=lambda b, a, ab, prev: b * prev.sqrt() / (1 - prev),
        coef_xt=lambda b, a, ab, prev: a.sqrt() * (1 - prev) / (1 - prev)),
     "the denominators are 1 - ᾱ_t"),
    ("variance_upside_down", posterior_with(variance="upside_down"), "the fraction is upside down"),
    ("variance_of_q_xt", posterior_with(variance="one_minus_ab"), "the variance of q(x_t | x_0)"),
    ("log_variance", posterior_with(variance="log"), "is the log of the variance"),
    ("log_variance_clipped", posterior_with(variance="log_clipped"), "is the log of the variance"),
    ("pair_swapped", posterior_with(order="var_mean"), "returned (variance, mean)"),
    ("variance_image_shaped", posterior_with(variance="full"),
     "it does not depend on x_0 or x_t"),
    ("sample", posterior_sample, "don't draw a sample"),
    ("nan_at_t0", posterior_precision_mean, "is NaN or inf exactly where t = 0"),
    ("in_place", posterior_in_place, f"input `xt` {IN_PLACE}"),
    ("cpu_zeros", posterior_cpu_zeros, DEVICE),
    ("nan", posterior_with(variance="nan"), NAN),
    ("own_schedule", posterior_own_schedule,
     f"{GENERIC} (largest difference 2.28 at item 1 (t = 199)); the coefficient of xt is "
     "0.03162 at item 1 (t = 199); it should be sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) = 0.9487"),
]
POSTERIOR_RIGHT = [("view", posterior_view), ("fields_index_select", posterior_fields_index_select),
                   ("loop_float64", posterior_loop_float64),
                   ("precision_form", posterior_precision_form)]

MISTAKES = {"linear": LINEAR_MISTAKES, "cosine": COSINE_MISTAKES, "sigmoid": SIGMOID_MISTAKES,
            "alpha_bars": ALPHA_BARS_MISTAKES, "q_sample": Q_SAMPLE_MISTAKES,
            "posterior": POSTERIOR_MISTAKES}
RIGHT = {"linear": LINEAR_RIGHT, "cosine": COSINE_RIGHT, "sigmoid": SIGMOID_RIGHT,
         "alpha_bars": ALPHA_BARS_RIGHT, "q_sample": Q_SAMPLE_RIGHT, "posterior": POSTERIOR_RIGHT}


@pytest.mark.parametrize("name, fn", cases(RIGHT, 2))
def test_right_versions_in_other_forms_pass(name, fn, capsys):
    assert CHECKS[name][0](fn) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name, fn, hint", cases(MISTAKES, 3))
def test_planted_mistakes_fail_with_their_hint(name, fn, hint):
    with pytest.raises(AssertionError) as err:
        CHECKS[name][0](fn)
    assert hint in str(err.value), str(err.value)
    if hint != NAN and "broadcast" not in hint:
        assert dc.BROADCAST_HINT not in str(err.value)


def test_every_check_has_in_place_device_and_nan_mistakes_where_they_apply():
    for name in ("alpha_bars", "q_sample", "posterior"):
        assert any(IN_PLACE in hint for _, _, hint in MISTAKES[name])
    for name in ("q_sample", "posterior"):
        assert any(hint == DEVICE for _, _, hint in MISTAKES[name])
    for name in CHECKS:
        assert any(NAN in hint or "NaN" in hint for _, _, hint in MISTAKES[name])
        assert len(RIGHT[name]) >= 2


def test_q_sample_t_plus_one_at_the_last_step_is_named():
    """Alone on a case with t = T-1, alpha_bars[t + 1] crashes: the crash gets the hint."""
    fn = q_sample_with(lambda s, t: s.alpha_bars[t + 1])
    with pytest.raises(AssertionError, match="off by one"):
        dc.lesson01._call_01(fn, torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]),
                             torch.zeros(2, 1, 2, 2), du.NoiseSchedule.create("cosine", 10))


def test_the_device_probe_runs_code_that_indexes_or_uses_du_extract():
    """On a machine without a GPU the probe uses `meta`: the learner's indexing runs there and
    its result is on meta; du.extract reads t's values, which read as 0 there, so it runs too."""
    schedule = du.NoiseSchedule.create("cosine", 10)
    x0, t = torch.zeros(2, 1, 2, 2), torch.tensor([0, 9])
    for fn in (q_sample_index_select, q_sample_extract):
        out = dc.probe_device(fn, x0, t, x0, schedule, what="q_sample")
        assert out is not None and out.device == dc.other_device()
