"""Lesson 03's library code: the loss, EMA, training step and loop, the DDPM reverse step,
the sampling loop and the quality measure. A tiny stand-in model keeps these fast."""
import sys

import pytest
import torch

import diffusion_utilities as du


class TinyEps(torch.nn.Module):
    """Any ``model(x, t)`` returning x's shape will do for the training and sampling code."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.t_scale = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((t.detach().clone(), dict(cond), torch.is_grad_enabled(), self.training))
        return self.conv(x) + self.t_scale * t.float().reshape(-1, 1, 1, 1) / 1000


class Oracle(torch.nn.Module):
    """Knows x0, so it returns the exact noise: ε = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, xt, t):
        a = du.extract(self.schedule.alpha_bars, t, xt.shape)
        return (xt - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.fixture
def schedule():
    return du.NoiseSchedule.create("cosine", 50)


@pytest.fixture
def x0():
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ── the loss ─────────────────────────────────────────────────────────────────────────


def test_loss_is_zero_for_the_exact_noise(x0, schedule):
    loss = du.diffusion_loss(Oracle(x0, schedule), x0, schedule)
    assert loss.shape == () and loss.item() < 1e-8


def test_loss_draws_t_from_zero_to_T_minus_1_and_passes_cond(schedule):
    model = TinyEps()
    loss = du.diffusion_loss(model, torch.zeros(2000, 3, 2, 2), schedule, labels="L")
    t, cond, grad_enabled, _ = model.calls[-1]
    assert loss.requires_grad and grad_enabled
    assert t.shape == (2000,) and int(t.min()) == 0 and int(t.max()) == schedule.T - 1
    assert cond == {"labels": "L"}


def test_loss_with_given_t_and_eps_is_deterministic(x0, schedule):
    model = TinyEps()
    t = torch.arange(6) * 9
    eps = torch.randn_like(x0)
    a = du.diffusion_loss(model, x0, schedule, t=t, eps=eps)
    b = du.diffusion_loss(model, x0, schedule, t=t, eps=eps)
    assert torch.equal(a, b)


def test_loss_rejects_a_single_image(schedule):
    with pytest.raises(ValueError, match="B, C, H, W"):
        du.diffusion_loss(TinyEps(), torch.zeros(3, 8, 8), schedule)


# ── EMA, learning rate, training step and loop ──────────────────────────────────────


def test_ema_update_formula():
    e, p = [torch.ones(3)], [torch.zeros(3, requires_grad=True)]
    du.ema_update_(e, p, 0.75)
    assert torch.allclose(e[0], torch.full((3,), 0.75)) and not e[0].requires_grad


def test_ema_warms_up_and_gives_a_state_dict():
    model = torch.nn.Linear(2, 2)
    ema = du.EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first decay is min(0.999, 1/10): mostly the new weights
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 1.0), atol=0.2)
    assert set(ema.state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="decay"):
        du.EMA(model, decay=1.0)


def test_ema_decay_at_follows_the_warm_up():
    ema = du.EMA(torch.nn.Linear(2, 2), decay=0.995)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(149) == pytest.approx(150 / 159)         # a 150-step run ends at 0.943
    assert ema.decay_at(1789) < 0.995 and ema.decay_at(1790) == 0.995


def test_ema_uses_the_given_update_fn():
    calls = []

    def my_update(ema_params, params, decay):
        calls.append(decay)
        du.ema_update_(ema_params, params, decay)

    model = torch.nn.Linear(2, 2)
    ema = du.EMA(model, decay=0.9, update_fn=my_update)
    reference = du.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    reference.update(model)
    assert calls == [pytest.approx(0.1)]
    assert torch.equal(ema.model.weight, reference.model.weight)


def test_warmup_lr_factor():
    f = du.warmup_lr_factor
    assert f(0, warmup_steps=10) == pytest.approx(0.1)
    assert f(9, warmup_steps=10) == 1.0 and f(500, warmup_steps=10) == 1.0
    assert f(10, warmup_steps=10, total_steps=110, shape="cosine") == pytest.approx(1.0)
    assert f(60, warmup_steps=10, total_steps=110, shape="cosine") == pytest.approx(0.5)
    assert f(110, warmup_steps=10, total_steps=110, shape="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError):
        f(20, warmup_steps=10, shape="linear")


def test_train_step_returns_a_float_and_moves_the_weights(x0, schedule):
    model = TinyEps()
    before = model.conv.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = du.train_step(model, opt, x0, schedule, max_grad_norm=1e-3)
    assert isinstance(loss, float)
    step = (model.conv.weight.detach() - before).norm()
    assert 0 < step <= 0.1 * 1e-3 * 1.001  # clipped


def test_train_step_autocast_runs(x0, schedule):
    model = TinyEps()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = du.train_step(model, opt, x0, schedule, autocast=True)
    assert isinstance(loss, float) and loss == loss


def test_train_generator_yields_state_and_the_loss_falls(schedule):
    torch.manual_seed(0)
    images = torch.zeros(64, 3, 8, 8)
    images[:, 0] = 0.8  # one learnable image: the loss must fall quickly
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=32)
    model = TinyEps()
    ema = du.EMA(model, decay=0.9)
    states = list(du.train(model, loader, schedule, steps=150, lr=1e-2, warmup_steps=10,
                           ema=ema, progress=False))
    assert [s.step for s in states] == list(range(1, 151))
    assert states[0].lr == pytest.approx(1e-3) and states[-1].lr == pytest.approx(1e-2)
    first = sum(s.loss for s in states[:20]) / 20
    last = sum(s.loss for s in states[-20:]) / 20
    assert last < 0.8 * first
    assert ema.num_updates == 150


