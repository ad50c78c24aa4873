"""Lesson 03's exercise checks: the reference passes, a stub is "not attempted", correct
versions written in other forms pass, and the mistakes learners really make fail with the
hint that names them."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du
from check_helpers import assert_fails_with, assert_not_attempted, assert_passes, stub  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # PyTorch's own warning when a planted step calls scheduler.step() first
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")]


DEVICE = "pass `device=x.device`"
IN_PLACE = "in place (an in-place operation"


# ── diffusion_loss ───────────────────────────────────────────────────────────────────


def randint_t(B, T, device):
    return torch.randint(0, T, (B,), device=device)


def mse(pred, eps, x0, xt):
    return F.mse_loss(pred, eps)


def make_loss(*, draw_t=randint_t, draw_eps=torch.randn_like, eps_first=False,
              xt=du.q_sample, loss=mse, pass_cond=True, use_t=True, use_eps=True,
              fresh_target=False, calls=1, seed=None):
    """A learner's diffusion_loss with one knob turned."""

    def diffusion_loss(model, x0, schedule, *, t=None, eps=None, **cond):
        if seed is not None:
            torch.manual_seed(seed)
        if eps_first and (eps is None or not use_eps):
            eps = draw_eps(x0)
        if t is None or not use_t:
            t = draw_t(x0.shape[0], schedule.T, x0.device)
        if eps is None or not use_eps:
            eps = draw_eps(x0)
        x_t = xt(x0, t, eps, schedule)
        for _ in range(calls):
            pred = model(x_t, t, **cond) if pass_cond else model(x_t, t)
        target = torch.randn_like(x0) if fresh_target else eps
        return loss(pred, target, x0, x_t)

    return diffusion_loss


def xt_with(signal=0.5, noise=0.5, shift=0, values="alpha_bars", swap=False):
    def xt(x0, t, eps, schedule):
        a = getattr(schedule, values)[t + shift].reshape(-1, 1, 1, 1)
        if swap:
            x0, eps = eps, x0
        return a ** signal * x0 + (1 - a) ** noise * eps
    return xt


def xt_float64(x0, t, eps, schedule):
    a = schedule.alpha_bars.double()[t].reshape(-1, 1, 1, 1)
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()


def xt_in_place(x0, t, eps, schedule):
    a = schedule.alpha_bars[t].reshape(-1, 1, 1, 1)
    return x0.mul_(a.sqrt()).add_((1 - a).sqrt() * eps)


