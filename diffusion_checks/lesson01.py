"""Checks of lesson 01's exercises (the forward process)."""
from __future__ import annotations

import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, same_values, snapshot, to_device, yours_if_passed)


# ── 01 · Forward process ─────────────────────────────────────────────────────────────


_PER_ITEM_SHAPES = ("per-timestep values of shape (B,) must be reshaped to (B, 1, 1, 1) before "
                    "multiplying images (B, C, H, W); du.extract does it")
_GRID_SHAPES = ("the grid t = 0 .. T has T + 1 points, and ᾱ[1:] / ᾱ[:-1] pairs each one "
                "with the next: T ratios")


def _call_01(fn, *args, names: tuple[str, ...] = (), shapes: str = _PER_ITEM_SHAPES, **kwargs):
    """:func:`call_pure`, turning the crashes typical of lesson 01 into hints (``shapes``:
    what to say when two tensors' shapes do not fit)."""
    try:
        return call_pure(fn, *args, names=names, **kwargs)
    except IndexError as err:
        fail(f"indexing failed ({err}) — is a timestep off by one (t + 1 or t - 1)? "
             "Valid timesteps are 0 .. T-1")
    except RuntimeError as err:
        if "size of tensor" not in str(err) and "broadcast" not in str(err):
            raise
        fail(f"shapes do not fit ({err}) — {shapes}")


def _expect_repeatable(fn, args: tuple, names: tuple[str, ...], first: Tensor, *, what: str,
                       hint: str) -> None:
    """Fail with ``hint`` when a second call with the same inputs gives another result."""
    again = _call_01(fn, *(a.clone() if isinstance(a, Tensor) else a for a in args), names=names)
    again = again[0] if isinstance(again, (tuple, list)) and again else again
    if isinstance(again, Tensor) and again.shape == first.shape and not same_values(
            again, first, atol=0, rtol=0):
        fail(f"{what} gives a different result each time it is called with the same inputs — "
             + hint)


def _coefficient_hint(out: Tensor, terms: dict[str, tuple[Tensor, Tensor, str]],
                      item_names) -> str:
    """Which coefficient of ``out = Σ_k c_k · term_k`` (per item) is off, by least squares.

    ``terms`` maps a term's name to (the term (B, ...), the expected coefficients (B,), the
    coefficient's formula).
    """
    B = out.shape[0]
    A = torch.stack([v.detach().reshape(B, -1).double().cpu() for v, _, _ in terms.values()],
                    dim=-1)                                               # (B, n, k)
    y = out.detach().reshape(B, -1).double().cpu()                        # (B, n)
    coef = torch.linalg.lstsq(A, y[..., None]).solution[..., 0]           # (B, k)
    residual = (A @ coef[..., None])[..., 0] - y
    ratio = residual.norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)
    if (ratio > 1e-3).any():
        item = int(ratio.argmax())
        names = " + ".join(f"c · {name}" for name in terms)
        return (f"for item {item} ({item_names[item]}) the result is not of the form {names}: "
                "each term is a per-item number times an input, nothing else")
    expected = torch.stack([c.detach().double().cpu().reshape(B) for _, c, _ in terms.values()],
                           dim=-1)                                        # (B, k)
    worst = int((coef - expected).abs().argmax())
    item, k = divmod(worst, len(terms))
    name, (_, _, formula) = list(terms.items())[k]
    return (f"the coefficient of {name} is {coef[item, k]:.4g} at item {item} "
            f"({item_names[item]}); it should be {formula} = {expected[item, k]:.4g}")


# ── the schedules ──


def _args_text(T: int, kwargs: dict) -> str:
    return ", ".join([str(T)] + [f"{k}={v}" for k, v in kwargs.items()])


def _betas_from_alpha_bar_grid(alpha_bar: Tensor, max_beta: float | None) -> Tensor:
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas if max_beta is None else betas.clamp(max=max_beta)


