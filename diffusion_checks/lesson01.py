"""Checks of lesson 01's exercises (the forward process)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, snapshot, to_device, yours_if_passed)


# ── 01 · Forward process ─────────────────────────────────────────────────────────────


def _call_01(fn, *args, **kwargs):
    """:func:`call`, turning the crashes typical of lesson 01 into hints."""
    try:
        return call(fn, *args, **kwargs)
    except IndexError as err:
        fail(f"indexing failed ({err}) — is a timestep off by one (t + 1 or t - 1)? "
             "Valid timesteps are 0 .. T-1")
    except RuntimeError as err:
        if "size of tensor" not in str(err) and "broadcast" not in str(err):
            raise
        fail(f"shapes do not broadcast ({err}) — per-timestep values of shape (B,) must be "
             "reshaped to (B, 1, 1, 1) before multiplying images (B, C, H, W); du.extract does it")


def _args_text(T: int, kwargs: dict) -> str:
    return ", ".join([str(T)] + [f"{k}={v}" for k, v in kwargs.items()])


def _betas_from_alpha_bar_grid(alpha_bar: Tensor, max_beta: float | None) -> Tensor:
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas if max_beta is None else betas.clamp(max=max_beta)


def _schedule_output(out, T: int, what: str, alpha_bar_grid: Tensor | None = None) -> Tensor:
    """Shape checks shared by the schedule exercises, naming the usual off-by-one."""
    if isinstance(out, Tensor) and out.ndim == 1 and out.shape[0] == T - 1:
        fail(f"{what} has {T - 1} values instead of T = {T}: the grid t = 0, 1, ..., T has "
             f"T + 1 points (torch.linspace(0, T, T + 1)), and T + 1 values of ᾱ give T betas")
    if isinstance(out, Tensor) and out.ndim == 1 and out.shape[0] == T + 1:
        if alpha_bar_grid is not None and close(out, alpha_bar_grid):
            fail(f"{what} holds the T + 1 values of ᾱ on the grid; return the T betas "
                 "β_t = 1 - ᾱ(t+1) / ᾱ(t)")
        fail(f"{what} has T + 1 = {T + 1} values; there is one beta per step: T = {T}")
    if isinstance(out, Tensor) and out.dtype == torch.float32:
        fail(f"{what} should have dtype torch.float64, got torch.float32: schedules are "
             "computed in float64, e.g. torch.linspace(..., dtype=torch.float64)")
    return expect_tensor(out, shape=(T,), dtype=torch.float64, what=what)


def _ramp(a: float, b: float, T: int) -> Tensor:
    return torch.linspace(a, b, T, dtype=torch.float64)


@exercise_check("Exercise 1 · The linear schedule")
def check_linear_beta_schedule(fn) -> str:
    cases = [(1000, {}), (200, {}), (50, {}), (100, dict(beta_start=1e-3, beta_end=0.05))]
    for T, kwargs in cases:
        what = f"linear_beta_schedule({_args_text(T, kwargs)})"
        out = _schedule_output(_call_01(fn, T, **kwargs), T, what)
        start, end = kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02)
        scale = 1000 / T
        compare(out, du.linear_beta_schedule(T, **kwargs), {
            "the endpoints are not scaled by 1000 / T (beta_start * 1000 / T, ...)":
                _ramp(start, end, T),
            "the endpoints are scaled by T / 1000; the scale is 1000 / T":
                _ramp(start / scale, end / scale, T),
            "the betas fall from beta_end to beta_start; they should rise":
                _ramp(end * scale, start * scale, T),
            "these are the alphas (1 - β_t), not the betas":
                1 - _ramp(start * scale, end * scale, T),
        }, what=what)
    return "betas rise linearly, scaled by 1000 / T, for T = 1000, 200, 50 and custom endpoints"


def _cosine_alpha_bar_grid(T: int, s: float, *, squared: bool = True) -> Tensor:
    steps = torch.linspace(0, T, T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * torch.pi / 2)
    f = f ** 2 if squared else f
    return f / f[0]


@exercise_check("Exercise 2 · The cosine schedule")
def check_cosine_beta_schedule(fn) -> str:
    cases = [(10, {}), (50, {}), (20, dict(s=0.1, max_beta=0.5)), (1000, {})]
    for T, kwargs in cases:
        what = f"cosine_beta_schedule({_args_text(T, kwargs)})"
        s, max_beta = kwargs.get("s", 0.008), kwargs.get("max_beta", 0.999)
        grid = _cosine_alpha_bar_grid(T, s)
        out = _schedule_output(_call_01(fn, T, **kwargs), T, what, alpha_bar_grid=grid)
        mistakes = {
            "the offset s is missing: f(t) = cos²((t/T + s) / (1 + s) · π/2)":
                _betas_from_alpha_bar_grid(_cosine_alpha_bar_grid(T, 0.0), max_beta),
            "f(t) uses cos, it should be cos² (square the cosine)":
                _betas_from_alpha_bar_grid(_cosine_alpha_bar_grid(T, s, squared=False), max_beta),
            "the betas are not clipped: β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)":
                _betas_from_alpha_bar_grid(grid, None),
            "these are ᾱ(t+1), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[1:],
            "these are ᾱ(t), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[:-1],
            "these are α_t = 1 - β_t, not the betas": 1 - du.cosine_beta_schedule(T, **kwargs),
        }
        if max_beta != 0.999:
            mistakes["the betas are clipped to 0.999 instead of max_beta"] = (
                _betas_from_alpha_bar_grid(grid, 0.999))
        compare(out, du.cosine_beta_schedule(T, **kwargs), mistakes, what=what)
    return "cosine betas match eq. 17 of Improved DDPM for T = 10, 50, 1000 and custom s, max_beta"


def _sigmoid_alpha_bar_grid(T, start, end, tau, *, scaled_ends=True, offset=True) -> Tensor:
    steps = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    ends_tau = tau if scaled_ends else 1.0
    v_start = torch.sigmoid(torch.tensor(start / ends_tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / ends_tau, dtype=torch.float64))
    v = torch.sigmoid((steps * (end - start) + (start if offset else 0.0)) / tau)
    return (v_end - v) / (v_end - v_start)


@exercise_check("Exercise 3 · The sigmoid schedule")
def check_sigmoid_beta_schedule(fn) -> str:
    cases = [(10, {}), (50, {}), (30, dict(start=-2.0, end=4.0, tau=0.7, max_beta=0.9)),
             (1000, {})]
    for T, kwargs in cases:
        what = f"sigmoid_beta_schedule({_args_text(T, kwargs)})"
        start, end = kwargs.get("start", -3.0), kwargs.get("end", 3.0)
        tau, max_beta = kwargs.get("tau", 1.0), kwargs.get("max_beta", 0.999)
        grid = _sigmoid_alpha_bar_grid(T, start, end, tau)
        out = _call_01(fn, T, **kwargs)
        if isinstance(out, Tensor) and out.numel() and not torch.isfinite(out).all():
            fail(f"{what} contains NaN or inf: ᾱ must fall from 1 to 0, "
                 "ᾱ = (v_end - v) / (v_end - v_start), so that you never divide by ᾱ = 0")
        out = _schedule_output(out, T, what, alpha_bar_grid=grid)
        compare(out, du.sigmoid_beta_schedule(T, **kwargs), {
            "tau is missing: every sigmoid argument is divided by the temperature tau":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(T, start, end, 1.0),
                                           max_beta),
            "v_start and v_end must use tau too: σ(start / tau), σ(end / tau)":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(
                    T, start, end, tau, scaled_ends=False), max_beta),
            "the sigmoid's argument is (τ·(end - start) + start) / tau: the + start is missing":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(
                    T, start, end, tau, offset=False), max_beta),
            "the betas are not clipped: β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)":
                _betas_from_alpha_bar_grid(grid, None),
            "these are ᾱ(t+1), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[1:],
            "these are ᾱ(t), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[:-1],
        }, what=what)
    return "sigmoid betas match Chen (2023) for T = 10, 50, 1000 and custom start, end, tau"


@exercise_check("Exercise 4 · How much signal is left: ᾱ_t")
def check_alpha_bars(fn) -> str:
    g = torch.Generator().manual_seed(1)
    cases = [du.cosine_beta_schedule(50), du.linear_beta_schedule(100),
             torch.empty(7).uniform_(0.01, 0.3, generator=g)]  # the last one in float32
    for betas in cases:
        what = f"alpha_bars_from_betas(betas of shape ({len(betas)},), {betas.dtype})"
        out = _call_01(fn, betas.clone())
        expect_tensor(out, shape=betas.shape, dtype=betas.dtype, what=what)
        right = torch.cumprod(1 - betas, dim=0)
        compare(out, du.alpha_bars_from_betas(betas), {
            "a cumulative sum; ᾱ_t is a cumulative product (torch.cumprod)":
                torch.cumsum(1 - betas, dim=0),
            "the product of the betas; ᾱ_t multiplies α_s = 1 - β_s": torch.cumprod(betas, dim=0),
            "1 - Σ β_s is only a first-order approximation; multiply the α_s = 1 - β_s":
                1 - torch.cumsum(betas, dim=0),
            "shifted by one step: ᾱ_0 = 1 - β_0 (t = 0 is already one step of noise), "
            "not 1": torch.cat([betas.new_ones(1), right[:-1]]),
            "these are the α_t = 1 - β_t themselves; ᾱ_t is their cumulative product": 1 - betas,
        }, what=what)
    return "ᾱ_t = ∏_{s<=t} (1 - β_s) for float64 and float32 betas, dtype kept"


def _batch(shape, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _per_item(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


# The q_sample / posterior checks: (schedule name, T, timesteps). The first case avoids
# t = 0 and t = T-1, so that off-by-one versions compute a value the check can name.
_FORWARD_CASES = [("cosine", 50, [3, 17, 30, 45]), ("linear", 200, [0, 199, 100, 1]),
                  ("cosine", 20, [19, 0, 7, 7])]


def _q_sample_mistakes(x0: Tensor, t: Tensor, eps: Tensor, schedule) -> dict[str, Tensor]:
    """What the usual wrong versions of q_sample return, by hint."""
    ab, T = schedule.alpha_bars, schedule.T

    def mix(signal_var: Tensor, signal=x0, noise=eps) -> Tensor:  # signal_var: (B,)
        return (_per_item(signal_var.sqrt()) * signal
                + _per_item((1 - signal_var).sqrt()) * noise)

    a = ab[t]  # (B,)
    return {
        "the noise is scaled by (1 - ᾱ_t); it should be sqrt(1 - ᾱ_t)":
            _per_item(a.sqrt()) * x0 + _per_item(1 - a) * eps,
        "the signal is scaled by ᾱ_t; it should be sqrt(ᾱ_t)":
            _per_item(a) * x0 + _per_item((1 - a).sqrt()) * eps,
        "x0 and eps are swapped: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε": mix(a, eps, x0),
        "you used α_t = 1 - β_t (one step) instead of ᾱ_t (all steps up to t)":
            mix(schedule.alphas[t]),
        "you used β_t where ᾱ_t belongs": mix(schedule.betas[t]),
        "off by one: you used ᾱ_{t-1} (alpha_bars[t - 1] or alpha_bar_prev[t]); "
        "q_sample needs ᾱ_t": mix(ab[t - 1]),
        "off by one: you used ᾱ_{t+1} (alpha_bars[t + 1]); q_sample needs ᾱ_t":
            mix(ab[(t + 1).clamp(max=T - 1)]),
        "every item used the first item's timestep t[0]; each item needs its own ᾱ_t: "
        "index with the whole t and reshape to (B, 1, 1, 1)": mix(ab[t[:1]].expand(len(t))),
    }


@exercise_check("Exercise 5 · q_sample: jump straight to step t")
def check_q_sample(fn) -> str:
    for i, (name, T, timesteps) in enumerate(_FORWARD_CASES):
        schedule = du.NoiseSchedule.create(name, T)
        t = torch.tensor(timesteps)
        x0, eps = _batch((len(t), 3, 5, 6), seed=i)  # W = 6 != B: (B,) * (B, C, H, W) fails
        what = f"q_sample on a {name} schedule, T = {T}, t = {timesteps}"
        out = _call_01(fn, x0.clone(), t.clone(), eps.clone(), schedule)
        expect_tensor(out, shape=x0.shape, dtype=torch.float32, what=what)
        compare(out, du.q_sample(x0, t, eps, schedule), _q_sample_mistakes(x0, t, eps, schedule),
                what=what)
    return "x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε with a different t per item, several T"


def _posterior(x0, xt, t, schedule, *, prev=None, coef_x0=None, coef_xt=None):
    """Mean and variance from the schedule's float32 fields, with parts replaced (mistakes)."""
    beta, alpha, ab = schedule.betas[t], schedule.alphas[t], schedule.alpha_bars[t]  # (B,)
    prev = schedule.alpha_bar_prev[t] if prev is None else prev
    c0 = beta * prev.sqrt() / (1 - ab) if coef_x0 is None else coef_x0
    ct = alpha.sqrt() * (1 - prev) / (1 - ab) if coef_xt is None else coef_xt
    return _per_item(c0) * x0 + _per_item(ct) * xt, _per_item(beta * (1 - prev) / (1 - ab))


