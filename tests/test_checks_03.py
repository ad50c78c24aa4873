"""Lesson 03's exercise checks: the reference passes, a stub is "not attempted", and the
mistakes learners really make fail with the hint that names them."""
import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du


def stub(*args, **kwargs):
    raise NotImplementedError()


def assert_passes(check, fn, capsys):
    assert check(fn) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


def assert_not_attempted(check, capsys):
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


def assert_fails_with(check, fn, hint):
    with pytest.raises(AssertionError) as err:
        check(fn)
    assert hint in str(err.value), str(err.value)


# ── diffusion_loss ───────────────────────────────────────────────────────────────────


def make_loss(*, target="eps", t_low=0, t_high=None, noise_power=0.5, reduce="mean"):
    """A learner's diffusion_loss with one knob turned."""

    def diffusion_loss(model, x0, schedule, *, t=None, eps=None, **cond):
        if t is None:
            high = schedule.T if t_high is None else t_high
            t = torch.randint(t_low, high, (x0.shape[0],))
        if eps is None:
            eps = torch.randn_like(x0)
        a = schedule.alpha_bars[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a) ** noise_power * eps
        pred = model(xt, t, **cond)
        err = (pred - (x0 if target == "x0" else eps)) ** 2
        return err.sum() if reduce == "sum" else err.mean()

    return diffusion_loss


def test_diffusion_loss_reference_passes(capsys):
    assert_passes(dc.check_diffusion_loss, du.diffusion_loss, capsys)


def test_diffusion_loss_learner_version_passes(capsys):
    assert_passes(dc.check_diffusion_loss, make_loss(), capsys)


def test_diffusion_loss_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_diffusion_loss, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_loss(target="x0"), "compare its output with ε"),
    (make_loss(t_low=1, t_high=None), "t never takes the value 0"),
    (lambda m, x0, s, **kw: make_loss(t_low=1, t_high=s.T + 1)(m, x0, s, **kw),
     "torch.randint(0, T, (B,))"),
    (make_loss(noise_power=1.0), "sqrt(1 - ᾱ_t)"),
    (make_loss(reduce="sum"), "sum of the squared errors"),
])
def test_diffusion_loss_mistakes(wrong, hint):
    assert_fails_with(dc.check_diffusion_loss, wrong, hint)


def test_diffusion_loss_detached_and_missing_return():
    def detached(model, x0, schedule, *, t=None, eps=None, **cond):
        return du.diffusion_loss(model, x0, schedule, t=t, eps=eps).detach()

    def no_return(model, x0, schedule, *, t=None, eps=None, **cond):
        du.diffusion_loss(model, x0, schedule, t=t, eps=eps)

    assert_fails_with(dc.check_diffusion_loss, detached, "has no gradient")
    assert_fails_with(dc.check_diffusion_loss, no_return, "forget the `return`")


# ── ddpm_step ────────────────────────────────────────────────────────────────────────


def make_step(*, eps_power=0.5, std_power=0.5, noise_at_0=False, sign=-1.0, front="alpha"):
    """A learner's ddpm_step with one knob turned."""

    def ddpm_step(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
        def at(v):
            return v[t].reshape(-1, 1, 1, 1)

        beta, alpha_bar = at(schedule.betas), at(schedule.alpha_bars)
        alpha = at(schedule.alpha_bars if front == "alpha_bar" else schedule.alphas)
        mean = (xt + sign * beta / (1 - alpha_bar) ** eps_power * model_eps) / alpha.sqrt()
        var = at(schedule.posterior_variance if variance == "posterior" else schedule.betas)
        sigma = var ** std_power
        if not noise_at_0:
            sigma = sigma * (t > 0).float().reshape(-1, 1, 1, 1)
        noise = torch.randn_like(xt) if noise is None else noise
        return mean + sigma * noise

    return ddpm_step


def test_ddpm_step_reference_passes(capsys):
    assert_passes(dc.check_ddpm_step, du.ddpm_step, capsys)


def test_ddpm_step_learner_version_passes(capsys):
    assert_passes(dc.check_ddpm_step, make_step(), capsys)


def test_ddpm_step_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ddpm_step, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_step(eps_power=1.0), "β_t / sqrt(1 - ᾱ_t)"),
    (make_step(std_power=1.0), "standard deviation"),
    (make_step(noise_at_0=True), "noise was added at t = 0"),
    (make_step(sign=+1.0), "sign of the ε term"),
    (make_step(front="alpha_bar"), "1 / sqrt(α_t)"),
])
def test_ddpm_step_mistakes(wrong, hint):
    assert_fails_with(dc.check_ddpm_step, wrong, hint)


def test_ddpm_step_ignores_variance_option():
    def always_posterior(model_eps, xt, t, schedule, *, variance="posterior", noise=None):
        return du.ddpm_step(model_eps, xt, t, schedule, noise=noise)

    assert_fails_with(dc.check_ddpm_step, always_posterior, "variance option is mixed up")


# ── ema_update_ ──────────────────────────────────────────────────────────────────────


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


def ema_no_grad_missing(ema_params, params, decay):
    for e, p in zip(ema_params, params):
        e.mul_(decay).add_(p, alpha=1 - decay)


def test_ema_update_reference_passes(capsys):
    assert_passes(dc.check_ema_update, du.ema_update_, capsys)


def test_ema_update_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_ema_update, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (ema_swapped, "decay and 1 - decay are swapped"),
    (ema_updates_model, "the model's parameters changed"),
    (ema_returns_new, "you returned new values instead"),
    (ema_replaces_items, "list items were replaced"),
    (ema_no_grad_missing, "torch.no_grad()"),
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


def make_train_step(*, zero_grad=True, clip=True, step=True, item=True):
    """A learner's train_step with one knob turned."""

    def train_step(model, optimizer, x0, schedule, *, max_grad_norm=1.0, scheduler=None,
                   ema=None, autocast=False, **cond):
        if zero_grad:
            optimizer.zero_grad()
        loss = du.diffusion_loss(model, x0, schedule, **cond)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if step:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        return loss.item() if item else loss

    return train_step


def test_train_step_reference_passes(capsys):
    assert_passes(dc.check_train_step, du.train_step, capsys)


def test_train_step_learner_version_passes(capsys):
    assert_passes(dc.check_train_step, make_train_step(), capsys)


def test_train_step_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_train_step, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_train_step(zero_grad=False), "call optimizer.zero_grad()"),
    (make_train_step(clip=False), "clip_grad_norm_"),
    (make_train_step(step=False), "call optimizer.step()"),
    (make_train_step(item=False), "return loss.item()"),
])
def test_train_step_mistakes(wrong, hint):
    assert_fails_with(dc.check_train_step, wrong, hint)


def test_train_step_forgets_scheduler():
    def no_scheduler(model, optimizer, x0, schedule, *, max_grad_norm=1.0, scheduler=None,
                     ema=None, autocast=False, **cond):
        return du.train_step(model, optimizer, x0, schedule, max_grad_norm=max_grad_norm,
                             ema=ema, **cond)

    assert_fails_with(dc.check_train_step, no_scheduler, "scheduler.step()")


def test_check_rejects_non_callable():
    with pytest.raises(TypeError):
        dc.check_train_step(None)


def test_mse_helper_matches_functional():
    # the loss the checks compare against is F.mse_loss's mean
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.isclose(F.mse_loss(a, b), ((a - b) ** 2).mean())
