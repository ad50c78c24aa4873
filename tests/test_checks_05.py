"""Lesson 05's exercise checks: the reference passes, a stub is "not attempted", correct
versions written in other forms pass, and the mistakes learners really make fail with the
hint that names them."""
import math

import numpy as np
import pytest
import torch

import diffusion_checks as dc
import diffusion_utilities as du
from check_helpers import assert_fails_with, assert_not_attempted, assert_passes, stub  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


DEVICE = "pass `device=x.device`"
IN_PLACE = "in place (an in-place operation"


# ── score_from_eps ───────────────────────────────────────────────────────────────────


def make_score(*, values="alpha_bars", shift=0, power=0.5, sign=-1.0, of="one_minus",
               reshape=True, multiply=False):
    """A learner's score_from_eps with one knob turned."""

    def score_from_eps(eps, t, schedule):
        a = getattr(schedule, values)[t + shift]
        if reshape:
            a = a.reshape(-1, *([1] * (eps.ndim - 1)))
        denominator = ((1 - a) if of == "one_minus" else a) ** power
        return sign * eps * denominator if multiply else sign * eps / denominator

    return score_from_eps


def score_float64(eps, t, schedule):
    one_minus = 1 - schedule.alpha_bars.double()[t].reshape(-1, *([1] * (eps.ndim - 1)))
    return (-eps.double() / one_minus.sqrt()).to(eps.dtype)


def score_rsqrt_extract(eps, t, schedule):
    return -eps * torch.rsqrt(1 - du.extract(schedule.alpha_bars, t, eps.shape))


def score_loop(eps, t, schedule):
    return torch.stack([-e / math.sqrt(1 - float(schedule.alpha_bars[s]))
                        for e, s in zip(eps, t)])


def score_via_field(eps, t, schedule):
    return -eps / du.extract(schedule.sqrt_one_minus_alpha_bars, t, eps.shape)


def score_in_place(eps, t, schedule):
    return eps.neg_().div_(du.extract(schedule.sqrt_one_minus_alpha_bars, t, eps.shape))


def score_cpu_ones(eps, t, schedule):
    one = torch.ones(len(t)).reshape(-1, *([1] * (eps.ndim - 1)))
    return -eps / (one - du.extract(schedule.alpha_bars, t, eps.shape)).sqrt()


def test_score_reference_passes(capsys):
    assert_passes(dc.check_score_from_eps, du.score_from_eps, capsys)


@pytest.mark.parametrize("fn", [make_score(), score_float64, score_rsqrt_extract, score_loop,
                                score_via_field],
                         ids=["notebook-like", "float64", "rsqrt-extract", "loop", "field"])
def test_score_other_forms_pass(fn, capsys):
    assert_passes(dc.check_score_from_eps, fn, capsys)


def test_score_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_score_from_eps, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_score(sign=1.0), "the sign is wrong"),
    (make_score(power=1.0), "the square root is missing"),
    (make_score(multiply=True), "this multiplies by sqrt(1 − ᾱ_t)"),
    (make_score(of="alpha_bar"), "this divides by sqrt(ᾱ_t)"),
    (make_score(of="alpha_bar", power=1.0), "this divides by ᾱ_t"),
    (make_score(values="alphas"), "this uses α_t"),
    (make_score(shift=1), "ᾱ is read at t + 1"),
    (make_score(shift=-1), "wraps round to the last value"),
    (make_score(values="alpha_bar_prev"), "ᾱ is read at t − 1 (alpha_bar_prev)"),
    (make_score(reshape=False), "(B, 1) for points"),
    (score_in_place, "changed its input `eps` " + IN_PLACE),
    (score_cpu_ones, DEVICE),
    (lambda eps, t, schedule: du.score_from_eps(eps, t, schedule).double(),
     "should have dtype torch.float32"),
    (lambda eps, t, schedule: du.score_from_eps(eps, t, schedule) / 0 * 0, "contains NaN"),
    (lambda eps, t, schedule: None, "forget the `return`"),
])
def test_score_mistakes(wrong, hint):
    assert_fails_with(dc.check_score_from_eps, wrong, hint)


