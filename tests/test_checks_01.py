"""Tests of lesson 01's exercise checks: the reference passes, a stub is "not attempted",
a missing return is named, and each planted mistake fails with its own hint."""
import math

import pytest
import torch

import diffusion_checks as dc
import diffusion_utilities as du

F64 = torch.float64


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


def expect_hint(check, fn, hint):
    with pytest.raises(AssertionError) as err:
        check(fn)
    assert hint in str(err.value), str(err.value)


# ── learner-style versions that are right (other code, same maths): they must pass ──


def learner_q_sample(x0, t, eps, schedule):
    alpha_bar_t = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def learner_posterior(x0, xt, t, schedule):
    shape = (-1, 1, 1, 1)
    beta = schedule.betas[t].view(shape)
    alpha = schedule.alphas[t].view(shape)
    ab, prev = schedule.alpha_bars[t].view(shape), schedule.alpha_bar_prev[t].view(shape)
    mean = beta * prev.sqrt() / (1 - ab) * x0 + alpha.sqrt() * (1 - prev) / (1 - ab) * xt
    return mean, beta * (1 - prev) / (1 - ab)


def learner_cosine_float32(T, *, s=0.008, max_beta=0.999):
    steps = torch.arange(T + 1) / T  # float32 all the way, converted at the end
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta).double()


@pytest.mark.parametrize("check, fn", [
    (dc.check_q_sample, learner_q_sample),
    (dc.check_q_posterior, learner_posterior),
    (dc.check_cosine_beta_schedule, learner_cosine_float32),
], ids=["q_sample", "posterior", "cosine_float32"])
def test_other_right_versions_pass(check, fn):
    assert check(fn) is True


# ── linear_beta_schedule ──


def linear_unscaled(T, *, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start, beta_end, T, dtype=F64)


def linear_t_plus_one(T, *, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start * 1000 / T, beta_end * 1000 / T, T + 1, dtype=F64)


def linear_falling(T, *, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_end * 1000 / T, beta_start * 1000 / T, T, dtype=F64)


def linear_alphas(T, *, beta_start=1e-4, beta_end=0.02):
    return 1 - torch.linspace(beta_start * 1000 / T, beta_end * 1000 / T, T, dtype=F64)


def linear_float32(T, *, beta_start=1e-4, beta_end=0.02):
    return torch.linspace(beta_start * 1000 / T, beta_end * 1000 / T, T)


@pytest.mark.parametrize("fn, hint", [
    (linear_unscaled, "not scaled by 1000 / T"),
    (linear_t_plus_one, "one beta per step"),
    (linear_falling, "they should rise"),
    (linear_alphas, "alphas (1 - β_t)"),
    (linear_float32, "dtype torch.float64"),
])
def test_linear_mistakes(fn, hint):
    expect_hint(dc.check_linear_beta_schedule, fn, hint)


# ── cosine_beta_schedule ──


def cosine(T, s=0.008, max_beta=0.999, *, square=True, points=None, clip=True, out="betas"):
    steps = torch.linspace(0, T, T + 1 if points is None else points, dtype=F64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2)
    f = f ** 2 if square else f
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    betas = betas.clamp(max=max_beta) if clip else betas
    return {"betas": betas, "alpha_bar_next": alpha_bar[1:], "alpha_bar": alpha_bar}[out]


@pytest.mark.parametrize("fn, hint", [
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, 0.0, max_beta), "offset s is missing"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, square=False),
     "it should be cos²"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, clip=False), "not clipped"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, points=T), "T + 1 points"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, out="alpha_bar_next"),
     "these are ᾱ(t+1), not the betas"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, max_beta, out="alpha_bar"),
     "holds the T + 1 values of ᾱ"),
    (lambda T, *, s=0.008, max_beta=0.999: cosine(T, s, 0.999), "instead of max_beta"),
], ids=["no_s", "cos", "no_clip", "grid_T_points", "alpha_bars", "alpha_bar_grid", "fixed_clip"])
def test_cosine_mistakes(fn, hint):
    expect_hint(dc.check_cosine_beta_schedule, fn, hint)


# ── sigmoid_beta_schedule ──


def sigmoid(T, start=-3.0, end=3.0, tau=1.0, max_beta=0.999, *, ends_tau=True, offset=True,
            clip=True, points=None, rising=False):
    steps = torch.linspace(0, 1, T + 1 if points is None else points, dtype=F64)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    v_start = sig(start / tau if ends_tau else start)
    v_end = sig(end / tau if ends_tau else end)
    v = torch.sigmoid((steps * (end - start) + (start if offset else 0.0)) / tau)
    alpha_bar = ((v - v_start) if rising else (v_end - v)) / (v_end - v_start)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta) if clip else betas


@pytest.mark.parametrize("kw, hint", [
    (dict(), None),
    (dict(tau_off=True), "tau is missing"),
    (dict(ends_tau=False), "v_start and v_end must use tau"),
    (dict(offset=False), "the + start is missing"),
    (dict(clip=False), "not clipped"),
    (dict(points="T"), "T + 1 points"),
    (dict(rising=True), "ᾱ must fall from 1 to 0"),
], ids=["right", "no_tau", "ends_without_tau", "no_start", "no_clip", "grid", "rising"])
def test_sigmoid_versions(kw, hint):
    def fn(T, *, start=-3.0, end=3.0, tau=1.0, max_beta=0.999):
        options = dict(kw)
        if options.pop("tau_off", False):
            tau = 1.0
        if options.get("points") == "T":
            options["points"] = T
        return sigmoid(T, start, end, tau, max_beta, **options)

    if hint is None:
        assert dc.check_sigmoid_beta_schedule(fn) is True
    else:
        expect_hint(dc.check_sigmoid_beta_schedule, fn, hint)


