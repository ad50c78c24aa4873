"""Exercise checks: each lesson's exercises are followed by a call such as
``check_q_sample(q_sample)``.

A check
1. says "not attempted yet" (and returns ``False``) while the exercise still raises
   ``NotImplementedError``;
2. checks the type, shape and dtype of what came back and names what it expected
   (``None`` means a missing ``return``);
3. compares with the reference in ``diffusion_utilities`` on several cases, including
   the ones that expose the usual mistakes, and recognises those mistakes by name;
4. prints one pass line (and returns ``True``), or raises ``AssertionError`` with a hint.

The pass / not-attempted lines start with the fixed marks below, so tools (the grader)
can read a notebook's outputs.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

import diffusion_utilities as du

PASSED_MARK = "✔ PASSED"
NOT_ATTEMPTED_MARK = "○ NOT ATTEMPTED"


# ── Machinery shared by every check ──────────────────────────────────────────────────


class _NotAttempted(Exception):
    """Raised inside a check when the learner's code is still the stub."""


def exercise_check(exercise: str):
    """Turn ``body(fn, ...) -> str`` into a check for the exercise called ``exercise``.

    ``body`` raises ``AssertionError`` (through :func:`fail`) with a hint, or returns a
    short description of what passed.
    """

    def decorate(body: Callable[..., str]):
        @functools.wraps(body)
        def check(fn, *args, **kwargs) -> bool:
            if not callable(fn):
                raise TypeError(f"{body.__name__} expects your function `{exercise}` itself, "
                                f"got {type(fn).__name__}")
            try:
                detail = body(fn, *args, **kwargs)
            except _NotAttempted:
                print(f"{NOT_ATTEMPTED_MARK} {exercise}: not attempted yet — replace "
                      "`raise NotImplementedError()` with your code and run the cell again.")
                return False
            except AssertionError as err:
                raise AssertionError(f"{exercise}: {err}") from None
            print(f"{PASSED_MARK} {exercise}: {detail}")
            return True

        return check

    return decorate


def fail(hint: str):
    """Stop the check with a hint for the learner."""
    raise AssertionError(hint)


def call(fn, *args, **kwargs):
    """Call the learner's function; a stub turns into "not attempted"."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotAttempted from None


def expect_tensor(out, *, shape, dtype=torch.float32, what: str = "the result") -> Tensor:
    """Check ``out`` is a tensor of ``shape`` and ``dtype``; name what was expected."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, tuple) and len(out) == 1:
        fail(f"{what} is a 1-tuple — is there a stray comma after the returned expression?")
    if not isinstance(out, Tensor):
        fail(f"{what} should be a torch.Tensor of shape {tuple(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        fail(f"{what} should have shape {tuple(shape)}, got {tuple(out.shape)} — "
             "check how per-timestep values broadcast over the batch")
    if dtype is not None and out.dtype != dtype:
        fail(f"{what} should have dtype {dtype}, got {out.dtype}")
    if not torch.isfinite(out).all():
        fail(f"{what} contains NaN or inf values")
    return out


