"""Checks of lesson 07's exercises (latent diffusion: the VAE and its latents).

Each check compares the learner's function with the library's (``du.reparameterize``,
``du.gaussian_kl``, ``du.vae_loss``, ``du.latent_scale``) on latents shaped like images'
``(B, C, h, w)`` and like vectors ``(B, D)``, log-variances from the clamp's edges
(``du.LOGVAR_RANGE``) to moderate ones, and recomputes the usual mistakes in float64 to
name them. The sample, the KL and the loss must carry gradients to ``mean`` and ``logvar``
(the loss to the reconstruction too): that is what the reparameterisation is for. The
noise ε is an argument, so no check depends on how the learner's code draws random
numbers; every input is drawn from a generator of the check's own.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (call_explained, close, compare, exercise_check, expect_finite,
                    expect_result, fail, largest_difference, near, probe_device)


def _shape_crash(rule: str):
    """An ``explain`` for :func:`call_explained`: shapes that do not fit, or a dim that is not there."""
    def explain(err: Exception) -> str | None:
        text = str(err)
        if "size of tensor" in text or "broadcast" in text or "out of range" in text:
            return rule
        return None
    return explain


def _latents(g: torch.Generator, *shape, low: float, high: float):
    """``mean`` ~ 1.5 N(0, 1) and ``logvar`` uniform in [low, high], both of ``shape``."""
    mean = 1.5 * torch.randn(*shape, generator=g)
    logvar = torch.rand(*shape, generator=g) * (high - low) + low
    return mean, logvar


def _edges(g: torch.Generator, B: int, D: int):
    """``(B, D)`` latents whose log-variances alternate between du.LOGVAR_RANGE's edges."""
    mean = 1.5 * torch.randn(B, D, generator=g)
    low, high = du.LOGVAR_RANGE
    logvar = torch.tensor([low, high]).repeat(B * D // 2).reshape(B, D)
    return mean, logvar


def _check_gradients(fn, reference, arguments: dict[str, Tensor], leaves: tuple[str, ...],
                     what: str, *, why: str, rules: dict[str, str] | None = None,
                     **kwargs) -> None:
    """``fn(*arguments.values(), **kwargs)`` summed must carry the reference's gradients to
    each argument named in ``leaves`` (``rules`` say what each gradient is)."""
    rules = rules or {}

    def copies():
        return {name: value.clone().requires_grad_(name in leaves)
                for name, value in arguments.items()}

    ref = copies()
    reference(*ref.values(), **kwargs).sum().backward()         # the reference, before yours
    mine = copies()
    out = call_explained(fn, *mine.values(), names=tuple(mine), what=what, grad=True, **kwargs)
    if not isinstance(out, Tensor) or not out.requires_grad:
        fail(f"{what} has no gradient (requires_grad is False): something cut it from the "
             "graph — torch.no_grad(), .detach(), .data, .item(), .numpy() or "
             f"torch.tensor(value) — {why}")
    out.sum().backward()
    for name in leaves:
        leaf, expected = mine[name], ref[name].grad
        rule = f" ({rules[name]})" if name in rules else ""
        if leaf.grad is None:
            fail(f"{what}: {name} gets no gradient{rule} — something detaches it before the "
                 "result (.detach(), .data, torch.no_grad() around part of the computation, "
                 f"math.exp, float(...) or numpy); {why}")
        expect_finite(leaf.grad, what=f"the gradient with respect to {name}")
        if not close(leaf.grad, expected, atol=1e-5, rtol=1e-4):
            fail(f"{what}: the gradient with respect to {name}{rule} differs from the "
                 f"reference's ({largest_difference(leaf.grad, expected)}) although the value "
                 "matches — is part of the computation detached or made outside autograd?")


# ── Exercise 1 · Sampling a latent: the reparameterisation trick ─────────────────────

_Z_RULE = ("z = mean + exp(logvar / 2) · eps, where σ = exp(logvar / 2) is the square root of "
           "the variance exp(logvar)")


def _reparam_mistakes(mean: Tensor, logvar: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """The samples that the usual mistakes give (float64, then float32)."""
    m, lv, e = mean.double(), logvar.double(), eps.double()
    std = (0.5 * lv).exp()
    mistakes = {
        "σ = exp(logvar): the 1/2 is missing — exp(logvar) is the variance σ², and σ is its "
        "square root, exp(logvar / 2)": m + lv.exp() * e,
        "0.5 multiplies exp(logvar); it belongs inside the exponential: σ = exp(0.5 · logvar), "
        "the square root of exp(logvar)": m + 0.5 * lv.exp() * e,
        "logvar itself was used as σ: it is the logarithm of the variance, so σ = "
        "exp(logvar / 2)": m + lv * e,
        "0.5 · logvar was used as σ: that is log σ, so σ = exp(0.5 · logvar)": m + 0.5 * lv * e,
        "σ = sqrt(logvar): logvar is a logarithm (negative wherever the variance is below 1, "
        "hence the NaN), so σ = exp(logvar / 2)": m + lv.sqrt() * e,
        "the sign in the exponent is wrong: exp(−logvar / 2) is 1/σ; σ = exp(logvar / 2)":
            m + (-0.5 * lv).exp() * e,
        "the mean multiplies ε; it is added, and σ multiplies ε: " + _Z_RULE: m * e,
        "only the mean came back (that is the mode of q, its most likely latent): add the "
        "noise, " + _Z_RULE: m,
        "σ is missing: z = mean + σ · eps, not mean + eps; " + _Z_RULE: m + e,
        "eps is missing: σ multiplies the noise, " + _Z_RULE: m + std,
        "the mean is missing: " + _Z_RULE: std * e,
        "mean and logvar swapped places: the arguments come in the order (mean, logvar, eps)":
            lv + (0.5 * m).exp() * e,
        "mean and eps swapped places: the noise eps is what σ scales, " + _Z_RULE: e + std * m,
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _reparam_cases():
    """(mean, logvar, eps, description): image-like and vector latents, the clamp's edges."""
    g = torch.Generator().manual_seed(70)
    cases = [(*_latents(g, 3, 4, 4, 4, low=-4.0, high=2.0), "latents (3, 4, 4, 4), "
                                                             "logvar in [-4, 2]"),
             (*_latents(g, 5, 6, low=-3.0, high=3.0), "vectors (5, 6), logvar in [-3, 3]"),
             (*_edges(g, 2, 6), f"vectors (2, 6), logvar at the edges of du.LOGVAR_RANGE "
                                f"{du.LOGVAR_RANGE}")]
    return [(mean, logvar, torch.randn(mean.shape, generator=g), description)
            for mean, logvar, description in cases]


def _check_uses_eps(fn, mean: Tensor, logvar: Tensor, eps: Tensor, out: Tensor,
                    what: str) -> None:
    """z must be a deterministic function of the argument ``eps``."""
    names = ("mean", "logvar", "eps")
    again = call_explained(fn, mean.clone(), logvar.clone(), eps.clone(), names=names, what=what)
    if isinstance(again, Tensor) and again.shape == out.shape and not torch.equal(again, out):
        fail(f"{what}: two calls with the same eps gave different z — your code draws noise of "
             "its own (torch.randn_like?); use the argument eps as ε: the caller draws it, so "
             "that a sample can be repeated. " + _Z_RULE)
    other = torch.randn(eps.shape, generator=torch.Generator().manual_seed(71))
    moved = call_explained(fn, mean.clone(), logvar.clone(), other, names=names, what=what)
    if close(moved, out):
        fail(f"{what}: z stays the same when eps changes — use the argument eps as ε (no noise "
             "of your own, no fixed seed): " + _Z_RULE)


@exercise_check("Exercise 1 · Sampling a latent: the reparameterisation trick")
def check_reparameterize(fn) -> str:
    """Check ``reparameterize(mean, logvar, eps) -> Tensor``, shaped like ``mean``."""
    names = ("mean", "logvar", "eps")
    explain = _shape_crash("mean, logvar and eps have one shape: combine them element by "
                           "element, with no reshape, sum or indexing")
    for mean, logvar, eps, description in _reparam_cases():
        what = f"z ({description})"
        expected = du.reparameterize(mean, logvar, eps)          # the reference, before yours
        mistakes = _reparam_mistakes(mean, logvar, eps)
        out = call_explained(fn, mean.clone(), logvar.clone(), eps.clone(), names=names, what=what,
                   explain=explain)
        out = expect_result(out, mean.shape, mean.dtype, mistakes, what,
                             shape_hint="z has the shape of mean, logvar and eps: combine "
                                        "them element by element")
        if not close(out, expected) and not any(close(out, w) for w in mistakes.values()):
            _check_uses_eps(fn, mean, logvar, eps, out, what)
        compare(out, expected, mistakes, what=what, term_hint=_Z_RULE)
    mean, logvar, eps, description = _reparam_cases()[0]
    _check_gradients(fn, du.reparameterize, {"mean": mean, "logvar": logvar, "eps": eps},
                     ("mean", "logvar"), f"z ({description})", rules={"mean": "∂z/∂mean = 1",
                                                  "logvar": "∂z/∂logvar = σ · eps / 2"},
                     why="the encoder learns through the sample only if z keeps its "
                         "gradients to mean and logvar: that is the point of the trick")
    probe_device(fn, mean, logvar, eps, what="reparameterize")
    return ("z = mean + exp(logvar / 2) · eps for image-like and vector latents, logvar from "
            "-30 to 20, with ∂z/∂mean = 1 and ∂z/∂logvar = σ · eps / 2")


# ── Exercise 2 · The KL term ─────────────────────────────────────────────────────────

_KL_RULE = ("KL = 0.5 · Σ (mean² + exp(logvar) − 1 − logvar), summed over every dim but the "
            "batch's: per_dim.flatten(1).sum(1)")


def _kl_mistakes(mean: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    """The KLs (B,) that the usual mistakes give (float64, then float32)."""
    m, lv = mean.double().flatten(1), logvar.double().flatten(1)
    var, std = lv.exp(), (0.5 * lv).exp()
    right = m ** 2 + var - 1 - lv
    mistakes = {
        "the KL was averaged over each item's numbers; sum it: the KL of independent "
        "dimensions adds up. " + _KL_RULE: 0.5 * right.mean(1),
        "the factor 1/2 is missing: " + _KL_RULE: right.sum(1),
        "the sign of the logvar term is wrong (it is − logvar): " + _KL_RULE:
            0.5 * (m ** 2 + var - 1 + lv).sum(1),
        "σ = exp(logvar / 2) was used where the variance σ² = exp(logvar) belongs: " + _KL_RULE:
            0.5 * (m ** 2 + std - 1 - lv).sum(1),
        "σ and log σ were used where the variance σ² and its log belong (and logvar already is "
        "log σ²): " + _KL_RULE: 0.5 * (m ** 2 + std - 1 - 0.5 * lv).sum(1),
        "the −1 is missing (without it q = N(0, I) itself would be 0.5 per dimension away from "
        "the prior): " + _KL_RULE: 0.5 * (m ** 2 + var - lv).sum(1),
        "the mean is not squared: " + _KL_RULE: 0.5 * (m + var - 1 - lv).sum(1),
        "this is the other direction, KL(N(0, I) || q) = 0.5 · Σ ((1 + mean²) / σ² − 1 + "
        "log σ²); the VAE's term is KL(q || N(0, I)): " + _KL_RULE:
            0.5 * ((1 + m ** 2) * (-lv).exp() - 1 + lv).sum(1),
        "logvar was used as the variance (and log(logvar) as its log, NaN where logvar < 0): "
        "logvar is log σ², so σ² = exp(logvar). " + _KL_RULE:
            0.5 * (m ** 2 + lv - 1 - lv.log()).sum(1),
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _kl_cases():
    """(mean, logvar, description): image-like latents, the prior itself, vector latents, the
    clamp's edges, one item."""
    g = torch.Generator().manual_seed(72)
    mean, logvar = _latents(g, 3, 4, 4, 4, low=-3.0, high=2.0)
    logvar[0] = logvar[0].abs()     # log(logvar) is NaN in items 1 and 2 only, not everywhere
    return [
        (mean, logvar, "latents (3, 4, 4, 4), logvar in [-3, 2]"),
        (torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4),
         "mean 0 and logvar 0: q is N(0, I) itself, so the KL is 0"),
        (*_latents(g, 5, 6, low=-2.0, high=2.0), "vectors (5, 6), logvar in [-2, 2]"),
        (*_edges(g, 2, 6), f"vectors (2, 6), logvar at the edges of du.LOGVAR_RANGE "
                           f"{du.LOGVAR_RANGE}"),
        (*_latents(g, 1, 8, low=-1.0, high=1.0), "one item (1, 8)"),
    ]


def _kl_shape_hint(out, expected: Tensor) -> str | None:
    """A hint for a KL of the wrong shape; the whole batch's sum or mean named."""
    if not isinstance(out, Tensor):
        return None
    B = len(expected)
    if out.shape == ():
        if close(out, expected.sum()):
            return ("this is the KL summed over the batch too: return one KL per item, (B,) — "
                    "the loss averages them over the batch later")
        if close(out, expected.mean()):
            return ("this is the batch's mean KL: return one KL per item, (B,) — the loss "
                    "averages them over the batch later")
        return "one KL per item of the batch, (B,), not one number"
    if out.ndim > 1 and out.shape[0] == B:
        return ("sum over every dim but the first, whatever their number: "
                "per_dim.flatten(1).sum(1) (a sum over dim=1 alone leaves the others)")
    return f"one KL per item of the batch, (B,) = ({B},)"


@exercise_check("Exercise 2 · The KL term")
def check_gaussian_kl(fn) -> str:
    """Check ``gaussian_kl(mean, logvar) -> Tensor`` ``(B,)``."""
    names = ("mean", "logvar")
    explain = _shape_crash("sum over every dim but the first, whatever their number — the "
                           "latents may be (B, C, h, w) or (B, D): per_dim.flatten(1).sum(1)")
    for mean, logvar, description in _kl_cases():
        what = f"the KL ({description})"
        expected = du.gaussian_kl(mean, logvar)                  # the reference, before yours
        mistakes = _kl_mistakes(mean, logvar)
        out = call_explained(fn, mean.clone(), logvar.clone(), names=names, what=what, explain=explain)
        out = expect_result(out, expected.shape, mean.dtype, mistakes, what,
                             shape_hint=_kl_shape_hint(out, expected))
        if not close(out, expected) and not any(close(out, w) for w in mistakes.values()) \
                and bool((out < -1e-5).any()):
            i = int(out.argmin())
            fail(f"{what} is {float(out[i]):.4g} for item {i}: a KL divergence is never "
                 "negative — look at the signs of the terms. " + _KL_RULE)
        compare(out, expected, mistakes, what=what, term_hint=_KL_RULE)
    mean, logvar, description = _kl_cases()[0]
    _check_gradients(fn, du.gaussian_kl, {"mean": mean, "logvar": logvar},
                     ("mean", "logvar"), f"the KL ({description})",
                     rules={"mean": "∂KL/∂mean = mean",
                            "logvar": "∂KL/∂logvar = (exp(logvar) − 1) / 2"},
                     why="the KL is a term of the VAE's loss, which trains the encoder")
    probe_device(fn, mean, logvar, what="gaussian_kl")
    return ("KL(N(mean, exp(logvar)) || N(0, I)) per item, (B,): 0 for the prior itself, for "
            "image-like and vector latents, logvar from -30 to 20, with its gradients")


# ── Exercise 3 · The VAE's loss ──────────────────────────────────────────────────────

_LOSS_RULE = ("loss = mean over the batch of (Σ over each image's pixels of (reconstruction − "
              "x)² + kl_weight · KL): (reconstruction − x).pow(2).flatten(1).sum(1), plus "
              "kl_weight · gaussian_kl(mean, logvar), then .mean()")
_PER_IMAGE = ("the reference sums the squared error over each image's pixels, then averages "
              "over the batch: (reconstruction − x).pow(2).flatten(1).sum(1).mean(), or "
              "F.mse_loss(reconstruction, x, reduction='sum') / B")


def _loss_mistakes(reconstruction: Tensor, x: Tensor, mean: Tensor, logvar: Tensor,
                   kl_weight: float) -> dict[str, Tensor]:
    """The losses that the usual mistakes give (float64, then float32)."""
    diff = (reconstruction.double() - x.double()).flatten(1)
    m, lv = mean.double().flatten(1), logvar.double().flatten(1)
    per_dim = 0.5 * (m ** 2 + lv.exp() - 1 - lv)
    sq, kl, kl_dim = diff.pow(2).sum(1), per_dim.sum(1), per_dim.mean(1)
    w = kl_weight
    mistakes = {
        "F.mse_loss averages the squared error over every pixel; " + _PER_IMAGE:
            diff.pow(2).mean() + w * kl.mean(),
        "both terms are averaged per number (the squared error over the pixels, as F.mse_loss "
        "does, and the KL over the latent's dimensions); " + _PER_IMAGE + ", and the KL is "
        "summed over each item's latent dimensions (gaussian_kl)":
            diff.pow(2).mean() + w * kl_dim.mean(),
        "the KL is averaged over the latent's dimensions; sum it over them, as gaussian_kl "
        "does, then average over the batch": sq.mean() + w * kl_dim.mean(),
        "the KL is not weighted: add kl_weight · KL": (sq + kl).mean(),
        "the KL is weighted twice (kl_weight² · KL): add kl_weight · KL once":
            (sq + w * w * kl).mean(),
        "the KL is subtracted; it is a penalty, added: squared error + kl_weight · KL":
            (sq - w * kl).mean(),
        "kl_weight multiplies the reconstruction error; it weights the KL: squared error + "
        "kl_weight · KL": (w * sq + kl).mean(),
        "the loss is summed over the batch; average it (.mean()), so that its size does not "
        "grow with the batch": (sq + w * kl).sum(),
        "the squared error is summed over the batch (and the KL averaged): average both over "
        "the batch": sq.sum() + w * kl.mean(),
        "this is the absolute error (L1); the VAE's reconstruction term is the squared error, "
        "(reconstruction − x)²": (diff.abs().sum(1) + w * kl).mean(),
        "this is the norm of each image's error (the square root of its summed squares): use "
        "the summed squared error itself, with no square root": (sq.sqrt() + w * kl).mean(),
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _loss_cases():
    """(reconstruction, x, mean, logvar, kl_weight, description)."""
    g = torch.Generator().manual_seed(73)

    def case(B, C, H, latent_shape, kl_weight, description):
        x = torch.rand(B, C, H, H, generator=g) * 2 - 1
        reconstruction = x + 0.3 * torch.randn(B, C, H, H, generator=g)
        mean, logvar = _latents(g, B, *latent_shape, low=-3.0, high=1.0)
        return reconstruction, x, mean, logvar, kl_weight, description

    return [case(4, 3, 8, (4, 2, 2), 0.1, "4 images (3, 8, 8), latents (4, 2, 2), "
                                          "kl_weight = 0.1"),
            case(3, 3, 8, (4, 2, 2), 2.5, "3 images (3, 8, 8), kl_weight = 2.5"),
            case(2, 1, 4, (3,), 0.5, "2 images (1, 4, 4), vector latents (3,), "
                                     "kl_weight = 0.5"),
            case(3, 3, 8, (4, 2, 2), 0.0, "3 images (3, 8, 8), kl_weight = 0")]


def _loss_shape_hint(out, x: Tensor) -> str | None:
    if not isinstance(out, Tensor):
        return None
    if out.shape == (len(x),):
        return "one loss per image: average over the batch, .mean(), for one number"
    if out.shape == x.shape:
        return ("one value per pixel: sum the squared error over each image's pixels and "
                "average over the batch, for one number")
    return "the loss is one number, a tensor of shape ()"


def _loss_crash(err: Exception) -> str | None:
    text = str(err)
    if isinstance(err, TypeError) and "kl_weight" in text:
        return ("keep the signature vae_loss(reconstruction, x, mean, logvar, *, kl_weight), "
                "kl_weight a keyword argument")
    if "size of tensor" in text or "out of range" in text:
        return ("the squared error has the images' shape and the KL the latents': reduce each "
                "to one number per item, (B,), before adding them")
    return None


@exercise_check("Exercise 3 · The VAE's loss")
def check_vae_loss(fn) -> str:
    """Check ``vae_loss(reconstruction, x, mean, logvar, *, kl_weight) -> Tensor`` ``()``."""
    names = ("reconstruction", "x", "mean", "logvar")
    for reconstruction, x, mean, logvar, kl_weight, description in _loss_cases():
        what = f"the loss ({description})"
        expected = du.vae_loss(reconstruction, x, mean, logvar, kl_weight=kl_weight)
        mistakes = _loss_mistakes(reconstruction, x, mean, logvar, kl_weight)
        out = call_explained(fn, reconstruction.clone(), x.clone(), mean.clone(), logvar.clone(),
                   names=names, what=what, explain=_loss_crash, kl_weight=kl_weight)
        if isinstance(out, numbers.Number):
            fail(f"{what} is a Python {type(out).__name__}: return the loss as a tensor (no "
                 ".item()), so that it keeps its gradient and the VAE can be trained with it")
        out = expect_result(out, (), x.dtype, mistakes, what,
                             shape_hint=_loss_shape_hint(out, x))
        compare(out, expected, mistakes, what=what, term_hint=_LOSS_RULE)
    reconstruction, x, mean, logvar, kl_weight, description = _loss_cases()[0]
    _check_gradients(fn, du.vae_loss, {"reconstruction": reconstruction, "x": x, "mean": mean,
                                       "logvar": logvar},
                     ("reconstruction", "mean", "logvar"), f"the loss ({description})",
                     kl_weight=kl_weight,
                     why="the decoder and the encoder learn from this loss's gradients")
    probe_device(fn, reconstruction, x, mean, logvar, what="vae_loss", kl_weight=kl_weight)
    return ("per-image summed squared error + kl_weight · KL, averaged over the batch, "
            "with gradients to the reconstruction, mean and logvar")


# ── Exercise 4 · Scaling the latents ─────────────────────────────────────────────────

_SCALE_RULE = ("the factor is 1 / std of all the latents' numbers, around their mean: "
               "1 / latents.std(), so that latents · factor has unit variance")


def _scale_cases():
    """(latents, description): centred exactly, shifted per channel, one item of another
    scale, a small batch. The first two tell 1/std from 1/sqrt(mean(z²)), which ignores the
    mean: on exactly centred latents it is 1/std (the population's), on shifted ones not."""
    g = torch.Generator().manual_seed(74)
    centred = 3 * torch.randn(16, 4, 4, 4, generator=g)
    shifted = 2 * torch.randn(16, 4, 4, 4, generator=g) \
        + torch.tensor([5.0, -3.0, 1.0, 0.5]).reshape(1, 4, 1, 1)
    uneven = torch.randn(8, 4, 4, 4, generator=g) * torch.tensor([0.7, 1.2, 1.5, 0.9]
                                                                  ).reshape(1, 4, 1, 1)
    uneven[0] *= 0.25
    return [(centred - centred.mean(), "latents 3 · N(0, 1), (16, 4, 4, 4), centred"),
            (shifted, "latents 2 · N(0, 1) + a mean per channel, (16, 4, 4, 4)"),
            (uneven, "latents with a std per channel and one item 4 times smaller, (8, 4, 4, 4)"),
            (torch.randn(2, 4, 2, 2, generator=g) * 0.2 + 0.1, "a small batch (2, 4, 2, 2)")]


def _scale_mistakes(latents: Tensor) -> dict[str, float]:
    """The factors that the usual mistakes give."""
    z = latents.double()
    std = float(z.std())
    m = float(z.mean())
    return {
        "this is the std itself; the factor divides by it: " + _SCALE_RULE: std,
        "this is 1 / variance; the factor is 1 / std, the square root's reciprocal: "
        + _SCALE_RULE: 1 / std ** 2,
        "this is 1 / mean(|z|), the reciprocal of the mean absolute value; " + _SCALE_RULE:
            float(1 / z.abs().mean()),
        "this is 1 / max(|z|), the reciprocal of the largest absolute value; " + _SCALE_RULE:
            float(1 / z.abs().max()),
        "this is 1 / std of the first item only; use every item's numbers: " + _SCALE_RULE:
            float(1 / z[0].std()),
        "this is 1 / the mean of the per-channel stds; use one std over all the numbers: "
        + _SCALE_RULE: float(1 / z.std(dim=(0, 2, 3)).mean()),
        f"this is 1 / sqrt(mean(z²)), which ignores the latents' mean (here {m:.3g}): it is "
        "1/std only for latents centred on 0, and latents are not; " + _SCALE_RULE:
            float(1 / z.pow(2).mean().sqrt()),
    }


def _scale_value(out, latents: Tensor, what: str) -> float:
    """A Python number or a 0-dim tensor, finite, as a float; other shapes named."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, Tensor):
        if out.shape != ():
            B, C = latents.shape[:2]
            hint = ("one std per channel: use one std over all the numbers, latents.std()"
                    if out.shape == (C,) else
                    "one std per item: use one std over all the numbers, latents.std()"
                    if out.shape == (B,) else "one number for all the latents")
            fail(f"{what} should be one number (a float, or a tensor of shape ()), got a "
                 f"tensor of shape {tuple(out.shape)} — {hint}")
        expect_finite(out, what=what)
        return float(out)
    if isinstance(out, bool) or not isinstance(out, numbers.Real):
        fail(f"{what} should be a Python float (or a tensor of shape ()), got "
             f"{type(out).__name__}")
    if not math.isfinite(float(out)):
        fail(f"{what} is {out}: something divided by zero (is the std 0?) or diverged")
    return float(out)


def _number_dropped(fn):
    """``fn`` returning nothing: the device probe then looks only for tensors that meet on
    two devices inside it (a 0-dim tensor on the CPU is a fine number to return)."""
    def latent_scale(latents):
        with warnings.catch_warnings():    # e.g. numpy dividing by the zeros `meta` reads as
            warnings.simplefilter("ignore")
            fn(latents)
    return latent_scale


@exercise_check("Exercise 4 · Scaling the latents")
def check_latent_scale(fn) -> str:
    """Check ``latent_scale(latents) -> float``.

    The answer may be a Python float (like the reference's) or a tensor of shape (); the
    std may be the sample's (``torch.std``, dividing by n − 1) or the population's (dividing
    by n): a scale factor measured on thousands of numbers does not tell them apart. The
    std is taken around the latents' mean, so 1 / sqrt(mean(z²)), which passes on exactly
    centred latents, fails on the shifted ones with a hint naming the mean it ignored.
    """
    for latents, description in _scale_cases():
        what = f"latent_scale ({description})"
        expected = du.latent_scale(latents)                      # the reference, before yours
        population = float(1 / latents.double().std(correction=0))
        mistakes = _scale_mistakes(latents)
        out = call_explained(fn, latents.clone(), names=("latents",), what=what)
        value = _scale_value(out, latents, what)
        if near(value, expected, rtol=1e-4) or near(value, population, rtol=1e-4):
            continue
        for hint, wrong in mistakes.items():
            if near(value, wrong, rtol=1e-4):
                fail(f"{what} is {value:.5g}, not {expected:.5g}: {hint}")
        fail(f"{what} is {value:.5g}, expected {expected:.5g} (1 / std = 1 / {1 / expected:.4g}): "
             + _SCALE_RULE)
    latents, _ = _scale_cases()[1]
    probe_device(_number_dropped(fn), latents, what="latent_scale")
    return ("1 / std of all the latents' numbers around their mean, centred or not, whatever "
            "the spread of channels and items")