# ── ddim_step ────────────────────────────────────────────────────────────────────────


def make_ddim(*, values="alpha_bars", prev="where", x0_power=0.5, x0_sign=-1.0,
              sigma_in_direction=True, eta_power=1, sigma_sqrt=True, flipped=False,
              direction_at_t=False, scale_noise=True, add_noise=True, use_noise=True,
              draw=torch.randn_like, seed=None):
    """A learner's ddim_step with one knob turned."""

    def ddim_step(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
        table = getattr(schedule, values)
        a_t = du.extract(table, t, xt.shape)
        if prev == "where":
            a_prev = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], 1.0)
        elif prev == "wrap":
            a_prev = table[t_prev]
        elif prev == "one_back":
            a_prev = torch.where(t >= 1, table[(t - 1).clamp(min=0)], 1.0)
        elif prev == "extract":
            a_prev = du.extract(table, t_prev, xt.shape)
        elif prev == "cpu_ones":
            a_prev = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones(len(t)))
        a_prev = a_prev.reshape(a_t.shape)
        x0_hat = (xt + x0_sign * (1 - a_t) ** x0_power * model_eps) / a_t.sqrt()
        ratio = a_prev / a_t if flipped else a_t / a_prev
        variance = (1 - a_prev) / (1 - a_t) * (1 - ratio)
        sigma = eta ** eta_power * (variance.sqrt() if sigma_sqrt else variance)
        if direction_at_t:
            direction = (1 - a_t).sqrt() * model_eps
        elif sigma_in_direction:
            direction = (1 - a_prev - sigma ** 2).sqrt() * model_eps
        else:
            direction = (1 - a_prev).sqrt() * model_eps
        out = a_prev.sqrt() * x0_hat + direction
        if seed is not None:
            torch.manual_seed(seed)
        if noise is None or not use_noise:
            noise = draw(xt)
        if add_noise:
            out = out + (sigma * noise if scale_noise else noise)
        return out

    return ddim_step


def ddim_padded(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
    """ᾱ_prev from alpha_bars with a 1 in front, read at t_prev + 1 (the notebook's form)."""
    alpha_bars = torch.cat([schedule.alpha_bars.new_ones(1), schedule.alpha_bars])
    a_t = du.extract(alpha_bars, t + 1, xt.shape)
    a_prev = du.extract(alpha_bars, t_prev + 1, xt.shape)
    x0_hat = (xt - (1 - a_t).sqrt() * model_eps) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    if noise is None:
        noise = torch.randn_like(xt)
    return a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).sqrt() * model_eps + sigma * noise


def ddim_float64_recip(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
    """float64 intermediates; x̂_0 through sqrt(1/ᾱ_t) and sqrt(1/ᾱ_t − 1) (diffusers' form)."""
    a = schedule.alpha_bars.double()
    shape = (-1,) + (1,) * (xt.ndim - 1)
    a_t = a[t].reshape(shape)
    a_prev = torch.where(t_prev >= 0, a[t_prev.clamp(min=0)],
                         torch.ones((), dtype=a.dtype, device=a.device)).reshape(shape)
    x0_hat = (1 / a_t).sqrt() * xt.double() - (1 / a_t - 1).sqrt() * model_eps.double()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * var.sqrt()
    out = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).sqrt() * model_eps.double()
    if eta > 0:
        out = out + sigma * (torch.randn_like(xt) if noise is None else noise).double()
    return out.to(xt.dtype)


