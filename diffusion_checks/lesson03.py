"""Checks of lesson 03's exercises (training and sampling).

The loss and the training step draw t and ε themselves, in any order and by any method, so
these checks never replay a seed. A stand-in model records what it is given (x_t, t and
the conditioning keywords); the noise is recovered from it,
ε = (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t), and the loss, the gradient and the update are
recomputed from those and compared with what the learner's code returned and did.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_fresh_normal_noise,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, same_values, snapshot, to_device, yours_if_passed)


# ── 03 · Training and sampling ───────────────────────────────────────────────────────

# ── Another device, also on a machine without a GPU ──────────────────────────────────


# ── The stand-in model ───────────────────────────────────────────────────────────────


@dataclasses.dataclass
class _Call:
    """What the stand-in model was given in one forward pass."""

    x: Tensor
    t: object
    labels: object
    autocast: bool
    autocast_dtype: torch.dtype | None
    training: bool


class _RecordingModel(nn.Module):
    """A stand-in noise predictor that records its inputs:
    ε̂ = x_t / 2 + conv(x_t) + w · t / 10 + e[labels].

    ``events`` lists, in order, "forward" and "backward" (the gradient reaching the
    output); the training-step check adds the optimizer's and scheduler's steps.
    """

    def __init__(self, channels: int = 3, *, seed: int = 0, num_labels: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.t_weight = nn.Parameter(torch.randn(channels, generator=g) * 0.3)
        self.label_emb = nn.Parameter(torch.randn(num_labels, channels, generator=g) * 0.3)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls: list[_Call] = []
        self.events: list = []
        self.recording = True

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, **cond) -> Tensor:
        if self.recording:
            device_type = x.device.type
            try:
                on, dtype = (torch.is_autocast_enabled(device_type),
                             torch.get_autocast_dtype(device_type))
            except RuntimeError:  # a device without autocast (meta)
                on, dtype = False, None
            self.calls.append(_Call(
                x=x.detach().clone(), t=t.detach().clone() if isinstance(t, Tensor) else t,
                labels=labels, autocast=on, autocast_dtype=dtype, training=self.training))
            self.events.append("forward")
        b, c = x.shape[0], x.shape[1]
        out = 0.5 * x + self.conv(x) + self.t_weight.reshape(1, c, 1, 1) * (
            t.float() / 10).reshape(b, 1, 1, 1)
        if labels is not None:
            out = out + self.label_emb[labels].reshape(b, c, 1, 1)
        if self.recording and out.requires_grad:
            out.register_hook(self._backward_seen)
        return out

    def _backward_seen(self, grad):
        self.events.append("backward")

    def copy(self, state=None) -> _RecordingModel:
        """A silent copy (it records nothing) with ``state`` or these weights."""
        twin = _RecordingModel(self.conv.in_channels, num_labels=self.label_emb.shape[0])
        twin.load_state_dict(self.state_dict() if state is None else state)
        twin.recording = False
        return twin.to(self.conv.weight.device)


def _call_learner(fn, *args, names, what: str, **kwargs):
    """:func:`call_pure`, turning the crashes typical of this lesson into hints."""
    try:
        return call_pure(fn, *args, names=names, **kwargs)
    except TypeError as err:
        if "labels" not in str(err):
            raise
        fail(f"{what} does not accept the conditioning keywords: keep `**cond` in its "
             f"signature and pass them on to the model (PyTorch said: {err})")
    except RuntimeError as err:
        if "must match the size of tensor" not in str(err):
            raise
        fail(BROADCAST_HINT + f" (PyTorch said: {str(err).splitlines()[0]})")


def _check_t(t, *, B: int, T: int, what: str) -> Tensor:
    """The timesteps the model got: an integer tensor of shape (B,) in [0, T)."""
    if not isinstance(t, Tensor):
        fail(f"{what}: the model got t = {t!r}; give it a tensor of timesteps, shape (B,)")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        fail(f"{what}: the model got t of dtype {t.dtype}; timesteps are integers "
             "(torch.randint gives torch.long)")
    if t.shape != (B,):
        fail(f"{what}: the model got t of shape {tuple(t.shape)}; draw one timestep per "
             f"image, shape (B,) = ({B},)")
    if int(t.min()) < 0 or int(t.max()) >= T:
        fail(f"{what}: the model got timesteps from {int(t.min())} to {int(t.max())}; they "
             f"must lie in {{0, ..., T-1}} = {{0, ..., {T - 1}}}: torch.randint(0, T, (B,)) "
             "excludes its upper end")
    return t


def _check_cond(call_: _Call, labels: Tensor, what: str) -> None:
    if not isinstance(call_.labels, Tensor) or not torch.equal(call_.labels, labels):
        got = "no labels" if call_.labels is None else "other labels"
        fail(f"{what}: the conditioning keywords (**cond, here labels=...) did not reach the "
             f"model (it got {got}): pass them on as they are, model(xt, t, **cond)")


def _noise_in(call_: _Call, x0: Tensor, schedule) -> Tensor:
    """The noise that made the x_t the model got: (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t)."""
    a = schedule.alpha_bars.double()[call_.t].reshape(-1, 1, 1, 1)
    return ((call_.x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()


def _correlation(a: Tensor, b: Tensor) -> float:
    """The correlation of two tensors' elements (0 when one of them is constant or NaN)."""
    r = torch.corrcoef(torch.stack([a.detach().flatten().double(), b.flatten().double()]))
    return float(r[0, 1].nan_to_num(nan=0.0))