def _grid_mistakes(grid: Tensor, max_beta: float) -> dict[str, Tensor]:
    """The usual ways from the T + 1 values of ᾱ on the grid to the T betas go wrong."""
    return {
        "the betas are not clipped: β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)":
            _betas_from_alpha_bar_grid(grid, None),
        "these are ᾱ(t+1), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[1:],
        "these are ᾱ(t), not the betas β_t = 1 - ᾱ(t+1) / ᾱ(t)": grid[:-1],
        "1 - ᾱ(t+1) is all the noise up to step t; β_t is one step's share: "
        "β_t = 1 - ᾱ(t+1) / ᾱ(t)": (1 - grid[1:]).clamp(max=max_beta),
        "the ratio is upside down: β_t = 1 - ᾱ(t+1) / ᾱ(t) (the later ᾱ on top)":
            (1 - grid[:-1] / grid[1:]).clamp(max=max_beta),
    }


_SCHEDULE_SHAPE = "there is one beta per step: a 1-D tensor of shape (T,)"


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
    return expect_tensor(out, shape=(T,), dtype=torch.float64, what=what,
                         shape_hint=_SCHEDULE_SHAPE)


def _ramp(a: float, b: float, T: int) -> Tensor:
    return torch.linspace(a, b, T, dtype=torch.float64)


def _steps(T: int) -> list[str]:
    return [f"t = {i}" for i in range(T)]


@exercise_check("Exercise 1 · The linear schedule")
def check_linear_beta_schedule(fn) -> str:
    cases = [(1000, {}), (200, {}), (50, {}), (100, dict(beta_start=1e-3, beta_end=0.05))]
    for T, kwargs in cases:
        what = f"linear_beta_schedule({_args_text(T, kwargs)})"
        start, end = kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02)
        scale = 1000 / T
        expected = du.linear_beta_schedule(T, **kwargs)
        grid = torch.linspace(start * scale, end * scale, T + 1, dtype=torch.float64)
        mistakes = {
            "the endpoints are not scaled by 1000 / T (beta_start * 1000 / T, ...)":
                _ramp(start, end, T),
            "the endpoints are scaled by T / 1000; the scale is 1000 / T":
                _ramp(start / scale, end / scale, T),
            "only beta_end is scaled by 1000 / T; scale beta_start too":
                _ramp(start, end * scale, T),
            "only beta_start is scaled by 1000 / T; scale beta_end too":
                _ramp(start * scale, end, T),
            "the betas fall from beta_end to beta_start; they should rise":
                _ramp(end * scale, start * scale, T),
            "these are the alphas (1 - β_t), not the betas": 1 - expected,
            "the ramp stops one step short of beta_end: torch.linspace(start, end, T) puts T "
            "points from start to end, both included (a step of (end - start) / T misses the "
            "end)": grid[:-1],
            "the ramp starts one step after beta_start: torch.linspace(start, end, T) puts T "
            "points from start to end, both included": grid[1:],
        }
        out = _schedule_output(_call_01(fn, T, names=("T",), shapes=_GRID_SHAPES, **kwargs), T, what)
        compare(out, expected, mistakes, what=what, item_names=_steps(T),
                term_hint=f"β_t rises in equal steps from beta_start · 1000 / T = "
                          f"{start * scale:.4g} to beta_end · 1000 / T = {end * scale:.4g}")
    return "betas rise linearly, scaled by 1000 / T, for T = 1000, 200, 50 and custom endpoints"


def _cosine_alpha_bar_grid(T: int, s: float, *, squared: bool = True,
                           quarter: bool = True) -> Tensor:
    steps = torch.linspace(0, T, T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * torch.pi / (2 if quarter else 1))
    f = f ** 2 if squared else f
    return f / f[0]


