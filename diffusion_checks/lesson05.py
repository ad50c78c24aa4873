"""Checks of lesson 05's exercises (DDIM and the score view).

Each check compares the learner's function with the library's (``du.score_from_eps``,
``du.ddim_step``, ``du.ddim_timesteps``, ``du.slerp``) on several schedules and timesteps,
the first and last steps included, and recomputes the usual mistakes in float64 to name
them. Randomness is passed in (the DDIM step's ``noise``); where the learner's code draws it
itself, the check measures what every correct answer has: fresh standard normal noise.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_fresh_normal_noise, expect_result,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, same_values, snapshot, to_device, yours_if_passed)


# ── 05 · DDIM and the score view ─────────────────────────────────────────────────────

_BROADCAST = ("per-timestep values of shape (B,) must become (B, 1) for points (B, 2) and "
              "(B, 1, 1, 1) for images (B, C, H, W) before they multiply them: "
              "du.extract(values, t, x.shape) does it for any shape")


def _call_05(fn, *args, names: tuple[str, ...], what: str, index_hint: str,
             shapes: str = _BROADCAST, **kwargs):
    """:func:`call_pure`, turning the crashes typical of this lesson into hints (``index_hint``:
    what to say when indexing fails; ``shapes``: when two tensors' shapes do not fit)."""
    try:
        return call_pure(fn, *args, names=names, **kwargs)
    except IndexError as err:
        fail(f"{what}: indexing failed ({err}) — {index_hint}")
    except ValueError as err:
        if "timesteps t must lie in" not in str(err):
            raise
        fail(f"{what}: du.extract refused a timestep ({err}) — {index_hint}")
    except RuntimeError as err:
        if "size of tensor" not in str(err) and "broadcast" not in str(err):
            raise
        fail(f"{what}: shapes do not fit ({str(err).splitlines()[0]}) — {shapes}")


def _per_item(values: Tensor, index: Tensor, ndim: int) -> Tensor:
    """``values[index]`` in float64, reshaped to (B, 1, ..., 1) with ``ndim`` dims."""
    return values.double()[index].reshape(-1, *([1] * (ndim - 1)))


# ── Exercise 1 · From the noise to the score ─────────────────────────────────────────


def _score_mistakes(eps: Tensor, t: Tensor, schedule) -> dict[str, Tensor]:
    """The scores that the usual mistakes give (float64, then float32)."""
    T, nd = schedule.T, eps.ndim
    e = eps.double()

    def at(values, index=t):
        return _per_item(values, index, nd)

    a = at(schedule.alpha_bars)
    mistakes = {
        "the sign is wrong: the score points towards the data, against the noise, "
        "so it is −ε / sqrt(1 − ᾱ_t)": e / (1 - a).sqrt(),
        "the square root is missing: divide by sqrt(1 − ᾱ_t), the noise's amplitude in x_t, "
        "not by 1 − ᾱ_t": -e / (1 - a),
        "this multiplies by sqrt(1 − ᾱ_t) — that is the way back, ε = −sqrt(1 − ᾱ_t) · score; "
        "the score divides by it": -e * (1 - a).sqrt(),
        "this divides by sqrt(ᾱ_t); the noise's amplitude in x_t is sqrt(1 − ᾱ_t)":
            -e / a.sqrt(),
        "this divides by ᾱ_t; the noise's amplitude in x_t is sqrt(1 − ᾱ_t)": -e / a,
        "this uses α_t (schedule.alphas, one step); the noise in x_t has built up over all "
        "steps: ᾱ_t (schedule.alpha_bars)": -e / (1 - at(schedule.alphas)).sqrt(),
        "ᾱ is read at t + 1: timesteps are 0-indexed, ᾱ_t is alpha_bars[t]":
            -e / (1 - at(schedule.alpha_bars, (t + 1).clamp(max=T - 1))).sqrt(),
        "ᾱ is read at t − 1 (alpha_bar_prev): timesteps are 0-indexed, ᾱ_t is alpha_bars[t]":
            -e / (1 - at(schedule.alpha_bar_prev)).sqrt(),
        "ᾱ is read at t − 1 (and at t = 0 that wraps round to the last value): timesteps are "
        "0-indexed, ᾱ_t is alpha_bars[t]": -e / (1 - at(schedule.alpha_bars, t - 1)).sqrt(),
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _score_cases():
    g = torch.Generator().manual_seed(50)
    linear = du.NoiseSchedule.create("linear", 1000)
    cosine = du.NoiseSchedule.create("cosine", 50)
    return [  # (schedule, eps, t, description); the first stays clear of t = T − 1
        (linear, torch.randn(5, 2, generator=g), torch.tensor([0, 1, 250, 700, 998]),
         "points (B, 2), linear schedule, T = 1000"),
        (cosine, torch.randn(5, 3, 4, 4, generator=g), torch.tensor([0, 7, 24, 48, 49]),
         "images (B, 3, 4, 4), cosine schedule, T = 50"),
        (linear, torch.randn(1, 2, generator=g), torch.tensor([999]),
         "one point at t = T − 1"),
    ]


@exercise_check("Exercise 1 · From the noise to the score")
def check_score_from_eps(fn) -> str:
    """Check ``score_from_eps(eps, t, schedule) -> Tensor``."""
    names = ("eps", "t", "schedule")
    for schedule, eps, t, description in _score_cases():
        what = f"the score ({description})"
        # the reference, before the learner's code runs
        expected = du.score_from_eps(eps, t, schedule)
        mistakes = _score_mistakes(eps, t, schedule)
        out = _call_05(fn, eps.clone(), t.clone(), schedule, names=names, what=what,
                       index_hint="is t off by one (t + 1 or t − 1)? Timesteps are 0 .. T − 1 "
                                  "and ᾱ_t is alpha_bars[t]")
        out = expect_result(out, eps.shape, eps.dtype, mistakes, what)
        compare(out, expected, mistakes, what=what, atol=1e-4, rtol=1e-3,
                item_names=[f"t = {int(s)}" for s in t],
                term_hint="∇ log q_t(x_t) = −ε / sqrt(1 − ᾱ_t), with ᾱ_t = alpha_bars[t] "
                          "broadcast over each item (du.extract)")
    schedule, eps, t, _ = _score_cases()[1]
    probe_device(fn, eps, t, schedule, what="score_from_eps")
    return "score = −ε / sqrt(1 − ᾱ_t) for points and images, from t = 0 to t = T − 1"


# ── Exercise 2 · The DDIM step ───────────────────────────────────────────────────────


def _ddim_variant(eps: Tensor, xt: Tensor, t: Tensor, t_prev: Tensor, schedule, eta: float,
                  noise: Tensor, *, alphas=False, wrap=False, one_back=False, x0_no_sqrt=False,
                  x0_plus=False, no_sigma_in_direction=False, eta_twice=False,
                  eta_missing=False, sigma_as_variance=False, ratio_flipped=False,
                  direction_at_t=False, noise_unscaled=False, no_noise=False) -> Tensor:
    """The DDIM step (DDIM eq. 12 with σ of eq. 16) with one of the usual mistakes, in float64."""
    values = (schedule.alphas if alphas else schedule.alpha_bars).double()
    nd = xt.ndim
    prev = t - 1 if one_back else t_prev
    a_t = _per_item(values, t, nd)
    if wrap:   # values[-1]: the last entry of the table
        a_prev = _per_item(values, prev, nd)
    else:      # ᾱ_prev = 1 past the last step
        a_prev = torch.where(prev >= 0, values[prev.clamp(min=0)], 1.0).reshape(a_t.shape)
    e, x = eps.double(), xt.double()
    # 1. the predicted x_0 (DDPM eq. 4 solved for x_0)
    noise_amp = (1 - a_t) if x0_no_sqrt else (1 - a_t).sqrt()
    x0_hat = (x + noise_amp * e if x0_plus else x - noise_amp * e) / a_t.sqrt()
    # 2. σ (DDIM eq. 16)
    ratio = a_prev / a_t if ratio_flipped else a_t / a_prev
    variance = (1 - a_prev) / (1 - a_t) * (1 - ratio)
    factor = 1.0 if eta_missing else eta ** 2 if eta_twice else eta
    sigma = factor * (variance if sigma_as_variance else variance.sqrt())
    # 3. the direction pointing to x_t
    direction_var = (1 - a_t) if direction_at_t else (
        (1 - a_prev) if no_sigma_in_direction else (1 - a_prev - sigma ** 2))
    out = a_prev.sqrt() * x0_hat + direction_var.sqrt() * e
    # 4. the random part
    if not no_noise:
        out = out + (noise.double() if noise_unscaled else sigma * noise.double())
    return out.float()


def _ddim_mistakes(eps, xt, t, t_prev, schedule, eta, noise) -> dict[str, Tensor]:
    v = functools.partial(_ddim_variant, eps, xt, t, t_prev, schedule, eta, noise)
    not_applied = ("noise was added although η = 0: σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · "
                   "sqrt(1 − ᾱ_t/ᾱ_prev) is 0 then, and the step is deterministic"
                   if eta == 0 else
                   "σ_t is not multiplied by η: σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · "
                   "sqrt(1 − ᾱ_t/ᾱ_prev) (DDIM eq. 16)")
    return {
        "the step uses α_t (schedule.alphas, one step); the DDIM paper's α_t is our ᾱ_t "
        "(schedule.alpha_bars)": v(alphas=True),
        "t_prev = −1 (past the last step) read the last entry of the table, alpha_bars[-1]; "
        "past the last step ᾱ_prev = 1 (the clean image)": v(wrap=True),
        "ᾱ_prev is read at t − 1, one step back; the step goes to t_prev, which may be many "
        "timesteps back: ᾱ_prev = alpha_bars[t_prev]": v(one_back=True),
        "x̂_0 subtracts (1 − ᾱ_t) · ε; the noise's amplitude in x_t is sqrt(1 − ᾱ_t): "
        "x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)": v(x0_no_sqrt=True),
        "the sign in x̂_0 is wrong: x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)": v(x0_plus=True),
        "σ² is missing from the direction term: it is sqrt(1 − ᾱ_prev − σ_t²) · ε, so that the "
        "noise's total variance stays 1 − ᾱ_prev": v(no_sigma_in_direction=True),
        "η is applied twice (σ_t = η² · ...): σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · "
        "sqrt(1 − ᾱ_t/ᾱ_prev)": v(eta_twice=True),
        not_applied: v(eta_missing=True),
        not_applied + " (and σ_t² belongs inside the direction term)":
            v(eta_missing=True, no_sigma_in_direction=True),
        "σ_t is used without its square root: σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · "
        "(1 − ᾱ_t/ᾱ_prev))": v(sigma_as_variance=True),
        "the ratio inside σ_t is upside down: it is 1 − ᾱ_t/ᾱ_prev (ᾱ_t < ᾱ_prev, so this is "
        "between 0 and 1)": v(ratio_flipped=True),
        "the direction term uses sqrt(1 − ᾱ_t) (where the step starts); it points to x_t from "
        "where the step lands: sqrt(1 − ᾱ_prev − σ_t²) · ε": v(direction_at_t=True),
        "the noise is added without its factor: + σ_t z, with σ_t of DDIM eq. 16":
            v(noise_unscaled=True),
        "no noise was added: with η > 0 the step adds σ_t z (use the `noise` argument as z)":
            v(no_noise=True),
    }


def _ddim_cases():
    """(schedule, t, t_prev, description): strides of one and of many timesteps, the first
    step (t = T − 1) and the last (t_prev = −1)."""
    linear = du.NoiseSchedule.create("linear", 1000)
    cosine = du.NoiseSchedule.create("cosine", 50)
    return [
        (linear, torch.tensor([999, 979, 500, 300, 19, 0]),
         torch.tensor([979, 959, 480, 299, -1, -1]), "linear schedule, T = 1000"),
        (cosine, torch.tensor([49, 40, 25, 10, 3]), torch.tensor([39, 30, 24, 0, -1]),
         "cosine schedule, T = 50"),
    ]


def _ddim_inputs(t: Tensor, schedule, seed: int):
    """x_t made from an image and noise, and a prediction of that noise with an error."""
    g = torch.Generator().manual_seed(seed)
    B = len(t)
    x0 = torch.rand(B, 3, 4, 4, generator=g) * 2 - 1
    eps_true = torch.randn(B, 3, 4, 4, generator=g)
    xt = du.q_sample(x0, t, eps_true, schedule)
    model_eps = eps_true + 0.3 * torch.randn(B, 3, 4, 4, generator=g)
    noise = torch.randn(B, 3, 4, 4, generator=g)
    return xt, model_eps, noise


_STEP_NAMES = ("model_eps", "xt", "t", "t_prev", "schedule")
_STEP_INDEX_HINT = ("t_prev = −1 means past the last step, where ᾱ_prev = 1: torch.where("
                    "t_prev >= 0, alpha_bars[t_prev.clamp(min=0)], 1.0), or put a 1 in front of "
                    "alpha_bars and read it at t_prev + 1")
_STEP_TERMS = ("compare each term with DDIM eq. 12: sqrt(ᾱ_prev) · x̂_0, "
               "sqrt(1 − ᾱ_prev − σ_t²) · ε_θ and σ_t z, with ᾱ_t = alpha_bars[t], "
               "ᾱ_prev = alpha_bars[t_prev] (1 where t_prev = −1)")


def _call_step(fn, model_eps, xt, t, t_prev, schedule, what, **kwargs):
    return _call_05(fn, model_eps.clone(), xt.clone(), t.clone(), t_prev.clone(), schedule,
                    names=_STEP_NAMES, what=what, index_hint=_STEP_INDEX_HINT, **kwargs)


def _correlation(a: Tensor, b: Tensor) -> float:
    """The correlation of two tensors' elements (0 when one of them is constant or NaN)."""
    r = torch.corrcoef(torch.stack([a.detach().flatten().double(), b.flatten().double()]))
    return float(r[0, 1].nan_to_num(nan=0.0))


@exercise_check("Exercise 2 · The DDIM step")
def check_ddim_step(fn) -> str:
    """Check ``ddim_step(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None)``."""
    for k, (schedule, t, t_prev, description) in enumerate(_ddim_cases()):
        xt, model_eps, noise = _ddim_inputs(t, schedule, seed=60 + k)
        item_names = [f"t = {int(a)} → {int(b)}" for a, b in zip(t, t_prev)]
        for eta in (0.0, 1.0, 0.5):
            what = f"x_prev ({description}, η = {eta:g}, noise given)"
            # the reference, before the learner's code runs
            expected = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta, noise=noise)
            mistakes = _ddim_mistakes(model_eps, xt, t, t_prev, schedule, eta, noise)
            out = _call_step(fn, model_eps, xt, t, t_prev, schedule, what, eta=eta, noise=noise)
            out = expect_result(out, xt.shape, xt.dtype, mistakes, what)
            if eta > 0 and not close(out, expected, atol=1e-4, rtol=1e-3):
                _check_noise_used(out, model_eps, xt, t, t_prev, schedule, eta, noise,
                                  mistakes, what)
            compare(out, expected, mistakes, what=what, atol=1e-4, rtol=1e-3,
                    item_names=item_names, term_hint=_STEP_TERMS)
    _check_drawn(fn)
    schedule, t, t_prev, _ = _ddim_cases()[0]
    xt, model_eps, _ = _ddim_inputs(t, schedule, seed=60)
    probe_device(fn, model_eps, xt, t, t_prev, schedule, what="ddim_step with noise=None",
                 eta=0.5, noise=None)
    return ("the DDIM step matches DDIM eq. 12 with σ_t(η) of eq. 16, for η = 0, 0.5 and 1, "
            "strides of one and many steps, and t_prev = −1")


def _check_noise_used(out, model_eps, xt, t, t_prev, schedule, eta, noise, mistakes, what):
    """With η > 0 and the noise given, that noise must be z."""
    for wrong in mistakes.values():
        if close(out, wrong, atol=1e-4, rtol=1e-3):
            return  # named by compare()
    mean = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta, noise=torch.zeros_like(xt))
    sigma = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta,
                         noise=torch.ones_like(xt)) - mean
    random = (sigma.abs() > 1e-3).reshape(len(t), -1).all(dim=1)    # the items with σ_t > 0
    if not random.any() or not close(out[~random], mean[~random], atol=1e-4, rtol=1e-3):
        return
    z = (out - mean)[random] / sigma[random]
    if _correlation(z, noise[random]) < 0.5:
        fail(f"{what} is not right: the `noise` argument was not used — when noise is given it "
             "is z; draw z (torch.randn_like(xt)) only when noise is None")


