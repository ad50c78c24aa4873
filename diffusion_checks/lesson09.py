"""Checks of lesson 09's exercises (guidance from outside the denoiser).

Each check compares the learner's function with the library's
(``du.classifier_log_prob_grad``, ``du.guided_eps``, ``du.clip_guided_eps``) on several
batches and timesteps, the first and last ones included, and recomputes the usual mistakes
to name them. The classifier and the CLIP model are small fresh ones with fixed weights
(no checkpoint, well under a second on a CPU); nothing here draws random numbers in the
learner's code or replays a seed.

The gradients must also come out right where the samplers call them, inside
``torch.no_grad()``, and leave no trace behind: no ``requires_grad`` set on the caller's
tensors, no ``.grad`` piled up in the model's parameters. A result that still carries a
graph (``create_graph=True``) is accepted when its values are right: the sampler detaches
what the guide returns; the pass line suggests ``.detach()`` all the same.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, same_values, snapshot, to_device, yours_if_passed)


# ── 09 · Guidance from outside the denoiser ──────────────────────────────────────────

_NO_GRAD_HINT = ("the samplers run inside torch.no_grad(), where no graph is recorded, so "
                 "there is nothing to take a gradient of: wrap the forward pass and the "
                 "gradient in `with torch.enable_grad():` (as du.{name} does)")
# How to take the gradient without touching the caller's tensors, per exercise
_LEAF = {"classifier_log_prob_grad": "the gradient w.r.t. a copy of x_t, "
                                     "`x = xt.detach().requires_grad_(True)`, run the classifier "
                                     "on x and ask torch.autograd.grad for ∂/∂x",
         "clip_guided_eps": "the gradient w.r.t. the clipped x̂_0 itself, "
                            "`x0 = x0_hat.clamp(-1, 1).detach().requires_grad_(True)`, run CLIP "
                            "on x0 and ask torch.autograd.grad for ∂/∂x0"}


@contextlib.contextmanager
def _fixed_seed(seed: int):
    """Build a model with fixed weights without touching the learner's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _small_classifier() -> du.NoisyClassifier:
    """A fresh noise-aware classifier, ``(xt, t) -> {attribute: logits (B, 6)}``, whose heads
    are scaled up so that its classes have clearly different probabilities."""
    with _fixed_seed(90):
        classifier = du.NoisyClassifier(width=8)
    with torch.no_grad():
        for head in classifier.heads.values():
            head.weight.mul_(6.0)
    return classifier.eval()


def _small_clip() -> du.CLIP:
    with _fixed_seed(91):
        clip = du.CLIP(du.ClipConfig(vision_width=32, text_width=32, embed_dim=32,
                                     vision_layers=1, text_layers=1))
    return clip.eval()


def _call_09(fn, *args, names: tuple[str, ...], what: str, name: str, no_grad: bool = False,
             index_hint: str | None = None, **kwargs):
    """:func:`call_pure` (inside ``torch.no_grad()`` when ``no_grad``), turning the crashes
    typical of this lesson into hints. ``name``: the library function, for the hints."""
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            return call_pure(fn, *args, names=names, **kwargs)
    except IndexError as err:
        if index_hint is None:
            raise
        fail(f"{what}: indexing failed ({err}) — {index_hint}")
    except ValueError as err:
        if index_hint is None or "timesteps t must lie in" not in str(err):
            raise
        fail(f"{what}: du.extract refused a timestep ({err}) — {index_hint}")
    except RuntimeError as err:
        text = str(err)
        if "does not require grad" in text:
            if no_grad:
                fail(f"{what}, called inside torch.no_grad(): " + _NO_GRAD_HINT.format(name=name)
                     + f" (PyTorch said: {text.splitlines()[0]})")
            leaf = _LEAF.get(name, "the gradient w.r.t. a copy, `x.detach().requires_grad_(True)`")
            fail(f"{what}: a gradient needs a tensor that requires it: take {leaf} "
                 f"(PyTorch said: {text.splitlines()[0]})")
        if "size of tensor" in text or "broadcast" in text:
            fail(f"{what}: shapes do not fit ({text.splitlines()[0]}) — {BROADCAST_HINT}")
        raise