def xt_unreshaped(x0, t, eps, schedule):
    a = schedule.alpha_bars[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def no_cond_in_signature(model, x0, schedule, *, t=None, eps=None):
    return du.diffusion_loss(model, x0, schedule, t=t, eps=eps)


def test_diffusion_loss_reference_passes(capsys):
    assert_passes(dc.check_diffusion_loss, du.diffusion_loss, capsys)


@pytest.mark.parametrize("fn", [
    make_loss(),
    make_loss(loss=lambda pred, eps, x0, xt: (pred - eps).pow(2).mean()),
    make_loss(loss=lambda pred, eps, x0, xt: F.mse_loss(pred, eps, reduction="mean")),
    make_loss(draw_t=lambda B, T, device: torch.randint(T, (B,), device=device)),
    make_loss(eps_first=True,
              draw_t=lambda B, T, device: torch.multinomial(torch.ones(T), B, True).to(device)),
    make_loss(draw_t=lambda B, T, device: (torch.rand(B, device=device) * T).long(),
              draw_eps=lambda x0: torch.randn(x0.shape, device=x0.device), xt=xt_float64),
], ids=["notebook", "pow-mean", "mse-reduction", "randint-T", "eps-first-multinomial",
        "rand-long-float64"])
def test_diffusion_loss_other_forms_pass(fn, capsys):
    assert_passes(dc.check_diffusion_loss, fn, capsys)


def test_diffusion_loss_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_diffusion_loss, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_loss(loss=lambda pred, eps, x0, xt: F.mse_loss(pred, x0)), "compare its output with ε"),
    (make_loss(loss=lambda pred, eps, x0, xt: F.mse_loss(pred, xt)), "the target is x_t"),
    (make_loss(loss=lambda pred, eps, x0, xt: ((pred - eps) ** 2).sum()),
     "sum of the squared errors"),
    (make_loss(loss=lambda pred, eps, x0, xt: ((pred - eps) ** 2).sum((1, 2, 3)).mean()),
     "sums over each image's pixels"),
    (make_loss(loss=lambda pred, eps, x0, xt: F.l1_loss(pred, eps)), "mean absolute error"),
    (make_loss(loss=lambda pred, eps, x0, xt: F.mse_loss(pred, eps).sqrt()),
     "square root of the mean squared error"),
    (make_loss(xt=xt_with(noise=1.0)), "it should be sqrt(1 - ᾱ_t)"),
    (make_loss(xt=xt_with(signal=1.0)), "it should be sqrt(ᾱ_t)"),
    (make_loss(xt=xt_with(shift=-1)), "ᾱ is read at t - 1"),
    (make_loss(xt=xt_with(values="alphas")), "(schedule.alpha_bars)"),
    (make_loss(xt=xt_with(swap=True)), "x0 and ε swap places"),
    (make_loss(xt=lambda x0, t, eps, schedule: x0), "the model was given x0"),
    (make_loss(xt=lambda x0, t, eps, schedule: x0 + eps), "x_t = x0 + ε leaves out the factors"),
    (make_loss(draw_t=lambda B, T, device: torch.randint(1, T, (B,), device=device)),
     "t never takes the value 0"),
    (make_loss(draw_t=lambda B, T, device: torch.randint(1, T + 1, (B,), device=device)),
     "torch.randint(0, T, (B,))"),
    (make_loss(draw_t=lambda B, T, device: torch.randint(0, T, (1,), device=device).expand(B)),
     "every image got the same t"),
    (make_loss(fresh_target=True), "the noise that made x_t"),
    (make_loss(draw_eps=torch.rand_like), "torch.rand_like"),
    (make_loss(use_t=False), "use the `t` argument"),
    (make_loss(use_eps=False), "use the `eps` argument"),
    (make_loss(seed=0), "two calls gave the same loss"),
    (make_loss(pass_cond=False), "did not reach the model"),
    (no_cond_in_signature, "does not accept the conditioning keywords"),
    (make_loss(calls=2), "the model was called 2 times"),
    (make_loss(xt=xt_unreshaped), "(B, 1, 1, 1)"),
    (make_loss(xt=xt_in_place), "changed its input `x0` " + IN_PLACE),
    (make_loss(loss=lambda pred, eps, x0, xt: F.mse_loss(pred, eps) / 0 * 0), "contains NaN"),
    (make_loss(draw_t=lambda B, T, device: torch.randint(0, T, (B,))), DEVICE),
    (make_loss(draw_eps=lambda x0: torch.randn(x0.shape)), DEVICE),
])
def test_diffusion_loss_mistakes(wrong, hint):
    assert_fails_with(dc.check_diffusion_loss, wrong, hint)


def test_diffusion_loss_detached_and_missing_return():
    def detached(model, x0, schedule, *, t=None, eps=None, **cond):
        return du.diffusion_loss(model, x0, schedule, t=t, eps=eps, **cond).detach()

    def no_return(model, x0, schedule, *, t=None, eps=None, **cond):
        du.diffusion_loss(model, x0, schedule, t=t, eps=eps, **cond)

    assert_fails_with(dc.check_diffusion_loss, detached, "has no gradient")
    assert_fails_with(dc.check_diffusion_loss, no_return, "forget the `return`")


# ── ddpm_step ────────────────────────────────────────────────────────────────────────