def _check_drawn(fn) -> None:
    """noise=None: deterministic for η = 0; fresh standard normal z for η > 0."""
    schedule = du.NoiseSchedule.create("cosine", 50)
    t, t_prev = torch.full((16,), 30), torch.full((16,), 20)
    xt, model_eps, _ = _ddim_inputs(t, schedule, seed=70)
    expected = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=0.0,
                            noise=torch.zeros_like(xt))
    what = "x_prev with η = 0 and noise=None"
    outs = [expect_result(_call_step(fn, model_eps, xt, t, t_prev, schedule, what, eta=0.0),
                           xt.shape, xt.dtype, {}, what) for _ in range(2)]
    compare(outs[0], expected, {}, what=what, atol=1e-4, rtol=1e-3,
            term_hint="with η = 0, σ_t = 0: the step adds no noise and is deterministic")
    if not torch.equal(outs[0], outs[1]):
        fail(f"{what}: two calls with the same inputs gave different results; with η = 0 the "
             "DDIM step is deterministic (σ_t = 0)")
    mean = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=1.0, noise=torch.zeros_like(xt))
    sigma = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=1.0,
                         noise=torch.ones_like(xt)) - mean
    what = "x_prev with η = 1 and noise=None"
    outs = [expect_result(_call_step(fn, model_eps, xt, t, t_prev, schedule, what, eta=1.0),
                           xt.shape, xt.dtype, {}, what) for _ in range(2)]
    expect_fresh_normal_noise(outs, mean, sigma, what)


