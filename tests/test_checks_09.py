"""Lesson 09's exercise checks: the reference passes, a stub is "not attempted", correct
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

pytestmark = pytest.mark.usefixtures("one_thread")


DEVICE = "pass `device=x.device`"
IN_PLACE = "in place (an in-place operation"
NO_GRAD = "wrap the forward pass and the gradient in `with torch.enable_grad():`"
LEFT_IN_PARAMETERS = "left gradients in the {}'s parameters"
REQUIRES_GRAD_SET = "your code set `requires_grad` on the caller's `{}`"


# ── classifier_log_prob_grad ─────────────────────────────────────────────────────────


def make_log_prob_grad(*, objective="log_softmax", dim=-1, pick="y", reduce="sum", sign=1.0,
                       head=None, enable_grad=True, copy=True, backward=False,
                       create_graph=False, float64=False):
    """A learner's classifier_log_prob_grad with one knob turned."""

    def classifier_log_prob_grad(classifier, xt, t, y, *, attribute="shape"):
        with torch.enable_grad() if enable_grad else contextlib.nullcontext():
            x = xt.detach().requires_grad_(True) if copy else xt.requires_grad_(True)
            logits = classifier(x, t)[head or attribute]
            if float64:
                logits = logits.double()
            if objective == "log_softmax":
                scores = logits.log_softmax(dim=dim)
            elif objective == "softmax":
                scores = logits.softmax(dim=dim)
            else:
                scores = logits
            rows = torch.arange(len(y), device=y.device)
            if pick == "y":
                chosen = scores[rows, y]
            elif pick == "argmax":
                chosen = scores.max(dim=-1).values
            elif pick == "all":
                chosen = scores
            else:
                chosen = scores[:, y]
            total = sign * (chosen.sum() if reduce == "sum" else chosen.mean())
            if backward:
                total.backward()
                return x.grad
            return torch.autograd.grad(total, x, create_graph=create_graph)[0].to(xt.dtype)

    return classifier_log_prob_grad


def log_prob_grad_func(classifier, xt, t, y, *, attribute="shape"):
    """torch.func.grad of the summed log-probabilities (works inside torch.no_grad() too)."""
    def total(x):
        return classifier(x, t)[attribute].log_softmax(dim=-1).gather(1, y[:, None]).sum()
    return torch.func.grad(total)(xt)


def log_prob_grad_loop_nll(classifier, xt, t, y, *, attribute="shape"):
    """One sample at a time, through −F.nll_loss(..., reduction="sum")."""
    grads = []
    with torch.enable_grad():
        for i in range(len(xt)):
            x = xt[i:i + 1].detach().clone().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x, t[i:i + 1])[attribute], dim=1)
            loss = F.nll_loss(log_probs, y[i:i + 1], reduction="sum")
            grads.append(torch.autograd.grad(-loss, x)[0])
    return torch.cat(grads)


def log_prob_grad_one_hot_float64(classifier, xt, t, y, *, attribute="shape"):
    """float64 log(softmax) weighted by a one-hot of y; backward(), then the classifier's
    gradients cleared."""
    with torch.enable_grad():
        x = xt.detach().clone().requires_grad_(True)
        logits = classifier(x, t)[attribute].double()
        one_hot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        (one_hot * logits.softmax(dim=-1).log()).sum().backward()
    classifier.zero_grad(set_to_none=True)
    return x.grad


def log_prob_grad_sum_of_logs(classifier, xt, t, y, *, attribute="shape"):
    """log p(y | x) = z_y − logsumexp(z), by hand."""
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        z = classifier(x, t)[attribute]
        log_prob = z.gather(1, y.view(-1, 1)).squeeze(1) - torch.logsumexp(z, dim=1)
        (grad,) = torch.autograd.grad(log_prob.sum(), [x])
    return grad


def log_prob_grad_cross_entropy(classifier, xt, t, y, *, attribute="shape"):
    """The gradient of F.cross_entropy with its default mean: −∇ log p / B."""
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(classifier(x, t)[attribute], y), x)[0]


