"""Tests of lesson 07's exercise checks: the reference passes, a stub is "not attempted", right
versions written in other forms pass, and each planted mistake (the ones learners make, an
input changed in place, a tensor made on the CPU, a NaN) fails with a hint that names it."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du

from check_helpers import DEVICE, GENERIC, IN_PLACE, NAN, table_tests  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = {
    "reparameterize": (dc.check_reparameterize, du.reparameterize),
    "gaussian_kl": (dc.check_gaussian_kl, du.gaussian_kl),
    "vae_loss": (dc.check_vae_loss, du.vae_loss),
    "latent_scale": (dc.check_latent_scale, du.latent_scale),
}
NO_GRADIENT = "has no gradient (requires_grad is False)"


# -- reparameterize --


def z_mul_exp(mean, logvar, eps):
    return mean + logvar.mul(0.5).exp() * eps


def z_addcmul(mean, logvar, eps):
    return torch.addcmul(mean, torch.exp(logvar / 2), eps)


def z_sqrt_of_variance(mean, logvar, eps):
    return mean + torch.sqrt(torch.exp(logvar)) * eps


def z_float64(mean, logvar, eps):
    std = torch.exp(0.5 * logvar.double())
    return (mean.double() + std * eps.double()).to(mean.dtype)


def make_z(std=lambda logvar: torch.exp(0.5 * logvar), combine=lambda m, s, e: m + s * e):
    """A learner's reparameterize: ``combine(mean, std(logvar), eps)``."""

    def reparameterize(mean, logvar, eps):
        return combine(mean, std(logvar), eps)

    return reparameterize


