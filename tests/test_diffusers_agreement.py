"""The library against diffusers, the reference implementation a learner meets next.

Same inputs, same injected noise, and each comparison is the largest absolute difference.
Tolerances:
- schedules, q_sample, the time embedding: TOL = 1e-5;
- one reverse step from t to t_prev (DDPM or DDIM): TOL · max(1, sqrt(ᾱ_prev / ᾱ_t)).
  The library computes its schedule in float64 and stores it in float32 (relative error
  ~6e-8), and a step multiplies that rounding by sqrt(ᾱ_prev / ᾱ_t), the factor by which it
  scales x̂₀'s noise term: 1/sqrt(α_t) ≤ 32 for one DDPM step, but ~4000 for a DDIM step
  from t = 999 of the cosine schedule (ᾱ = 2.4e-9, where sqrt(1 - ᾱ) rounds to 1.0 in
  float32) to t = 857. With every coefficient in float64 the two agree to ~1e-12.
diffusers keeps its schedules in float32 too; the step tests give its scheduler β and ᾱ
recomputed in float64 by its own recipe (``scheduler`` below) and feed both sides float64
tensors. The largest difference of each comparison is collected in ``LARGEST`` and printed
by the last test (``pytest -s`` shows it).

Pairs compared (ours ↔ diffusers):
  linear_beta_schedule(T)          ↔ beta_schedule="linear", beta_start = 1e-4·1000/T,
                                     beta_end = 0.02·1000/T (ours scales both ends by 1000/T)
  cosine_beta_schedule(T)          ↔ beta_schedule="squaredcos_cap_v2"
  sigmoid_beta_schedule(T)         ↔ none (skipped: see test_sigmoid_schedule_has_no_counterpart)
  q_sample                         ↔ DDPMScheduler.add_noise
  ddpm_step, variance="posterior"  ↔ DDPMScheduler.step, variance_type="fixed_small"
  ddpm_step, variance="beta"       ↔ variance_type="fixed_large"
  clip_x0 (_eps_with_clipped_x0)   ↔ clip_sample=True (and, for DDIM, use_clipped_model_output)
  respace_schedule(schedule, S)    ↔ DDPMScheduler.set_timesteps(S), timestep_spacing="linspace"
  ddim_timesteps(T, S, spacing=)   ↔ DDIMScheduler.set_timesteps(S).timesteps, steps_offset=0
  ddim_step, ddim_sample           ↔ DDIMScheduler.step, set_alpha_to_one=True, variance_noise=
  sinusoidal_embedding             ↔ get_timestep_embedding(flip_sin_to_cos=False,
                                     downscale_freq_shift=0, max_period=10000)
"""
import importlib.util
import io
import math
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import diffusion_utilities as du

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is a development dependency (pip install -r "
                        "requirements-dev.txt); without it the comparison with it is skipped")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

F64 = torch.float64
T_TRAIN = 1000
TOL = 1e-5
LARGEST: dict[str, tuple[float, float]] = {}   # comparison -> (largest |difference|, its tolerance)

pytestmark = pytest.mark.usefixtures("one_thread")


def record(name: str, ours: torch.Tensor, theirs: torch.Tensor, *, tol: float = TOL) -> float:
    """Keep the largest |ours - theirs| under ``name`` and check it is at most ``tol``."""
    assert ours.shape == theirs.shape, f"{name}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours.double() - theirs.double()).abs().max().item()
    if diff >= LARGEST.get(name, (-1.0, 0.0))[0]:
        LARGEST[name] = (diff, tol)
    assert diff <= tol, f"{name}: largest difference {diff:.3g} > {tol:.3g}"
    return diff