def log_prob_grad_one_hot_cpu(classifier, xt, t, y, *, attribute="shape"):
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        log_probs = classifier(x, t)[attribute].log_softmax(dim=-1)
        one_hot = torch.zeros(log_probs.shape).scatter_(1, y[:, None], 1.0)
        return torch.autograd.grad((one_hot * log_probs).sum(), x)[0]


def log_prob_grad_changes_xt(classifier, xt, t, y, *, attribute="shape"):
    return du.classifier_log_prob_grad(classifier, xt.clamp_(-1, 1), t, y, attribute=attribute)


def test_log_prob_grad_reference_passes(capsys):
    assert_passes(dc.check_classifier_log_prob_grad, du.classifier_log_prob_grad, capsys)


@pytest.mark.parametrize("fn", [make_log_prob_grad(), make_log_prob_grad(float64=True),
                                log_prob_grad_func, log_prob_grad_loop_nll,
                                log_prob_grad_one_hot_float64, log_prob_grad_sum_of_logs],
                         ids=["notebook-like", "float64-logits", "torch-func-grad",
                              "loop-nll-loss", "one-hot-float64-backward", "logsumexp"])
def test_log_prob_grad_other_forms_pass(fn, capsys):
    assert_passes(dc.check_classifier_log_prob_grad, fn, capsys)


def test_log_prob_grad_result_attached_to_the_graph_passes_with_a_note(capsys):
    assert dc.check_classifier_log_prob_grad(make_log_prob_grad(create_graph=True)) is True
    out = capsys.readouterr().out
    assert dc.PASSED_MARK in out and "still carries its graph" in out


def test_log_prob_grad_detached_result_gets_no_note(capsys):
    assert dc.check_classifier_log_prob_grad(du.classifier_log_prob_grad) is True
    assert "still carries its graph" not in capsys.readouterr().out


def test_log_prob_grad_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_classifier_log_prob_grad, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_log_prob_grad(objective="logit"), "this is the gradient of the logit z_y"),
    (make_log_prob_grad(objective="softmax"), "the gradient of the probability p(y | x_t)"),
    (make_log_prob_grad(reduce="mean"), "B times too small"),
    (make_log_prob_grad(sign=-1.0), "the sign is wrong"),
    (log_prob_grad_cross_entropy, "this is the gradient of F.cross_entropy(logits, y)"),
    (make_log_prob_grad(head="shape"), "this is the gradient for the 'shape' head"),
    (make_log_prob_grad(pick="argmax"), "the pull towards each sample's most likely class"),
    (make_log_prob_grad(pick="all"), "the log-probabilities of all classes were summed"),
    (make_log_prob_grad(pick="table"), "log_probs[:, y] is a (B, B) table"),
    (make_log_prob_grad(dim=0), "the softmax ran over the batch (dim=0)"),
    (make_log_prob_grad(enable_grad=False), NO_GRAD),
    (make_log_prob_grad(copy=False), REQUIRES_GRAD_SET.format("xt")),
    (make_log_prob_grad(copy=False, backward=True), "left a gradient in the caller's `xt.grad`"),
    (make_log_prob_grad(backward=True), LEFT_IN_PARAMETERS.format("classifier")),
    (log_prob_grad_one_hot_cpu, DEVICE),
    (log_prob_grad_changes_xt, "changed its input `xt` " + IN_PLACE),
    (lambda classifier, xt, t, y, **kw: du.classifier_log_prob_grad(classifier, xt, t, y, **kw)
     .double(), "should have dtype torch.float32"),
    (lambda classifier, xt, t, y, **kw: du.classifier_log_prob_grad(classifier, xt, t, y, **kw)
     [:, 0], "should have shape"),
    (lambda classifier, xt, t, y, **kw: du.classifier_log_prob_grad(classifier, xt, t, y, **kw)
     / 0 * 0, "contains NaN"),
    (lambda classifier, xt, t, y, **kw: None, "forget the `return`"),
])
def test_log_prob_grad_mistakes(wrong, hint):
    assert_fails_with(dc.check_classifier_log_prob_grad, wrong, hint)