@exercise_check("Exercise 2 · The cosine schedule")
def check_cosine_beta_schedule(fn) -> str:
    cases = [(10, {}), (50, {}), (20, dict(s=0.1, max_beta=0.5)), (1000, {})]
    for T, kwargs in cases:
        what = f"cosine_beta_schedule({_args_text(T, kwargs)})"
        s, max_beta = kwargs.get("s", 0.008), kwargs.get("max_beta", 0.999)
        grid = _cosine_alpha_bar_grid(T, s)
        expected = du.cosine_beta_schedule(T, **kwargs)
        mistakes = {
            "the offset s is missing: f(t) = cos²((t/T + s) / (1 + s) · π/2)":
                _betas_from_alpha_bar_grid(_cosine_alpha_bar_grid(T, 0.0), max_beta),
            "f(t) uses cos, it should be cos² (square the cosine)":
                _betas_from_alpha_bar_grid(_cosine_alpha_bar_grid(T, s, squared=False), max_beta),
            "the angle runs up to π; it should end at π/2: f(t) = cos²((t/T + s) / (1 + s) · π/2)":
                _betas_from_alpha_bar_grid(_cosine_alpha_bar_grid(T, s, quarter=False), max_beta),
            **_grid_mistakes(grid, max_beta),
            "these are α_t = 1 - β_t, not the betas": 1 - expected,
        }
        if max_beta != 0.999:
            mistakes["the betas are clipped to 0.999 instead of max_beta"] = (
                _betas_from_alpha_bar_grid(grid, 0.999))
        out = _schedule_output(_call_01(fn, T, names=("T",), shapes=_GRID_SHAPES, **kwargs), T, what,
                               alpha_bar_grid=grid)
        compare(out, expected, mistakes, what=what, item_names=_steps(T),
                term_hint="compare ᾱ(t) = f(t) / f(0) on the grid t = 0 .. T, then "
                          "β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)")
    return "cosine betas match eq. 17 of Improved DDPM for T = 10, 50, 1000 and custom s, max_beta"


def _sigmoid_alpha_bar_grid(T, start, end, tau, *, scaled_ends=True, offset=True,
                            grid_end: float = 1.0) -> Tensor:
    steps = torch.linspace(0, grid_end, T + 1, dtype=torch.float64)
    ends_tau = tau if scaled_ends else 1.0
    v_start = torch.sigmoid(torch.tensor(start / ends_tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / ends_tau, dtype=torch.float64))
    v = torch.sigmoid((steps * (end - start) + (start if offset else 0.0)) / tau)
    return (v_end - v) / (v_end - v_start)


_SIGMOID_NOT_FINITE = ("ᾱ must fall from 1 to 0, ᾱ = (v_end - v) / (v_end - v_start), so that "
                       "you never divide by ᾱ = 0")


@exercise_check("Exercise 3 · The sigmoid schedule")
def check_sigmoid_beta_schedule(fn) -> str:
    cases = [(10, {}), (50, {}), (30, dict(start=-2.0, end=4.0, tau=0.7, max_beta=0.9)),
             (1000, {})]
    for T, kwargs in cases:
        what = f"sigmoid_beta_schedule({_args_text(T, kwargs)})"
        start, end = kwargs.get("start", -3.0), kwargs.get("end", 3.0)
        tau, max_beta = kwargs.get("tau", 1.0), kwargs.get("max_beta", 0.999)
        grid = _sigmoid_alpha_bar_grid(T, start, end, tau)
        expected = du.sigmoid_beta_schedule(T, **kwargs)
        mistakes = {
            "tau is missing: every sigmoid argument is divided by the temperature tau":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(T, start, end, 1.0),
                                           max_beta),
            "v_start and v_end must use tau too: σ(start / tau), σ(end / tau)":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(
                    T, start, end, tau, scaled_ends=False), max_beta),
            "the sigmoid's argument is (τ·(end - start) + start) / tau: the + start is missing":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(
                    T, start, end, tau, offset=False), max_beta),
            "τ = t / T runs from 0 to 1 (torch.linspace(0, 1, T + 1)), not from 0 to T":
                _betas_from_alpha_bar_grid(_sigmoid_alpha_bar_grid(
                    T, start, end, tau, grid_end=T), max_beta),
            **_grid_mistakes(grid, max_beta),
        }
        out = _call_01(fn, T, names=("T",), shapes=_GRID_SHAPES, **kwargs)
        if isinstance(out, Tensor) and out.numel() and not torch.isfinite(out).all():
            for hint, wrong in mistakes.items():  # mistakes that divide by ᾱ = 0
                if same_values(out, wrong):
                    fail(f"{what} contains NaN or inf: {hint}")
            fail(f"{what} contains NaN or inf: {_SIGMOID_NOT_FINITE}")
        out = _schedule_output(out, T, what, alpha_bar_grid=grid)
        compare(out, expected, mistakes, what=what, item_names=_steps(T),
                term_hint="compare ᾱ(τ) on the grid τ = t / T, t = 0 .. T, then "
                          "β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)")
    return "sigmoid betas match Chen (2023) for T = 10, 50, 1000 and custom start, end, tau"