def test_train_passes_conditioning(schedule):
    loader = [(torch.zeros(4, 3, 8, 8), torch.arange(4))]
    model = TinyEps()
    for _ in du.train(model, loader, schedule, steps=3, progress=False,
                      cond_fn=lambda batch: {"labels": batch[1]}):
        pass
    assert torch.equal(model.calls[-1][1]["labels"], torch.arange(4))
    with pytest.raises(ValueError, match="no batches"):
        next(du.train(model, [], schedule, steps=1, progress=False))


# ── the reverse step and sampling ────────────────────────────────────────────────────


def test_ddpm_step_with_the_true_noise_gives_the_posterior(x0, schedule):
    # with ε_θ = the true ε, DDPM eq. 11's mean is the forward posterior's mean (eq. 7)
    t = torch.tensor([0, 1, 10, 25, 40, 49])
    eps = torch.randn_like(x0)
    xt = du.q_sample(x0, t, eps, schedule)
    mean = du.ddpm_step(eps, xt, t, schedule, noise=torch.zeros_like(x0))
    ref_mean, ref_var = du.q_posterior_mean_variance(x0, xt, t, schedule)
    assert torch.allclose(mean, ref_mean, atol=1e-4)
    z = torch.randn_like(x0)
    out = du.ddpm_step(eps, xt, t, schedule, noise=z)
    assert torch.allclose(out - mean, ref_var.sqrt() * z, atol=1e-5)
    out_beta = du.ddpm_step(eps, xt, t, schedule, noise=z, variance="beta")
    sigma = du.extract(schedule.betas, t, x0.shape).sqrt() * (t > 0).float().reshape(-1, 1, 1, 1)
    assert torch.allclose(out_beta - mean, sigma * z, atol=1e-5)


def test_ddpm_step_adds_no_noise_at_t_zero(x0, schedule):
    t = torch.zeros(6, dtype=torch.long)
    eps = torch.randn_like(x0)
    a = du.ddpm_step(eps, x0, t, schedule)
    b = du.ddpm_step(eps, x0, t, schedule)
    assert torch.equal(a, b)


def test_ddpm_step_validates(x0, schedule):
    t = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="variance"):
        du.ddpm_step(x0, x0, t, schedule, variance="learned")
    with pytest.raises(ValueError, match="shape of xt"):
        du.ddpm_step(x0[:, :1], x0, t, schedule)


def test_respace_keeps_alpha_bar_at_the_chosen_steps(schedule):
    short, taus = du.respace_schedule(schedule, 10)
    assert short.T == 10 and taus[0] == 0 and taus[-1] == schedule.T - 1
    assert torch.allclose(short.alpha_bars, schedule.alpha_bars[taus], rtol=1e-4, atol=1e-6)
    full, taus_full = du.respace_schedule(schedule, schedule.T)
    assert torch.allclose(full.betas, schedule.betas, rtol=1e-4)
    with pytest.raises(ValueError, match="num_steps"):
        du.respace_schedule(schedule, 0)


def test_ddpm_sample_yields_every_step_in_eval_mode_without_grad(schedule):
    model = TinyEps().train()
    frames = list(du.ddpm_sample(model, (2, 3, 8, 8), schedule, num_steps=7, progress=False,
                                 labels="L"))
    assert len(frames) == 7 and all(f.shape == (2, 3, 8, 8) for f in frames)
    assert [int(c[0][0]) for c in model.calls] == du.respace_schedule(schedule, 7)[1].flip(0).tolist()
    assert all(not grad and not training and cond == {"labels": "L"}
               for _, cond, grad, training in model.calls)
    assert model.training  # restored
    assert torch.is_grad_enabled()


def test_ddpm_sample_is_reproducible_and_add_noise_matters(schedule):
    model = TinyEps()

    def last(**kw):
        gen = torch.Generator().manual_seed(1)
        *_, x = du.ddpm_sample(model, (2, 3, 8, 8), schedule, generator=gen, progress=False, **kw)
        return x

    assert torch.equal(last(), last())
    assert not torch.allclose(last(), last(add_noise=False))


def test_sample_images_batches_and_clamps(schedule):
    model = TinyEps()
    with torch.no_grad():
        model.conv.bias.fill_(-5.0)  # pushes the samples far out of range
    images = du.sample_images(model, 5, schedule, image_shape=(3, 4, 4), num_steps=4,
                              batch_size=2, progress=False)
    assert images.shape == (5, 3, 4, 4)
    assert images.min() >= -1 and images.max() <= 1