def test_log_prob_grad_without_requires_grad_is_named():
    def no_requires_grad(classifier, xt, t, y, *, attribute="shape"):
        with torch.enable_grad():
            log_probs = classifier(xt, t)[attribute].log_softmax(dim=-1)
            return torch.autograd.grad(log_probs[torch.arange(len(y)), y].sum(), xt)[0]

    assert_fails_with(dc.check_classifier_log_prob_grad, no_requires_grad,
                      "`x = xt.detach().requires_grad_(True)`")




# ── guided_eps ───────────────────────────────────────────────────────────────────────


def make_guided(*, values="alpha_bars", of="one_minus", power=0.5, sign=-1.0, divide=False,
                scale_power=1, shift=0, reshape=True):
    """A learner's guided_eps with one knob turned."""

    def guided_eps(model_eps, grad_log_prob, t, schedule, scale):
        a = getattr(schedule, values)[t + shift]
        if reshape:
            a = a.view(-1, 1, 1, 1)
        factor = (1 - a if of == "one_minus" else a) ** power
        term = grad_log_prob / factor if divide else factor * grad_log_prob
        return model_eps + sign * scale ** scale_power * term

    return guided_eps


def guided_sqrt_extract(model_eps, grad_log_prob, t, schedule, scale):
    return model_eps - scale * torch.sqrt(1 - du.extract(schedule.alpha_bars, t, model_eps.shape)) \
        * grad_log_prob


def guided_float64(model_eps, grad_log_prob, t, schedule, scale):
    sigma = (1 - schedule.alpha_bars.double()[t]).sqrt()[:, None, None, None]
    return (model_eps.double() - scale * sigma * grad_log_prob.double()).to(model_eps.dtype)


def guided_loop(model_eps, grad_log_prob, t, schedule, scale):
    return torch.stack([e - scale * math.sqrt(1 - float(schedule.alpha_bars[s])) * g
                        for e, g, s in zip(model_eps, grad_log_prob, t)])


def guided_via_score(model_eps, grad_log_prob, t, schedule, scale):
    """Through the score: score = −ε / σ_t, add s ∇, back to ε = −σ_t · score."""
    sigma = du.extract(schedule.sqrt_one_minus_alpha_bars, t, model_eps.shape)
    score = du.score_from_eps(model_eps, t, schedule) + scale * grad_log_prob
    return -sigma * score


def guided_in_place(model_eps, grad_log_prob, t, schedule, scale):
    sigma = du.extract(schedule.sqrt_one_minus_alpha_bars, t, model_eps.shape)
    return model_eps.sub_(scale * sigma * grad_log_prob)


def guided_cpu_ones(model_eps, grad_log_prob, t, schedule, scale):
    sigma = (torch.ones(len(t)) - schedule.alpha_bars[t]).sqrt().view(-1, 1, 1, 1)
    return model_eps - scale * sigma * grad_log_prob


def test_guided_eps_reference_passes(capsys):
    assert_passes(dc.check_guided_eps, du.guided_eps, capsys)


@pytest.mark.parametrize("fn", [make_guided(), guided_sqrt_extract, guided_float64, guided_loop,
                                guided_via_score],
                         ids=["view-indexing", "sqrt-extract", "float64", "loop", "via-score"])
def test_guided_eps_other_forms_pass(fn, capsys):
    assert_passes(dc.check_guided_eps, fn, capsys)


def test_guided_eps_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_guided_eps, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_guided(sign=1.0), "the sign is wrong"),
    (make_guided(of="alpha_bar"), "this multiplies by sqrt(ᾱ_t), the signal's amplitude"),
    (make_guided(power=1.0), "the square root is missing"),
    (make_guided(values="betas", of="alpha_bar", power=1.0), "this multiplies by β_t"),
    (make_guided(values="alphas"), "this uses α_t (schedule.alphas, one step)"),
    (make_guided(divide=True), "this divides by sqrt(1 − ᾱ_t)"),
    (make_guided(power=0), "the factor sqrt(1 − ᾱ_t) is missing"),
    (make_guided(scale_power=0), "the scale s is not used"),
    (make_guided(scale_power=2), "the scale is applied twice"),
    (make_guided(shift=1), "ᾱ is read at t + 1"),
    (make_guided(shift=-1), "wraps round to the last value"),
    (make_guided(values="alpha_bar_prev"), "ᾱ is read at t − 1 (alpha_bar_prev)"),
    (make_guided(reshape=False), "(B, 1, 1, 1) before it multiplies"),
    (guided_in_place, "changed its input `model_eps` " + IN_PLACE),
    (guided_cpu_ones, DEVICE),
    (lambda *args: du.guided_eps(*args).double(), "should have dtype torch.float32"),
    (lambda *args: du.guided_eps(*args) / 0 * 0, "contains NaN"),
    (lambda *args: None, "forget the `return`"),
])
def test_guided_eps_mistakes(wrong, hint):
    assert_fails_with(dc.check_guided_eps, wrong, hint)