def ddim_other_algebra(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
    """x_prev = sqrt(ᾱ_prev / ᾱ_t) x_t + (sqrt(1 − ᾱ_prev − σ²) − sqrt(ᾱ_prev (1 − ᾱ_t) / ᾱ_t)) ε + σ z."""
    a_t = du.extract(schedule.alpha_bars, t, xt.shape)
    ones = torch.ones_like(a_t)
    a_prev = torch.where((t_prev >= 0).reshape(a_t.shape),
                         schedule.alpha_bars[t_prev.clamp(min=0)].reshape(a_t.shape), ones)
    sigma2 = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    coef_eps = (1 - a_prev - sigma2).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
    out = (a_prev / a_t).sqrt() * xt + coef_eps * model_eps
    noise = torch.randn_like(xt) if noise is None else noise
    return out + sigma2.sqrt() * noise


def ddim_loop(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
    """One item at a time, with Python floats."""
    out = []
    for i in range(len(t)):
        a_t = float(schedule.alpha_bars[t[i]])
        a_prev = float(schedule.alpha_bars[t_prev[i]]) if t_prev[i] >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x0_hat = (xt[i] - math.sqrt(1 - a_t) * model_eps[i]) / math.sqrt(a_t)
        z = torch.randn_like(xt[i]) if noise is None else noise[i]
        out.append(math.sqrt(a_prev) * x0_hat
                   + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * model_eps[i] + sigma * z)
    return torch.stack(out)


def ddim_in_place(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
    return xt.copy_(du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta, noise=noise))


def test_ddim_step_reference_passes(capsys):
    assert_passes(dc.check_ddim_step, du.ddim_step, capsys)


@pytest.mark.parametrize("fn", [make_ddim(), ddim_padded, ddim_float64_recip, ddim_other_algebra,
                                ddim_loop],
                         ids=["where", "padded", "float64-recip", "other-algebra", "loop"])
def test_ddim_step_other_forms_pass(fn, capsys):
    assert_passes(dc.check_ddim_step, fn, capsys)


def test_ddim_step_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ddim_step, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_ddim(values="alphas"), "the DDIM paper's α_t is our ᾱ_t"),
    (make_ddim(prev="wrap"), "read the last entry of the table, alpha_bars[-1]"),
    (make_ddim(prev="extract"), "t_prev = −1 means past the last step"),
    (make_ddim(prev="one_back"), "ᾱ_prev is read at t − 1, one step back"),
    (make_ddim(x0_power=1.0), "x̂_0 subtracts (1 − ᾱ_t) · ε"),
    (make_ddim(x0_sign=1.0), "the sign in x̂_0 is wrong"),
    (make_ddim(sigma_in_direction=False), "σ² is missing from the direction term"),
    (make_ddim(eta_power=2), "η is applied twice"),
    (make_ddim(eta_power=0), "noise was added although η = 0"),
    (make_ddim(eta_power=0, sigma_in_direction=False), "noise was added although η = 0"),
    (make_ddim(sigma_sqrt=False), "σ_t is used without its square root"),
    (make_ddim(flipped=True), "the ratio inside σ_t is upside down"),
    (make_ddim(direction_at_t=True), "the direction term uses sqrt(1 − ᾱ_t)"),
    (make_ddim(scale_noise=False), "the noise is added without its factor"),
    (make_ddim(add_noise=False), "no noise was added"),
    (make_ddim(use_noise=False), "the `noise` argument was not used"),
    (make_ddim(draw=torch.rand_like), "torch.rand_like"),
    (make_ddim(seed=0), "two calls gave the same x_prev"),
    (make_ddim(prev="cpu_ones"), DEVICE),
    (make_ddim(draw=lambda xt: torch.randn(xt.shape)), DEVICE),
    (ddim_in_place, "changed its input `xt` " + IN_PLACE),
    (lambda *a, **k: du.ddim_step(*a, **k).double(), "should have dtype torch.float32"),
    (lambda *a, **k: None, "forget the `return`"),
])
def test_ddim_step_mistakes(wrong, hint):
    assert_fails_with(dc.check_ddim_step, wrong, hint)