# ── ᾱ_t ──


@exercise_check("Exercise 4 · How much signal is left: ᾱ_t")
def check_alpha_bars(fn) -> str:
    g = torch.Generator().manual_seed(1)
    cases = [du.cosine_beta_schedule(50), du.linear_beta_schedule(100),
             torch.empty(7).uniform_(0.01, 0.3, generator=g)]  # the last one in float32
    for betas in cases:
        T = len(betas)
        what = f"alpha_bars_from_betas(betas of shape ({T},), {betas.dtype})"
        expected = du.alpha_bars_from_betas(betas)
        mistakes = {
            "a cumulative sum; ᾱ_t is a cumulative product (torch.cumprod)":
                torch.cumsum(1 - betas, dim=0),
            "the product of the betas; ᾱ_t multiplies α_s = 1 - β_s": torch.cumprod(betas, dim=0),
            "1 - Σ β_s is only a first-order approximation; multiply the α_s = 1 - β_s":
                1 - torch.cumsum(betas, dim=0),
            "shifted by one step: ᾱ_0 = 1 - β_0 (t = 0 is already one step of noise), "
            "not 1": torch.cat([betas.new_ones(1), expected[:-1]]),
            "these are the α_t = 1 - β_t themselves; ᾱ_t is their cumulative product": 1 - betas,
            "these are 1 - ᾱ_t, the noise's share; ᾱ_t = ∏ (1 - β_s) is the signal's":
                1 - expected,
            "the product runs from the last step backwards; ᾱ_t multiplies the steps "
            "s = 0 .. t": (1 - betas).flip(0).cumprod(0).flip(0),
        }
        out = _call_01(fn, betas.clone(), names=("betas",))
        if isinstance(out, Tensor) and out.ndim == 0:
            fail(f"{what} is a single number (the product of all the 1 - β_s, torch.prod); "
                 "ᾱ_t is the running product, one value per step: torch.cumprod(..., dim=0)")
        if isinstance(out, Tensor) and out.shape == (T + 1,):
            fail(f"{what} has T + 1 = {T + 1} values: there is one ᾱ_t per β_t, and "
                 "ᾱ_0 = 1 - β_0 already (don't add a leading 1)")
        if isinstance(out, Tensor) and out.shape == betas.shape and out.dtype != betas.dtype:
            fail(f"{what} should have dtype {betas.dtype} (the dtype of betas), got {out.dtype}: "
                 "torch.cumprod(1 - betas, dim=0) keeps it, convert nothing")
        expect_tensor(out, shape=betas.shape, dtype=betas.dtype, what=what,
                      shape_hint="one ᾱ_t per β_t: the shape (T,) of betas")
        compare(out, expected, mistakes, what=what, item_names=_steps(T),
                term_hint="ᾱ_t = (1 - β_0)(1 - β_1) ··· (1 - β_t)")
    return "ᾱ_t = ∏_{s<=t} (1 - β_s) for float64 and float32 betas, dtype kept"


# ── q_sample and the posterior ──