def test_guided_eps_clip_factor_is_named():
    def clip_factor(model_eps, grad_log_prob, t, schedule, scale):
        a = du.extract(schedule.alpha_bars, t, model_eps.shape)
        return model_eps - scale * (a / (1 - a)).sqrt() * grad_log_prob

    assert_fails_with(dc.check_guided_eps, clip_factor, "this is the factor of CLIP guidance")


# ── clip_guided_eps ──────────────────────────────────────────────────────────────────


def make_clip_guided(*, wrt="x0", clipping="before", normalise="both", reduce="sum", sign=1.0,
                     factor="ratio", returns="eps", scale_power=1, enable_grad=True,
                     backward=False, x0_power=0.5):
    """A learner's clip_guided_eps with one knob turned."""

    def clip_guided_eps(clip, model_eps, xt, t, schedule, text_features, scale):
        a = du.extract(schedule.alpha_bars, t, xt.shape)
        s = scale ** scale_power
        with torch.enable_grad() if enable_grad else contextlib.nullcontext():
            x_in = xt.requires_grad_(True) if wrt == "xt" else xt
            x0_hat = (x_in - (1 - a) ** x0_power * model_eps) / a.sqrt()
            if wrt == "xt":
                x = x0_hat.clamp(-1, 1) if clipping != "none" else x0_hat
                leaf = xt
            elif clipping == "before":
                x = leaf = x0_hat.detach().clamp(-1, 1).requires_grad_(True)
            else:
                leaf = x0_hat.detach().requires_grad_(True)
                x = leaf.clamp(-1, 1) if clipping == "in_graph" else leaf
            image = clip.encode_image(x)
            text = text_features.expand_as(image)
            if normalise == "both":
                image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
            similarity = (image * text).sum(dim=-1)
            total = similarity.sum() if reduce == "sum" else similarity.mean()
            if backward:
                total.backward()
                g = leaf.grad
            else:
                g = torch.autograd.grad(total, leaf)[0]
        if returns == "x0":
            return x0_hat.detach() + s * g
        coefficient = {"ratio": (a / (1 - a)).sqrt(), "inverse": ((1 - a) / a).sqrt(),
                       "no_sqrt": a / (1 - a), "one_minus": (1 - a).sqrt()}[factor]
        return model_eps - sign * s * coefficient * g

    return clip_guided_eps


def clip_guided_eps_from_x0(clip, model_eps, xt, t, schedule, text_features, scale):
    """Step the clean image and recover its ε with du.eps_from_x0; F.cosine_similarity."""
    x0_hat = du.predict_x0(xt, t, model_eps, schedule)
    with torch.enable_grad():
        x = x0_hat.clamp(-1, 1).detach().requires_grad_(True)
        similarity = F.cosine_similarity(clip.encode_image(x), text_features, dim=-1)
        (g,) = torch.autograd.grad(similarity.sum(), [x])
    return du.eps_from_x0(xt, t, x0_hat + scale * g, schedule)


def clip_guided_eps_float64_loop(clip, model_eps, xt, t, schedule, text_features, scale):
    """One image at a time; the factor sqrt(ᾱ_t / (1 − ᾱ_t)) in float64."""
    text = text_features if text_features.ndim == 2 else text_features.expand(len(xt), -1)
    out = []
    for i in range(len(xt)):
        a = float(schedule.alpha_bars.double()[t[i]])
        x0_hat = (xt[i] - math.sqrt(1 - a) * model_eps[i]) / math.sqrt(a)
        with torch.enable_grad():
            x = x0_hat.clamp(-1, 1)[None].detach().requires_grad_(True)
            image = clip.encode_image(x)[0]
            cos = image @ text[i] / (image.norm() * text[i].norm())
            g = torch.autograd.grad(cos, x)[0][0]
        out.append((model_eps[i].double() - scale * math.sqrt(a / (1 - a)) * g.double()).float())
    return torch.stack(out)