def z_own_noise(mean, logvar, eps):
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def z_fixed_seed_noise(mean, logvar, eps):
    g = torch.Generator(device=mean.device).manual_seed(0)
    noise = torch.randn(mean.shape, generator=g, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def z_in_place(mean, logvar, eps):
    return mean.add_(torch.exp(0.5 * logvar) * eps)


def z_eps_in_place(mean, logvar, eps):
    return mean + eps.mul_(torch.exp(0.5 * logvar))


@torch.no_grad()
def z_no_grad(mean, logvar, eps):
    return mean + torch.exp(0.5 * logvar) * eps


def z_cpu_half(mean, logvar, eps):
    return mean + torch.exp(torch.full(logvar.shape, 0.5) * logvar) * eps


Z_RIGHT = [("mul_exp", z_mul_exp), ("addcmul", z_addcmul), ("sqrt_exp", z_sqrt_of_variance),
           ("float64", z_float64), ("notebook_like", make_z())]
Z_MISTAKES = [
    ("exp_without_half", make_z(std=torch.exp), "the 1/2 is missing"),
    ("half_outside", make_z(std=lambda lv: 0.5 * lv.exp()), "0.5 multiplies exp(logvar)"),
    ("logvar_as_std", make_z(std=lambda lv: lv), "logvar itself was used as σ"),
    ("half_logvar_as_std", make_z(std=lambda lv: 0.5 * lv), "0.5 · logvar was used as σ"),
    ("sqrt_logvar", make_z(std=torch.sqrt), "σ = sqrt(logvar)"),
    ("minus_exponent", make_z(std=lambda lv: torch.exp(-0.5 * lv)),
     "the sign in the exponent is wrong"),
    ("mean_times_eps", make_z(combine=lambda m, s, e: m * e), "the mean multiplies ε"),
    ("mean_only", make_z(combine=lambda m, s, e: m), "only the mean came back"),
    ("no_std", make_z(combine=lambda m, s, e: m + e), "σ is missing"),
    ("no_eps", make_z(combine=lambda m, s, e: m + s), "eps is missing"),
    ("no_mean", make_z(combine=lambda m, s, e: s * e), "the mean is missing"),
    ("mean_logvar_swapped", lambda mean, logvar, eps: du.reparameterize(logvar, mean, eps),
     "mean and logvar swapped places"),
    ("own_noise", z_own_noise, "your code draws noise of its own"),
    ("fixed_seed_noise", z_fixed_seed_noise, "z stays the same when eps changes"),
    ("broadcast", make_z(combine=lambda m, s, e: m.unsqueeze(1) + s * e),
     "z has the shape of mean, logvar and eps"),
    ("flattened_eps", make_z(combine=lambda m, s, e: m + s * e.flatten(1)),
     "combine them element by element"),
    ("in_place", z_in_place, f"input `mean` {IN_PLACE}"),
    ("eps_in_place", z_eps_in_place, f"input `eps` {IN_PLACE}"),
    ("no_grad", z_no_grad, NO_GRADIENT),
    ("detached", lambda *args: du.reparameterize(*args).detach(), NO_GRADIENT),
    ("logvar_detached", lambda m, lv, e: du.reparameterize(m, lv.detach(), e),
     "logvar gets no gradient (∂z/∂logvar = σ · eps / 2)"),
    ("mean_detached", lambda m, lv, e: du.reparameterize(m.detach(), lv, e),
     "mean gets no gradient (∂z/∂mean = 1)"),
    ("cpu_half", z_cpu_half, DEVICE),
    ("nan", lambda *args: du.reparameterize(*args) / 0 * 0, NAN),
    ("float64_result", lambda *args: du.reparameterize(*args).double(),
     "should have dtype torch.float32"),
    ("off_by_a_little", lambda *args: du.reparameterize(*args) + 0.01,
     f"{GENERIC} (largest difference 0.01"),
    ("no_return", lambda *args: None, "forget the `return`"),
]


# -- gaussian_kl --


def kl_distributions(mean, logvar):
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    return torch.distributions.kl_divergence(q, prior).flatten(1).sum(1)


def kl_loop(mean, logvar):
    items = []
    for m, lv in zip(mean, logvar):
        items.append(0.5 * torch.sum(m * m + lv.exp() - 1 - lv))
    return torch.stack(items)


def kl_float64(mean, logvar):
    m, lv = mean.double(), logvar.double()
    kl = -0.5 * (1 + lv - m.pow(2) - lv.exp()).reshape(len(m), -1).sum(-1)
    return kl.to(mean.dtype)


def kl_std_squared(mean, logvar):
    std = torch.exp(0.5 * logvar)
    return 0.5 * (mean ** 2 + std ** 2 - 1 - torch.log(std ** 2)).flatten(1).sum(1)


def make_kl(per_dim=lambda m, lv: m ** 2 + lv.exp() - 1 - lv, half=0.5,
            reduce=lambda x: x.flatten(1).sum(1)):
    """A learner's gaussian_kl: ``half * reduce(per_dim(mean, logvar))``."""

    def gaussian_kl(mean, logvar):
        return half * reduce(per_dim(mean, logvar))

    return gaussian_kl


def kl_in_place(mean, logvar):
    per_dim = mean.pow_(2) + logvar.exp() - 1 - logvar
    return 0.5 * per_dim.flatten(1).sum(1)


def kl_cpu_loop(mean, logvar):
    out = torch.zeros(len(mean))
    for i in range(len(mean)):
        out[i] = 0.5 * (mean[i] ** 2 + logvar[i].exp() - 1 - logvar[i]).sum()
    return out


KL_RIGHT = [("distributions", kl_distributions), ("loop", kl_loop), ("float64", kl_float64),
            ("std_squared", kl_std_squared), ("notebook_like", make_kl())]
KL_MISTAKES = [
    ("mean_over_dims", make_kl(reduce=lambda x: x.flatten(1).mean(1)),
     "the KL was averaged over each item's numbers; sum it"),
    ("no_half", make_kl(half=1.0), "the factor 1/2 is missing"),
    ("logvar_sign", make_kl(per_dim=lambda m, lv: m ** 2 + lv.exp() - 1 + lv),
     "the sign of the logvar term is wrong"),
    ("std_for_var", make_kl(per_dim=lambda m, lv: m ** 2 + (lv / 2).exp() - 1 - lv),
     "σ = exp(logvar / 2) was used where the variance σ² = exp(logvar) belongs"),
    ("std_and_log_std", make_kl(per_dim=lambda m, lv: m ** 2 + (lv / 2).exp() - 1 - lv / 2),
     "σ and log σ were used where the variance σ² and its log belong"),
    ("no_minus_one", make_kl(per_dim=lambda m, lv: m ** 2 + lv.exp() - lv),
     "the −1 is missing"),
    ("mean_not_squared", make_kl(per_dim=lambda m, lv: m + lv.exp() - 1 - lv),
     "the mean is not squared"),
    ("reversed", make_kl(per_dim=lambda m, lv: (1 + m ** 2) * (-lv).exp() - 1 + lv),
     "this is the other direction, KL(N(0, I) || q)"),
    ("logvar_as_variance", make_kl(per_dim=lambda m, lv: m ** 2 + lv - 1 - lv.log()),
     "logvar was used as the variance"),
    ("summed_over_batch", make_kl(reduce=lambda x: x.sum()),
     "this is the KL summed over the batch too"),
    ("mean_of_batch", make_kl(reduce=lambda x: x.flatten(1).sum(1).mean()),
     "this is the batch's mean KL"),
    ("sum_over_dim_1", make_kl(reduce=lambda x: x.sum(1)), "a sum over dim=1 alone leaves"),
    ("sum_over_dims_123", make_kl(reduce=lambda x: x.sum(dim=(1, 2, 3))),
     "the latents may be (B, C, h, w) or (B, D)"),
    ("negated", make_kl(half=-0.5), "a KL divergence is never negative"),
    ("in_place", kl_in_place, f"input `mean` {IN_PLACE}"),
    ("detached", lambda m, lv: du.gaussian_kl(m, lv).detach(), NO_GRADIENT),
    ("logvar_detached", lambda m, lv: du.gaussian_kl(m, lv.detach()),
     "logvar gets no gradient"),
    ("cpu_loop", kl_cpu_loop, DEVICE),
    ("nan", lambda m, lv: du.gaussian_kl(m, lv) / 0 * 0, NAN),
    ("float64_result", lambda m, lv: du.gaussian_kl(m, lv).double(),
     "should have dtype torch.float32"),
    ("off_by_a_little", lambda m, lv: du.gaussian_kl(m, lv) + 0.01,
     f"{GENERIC} (largest difference 0.01"),
    ("no_return", lambda m, lv: None, "forget the `return`"),
]


# -- vae_loss --


def loss_mse_sum(reconstruction, x, mean, logvar, *, kl_weight):
    B = x.shape[0]
    return F.mse_loss(reconstruction, x, reduction="sum") / B \
        + kl_weight * du.gaussian_kl(mean, logvar).mean()


def loss_loop(reconstruction, x, mean, logvar, *, kl_weight):
    total = 0.0
    for r, xi, m, lv in zip(reconstruction, x, mean, logvar):
        kl = 0.5 * (m ** 2 + lv.exp() - 1 - lv).sum()
        total = total + ((r - xi) ** 2).sum() + kl_weight * kl
    return total / len(x)


def loss_float64(reconstruction, x, mean, logvar, *, kl_weight):
    squared_error = (reconstruction.double() - x.double()).square().sum() / len(x)
    kl = -0.5 * (1 + logvar.double() - mean.double() ** 2 - logvar.double().exp()).sum() / len(x)
    return (squared_error + kl_weight * kl).float()


def make_loss(*, error="squared", per="image", batch="mean", kl="sum", weight="kl"):
    """A learner's vae_loss with one knob turned."""

    def vae_loss(reconstruction, x, mean, logvar, *, kl_weight):
        diff = (reconstruction - x).flatten(1)
        err = {"squared": diff.pow(2), "l1": diff.abs()}[error]
        err = err.sum(1) if per == "image" else err.mean(1)
        per_dim = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1)
        k = per_dim.sum(1) if kl == "sum" else per_dim.mean(1)
        if weight == "kl":
            loss = err + kl_weight * k
        elif weight == "none":
            loss = err + k
        elif weight == "twice":
            loss = err + kl_weight * kl_weight * k
        elif weight == "subtracted":
            loss = err - kl_weight * k
        else:                                            # "reconstruction"
            loss = kl_weight * err + k
        return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[batch]()

    return vae_loss