def diffusers_schedule(name: str, T: int) -> dict:
    """diffusers' config for the library's schedule ``name`` with T steps."""
    if name == "linear":   # ours scales DDPM's β range by 1000 / T; diffusers takes it as given
        return dict(beta_schedule="linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    if name == "cosine":   # Nichol & Dhariwal 2021, eq. 17, s = 0.008, β clipped at 0.999
        return dict(beta_schedule="squaredcos_cap_v2")
    raise ValueError(name)


def float64_betas(sched) -> torch.Tensor:
    """diffusers' own recipe for ``sched``'s betas, kept in float64 (it stores them in float32)."""
    c, T = sched.config, sched.config.num_train_timesteps
    if c.beta_schedule == "linear":
        return torch.linspace(c.beta_start, c.beta_end, T, dtype=F64)
    if c.beta_schedule == "squaredcos_cap_v2":     # diffusers' betas_for_alpha_bar, "cosine"
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
                             for i in range(T)], dtype=F64)
    raise ValueError(c.beta_schedule)


def scheduler(cls, name: str, T: int = T_TRAIN, **config):
    """``cls`` (DDPMScheduler or DDIMScheduler) for our schedule ``name``, its betas and ᾱ
    recomputed in float64 by its own recipe, so that its steps run in float64.

    Why: diffusers stores β in float32, and where β is near 1 (β = 0.999 at the end of the
    cosine schedule) α = 1 - β keeps only ~4 significant digits (float32(0.999) is off by
    5e-8, i.e. 5e-5 of α = 0.001), which moves x_{t-1} by ~3e-4 there: float32 storage, not
    a difference in the formulas, which is what the step tests compare.
    """
    sched = cls(num_train_timesteps=T, prediction_type="epsilon", **diffusers_schedule(name, T),
                **config)
    betas = float64_betas(sched)
    # the same values up to float32 rounding (linspace in float32 is off by a few units in
    # the last place)
    assert torch.allclose(betas, sched.betas.double(), rtol=1e-6, atol=0), \
        "float64_betas is not diffusers' recipe"
    sched.betas, sched.alphas = betas, 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return sched


def step_tolerance(sched, t: int, t_prev: int) -> float:
    """TOL · max(1, sqrt(ᾱ_prev / ᾱ_t)), ᾱ_prev = 1 for t_prev < 0 (see the module's docstring)."""
    alpha_bar_prev = 1.0 if t_prev < 0 else sched.alphas_cumprod[t_prev].item()
    return TOL * max(1.0, math.sqrt(alpha_bar_prev / sched.alphas_cumprod[t].item()))


def step_inputs(schedule: du.NoiseSchedule, t: int, *, B: int = 4, seed: int = 0):
    """x_t = q_sample(x_0, t, ε) of x_0 in [-1, 1], and an imperfect ε prediction (so that x̂₀
    leaves [-1, 1] and clipping matters), float64 ``(B, 3, 8, 8)``; t as a ``(B,)`` tensor."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 3, 8, 8, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(B, 3, 8, 8, generator=g, dtype=F64)
    t_batch = torch.full((B,), t, dtype=torch.long)
    xt = du.q_sample(x0, t_batch, eps, schedule)
    model_eps = eps + 0.5 * torch.randn(B, 3, 8, 8, generator=g, dtype=F64)
    return xt, model_eps, t_batch


def x0_leaves_range(xt, model_eps, t_batch, schedule) -> bool:
    x0_hat = ((xt - du.extract(schedule.sqrt_one_minus_alpha_bars, t_batch, xt.shape).double()
               * model_eps) / du.extract(schedule.sqrt_alpha_bars, t_batch, xt.shape).double())
    return bool((x0_hat.abs() > 1).any())


def same_noise(shape, seed: int):
    """The draw diffusers' step makes from ``torch.Generator().manual_seed(seed)``
    (randn_tensor with a CPU generator and a float64 model output: torch.randn, float64)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ── schedules ──


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 250, 50])
def test_schedules_match(name, T):
    """Betas and ᾱ: diffusers' float32 values against ours (float64 computed, float32 stored)."""
    sched = DDPMScheduler(num_train_timesteps=T, **diffusers_schedule(name, T))
    betas = du.make_beta_schedule(name, T)                           # float64
    schedule = du.NoiseSchedule.from_betas(betas)                    # float32 fields
    record(f"betas ({name})", betas, sched.betas)
    # ᾱ: diffusers' own float32 cumulative product (rounding grows along the 1000 factors) ...
    record(f"alphas_cumprod, diffusers' float32 ({name})", du.alpha_bars_from_betas(betas),
           sched.alphas_cumprod)
    record(f"alphas_cumprod vs NoiseSchedule.alpha_bars ({name})", schedule.alpha_bars,
           sched.alphas_cumprod)
    # ... and in float64 from its betas: only their rounding to float32 is left
    record(f"alphas_cumprod, float64 ({name})", du.alpha_bars_from_betas(betas),
           torch.cumprod(1.0 - sched.betas.double(), 0))