def _check_noise(eps: Tensor, what: str) -> None:
    """The recovered noise must look like ε ~ N(0, I)."""
    mean, std = float(eps.mean()), float(eps.std())
    if abs(mean) < 0.1 and abs(std - 1) < 0.1:
        return
    if abs(mean - 0.5) < 0.1 and abs(std - 12 ** -0.5) < 0.05:
        fail(f"{what}: the noise in x_t is uniform on [0, 1) (mean {mean:.2f}, std {std:.2f}): "
             "ε ~ N(0, I) is drawn with torch.randn_like(x0), not torch.rand_like")
    fail(f"{what}: the noise in x_t does not look like ε ~ N(0, I) given the t the model got "
         f"(mean {mean:.2f}, std {std:.2f}, expected 0 and 1): draw ε with torch.randn_like(x0) "
         "and give the model the same t that made x_t")


def _check_t_spread(seen: Tensor, T: int, what: str) -> None:
    """Drawn timesteps must cover {0, ..., T-1}, one per image, about equally often."""
    if seen.unique().numel() == 1 and T > 1:
        fail(f"{what}: every image got the same t = {int(seen[0])}; draw one timestep per "
             "image: torch.randint(0, T, (B,))")
    if int(seen.min()) >= 1:
        fail(f"{what}: t never takes the value 0 — draw t with torch.randint(0, T, (B,)) "
             "(from {0, ..., T-1}), not from [1, T]")
    counts = torch.bincount(seen.long(), minlength=T)
    if int(counts.min()) == 0 or int(counts.min()) < seen.numel() / (5 * T):
        missing = [i for i in range(T) if counts[i] == 0]
        fail(f"{what}: t does not take every value 0 .. T-1 about equally often (counts "
             f"{counts.tolist()}{', never ' + str(missing) if missing else ''}) — draw it "
             "uniformly with torch.randint(0, T, (B,))")


# ── Exercise 1 · the loss ────────────────────────────────────────────────────────────


def _xt_mistakes(x0: Tensor, t: Tensor, eps: Tensor, schedule) -> dict[str, Tensor]:
    """The x_t that the usual mistakes give the model."""
    def at(values, index=t):
        return values.double()[index].reshape(-1, 1, 1, 1)

    a, x0d, epsd = at(schedule.alpha_bars), x0.double(), eps.double()
    mistakes = {
        "x_t scales the noise by (1 - ᾱ_t); it should be sqrt(1 - ᾱ_t)":
            a.sqrt() * x0d + (1 - a) * epsd,
        "x_t scales x0 by ᾱ_t; it should be sqrt(ᾱ_t)": a * x0d + (1 - a).sqrt() * epsd,
        "ᾱ is read at t - 1: timesteps are 0-indexed, ᾱ_t is alpha_bars[t]":
            at(schedule.alpha_bars, t - 1).sqrt() * x0d
            + (1 - at(schedule.alpha_bars, t - 1)).sqrt() * epsd,
        "x_t uses α_t (schedule.alphas, one step); jumping straight to step t needs ᾱ_t "
        "(schedule.alpha_bars)": at(schedule.alphas).sqrt() * x0d
            + (1 - at(schedule.alphas)).sqrt() * epsd,
        "x0 and ε swap places in x_t: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε":
            a.sqrt() * epsd + (1 - a).sqrt() * x0d,
        "the model was given x0; give it the noised image x_t": x0d,
        "x_t = x0 + ε leaves out the factors: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε":
            x0d + epsd,
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _loss_mistakes(pred: Tensor, x0: Tensor, xt: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """The loss values that the usual mistakes give, for the prediction ``pred``."""
    err = (pred - eps) ** 2
    return {
        "the target is x0 — the model predicts the noise, so compare its output with ε":
            F.mse_loss(pred, x0),
        "the target is x_t — the model predicts the noise, so compare its output with ε":
            F.mse_loss(pred, xt),
        "this is the sum of the squared errors; take the mean (F.mse_loss)": err.sum(),
        "this sums over each image's pixels; take the mean over every element":
            err.sum(dim=(1, 2, 3)).mean(),
        "this is the mean absolute error (L1); the loss is the mean squared error":
            (pred - eps).abs().mean(),
        "this is the square root of the mean squared error; drop the square root":
            err.mean().sqrt(),
    }


def _loss_case():
    schedule = du.NoiseSchedule.create("cosine", 10)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 3, 6, 9])
    labels = torch.tensor([0, 1, 2, 3])
    return schedule, x0, eps, t, labels