def loss_norm(reconstruction, x, mean, logvar, *, kl_weight):
    error = (reconstruction - x).flatten(1).norm(dim=1)
    return (error + kl_weight * du.gaussian_kl(mean, logvar)).mean()


def loss_reconstruction_summed_over_batch(reconstruction, x, mean, logvar, *, kl_weight):
    return ((reconstruction - x) ** 2).sum() + kl_weight * du.gaussian_kl(mean, logvar).mean()


def loss_no_kl_weight(reconstruction, x, mean, logvar):
    return du.vae_loss(reconstruction, x, mean, logvar, kl_weight=0.1)


def loss_in_place(reconstruction, x, mean, logvar, *, kl_weight):
    reconstruction.clamp_(-1, 1)
    return du.vae_loss(reconstruction, x, mean, logvar, kl_weight=kl_weight)


def loss_cpu_weights(reconstruction, x, mean, logvar, *, kl_weight):
    weights = torch.full((len(x),), kl_weight)
    squared_error = (reconstruction - x).pow(2).flatten(1).sum(1)
    return (squared_error + weights * du.gaussian_kl(mean, logvar)).mean()


def loss_logvar_detached(reconstruction, x, mean, logvar, *, kl_weight):
    return du.vae_loss(reconstruction, x, mean, logvar.detach(), kl_weight=kl_weight)