def close(a: Tensor, b: Tensor, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether two tensors agree within tolerances (shapes must match)."""
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


def compare(out: Tensor, expected: Tensor, mistakes: dict[str, Tensor], *, what: str,
            atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail unless ``out`` matches ``expected``; when it matches a known mistake, say which.

    ``mistakes`` maps a hint to the value that mistake produces.
    """
    if close(out, expected, atol=atol, rtol=rtol):
        return
    for hint, wrong in mistakes.items():
        if close(out, wrong, atol=atol, rtol=rtol):
            fail(f"{what} is not right: {hint}")
    err = (out.float() - expected.float()).abs().max().item()
    fail(f"{what} differs from the reference (largest difference {err:.3g}); "
         "compare your code with the equation above, term by term")


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


@exercise_check("linear_beta_schedule")
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


@exercise_check("cosine_beta_schedule")
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


@exercise_check("sigmoid_beta_schedule")
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


@exercise_check("alpha_bars_from_betas")
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


@exercise_check("q_sample")
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


@exercise_check("q_posterior_mean_variance")
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


# ── 02 · UNet ────────────────────────────────────────────────────────────────────────
# The module exercises (ResBlock, SelfAttention, the UNet's forward) give the learner a
# class whose __init__ is written; the check builds the reference module, gives every
# parameter a random value (so zero-initialised layers do something), copies the same
# weights into the learner's module and compares outputs on fixed inputs.

import math  # noqa: E402  (this lesson's imports, kept with its section)

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _scramble(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a deterministic random value of a sensible size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _learner_copy(cls, reference: nn.Module, *args, **kwargs) -> nn.Module:
    """Build the learner's module with ``cls(*args, **kwargs)`` and load ``reference``'s weights."""
    mine = cls(*args, **kwargs)
    if not isinstance(mine, nn.Module):
        fail(f"{cls.__name__}(...) should build an nn.Module, got {type(mine).__name__}")
    try:
        mine.load_state_dict(reference.state_dict())
    except RuntimeError as err:
        fail(f"{cls.__name__}'s layers differ from the ones given in __init__ — keep __init__ "
             f"as given and write only forward ({str(err).splitlines()[0]})")
    return mine.eval()


def _call_02(fn, *args, what: str, hint: str = "", **kwargs):
    """Call the learner's code; an error other than the stub's becomes a hint."""
    try:
        with torch.no_grad():
            return call(fn, *args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        fail(f"{what} raised {type(err).__name__}: {err}{hint}")


# -- sinusoidal_embedding --


def _sinusoid_variants(t: Tensor, dim: int, max_period: float) -> dict[str, Tensor]:
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    tt = t.double()[:, None]

    def emb(freqs, first=torch.sin, second=torch.cos, times=True):
        angles = (tt if times else torch.ones_like(tt)) * freqs[None, :]
        return torch.cat([first(angles), second(angles)], dim=1)

    right = max_period ** (-i / half)
    angles = tt * right[None, :]
    return {
        "the cosines come first — put the sines in the first half, the cosines in the second":
            emb(right, torch.cos, torch.sin),
        "the exponent divides by dim — the frequencies are max_period^(-i / half) with "
        "half = dim // 2": emb(max_period ** (-i / dim)),
        "the exponent divides by half - 1 — use max_period^(-i / half), i = 0 .. half-1":
            emb(max_period ** (-i / max(half - 1, 1))),
        "every row is the same — multiply the frequencies by the timesteps t[:, None]":
            emb(right, times=False),
        "sines and cosines are interleaved — concatenate [all sines, all cosines] along dim=1":
            torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(t), dim),
        "max_period is ignored — use the max_period argument, not a fixed 10000":
            emb(10000.0 ** (-i / half)),
    }


@exercise_check("sinusoidal_embedding")
def check_sinusoidal_embedding(fn) -> str:
    t = torch.tensor([0, 1, 7, 50, 999])
    for dim, max_period in [(8, 10000), (32, 10000), (6, 100)]:
        what = f"sinusoidal_embedding(t, {dim}, max_period={max_period})"
        out = expect_tensor(call(fn, t, dim, max_period=max_period), shape=(len(t), dim),
                            dtype=torch.float32, what=what)
        compare(out, du.sinusoidal_embedding(t, dim, max_period=max_period),
                _sinusoid_variants(t, dim, max_period), what=what, atol=1e-3, rtol=1e-3)
    t64 = torch.tensor([0.5, 12.25], dtype=torch.float64)
    what = "sinusoidal_embedding of float64 t"
    out = expect_tensor(call(fn, t64, 8), shape=(2, 8), dtype=torch.float64,
                        what=what + " (the dtype should follow t: compute with t.dtype)")
    compare(out, du.sinusoidal_embedding(t64, 8), {}, what=what, atol=1e-6)
    return "sines then cosines, frequencies max_period^(-i/half), dtype follows t"


# -- ResBlock --


def _res_block_variants(b: nn.Module, x: Tensor, emb: Tensor) -> dict[str, Tensor]:
    act = F.silu
    temb = b.time_proj(emb)[:, :, None, None]                     # (B, out_ch, 1, 1)
    h1 = b.conv1(act(b.norm1(x)))

    def second(h):
        return b.conv2(act(b.norm2(h)))

    swapped = b.conv2(b.norm2(act(b.conv1(b.norm1(act(x))) + temb)))
    return {
        "the time embedding is never added — add self.time_proj(emb)[:, :, None, None] to h "
        "after the first conv": b.skip(x) + second(h1),
        "the time embedding is added after the second conv — add it between the two convs":
            b.skip(x) + second(h1) + temb,
        "the skip connection is missing — return self.skip(x) + h": second(h1 + temb),
        "GroupNorm and SiLU are in the wrong order — normalise first: "
        "conv(SiLU(GroupNorm(x)))": b.skip(x) + swapped,
    }


@exercise_check("ResBlock")
def check_res_block(cls) -> str:
    time_dim, B = 12, 2
    for in_ch, out_ch in [(8, 8), (8, 16)]:
        ref = _scramble(du.ResBlock(in_ch, out_ch, time_dim, groups=4), seed=in_ch + out_ch)
        mine = _learner_copy(cls, ref, in_ch, out_ch, time_dim, groups=4)
        g = torch.Generator().manual_seed(out_ch)
        x = torch.randn(B, in_ch, 6, 5, generator=g)
        emb = torch.randn(B, time_dim, generator=g)
        what = f"ResBlock({in_ch}, {out_ch}, {time_dim})"
        hint = ("" if in_ch == out_ch else " — when in_ch != out_ch, x must go through "
                "self.skip (a 1x1 conv) so its channels match h: self.skip(x) + h")
        out = expect_tensor(_call_02(mine, x, emb, what=what, hint=hint),
                            shape=(B, out_ch, 6, 5), what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x, emb), _res_block_variants(ref, x, emb)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "norm -> SiLU -> conv, time added per channel, zero-init conv, skip (1x1 when needed)"


# -- SelfAttention --


def _attention_variants(a: nn.Module, x: Tensor) -> dict[str, Tensor]:
    B, C, H, W = x.shape
    heads, N = a.heads, H * W
    d = C // heads
    q, k, v = a.qkv(a.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (B, N, C)

    def split(z):
        return z.view(B, N, heads, d).transpose(1, 2)            # (B, heads, N, d)

    def attend(q, k, v, *, scale=True, dim=-1):
        scores = q @ k.transpose(-1, -2) / (math.sqrt(d) if scale else 1.0)
        return scores.softmax(dim=dim) @ v                       # (B, heads, N, d)

    def finish(out, *, residual=True):                           # (B, N, C) -> (B, C, H, W)
        out = a.proj(out).transpose(1, 2).reshape(B, C, H, W)
        return x + out if residual else out

    def merge(o):
        return o.transpose(1, 2).reshape(B, N, C)

    right = attend(split(q), split(k), split(v))
    wrong_split = attend(*(z.reshape(B, heads, N, d) for z in (q, k, v)))
    return {
        "the scores are not scaled — divide q kᵀ by sqrt(d), d = C // heads":
            finish(merge(attend(split(q), split(k), split(v), scale=False))),
        "softmax runs over the wrong axis — normalise over the keys (the last axis, dim=-1)":
            finish(merge(attend(split(q), split(k), split(v), dim=-2))),
        "the residual is missing — return x + the attention output":
            finish(merge(right), residual=False),
        "the heads are split wrongly — (B, N, C) -> view(B, N, heads, d).transpose(1, 2), "
        "not reshape(B, heads, N, d)": finish(wrong_split.reshape(B, N, C)),
        "the heads are merged wrongly — (B, heads, N, d) -> transpose(1, 2).reshape(B, N, C)":
            finish(right.reshape(B, N, C)),
        "the tokens go back to an image wrongly — (B, N, C) -> transpose(1, 2) before "
        "reshape(B, C, H, W)": x + a.proj(merge(right)).reshape(B, C, H, W),
    }


@exercise_check("SelfAttention")
def check_self_attention(cls) -> str:
    B, C = 2, 16
    for heads, (H, W) in [(4, (4, 6)), (1, (3, 3)), (2, (5, 4))]:
        ref = _scramble(du.SelfAttention(C, heads=heads, groups=4), seed=heads)
        mine = _learner_copy(cls, ref, C, heads=heads, groups=4)
        x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(H * W))
        what = f"SelfAttention({C}, heads={heads}) on a {H}x{W} map"
        out = expect_tensor(_call_02(mine, x, what=what), shape=(B, C, H, W),
                            what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x), _attention_variants(ref, x)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "softmax(q kᵀ / sqrt(d)) v over heads, output projection, residual"


# -- UNet.forward --


def _unet_variants(m: nn.Module, x: Tensor, t: Tensor, kw: dict) -> dict[str, Tensor]:
    def forward(*, middle=True, skip_first=False):
        emb = m.embed(t, kw.get("labels"))
        cond = (kw.get("context"), kw.get("context_mask"))
        h, skips = m.in_conv(x), []
        for level, down in zip(m.down, m.downsample):
            h = level(h, emb, *cond)
            skips.append(h)
            h = down(h)
        h = m.middle(h, emb, *cond) if middle else h
        for level, up in zip(m.up, m.upsample):
            skip = skips.pop()
            h = up(level(torch.cat([skip, h] if skip_first else [h, skip], dim=1), emb, *cond))
        return m.out(h)

    return {"the middle block is skipped — run self.middle between the down and up paths":
            forward(middle=False),
            "the skip comes first in the concatenation — use torch.cat([h, skip], dim=1)":
            forward(skip_first=True)}


def _trace_levels(model: nn.Module) -> tuple[list, list]:
    """Record which of middle / up levels started and finished (forward hooks)."""
    events, handles = [], []
    levels = [("middle", model.middle)] + [(f"up{i}", lv) for i, lv in enumerate(model.up)]
    for name, level in levels:
        handles += [level.register_forward_pre_hook(lambda *_, n=name: events.append(("start", n))),
                    level.register_forward_hook(lambda *_, n=name: events.append(("end", n)))]
    return events, handles


def _unet_cases():
    small = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(4,), heads=2, groups=4, image_size=8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])
    cond = dict(labels=torch.tensor([1, 3]), context=torch.randn(2, 5, 6, generator=g),
                context_mask=torch.tensor([[True] * 3 + [False] * 2, [True] * 5]))
    return [(du.UNetConfig(**small), x, t, {}),
            (du.UNetConfig(**small, num_classes=3, context_dim=6), x, t, cond)]