def _expect_nothing_left(what: str, name: str, module: nn.Module, module_name: str,
                         tensors: dict[str, Tensor]) -> None:
    """No ``requires_grad`` or ``.grad`` on the caller's tensors, no ``.grad`` on the model
    (``name``: the library function, for the hints)."""
    for arg, tensor in tensors.items():
        if tensor.grad is not None:
            fail(f"{what}: `.backward()` left a gradient in the caller's `{arg}.grad` (and "
                 f"set `{arg}.requires_grad`): leave the caller's tensors as they were and take "
                 + _LEAF[name])
        if tensor.requires_grad:
            fail(f"{what}: your code set `requires_grad` on the caller's `{arg}` (e.g. "
                 f"`{arg}.requires_grad_()`), which changes the caller's tensor: take "
                 + _LEAF[name])
    grads = [p_name for p_name, p in module.named_parameters() if p.grad is not None]
    if grads:
        fail(f"{what}: your code left gradients in the {module_name}'s parameters (`.grad` is "
             f"set on {len(grads)} of them, e.g. `{grads[0]}`), as `.backward()` does: they "
             "pile up over the sampling steps. Use `torch.autograd.grad(objective, x)`, which "
             "returns the gradient w.r.t. x alone and leaves the parameters' .grad untouched")


def _attached_note(attached: bool) -> str:
    return (" (your result still carries its graph: its values are right, but `.detach()` "
            "it, or leave create_graph off, so that a sampler keeps no graph in memory)"
            if attached else "")


# ── Exercise 1 · The classifier's pull: the gradient of log p(y | x_t) ─────────────


def _grad_of(classifier, xt: Tensor, t: Tensor, objective) -> Tensor:
    """∇_{x_t} objective(logits), a scalar objective of the classifier's logits."""
    with torch.enable_grad():
        x = xt.detach().clone().requires_grad_(True)
        return torch.autograd.grad(objective(classifier(x, t)), x)[0].detach()


def _log_prob_mistakes(classifier, xt: Tensor, t: Tensor, y: Tensor, attribute: str
                       ) -> dict[str, Tensor]:
    """The gradients that the usual mistakes give."""
    rows = torch.arange(len(y))
    v = functools.partial(_grad_of, classifier, xt, t)

    def lp(logits, head=attribute):
        return logits[head].float().log_softmax(dim=-1)   # (B, K)

    mistakes = {
        "this is the gradient of the logit z_y, not of log p(y | x_t): take the log-softmax "
        "first, log p(y | x_t) = z_y − log Σ_k exp z_k (logits.log_softmax(dim=-1))":
            v(lambda o: o[attribute][rows, y].sum()),
        "this is the gradient of the probability p(y | x_t) (softmax), not of its log: "
        "use logits.log_softmax(dim=-1) — the log is what Bayes' rule adds to the score":
            v(lambda o: o[attribute].softmax(dim=-1)[rows, y].sum()),
        "this is the gradient of the batch's mean log-probability: each sample's gradient comes "
        "out B times too small. Sum over the batch (the samples do not interact, so the "
        "gradient of the sum is every sample's own)": v(lambda o: lp(o)[rows, y].mean()),
        "the sign is wrong: this points away from class y (the gradient of −log p, a loss such "
        "as F.cross_entropy or F.nll_loss); the pull towards y is +∇ log p(y | x_t)":
            v(lambda o: -lp(o)[rows, y].sum()),
        "this is the gradient of F.cross_entropy(logits, y): the loss is −log p(y | x_t) "
        "(flip the sign) and its default reduction='mean' divides every sample's gradient by "
        "B (sum instead)": v(lambda o: F.cross_entropy(o[attribute].float(), y)),
        "this is the pull towards each sample's most likely class (the argmax), not towards "
        "the class y it was given: pick log p at y, log_probs[torch.arange(B), y]":
            v(lambda o: lp(o).max(dim=-1).values.sum()),
        "the log-probabilities of all classes were summed: pick each sample's own class, "
        "log_probs[torch.arange(B), y] (or log_probs.gather(1, y[:, None]))":
            v(lambda o: lp(o).sum()),
        "log_probs[:, y] is a (B, B) table, every sample's log-probability of every class in y: "
        "pick one per sample, log_probs[torch.arange(B), y] (or .gather(1, y[:, None]))":
            v(lambda o: lp(o)[:, y].sum()),
        "the softmax ran over the batch (dim=0); it runs over the classes: "
        "logits.log_softmax(dim=-1)": v(lambda o: o[attribute].float().log_softmax(dim=0)
                                        [rows, y].sum()),
    }
    if attribute != "shape":
        mistakes[f"this is the gradient for the 'shape' head, but attribute={attribute!r} was "
                 "asked for: read the logits of classifier(x, t)[attribute]"] = \
            v(lambda o: lp(o, "shape")[rows, y].sum())
    return mistakes