LOSS_RIGHT = [("mse_sum", loss_mse_sum), ("loop", loss_loop), ("float64", loss_float64),
              ("notebook_like", make_loss())]
LOSS_MISTAKES = [
    ("mse_mean", lambda r, x, m, lv, *, kl_weight: F.mse_loss(r, x)
     + kl_weight * du.gaussian_kl(m, lv).mean(),
     "the reference sums the squared error over each image's pixels, then averages over the "
     "batch"),
    ("both_per_number", make_loss(per="pixel", kl="mean"), "both terms are averaged per number"),
    ("kl_per_dimension", make_loss(kl="mean"), "the KL is averaged over the latent's dimensions"),
    ("kl_not_weighted", make_loss(weight="none"), "the KL is not weighted"),
    ("kl_weighted_twice", make_loss(weight="twice"), "the KL is weighted twice"),
    ("kl_subtracted", make_loss(weight="subtracted"), "the KL is subtracted"),
    ("weight_on_reconstruction", make_loss(weight="reconstruction"),
     "kl_weight multiplies the reconstruction error"),
    ("summed_over_batch", make_loss(batch="sum"), "the loss is summed over the batch"),
    ("reconstruction_summed_over_batch", loss_reconstruction_summed_over_batch,
     "the squared error is summed over the batch"),
    ("l1", make_loss(error="l1"), "this is the absolute error (L1)"),
    ("norm", loss_norm, "this is the norm of each image's error"),
    ("per_image", make_loss(batch="none"), "average over the batch, .mean()"),
    ("item", lambda *args, **kwargs: du.vae_loss(*args, **kwargs).item(), "is a Python float"),
    ("detached", lambda *args, **kwargs: du.vae_loss(*args, **kwargs).detach(), NO_GRADIENT),
    ("logvar_detached", loss_logvar_detached, "logvar gets no gradient"),
    ("no_kl_weight_argument", loss_no_kl_weight, "keep the signature vae_loss(reconstruction"),
    ("in_place", loss_in_place, f"input `reconstruction` {IN_PLACE}"),
    ("cpu_weights", loss_cpu_weights, DEVICE),
    ("nan", lambda *args, **kwargs: du.vae_loss(*args, **kwargs) / 0 * 0, NAN),
    ("float64_result", lambda *args, **kwargs: du.vae_loss(*args, **kwargs).double(),
     "should have dtype torch.float32"),
    ("off_by_a_little", lambda *args, **kwargs: du.vae_loss(*args, **kwargs) + 0.01,
     f"{GENERIC} (largest difference 0.01"),
    ("no_return", lambda *args, **kwargs: None, "forget the `return`"),
]


# -- latent_scale --


def scale_tensor(latents):
    return 1 / latents.std()


def scale_rsqrt(latents):
    return float(latents.double().var().rsqrt())


def scale_numpy_population(latents):
    return 1.0 / np.std(latents.detach().cpu().numpy())


def scale_by_hand(latents):
    centred = latents - latents.mean()
    return (centred.pow(2).sum() / (latents.numel() - 1)).rsqrt().item()


def scale_in_place(latents):
    latents.sub_(latents.mean())
    return du.latent_scale(latents)


def scale_cpu_centre(latents):
    centre = torch.full(latents.shape, float(latents.mean()))
    return float(1 / (latents - centre).std())


SCALE_RIGHT = [("tensor", scale_tensor), ("rsqrt_float64", scale_rsqrt),
               ("numpy_population", scale_numpy_population), ("by_hand", scale_by_hand)]