@exercise_check("UNet.forward")
def check_unet_forward(cls) -> str:
    for config, x, t, kw in _unet_cases():
        torch.manual_seed(0)
        ref = _scramble(du.UNet(config), seed=1)
        mine = _learner_copy(cls, ref, config)
        what = "your UNet's forward" + (" with labels and a context" if kw else "")
        events, handles = _trace_levels(mine)
        try:
            out = _call_02(mine, x, t, what=what, **kw)
        except AssertionError as err:
            glue_failed = "RuntimeError" in str(err) and events and events[-1][0] == "end"
            if glue_failed:
                fail("the up path met a skip of another resolution — append h to skips after "
                     "each down level (before downsampling), take them back with skips.pop() "
                     "(last in, first out), and upsample after each up level")
            raise
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[1] == config.base_channels:
            fail(f"{what} returns the last feature map — finish with self.out(h)")
        out = expect_tensor(out, shape=tuple(x.shape), what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x, t, **kw), _unet_variants(ref, x, t, kw)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "down path with skips, middle, up path concatenating skips last-in first-out"


# ── 03 · Training and sampling ───────────────────────────────────────────────────────


class _TinyEpsModel(torch.nn.Module):
    """A stand-in noise predictor for the checks: ε̂ = conv(x_t) + 0.01 · t."""

    def __init__(self, channels: int = 3, *, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.seen_t: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen_t.append(t.detach().clone())
        return self.conv(x) + 0.01 * t.float().reshape(-1, 1, 1, 1)


def _loss_variant(model, x0, t, eps, schedule, *, x0_target=False, one_minus_noise=False,
                  no_sqrt_signal=False, t_minus_1=False, sum_=False, per_item_sum=False,
                  model_on_x0=False) -> Tensor:
    """The loss with one of the usual mistakes (for recognising them)."""
    idx = (t - 1) % schedule.T if t_minus_1 else t
    a = schedule.alpha_bars[idx].reshape(-1, 1, 1, 1)
    signal = a if no_sqrt_signal else a.sqrt()
    noise = (1 - a) if one_minus_noise else (1 - a).sqrt()
    xt = x0 if model_on_x0 else signal * x0 + noise * eps
    pred = model(xt, t)
    err = (pred - (x0 if x0_target else eps)) ** 2
    if sum_:
        return err.sum()
    if per_item_sum:
        return err.sum(dim=(1, 2, 3)).mean()
    return err.mean()


@exercise_check("diffusion_loss")
def check_diffusion_loss(fn) -> str:
    """Check ``diffusion_loss(model, x0, schedule, *, t=None, eps=None, **cond)``."""
    schedule = du.NoiseSchedule.create("cosine", 10)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 3, 6, 9])
    model = _TinyEpsModel()
    out = call(fn, model, x0, schedule, t=t, eps=eps)
    expect_tensor(out, shape=(), what="the loss (a scalar tensor)")
    if not out.requires_grad:
        fail("the loss has no gradient: return the tensor itself (no .item(), .detach() or "
             "torch.no_grad()), so that loss.backward() can train the model")
    with torch.no_grad():
        expected = du.diffusion_loss(model, x0, schedule, t=t, eps=eps)
        v = functools.partial(_loss_variant, model, x0, t, eps, schedule)
        mistakes = {
            "the target is x0 — the model predicts the noise, so compare its output with ε":
                v(x0_target=True),
            "x_t scales the noise by (1 - ᾱ_t); it should be sqrt(1 - ᾱ_t)": v(one_minus_noise=True),
            "x_t scales x0 by ᾱ_t; it should be sqrt(ᾱ_t)": v(no_sqrt_signal=True),
            "ᾱ is read at t - 1: timesteps are 0-indexed, ᾱ_t is alpha_bars[t]": v(t_minus_1=True),
            "the model was given x0; give it the noised image x_t": v(model_on_x0=True),
            "this is the sum of the squared errors; take the mean (F.mse_loss)": v(sum_=True),
            "this sums over each image's pixels; take the mean over every element": v(
                per_item_sum=True),
        }
    compare(out.detach(), expected, mistakes, what="the loss for fixed t and ε")
    _check_drawn_t(fn)
    return "the noise-prediction loss matches DDPM eq. 14, with t drawn from {0, ..., T-1}"