def test_ddim_step_noise_at_eta_zero_with_noise_none():
    def always_noisy(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
        out = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta, noise=noise)
        return out + 0.01 * torch.randn_like(xt) if noise is None else out

    assert_fails_with(dc.check_ddim_step, always_noisy, "η = 0 and noise=None")


# ── ddim_timesteps ───────────────────────────────────────────────────────────────────


def timesteps_torch(T, num_steps, *, spacing="trailing"):
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round()
    elif spacing == "leading":
        ts = torch.arange(num_steps) * (T // num_steps)
    else:
        return torch.arange(T, 0, -T / num_steps, dtype=torch.float64)[:num_steps].round().long() - 1
    return ts.long().flip(0)


def timesteps_numpy(T, num_steps, *, spacing="trailing"):
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps))[::-1]
    else:
        ts = np.round(np.arange(T, 0, -T / num_steps)[:num_steps]) - 1
    return torch.from_numpy(ts.copy().astype(np.int64))


def timesteps_python(T, num_steps, *, spacing="trailing"):
    """Python's round() also rounds halves to even."""
    S = num_steps
    if spacing == "linspace":
        ts = [round(i * (T - 1) / (S - 1)) if S > 1 else 0 for i in range(S)]
    elif spacing == "leading":
        ts = [i * (T // S) for i in range(S)]
    else:
        ts = [round(T - i * T / S) - 1 for i in range(S)][::-1]
    return torch.tensor(sorted(ts, reverse=True))


def make_timesteps(*, swap=None, ascending=False, trailing_minus=1, dtype=torch.long,
                   leading_step="int", rounding="round", linspace_end="T-1", as_list=False):
    """A learner's ddim_timesteps with one knob turned."""

    def do_round(x):
        if rounding == "half_up":
            return torch.floor(x + 0.5)
        if rounding == "truncate":
            return x.trunc()
        return x.round()

    def ddim_timesteps(T, num_steps, *, spacing="trailing"):
        S = num_steps
        spacing = (swap or {}).get(spacing, spacing)
        if spacing == "linspace":
            end = T - 1 if linspace_end == "T-1" else T
            ts = do_round(torch.linspace(0, end, S, dtype=torch.float64)).clamp(max=T - 1).flip(0)
        elif spacing == "leading":
            step = T // S if leading_step == "int" else T / S
            ts = do_round(torch.arange(S, dtype=torch.float64) * step).flip(0)
        else:
            ts = do_round(torch.arange(T, 0, -T / S, dtype=torch.float64)[:S]) - trailing_minus
        if ascending:
            ts = ts.flip(0)
        ts = ts.to(dtype)
        return ts.tolist() if as_list else ts

    return ddim_timesteps


def test_ddim_timesteps_reference_passes(capsys):
    assert_passes(dc.check_ddim_timesteps, du.ddim_timesteps, capsys)


@pytest.mark.parametrize("fn", [make_timesteps(), timesteps_torch, timesteps_numpy,
                                timesteps_python], ids=["notebook-like", "torch", "numpy", "python"])
def test_ddim_timesteps_other_forms_pass(fn, capsys):
    assert_passes(dc.check_ddim_timesteps, fn, capsys)


def test_ddim_timesteps_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ddim_timesteps, capsys)


def duplicate_last(T, num_steps, *, spacing="trailing"):
    ts = du.ddim_timesteps(T, num_steps, spacing=spacing)
    return torch.cat([ts[:-1], ts[-2:-1]]) if num_steps > 1 else ts


def trailing_all_of_arange(T, num_steps, *, spacing="trailing"):
    if spacing != "trailing":
        return du.ddim_timesteps(T, num_steps, spacing=spacing)
    return torch.arange(T, 0, -T / num_steps).round().long() - 1


def only_trailing(T, num_steps, *, spacing="trailing"):
    if spacing != "trailing":
        raise ValueError(f"unknown spacing {spacing!r}")
    return du.ddim_timesteps(T, num_steps)


def ignores_default(T, num_steps, *, spacing="leading"):
    return du.ddim_timesteps(T, num_steps, spacing=spacing)


@pytest.mark.parametrize("wrong, hint", [
    (make_timesteps(ascending=True), "return them in descending order"),
    (make_timesteps(trailing_minus=0), "'trailing' counts down from T − 1"),
    (make_timesteps(dtype=torch.float32), "should hold integer timesteps (torch.long)"),
    (make_timesteps(dtype=torch.int32), "should have dtype torch.long"),
    (make_timesteps(swap={"leading": "linspace", "linspace": "leading"}),
     "these are the 'linspace' timesteps; 'leading' asked for"),
    (make_timesteps(swap={"linspace": "leading"}), "these are the 'leading' timesteps"),
    (make_timesteps(swap={"trailing": "leading"}), "'trailing' asked for"),
    (make_timesteps(leading_step="float"), "the 'leading' step is T // S"),
    (make_timesteps(rounding="half_up"), "round halves to even"),
    (make_timesteps(rounding="truncate"), "the values were truncated"),
    (make_timesteps(linspace_end="T"), "run from 0 to T − 1"),
    (duplicate_last, "visits a timestep twice"),
    (trailing_all_of_arange, "keep the first S"),
    (make_timesteps(as_list=True), "return a tensor"),
    (only_trailing, "accept spacing='linspace', 'leading' and 'trailing'"),
    (ignores_default, "should use the default, spacing='trailing'"),
    (lambda T, num_steps, *, spacing="trailing": None, "forget the `return`"),
])
def test_ddim_timesteps_mistakes(wrong, hint):
    assert_fails_with(dc.check_ddim_timesteps, wrong, hint)


# ── slerp ────────────────────────────────────────────────────────────────────────────


def make_slerp(*, cos="normalised", per_sample=True, swap=False, unit=False, fallback=True,
               reshape_alpha=True):
    """A learner's slerp with one knob turned."""

    def slerp(z0, z1, alpha):
        B = z0.shape[0] if per_sample else 1
        v0, v1 = z0.reshape(B, -1), z1.reshape(B, -1)
        a = torch.as_tensor(alpha, dtype=v0.dtype, device=v0.device)
        if a.ndim == 1 and reshape_alpha:
            a = a[:, None]
        dot = (v0 * v1).sum(1, keepdim=True)
        n0, n1 = v0.norm(dim=1, keepdim=True), v1.norm(dim=1, keepdim=True)
        c = dot if cos == "raw" else (dot / (n0 * n1)).clamp(-1, 1)
        theta = torch.acos(c)
        w0, w1 = torch.sin((1 - a) * theta) / torch.sin(theta), torch.sin(a * theta) / torch.sin(theta)
        if fallback:
            parallel = c.abs() > 0.9995
            w0, w1 = torch.where(parallel, 1 - a, w0), torch.where(parallel, a, w1)
        if swap:
            w0, w1 = w1, w0
        if unit:
            v0, v1 = v0 / n0, v1 / n1
        return (w0 * v0 + w1 * v1).reshape(z0.shape)

    return slerp


def slerp_loop_float64(z0, z1, alpha):
    """One sample at a time, in float64, with torch.lerp where the vectors are parallel."""
    out = []
    alphas = alpha.tolist() if isinstance(alpha, torch.Tensor) else [alpha] * len(z0)
    for a0, a1, a in zip(z0.double(), z1.double(), alphas):
        cos = float(torch.dot(a0.flatten(), a1.flatten()) / (a0.norm() * a1.norm()))
        if abs(cos) > 1 - 1e-6:
            out.append(torch.lerp(a0, a1, a))
            continue
        theta = math.acos(max(-1.0, min(1.0, cos)))
        out.append((math.sin((1 - a) * theta) * a0 + math.sin(a * theta) * a1) / math.sin(theta))
    return torch.stack(out).to(z0.dtype)


def slerp_atan2(z0, z1, alpha):
    """θ from atan2(|z0 × z1|, z0 · z1) of the unit vectors, which is accurate near 0."""
    shape = (-1,) + (1,) * (z0.ndim - 1)
    u0 = z0 / z0.flatten(1).norm(dim=1).reshape(shape)
    u1 = z1 / z1.flatten(1).norm(dim=1).reshape(shape)
    dot = (u0 * u1).flatten(1).sum(1)
    cross = (u1 - dot.reshape(shape) * u0).flatten(1).norm(dim=1)
    theta = torch.atan2(cross, dot).reshape(shape)
    a = torch.as_tensor(alpha, dtype=z0.dtype).reshape(-1, *([1] * (z0.ndim - 1)))
    sin = torch.sin(theta)
    small = sin.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(sin), sin)
    slerped = (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / safe
    return torch.where(small, torch.lerp(z0, z1, a), slerped)


def slerp_in_place(z0, z1, alpha):
    out = du.slerp(z0, z1, alpha)
    return z0.copy_(out)


def slerp_cpu_alpha(z0, z1, alpha):
    a = torch.as_tensor(alpha).float().reshape(-1, *([1] * (z0.ndim - 1)))
    return du.slerp(z0, z1, a.to("cpu").reshape(-1)) if a.numel() == 1 else \
        make_slerp()(z0, z1, torch.as_tensor(alpha).cpu())


def test_slerp_reference_passes(capsys):
    assert_passes(dc.check_slerp, du.slerp, capsys)


@pytest.mark.parametrize("fn", [make_slerp(), slerp_loop_float64, slerp_atan2],
                         ids=["notebook-like", "loop-float64-lerp", "atan2"])
def test_slerp_other_forms_pass(fn, capsys):
    assert_passes(dc.check_slerp, fn, capsys)


def test_slerp_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_slerp, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (lambda z0, z1, alpha: torch.lerp(z0, z1, alpha) if not isinstance(alpha, torch.Tensor)
     else (1 - alpha.reshape(-1, 1, 1, 1)) * z0 + alpha.reshape(-1, 1, 1, 1) * z1,
     "this is linear interpolation"),
    (make_slerp(cos="raw", fallback=False), "the angle comes from the plain dot product"),
    (make_slerp(cos="raw"), "is cos θ divided by both norms?"),
    (make_slerp(per_sample=False), "the whole batch was treated as one vector"),
    (make_slerp(swap=True), "z_0 and z_1 swap places"),
    (make_slerp(unit=True), "made of the normalised vectors"),
    (make_slerp(fallback=False), "fall back to linear interpolation"),
    (make_slerp(reshape_alpha=False), "an alpha of shape (B,) must become (B, 1)"),
    (slerp_in_place, "changed its input `z0` " + IN_PLACE),
    (lambda z0, z1, alpha: du.slerp(z0, z1, alpha).double(), "should have dtype torch.float32"),
    (lambda z0, z1, alpha: None, "forget the `return`"),
])
def test_slerp_mistakes(wrong, hint):
    assert_fails_with(dc.check_slerp, wrong, hint)