@exercise_check("Exercise 1 · The loss: predict the noise")
def check_diffusion_loss(fn) -> str:
    """Check ``diffusion_loss(model, x0, schedule, *, t=None, eps=None, **cond)``."""
    schedule, x0, eps, t, labels = _loss_case()
    model = _RecordingModel()
    # the reference, before the learner's code runs
    with torch.no_grad():
        xt = du.q_sample(x0, t, eps, schedule)
        pred = model.copy()(xt, t, labels=labels)
        expected = F.mse_loss(pred, eps)
        xt_mistakes = _xt_mistakes(x0, t, eps, schedule)
        loss_mistakes = _loss_mistakes(pred, x0, xt, eps)
    what = "diffusion_loss with t and eps given"
    out = _call_learner(fn, model, x0, schedule, names=("model", "x0", "schedule"), what=what,
                        t=t, eps=eps, labels=labels)
    out = expect_tensor(out, shape=(), dtype=None, what="the loss (a scalar tensor)",
                        shape_hint="return the mean over every element, a scalar "
                                   "(F.mse_loss or .mean())")
    if not out.requires_grad:
        fail("the loss has no gradient: return the tensor itself (no .item(), .detach() or "
             "torch.no_grad()), so that loss.backward() can train the model")
    if not model.calls:
        fail("the model was never called: the loss compares model(xt, t, **cond) with ε")
    if len(model.calls) > 1:
        fail(f"the model was called {len(model.calls)} times; call it once, on x_t")
    seen = model.calls[0]
    _check_cond(seen, labels, what)
    if not torch.equal(_check_t(seen.t, B=len(t), T=schedule.T, what=what).long(), t):
        fail(f"{what}: the model did not get the t that was passed in: use the `t` argument "
             "when it is given (draw t only when it is None)")
    if not close(seen.x, xt):
        for hint, wrong in xt_mistakes.items():
            if close(seen.x, wrong):
                fail(f"the x_t given to the model is not right: {hint}")
        if _correlation(_noise_in(seen, x0, schedule), eps) < 0.5:
            fail(f"{what}: x_t was not made with the `eps` that was passed in: use the `eps` "
                 "argument when it is given (draw ε only when it is None)")
        compare(seen.x, xt, xt_mistakes, what="the x_t given to the model",
                item_names=[f"t = {int(v)}" for v in t],
                term_hint="x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε with ᾱ_t = alpha_bars[t] "
                          "(du.q_sample)")
    if not close(out.detach().float(), expected):
        again = call(fn, model, x0, schedule, t=t, eps=eps, labels=labels)
        if isinstance(again, Tensor) and not close(again.detach(), out.detach(), atol=0, rtol=0):
            fail(f"{what}: two calls with the same t and eps gave different losses, so "
                 "something is drawn anyway: the loss's target must be the noise that made "
                 "x_t (the `eps` argument, or the ε you drew for x_t), not a fresh draw")
    compare(out.detach().float(), expected, loss_mistakes, what="the loss for fixed t and ε",
            term_hint="the loss is the mean over every element of (ε_θ(x_t, t) - ε)², "
                      "F.mse_loss(model(xt, t, **cond), eps)")
    _check_drawn(fn)
    return "the noise-prediction loss matches DDPM eq. 14, with t drawn from {0, ..., T-1}"


def _call_drawing(fn, model, x0, schedule, what: str, **kwargs):
    """Call the loss with t and/or ε left to it; a t out of range becomes a hint."""
    try:
        return _call_learner(fn, model, x0, schedule, names=("model", "x0", "schedule"),
                             what=what, **kwargs)
    except (ValueError, IndexError) as err:
        if "index" not in str(err) and "timestep" not in str(err):
            raise
        fail(f"{what}: drawing t failed ({type(err).__name__}: {err}) — draw t with "
             "torch.randint(0, T, (B,)): the upper end is excluded, so t lies in {0, ..., T-1}")


def _check_drawn(fn) -> None:
    """With t and ε left out: t covers {0, ..., T-1}, one per image; ε is standard normal,
    fresh on every call, and the very noise the loss compares the prediction with."""
    T, B = 5, 512
    schedule = du.NoiseSchedule.create("cosine", T)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(B, 3, 4, 4, generator=g) * 2 - 1
    labels = torch.arange(B) % 4
    what = "diffusion_loss with t and eps drawn inside"
    model = _RecordingModel()
    out = _call_drawing(fn, model, x0, schedule, what, labels=labels)
    expect_tensor(out, shape=(), dtype=None, what=f"the loss ({what})")
    if len(model.calls) != 1:
        fail(f"{what}: the model was called {len(model.calls)} times; call it once, on x_t")
    seen = model.calls[0]
    _check_cond(seen, labels, what)
    _check_t(seen.t, B=B, T=T, what=what)
    _check_t_spread(seen.t, T, what)
    eps = _noise_in(seen, x0, schedule)
    _check_noise(eps, what)
    with torch.no_grad():
        recomputed = F.mse_loss(model.copy()(seen.x, seen.t, labels=labels), eps)
    if not near(float(out.detach()), float(recomputed), atol=1e-5, rtol=1e-4):
        fail(f"{what}: the loss ({float(out.detach()):.5f}) is not the mean squared difference "
             f"between the model's output and the noise that made x_t "
             f"({float(recomputed):.5f}): draw ε once and use the same tensor in x_t and as "
             "the loss's target")
    model.calls.clear()
    out2 = _call_drawing(fn, model, x0, schedule, what, labels=labels)
    if close(out.detach(), out2.detach(), atol=0, rtol=0) or (
            model.calls and torch.equal(model.calls[-1].x, seen.x)):
        fail("two calls gave the same loss: draw fresh t and ε each call when they are not "
             "given (no fixed seed inside the loss)")
    # one of the two given, the other drawn
    t_given = torch.arange(B) % T
    model.calls.clear()
    _call_drawing(fn, model, x0, schedule, what, t=t_given, labels=labels)
    if not model.calls or not isinstance(model.calls[-1].t, Tensor) or \
            not torch.equal(model.calls[-1].t.long(), t_given):
        fail("with only t given, the model did not get that t: use the `t` argument when "
             "it is given and draw only what is None")
    eps_given = torch.randn(x0.shape, generator=g)
    model.calls.clear()
    _call_drawing(fn, model, x0, schedule, what, eps=eps_given, labels=labels)
    if not model.calls or not close(_noise_in(model.calls[-1], x0, schedule), eps_given,
                                    atol=1e-3, rtol=1e-3):
        fail("with only eps given, x_t was not made with that eps: use the `eps` argument "
             "when it is given and draw only what is None")
    # tensors made on the CPU while x0 is elsewhere
    probe_device(fn, _RecordingModel(), x0[:8], schedule, what=what, labels=labels[:8])