def _log_prob_cases(classifier):
    """(xt, t, y, attribute or None for the default, in torch.no_grad(), description)."""
    g = torch.Generator().manual_seed(92)
    cases = []
    for t, attribute, no_grad in [([0, 1, 500, 998, 999], "shape", False),
                                  ([999, 250, 2], "colour", False),
                                  ([700], None, False),
                                  ([10, 400, 800, 999], "colour", True)]:
        t = torch.tensor(t)
        xt = torch.randn(len(t), 3, 32, 32, generator=g)
        with torch.no_grad():   # y: never the classifier's favourite, so that differs
            favourite = classifier(xt, t)[attribute or "shape"].argmax(dim=-1)
        y = (favourite + 1 + torch.arange(len(t))) % 6
        head = f"attribute = {attribute!r}" if attribute else "the default attribute"
        description = f"batch of {len(t)}, {head}" + (", inside torch.no_grad()" if no_grad else "")
        cases.append((xt, t, y, attribute, no_grad, description))
    return cases


@exercise_check("Exercise 1 · The classifier's pull: the gradient of log p(y | x_t)")
def check_classifier_log_prob_grad(fn) -> str:
    """Check ``classifier_log_prob_grad(classifier, xt, t, y, *, attribute="shape")``."""
    names = ("classifier", "xt", "t", "y")
    classifier = _small_classifier()
    attached = False
    cases = _log_prob_cases(classifier)
    for xt, t, y, attribute, no_grad, description in cases:
        what = f"the gradient ({description})"
        kwargs = {} if attribute is None else {"attribute": attribute}
        # the reference, before the learner's code runs
        expected = du.classifier_log_prob_grad(classifier, xt, t, y, **kwargs)
        mistakes = _log_prob_mistakes(classifier, xt, t, y, attribute or "shape")
        xt_in = xt.clone()
        out = _call_09(fn, classifier, xt_in, t.clone(), y.clone(), names=names, what=what,
                       name="classifier_log_prob_grad", no_grad=no_grad, **kwargs)
        _expect_nothing_left(what, "classifier_log_prob_grad", classifier, "classifier",
                             {"xt": xt_in})
        out = expect_tensor(out, shape=xt.shape, dtype=xt.dtype, what=what,
                            shape_hint="the gradient w.r.t. x_t has x_t's shape, (B, 3, H, W)")
        attached = attached or out.requires_grad
        scale = float(expected.abs().max())
        compare(out.detach(), expected, mistakes, what=what, atol=1e-4 * scale, rtol=1e-3,
                item_names=[f"t = {int(s)}, y = {int(c)}" for s, c in zip(t, y)],
                term_hint="∇_{x_t} Σ_i log softmax(classifier(x_t, t)[attribute])[i, y_i], "
                          "each sample's log-probability of its own class")
    xt, t, y, *_ = cases[1]
    probe_device(fn, _small_classifier(), xt, t, y, what="classifier_log_prob_grad",
                 attribute="colour")
    return ("∇_{x_t} log p(y | x_t) matches for batches of 1 to 5, t from 0 to 999, the "
            "'shape' and 'colour' heads, also inside torch.no_grad()" + _attached_note(attached))


# ── Exercise 2 · The guided noise estimate ───────────────────────────────────────────


def _per_item(values: Tensor, index: Tensor, ndim: int) -> Tensor:
    """``values[index]`` in float64, reshaped to (B, 1, ..., 1) with ``ndim`` dims."""
    return values.double()[index].reshape(-1, *([1] * (ndim - 1)))