SCALE_MISTAKES = [
    ("std", lambda z: z.std().item(), "this is the std itself"),
    ("std_tensor", lambda z: z.std(), "this is the std itself"),
    ("one_over_var", lambda z: 1 / z.var().item(), "this is 1 / variance"),
    ("one_over_mean_abs", lambda z: 1 / z.abs().mean().item(), "this is 1 / mean(|z|)"),
    ("one_over_abs_max", lambda z: 1 / z.abs().max().item(), "this is 1 / max(|z|)"),
    ("first_item", lambda z: 1 / z[0].std().item(), "this is 1 / std of the first item only"),
    ("mean_of_channel_stds", lambda z: 1 / z.std(dim=(0, 2, 3)).mean().item(),
     "this is 1 / the mean of the per-channel stds"),
    ("ignores_the_mean", lambda z: 1 / z.pow(2).mean().sqrt().item(),
     "this is 1 / sqrt(mean(z²)), which ignores the latents' mean"),
    ("per_channel", lambda z: 1 / z.std(dim=(0, 2, 3)), "one std per channel"),
    ("per_item", lambda z: 1 / z.flatten(1).std(1), "one std per item"),
    ("list", lambda z: [1 / z.std().item()], "should be a Python float"),
    ("divided_by_zero", lambda z: float(1 / (z - z).std()), "something divided by zero"),
    ("in_place", scale_in_place, f"input `latents` {IN_PLACE}"),
    ("cpu_centre", scale_cpu_centre, DEVICE),
    ("nan", lambda z: z.std() / 0 * 0, NAN),
    ("off_by_a_little", lambda z: du.latent_scale(z) * 1.01, "expected 0.33"),
    ("no_return", lambda z: None, "forget the `return`"),
]

RIGHT = {"reparameterize": Z_RIGHT, "gaussian_kl": KL_RIGHT, "vae_loss": LOSS_RIGHT,
         "latent_scale": SCALE_RIGHT}
MISTAKES = {"reparameterize": Z_MISTAKES, "gaussian_kl": KL_MISTAKES,
            "vae_loss": LOSS_MISTAKES, "latent_scale": SCALE_MISTAKES}


# -- the tests --


(test_reference_passes, test_stub_is_not_attempted, test_right_versions_in_other_forms_pass,
 test_planted_mistakes_fail_with_their_hint) = table_tests(CHECKS, RIGHT, MISTAKES)


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _ in CHECKS.values()] == [
        "Exercise 1 · Sampling a latent: the reparameterisation trick",
        "Exercise 2 · The KL term",
        "Exercise 3 · The VAE's loss",
        "Exercise 4 · Scaling the latents"]


def test_every_check_has_device_return_in_place_and_nan_mistakes_and_other_right_forms():
    for name in CHECKS:
        hints = [hint for _, _, hint in MISTAKES[name]]
        assert DEVICE in hints
        assert NAN in hints
        assert "forget the `return`" in hints
        assert any(IN_PLACE in hint for hint in hints)
        assert len(RIGHT[name]) >= 3


@pytest.mark.parametrize("name", CHECKS)
def test_the_check_leaves_the_notebooks_random_numbers_alone(name):
    check, reference = CHECKS[name]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check(reference)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", CHECKS)
def test_a_right_answer_that_draws_random_numbers_still_passes(name, capsys):
    """Checks never depend on the learner's code drawing (or not drawing) random numbers."""
    check, reference = CHECKS[name]

    def draws_first(*args, **kwargs):
        torch.rand(7)
        return reference(*args, **kwargs)

    assert check(draws_first) is True


def test_a_sample_drawn_inside_is_named_even_when_its_draws_look_right():
    """z = mean + σ · randn_like(mean) has the right distribution, but not the given eps."""
    with pytest.raises(AssertionError, match="use the argument eps as ε"):
        dc.check_reparameterize(z_own_noise)


def test_the_kl_of_the_prior_itself_is_zero_and_a_kl_is_never_negative():
    """The properties the KL check relies on, on the reference."""
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(du.gaussian_kl(zeros, zeros), torch.zeros(2))
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
    assert (du.gaussian_kl(mean, logvar) >= 0).all()


def test_ignoring_the_mean_passes_on_centred_latents_and_fails_on_shifted_ones():
    """1 / sqrt(mean(z²)) is the population's 1/std when the mean is 0: the check's centred
    case accepts it, its shifted case names the mistake."""
    def rms(z):
        return 1 / z.pow(2).mean().sqrt().item()

    centred = 3 * torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    centred = centred - centred.mean()
    assert math.isclose(rms(centred), 1 / centred.double().std(correction=0).item(),
                        rel_tol=1e-5)
    with pytest.raises(AssertionError) as err:
        dc.check_latent_scale(rms)
    assert "a mean per channel" in str(err.value)
    assert "ignores the latents' mean" in str(err.value)