# ── Exercise 4 · the reverse step ────────────────────────────────────────────────────


def _ddpm_variant(eps, xt, t, schedule, noise, *, variance="posterior", no_sqrt=False,
                  var_as_std=False, noise_at_0=False, plus=False, alpha_bar_front=False,
                  swap_variance=False, no_noise=False, t_minus_1=False, prev_in_coef=False,
                  times_front=False, log_variance=False) -> Tensor:
    """The reverse step with one of the usual mistakes, in float64 (for recognising them)."""
    index = t - 1 if t_minus_1 else t

    def at(values):
        return values.double()[index].reshape(-1, 1, 1, 1)

    beta, alpha, alpha_bar = at(schedule.betas), at(schedule.alphas), at(schedule.alpha_bars)
    in_coef = at(schedule.alpha_bar_prev) if prev_in_coef else alpha_bar
    coef = beta / ((1 - in_coef) if no_sqrt else (1 - in_coef).sqrt())  # inf where ᾱ = 1
    front = alpha_bar if alpha_bar_front else alpha
    bracket = (xt.double() + coef * eps.double()) if plus else (xt.double() - coef * eps.double())
    mean = bracket * front.sqrt() if times_front else bracket / front.sqrt()
    use_beta = (variance == "beta") != swap_variance
    if log_variance and not use_beta:
        var = at(schedule.posterior_log_variance_clipped).exp()
    else:
        var = at(schedule.betas if use_beta else schedule.posterior_variance)
    sigma = var if var_as_std else var.sqrt()
    if not noise_at_0:
        sigma = sigma * (t > 0).double().reshape(-1, 1, 1, 1)
    out = mean if no_noise else mean + sigma * noise.double()
    return out.float()


def _ddpm_mistakes(model_eps, xt, t, schedule, noise, variance: str) -> dict[str, Tensor]:
    v = functools.partial(_ddpm_variant, model_eps, xt, t, schedule, noise, variance=variance)
    return {
        "ε is scaled by β_t / (1 - ᾱ_t); DDPM eq. 11 has β_t / sqrt(1 - ᾱ_t)": v(no_sqrt=True),
        "the noise is scaled by the variance σ_t²; scale it by the standard deviation "
        "σ_t = sqrt(σ_t²)": v(var_as_std=True),
        "noise was added at t = 0; the last step returns the mean (σ_0 = 0)": v(noise_at_0=True),
        "noise was added at t = 0 (the clipped log variance replaces β̃_0 = 0 by β̃_1); the "
        "last step returns the mean (σ_0 = 0)": v(noise_at_0=True, log_variance=True),
        "the sign of the ε term is wrong: x_t - β_t / sqrt(1 - ᾱ_t) · ε_θ": v(plus=True),
        "the front factor uses ᾱ_t; it is 1 / sqrt(α_t), the one-step α_t = 1 - β_t":
            v(alpha_bar_front=True),
        "the bracket is multiplied by sqrt(α_t); DDPM eq. 11 divides it by sqrt(α_t)":
            v(times_front=True),
        "the variance option is mixed up: 'posterior' means σ_t² = β̃_t "
        "(schedule.posterior_variance), 'beta' means σ_t² = β_t": v(swap_variance=True),
        "no noise was added: x_(t-1) = mean + σ_t z (use the `noise` argument as z)":
            v(no_noise=True),
        "the schedule's values are read at t - 1: timesteps are 0-indexed, the values of "
        "step t are values[t] (du.extract(values, t, xt.shape))": v(t_minus_1=True),
        "ε's factor uses ᾱ_(t-1) (alpha_bar_prev); it is β_t / sqrt(1 - ᾱ_t), with "
        "ᾱ_t = alpha_bars[t]": v(prev_in_coef=True),
    }


def _expect_step(out, shape, dtype, mistakes: dict[str, Tensor], what: str) -> Tensor:
    """Type, shape and dtype of x_(t-1); NaN/inf named when a known mistake makes them."""
    if isinstance(out, Tensor) and tuple(out.shape) == tuple(shape) and \
            not bool(torch.isfinite(out.detach()).all()):
        for hint, wrong in mistakes.items():
            if same_values(out, wrong) and bool(torch.isfinite(out.detach()).any()):
                fail(f"{what} is not right: {hint}")
        try:
            expect_finite(out, what=what)
        except AssertionError as err:
            fail(f"{err}. σ_t is the square root of the variance σ_t² (schedule."
                 "posterior_variance or schedule.betas); schedule.posterior_log_variance_"
                 "clipped holds log σ_t², so σ_t = exp(0.5 · log σ_t²)")
    return expect_tensor(out, shape=shape, dtype=dtype, what=what)


def _ddpm_case():
    schedule = du.NoiseSchedule.create("linear", 50)
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(4, 3, 8, 8, generator=g)
    model_eps = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 25, 49])
    return schedule, xt, model_eps, noise, t