def _guided_mistakes(eps: Tensor, grad: Tensor, t: Tensor, schedule, scale: float
                     ) -> dict[str, Tensor]:
    """The ε̂ that the usual mistakes give (float64, then float32)."""
    T, nd = schedule.T, eps.ndim
    e, g, s = eps.double(), grad.double(), scale

    def at(values, index=t):
        return _per_item(values, index, nd)

    a, beta = at(schedule.alpha_bars), at(schedule.betas)
    mistakes = {
        "the sign is wrong: guidance adds s · ∇ log p(y | x_t) to the score, and "
        "ε = −sqrt(1 − ᾱ_t) · score, so ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t)":
            e + s * (1 - a).sqrt() * g,
        "this multiplies by sqrt(ᾱ_t), the signal's amplitude; the factor is the noise's, "
        "sqrt(1 − ᾱ_t)": e - s * a.sqrt() * g,
        "the square root is missing: the factor is sqrt(1 − ᾱ_t), not 1 − ᾱ_t":
            e - s * (1 - a) * g,
        "this multiplies by β_t (schedule.betas, one step's noise); the factor is "
        "sqrt(1 − ᾱ_t), from ε = −sqrt(1 − ᾱ_t) · score": e - s * beta * g,
        "this uses α_t (schedule.alphas, one step): sqrt(1 − α_t) = sqrt(β_t); the noise in x_t "
        "has built up over all steps: sqrt(1 − ᾱ_t) (schedule.alpha_bars)":
            e - s * beta.sqrt() * g,
        "this divides by sqrt(1 − ᾱ_t) (the way from ε to the score); going from the score's "
        "term back to ε multiplies by it: ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇":
            e - s * g / (1 - a).sqrt(),
        "the factor sqrt(1 − ᾱ_t) is missing: ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t)":
            e - s * g,
        "this is the factor of CLIP guidance on x̂_0, sqrt(ᾱ_t / (1 − ᾱ_t)); a gradient w.r.t. "
        "x_t itself takes sqrt(1 − ᾱ_t)": e - s * (a / (1 - a)).sqrt() * g,
        "the scale s is not used: ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t)":
            e - (1 - a).sqrt() * g,
        "the scale is applied twice (s²): ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t)":
            e - s ** 2 * (1 - a).sqrt() * g,
        "ᾱ is read at t + 1: timesteps are 0-indexed, ᾱ_t is alpha_bars[t]":
            e - s * (1 - at(schedule.alpha_bars, (t + 1).clamp(max=T - 1))).sqrt() * g,
        "ᾱ is read at t − 1 (alpha_bar_prev): timesteps are 0-indexed, ᾱ_t is alpha_bars[t]":
            e - s * (1 - at(schedule.alpha_bar_prev)).sqrt() * g,
        "ᾱ is read at t − 1 (and at t = 0 that wraps round to the last value): timesteps are "
        "0-indexed, ᾱ_t is alpha_bars[t]": e - s * (1 - at(schedule.alpha_bars, t - 1)).sqrt() * g,
    }
    return {hint: value.float() for hint, value in mistakes.items()}


def _guided_cases():
    """(schedule, model_eps, grad_log_prob, t, scale, description); images whose width differs
    from the batch size, so that a (B,) factor cannot broadcast by accident; the first case
    stays clear of t = T − 1."""
    g = torch.Generator().manual_seed(93)
    linear = (du.NoiseSchedule.create("linear", 1000), "linear")
    cosine = (du.NoiseSchedule.create("cosine", 50), "cosine")
    cases = []
    for (schedule, kind), t, scale, size in [(linear, [0, 1, 250, 700, 998], 2.5, 8),
                                             (cosine, [49, 24, 0], 0.5, 6),
                                             (linear, [999], 1.0, 4),
                                             (linear, [3, 600], 0.0, 8)]:
        t = torch.tensor(t)
        eps = torch.randn(len(t), 3, size, size, generator=g)
        grad = 0.5 * torch.randn(len(t), 3, size, size, generator=g)
        description = (f"batch of {len(t)}, {kind} schedule, T = {schedule.T}, "
                       f"scale = {scale:g}")
        cases.append((schedule, eps, grad, t, scale, description))
    return cases