def test_sigmoid_schedule_has_no_counterpart():
    """diffusers' beta_schedule="sigmoid" (DDPMScheduler only) is GeoDiff's sigmoid *on β*:
    β = sigmoid(linspace(-6, 6, T)) · (beta_end - beta_start) + beta_start. Ours (Jabri et al.
    2022; Chen 2023, Algorithm 1) defines ᾱ through a sigmoid, so no choice of diffusers'
    parameters reproduces it; this shows they differ, then skips the comparison."""
    ours = du.make_beta_schedule("sigmoid", T_TRAIN)
    theirs = DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="sigmoid").betas
    assert (ours.float() - theirs).abs().max() > 0.1
    pytest.skip("diffusers has no sigmoid schedule defined through ᾱ (its 'sigmoid' is GeoDiff's "
                "sigmoid on β): nothing to compare with")


# ── forward process ──


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_add_noise(name):
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    x0 = torch.rand(len(t), 3, 8, 8, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(len(t), 3, 8, 8, generator=g, dtype=F64)
    ours = du.q_sample(x0, t, eps, schedule)
    theirs = scheduler(DDPMScheduler, name).add_noise(x0, eps, t)
    record(f"q_sample vs add_noise, float64 ᾱ ({name})", ours, theirs)
    shipped = DDPMScheduler(num_train_timesteps=T_TRAIN, **diffusers_schedule(name, T_TRAIN))
    record(f"q_sample vs add_noise, diffusers' float32 ᾱ ({name})", ours,
           shipped.add_noise(x0, eps, t))


# ── the DDPM reverse step ──

DDPM_VARIANCES = {"posterior": "fixed_small", "beta": "fixed_large"}   # ours -> diffusers'


def ddpm_reference(sched, model_eps, t: int, xt, *, seed: int):
    """diffusers' DDPM step, its noise drawn by a generator seeded ``seed`` (see same_noise)."""
    return sched.step(model_eps, t, xt, generator=torch.Generator().manual_seed(seed)).prev_sample


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", list(DDPM_VARIANCES))
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_step_matches(name, variance, clip):
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    sched = scheduler(DDPMScheduler, name, variance_type=DDPM_VARIANCES[variance],
                      clip_sample=clip)
    clipped_somewhere = False
    for t in (T_TRAIN - 1, 700, 300, 50, 1, 0):
        xt, model_eps, t_batch = step_inputs(schedule, t, seed=t)
        clipped_somewhere |= x0_leaves_range(xt, model_eps, t_batch, schedule)
        theirs = ddpm_reference(sched, model_eps, t, xt, seed=100 + t)
        eps = du._eps_with_clipped_x0(model_eps, xt, t_batch, schedule) if clip else model_eps
        ours = du.ddpm_step(eps, xt, t_batch, schedule, variance=variance,
                            noise=same_noise(xt.shape, 100 + t))
        record(f"ddpm_step, {variance}{', clip_x0' if clip else ''} ({name})", ours, theirs,
               tol=step_tolerance(sched, t, t - 1))
    assert clipped_somewhere, "the inputs should send x̂₀ outside [-1, 1] somewhere"


@pytest.mark.parametrize("variance", list(DDPM_VARIANCES))
@pytest.mark.parametrize("num_steps", [100, 37])
def test_respaced_ddpm_step_matches(num_steps, variance):
    """Fewer steps: ``respace_schedule`` visits round(linspace(0, T-1, S)), which is diffusers'
    timestep_spacing="linspace"; DDPMScheduler's previous timestep is then the next one of the
    sequence and its β the ratio of ᾱ between them, as in the respaced schedule. (The library
    has no DDPM respacing for "leading" or "trailing".) The last step of S = 37 has
    α = ᾱ_999 / ᾱ_972 ≈ 1e-6, hence a tolerance near 1e-2 there: DDPM eq. 11 writes the mean as
    1/sqrt(α) (x_t - β/sqrt(1-ᾱ) ε), a difference of nearly equal terms scaled by ~900."""
    name = "cosine"
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    short, taus = du.respace_schedule(schedule, num_steps)
    sched = scheduler(DDPMScheduler, name, variance_type=DDPM_VARIANCES[variance],
                      clip_sample=True, timestep_spacing="linspace")
    sched.set_timesteps(num_steps)
    assert torch.equal(sched.timesteps, taus.flip(0))
    for i in (num_steps - 1, num_steps // 2, 1, 0):
        xt, model_eps, i_batch = step_inputs(short, i, seed=i)
        t, t_prev = int(taus[i]), (int(taus[i - 1]) if i > 0 else -1)
        theirs = ddpm_reference(sched, model_eps, t, xt, seed=200 + i)
        eps = du._eps_with_clipped_x0(model_eps, xt, i_batch, short)
        ours = du.ddpm_step(eps, xt, i_batch, short, variance=variance,
                            noise=same_noise(xt.shape, 200 + i))
        record(f"ddpm_step on respace_schedule, {variance}, clip_x0", ours, theirs,
               tol=step_tolerance(sched, t, t_prev))


# ── the sinusoidal time embedding ──

# The flags that reproduce ours: sines first (flip_sin_to_cos=False) and frequencies
# max_period^(-i / half) (downscale_freq_shift=0; diffusers' default 1 divides by half - 1).
# diffusers' UNet2DModel itself uses flip_sin_to_cos=True, freq_shift=0: cosines first.
OUR_FLAGS = dict(flip_sin_to_cos=False, downscale_freq_shift=0, scale=1)


@pytest.mark.parametrize("dim", [2, 32, 128])
@pytest.mark.parametrize("max_period", [10000, 1000])
def test_sinusoidal_embedding_matches(dim, max_period):
    t = torch.tensor([0, 1, 2, 17, 250, 998, 999])
    ours = du.sinusoidal_embedding(t, dim, max_period=max_period)
    theirs = get_timestep_embedding(t, dim, max_period=max_period, **OUR_FLAGS)
    record("sinusoidal_embedding, integer t", ours, theirs)
    # fractional t (as continuous-time samplers pass), both in float32
    t_frac = torch.linspace(0, 999, 41)
    record("sinusoidal_embedding, float32 t",
           du.sinusoidal_embedding(t_frac, dim, max_period=max_period),
           get_timestep_embedding(t_frac, dim, max_period=max_period, **OUR_FLAGS))


def test_sinusoidal_embedding_flags_matter():
    """Each flag we set changes the result: the match above is not an accident of defaults."""
    t, dim = torch.tensor([3, 500, 999]), 32
    ours = du.sinusoidal_embedding(t, dim)
    for change in (dict(flip_sin_to_cos=True), dict(downscale_freq_shift=1)):
        other = get_timestep_embedding(t, dim, max_period=10000, **{**OUR_FLAGS, **change})
        assert (ours - other).abs().max() > 0.1, change


# ── DDIM: the timesteps visited ──


def diffusers_ddim(name: str, num_steps: int, spacing: str, *, clip: bool = False):
    """DDIMScheduler as the library's DDIM: ᾱ_prev = 1 after the last step, no offset."""
    sched = scheduler(DDIMScheduler, name, clip_sample=clip, set_alpha_to_one=True,
                      steps_offset=0, timestep_spacing=spacing)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("spacing", du.SPACINGS)
@pytest.mark.parametrize("T", [1000, 250, 7])
def test_ddim_timesteps_match_set_timesteps(T, spacing):
    """Every S from 1 to T. One known exception, diffusers' and not ours: with "trailing",
    numpy's arange(T, 0, -T/S) can overshoot by one element for some S (T = 1000: S = 61, 103,
    121, ...), and diffusers then returns S + 1 timesteps ending in -1, which its step reads
    as ᾱ[-1], the *last* ᾱ. ddim_timesteps keeps the first S, the rest being equal."""
    overshoots = []
    for S in range(1, T + 1):
        theirs = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
        theirs.set_timesteps(S)
        ours = du.ddim_timesteps(T, S, spacing=spacing)
        if len(theirs.timesteps) == S + 1 and spacing == "trailing":
            assert theirs.timesteps[-1] == -1
            overshoots.append(S)
            theirs.timesteps = theirs.timesteps[:S]
        assert torch.equal(ours, theirs.timesteps), f"T = {T}, S = {S}, {spacing}"
    if spacing == "trailing" and T == 1000:
        assert overshoots[:3] == [61, 103, 121]    # the quirk is still there: keep the note true


# diffusers' DDIMScheduler.step goes from t to prev_timestep = t - T // S, *whatever the
# spacing*; the library's ddim_sample goes to the next timestep of the sequence (-1 after the
# last). They agree for "leading" (its timesteps are multiples of T // S) and for "trailing"
# when S divides T; otherwise they differ: with "trailing", T = 1000, S = 7, diffusers steps
# 999 -> 857 and then evaluates the model at 856 with an x at noise level 857, and its last
# step goes 142 -> 0 (it ends one step of noise short of ᾱ = 1); with "linspace", T = 1000,
# S = 50, it steps 999 -> 979 where the sequence goes on at 979.6 rounded = 980, and visits
# t = 0 as its last timestep (from which it goes to t - 20 < 0, i.e. ᾱ = 1). The step
# tests below therefore give ddim_step diffusers' t_prev; test_ddim_prev_timestep_* pin
# where the two choices agree.


def diffusers_prev(t: int, S: int, T: int = T_TRAIN) -> int:
    prev = t - T // S
    return prev if prev >= 0 else -1      # any prev < 0 reads ᾱ_prev = final_alpha_cumprod = 1


def next_in_sequence(timesteps: torch.Tensor) -> list[int]:
    return timesteps[1:].tolist() + [-1]


@pytest.mark.parametrize("S", [1, 3, 7, 10, 50, 200, 1000])
def test_ddim_prev_timestep_agrees_for_leading_and_dividing_trailing(S):
    for spacing in ("leading", "trailing"):
        timesteps = du.ddim_timesteps(T_TRAIN, S, spacing=spacing)
        theirs = [diffusers_prev(t, S) for t in timesteps.tolist()]
        if spacing == "leading" or T_TRAIN % S == 0:
            assert theirs == next_in_sequence(timesteps), (spacing, S)
        else:
            assert theirs != next_in_sequence(timesteps), (spacing, S)


def test_ddim_prev_timestep_differs_for_linspace():
    S = 50
    timesteps = du.ddim_timesteps(T_TRAIN, S, spacing="linspace")
    theirs = [diffusers_prev(t, S) for t in timesteps.tolist()]
    assert timesteps[:2].tolist() == [999, 979] and theirs[0] == 979
    assert theirs != next_in_sequence(timesteps)
    assert timesteps[-1] == 0 and theirs[-1] == -1


# ── DDIM: one step ──


def ddim_pair(sched, schedule, t: int, t_prev: int, *, eta: float, clip: bool, seed: int):
    """(ours, diffusers') x_prev for one DDIM step with the same inputs and noise z."""
    xt, model_eps, t_batch = step_inputs(schedule, t, seed=seed)
    z = same_noise(xt.shape, 300 + seed)
    theirs = sched.step(model_eps, t, xt, eta=eta, use_clipped_model_output=clip,
                        variance_noise=z).prev_sample
    eps = du._eps_with_clipped_x0(model_eps, xt, t_batch, schedule) if clip else model_eps
    ours = du.ddim_step(eps, xt, t_batch, torch.full_like(t_batch, t_prev), schedule,
                        eta=eta, noise=z)
    return ours, theirs, x0_leaves_range(xt, model_eps, t_batch, schedule)


def nearly_clean(sched, t_prev: int) -> bool:
    """ᾱ_prev > 0.99 at a real timestep (see test_ddim_step_with_eta_1_into_a_nearly_clean_...)."""
    return t_prev >= 0 and sched.alphas_cumprod[t_prev].item() > 0.99


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", du.SPACINGS)
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_step_matches(name, spacing, eta, clip):
    """DDIMScheduler.step with the noise injected (variance_noise=) against ddim_step at
    diffusers' t_prev, for S = 50 and 7: the first two, a middle and the last two timesteps.
    clip: clip_sample=True with use_clipped_model_output=True (ε re-derived from the clipped
    x̂₀, as the library's ddim_sample does through _eps_with_clipped_x0); diffusers' default
    use_clipped_model_output=False clips x̂₀ but keeps the raw ε in the direction term, which
    the library has no counterpart for."""
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    clipped_somewhere, compared = False, 0
    for S in (50, 7):
        sched = diffusers_ddim(name, S, spacing, clip=clip)
        visited = sched.timesteps.tolist()
        for k, t in enumerate(visited[:2] + visited[len(visited) // 2:][:1] + visited[-2:]):
            t_prev = diffusers_prev(t, S)
            ours, theirs, clipped = ddim_pair(sched, schedule, t, t_prev, eta=eta, clip=clip,
                                              seed=k)
            clipped_somewhere |= clipped
            compared += 1
            record(f"ddim_step, eta {eta:g}{', clip_x0' if clip else ''}", ours, theirs,
                   tol=step_tolerance(sched, t, t_prev))
    assert clipped_somewhere and compared >= 7


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_step_with_eta_1_into_a_nearly_clean_timestep(name):
    """η = 1 from t to a t_prev with ᾱ_prev > 0.99 (the last steps of a "leading" or
    "linspace" run go to t_prev = 0; ᾱ_0 = 0.9999 for the linear schedule). There
    1 - ᾱ_prev - σ² is tiny, and σ (from ᾱ_prev rounded to float32) and the direction term
    (from the stored sqrt(1 - ᾱ_prev)) must use one and the same 1 - ᾱ_prev, or the direction
    is off by ~3e-4: a version of ddim_step that mixed the two did."""
    eta = 1.0
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    for S, spacing in ((7, "leading"), (50, "leading"), (7, "trailing"), (1000, "trailing")):
        sched = diffusers_ddim(name, S, spacing, clip=True)
        for k, t in enumerate(sched.timesteps.tolist()[-3:]):
            t_prev = diffusers_prev(t, S)
            if nearly_clean(sched, t_prev):
                ours, theirs, _ = ddim_pair(sched, schedule, t, t_prev, eta=eta, clip=True,
                                            seed=k)
                record("ddim_step, eta 1, into ᾱ_prev > 0.99", ours, theirs,
                       tol=step_tolerance(sched, t, t_prev))


def test_ddim_step_with_eta_1_and_t_prev_t_minus_1_is_the_ddpm_step():
    """η = 1 and t_prev = t - 1: DDIM's σ_t is DDPM's posterior standard deviation, so
    DDIMScheduler.step and du.ddpm_step agree (DDIM, Song et al. 2021, eq. 16 and below)."""
    name = "linear"
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    sched = diffusers_ddim(name, T_TRAIN, "leading")             # S = T: t_prev = t - 1
    for t in (T_TRAIN - 1, 400, 100):
        xt, model_eps, t_batch = step_inputs(schedule, t, seed=t)
        z = same_noise(xt.shape, t)
        ddim_theirs = sched.step(model_eps, t, xt, eta=1.0, variance_noise=z).prev_sample
        ddpm_ours = du.ddpm_step(model_eps, xt, t_batch, schedule, noise=z)
        record("ddpm_step vs DDIMScheduler.step, eta 1, t_prev = t - 1", ddpm_ours, ddim_theirs,
               tol=step_tolerance(sched, t, t - 1))


# ── DDIM: whole runs of the sampling loop ──


def toy_model(schedule: du.NoiseSchedule):
    """A stand-in for a network: the ideal ε for data ~ N(0, I), sqrt(1 - ᾱ_t) x_t, plus a
    nonlinear error scaled by sqrt(ᾱ_t), so that x̂₀ stays bounded (|error in x̂₀| <= 0.05)."""
    alpha_bars = schedule.alpha_bars.double()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bars[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x + 0.05 * a.sqrt() * torch.sin(3 * x)
    return eps


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing,S", [("leading", 10), ("trailing", 50), ("trailing", 8)])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_sample_matches_a_diffusers_loop(name, spacing, S, clip, eta):
    """du.ddim_sample against set_timesteps + step, the same x_T, in float64, where diffusers'
    t - T // S is the next timestep of the sequence (leading; trailing with S dividing T).
    With η = 1 both draw z from one generator, one (B, ...) float64 draw per step in the same
    order, so the same seed gives the same noise."""
    schedule = du.NoiseSchedule.create(name, T_TRAIN)
    model = toy_model(schedule)
    sched = diffusers_ddim(name, S, spacing, clip=clip)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    g = torch.Generator().manual_seed(6)
    x, tol = x_T, TOL
    for t in sched.timesteps:
        tol = max(tol, step_tolerance(sched, int(t), diffusers_prev(int(t), S)))
        x = sched.step(model(x, t.expand(len(x))), t, x, eta=eta, use_clipped_model_output=clip,
                       generator=g).prev_sample
    for ours in du.ddim_sample(model, x_T.shape, schedule, num_steps=S, eta=eta,
                               spacing=spacing, x_T=x_T, clip_x0=clip, progress=False,
                               generator=torch.Generator().manual_seed(6)):
        pass
    record(f"ddim_sample vs diffusers loop, eta {eta:g}{', clip_x0' if clip else ''}", ours, x,
           tol=tol)


# ── the benchmark runs ──


def test_bench_samplers_quick_runs():
    """benchmarks/bench_samplers.py --quick: a few images and steps, every row printed."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(out):
        bench.main(["--quick", "--threads", "1"])
    text = out.getvalue()
    for row in ("real images", "DDIM, η = 0", "DDPM, ancestral", "diffusers loop, float32",
                "du.ddim_sample, float32", "largest |difference| between the two loops"):
        assert row in text, f"{row!r} missing from the output:\n{text}"
    assert time.perf_counter() - start < 60


# ── summary ──


def test_zz_summary_of_largest_differences():
    """Prints the largest difference of every comparison made in this run (``pytest -s``)."""
    if not LARGEST:
        pytest.skip("no comparison ran before this test")
    width = max(map(len, LARGEST))
    print(f"\n{'comparison with diffusers ' + diffusers.__version__:<{width}}  largest |diff|"
          f"  its tolerance")
    for name, (diff, tol) in LARGEST.items():
        print(f"{name:<{width}}  {diff:14.2e}  {tol:13.1e}")
    assert all(diff <= tol for diff, tol in LARGEST.values())
