"""Lesson 05's library code: the three views of one prediction (ε, x̂_0, score), the exact
2-D Gaussian-mixture toy, DDIM's timesteps, step, sampling loop and inversion, and slerp.
Tiny models and the toy's exact noise keep these fast."""
import math

import pytest
import torch

import diffusion_utilities as du

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schedule():
    return du.NoiseSchedule.create("cosine", 1000)


@pytest.fixture(scope="module")
def mixture():
    return du.toy_mixture()


def tiny_unet(**config):
    torch.manual_seed(0)
    return du.UNet(du.UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(), groups=4, image_size=16, **config))


class Oracle(torch.nn.Module):
    """Knows x0, so it returns the exact noise of any x_t:
    ε = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t):
        return du.eps_from_x0(x, t, self.x0.to(x), self.schedule)


def ideal(mixture, schedule):
    return lambda x, t: mixture.eps(x, t, schedule)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ── the three views: ε, x̂_0 and the score ──


T_SOME = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (8, 2)])
def test_conversions_round_trip_in_float64(schedule, shape):
    g = generator()
    x0, eps = (torch.randn(shape, generator=g, dtype=F64) for _ in range(2))
    xt = du.q_sample(x0, T_SOME, eps, schedule) if len(shape) == 4 else \
        du.q_sample(x0[:, :, None, None], T_SOME, eps[:, :, None, None], schedule)[:, :, 0, 0]
    eps_back = du.eps_from_x0(xt, T_SOME, x0, schedule)
    assert eps_back.shape == shape and eps_back.dtype == F64
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(du.predict_x0(xt, T_SOME, eps, schedule), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(du.predict_x0(xt, T_SOME, eps_back, schedule), x0, rtol=0,
                               atol=1e-9)
    score = du.score_from_eps(eps, T_SOME, schedule)
    torch.testing.assert_close(du.eps_from_score(score, T_SOME, schedule), eps, rtol=0,
                               atol=1e-14)
    sigma = schedule.sqrt_one_minus_alpha_bars[T_SOME].double()
    sigma = sigma.reshape(-1, *[1] * (len(shape) - 1))               # (B,) -> (B, 1, ...)
    torch.testing.assert_close(score, -eps / sigma)


def test_conversions_refuse_mismatched_shapes(schedule):
    x, t = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="eps must have the shape of xt"):
        du.predict_x0(x, t, torch.zeros(4, 3, 8, 7), schedule)
    with pytest.raises(ValueError, match="x0 must have the shape of xt"):
        du.eps_from_x0(x, t, torch.zeros(4, 3), schedule)
    with pytest.raises(ValueError, match="one timestep per batch item"):
        du.score_from_eps(x, torch.zeros(3, dtype=torch.long), schedule)


def test_ideal_eps_gives_the_posterior_mean_of_a_gaussian(schedule):
    # One component N(μ, s² I): E[x_0 | x_t] = μ + sqrt(ᾱ) s² / (ᾱ s² + 1 - ᾱ) (x_t - sqrt(ᾱ) μ).
    # Tweedie: x̂_0 from the ideal ε must be exactly that.
    mu, s = torch.tensor([[0.7, -0.3]], dtype=F64), 0.4
    one = du.GaussianMixture2D(means=mu, stds=[s], weights=[1.0])
    t = torch.tensor([0, 50, 300, 700, 990])
    xt = torch.randn(5, 2, generator=generator(), dtype=F64) * 2
    ab = schedule.alpha_bars[t].double()[:, None]
    expected = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (xt - ab.sqrt() * mu)
    got = du.predict_x0(xt, t, one.eps(xt, t, schedule), schedule)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ── the 2-D toy ──


def test_noised_score_is_the_gradient_of_the_log_density(mixture):
    x = (torch.randn(300, 2, generator=generator(1), dtype=F64) * 2).requires_grad_()
    for alpha_bar in (1.0, 0.999, 0.5, 0.01, torch.rand(300, generator=generator(2), dtype=F64)):
        log_q = mixture.noised_log_density(x, alpha_bar)
        assert log_q.shape == (300,)
        (grad,) = torch.autograd.grad(log_q.sum(), x)
        torch.testing.assert_close(mixture.noised_score(x.detach(), alpha_bar), grad,
                                   rtol=1e-9, atol=1e-9)


def test_noised_density_integrates_to_one(mixture):
    grid = torch.linspace(-6, 6, 301, dtype=F64)
    xy = torch.cartesian_prod(grid, grid)                                  # (301², 2)
    cell = (grid[1] - grid[0]) ** 2
    for alpha_bar in (1.0, 0.3):
        total = mixture.noised_log_density(xy, alpha_bar).exp().sum() * cell
        assert total.item() == pytest.approx(1.0, abs=2e-3)


def test_fully_noised_score_is_the_standard_normal_score(mixture):
    x = torch.randn(100, 2, generator=generator(), dtype=F64) * 3
    torch.testing.assert_close(mixture.noised_score(x, 1e-12), -x, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixture.noised_score(x, 0.0), -x)
    assert mixture.noised_score(x.float(), 0.5).dtype == torch.float32


def test_mixture_eps_is_minus_sqrt_one_minus_alpha_bar_times_the_score(mixture, schedule):
    x = torch.randn(6, 2, generator=generator(), dtype=F64)
    t = torch.tensor([0, 5, 99, 400, 800, 999])
    ab = schedule.alpha_bars[t]
    sigma = schedule.sqrt_one_minus_alpha_bars[t].double()[:, None]
    expected = -sigma * mixture.noised_score(x, ab)
    torch.testing.assert_close(mixture.eps(x, t, schedule), expected)


def test_mixture_samples(mixture):
    pts = mixture.sample(4000, generator=generator())
    assert pts.shape == (4000, 2) and pts.dtype == torch.float32
    assert torch.equal(pts, mixture.sample(4000, generator=generator()))
    nearest = torch.cdist(pts.double(), mixture.means).argmin(1)
    shares = torch.bincount(nearest, minlength=4).double() / 4000
    torch.testing.assert_close(shares, mixture.weights, rtol=0, atol=0.03)
    assert pts.abs().max() < 2.2 and mixture.weights.sum().item() == pytest.approx(1.0)


def test_mixture_refuses_bad_input(mixture):
    with pytest.raises(ValueError, match=r"means \(K, 2\)"):
        du.GaussianMixture2D(means=[[0.0, 0.0, 0.0]], stds=[1.0], weights=[1.0])
    with pytest.raises(ValueError, match="positive"):
        du.GaussianMixture2D(means=[[0.0, 0.0]], stds=[0.0], weights=[1.0])
    with pytest.raises(ValueError, match=r"points of shape \(n, 2\)"):
        mixture.noised_score(torch.zeros(5, 3), 0.5)
    with pytest.raises(ValueError, match=r"alpha_bar .* \[0, 1\]"):
        mixture.noised_score(torch.zeros(5, 2), 1.5)
    with pytest.raises(ValueError, match=r"alpha_bar .* shape \(5,\)"):
        mixture.noised_log_density(torch.zeros(5, 2), torch.full((4,), 0.5))


def test_ddim_with_the_ideal_eps_carries_noise_onto_the_mixture(mixture, schedule):
    # Deterministic DDIM (η = 0) with the exact ε must carry N(0, I) onto the data: every
    # point near a mode, at a typical distance for a 2-D Gaussian (E|z| = sqrt(π/2) standard
    # deviations), and each mode holding its weight's share of the points.
    n = 3000
    x_T = torch.randn(n, 2, generator=generator(1), dtype=F64)
    for x in du.ddim_sample(ideal(mixture, schedule), (n, 2), schedule, num_steps=100,
                            x_T=x_T, clip_x0=False, progress=False):
        pass
    dist = torch.cdist(x, mixture.means)                                # (n, K)
    k = dist.argmin(1)
    z = dist.min(1).values / mixture.stds[k]                            # in standard deviations
    assert z.mean().item() == pytest.approx(math.sqrt(math.pi / 2), abs=0.1)
    assert (z > 4).double().mean() < 0.003
    shares = torch.bincount(k, minlength=4).double() / n
    torch.testing.assert_close(shares, mixture.weights, rtol=0, atol=0.025)
    # ... while the points it started from were nowhere near the modes
    assert (torch.cdist(x_T, mixture.means).min(1).values / 0.25).mean() > 2


# ── DDIM: timesteps and σ ──


@pytest.mark.parametrize("T, S, spacing, expected", [
    # linspace(0, 9, 3) = 0, 4.5, 9 -> round (half to even) -> 0, 4, 9
    (10, 3, "linspace", [9, 4, 0]),
    # 10 // 3 = 3: 0, 3, 6
    (10, 3, "leading", [6, 3, 0]),
    # 10 - i 10/3 = 10, 6.67, 3.33 -> 10, 7, 3 -> minus 1
    (10, 3, "trailing", [9, 6, 2]),
    (1000, 4, "linspace", [999, 666, 333, 0]),
    (1000, 4, "leading", [750, 500, 250, 0]),
    (1000, 4, "trailing", [999, 749, 499, 249]),
    # 15/13 = 1.1538: 15, 13.85, 12.69, 11.54, 10.38, 9.23, 8.08, 6.92, 5.77, 4.62, 3.46,
    # 2.31, 1.15 -> rounded, minus 1 (numpy's arange also yields a 14th value, ~0: dropped)
    (15, 13, "trailing", [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0]),
    # 99/7 = 14.14: 0, 14.14, 28.29, 42.43, 56.57, 70.71, 84.86, 99 (rounded, not truncated)
    (100, 8, "linspace", [99, 85, 71, 57, 42, 28, 14, 0]),
    (100, 8, "leading", [84, 72, 60, 48, 36, 24, 12, 0]),
    # 100/8 = 12.5: 100, 87.5, 75, 62.5, 50, 37.5, 25, 12.5 -> half to even: 100, 88, 75,
    # 62, 50, 38, 25, 12 -> minus 1
    (100, 8, "trailing", [99, 87, 74, 61, 49, 37, 24, 11]),
    (7, 7, "linspace", [6, 5, 4, 3, 2, 1, 0]),
    (7, 7, "leading", [6, 5, 4, 3, 2, 1, 0]),
    (7, 7, "trailing", [6, 5, 4, 3, 2, 1, 0]),
    (50, 1, "linspace", [0]),
    (50, 1, "leading", [0]),
    (50, 1, "trailing", [49]),
])
def test_ddim_timesteps_by_hand(T, S, spacing, expected):
    steps = du.ddim_timesteps(T, S, spacing=spacing)
    assert steps.dtype == torch.long and steps.tolist() == expected


def test_ddim_timesteps_default_and_properties():
    assert du.ddim_timesteps(1000, 10).tolist() == list(range(999, 0, -100))   # trailing
    for T in (1, 2, 17, 100, 1000):
        for S in sorted({1, 2, 3, T // 3, T // 2, T - 1, T} & set(range(1, T + 1))):
            for spacing in du.SPACINGS:
                steps = du.ddim_timesteps(T, S, spacing=spacing)
                assert steps.shape == (S,) and steps.min() >= 0 and steps.max() < T
                assert (steps[1:] < steps[:-1]).all(), (T, S, spacing)


def test_ddim_timesteps_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown spacing 'even'"):
        du.ddim_timesteps(1000, 10, spacing="even")
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, T\]"):
            du.ddim_timesteps(1000, bad)


def test_ddim_sigma():
    assert du.ddim_sigma(0.5, 0.8, 0.0).item() == 0.0
    assert du.ddim_sigma(0.5, 1.0, 1.0).item() == 0.0           # the last step adds no noise
    expected = 0.7 * math.sqrt(0.2 / 0.5) * math.sqrt(1 - 0.5 / 0.8)
    assert du.ddim_sigma(0.5, 0.8, 0.7).item() == pytest.approx(expected, rel=1e-12)
    ab = torch.tensor([0.5, 0.1])
    assert du.ddim_sigma(ab, torch.tensor([0.8, 0.9]), 1.0).shape == (2,)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        du.ddim_sigma(0.5, 0.8, -0.1)


# ── DDIM: one step ──


@pytest.mark.parametrize("name, T", [("cosine", 1000), ("linear", 50)])
def test_ddim_step_with_eta_1_is_the_ddpm_step(name, T):
    sched = du.NoiseSchedule.create(name, T)
    g = generator(3)
    t = torch.arange(T)
    xt, model_eps, z = (torch.randn(T, 3, 2, 2, generator=g, dtype=F64) for _ in range(3))
    ddim = du.ddim_step(model_eps, xt, t, t - 1, sched, eta=1.0, noise=z)
    ddpm = du.ddpm_step(model_eps, xt, t, sched, variance="posterior", noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_ddim_step_with_eta_0_and_a_perfect_eps_lands_on_q_sample(schedule):
    g = generator(4)
    x0, eps = (torch.randn(8, 3, 4, 4, generator=g, dtype=F64) for _ in range(2))
    t = torch.tensor([0, 3, 10, 250, 500, 800, 999, 999])
    t_prev = torch.tensor([-1, 0, 2, 100, 499, -1, 979, 0])
    xt = du.q_sample(x0, t, eps, schedule)
    out = du.ddim_step(eps, xt, t, t_prev, schedule)                     # η = 0
    prev = t_prev.clamp(min=0)
    signal = schedule.sqrt_alpha_bars[prev].double().where(t_prev >= 0, 1.0)
    noise = schedule.sqrt_one_minus_alpha_bars[prev].double().where(t_prev >= 0, 0.0)
    expected = signal.reshape(-1, 1, 1, 1) * x0 + noise.reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # η = 0 is deterministic: the noise is not used
    again = du.ddim_step(eps, xt, t, t_prev, schedule, noise=torch.randn_like(xt) * 100)
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_accurate_near_the_clean_end(name, eta):
    # Against eq. 12 in float64 from the float64 betas: the float32 schedule loses digits in
    # 1 - ᾱ near ᾱ = 1, and with η = 1 the direction term 1 - ᾱ_prev - σ² is a small
    # difference of two such numbers.
    betas = du.make_beta_schedule(name, 1000)
    sched = du.NoiseSchedule.from_betas(betas)
    alpha_bars = torch.cumprod(1 - betas, 0)
    g = generator(6)
    xt, model_eps, z = (torch.randn(16, 8, generator=g, dtype=F64) for _ in range(3))
    for t, t_prev in [(1, 0), (2, 0), (20, 0), (142, 0), (5, 4), (100, 99), (30, -1), (999, 979)]:
        a_t = alpha_bars[t]
        a_prev = alpha_bars[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=F64)
        x0_hat = (xt - (1 - a_t).sqrt() * model_eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        expected = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).sqrt() * model_eps + sigma * z
        out = du.ddim_step(model_eps, xt, torch.full((16,), t), torch.full((16,), t_prev), sched,
                           eta=eta, noise=z)
        assert (out - expected).abs().max() < 1e-5 * expected.abs().max(), (t, t_prev)


def test_ddim_step_noise(schedule):
    g = generator(5)
    xt, model_eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t, t_prev = torch.full((4,), 500), torch.full((4,), 400)
    torch.manual_seed(0)
    a = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=0.5)
    b = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=0.5)
    assert not torch.equal(a, b), "with eta > 0 and no noise given, fresh noise is drawn"
    z = torch.randn(4, 3, 8, 8, generator=g)
    c = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=0.5, noise=z)
    deterministic = du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=0.0)
    sigma = du.ddim_sigma(schedule.alpha_bars[500], schedule.alpha_bars[400], 0.5)
    # the noise adds σ z; the deterministic part shrinks its ε term to sqrt(1 - ᾱ_prev - σ²)
    direction = ((1 - schedule.alpha_bars[400] - sigma**2).sqrt()
                 - schedule.sqrt_one_minus_alpha_bars[400]) * model_eps
    torch.testing.assert_close(c, deterministic + direction + sigma * z, rtol=1e-5, atol=1e-5)
    assert c.dtype == xt.dtype and c.shape == xt.shape


def test_ddim_step_refuses_bad_input(schedule):
    x = torch.zeros(2, 3, 8, 8)
    t, t_prev = torch.tensor([10, 20]), torch.tensor([5, 10])
    with pytest.raises(ValueError, match="model_eps must have the shape of xt"):
        du.ddim_step(torch.zeros(2, 3, 8, 4), x, t, t_prev, schedule)
    with pytest.raises(ValueError, match="t_prev must come before t"):
        du.ddim_step(x, x, t, torch.tensor([10, 10]), schedule)
    with pytest.raises(ValueError, match="t_prev must come before t"):
        du.ddim_step(x, x, t, torch.tensor([-2, 5]), schedule)
    with pytest.raises(ValueError, match="t_prev must be an integer tensor shaped like t"):
        du.ddim_step(x, x, t, torch.tensor([5.0, 10.0]), schedule)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        du.ddim_step(x, x, t, t_prev, schedule, eta=-1.0)
    with pytest.raises(ValueError, match="noise must have the shape of xt"):
        du.ddim_step(x, x, t, t_prev, schedule, eta=1.0, noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"timesteps t must lie in \[0, T\)"):
        du.ddim_step(x, x, torch.tensor([10, 1000]), t_prev, schedule)


# ── DDIM: the sampling loop, images, inversion ──


def test_ddim_sample_yields_num_steps_and_calls_step_fn_with_the_timesteps(schedule):
    model = tiny_unet(attribute_dim=6)
    model.train()
    attributes = torch.rand(2, 6, generator=generator())
    calls = []

    def step_fn(model_eps, xt, t, t_prev, schedule, *, eta=0.0, noise=None):
        calls.append((t.tolist(), t_prev.tolist(), eta, noise is not None))
        return du.ddim_step(model_eps, xt, t, t_prev, schedule, eta=eta, noise=noise)

    xs = list(du.ddim_sample(model, (2, 3, 16, 16), schedule, num_steps=4, eta=0.3,
                             generator=generator(), progress=False, step_fn=step_fn,
                             attributes=attributes))
    assert len(xs) == 4 and all(x.shape == (2, 3, 16, 16) for x in xs)
    assert [c[0] for c in calls] == [[t] * 2 for t in (999, 749, 499, 249)]
    assert [c[1] for c in calls] == [[t] * 2 for t in (749, 499, 249, -1)]
    assert all(c[2] == 0.3 and c[3] for c in calls)
    assert model.training, "the model's mode is restored"
    assert not xs[-1].requires_grad


def test_ddim_sample_is_reproducible_and_deterministic_for_eta_0(schedule):
    model = tiny_unet()
    def run(**kw):
        return list(du.ddim_sample(model, (2, 3, 16, 16), schedule, num_steps=3,
                                   progress=False, **kw))[-1]

    assert torch.equal(run(generator=generator(1), eta=1.0), run(generator=generator(1), eta=1.0))
    x_T = torch.randn(2, 3, 16, 16, generator=generator(2))
    assert torch.equal(run(x_T=x_T), run(x_T=x_T, generator=generator(9)))
    with pytest.raises(ValueError, match=r"x_T must have the shape \(2, 3, 16, 16\)"):
        run(x_T=torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sample_with_an_oracle_returns_its_image(schedule, eta):
    # A model that knows x0 predicts x̂_0 = x0 at every step: the last step (to ᾱ = 1)
    # returns x0, whatever the noise.
    x0 = torch.rand(3, 3, 8, 8, generator=generator()) * 2 - 1
    for x in du.ddim_sample(Oracle(x0, schedule), x0.shape, schedule, num_steps=7, eta=eta,
                            generator=generator(1), progress=False):
        pass
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)


def test_ddim_images_shapes_and_batches(schedule):
    model = tiny_unet(attribute_dim=6)
    attributes = torch.rand(5, 6, generator=generator())
    images = du.ddim_images(model, 5, schedule, num_steps=2, batch_size=2,
                            generator=generator(), progress=False, attributes=attributes)
    assert images.shape == (5, 3, 16, 16) and images.abs().max() <= 1
    whole = du.ddim_images(model, 5, schedule, num_steps=2, generator=generator(),
                           progress=False, attributes=attributes, image_shape=(3, 8, 8))
    assert whole.shape == (5, 3, 8, 8)


def test_ddim_invert_then_sample_gives_the_points_back(mixture, schedule):
    pts = mixture.sample(1000, generator=generator(2)).double()
    model = ideal(mixture, schedule)
    x_T = du.ddim_invert(model, pts, schedule, num_steps=200, progress=False)
    assert x_T.shape == pts.shape and x_T.dtype == F64
    assert x_T.mean(0).abs().max() < 0.15 and x_T.std().item() == pytest.approx(1.0, abs=0.1)
    for x in du.ddim_sample(model, pts.shape, schedule, num_steps=200, x_T=x_T, clip_x0=False,
                            progress=False):
        pass
    error = (x - pts).norm(dim=1)
    # typical points come back; a few between the modes, where the flow splits, may not
    assert error.median() < 0.01 and torch.quantile(error, 0.9) < 0.03


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_invert_pairs_each_step_with_the_sampling_step_back(schedule, spacing):
    # Each inversion step t_from -> t_to uses ε_θ(·, t_to), as the sampling step back from
    # t_to does: with an ε that depends on t alone the two are exact inverses.
    x0 = torch.randn(4, 2, generator=generator(3), dtype=F64)
    model = lambda x, t: torch.sin(t.double() / 100)[:, None] * torch.ones_like(x)  # noqa: E731
    x_T = du.ddim_invert(model, x0, schedule, num_steps=9, spacing=spacing, progress=False)
    for x in du.ddim_sample(model, x0.shape, schedule, num_steps=9, spacing=spacing, x_T=x_T,
                            clip_x0=False, progress=False):
        pass
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-9)


def test_ddim_invert_with_a_unet(schedule):
    model = tiny_unet(attribute_dim=6)
    model.train()
    x0 = torch.rand(2, 3, 16, 16, generator=generator()) * 2 - 1
    attributes = torch.rand(2, 6, generator=generator())
    x_T = du.ddim_invert(model, x0, schedule, num_steps=3, progress=False, attributes=attributes)
    assert x_T.shape == x0.shape and x_T.dtype == x0.dtype and x_T.device == x0.device
    assert torch.isfinite(x_T).all() and not x_T.requires_grad and model.training
    assert not torch.allclose(x_T, x0)


# ── slerp ──


def test_slerp_endpoints_and_norm():
    g = generator()
    z0, z1 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    torch.testing.assert_close(du.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(du.slerp(z0, z1, 1.0), z1)
    # equal norms, orthogonal: slerp stays on the sphere, a straight line cuts inside it
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    for alpha in (0.1, 0.5, 0.8):
        assert du.slerp(a, b, alpha).norm().item() == pytest.approx(3.0, rel=1e-6)
        # ... and turns by the fraction alpha of the angle
        angle = torch.atan2(du.slerp(a, b, alpha)[1], du.slerp(a, b, alpha)[0]).item()
        assert angle == pytest.approx(alpha * math.pi / 2, rel=1e-6)
    assert torch.lerp(a, b, 0.5).norm().item() == pytest.approx(3.0 / math.sqrt(2), rel=1e-6)


def test_slerp_keeps_the_norm_of_gaussian_noise():
    g = generator(1)
    z0, z1 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    norms = du.slerp(z0, z1, 0.5).flatten(1).norm(dim=1) / math.sqrt(3 * 32 * 32)
    assert ((norms - 1).abs() < 0.05).all()
    lerp_norms = torch.lerp(z0, z1, 0.5).flatten(1).norm(dim=1) / math.sqrt(3 * 32 * 32)
    assert ((lerp_norms - 1 / math.sqrt(2)).abs() < 0.05).all()


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    z0 = torch.randn(2, 5, generator=generator())
    for z1 in (2 * z0, z0.clone(), -z0, torch.zeros_like(z0)):
        out = du.slerp(z0, z1, 0.3)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.lerp(z0, z1, 0.3))


def test_slerp_broadcasts_over_the_batch():
    g = generator(2)
    z0, z1 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = du.slerp(z0, z1, alpha)                                   # one alpha per sample
    assert out.shape == (4, 3, 8, 8)
    for i in range(4):
        torch.testing.assert_close(out[i], du.slerp(z0[i], z1[i], alpha[i].item()))
    path = du.slerp(z0[0], z1[0], torch.linspace(0, 1, 5))         # one pair, 5 points
    assert path.shape == (5, 3, 8, 8)
    torch.testing.assert_close(path[0], z0[0])
    torch.testing.assert_close(path[-1], z1[0])
    torch.testing.assert_close(du.slerp(z0[:1], z1[:1], torch.linspace(0, 1, 5)), path)
    assert du.slerp(z0[0], z1[0], 0.5).shape == (3, 8, 8)
    assert du.slerp(z0.double(), z1.double(), 0.5).dtype == F64


def test_slerp_refuses_bad_input():
    z = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"z1 must have the shape of z0, \(4, 3, 8, 8\)"):
        du.slerp(z, torch.zeros(4, 3, 8, 4), 0.5)
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\]"):
        du.slerp(z, z, 1.5)
    with pytest.raises(ValueError, match=r"\(B,\) = \(4,\)"):
        du.slerp(z, z, torch.rand(3))
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\] or a tensor"):
        du.slerp(z, z, "half")