def clip_guided_eps_func(clip, model_eps, xt, t, schedule, text_features, scale):
    """torch.func.grad of the summed cosine similarity, the factor from the schedule's fields."""
    x0_hat = du.predict_x0(xt, t, model_eps, schedule)

    def total(x):
        image = F.normalize(clip.encode_image(x), dim=-1)
        return (image * F.normalize(text_features, dim=-1)).sum()

    g = torch.func.grad(total)(x0_hat.clamp(-1, 1))
    sqrt_a = du.extract(schedule.sqrt_alpha_bars, t, xt.shape)
    sqrt_1ma = du.extract(schedule.sqrt_one_minus_alpha_bars, t, xt.shape)
    return model_eps - scale * sqrt_a / sqrt_1ma * g


def clip_guided_eps_from_clipped(clip, model_eps, xt, t, schedule, text_features, scale):
    x0_hat = du.predict_x0(xt, t, model_eps, schedule).clamp(-1, 1)
    with torch.enable_grad():
        x = x0_hat.detach().requires_grad_(True)
        similarity = F.cosine_similarity(clip.encode_image(x), text_features, dim=-1)
        (g,) = torch.autograd.grad(similarity.sum(), [x])
    return du.eps_from_x0(xt, t, x0_hat + scale * g, schedule)


def clip_guided_eps_changes_eps(clip, model_eps, xt, t, schedule, text_features, scale):
    return model_eps.copy_(du.clip_guided_eps(clip, model_eps, xt, t, schedule, text_features,
                                              scale))


def clip_guided_eps_cpu_factor(clip, model_eps, xt, t, schedule, text_features, scale):
    out = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text_features, 0.0)
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return out + 0 * (torch.ones(len(t), 1, 1, 1) - a) \
        + (du.clip_guided_eps(clip, model_eps, xt, t, schedule, text_features, scale) - out)


def test_clip_guided_eps_reference_passes(capsys):
    assert_passes(dc.check_clip_guided_eps, du.clip_guided_eps, capsys)


@pytest.mark.parametrize("fn", [make_clip_guided(), clip_guided_eps_from_x0,
                                clip_guided_eps_float64_loop, clip_guided_eps_func],
                         ids=["notebook-like", "eps-from-x0-cosine-similarity", "float64-loop",
                              "torch-func-grad"])
def test_clip_guided_eps_other_forms_pass(fn, capsys):
    assert_passes(dc.check_clip_guided_eps, fn, capsys)


def test_clip_guided_eps_stub_not_attempted(capsys):
    assert_not_attempted(dc.check_clip_guided_eps, capsys)


@pytest.mark.parametrize("wrong, hint", [
    (make_clip_guided(wrt="xt"), REQUIRES_GRAD_SET.format("xt")),
    (make_clip_guided(clipping="in_graph"), "the gradient went through the clamp"),
    (make_clip_guided(clipping="none"), "x̂_0 was not clipped to [-1, 1]"),
    (make_clip_guided(sign=-1.0), "the sign is wrong"),
    (make_clip_guided(factor="inverse"), "the ratio is upside down"),
    (make_clip_guided(factor="no_sqrt"), "the square root is missing"),
    (make_clip_guided(factor="one_minus"), "this is classifier guidance's factor"),
    (make_clip_guided(normalise="none"), "the gradient of a dot product, not of the cosine"),
    (make_clip_guided(reduce="mean"), "B times too small"),
    (make_clip_guided(x0_power=1.0), "x̂_0 subtracts (1 − ᾱ_t) · ε"),
    (make_clip_guided(returns="x0"), "this returns the stepped clean image"),
    (clip_guided_eps_from_clipped, "ε̂ was recovered from the clipped x̂_0"),
    (make_clip_guided(scale_power=0), "the scale s is not used"),
    (make_clip_guided(scale_power=2), "the scale is applied twice"),
    (make_clip_guided(enable_grad=False), NO_GRAD),
    (make_clip_guided(backward=True), LEFT_IN_PARAMETERS.format("CLIP model")),
    (clip_guided_eps_changes_eps, "changed its input `model_eps` " + IN_PLACE),
    (clip_guided_eps_cpu_factor, DEVICE),
    (lambda *args: du.clip_guided_eps(*args).double(), "should have dtype torch.float32"),
    (lambda *args: du.clip_guided_eps(*args) / 0 * 0, "contains NaN"),
    (lambda *args: None, "forget the `return`"),
])
def test_clip_guided_eps_mistakes(wrong, hint):
    assert_fails_with(dc.check_clip_guided_eps, wrong, hint)