# ── ddim_invert ──────────────────────────────────────────────────────────────────────


def make_invert(*, order="ascending", start=-1, power=0.5, clip=False, values="alpha_bars",
                update=True, model_t="to", returns="last", device_kw=True, use_step=False):
    """A learner's ddim_invert with one knob turned."""

    def ddim_invert(model, x0, schedule, *, num_steps=50, spacing="trailing"):
        levels = du.ddim_timesteps(schedule.T, num_steps, spacing=spacing).tolist()
        if order == "ascending":
            levels = levels[::-1]
        table = torch.cat([schedule.alpha_bars.new_ones(1), getattr(schedule, values)])
        x, seen = x0, []
        with torch.no_grad():
            for t_from, t_to in zip([start] + levels[:-1], levels):
                t_model = t_to if model_t == "to" else max(t_from, 0)
                t = torch.full((x.shape[0],), t_model, device=x.device if device_kw else None)
                source = x if update else x0
                eps = model(source, t)
                if use_step:
                    x = du.ddim_step(eps, source, torch.full_like(t, t_from), t, schedule)
                    continue
                a_from, a_to = table[t_from + 1], table[t_to + 1]
                x0_hat = (source - (1 - a_from) ** power * eps) / a_from.sqrt()
                if clip:
                    x0_hat = x0_hat.clamp(-1, 1)
                x = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps
                seen.append(x)
        return seen if returns == "list" else x

    return ddim_invert