# ── the quality measure ──────────────────────────────────────────────────────────────


def test_attribute_classifier_has_one_head_per_attribute():
    clf = du.AttributeClassifier(width=8)
    out = clf(torch.zeros(2, 3, 32, 32))
    assert list(out) == list(du.ATTRIBUTES)
    assert [o.shape[1] for o in out.values()] == [len(v) for v in du.ATTRIBUTE_VALUES]


class FixedShapeHead(torch.nn.Module):
    """A fake classifier whose shape probabilities are given per image."""

    def __init__(self, probs):
        super().__init__()
        self.probs = probs
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return {"shape": self.probs[: len(x)].log()}


def test_recognised_fraction_counts_confident_images():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    clf = FixedShapeHead(probs)
    assert du.recognised_fraction(torch.zeros(4, 3, 32, 32), clf) == pytest.approx(0.5)
    assert du.recognised_fraction(torch.zeros(4, 3, 32, 32), clf, threshold=0.55) == 0.75
    with pytest.raises(ValueError, match="N, 3, H, W"):
        du.recognised_fraction(torch.zeros(3, 32, 32), clf)


def test_clipping_x0_changes_eps_only_where_x0_hat_leaves_the_pixel_range(x0, schedule):
    t = torch.tensor([0, 5, 20, 30, 45, 49])
    eps = torch.randn_like(x0)
    xt = du.q_sample(x0, t, eps, schedule)
    assert torch.allclose(du._eps_with_clipped_x0(eps, xt, t, schedule), eps, atol=1e-3)
    wild = du._eps_with_clipped_x0(-20 * eps, xt, t, schedule)
    a = du.extract(schedule.alpha_bars, t, xt.shape)
    x0_hat = (xt - (1 - a).sqrt() * wild) / a.sqrt()
    assert x0_hat.abs().max() <= 1 + 1e-3


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_clipped_last_step_lands_inside_the_pixel_range(name):
    """With x̂_0 clipped, the last step (t = 0) returns x̂_0 itself: no float32 drift outside
    [-1, 1] (the schedule's derived fields are computed in float64)."""
    schedule = du.NoiseSchedule.create(name, 1000)
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(64, 3, 8, 8, generator=g) * 2, torch.randn(64, 3, 8, 8, generator=g) * 3
    t = torch.zeros(64, dtype=torch.long)
    x = du.ddpm_step(du._eps_with_clipped_x0(eps, xt, t, schedule), xt, t, schedule)
    assert x.abs().max().item() <= 1 + 1e-5


# ── progress bars ────────────────────────────────────────────────────────────────────


class _FakeKernel:
    def __init__(self, content):
        self.content = content

    def get_parent(self):
        return {"content": self.content}


def _fake_ipython(monkeypatch, content):
    import types

    shell = types.SimpleNamespace(kernel=_FakeKernel(content))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_a_kernel_driven_by_a_program_is_told_from_a_frontend(monkeypatch):
    assert not du._kernel_without_frontend()                  # pytest: no kernel at all
    _fake_ipython(monkeypatch, {"code": "", "allow_stdin": False})   # nbclient, nbval, papermill
    assert du._kernel_without_frontend()
    _fake_ipython(monkeypatch, {"code": "", "allow_stdin": True})    # JupyterLab, VS Code, Colab
    assert not du._kernel_without_frontend()


def test_progress_bar_run_by_a_program_prints_only_its_final_state(monkeypatch, capsys):
    monkeypatch.setattr(du, "_kernel_without_frontend", lambda: True)
    bar = du.tqdm(range(1, 6), desc="training", initial=0, total=5)
    assert isinstance(bar, du._FinalLineBar)
    for step in bar:
        bar.set_postfix(loss=f"{step:.1f}")
        assert capsys.readouterr().out == ""                  # silent while it runs
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "training: 100%" in out and "5/5" in out and "loss=5.0" in out
    bar.close()                                               # closing twice prints nothing more
    assert capsys.readouterr().out == ""
    for _ in du.tqdm(range(3), desc="quiet", disable=True):
        pass
    assert capsys.readouterr().out == ""


def test_progress_bar_stopped_early_prints_where_it_stopped(monkeypatch, capsys):
    monkeypatch.setattr(du, "_kernel_without_frontend", lambda: True)

    def loop():
        for i in du.tqdm(range(10), desc="sampling"):
            yield i

    for i in loop():
        if i == 3:
            break                                             # the generator is closed here
    assert "sampling:  30%" in capsys.readouterr().out


def test_progress_bar_elsewhere_is_tqdm_auto(monkeypatch):
    from tqdm.auto import tqdm as tqdm_auto

    monkeypatch.setattr(du, "_kernel_without_frontend", lambda: False)
    bar = du.tqdm(range(2), disable=True)
    assert isinstance(bar, tqdm_auto) and not isinstance(bar, du._FinalLineBar)