@pytest.mark.parametrize("clipping, hint", [
    ("in_graph", "the gradient was taken w.r.t. x_t, through x̂_0"),
    ("none", "and x̂_0 was not clipped before CLIP saw it"),
    ("before", "the gradient is divided by sqrt(ᾱ_t), as one w.r.t. x_t would be")])
def test_clip_guided_eps_gradient_wrt_xt_is_named(clipping, hint):
    """x_t made to require grad on a copy, so the value comparison names the mistake."""
    wrong = make_clip_guided(wrt="xt", clipping=clipping)

    def on_a_copy(clip, model_eps, xt, t, schedule, text_features, scale):
        xt = xt.detach().clone()
        if clipping == "before":
            a = du.extract(schedule.alpha_bars, t, xt.shape)
            with torch.enable_grad():
                x = xt.requires_grad_(True)
                x0 = ((x - (1 - a).sqrt() * model_eps) / a.sqrt())
                x0 = x0 + (x0.clamp(-1, 1) - x0).detach()    # clipped values, gradient 1
                image = F.normalize(clip.encode_image(x0), dim=-1)
                g = torch.autograd.grad((image * F.normalize(text_features, dim=-1)).sum(), x)[0]
            return model_eps - scale * (a / (1 - a)).sqrt() * g
        return wrong(clip, model_eps, xt, t, schedule, text_features, scale)

    assert_fails_with(dc.check_clip_guided_eps, on_a_copy, hint)


@pytest.mark.parametrize("normalise, extra", [("text", "(the image embedding is not normalised)"),
                                              ("image", "(the text features are not normalised)")])
def test_clip_guided_eps_half_normalised_is_named(normalise, extra):
    def half(clip, model_eps, xt, t, schedule, text_features, scale):
        x0_hat = du.predict_x0(xt, t, model_eps, schedule)
        with torch.enable_grad():
            x = x0_hat.clamp(-1, 1).detach().requires_grad_(True)
            image = clip.encode_image(x)
            text = text_features.expand_as(image)
            image = F.normalize(image, dim=-1) if normalise == "image" else image
            text = F.normalize(text, dim=-1) if normalise == "text" else text
            g = torch.autograd.grad((image * text).sum(), x)[0]
        a = du.extract(schedule.alpha_bars, t, xt.shape)
        return model_eps - scale * (a / (1 - a)).sqrt() * g

    assert_fails_with(dc.check_clip_guided_eps, half, extra)


def test_clip_guided_eps_scale_zero_must_give_eps_back():
    def always_guided(clip, model_eps, xt, t, schedule, text_features, scale):
        return du.clip_guided_eps(clip, model_eps, xt, t, schedule, text_features, scale or 7.0)

    assert_fails_with(dc.check_clip_guided_eps, always_guided,
                      "with scale 0 the result is model_eps itself")


# ── all three ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("check, fn", [
    (dc.check_classifier_log_prob_grad, du.classifier_log_prob_grad),
    (dc.check_guided_eps, du.guided_eps),
    (dc.check_clip_guided_eps, du.clip_guided_eps),
], ids=["classifier_log_prob_grad", "guided_eps", "clip_guided_eps"])
def test_checks_leave_the_random_state_alone(check, fn):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert check(fn) is True
    assert torch.equal(torch.rand(3), expected)