_WRAPPED_PREV = ("at t = 0, ᾱ_{t-1} must be 1 (nothing before the first step): use "
                 "schedule.alpha_bar_prev; alpha_bars[t - 1] wraps around to the last step")


def _posterior_mistakes(x0, xt, t, schedule) -> tuple[dict, dict]:
    """What the usual wrong versions return, by hint: (for the mean, for the variance)."""
    beta, alpha = schedule.betas[t], schedule.alphas[t]  # (B,)
    ab, prev = schedule.alpha_bars[t], schedule.alpha_bar_prev[t]
    wrapped = _posterior(x0, xt, t, schedule, prev=schedule.alpha_bars[t - 1])
    mean = {
        "the two coefficients are swapped: β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t) multiplies x_0":
            _posterior(xt, x0, t, schedule)[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in both coefficients)":
            _posterior(x0, xt, t, schedule, prev=ab)[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in the x_0 coefficient)":
            _posterior(x0, xt, t, schedule, coef_x0=beta * ab.sqrt() / (1 - ab))[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in the x_t coefficient)":
            _posterior(x0, xt, t, schedule, coef_xt=alpha.sqrt())[0],
        "a square root is missing: the x_0 coefficient has sqrt(ᾱ_{t-1})":
            _posterior(x0, xt, t, schedule, coef_x0=beta * prev / (1 - ab))[0],
        "a square root is missing: the x_t coefficient has sqrt(α_t)":
            _posterior(x0, xt, t, schedule, coef_xt=alpha * (1 - prev) / (1 - ab))[0],
        _WRAPPED_PREV: wrapped[0],
    }
    variance = {
        "the variance is β_t; the posterior's is β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)":
            _per_item(beta),
        "this is the standard deviation sqrt(β̃_t); return the variance β̃_t":
            _posterior(x0, xt, t, schedule)[1].sqrt(),
        _WRAPPED_PREV: wrapped[1],
    }
    return mean, variance