@exercise_check("Exercise 4 · The reverse step: from x_t to x_{t-1}")
def check_ddpm_step(fn) -> str:
    """Check ``ddpm_step(model_eps, xt, t, schedule, *, variance="posterior", noise=None)``."""
    schedule, xt, model_eps, noise, t = _ddpm_case()
    names = ("model_eps", "xt", "t", "schedule")
    item_names = [f"t = {int(v)}" for v in t]
    for variance in ("posterior", "beta"):
        what = f"x_(t-1) (variance={variance!r})"
        # the reference, before the learner's code runs
        expected = du.ddpm_step(model_eps, xt, t, schedule, variance=variance, noise=noise)
        mean = du.ddpm_step(model_eps, xt, t, schedule, variance=variance,
                            noise=torch.zeros_like(xt))
        mistakes = _ddpm_mistakes(model_eps, xt, t, schedule, noise, variance)
        out = _call_learner(fn, model_eps, xt, t, schedule, names=names, what="ddpm_step",
                            variance=variance, noise=noise)
        out = _expect_step(out, xt.shape, xt.dtype, mistakes, what)
        if not close(out, expected):
            for hint, wrong in mistakes.items():
                if close(out, wrong):
                    fail(f"{what} is not right: {hint}")
            sigma = du.ddpm_step(model_eps, xt, t, schedule, variance=variance,
                                 noise=torch.ones_like(xt)) - mean
            z = (out - mean)[1:] / sigma[1:]
            if close(out[:1], expected[:1]) and _correlation(z, noise[1:]) < 0.5:
                fail(f"{what} is not right: the `noise` argument was not used — when noise is "
                     "given it is z; draw z (torch.randn_like(xt)) only when noise is None")
        compare(out, expected, mistakes, what=what, item_names=item_names,
                term_hint="compare each factor with DDPM eq. 11: 1 / sqrt(α_t), "
                          "β_t / sqrt(1 - ᾱ_t), and σ_t = sqrt(σ_t²), zero at t = 0")
    # noise=None: the step draws z ~ N(0, I) itself (and adds none at t = 0)
    t0 = torch.zeros(4, dtype=torch.long)
    expected = du.ddpm_step(model_eps, xt, t0, schedule, noise=torch.zeros_like(xt))
    out = _call_learner(fn, model_eps, xt, t0, schedule, names=names,
                        what="ddpm_step")
    out = _expect_step(out, xt.shape, xt.dtype, {}, "x_(t-1) at t = 0 with noise=None")
    compare(out, expected, {}, what="x_(t-1) at t = 0 with noise=None",
            term_hint="at t = 0 the step returns the mean: no noise is added (σ_0 = 0)")
    _check_drawn_noise(fn, schedule)
    probe_device(fn, model_eps, xt, t, schedule, what="ddpm_step with noise=None", noise=None)
    return "the reverse step matches DDPM eq. 11 / Algorithm 2, with no noise at t = 0"


def _check_drawn_noise(fn, schedule) -> None:
    """With noise=None, z must be fresh standard normal noise."""
    g = torch.Generator().manual_seed(6)
    xt = torch.randn(16, 3, 8, 8, generator=g)
    model_eps = torch.randn(16, 3, 8, 8, generator=g)
    t = torch.full((16,), 25)
    mean = du.ddpm_step(model_eps, xt, t, schedule, noise=torch.zeros_like(xt))
    sigma = du.ddpm_step(model_eps, xt, t, schedule, noise=torch.ones_like(xt)) - mean
    what = "x_(t-1) with noise=None"
    outs = [_expect_step(_call_learner(fn, model_eps, xt, t, schedule, what="ddpm_step",
                                       names=("model_eps", "xt", "t", "schedule")),
                         xt.shape, xt.dtype, {}, what) for _ in range(2)]
    expect_fresh_normal_noise(outs, mean, sigma, what, step_name="x_(t-1)")


# ── Exercise 3 · EMA ─────────────────────────────────────────────────────────────────