def _batch(shape, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _per_item(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


# The q_sample / posterior checks: (schedule name, T, timesteps). The first case avoids
# t = 0 and t = T-1, so that off-by-one versions compute a value the check can name.
_FORWARD_CASES = [("cosine", 50, [3, 17, 30, 45]), ("linear", 200, [0, 199, 100, 1]),
                  ("cosine", 20, [19, 0, 7, 7])]

_Q_SAMPLE_ARGS = ("x0", "t", "eps", "schedule")


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
        "the noise is scaled by 1 - sqrt(ᾱ_t); it should be sqrt(1 - ᾱ_t) "
        "(the square root of the whole 1 - ᾱ_t)":
            _per_item(a.sqrt()) * x0 + _per_item(1 - a.sqrt()) * eps,
        "the square root is taken twice: schedule.sqrt_alpha_bars and "
        "schedule.sqrt_one_minus_alpha_bars are already square roots":
            _per_item(a.sqrt().sqrt()) * x0 + _per_item((1 - a).sqrt().sqrt()) * eps,
        "the noise term sqrt(1 - ᾱ_t) ε is missing": _per_item(a.sqrt()) * x0,
        "x0 and eps are swapped: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε": mix(a, eps, x0),
        "you used α_t = 1 - β_t (one step) instead of ᾱ_t (all steps up to t)":
            mix(schedule.alphas[t]),
        "you used β_t where ᾱ_t belongs": mix(schedule.betas[t]),
        "off by one: you used ᾱ_{t-1} (alpha_bars[t - 1] or alpha_bar_prev[t]); "
        "q_sample needs ᾱ_t": mix(ab[t - 1]),
        "off by one: you used ᾱ_{t+1} (alpha_bars[t + 1]); q_sample needs ᾱ_t":
            mix(ab[(t + 1).clamp(max=T - 1)]),
        "the timesteps run backwards: you used ᾱ_{T-1-t}; t = 0 is the first step (almost "
        "no noise), index alpha_bars[t]": mix(ab[T - 1 - t]),
        "every item used the first item's timestep t[0]; each item needs its own ᾱ_t: "
        "index with the whole t and reshape to (B, 1, 1, 1)": mix(ab[t[:1]].expand(len(t))),
    }


def _q_sample_nan(out, x0: Tensor, eps: Tensor, what: str) -> None:
    """Name the square root taken of a product with the image (NaN where it is negative)."""
    if not isinstance(out, Tensor) or out.shape != x0.shape or not out.isnan().any():
        return
    negative = (x0 < 0) | (eps < 0)
    if bool((out.isnan() <= negative).all()):
        fail(f"{what} contains NaN values where x0 or eps is negative: the square root "
             "belongs on ᾱ_t and 1 - ᾱ_t alone — sqrt(ᾱ_t) * x0, not sqrt(ᾱ_t * x0)")


@exercise_check("Exercise 5 · q_sample: jump straight to step t")
def check_q_sample(fn) -> str:
    probe = None  # the first case's inputs, for the device probe once the values are right
    for i, (name, T, timesteps) in enumerate(_FORWARD_CASES):
        schedule = du.NoiseSchedule.create(name, T)
        t = torch.tensor(timesteps)
        x0, eps = _batch((len(t), 3, 5, 6), seed=i)  # W = 6 != B: (B,) * (B, C, H, W) fails
        what = f"q_sample on a {name} schedule, T = {T}, t = {timesteps}"
        items = [f"t = {s}" for s in timesteps]
        expected = du.q_sample(x0, t, eps, schedule)         # the reference, before your code
        mistakes = _q_sample_mistakes(x0, t, eps, schedule)
        args = (x0, t, eps, schedule)
        out = _call_01(fn, x0.clone(), t.clone(), eps.clone(), schedule, names=_Q_SAMPLE_ARGS)
        _q_sample_nan(out, x0, eps, what)
        expect_tensor(out, shape=x0.shape, dtype=torch.float32, what=what)
        if not close(out, expected):
            _expect_repeatable(fn, args, _Q_SAMPLE_ARGS, out, what=what,
                               hint="use the eps passed in; don't draw new noise inside q_sample")
            ab = schedule.alpha_bars[t].double()
            hint = _coefficient_hint(out, {"x0": (x0, ab.sqrt(), "sqrt(ᾱ_t)"),
                                           "eps": (eps, (1 - ab).sqrt(), "sqrt(1 - ᾱ_t)")},
                                     items)
            compare(out, expected, mistakes, what=what, item_names=items, term_hint=hint)
        probe = probe or (args, what)
    probe_device(fn, *probe[0], what=probe[1])
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
    variance = _posterior(x0, xt, t, schedule)[1]
    mean = {
        "the two coefficients are swapped: β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t) multiplies x_0":
            _posterior(xt, x0, t, schedule)[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in both coefficients)":
            _posterior(x0, xt, t, schedule, prev=ab)[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in the x_0 coefficient)":
            _posterior(x0, xt, t, schedule, coef_x0=beta * ab.sqrt() / (1 - ab))[0],
        "ᾱ_t where ᾱ_{t-1} belongs (in the x_t coefficient)":
            _posterior(x0, xt, t, schedule, coef_xt=alpha.sqrt())[0],
        "sqrt(ᾱ_t) where sqrt(α_t) belongs: the x_t coefficient has sqrt(α_t), one step's α":
            _posterior(x0, xt, t, schedule, coef_xt=ab.sqrt() * (1 - prev) / (1 - ab))[0],
        "α_t where β_t belongs: the x_0 coefficient starts with β_t = 1 - α_t":
            _posterior(x0, xt, t, schedule, coef_x0=alpha * prev.sqrt() / (1 - ab))[0],
        "a square root is missing: the x_0 coefficient has sqrt(ᾱ_{t-1})":
            _posterior(x0, xt, t, schedule, coef_x0=beta * prev / (1 - ab))[0],
        "a square root is missing: the x_t coefficient has sqrt(α_t)":
            _posterior(x0, xt, t, schedule, coef_xt=alpha * (1 - prev) / (1 - ab))[0],
        "the denominators are 1 - ᾱ_t, not 1 - ᾱ_{t-1}":
            _posterior(x0, xt, t, schedule, coef_x0=beta * prev.sqrt() / (1 - prev),
                       coef_xt=alpha.sqrt())[0],
        _WRAPPED_PREV: wrapped[0],
    }
    variance_mistakes = {
        "the variance is β_t; the posterior's is β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)":
            _per_item(beta),
        "this is the standard deviation sqrt(β̃_t); return the variance β̃_t": variance.sqrt(),
        "the fraction is upside down: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)":
            _per_item(beta * (1 - ab) / (1 - prev)),
        "this is 1 - ᾱ_t, the variance of q(x_t | x_0); the posterior's is "
        "β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)": _per_item(1 - ab),
        _WRAPPED_PREV: wrapped[1],
    }
    return mean, variance_mistakes


_POSTERIOR_ARGS = ("x0", "xt", "t", "schedule")


def _posterior_pair(out, B: int, x_shape, what: str) -> tuple:
    """The returned (mean, variance); a missing return, another type or a swapped pair named."""
    if out is None:
        fail(f"{what} returned None — did you forget the `return` statement?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(f"{what} should return a pair (mean, variance), got {type(out).__name__}")
    mean, variance = out
    if (isinstance(mean, Tensor) and isinstance(variance, Tensor)
            and tuple(mean.shape) == (B, 1, 1, 1) and tuple(variance.shape) == tuple(x_shape)):
        fail(f"{what} returned (variance, mean): return the pair in the order (mean, variance)")
    return mean, variance


def _posterior_not_finite(value, t: Tensor, what: str) -> None:
    """Name a division by 1 - ᾱ_{t-1}: NaN or inf only at t = 0, where ᾱ_{t-1} = 1."""
    if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != len(t):
        return
    bad = ~torch.isfinite(value.detach()).reshape(len(t), -1).all(dim=1)  # (B,)
    if bad.any() and bool((t[bad] == 0).all()):
        fail(f"{what} is NaN or inf exactly where t = 0: there ᾱ_{{t-1}} = 1, so "
             "1 - ᾱ_{t-1} = 0 — it belongs in a numerator; the denominators are 1 - ᾱ_t")


def _log_variance(variance, expected: Tensor, t: Tensor, schedule, what: str) -> None:
    """Name the log of the variance (-inf at t = 0, or the schedule's clipped log)."""
    if not isinstance(variance, Tensor) or variance.shape != expected.shape:
        return
    clipped = _per_item(schedule.posterior_log_variance_clipped[t])
    later = t > 0
    if close(variance, clipped, atol=1e-4, rtol=1e-3) or (
            later.any() and close(variance[later], expected[later].log(), atol=1e-4, rtol=1e-3)):
        fail(f"{what} is the log of the variance: return the variance β̃_t itself "
             "(schedule.posterior_variance, or β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t))")


@exercise_check("Exercise 6 · One step back: the posterior")
def check_q_posterior(fn) -> str:
    probe = None  # the first case's inputs, for the device probe once the values are right
    for i, (name, T, timesteps) in enumerate(_FORWARD_CASES):
        schedule = du.NoiseSchedule.create(name, T)
        t = torch.tensor(timesteps)
        x0, xt = _batch((len(t), 3, 5, 6), seed=10 + i)
        B = len(t)
        what = f"q_posterior_mean_variance on a {name} schedule, T = {T}, t = {timesteps}"
        items = [f"t = {s}" for s in timesteps]
        ref_mean, ref_var = du.q_posterior_mean_variance(x0, xt, t, schedule)  # before yours
        mean_mistakes, var_mistakes = _posterior_mistakes(x0, xt, t, schedule)
        args = (x0, xt, t, schedule)
        out = _call_01(fn, x0.clone(), xt.clone(), t.clone(), schedule, names=_POSTERIOR_ARGS)
        mean, variance = _posterior_pair(out, B, x0.shape, what)
        what_mean, what_var = f"the mean from {what}", f"the variance from {what}"
        _log_variance(variance, ref_var, t, schedule, what_var)
        _posterior_not_finite(mean, t, what_mean)
        _posterior_not_finite(variance, t, what_var)
        expect_tensor(mean, shape=x0.shape, what=what_mean)
        var_shape_hint = (
            "the variance is one number per item, it does not depend on x_0 or x_t"
            if isinstance(variance, Tensor) and variance.numel() > B else
            "one number per item, reshaped to (B, 1, 1, 1) (du.extract does it, or "
            ".view(-1, 1, 1, 1))")
        expect_tensor(variance, shape=(B, 1, 1, 1), what=what_var, shape_hint=var_shape_hint)
        if not (close(mean, ref_mean, atol=1e-4, rtol=1e-3)
                and close(variance, ref_var, atol=1e-6, rtol=1e-3)):
            _expect_repeatable(fn, args, _POSTERIOR_ARGS, mean, what=what,
                               hint="the posterior has no randomness: return its mean and "
                                    "variance, don't draw a sample")
        # float32 1 - ᾱ_t loses digits at small t: tolerances a little looser than elsewhere
        if not close(mean, ref_mean, atol=1e-4, rtol=1e-3):
            hint = _coefficient_hint(mean, {
                "x0": (x0, schedule.posterior_mean_coef_x0[t],
                       "β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t)"),
                "xt": (xt, schedule.posterior_mean_coef_xt[t],
                       "sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t)")}, items)
            compare(mean, ref_mean, mean_mistakes, what=what_mean, atol=1e-4, rtol=1e-3,
                    item_names=items, term_hint=hint)
        compare(variance, ref_var, var_mistakes, what=what_var, atol=1e-6, rtol=1e-3,
                item_names=items, term_hint="β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), one number "
                                            "per item (0 at t = 0)")
        probe = probe or (args, what)
    probe_device(fn, *probe[0], what=probe[1])
    return "posterior mean and variance (DDPM eqs. 6-7), a different t per item, t = 0 included"
