"""Checks of lesson 03's exercises (training and sampling)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, snapshot, to_device, yours_if_passed)


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


@exercise_check("Exercise 1 · The loss: predict the noise")
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


@exercise_check("Exercise 4 · The reverse step: from x_t to x_{t-1}")
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


@exercise_check("Exercise 3 · An exponential moving average of the weights")
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


@exercise_check("Exercise 2 · One training step")
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