def invert_float64_where(model, x0, schedule, *, num_steps=50, spacing="trailing"):
    """float64 arithmetic, ᾱ_from through torch.where."""
    levels = du.ddim_timesteps(schedule.T, num_steps, spacing=spacing).flip(0)
    a = schedule.alpha_bars.double()
    x = x0.double()
    t_from = torch.tensor(-1)
    for t_to in levels:
        t = t_to.repeat(len(x0)).to(x0.device)
        eps = model(x.to(x0.dtype), t).detach().double()
        a_from = torch.where(t_from >= 0, a[t_from.clamp(min=0)], torch.ones((), dtype=a.dtype))
        a_to = a[t_to]
        x = a_to.sqrt() * (x - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps
        t_from = t_to
    return x.to(x0.dtype)


def invert_predict_x0(model, x0, schedule, *, num_steps=50, spacing="trailing"):
    """Through du.predict_x0 once t_from >= 0 (x̂_0 = x itself at the start) and du.q_sample-like
    re-noising."""
    levels = du.ddim_timesteps(schedule.T, num_steps, spacing=spacing).flip(0).tolist()
    x, previous = x0, None
    with torch.no_grad():
        for t_to in levels:
            t = torch.full((len(x),), t_to, dtype=torch.long, device=x.device)
            eps = model(x, t)
            x0_hat = x if previous is None else du.predict_x0(x, torch.full_like(t, previous), eps, schedule)
            x = du.q_sample(x0_hat, t, eps, schedule)
            previous = t_to
    return x


def test_ddim_invert_reference_passes(capsys):
    assert_passes(dc.check_ddim_invert, du.ddim_invert, capsys)


@pytest.mark.parametrize("fn", [make_invert(), invert_float64_where, invert_predict_x0],
                         ids=["notebook-like", "float64-where", "predict-x0-q-sample"])
def test_ddim_invert_other_forms_pass(fn, capsys):
    assert_passes(dc.check_ddim_invert, fn, capsys)


def test_ddim_invert_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ddim_invert, capsys)