@exercise_check("Exercise 3 · An exponential moving average of the weights")
def check_ema_update(fn) -> str:
    """Check ``ema_update_(ema_params, params, decay)`` (in place, returns nothing)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    for decay in (0.9, 0.5):
        ema = [torch.randn(s, generator=g) for s in shapes]
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        # the reference, before the learner's code runs
        with torch.no_grad():
            expected = [decay * e + (1 - decay) * p for e, p in zip(ema, params)]
            mistakes = [{
                "decay and 1 - decay are swapped: the old average keeps the weight `decay`, "
                "the new weights get 1 - decay": (1 - decay) * e + decay * p,
                "the shadow was overwritten with the weights; blend them": p.clone(),
                "the decay looks hard-coded: use the `decay` argument": 0.999 * e + 0.001 * p,
                "this is decay · θ_ema + θ: the new weights get the factor 1 - decay":
                    decay * e + p,
                "the old average was not multiplied by decay: θ_ema ← decay · θ_ema + "
                "(1 - decay) · θ": e + (1 - decay) * p,
                "both terms got the factor 1 - decay; the old average keeps `decay`":
                    (1 - decay) * (e + p),
            } for e, p in zip(ema, params)]
        ema_before = snapshot(ema, "ema_params")
        params_before = snapshot(params, "params")
        originals = list(ema)
        out = call(fn, ema, params, decay)
        path = changed(params, params_before, "params")
        if path is not None:
            fail(f"your code changed `{path}`, the model's weights, in place: only read "
                 "params; the tensors to update in place are those of ema_params")
        if len(ema) != len(originals) or any(e is not o for e, o in zip(ema, originals)):
            fail("the list items were replaced by new tensors; the shadow model still holds the "
                 "old ones — update each tensor in place (.mul_(), .add_(), .lerp_() or "
                 ".copy_())")
        if changed(ema, ema_before, "ema_params") is None:
            if out is not None:
                fail("ema_params did not change — you returned new values instead: update the "
                     "tensors in place (ema.mul_(decay).add_(p, alpha=1 - decay) or "
                     "ema.copy_(...))")
            fail("ema_params did not change: update each tensor in place (`e = ...` only gives "
                 "the name e a new tensor; e.mul_(...), e.lerp_(...) or e.copy_(...) change it)")
        if any(e.requires_grad for e in ema):
            fail("the shadow tensors now require gradients: do the update under torch.no_grad() "
                 "(or use p.detach())")
        for i, (e, want, wrong) in enumerate(zip(ema, expected, mistakes)):
            what = f"the updated average ema_params[{i}] (decay={decay})"
            expect_finite(e, what=what)
            compare(e, want, wrong, what=what,
                    term_hint="θ_ema ← decay · θ_ema + (1 - decay) · θ")
    return "θ_ema ← decay · θ_ema + (1 - decay) · θ, in place"


# ── Exercise 2 · the training step ───────────────────────────────────────────────────


class _RecordingLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that adds "scheduler" to ``events`` at each step."""

    def __init__(self, optimizer, lr_lambda, events: list):
        self.events = None
        super().__init__(optimizer, lr_lambda)
        self.events = events

    def step(self, *args, **kwargs):
        if self.events is not None:
            self.events.append("scheduler")
        super().step(*args, **kwargs)


class _RecordingEMA(du.EMA):
    """du.EMA that adds "ema" to ``events`` at each update."""

    def __init__(self, model, *, decay: float, events: list):
        super().__init__(model, decay=decay)
        self.events = events

    def update(self, model) -> None:
        self.events.append("ema")
        super().update(model)


def _lr_factor(step: int) -> float:
    """The check's learning-rate schedule: full rate at the first step, a quarter after."""
    return 1.0 if step == 0 else 0.25