def _expect_pair(out, what: str):
    if out is None:
        fail(f"{what} returned None — did you forget the `return` statement?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(f"{what} should return a pair (mean, variance), got {type(out).__name__}")
    return out


@exercise_check("Exercise 6 · One step back: the posterior")
def check_q_posterior(fn) -> str:
    for i, (name, T, timesteps) in enumerate(_FORWARD_CASES):
        schedule = du.NoiseSchedule.create(name, T)
        t = torch.tensor(timesteps)
        x0, xt = _batch((len(t), 3, 5, 6), seed=10 + i)
        what = f"q_posterior_mean_variance on a {name} schedule, T = {T}, t = {timesteps}"
        mean, variance = _expect_pair(_call_01(fn, x0.clone(), xt.clone(), t.clone(), schedule),
                                      what)
        expect_tensor(mean, shape=x0.shape, what=f"the mean from {what}")
        expect_tensor(variance, shape=(len(t), 1, 1, 1), what=f"the variance from {what}")
        ref_mean, ref_var = du.q_posterior_mean_variance(x0, xt, t, schedule)
        mean_mistakes, var_mistakes = _posterior_mistakes(x0, xt, t, schedule)
        # float32 1 - ᾱ_t loses digits at small t: tolerances a little looser than elsewhere
        compare(mean, ref_mean, mean_mistakes, what=f"the mean from {what}", atol=1e-4, rtol=1e-3)
        compare(variance, ref_var, var_mistakes, what=f"the variance from {what}",
                atol=1e-6, rtol=1e-3)
    return "posterior mean and variance (DDPM eqs. 6-7), a different t per item, t = 0 included"