def invert_in_place(model, x0, schedule, *, num_steps=50, spacing="trailing"):
    return x0.copy_(du.ddim_invert(model, x0, schedule, num_steps=num_steps, spacing=spacing,
                                   progress=False))


@pytest.mark.parametrize("wrong, hint", [
    (make_invert(order="descending"), "visit the timesteps in ascending order"),
    (make_invert(model_t="from"), "give it t_to, the timestep the step goes to"),
    (make_invert(start=0), "the image itself is 'before step 0'"),
    (make_invert(power=1.0), "x̂_0 subtracts (1 − ᾱ_from) · ε"),
    (make_invert(clip=True), "do not clip"),
    (make_invert(values="alphas"), "it needs ᾱ_t (schedule.alpha_bars)"),
    (make_invert(update=False), "each step starts from the x that the previous step reached"),
    (make_invert(returns="list"), "return only the final noise x_T"),
    (make_invert(use_step=True), "du.ddim_step refused the step"),
    (make_invert(device_kw=False), DEVICE),
    (invert_in_place, "changed its input `x0` " + IN_PLACE),
    (lambda model, x0, schedule, **kw: None, "forget the `return`"),
])
def test_ddim_invert_mistakes(wrong, hint):
    assert_fails_with(dc.check_ddim_invert, wrong, hint)