def _check_drawn_t(fn) -> None:
    """With t and eps left out, the timesteps must cover exactly {0, ..., T-1}, one per image."""
    T, B = 5, 512
    schedule = du.NoiseSchedule.create("cosine", T)
    model = _TinyEpsModel()
    x0 = torch.zeros(B, 3, 4, 4)
    try:
        out = call(fn, model, x0, schedule)
    except (ValueError, IndexError) as err:
        fail(f"drawing t failed ({type(err).__name__}: {err}) — draw t with "
             "torch.randint(0, T, (B,)): the upper end is excluded, so t lies in {0, ..., T-1}")
    expect_tensor(out, shape=(), what="the loss with t and eps drawn inside")
    if not model.seen_t:
        fail("the model was never called when t and eps were left out")
    seen = model.seen_t[-1]
    if seen.shape != (B,):
        fail(f"the model got t of shape {tuple(seen.shape)}; draw one timestep per image, "
             f"shape (B,) = ({B},)")
    if int(seen.min()) >= 1:
        fail("t never takes the value 0 — draw t with torch.randint(0, T, (B,)) "
             "(from {0, ..., T-1}), not from [1, T]")
    if int(seen.max()) < T - 1 or seen.unique().numel() < T:
        fail("t does not cover every timestep 0 .. T-1 — draw it with torch.randint(0, T, (B,))")
    out2 = call(fn, model, x0, schedule)
    if close(out.detach(), out2.detach(), atol=0, rtol=0):
        fail("two calls gave the same loss: draw fresh t and ε each call when they are not given")