# ── Exercise 3 · Which timesteps to visit ────────────────────────────────────────────


def _spacing_values(T: int, S: int) -> dict[str, Tensor]:
    """The three spacings (diffusers' DDIMScheduler.set_timesteps, steps_offset = 0), descending."""
    return {
        "linspace": torch.linspace(0, T - 1, S, dtype=torch.float64).round().long().flip(0),
        "leading": (torch.arange(S, dtype=torch.long) * (T // S)).flip(0),
        "trailing": torch.arange(T, 0, -T / S, dtype=torch.float64).round().long()[:S] - 1,
    }


def _timestep_mistakes(T: int, S: int, spacing: str, expected: Tensor) -> dict[str, Tensor]:
    right = _spacing_values(T, S)
    half_up = {
        "linspace": torch.floor(torch.linspace(0, T - 1, S, dtype=torch.float64) + 0.5).long().flip(0),
        "trailing": torch.floor(torch.arange(T, 0, -T / S, dtype=torch.float64)[:S] + 0.5).long() - 1,
    }
    truncated = {
        "linspace": torch.linspace(0, T - 1, S, dtype=torch.float64).long().flip(0),
        "trailing": torch.arange(T, 0, -T / S, dtype=torch.float64)[:S].long() - 1,
    }
    mistakes = {
        f"these are the {other!r} timesteps; {spacing!r} asked for {_SPACING_RULE[spacing]}": value
        for other, value in right.items() if other != spacing
    }
    mistakes.update({
        "the timesteps are in ascending order; the sampler visits them from the noisiest "
        "down, so return them in descending order (.flip(0))": expected.flip(0),
        "the timesteps are one too high: 'trailing' counts down from T − 1, so subtract 1 "
        "from round(arange(T, 0, −T/S))": expected + 1,
        "the timesteps are one too low": expected - 1,
    })
    if spacing == "leading":
        mistakes["the 'leading' step is T // S, an integer: arange(S) · (T // S), not "
                 "rounded multiples of T / S"] = (
            (torch.arange(S, dtype=torch.float64) * (T / S)).round().long().flip(0))
    if spacing in half_up:
        mistakes["the values differ where they end in exactly .5: round halves to even, as "
                 "torch.round and NumPy do (diffusers' convention), not up"] = half_up[spacing]
        mistakes["the values were truncated (.long() or int() rounds down); round them "
                 "first (.round().long())"] = truncated[spacing]
    if spacing == "linspace":
        mistakes["the 'linspace' timesteps run from 0 to T − 1, the last timestep there is: "
                 "round(linspace(0, T − 1, S))"] = (
            torch.linspace(0, T, S, dtype=torch.float64).round().clamp(max=T - 1).long().flip(0))
    return mistakes


_SPACING_RULE = {
    "linspace": "round(linspace(0, T − 1, S)), from the last timestep down to 0",
    "leading": "arange(S) · (T // S), reversed: multiples of the integer step from 0",
    "trailing": "round(arange(T, 0, −T/S)) − 1: from T − 1 down in steps of T/S",
}
_TIMESTEP_CASES = [(1000, 50), (1000, 30), (10, 3), (10, 4), (1000, 1), (20, 20), (7, 2),
                   (100, 29)]   # arange(100, 0, -100/29) has 30 values


def _expect_timesteps(out, T: int, S: int, what: str) -> Tensor:
    """Type, length, dtype, range, distinct, descending — each named."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, (list, tuple, range)):
        fail(f"{what} is a {type(out).__name__}; return a tensor (torch.tensor(...) or build "
             "it with torch operations)")
    if not isinstance(out, Tensor):
        fail(f"{what} should be a torch.Tensor of shape ({S},), got {type(out).__name__}")
    if out.ndim != 1 or out.shape[0] != S:
        fail(f"{what} should have shape ({S},), one timestep per sampling step, got "
             f"{tuple(out.shape)} — torch.arange with a float step can give one value too "
             "many: keep the first S")
    if out.dtype.is_floating_point:
        fail(f"{what} should hold integer timesteps (torch.long), got {out.dtype}: round, then "
             ".long()")
    if out.dtype != torch.long:
        fail(f"{what} should have dtype torch.long, got {out.dtype}")
    if int(out.min()) < 0 or int(out.max()) > T - 1:
        fail(f"{what} holds {int(out.min())} .. {int(out.max())}; timesteps lie in "
             f"0 .. T − 1 = 0 .. {T - 1}")
    if out.unique().numel() != S:
        fail(f"{what} visits a timestep twice ({out.tolist()}); the S timesteps must be "
             "distinct")
    return out


@exercise_check("Exercise 3 · Which timesteps to visit")
def check_ddim_timesteps(fn) -> str:
    """Check ``ddim_timesteps(T, num_steps, *, spacing="trailing") -> Tensor``."""
    for T, S in _TIMESTEP_CASES:
        for spacing in du.SPACINGS:
            what = f"ddim_timesteps({T}, {S}, spacing={spacing!r})"
            expected = du.ddim_timesteps(T, S, spacing=spacing)
            mistakes = _timestep_mistakes(T, S, spacing, expected)
            try:
                out = call(fn, T, S, spacing=spacing)
            except (TypeError, ValueError, KeyError) as err:
                if "spacing" not in str(err) and not isinstance(err, KeyError):
                    raise
                fail(f"{what} failed ({type(err).__name__}: {err}) — accept "
                     "spacing='linspace', 'leading' and 'trailing'")
            if isinstance(out, Tensor) and out.ndim == 1 and out.shape[0] == S \
                    and not out.dtype.is_floating_point:
                for hint, wrong in mistakes.items():
                    if torch.equal(out.long(), wrong) and not torch.equal(wrong, expected):
                        fail(f"{what} is not right: {hint}")
            out = _expect_timesteps(out, T, S, what)
            if not torch.equal(out, expected):
                if S > 1 and bool((out[1:] > out[:-1]).all()):
                    fail(f"{what} is in ascending order; the sampler visits the timesteps from "
                         "the noisiest down: return them in descending order")
                fail(f"{what} gives {_short(out)}; expected {_short(expected)}: "
                     f"{spacing!r} is {_SPACING_RULE[spacing]}")
    # the default spacing
    expected = du.ddim_timesteps(1000, 50)
    out = _expect_timesteps(call(fn, 1000, 50), 1000, 50, "ddim_timesteps(1000, 50)")
    if not torch.equal(out, expected):
        fail("ddim_timesteps(1000, 50) without a spacing should use the default, "
             "spacing='trailing'")
    return ("the 'linspace', 'leading' and 'trailing' timesteps match diffusers' DDIMScheduler, "
            "descending, also where S does not divide T")


def _short(values: Tensor) -> str:
    v = values.tolist()
    return str(v) if len(v) <= 8 else f"[{v[0]}, {v[1]}, {v[2]}, ..., {v[-2]}, {v[-1]}]"


# ── Exercise 4 · Spherical interpolation between two noises ──────────────────────────


def _slerp_variant(z0: Tensor, z1: Tensor, alpha, *, linear=False, raw_dot=False,
                   whole_batch=False, swapped=False, unit=False, no_fallback=False) -> Tensor:
    """slerp (Shoemake 1985) with one of the usual mistakes, in float64, per sample."""
    B = z0.shape[0]
    v0, v1 = z0.reshape(B, -1).double(), z1.reshape(B, -1).double()
    if whole_batch:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)   # (1 or B, 1)
    if linear:
        out = (1 - a) * v0 + a * v1
        return out.reshape(z0.shape).float()
    n0, n1 = v0.norm(dim=1, keepdim=True), v1.norm(dim=1, keepdim=True)
    dot = (v0 * v1).sum(1, keepdim=True)
    cos = dot if raw_dot else (dot / (n0 * n1)).clamp(-1, 1)
    theta = torch.acos(cos)
    parallel = torch.zeros_like(cos, dtype=torch.bool) if (no_fallback or raw_dot) \
        else cos.abs() > 0.9995
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    w0 = torch.where(parallel, 1 - a, torch.sin((1 - a) * theta) / sin)
    w1 = torch.where(parallel, a, torch.sin(a * theta) / sin)
    if swapped:
        w0, w1 = w1, w0
    if unit:
        v0, v1 = v0 / n0, v1 / n1
    out = w0 * v0 + w1 * v1
    return out.reshape(z0.shape).float()


def _slerp_mistakes(z0: Tensor, z1: Tensor, alpha) -> dict[str, Tensor]:
    v = functools.partial(_slerp_variant, z0, z1, alpha)
    mistakes = {
        "this is linear interpolation, (1 − α) z_0 + α z_1: slerp moves along the arc, "
        "sin((1 − α) θ)/sin θ · z_0 + sin(α θ)/sin θ · z_1 (if you fall back to the straight "
        "line for parallel vectors: is cos θ divided by both norms? Without them it is far "
        "from [−1, 1], and every pair looks parallel)": v(linear=True),
        "the angle comes from the plain dot product: cos θ = z_0 · z_1 / (|z_0| |z_1|), "
        "divide by both norms": v(raw_dot=True),
        "z_0 and z_1 swap places: alpha = 0 must give z_0 (its weight is sin((1 − α) θ)/sin θ) "
        "and alpha = 1 gives z_1": v(swapped=True),
        "the result is made of the normalised vectors z/|z| (it has norm 1): weight z_0 and "
        "z_1 themselves, so the norm stays that of the noise": v(unit=True),
        "where z_0 and z_1 are parallel, sin θ = 0 and the weights are 0/0: fall back to "
        "linear interpolation there (e.g. where |cos θ| > 0.9995)": v(no_fallback=True),
    }
    if not isinstance(alpha, Tensor):   # (one alpha per sample makes no batch-wide vector)
        mistakes["the whole batch was treated as one vector: flatten each sample on its own, "
                 "z.reshape(B, -1), and find one angle per sample"] = v(whole_batch=True)
    return mistakes


def _slerp_cases():
    g = torch.Generator().manual_seed(80)
    z0 = torch.randn(5, 3, 4, 4, generator=g)
    z1 = torch.randn(5, 3, 4, 4, generator=g)
    z1[1] = 0.3 * z0[1] + torch.randn(3, 4, 4, generator=g)        # an angle below 90°
    z1[2] = -0.5 * z0[2] + 0.2 * torch.randn(3, 4, 4, generator=g)  # one above 90°
    p0 = torch.randn(6, 2, generator=g)
    p1 = torch.randn(6, 2, generator=g)
    parallel0 = torch.zeros(3, 3, 4, 4)
    parallel0[:, 0, 0, 0] = 3.0                                   # one-hot vectors...
    parallel1 = parallel0 * torch.tensor([2.0, 1.0, 0.5]).reshape(3, 1, 1, 1)  # ...and parallel ones
    parallel1[2] = torch.randn(3, 4, 4, generator=g)              # one pair that is not
    return [
        (z0, z1, 0.0, "noises (5, 3, 4, 4), alpha = 0"),
        (z0, z1, 0.3, "noises (5, 3, 4, 4), alpha = 0.3"),
        (z0, z1, 1.0, "noises (5, 3, 4, 4), alpha = 1"),
        (z0, z1, torch.tensor([0.1, 0.5, 0.7, 0.9, 0.25]), "noises (5, 3, 4, 4), one alpha per sample"),
        (p0, p1, 0.6, "points (6, 2), alpha = 0.6"),
        (parallel0, parallel1, 0.4, "parallel pairs (3, 3, 4, 4), alpha = 0.4"),
    ]


@exercise_check("Exercise 4 · Spherical interpolation between two noises")
def check_slerp(fn) -> str:
    """Check ``slerp(z0, z1, alpha) -> Tensor`` on batches ``(B, ...)``."""
    names = ("z0", "z1", "alpha")
    for z0, z1, alpha, description in _slerp_cases():
        what = f"slerp ({description})"
        # the reference, before the learner's code runs
        expected = du.slerp(z0, z1, alpha)
        mistakes = _slerp_mistakes(z0, z1, alpha)
        a = alpha.clone() if isinstance(alpha, Tensor) else alpha
        out = _call_05(fn, z0.clone(), z1.clone(), a, names=names, what=what,
                       index_hint="index each sample of the batch, z[i]",
                       shapes="an alpha of shape (B,) must become (B, 1) (or (B, 1, 1, 1)) "
                              "to weight each sample's vector")
        out = expect_result(out, z0.shape, z0.dtype, mistakes, what)
        compare(out, expected, mistakes, what=what, item_names=[f"sample {i}" for i in
                                                                 range(len(z0))],
                term_hint="per sample: cos θ = z_0 · z_1 / (|z_0| |z_1|), then "
                          "sin((1 − α) θ)/sin θ · z_0 + sin(α θ)/sin θ · z_1")
    z0, z1, alpha, _ = _slerp_cases()[3]
    probe_device(fn, z0, z1, alpha, what="slerp")
    return ("slerp follows the arc per sample, from z_0 at alpha = 0 to z_1 at alpha = 1, "
            "linear where the vectors are parallel")


# ── Exercise 5 · DDIM inversion ──────────────────────────────────────────────────────


class _InvertModel(nn.Module):
    """A smooth stand-in noise predictor that records its calls:
    ε̂ = 0.5 tanh(x) + 0.8 x / (1 + x²) · w_c + w_c · (t + 1) / T, one w_c per channel."""

    def __init__(self, T: int):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.9, -0.6, 0.3]))
        self.T = T
        self.calls: list[tuple[Tensor, object]] = []
        self.recording = True

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        if self.recording:
            self.calls.append((x.detach().clone(),
                               t.detach().clone() if isinstance(t, Tensor) else t))
        w = self.w.reshape(1, -1, 1, 1)
        level = ((t.float() + 1) / self.T).reshape(-1, 1, 1, 1)
        return 0.5 * torch.tanh(x) + 0.8 * x / (1 + x ** 2) * w + w * level


def _invert_variant(model, x0: Tensor, schedule, levels: list[int], *, start_at_zero=False,
                    no_sqrt=False, clip=False, alphas=False, from_x0=False,
                    model_at_from=False) -> Tensor:
    """DDIM inversion with one of the usual mistakes, in float64."""
    values = (schedule.alphas if alphas else schedule.alpha_bars).double()
    table = torch.cat([values.new_ones(1), values])                     # index t + 1; t = -1 → 1
    x = x0.double()
    froms = ([0] if start_at_zero else [-1]) + levels[:-1]
    with torch.no_grad():
        for t_from, t_to in zip(froms, levels):
            t_model = max(t_from, 0) if model_at_from else t_to
            source = x0.double() if from_x0 else x
            eps = model(source.float(), torch.full((len(x0),), t_model)).double()
            a_from, a_to = table[t_from + 1], table[t_to + 1]
            noise_from = (1 - a_from) if no_sqrt else (1 - a_from).sqrt()
            x0_hat = (source - noise_from * eps) / a_from.sqrt()
            if clip:
                x0_hat = x0_hat.clamp(-1, 1)
            x = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps
    return x.float()


def _invert_mistakes(model, x0, schedule, levels) -> dict[str, Tensor]:
    v = functools.partial(_invert_variant, model, x0, schedule, levels)
    return {
        "the first step starts from ᾱ_0 (t = 0); the image itself is 'before step 0', "
        "t_from = -1, where ᾱ = 1": v(start_at_zero=True),
        "x̂_0 subtracts (1 − ᾱ_from) · ε; the noise's amplitude is sqrt(1 − ᾱ_from)":
            v(no_sqrt=True),
        "x̂_0 was clipped to [-1, 1]: inversion must be the exact reverse of the sampler's "
        "steps, so do not clip": v(clip=True),
        "the step uses α_t (schedule.alphas, one step); it needs ᾱ_t (schedule.alpha_bars)":
            v(alphas=True),
        "every step started from x0: each step starts from the x that the previous step "
        "reached": v(from_x0=True),
        "the model was given t_from; give it t_to, the timestep the step goes to (the first "
        "step has no t_from to give)": v(model_at_from=True),
    }


def _invert_cases():
    return [(du.NoiseSchedule.create("cosine", 50), 5, "trailing"),
            (du.NoiseSchedule.create("linear", 100), 7, "leading"),
            (du.NoiseSchedule.create("cosine", 50), 3, "linspace")]


def _check_invert_calls(calls, levels: list[int], x0: Tensor, what: str) -> None:
    """The model must be called once per timestep, ascending, with t as a (B,) tensor."""
    if not calls:
        fail(f"{what}: the model was never called: each step needs ε_θ(x, t_to)")
    seen = []
    for _, t in calls:
        if not isinstance(t, Tensor) or t.shape != (len(x0),) or t.dtype.is_floating_point:
            fail(f"{what}: the model got t = {t!r}; give it one integer timestep per image, a "
                 f"long tensor of shape (B,) = ({len(x0)},): torch.full((B,), t_to)")
        seen.append(int(t[0]))
    if seen == levels:
        if not torch.equal(calls[0][0], x0):
            fail(f"{what}: the first call of the model did not get the image x0: the run starts "
                 "at the image (t_from = -1)")
        return
    if seen == levels[::-1]:
        fail(f"{what}: the model was called at t = {seen}, descending; inversion goes from the "
             "image to the noise, so visit the timesteps in ascending order "
             "(du.ddim_timesteps(...).flip(0))")
    if len(seen) != len(levels):
        fail(f"{what}: the model was called {len(seen)} times, at t = {seen}; call it once per "
             f"timestep of the run, t_to = {levels}")
    if seen[1:] == levels[:-1]:
        return  # ε_θ at t_from: named by the value comparison
    fail(f"{what}: the model was called at t = {seen}; expected t_to = {levels} (the timesteps "
         "of du.ddim_timesteps, ascending)")


@exercise_check("Exercise 5 · DDIM inversion: from an image back to its noise")
def check_ddim_invert(fn) -> str:
    """Check ``ddim_invert(model, x0, schedule, *, num_steps=50, spacing="trailing")``."""
    g = torch.Generator().manual_seed(90)
    for schedule, num_steps, spacing in _invert_cases():
        what = f"ddim_invert (T = {schedule.T}, num_steps = {num_steps}, spacing = {spacing!r})"
        x0 = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
        levels = du.ddim_timesteps(schedule.T, num_steps, spacing=spacing).flip(0).tolist()
        quiet = _InvertModel(schedule.T)
        quiet.recording = False
        # the reference, before the learner's code runs
        expected = du.ddim_invert(quiet, x0, schedule, num_steps=num_steps, spacing=spacing,
                                  autocast=False, progress=False)
        mistakes = _invert_mistakes(quiet, x0, schedule, levels)
        model = _InvertModel(schedule.T)
        model.load_state_dict(quiet.state_dict())
        try:
            out = call_pure(fn, model, x0.clone(), schedule, names=("model", "x0", "schedule"),
                            num_steps=num_steps, spacing=spacing)
        except ValueError as err:
            if "t_prev must come before t" not in str(err):
                raise
            fail(f"{what}: du.ddim_step refused the step ({err}) — it only steps towards the "
                 "data; write the inversion step's formula with t_from and t_to yourself")
        if isinstance(out, (list, tuple)) and len(out) > 1:
            fail(f"{what}: returned a {type(out).__name__} of {len(out)} items; return only the "
                 "final noise x_T, a tensor shaped like x0")
        out = expect_result(out, x0.shape, x0.dtype, mistakes, what)
        _check_invert_calls(model.calls, levels, x0, what)
        compare(out.detach(), expected, mistakes, what=what, atol=1e-4, rtol=1e-3,
                item_names=[f"image {i}" for i in range(len(x0))],
                term_hint="each step: x̂_0 = (x − sqrt(1 − ᾱ_from) ε) / sqrt(ᾱ_from), then "
                          "x = sqrt(ᾱ_to) x̂_0 + sqrt(1 − ᾱ_to) ε, with ε = model(x, t_to) and "
                          "ᾱ = 1 at t_from = -1")
    schedule, num_steps, spacing = _invert_cases()[0]
    probe_device(fn, _InvertModel(schedule.T), x0, schedule, what="ddim_invert",
                 num_steps=num_steps, spacing=spacing)
    return ("DDIM run backwards matches du.ddim_invert: from the image (ᾱ = 1) up the "
            "timesteps in ascending order, ε_θ(x, t_to) at each step, no clipping")