# ── alpha_bars_from_betas ──


@pytest.mark.parametrize("fn, hint", [
    (lambda betas: torch.cumsum(1 - betas, dim=0), "cumulative sum"),
    (lambda betas: torch.cumprod(betas, dim=0), "product of the betas"),
    (lambda betas: torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)[:-1]]),
     "shifted by one step"),
    (lambda betas: 1 - torch.cumsum(betas, dim=0), "first-order approximation"),
    (lambda betas: 1 - betas, "α_t = 1 - β_t themselves"),
    (lambda betas: torch.cumprod(1 - betas, dim=0).float(), "dtype torch.float64"),
], ids=["cumsum", "prod_betas", "shifted", "one_minus_sum", "alphas", "float32"])
def test_alpha_bars_mistakes(fn, hint):
    expect_hint(dc.check_alpha_bars, fn, hint)


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


def q_sample_unshaped(x0, t, eps, schedule):
    return schedule.alpha_bars[t].sqrt() * x0 + (1 - schedule.alpha_bars[t]).sqrt() * eps


@pytest.mark.parametrize("fn, hint", [
    (q_sample_with(alpha_bar, noise_sqrt=False), "noise is scaled by (1 - ᾱ_t)"),
    (q_sample_with(alpha_bar, signal_sqrt=False), "signal is scaled by ᾱ_t"),
    (q_sample_with(lambda s, t: s.alphas[t]), "α_t = 1 - β_t (one step)"),
    (q_sample_with(lambda s, t: s.betas[t]), "β_t where ᾱ_t belongs"),
    (q_sample_with(lambda s, t: s.alpha_bars[t - 1]), "off by one: you used ᾱ_{t-1}"),
    (q_sample_with(lambda s, t: s.alpha_bar_prev[t]), "off by one: you used ᾱ_{t-1}"),
    (q_sample_with(lambda s, t: s.alpha_bars[t + 1]), "ᾱ_{t+1}"),
    (q_sample_with(lambda s, t: s.alpha_bars[t[0]].expand(len(t))), "first item's timestep"),
    (q_sample_with(alpha_bar, swap=True), "x0 and eps are swapped"),
    (q_sample_unshaped, "reshaped to (B, 1, 1, 1)"),
], ids=["noise_no_sqrt", "signal_no_sqrt", "alphas", "betas", "t_minus_1", "prev", "t_plus_1",
        "t0_for_batch", "swapped", "no_reshape"])
def test_q_sample_mistakes(fn, hint):
    expect_hint(dc.check_q_sample, fn, hint)


def test_q_sample_t_plus_one_at_the_last_step_is_named():
    """Alone on a case with t = T-1, alpha_bars[t + 1] crashes: the crash gets the hint."""
    fn = q_sample_with(lambda s, t: s.alpha_bars[t + 1])
    with pytest.raises(AssertionError, match="off by one"):
        dc.lesson01._call_01(fn, torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]), torch.zeros(2, 1, 2, 2),
                    du.NoiseSchedule.create("cosine", 10))


# ── q_posterior_mean_variance ──


def posterior_with(*, prev=None, sqrt_prev=True, sqrt_alpha=True, swap=False, variance="posterior",
                   squeeze=False, only_mean=False):
    def fn(x0, xt, t, schedule):
        shape = (-1, 1, 1, 1)
        beta, alpha = schedule.betas[t].view(shape), schedule.alphas[t].view(shape)
        ab = schedule.alpha_bars[t].view(shape)
        ab_prev = (schedule.alpha_bar_prev[t] if prev is None else prev(schedule, t)).view(shape)
        c0 = beta * (ab_prev.sqrt() if sqrt_prev else ab_prev) / (1 - ab)
        ct = (alpha.sqrt() if sqrt_alpha else alpha) * (1 - ab_prev) / (1 - ab)
        mean = c0 * xt + ct * x0 if swap else c0 * x0 + ct * xt
        var = {"posterior": beta * (1 - ab_prev) / (1 - ab), "beta": beta,
               "std": (beta * (1 - ab_prev) / (1 - ab)).sqrt()}[variance]
        if only_mean:
            return mean
        return mean, var.flatten() if squeeze else var
    return fn


@pytest.mark.parametrize("fn, hint", [
    (posterior_with(swap=True), "coefficients are swapped"),
    (posterior_with(prev=lambda s, t: s.alpha_bars[t]), "ᾱ_t where ᾱ_{t-1} belongs"),
    (posterior_with(sqrt_prev=False), "x_0 coefficient has sqrt(ᾱ_{t-1})"),
    (posterior_with(sqrt_alpha=False), "x_t coefficient has sqrt(α_t)"),
    (posterior_with(variance="beta"), "the variance is β_t"),
    (posterior_with(variance="std"), "standard deviation"),
    (posterior_with(prev=lambda s, t: s.alpha_bars[t - 1]), "wraps around to the last step"),
    (posterior_with(only_mean=True), "pair (mean, variance)"),
    (posterior_with(squeeze=True), "shape (4, 1, 1, 1)"),
], ids=["swapped", "alpha_bar_for_prev", "no_sqrt_prev", "no_sqrt_alpha", "beta_variance", "std",
        "wrapped_prev", "only_mean", "flat_variance"])
def test_posterior_mistakes(fn, hint):
    expect_hint(dc.check_q_posterior, fn, hint)