def _ddpm_step_variant(eps, xt, t, schedule, noise, *, variance="posterior", no_sqrt=False,
                       var_as_std=False, noise_at_0=False, plus=False, alpha_bar_front=False,
                       swap_variance=False, no_noise=False) -> Tensor:
    """The reverse step with one of the usual mistakes (for recognising them)."""
    def at(values):
        return values[t].reshape(-1, 1, 1, 1)

    beta, alpha, alpha_bar = at(schedule.betas), at(schedule.alphas), at(schedule.alpha_bars)
    coef = beta / ((1 - alpha_bar) if no_sqrt else (1 - alpha_bar).sqrt())
    front = alpha_bar if alpha_bar_front else alpha
    mean = ((xt + coef * eps) if plus else (xt - coef * eps)) / front.sqrt()
    use_beta = (variance == "beta") != swap_variance
    var = at(schedule.betas if use_beta else schedule.posterior_variance)
    sigma = var if var_as_std else var.sqrt()
    if not noise_at_0:
        sigma = sigma * (t > 0).float().reshape(-1, 1, 1, 1)
    return mean if no_noise else mean + sigma * noise


@exercise_check("ddpm_step")
def check_ddpm_step(fn) -> str:
    """Check ``ddpm_step(model_eps, xt, t, schedule, *, variance="posterior", noise=None)``."""
    schedule = du.NoiseSchedule.create("linear", 50)
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(4, 3, 8, 8, generator=g)
    model_eps = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 25, 49])
    for variance in ("posterior", "beta"):
        out = call(fn, model_eps, xt, t, schedule, variance=variance, noise=noise)
        expect_tensor(out, shape=xt.shape, what=f"x_(t-1) (variance={variance!r})")
        expected = du.ddpm_step(model_eps, xt, t, schedule, variance=variance, noise=noise)
        v = functools.partial(_ddpm_step_variant, model_eps, xt, t, schedule, noise,
                              variance=variance)
        mistakes = {
            "ε is scaled by β_t / (1 - ᾱ_t); DDPM eq. 11 has β_t / sqrt(1 - ᾱ_t)": v(no_sqrt=True),
            "the noise is scaled by the variance σ_t²; scale it by the standard deviation "
            "σ_t = sqrt(σ_t²)": v(var_as_std=True),
            "noise was added at t = 0; the last step returns the mean (σ_0 = 0)": v(noise_at_0=True),
            "the sign of the ε term is wrong: x_t - β_t / sqrt(1 - ᾱ_t) · ε_θ": v(plus=True),
            "the front factor uses ᾱ_t; it is 1 / sqrt(α_t), the one-step α_t = 1 - β_t":
                v(alpha_bar_front=True),
            "the variance option is mixed up: 'posterior' means σ_t² = β̃_t "
            "(schedule.posterior_variance), 'beta' means σ_t² = β_t": v(swap_variance=True),
            "no noise was added: x_(t-1) = mean + σ_t z (use the `noise` argument as z)":
                v(no_noise=True),
        }
        compare(out, expected, mistakes, what=f"x_(t-1) with variance={variance!r}")
    t0 = torch.zeros(4, dtype=torch.long)
    out = call(fn, model_eps, xt, t0, schedule)
    expect_tensor(out, shape=xt.shape, what="x_(t-1) at t = 0 with noise=None")
    compare(out, du.ddpm_step(model_eps, xt, t0, schedule, noise=torch.zeros_like(xt)),
            {}, what="x_(t-1) at t = 0 with noise=None (draw z yourself, it is not used at t = 0)")
    return "the reverse step matches DDPM eq. 11 / Algorithm 2, with no noise at t = 0"