def make_step(*, eps_power=0.5, std_power=0.5, noise_at_0=False, sign=-1.0, front="alpha",
              shift=0, coef_alpha_bar="alpha_bars", use_noise=True, draw=torch.randn_like,
              variance_map=None, mask="float", seed=None):
    """A learner's ddpm_step with one knob turned."""

    def ddpm_step(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
        def at(v):
            return v[t + shift].reshape(-1, 1, 1, 1)

        beta, alpha_bar = at(schedule.betas), at(getattr(schedule, coef_alpha_bar))
        alpha = at(schedule.alpha_bars if front == "alpha_bar" else schedule.alphas)
        mean = (xt + sign * beta / (1 - alpha_bar) ** eps_power * model_eps) / alpha.sqrt()
        chosen = variance if variance_map is None else variance_map[variance]
        var = at(schedule.posterior_variance if chosen == "posterior" else schedule.betas)
        sigma = var ** std_power
        if not noise_at_0:
            if mask == "cpu":
                sigma = sigma * torch.tensor([float(s > 0) for s in t]).reshape(-1, 1, 1, 1)
            else:
                sigma = sigma * (t > 0).float().reshape(-1, 1, 1, 1)
        if seed is not None:
            torch.manual_seed(seed)
        if noise is None or not use_noise:
            noise = draw(xt)
        return mean + sigma * noise

    return ddpm_step


def step_via_x0_hat(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    """The mean through x̂₀ and the forward posterior (a correct alternative form)."""
    alpha_bar = du.extract(schedule.alpha_bars, t, xt.shape)
    x0_hat = (xt - (1 - alpha_bar).sqrt() * model_eps) / alpha_bar.sqrt()
    mean, _ = du.q_posterior_mean_variance(x0_hat, xt, t, schedule)
    values = schedule.posterior_variance if variance == "posterior" else schedule.betas
    sigma = torch.where(t > 0, values[t].sqrt(), 0.0).reshape(-1, 1, 1, 1)
    return mean + sigma * (torch.randn_like(xt) if noise is None else noise)


def step_float64_log_variance(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    """float64 intermediates, σ from the clipped log variance (a correct alternative form)."""
    def at(v):
        return v.double()[t].reshape(-1, 1, 1, 1)

    mean = (xt.double() - at(schedule.betas) / (1 - at(schedule.alpha_bars)).sqrt()
            * model_eps.double()) / at(schedule.alphas).sqrt()
    if variance == "posterior":
        sigma = (0.5 * at(schedule.posterior_log_variance_clipped)).exp()
    else:
        sigma = at(schedule.betas).sqrt()
    sigma = sigma * (t > 0).reshape(-1, 1, 1, 1)
    noise = torch.randn_like(xt) if noise is None else noise
    return (mean + sigma * noise.double()).to(xt.dtype)


def step_log_variance_sqrt(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    values = schedule.posterior_log_variance_clipped if variance == "posterior" else schedule.betas
    sigma = du.extract(values, t, xt.shape).sqrt() * (t > 0).reshape(-1, 1, 1, 1)
    mean = du.ddpm_step(model_eps, xt, t, schedule, noise=torch.zeros_like(xt))
    return mean + sigma * (torch.randn_like(xt) if noise is None else noise)


def step_log_variance_at_0(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    values = schedule.posterior_log_variance_clipped if variance == "posterior" \
        else schedule.betas.log()
    sigma = (0.5 * du.extract(values, t, xt.shape)).exp()
    mean = du.ddpm_step(model_eps, xt, t, schedule, noise=torch.zeros_like(xt))
    return mean + sigma * (torch.randn_like(xt) if noise is None else noise)


def step_in_place(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    out = du.ddpm_step(model_eps, xt, t, schedule, variance=variance, noise=noise)
    return xt.copy_(out)


def step_float64_out(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
    return du.ddpm_step(model_eps, xt, t, schedule, variance=variance, noise=noise).double()


def test_ddpm_step_reference_passes(capsys):
    assert_passes(dc.check_ddpm_step, du.ddpm_step, capsys)


@pytest.mark.parametrize("fn", [make_step(), step_via_x0_hat, step_float64_log_variance],
                         ids=["notebook", "x0-hat-posterior", "float64-log-variance"])
def test_ddpm_step_other_forms_pass(fn, capsys):
    assert_passes(dc.check_ddpm_step, fn, capsys)


def test_ddpm_step_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ddpm_step, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_step(eps_power=1.0), "β_t / sqrt(1 - ᾱ_t)"),
    (make_step(std_power=1.0), "standard deviation"),
    (make_step(noise_at_0=True), "noise was added at t = 0"),
    (step_log_variance_at_0, "noise was added at t = 0 (the clipped log variance"),
    (make_step(sign=+1.0), "sign of the ε term"),
    (make_step(front="alpha_bar"), "1 / sqrt(α_t)"),
    (make_step(variance_map={"posterior": "beta", "beta": "posterior"}),
     "variance option is mixed up"),
    (make_step(variance_map={"posterior": "posterior", "beta": "posterior"}),
     "variance option is mixed up"),
    (make_step(shift=-1), "read at t - 1"),
    (make_step(coef_alpha_bar="alpha_bar_prev"), "uses ᾱ_(t-1) (alpha_bar_prev)"),
    (make_step(use_noise=False), "the `noise` argument was not used"),
    (make_step(draw=torch.rand_like), "torch.rand_like"),
    (make_step(seed=0), "two calls gave the same"),
    (step_log_variance_sqrt, "σ_t = exp(0.5 · log σ_t²)"),
    (step_in_place, "changed its input `xt` " + IN_PLACE),
    (step_float64_out, "should have dtype torch.float32"),
    (make_step(draw=lambda xt: torch.randn(xt.shape)), DEVICE),
    (make_step(mask="cpu"), DEVICE),
])
def test_ddpm_step_mistakes(wrong, hint):
    assert_fails_with(dc.check_ddpm_step, wrong, hint)


def test_ddpm_step_no_noise_and_broadcasting():
    def no_noise(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
        return du.ddpm_step(model_eps, xt, t, schedule, noise=torch.zeros_like(xt))

    def unreshaped(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
        coef = schedule.betas[t] / (1 - schedule.alpha_bars[t]).sqrt()
        return (xt - coef * model_eps) / schedule.alphas[t].sqrt()

    assert_fails_with(dc.check_ddpm_step, no_noise, "no noise was added")
    assert_fails_with(dc.check_ddpm_step, unreshaped, "(B, 1, 1, 1)")


# ── ema_update_ ──────────────────────────────────────────────────────────────────────


def ema_lerp(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - decay)


def ema_foreach_lerp(ema_params, params, decay):
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_params), [p.detach() for p in params], 1 - decay)


def ema_copy_loop(ema_params, params, decay):
    with torch.no_grad():
        for i in range(len(ema_params)):
            ema_params[i].copy_(decay * ema_params[i] + (1 - decay) * params[i])


def ema_swapped(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.mul_(1 - decay).add_(p, alpha=decay)


def ema_updates_model(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            p.mul_(decay).add_(e, alpha=1 - decay)


def ema_returns_new(ema_params, params, decay):
    return [decay * e + (1 - decay) * p.detach() for e, p in zip(ema_params, params)]


def ema_replaces_items(ema_params, params, decay):
    for i, (e, p) in enumerate(zip(ema_params, params)):
        ema_params[i] = decay * e + (1 - decay) * p.detach()


def ema_rebinds(ema_params, params, decay):
    for e, p in zip(ema_params, params):
        e = decay * e + (1 - decay) * p.detach()  # noqa: F841


def ema_no_grad_missing(ema_params, params, decay):
    for e, p in zip(ema_params, params):
        e.mul_(decay).add_(p, alpha=1 - decay)


def ema_hard_coded(ema_params, params, decay):
    du.ema_update_(ema_params, params, 0.999)


def ema_no_one_minus(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.mul_(decay).add_(p)


def ema_no_decay_on_old(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.add_(p, alpha=1 - decay)


def ema_nan(ema_params, params, decay):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.copy_(decay * e + (1 - decay) * p.sqrt())


def test_ema_update_reference_passes(capsys):
    assert_passes(dc.check_ema_update, du.ema_update_, capsys)


@pytest.mark.parametrize("fn", [ema_lerp, ema_foreach_lerp, ema_copy_loop])
def test_ema_update_other_forms_pass(fn, capsys):
    assert_passes(dc.check_ema_update, fn, capsys)


def test_ema_update_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ema_update, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (ema_swapped, "decay and 1 - decay are swapped"),
    (ema_updates_model, "changed `params[0]`, the model's weights, in place"),
    (ema_returns_new, "you returned new values instead"),
    (ema_replaces_items, "list items were replaced"),
    (ema_rebinds, "only gives the name e a new tensor"),
    (ema_no_grad_missing, "torch.no_grad()"),
    (ema_hard_coded, "the decay looks hard-coded"),
    (ema_no_one_minus, "the new weights get the factor 1 - decay"),
    (ema_no_decay_on_old, "the old average was not multiplied by decay"),
    (ema_nan, "contains NaN"),
])
def test_ema_update_mistakes(wrong, hint):
    assert_fails_with(dc.check_ema_update, wrong, hint)


def test_ema_class_follows_the_model():
    model = torch.nn.Linear(3, 2)
    ema = du.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.model.weight, model.weight, atol=1e-5)
    assert not any(p.requires_grad for p in ema.model.parameters())


# ── train_step ───────────────────────────────────────────────────────────────────────

ORDER = ("zero_grad", "loss", "backward", "clip", "step", "scheduler", "ema")


def own_loss(model, x0, schedule, **cond):
    """A loss written inline: ε first, then t drawn another way."""
    eps = torch.randn_like(x0)
    t = torch.multinomial(torch.ones(schedule.T, device=x0.device), x0.shape[0], True)
    a = schedule.alpha_bars[t].reshape(-1, 1, 1, 1)
    return (model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, **cond) - eps).pow(2).mean()


def make_train_step(*, order=ORDER, loss_fn=du.diffusion_loss, clip_norm=None, returns="item",
                    autocast_mode="du", pass_cond=True):
    """A learner's train_step, its actions in ``order``, with one knob turned."""

    def train_step(model, optimizer, x0, schedule, *, max_grad_norm=1.0, scheduler=None,
                   ema=None, autocast=False, **cond):
        loss = None
        for action in order:
            if action == "zero_grad":
                optimizer.zero_grad()
            elif action == "loss":
                with autocast_context(autocast_mode, x0, autocast):
                    loss = loss_fn(model, x0, schedule, **(cond if pass_cond else {}))
            elif action == "backward":
                loss.backward()
            elif action == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm or max_grad_norm)
            elif action == "step":
                optimizer.step()
            elif action == "scheduler" and scheduler is not None:
                scheduler.step()
            elif action == "ema" and ema is not None:
                ema.update(model)
            elif callable(action):
                action(model, optimizer, x0)
        return {"item": lambda: loss.item(), "tensor": lambda: loss, "none": lambda: None,
                "nan": lambda: float("nan")}[returns]()

    return train_step


def autocast_context(mode, x0, enabled):
    if mode == "du":
        return du.autocast_context(x0.device, enabled=enabled)
    if mode == "optional":
        return torch.autocast(x0.device.type, dtype=torch.bfloat16) if enabled \
            else contextlib.nullcontext()
    if mode == "always":
        return torch.autocast(x0.device.type, dtype=torch.bfloat16)
    if mode == "float16":
        return torch.autocast(x0.device.type, dtype=torch.float16, enabled=enabled)
    return contextlib.nullcontext()


def without(*actions):
    return tuple(a for a in ORDER if a not in actions)


def moved(action, before):
    rest = [a for a in ORDER if a != action]
    rest.insert(rest.index(before), action)
    return tuple(rest)


def nan_weights(model, optimizer, x0):
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)


def step_again(model, optimizer, x0):
    optimizer.step()


def new_optimizer_step(model, optimizer, x0):
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def scale_x0_in_place(model, optimizer, x0):
    x0.mul_(0.5)


def test_train_step_reference_passes(capsys):
    assert_passes(dc.check_train_step, du.train_step, capsys)


@pytest.mark.parametrize("fn", [
    make_train_step(),
    make_train_step(loss_fn=own_loss, autocast_mode="optional"),
    make_train_step(order=ORDER[1:] + ("zero_grad",)),
    make_train_step(loss_fn=make_loss(
        eps_first=True, draw_t=lambda B, T, device: (torch.rand(B, device=device) * T).long())),
], ids=["notebook", "own-loss-multinomial", "zero-grad-at-the-end", "eps-first-rand-long"])
def test_train_step_other_forms_pass(fn, capsys):
    assert_passes(dc.check_train_step, fn, capsys)


def test_train_step_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_train_step, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_train_step(order=without("backward")), "loss.backward() was never called"),
    (make_train_step(order=moved("zero_grad", "step")),
     "cleared between loss.backward() and optimizer.step()"),
    (make_train_step(order=without("zero_grad")), "the gradients of the previous step were added"),
    (make_train_step(order=moved("clip", "loss")), "the gradient was not clipped"),
    (make_train_step(order=without("clip")), "the gradient was not clipped"),
    (make_train_step(clip_norm=1.0), "clipped to a norm of 1 instead of the max_grad_norm"),
    (make_train_step(clip_norm=0.1), "clipped to a norm of 0.1 instead of the max_grad_norm"),
    (make_train_step(order=without("step")), "optimizer.step() was never called"),
    (make_train_step(order=moved("step", "backward")),
     "optimizer.step() came before loss.backward()"),
    (make_train_step(order=moved(step_again, "scheduler")),
     "optimizer.step() was called 2 times"),
    (make_train_step(order=without("step") + (new_optimizer_step,)),
     "the `optimizer` you were given was never stepped"),
    (make_train_step(order=moved("ema", "step")), "the EMA was updated before optimizer.step()"),
    (make_train_step(order=without("ema")), "the EMA was not updated"),
    (make_train_step(order=moved("scheduler", "step")),
     "scheduler.step() came before optimizer.step()"),
    (make_train_step(order=without("scheduler")), "the learning-rate scheduler was not stepped"),
    (make_train_step(autocast_mode="ignore"), "autocast=True was ignored"),
    (make_train_step(autocast_mode="float16"), "use bfloat16"),
    (make_train_step(autocast_mode="always"), "although autocast=False"),
    (make_train_step(returns="tensor"), "return loss.item()"),
    (make_train_step(returns="none"), "forget `return loss.item()`"),
    (make_train_step(returns="nan"), "train_step returned nan"),
    (make_train_step(order=ORDER + (nan_weights,)), "weights hold"),
    (make_train_step(pass_cond=False), "did not reach the model"),
    (make_train_step(loss_fn=make_loss(calls=2)), "the model was called 2 times"),
    (make_train_step(loss_fn=make_loss(fresh_target=True)), "is not this step's loss"),
    (make_train_step(loss_fn=make_loss(
        draw_t=lambda B, T, device: torch.randint(1, T, (B,), device=device))),
     "t never takes the value 0"),
    (make_train_step(order=(scale_x0_in_place,) + ORDER), "changed its input `x0` " + IN_PLACE),
    (make_train_step(autocast_mode="optional", loss_fn=make_loss(
        draw_eps=lambda x0: torch.randn(x0.shape))), DEVICE),
])
def test_train_step_mistakes(wrong, hint):
    assert_fails_with(dc.check_train_step, wrong, hint)


def test_check_rejects_non_callable():
    with pytest.raises(TypeError):
        dc.check_train_step(None)