@exercise_check("Exercise 2 · The guided noise estimate")
def check_guided_eps(fn) -> str:
    """Check ``guided_eps(model_eps, grad_log_prob, t, schedule, scale)``."""
    names = ("model_eps", "grad_log_prob", "t", "schedule", "scale")
    cases = _guided_cases()
    for schedule, eps, grad, t, scale, description in cases:
        what = f"ε̂ ({description})"
        # the reference, before the learner's code runs
        expected = du.guided_eps(eps, grad, t, schedule, scale)
        mistakes = _guided_mistakes(eps, grad, t, schedule, scale)
        out = _call_09(fn, eps.clone(), grad.clone(), t.clone(), schedule, scale, names=names,
                       what=what, name="guided_eps",
                       index_hint="is t off by one (t + 1 or t − 1)? Timesteps are 0 .. T − 1 "
                                  "and ᾱ_t is alpha_bars[t]")
        out = expect_tensor(out, shape=eps.shape, dtype=eps.dtype, what=what)
        compare(out.detach(), expected, mistakes, what=what, atol=1e-5, rtol=1e-4,
                item_names=[f"t = {int(s)}" for s in t],
                term_hint="ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t), with ᾱ_t = "
                          "alpha_bars[t] broadcast over each item (du.extract)"
                          + (" — with scale 0 it is model_eps itself" if scale == 0 else ""))
    schedule, eps, grad, t, scale, _ = cases[0]
    probe_device(fn, eps, grad, t, schedule, scale, what="guided_eps")
    return ("ε̂ = ε − s · sqrt(1 − ᾱ_t) · ∇ log p(y | x_t) for t from 0 to T − 1 and scales "
            "0, 0.5, 1 and 2.5")


# ── Exercise 3 · CLIP guidance on the predicted clean image ──────────────────────────


def _similarity_grad(clip, image: Tensor, text: Tensor, *, normalise="both", reduce="sum"
                     ) -> Tensor:
    """∇_image of the batch's (summed) similarity of CLIP's image embedding with ``text``."""
    with torch.enable_grad():
        x = image.detach().float().clone().requires_grad_(True)
        features = clip.encode_image(x)                                       # (B, D)
        target = text.to(features).expand_as(features)
        if normalise in ("both", "image"):
            features = F.normalize(features, dim=-1)
        if normalise in ("both", "text"):
            target = F.normalize(target, dim=-1)
        similarity = (features * target).sum(dim=-1)                          # (B,)
        total = similarity.sum() if reduce == "sum" else similarity.mean()
        return torch.autograd.grad(total, x)[0].detach().double()


def _clip_variant(clip, eps: Tensor, xt: Tensor, t: Tensor, schedule, text: Tensor, scale,
                  *, wrt="x0", clipping="before", x0_no_sqrt=False, normalise="both",
                  reduce="sum", sign=1.0, factor="ratio", returns="eps") -> Tensor:
    """CLIP-guided ε̂ with one of the usual mistakes; the gradient through CLIP in float32,
    the rest in float64. ``clipping``: "before" (the gradient w.r.t. the clipped x̂_0),
    "in_graph" (through the clamp: zero where x̂_0 was clipped) or "none"."""
    a = _per_item(schedule.alpha_bars, t, xt.ndim)
    e = eps.double()
    noise = (1 - a) if x0_no_sqrt else (1 - a).sqrt()
    x0_hat = (xt.double() - noise * e) / a.sqrt()
    seen = x0_hat if clipping == "none" else x0_hat.clamp(-1, 1)
    g = _similarity_grad(clip, seen, text, normalise=normalise, reduce=reduce)
    if clipping == "in_graph":
        g = g * (x0_hat.abs() <= 1)
    if wrt == "xt":                     # x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)
        g = g / a.sqrt()
    if returns == "x0":
        return (x0_hat + scale * g).float()
    if returns == "eps_from_clipped":
        return ((xt.double() - a.sqrt() * (x0_hat.clamp(-1, 1) + scale * g)) / (1 - a).sqrt()
                ).float()
    coefficient = {"ratio": (a / (1 - a)).sqrt(), "inverse": ((1 - a) / a).sqrt(),
                   "no_sqrt": a / (1 - a), "one_minus": (1 - a).sqrt()}[factor]
    return (e - sign * scale * coefficient * g).float()