@dataclasses.dataclass
class _Run:
    """A tiny training set-up whose every step is recomputed and compared."""

    fn: object
    optimizer_kind: str = "sgd"
    extras: bool = False
    autocast: bool = False
    max_grad_norm: float = 0.02
    T: int = 5
    B: int = 64

    def __post_init__(self):
        self.schedule = du.NoiseSchedule.create("cosine", self.T)
        g = torch.Generator().manual_seed(2)
        self.x0 = torch.rand(self.B, 3, 4, 4, generator=g) * 2 - 1
        self.labels = torch.arange(self.B) % 4
        self.model = _RecordingModel(seed=1)
        self.params = list(self.model.parameters())
        momentum = 0.9 if self.optimizer_kind == "momentum" else 0.0
        self.optimizer = torch.optim.SGD(self.params, lr=0.5, momentum=momentum)
        self.step_grads: list = []   # the gradients each optimizer.step() found
        self.optimizer.register_step_pre_hook(self._step_seen)
        self.scheduler = self.ema = None
        if self.extras:
            self.scheduler = _RecordingLambdaLR(self.optimizer, _lr_factor, self.model.events)
            self.ema = _RecordingEMA(self.model, decay=0.9, events=self.model.events)
            with torch.no_grad():  # an average that differs from the weights
                for p in self.ema.model.parameters():
                    p.mul_(0.5)
        self.seen_t: list[Tensor] = []

    def _step_seen(self, optimizer, args, kwargs):
        self.model.events.append("step")
        self.step_grads.append([None if p.grad is None else p.grad.detach().clone()
                                for p in self.params])

    def replay(self, pre_state, pre_optimizer, inputs, *, max_grad_norm, stale=None, lr=None):
        """One step from ``pre_state`` on the recorded inputs; the weights after it."""
        model = self.model.copy(pre_state)
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, **self.optimizer.defaults)
        optimizer.load_state_dict(copy.deepcopy(pre_optimizer))
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        xt, t, eps = inputs
        loss = F.mse_loss(model(xt, t, labels=self.labels), eps)
        loss.backward()
        if stale is not None:
            for p, s in zip(params, stale):
                p.grad += s
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return loss.item(), [p.detach().clone() for p in params]

    def step(self) -> None:
        """Run the learner's train_step once and compare everything with the reference."""
        pre_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        pre_params = [p.detach().clone() for p in self.params]
        stale = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                 for p in self.params]
        pre_optimizer = copy.deepcopy(self.optimizer.state_dict())
        pre_ema = copy.deepcopy(self.ema) if self.ema is not None else None
        pre_epoch = self.scheduler.last_epoch if self.scheduler is not None else None
        self.model.calls.clear()
        self.model.events.clear()
        self.step_grads.clear()
        kwargs = {"max_grad_norm": self.max_grad_norm}
        if self.extras:
            kwargs.update(scheduler=self.scheduler, ema=self.ema)
        if self.autocast:
            kwargs["autocast"] = True
        fn, model, optimizer = self.fn, self.model, self.optimizer

        def one_step(x0, schedule, labels):
            return fn(model, optimizer, x0, schedule, labels=labels, **kwargs)

        try:
            loss = _call_learner(one_step, self.x0, self.schedule, self.labels,
                                 names=("x0", "schedule", "labels"), what="train_step")
        except (ValueError, IndexError) as err:
            if "index" not in str(err) and "timestep" not in str(err):
                raise
            fail(f"drawing t failed ({type(err).__name__}: {err}) — draw t with "
                 "torch.randint(0, T, (B,)): the upper end is excluded, so t lies in "
                 "{0, ..., T-1}")
        self._check_returned(loss)
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in self.params)
        if bad:
            fail(f"after the step the model's weights hold {bad} NaN or inf values: look for "
                 "a division by zero, or a gradient that was scaled instead of clipped "
                 "(torch.nn.utils.clip_grad_norm_)")
        seen = self._one_forward()
        if self.autocast:
            return self._check_autocast(seen)
        if seen.autocast:
            fail("the forward pass ran under autocast although autocast=False: pass "
                 "enabled=autocast (du.autocast_context(x0.device, enabled=autocast))")
        t = _check_t(seen.t, B=self.B, T=self.T, what="train_step")
        self.seen_t.append(t)
        eps = _noise_in(seen, self.x0, self.schedule)
        _check_noise(eps, "train_step")
        inputs = (seen.x, t, eps)
        ref_loss, ref_params = self.replay(pre_state, pre_optimizer, inputs,
                                           max_grad_norm=self.max_grad_norm)
        if not near(loss, ref_loss, atol=1e-5, rtol=1e-4):
            fail(f"the returned loss {loss:.5f} is not this step's loss, the mean squared "
                 f"difference between the model's output and the noise that made x_t "
                 f"({ref_loss:.5f}): compute it once with diffusion_loss(model, x0, schedule, "
                 "**cond), backpropagate it and return its .item()")
        after = [p.detach().clone() for p in self.params]
        if not all(close(a, r, atol=1e-6, rtol=1e-5) for a, r in zip(after, ref_params)):
            self._explain_update(after, ref_params, pre_params, pre_state, pre_optimizer,
                                 inputs, stale)
        if self.scheduler is not None:
            stepped = self.scheduler.last_epoch - pre_epoch
            if stepped == 0:
                fail("the learning-rate scheduler was not stepped: call scheduler.step() "
                     "after optimizer.step() when a scheduler is given")
            if stepped > 1:
                fail(f"scheduler.step() was called {stepped} times in one step; call it once")
        if self.ema is not None:
            self._check_ema(pre_ema, pre_state, after)

    def _check_returned(self, loss) -> None:
        if loss is None:
            fail("train_step returned None — did you forget `return loss.item()`?")
        if isinstance(loss, Tensor):
            fail("train_step returned a tensor: return loss.item(), a Python float (a tensor "
                 "keeps the whole computation graph of the step alive)")
        if not isinstance(loss, float):
            fail(f"train_step should return the loss as a Python float (loss.item()), got "
                 f"{type(loss).__name__}")
        if not math.isfinite(loss):
            fail(f"train_step returned {loss}: the loss should be a finite number — look for a "
                 "division by zero or a log or square root of a negative number")

    def _one_forward(self) -> _Call:
        calls = self.model.calls
        if not calls:
            fail("the model was never called: compute the loss with diffusion_loss(model, x0, "
                 "schedule, **cond)")
        if len(calls) > 1:
            fail(f"the model was called {len(calls)} times in one step: compute the loss once, "
                 "backpropagate it and return its .item()")
        _check_cond(calls[0], self.labels, "train_step")
        return calls[0]

    def _check_autocast(self, seen: _Call) -> None:
        if not seen.autocast:
            fail("autocast=True was ignored: the forward pass did not run under autocast on "
                 "x0's device — compute the loss inside du.autocast_context(x0.device, "
                 "enabled=autocast)")
        if seen.autocast_dtype != torch.bfloat16:
            fail(f"the forward pass ran under {seen.autocast_dtype} autocast; use bfloat16 "
                 "(du.autocast_context(x0.device, enabled=autocast) does)")

    def _explain_update(self, after, ref_params, pre_params, pre_state, pre_optimizer,
                        inputs, stale) -> None:
        """The weights after the step are wrong: say why, as precisely as the record allows."""
        events = self.model.events
        unchanged = all(torch.equal(a, p) for a, p in zip(after, pre_params))
        if "backward" not in events:
            fail("loss.backward() was never called: without it there are no gradients, and "
                 "optimizer.step() has nothing to apply")
        if "step" not in events:
            fail("optimizer.step() was never called: the gradients were computed but never "
                 "applied to the weights" if unchanged else
                 "the `optimizer` you were given was never stepped: call optimizer.step() "
                 "(do not make a new optimizer inside train_step)")
        if events.index("step") < events.index("backward"):
            fail("optimizer.step() came before loss.backward(): it applied no gradients (or "
                 "the previous step's); the order is zero_grad, loss, backward, clip, step")
        if events.count("step") > 1:
            fail(f"optimizer.step() was called {events.count('step')} times in one step; "
                 "call it once")
        grads = self.step_grads[0]
        if all(g is None or not bool(g.any()) for g in grads):
            fail("the gradients were cleared between loss.backward() and optimizer.step(), so "
                 "the step changed nothing: call optimizer.zero_grad() at the start of the "
                 "step, before the loss")
        candidates = {
            "the gradient was not clipped to max_grad_norm: call torch.nn.utils."
            "clip_grad_norm_(model.parameters(), max_grad_norm) after loss.backward() (before "
            "it there are no gradients to clip) and before optimizer.step()":
                dict(max_grad_norm=None),
        }
        if any(bool(s.any()) for s in stale):
            candidates["the gradients of the previous step were added to this step's: call "
                       "optimizer.zero_grad() at the start of each step (loss.backward() "
                       "adds to .grad)"] = dict(max_grad_norm=self.max_grad_norm, stale=stale)
        if self.scheduler is not None:
            group = self.optimizer.param_groups[0]
            next_lr = group["initial_lr"] * _lr_factor(self.scheduler.last_epoch)
            candidates["scheduler.step() came before optimizer.step(), so the step used the "
                       "next learning rate: step the scheduler after the optimizer"] = dict(
                max_grad_norm=self.max_grad_norm, lr=next_lr)
        for hint, options in candidates.items():
            _, wrong = self.replay(pre_state, pre_optimizer, inputs, **options)
            if all(close(a, w, atol=1e-6, rtol=1e-5) for a, w in zip(after, wrong)):
                fail(hint)
            if options["max_grad_norm"] is None and self.optimizer_kind == "sgd":
                self._other_clip_norm(after, pre_params, wrong)
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(g) for g in grads if g is not None]))
        if float(norm) > self.max_grad_norm * 1.001:
            fail(f"the gradient reaching optimizer.step() has norm {float(norm):.3g}, more than "
                 f"max_grad_norm = {self.max_grad_norm}: clip with torch.nn.utils."
                 "clip_grad_norm_(model.parameters(), max_grad_norm) after loss.backward() and "
                 "before optimizer.step()")
        if "scheduler" in events and events.index("scheduler") < events.index("step"):
            fail("scheduler.step() came before optimizer.step(): step the scheduler after the "
                 "optimizer")
        names = [name for name, _ in self.model.named_parameters()]
        worst = max(range(len(after)), key=lambda i: float(
            (after[i] - ref_params[i]).abs().nan_to_num(nan=math.inf).max()))
        fail(f"after the step the weights differ from one optimizer step on the clipped "
             f"gradient of the loss ({largest_difference(after[worst], ref_params[worst])} in "
             f"`{names[worst]}`); the order is zero_grad, loss, backward, clip, step")

    def _other_clip_norm(self, after, pre_params, unclipped) -> None:
        """With plain SGD the update is -lr · g: the gradient's direction, with the length
        the clipping allows. Same direction, another length: clipped to another norm."""
        lr = self.optimizer.param_groups[0]["lr"]
        update = torch.cat([(a - p).flatten() for a, p in zip(after, pre_params)]).double()
        full = torch.cat([(u - p).flatten() for u, p in zip(unclipped, pre_params)]).double()
        if float(torch.linalg.vector_norm(full)) == 0 or float(F.cosine_similarity(
                update, full, dim=0)) < 1 - 1e-6:
            return
        norm = float(torch.linalg.vector_norm(update)) / lr
        fail(f"the gradient was clipped to a norm of {norm:.3g} instead of the max_grad_norm "
             f"argument ({self.max_grad_norm}): clip_grad_norm_(model.parameters(), "
             "max_grad_norm)")

    def _check_ema(self, pre_ema, pre_state, after) -> None:
        now = [p.detach() for p in self.ema.model.parameters()]
        expected = copy.deepcopy(pre_ema)
        expected.update(self.model.copy())
        want = [p.detach() for p in expected.model.parameters()]
        if all(close(n, w, atol=1e-6, rtol=1e-5) for n, w in zip(now, want)):
            return
        before = [p.detach() for p in pre_ema.model.parameters()]
        if all(torch.equal(n, b) for n, b in zip(now, before)):
            fail("the EMA was not updated: call ema.update(model) after optimizer.step() when "
                 "an ema is given")
        lagging = copy.deepcopy(pre_ema)
        lagging.update(self.model.copy(pre_state))
        if all(close(n, w, atol=1e-6, rtol=1e-5) for n, w in
               zip(now, lagging.model.parameters())):
            fail("the EMA was updated before optimizer.step(): it averaged the weights from "
                 "before this step, so it lags one step behind — call ema.update(model) after "
                 "the optimizer step")
        fail("the EMA's weights are not decay · (their old values) + (1 - decay) · (the weights "
             "after this step): call ema.update(model) once, after optimizer.step()")


@exercise_check("Exercise 2 · One training step")
def check_train_step(fn) -> str:
    """Check ``train_step(model, optimizer, x0, schedule, *, max_grad_norm=1.0,
    scheduler=None, ema=None, autocast=False, **cond) -> float``."""
    plain = _Run(fn)
    for _ in range(2):  # the second step finds the first step's gradients in .grad
        plain.step()
    _check_t_spread(torch.cat(plain.seen_t), plain.T, "train_step")
    extras = _Run(fn, optimizer_kind="momentum", extras=True)
    for _ in range(2):
        extras.step()
    _Run(fn, autocast=True).step()
    device = other_device()
    model = _RecordingModel(seed=1).to(device)
    probe_device(fn, model, torch.optim.SGD(model.parameters(), lr=0.1), plain.x0[:8],
           plain.schedule, what="train_step", labels=plain.labels[:8])
    return ("zero_grad, loss, backward, clip, step, then the scheduler and the EMA; autocast "
            "when asked; the loss returned as a float")