@exercise_check("ema_update_")
def check_ema_update(fn) -> str:
    """Check ``ema_update_(ema_params, params, decay)`` (in place, returns nothing)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    for decay in (0.9, 0.5):
        ema = [torch.randn(s, generator=g) for s in shapes]
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        ema_before = [e.clone() for e in ema]
        originals = list(ema)
        params_before = [p.detach().clone() for p in params]
        out = call(fn, ema, params, decay)
        if any(e is not o for e, o in zip(ema, originals)):
            fail("the list items were replaced by new tensors; the shadow model still holds the "
                 "old ones — update each tensor in place (.mul_(), .add_() or .copy_())")
        if any(not close(p.detach(), b, atol=0, rtol=0) for p, b in zip(params, params_before)):
            fail("the model's parameters changed: update the shadow copy ema_params, "
                 "and only read params")
        if all(close(e.detach(), b, atol=0, rtol=0) for e, b in zip(ema, ema_before)):
            if out is not None:
                fail("ema_params did not change — you returned new values instead: update the "
                     "tensors in place (ema.mul_(decay).add_(p, alpha=1 - decay) or ema.copy_(...))")
            fail("ema_params did not change: update each tensor in place")
        if any(e.requires_grad for e in ema):
            fail("the shadow tensors now require gradients: do the update under torch.no_grad() "
                 "(or use p.detach())")
        for e, b, p in zip(ema, ema_before, params_before):
            expected = decay * b + (1 - decay) * p
            compare(e, expected, {
                "decay and 1 - decay are swapped: the old average keeps the weight `decay`, "
                "the new weights get 1 - decay": (1 - decay) * b + decay * p,
                "the shadow was overwritten with the weights; blend them": p.clone(),
                "the decay looks hard-coded: use the `decay` argument": 0.999 * b + 0.001 * p,
            }, what=f"the updated average (decay={decay})")
    return "θ_ema ← decay · θ_ema + (1 - decay) · θ, in place"


def _run_train_step(step_fn, *, steps: int, max_grad_norm: float, extras: bool = False):
    """Run ``steps`` training steps of a tiny model with SGD (lr 1); return what we need."""
    schedule = du.NoiseSchedule.create("cosine", 10)
    model = _TinyEpsModel(seed=1)
    x0 = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    kwargs = {}
    if extras:
        kwargs["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        kwargs["ema"] = du.EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    outs = []
    for k in range(steps):
        torch.manual_seed(100 + k)
        outs.append(step_fn(model, optimizer, x0, schedule, max_grad_norm=max_grad_norm,
                            **kwargs))
    return start, [p.detach().clone() for p in model.parameters()], outs, kwargs


def _distance(a, b) -> float:
    return float(sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5)


@exercise_check("train_step")
def check_train_step(fn) -> str:
    """Check ``train_step(model, optimizer, x0, schedule, *, max_grad_norm=1.0,
    scheduler=None, ema=None, autocast=False, **cond) -> float``."""
    learner = functools.partial(call, fn)
    max_norm = 0.01
    start, after, outs, _ = _run_train_step(learner, steps=1, max_grad_norm=max_norm)
    _, ref_after, ref_outs, _ = _run_train_step(du.train_step, steps=1, max_grad_norm=max_norm)
    loss = outs[0]
    if loss is None:
        fail("train_step returned None — did you forget `return loss.item()`?")
    if isinstance(loss, Tensor):
        fail("train_step returned a tensor: return loss.item(), a Python float (a tensor keeps "
             "the whole computation graph alive)")
    if not isinstance(loss, float):
        fail(f"train_step should return the loss as a Python float, got {type(loss).__name__}")
    if abs(loss - ref_outs[0]) > 1e-4 * max(1.0, abs(ref_outs[0])):
        fail(f"the returned loss {loss:.5f} differs from the reference {ref_outs[0]:.5f}; "
             "compute it with diffusion_loss(model, x0, schedule, **cond)")
    moved = _distance(after, start)
    if moved == 0:
        fail("the parameters did not change: call optimizer.step() after loss.backward()")
    if moved > max_norm * 1.01:
        fail(f"the update is larger than max_grad_norm allows ({moved:.3g} > {max_norm}): clip "
             "with torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm) after "
             "backward() and before optimizer.step()")
    if _distance(after, ref_after) > 1e-5:
        fail("after one step the parameters differ from the reference; the order is "
             "zero_grad, loss, backward, clip, step")
    _, after2, _, _ = _run_train_step(learner, steps=2, max_grad_norm=max_norm)
    _, ref_after2, _, _ = _run_train_step(du.train_step, steps=2, max_grad_norm=max_norm)
    if _distance(after2, ref_after2) > 1e-5:
        fail("the second step differs from the reference: the gradients accumulate across "
             "steps — call optimizer.zero_grad() at the start of each step")
    _, _, _, extras = _run_train_step(learner, steps=1, max_grad_norm=max_norm, extras=True)
    if extras["scheduler"].last_epoch != 1:
        fail("the learning-rate scheduler was not stepped: call scheduler.step() when given")
    if extras["ema"].num_updates != 1:
        fail("the EMA was not updated: call ema.update(model) when an ema is given")
    return "zero_grad, loss, backward, clip, step (+ scheduler and EMA), loss returned as a float"