def _clip_mistakes(clip, eps, xt, t, schedule, text, scale) -> dict[str, Tensor]:
    v = functools.partial(_clip_variant, clip, eps, xt, t, schedule, text)
    wrt_x0 = ("take the gradient w.r.t. the clipped x̂_0 itself, "
              "x0 = x̂_0.clamp(-1, 1).detach().requires_grad_(True)")
    wrt_xt = ("the gradient was taken w.r.t. x_t, through x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / "
              "sqrt(ᾱ_t), which divides it by sqrt(ᾱ_t) (and zeroes it where the clamp cut): "
              + wrt_x0)
    not_normalised = ("this is the gradient of a dot product, not of the cosine similarity: "
                      "normalise both the image embedding and the text features "
                      "(F.normalize(..., dim=-1)) before multiplying")
    return {
        wrt_xt: v(scale, wrt="xt", clipping="in_graph"),
        "the gradient was taken w.r.t. x_t, through x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t), "
        "which divides it by sqrt(ᾱ_t), and x̂_0 was not clipped before CLIP saw it: " + wrt_x0:
            v(scale, wrt="xt", clipping="none"),
        "the gradient is divided by sqrt(ᾱ_t), as one w.r.t. x_t would be: " + wrt_x0:
            v(scale, wrt="xt"),
        "the gradient went through the clamp, so it is zero wherever x̂_0 lies outside "
        "[-1, 1]: clip first, then take the gradient w.r.t. the clipped image, "
        "x0 = x̂_0.clamp(-1, 1).detach().requires_grad_(True)": v(scale, clipping="in_graph"),
        "x̂_0 was not clipped to [-1, 1] before CLIP saw it: CLIP knows only images in that "
        "range, and x̂_0 at large t lies far outside": v(scale, clipping="none"),
        "the sign is wrong: stepping x̂_0 up the similarity, x̂_0' = x̂_0 + s g, lowers ε: "
        "ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g": v(scale, sign=-1.0),
        "the ratio is upside down: ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g, from "
        "ε = (x_t − sqrt(ᾱ_t) x̂_0') / sqrt(1 − ᾱ_t)": v(scale, factor="inverse"),
        "the square root is missing: the factor is sqrt(ᾱ_t / (1 − ᾱ_t))":
            v(scale, factor="no_sqrt"),
        "this is classifier guidance's factor sqrt(1 − ᾱ_t), for a gradient w.r.t. x_t; a step "
        "of x̂_0 moves ε by sqrt(ᾱ_t / (1 − ᾱ_t)) times as much": v(scale, factor="one_minus"),
        not_normalised: v(scale, normalise="none"),
        not_normalised + " (the image embedding is not normalised)": v(scale, normalise="text"),
        not_normalised + " (the text features are not normalised)": v(scale, normalise="image"),
        "this is the gradient of the batch's mean similarity: each sample's gradient comes out "
        "B times too small; sum over the batch": v(scale, reduce="mean"),
        "x̂_0 subtracts (1 − ᾱ_t) · ε; the noise's amplitude in x_t is sqrt(1 − ᾱ_t): "
        "x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)": v(scale, x0_no_sqrt=True),
        "this returns the stepped clean image x̂_0' = x̂_0 + s g; return the noise estimate "
        "that predicts it, ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g": v(scale, returns="x0"),
        "ε̂ was recovered from the clipped x̂_0: clip only what CLIP sees, and step the "
        "unclipped x̂_0 (du.eps_from_x0(x_t, t, x̂_0 + s g)), or use "
        "ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g": v(scale, returns="eps_from_clipped"),
        "the scale s is not used: ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g": v(1.0),
        "the scale is applied twice (s²): ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g":
            v(scale ** 2),
    }


def _clip_cases():
    """(schedule, model_eps, xt, t, text_features, scale, in torch.no_grad(), description):
    x_t made from images that reach ±1 and a noise prediction with an error, so that x̂_0
    leaves [-1, 1] at large t."""
    g = torch.Generator().manual_seed(94)
    linear = (du.NoiseSchedule.create("linear", 1000), "linear")
    cosine = (du.NoiseSchedule.create("cosine", 50), "cosine")
    cases = []
    for (schedule, kind), t, scale, per_sample, no_grad in [
            (linear, [1, 150, 500, 998], 200.0, True, False),
            (cosine, [49, 20, 0], 50.0, False, False),
            (linear, [0, 600], 0.0, True, False),
            (linear, [300, 999], 100.0, True, True)]:
        t = torch.tensor(t)
        B = len(t)
        x0 = (1.3 * torch.rand(B, 3, 32, 32, generator=g) * 2 - 1.3).clamp(-1, 1)
        eps_true = torch.randn(B, 3, 32, 32, generator=g)
        xt = du.q_sample(x0, t, eps_true, schedule)
        model_eps = eps_true + 0.3 * torch.randn(B, 3, 32, 32, generator=g)
        text = torch.randn(B if per_sample else 1, 32, generator=g) * 2
        text = text if per_sample else text[0]
        description = (f"batch of {B}, {kind} schedule, T = {schedule.T}, text_features "
                       f"{tuple(text.shape)}, scale = {scale:g}"
                       + (", inside torch.no_grad()" if no_grad else ""))
        cases.append((schedule, model_eps, xt, t, text, scale, no_grad, description))
    return cases


def _close_to(out, value: Tensor, eps: Tensor, *, atol: float = 1e-4, rtol: float = 1e-3) -> bool:
    """Whether ``out`` matches ``value`` (NaN never does), within a tolerance that also grows
    with the guidance term ``value − ε``: its factor sqrt(ᾱ_t / (1 − ᾱ_t)) reaches about 100
    near t = 0, where float32 holds 1 − ᾱ_t to about 1e-4 only, so that correct answers
    differ there by that much of the term."""
    if not isinstance(out, Tensor) or out.shape != value.shape:
        return False
    o, v, e = (x.detach().double().cpu() for x in (out, value, eps))
    if not (bool(torch.isfinite(o).all()) and bool(torch.isfinite(v).all())):
        return False
    return bool(((o - v).abs() <= atol + rtol * (v.abs() + (v - e).abs())).all())


@exercise_check("Exercise 3 · CLIP guidance on the predicted clean image")
def check_clip_guided_eps(fn) -> str:
    """Check ``clip_guided_eps(clip, model_eps, xt, t, schedule, text_features, scale)``."""
    names = ("clip", "model_eps", "xt", "t", "schedule", "text_features", "scale")
    clip = _small_clip()
    attached = False
    cases = _clip_cases()
    for schedule, eps, xt, t, text, scale, no_grad, description in cases:
        what = f"ε̂ ({description})"
        # the reference, before the learner's code runs
        expected = du.clip_guided_eps(clip, eps, xt, t, schedule, text, scale)
        mistakes = _clip_mistakes(clip, eps, xt, t, schedule, text, scale)
        eps_in, xt_in = eps.clone(), xt.clone()
        out = _call_09(fn, clip, eps_in, xt_in, t.clone(), schedule, text.clone(), scale,
                       names=names, what=what, name="clip_guided_eps", no_grad=no_grad,
                       index_hint="is t off by one? Timesteps are 0 .. T − 1 and ᾱ_t is "
                                  "alpha_bars[t]")
        _expect_nothing_left(what, "clip_guided_eps", clip, "CLIP model",
                             {"model_eps": eps_in, "xt": xt_in})
        out = expect_tensor(out, shape=xt.shape, dtype=xt.dtype, what=what,
                            shape_hint="ε̂ has x_t's shape, (B, 3, H, W)")
        attached = attached or out.requires_grad
        if _close_to(out, expected, eps):
            continue
        for hint, wrong in mistakes.items():
            if _close_to(out, wrong, eps):
                fail(f"{what} is not right: {hint}")
        fail(f"{what} differs from the reference ("
             + largest_difference(out, expected, item_names=[f"t = {int(s)}" for s in t])
             + "); " + ("with scale 0 the result is model_eps itself" if scale == 0 else
                        "1. x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t); 2. g = ∇ of the cosine "
                        "similarity of CLIP's embedding of x̂_0.clamp(-1, 1) with the text, "
                        "w.r.t. that clipped image; 3. ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g"))
    schedule, eps, xt, t, text, scale, *_ = cases[0]
    probe_device(fn, _small_clip(), eps, xt, t, schedule, text, scale, what="clip_guided_eps")
    return ("CLIP guidance matches: the cosine similarity's gradient w.r.t. the clipped x̂_0, "
            "ε̂ = ε − s · sqrt(ᾱ_t / (1 − ᾱ_t)) · g, for t from 0 to T − 1, one caption or one "
            "per image, scale 0 giving ε back, also inside torch.no_grad()"
            + _attached_note(attached))
