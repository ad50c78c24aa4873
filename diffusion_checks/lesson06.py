"""Checks of lesson 06's exercises (CLIP: images and captions in one space).

Each check compares the learner's function with the library's (``du.patchify``,
``du.causal_mask``, ``du.contrastive_loss``, ``du.zero_shot_scores``) on several sizes, the
edge cases included (one patch, one token, one pair, one prompt), and recomputes the usual
mistakes to name them: patches cut or flattened in another order, the mask's triangle or
convention, the loss's normalisation, temperature, directions, labels and reduction, and the
zero-shot classifier's normalisations and averaging. The loss must also carry gradients to
both encoders' features and to ``logit_scale``. Every input is drawn from a generator of the
check's own, so the notebook's random numbers are left alone.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

import diffusion_utilities as du

from ._core import (DEVICE_HINT, _device_words, _is_device_error, _MetaAsGPU, call_explained,
                    close, compare, exercise_check, expect_finite, expect_tensor,
                    fail, other_device, probe_device, same_values)


def _unit(x: Tensor, dim: int = -1) -> Tensor:
    return x / x.norm(dim=dim, keepdim=True)


# ── Exercise 1 · Cutting an image into patches ───────────────────────────────────────

_PATCH_ORDER = ("patches in reading order (grid row by grid row, left to right), each "
                "flattened in (C, p, p) order: images.reshape(B, C, H/p, p, W/p, p)"
                ".permute(0, 2, 4, 1, 3, 5).reshape(B, N, C·p·p)")


def _patch_cases():
    """(images, p, description): non-square images and grids, one channel, p = 1, one patch."""
    g = torch.Generator().manual_seed(61)
    return [(torch.randn(B, C, H, W, generator=g), p, f"{B} images {C}x{H}x{W}")
            for B, C, H, W, p in [(2, 3, 8, 12, 4), (3, 1, 8, 16, 4), (2, 3, 16, 8, 2),
                                  (1, 3, 6, 9, 3), (2, 2, 16, 16, 4), (2, 2, 4, 4, 1),
                                  (1, 3, 4, 4, 4)]]


def _patch_mistakes(images: Tensor, p: int) -> dict[str, Tensor]:
    """The patches that the usual mistakes give (exact rearrangements of ``images``)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)

    def arrange(*order):                      # order of (h, w, C, p_row, p_col) = (2, 4, 1, 3, 5)
        return x.permute(0, *order).reshape(B, h * w, C * p * p)

    mistakes = {
        "inside each patch the values are in (p, p, C) order (channels last); the exercise "
        "wants (C, p, p), the order in which a convolution's weight (width, C, p, p) "
        "flattens: permute to (B, H/p, W/p, C, p, p) before the last reshape":
            arrange(2, 4, 3, 5, 1),
        "the patches are in column order (down each column of the grid first); they go in "
        "reading order, row by row and left to right: permute to (B, H/p, W/p, C, p, p), "
        "the grid's row index before its column index": arrange(4, 2, 1, 3, 5),
        "inside each patch the pixel's row and column are swapped (each patch is "
        "transposed): keep (C, p, p) as (channel, row, column), permute(0, 2, 4, 1, 3, 5)":
            arrange(2, 4, 1, 5, 3),
        "the image was transposed (H and W swapped): the patches are in column order and each "
        "patch is transposed — permute(0, 2, 4, 1, 3, 5) keeps rows before columns":
            arrange(4, 2, 1, 5, 3),
        "the image was reshaped to (B, N, C·p·p) without a permute, so each 'patch' is a run "
        "of consecutive values in memory that mixes pixels of different patches (and "
        "channels): split H and W first, reshape(B, C, H/p, p, W/p, p), then permute(0, 2, 4, "
        "1, 3, 5) to bring each patch's C·p·p values together": images.reshape(B, h * w, -1),
        "the unfolded patches (B, C, H/p, W/p, p, p) were reshaped without a permute, so each "
        "'patch' mixes pixels of several patches and channels: permute(0, 2, 3, 1, 4, 5) "
        "first, to (B, H/p, W/p, C, p, p)":
            images.unfold(2, p, p).unfold(3, p, p).reshape(B, h * w, -1),
        "H was split as (p, H/p) instead of (H/p, p), so each 'patch' takes every (H/p)-th "
        "pixel across the whole image: reshape(B, C, H/p, p, W/p, p), the patch index first":
            images.reshape(B, C, p, h, p, w).permute(0, 3, 5, 1, 2, 4).reshape(B, h * w, -1),
    }
    if h * w == C * p * p:                    # F.unfold's layout then has the same shape
        mistakes["that is F.unfold's layout (B, C·p·p, N), one column per patch: "
                 "transpose(1, 2) to get one row per patch"] = F.unfold(images, p, stride=p)
    return mistakes


def _patch_shape_hint(out: Tensor, images: Tensor, p: int) -> str:
    B, C, H, W = images.shape
    h, w = H // p, W // p
    shape = tuple(out.shape)
    if shape == (B, C * p * p, h * w):
        return ("that is F.unfold's layout (B, C·p·p, N), one column per patch: transpose(1, 2) "
                "to get one row per patch")
    if shape in ((B, h, w, C * p * p), (B, h, w, C, p, p), (B, h * w, C, p, p),
                 (B, C, h, w, p, p)):
        return (f"flatten into one sequence of patches, each patch one vector: reshape(B, N, "
                f"C·p·p) = ({B}, {h * w}, {C * p * p})")
    if shape == (B * h * w, C * p * p):
        return "keep the batch dimension: (B, N, C·p·p), one sequence of patches per image"
    for q in (2, 4, 8, 16):
        if q != p and H % q == 0 and W % q == 0 and shape == (B, (H // q) * (W // q), C * q * q):
            return (f"these are patches of size {q}: use the argument patch_size (here {p}), "
                    "not a fixed number")
    return (f"(B, N, C·p·p) with N = (H/p)·(W/p) = {h}·{w} = {h * w} patches and C·p·p = "
            f"{C}·{p}·{p} = {C * p * p} values per patch")


def _patch_term_hint(out: Tensor, expected: Tensor, images: Tensor, p: int) -> str:
    """Which patch differs most, and which pixels it should hold."""
    W = images.shape[-1]
    diff = (out.detach().double().cpu() - expected.double()).abs().nan_to_num(nan=math.inf)
    b, n = divmod(int(diff.amax(-1).argmax()), diff.shape[1])
    r, c = divmod(n, W // p)
    return (f"patch {n} of image {b} differs most: it is grid row {r}, column {c}, "
            f"so it should hold images[{b}, :, {r * p}:{(r + 1) * p}, {c * p}:{(c + 1) * p}] "
            f"flattened in (C, p, p) order — {_PATCH_ORDER}")


def _patch_crash(err: Exception) -> str | None:
    text = str(err)
    if "view size is not compatible" in text:
        return ("a permuted tensor is not contiguous, so .view cannot regroup it: use .reshape "
                "(or .contiguous().view)")
    if "shape" in text and "is invalid for input of size" in text:
        return ("the sizes in a reshape do not multiply up: B·C·H·W values make N = (H/p)·(W/p) "
                "patches of C·p·p values each")
    return None


@exercise_check("Exercise 1 · Cutting an image into patches")
def check_patchify(fn) -> str:
    """Check ``patchify(images, patch_size) -> Tensor`` ``(B, N, C·p·p)``."""
    for images, p, description in _patch_cases():
        B, C, H, W = images.shape
        what = f"patchify(images, {p}) on {description}"
        expected = du.patchify(images, p)                       # the reference, before yours
        mistakes = _patch_mistakes(images, p)
        out = call_explained(fn, images.clone(), p, names=("images", "patch_size"), what=what,
                   explain=_patch_crash)
        shape = (B, (H // p) * (W // p), C * p * p)
        out = expect_tensor(out, shape=shape, dtype=images.dtype, what=what,
                            shape_hint=_patch_shape_hint(out, images, p)
                            if isinstance(out, Tensor) else None)
        compare(out, expected, mistakes, what=what, item_names=[f"image {i}" for i in range(B)],
                term_hint=_patch_term_hint(out, expected, images, p))
    images, p, _ = _patch_cases()[0]
    probe_device(fn, images, p, what="patchify")
    return ("(B, C, H, W) -> (B, N, C·p·p): patches in reading order, each in (C, p, p) order, "
            "for square and non-square images, p = 1 up to one patch per image")


# ── Exercise 2 · The causal mask ─────────────────────────────────────────────────────

_MASK_RULE = ("True where token i may attend to token j, that is where j <= i (itself and the "
              "tokens before it): torch.ones(L, L, dtype=torch.bool).tril()")


def _mask_mistakes(L: int) -> dict[str, Tensor]:
    ones = torch.ones(L, L, dtype=torch.bool)
    return {
        "the diagonal is False (tril(-1), j < i): a token must see itself — the first token "
        "then sees nothing at all: its row of scores is all −inf, a softmax over it gives NaN "
        "(0/0), and PyTorch's fused attention returns zeros for it. " + _MASK_RULE:
            ones.tril(-1),
        "True where j >= i (torch.triu): each token sees itself and the words after it — the "
        "future it is not allowed to see. " + _MASK_RULE: ones.triu(),
        "True where j > i: that is the opposite convention, nn.MultiheadAttention's attn_mask, "
        "where True means 'blocked'; here, as in F.scaled_dot_product_attention, True means "
        "'may attend'. " + _MASK_RULE: ones.triu(1),
        "every entry is True: nothing is masked, so every token sees the whole caption. "
        + _MASK_RULE: ones,
        "only the diagonal is True: each token sees itself alone, not the tokens before it. "
        + _MASK_RULE: torch.eye(L, dtype=torch.bool),
    }


def _expect_mask(out, L: int, what: str) -> Tensor:
    """A bool tensor (L, L) on the CPU; other dtypes and the additive float mask named."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if not isinstance(out, Tensor):
        fail(f"{what} should be a torch.Tensor of shape ({L}, {L}) and dtype torch.bool, got "
             f"{type(out).__name__}")
    if tuple(out.shape) != (L, L):
        hint = (f"return the ({L}, {L}) mask itself; it broadcasts over the batch and the heads "
                "where it is used" if out.ndim > 2 and out.shape[-2:] == (L, L) else
                f"one row and one column per token: (length, length) = ({L}, {L})")
        fail(f"{what} should have shape ({L}, {L}), got {tuple(out.shape)} — {hint}")
    if out.dtype != torch.bool:
        values = set(out.detach().cpu().double().unique().tolist())
        if out.dtype.is_floating_point and values <= {0.0, -math.inf}:
            hint = ("this is the additive float mask (0 where a token may attend, −inf where it "
                    "may not), which some code adds to the scores; the exercise asks for a bool "
                    "mask, True where token i may attend to token j (F.scaled_dot_product_"
                    "attention's convention, the one du.MultiHeadAttention uses): "
                    "torch.ones(L, L, dtype=torch.bool).tril()")
        elif out.dtype.is_floating_point and values <= {0.0, 1.0}:
            hint = ("make it bool (dtype=torch.bool, or .bool()): a float mask is added to the "
                    "attention scores, so 0s and 1s would block nothing")
        else:
            hint = "make it bool: dtype=torch.bool, or .bool(), or build it from a comparison"
        fail(f"{what} should have dtype torch.bool, got {out.dtype} — {hint}")
    return out


def _mask_rows(out: Tensor, expected: Tensor) -> str:
    """The first row (token) that differs, both ways written out."""
    bad = (out.cpu() != expected).any(-1).nonzero()
    i = int(bad[0])

    def row(r):
        return "[" + ", ".join("T" if v else "F" for v in r.tolist()) + "]"

    shown = f"{row(expected[i])}, yours is {row(out.cpu()[i])}" if len(out) <= 12 else \
        f"True at columns 0 to {i} and False after"
    return f"row {i} (what token {i} sees) is the first that differs: it should be {shown}"


def _probe_mask(fn, L: int) -> None:
    """``fn(L, device=...)`` on another device must return the mask there."""
    device = other_device()
    try:
        with _MetaAsGPU() if device.type == "meta" else contextlib.nullcontext():
            out = fn(L, device=device)
    except Exception as err:  # noqa: BLE001 (anything else leaves the probe inconclusive)
        if _is_device_error(err):
            fail(f"causal_mask({L}, device=...): " + DEVICE_HINT.format(
                device=_device_words(device)) + " — here the device is the argument `device`: "
                 f"pass device=device (PyTorch said: {str(err).splitlines()[0]})")
        return
    if isinstance(out, Tensor) and out.device.type != device.type:
        fail(f"causal_mask({L}, device=...) asked for {_device_words(device)} and got a mask on "
             f"{out.device.type}: make it on the device asked for, torch.ones(L, L, "
             "dtype=torch.bool, device=device) — a mask made on the CPU would meet the GPU's "
             "scores in the attention and stop it")


def _mask_crash(err: Exception) -> str | None:
    if isinstance(err, TypeError) and "device" in str(err):
        return ("keep the signature causal_mask(length, *, device=None) and make the mask on "
                "`device` (None means the CPU)")
    return None


@exercise_check("Exercise 2 · The causal mask: each word sees only the words before it")
def check_causal_mask(fn) -> str:
    """Check ``causal_mask(length, *, device=None) -> Tensor`` ``(L, L)`` bool."""
    for L, kwargs in [(5, {}), (1, {}), (2, {"device": "cpu"}), (du.CLIP_CONTEXT_LENGTH, {}),
                      (7, {"device": None})]:
        what = f"causal_mask({L}{', device=' + repr(kwargs['device']) if kwargs else ''})"
        expected = du.causal_mask(L)                           # the reference, before yours
        out = call_explained(fn, L, names=("length",), what=what, explain=_mask_crash, **kwargs)
        out = _expect_mask(out, L, what)
        if out.device.type != "cpu":
            fail(f"{what} is on {out.device}: with device=None (the default) make it on the "
                 "CPU, as torch.ones does")
        if torch.equal(out, expected):
            continue
        for hint, wrong in _mask_mistakes(L).items():
            if torch.equal(out, wrong):
                fail(f"{what} is not right: {hint}")
        fail(f"{what} is not right: {_mask_rows(out, expected)} — {_MASK_RULE}")
    _probe_mask(fn, 5)
    return ("(L, L) bool, True where j <= i: each token sees itself and the ones before it, "
            "L = 1 to 24, made on the device asked for")


# ── Exercise 3 · The symmetric contrastive loss ──────────────────────────────────────


def _loss_cases():
    """(image_features, text_features, logit_scale, description); rows of varied norms."""
    g = torch.Generator().manual_seed(63)

    def features(B, D):
        return torch.randn(B, D, generator=g) * (torch.rand(B, 1, generator=g) * 3 + 0.3)

    close_pairs = features(8, 6)
    extreme = (features(5, 16), features(5, 16))
    extreme[1][0] = -2 * extreme[0][0]        # pair 0 points opposite ways...
    extreme[1][1] = 0.5 * extreme[0][0]       # ...and caption 1 matches image 0
    return [
        (*(features(4, 8) for _ in range(2)), math.log(1 / 0.07),
         "B = 4, D = 8, logit_scale = log(1/0.07)"),
        (*(features(6, 3) for _ in range(2)), 0.0, "B = 6, D = 3, logit_scale = 0"),
        (*extreme, math.log(100), "B = 5, D = 16, logit_scale = log(100), a pair far apart"),
        (close_pairs, close_pairs + 0.3 * torch.randn(8, 6, generator=g), 3.0,
         "B = 8, D = 6, matching pairs close together"),
        (*(features(1, 5) for _ in range(2)), 1.0, "one pair (B = 1): the loss is 0"),
    ]


def _loss_mistakes(image_features: Tensor, text_features: Tensor, logit_scale: float
                   ) -> dict[str, Tensor]:
    """The losses that the usual mistakes give (float64, then float32)."""
    i, t, s = image_features.double(), text_features.double(), float(logit_scale)
    labels = torch.arange(len(i))

    def logits(a=_unit(i), b=_unit(t), factor=math.exp(s)):
        return factor * a @ b.T

    def ce(x, target=labels, reduction="mean"):
        return F.cross_entropy(x, target, reduction=reduction)

    def both(x, **kwargs):
        return (ce(x, **kwargs) + ce(x.T, **kwargs)) / 2

    right = logits()
    scale = ("multiply the cosine similarities by exp(logit_scale): logit_scale is log(1/τ), "
             "so the scale is 1/τ = exp(logit_scale)")
    mistakes = {
        "the features are not normalised: the logits are exp(logit_scale) times the cosine "
        "similarities, so normalise each row first, F.normalize(x, dim=-1)": both(logits(i, t)),
        "each feature was normalised over the batch (dim=0): normalise each row, one feature "
        "vector at a time, F.normalize(x, dim=-1)": both(logits(_unit(i, 0), _unit(t, 0))),
        "the whole matrix was normalised at once (x / x.norm()): normalise each row, "
        "F.normalize(x, dim=-1)": both(logits(i / i.norm(), t / t.norm())),
        "logit_scale was used as the scale itself; " + scale: both(logits(factor=s)),
        "the cosine similarities were divided by exp(logit_scale); " + scale:
            both(logits(factor=math.exp(-s))),
        "the temperature is missing (or was applied before normalising, which undoes it); "
        + scale: both(logits(factor=1.0)),
        "only one direction counts (or the same one twice): the loss is the mean of the "
        "image → text cross-entropy, CE(logits, labels), and the text → image one, "
        "CE(logits.T, labels)": ce(right),
        "only the text → image direction counts: the loss is the mean of CE(logits, labels) "
        "and CE(logits.T, labels)": ce(right.T),
        "the two directions are added; the loss is their mean: (CE(logits, labels) + "
        "CE(logits.T, labels)) / 2": ce(right) + ce(right.T),
        "the same direction was counted twice and added: the second term is the text → image "
        "one, CE(logits.T, labels), and the sum is halved": 2 * ce(right),
        "the labels are wrong: image i belongs with caption i, so the labels are "
        "torch.arange(B), the index of the diagonal in each row": both(right, target=0 * labels),
        "the cross-entropies were summed over the batch (reduction='sum'): CLIP takes their "
        "mean, F.cross_entropy's default": both(right, reduction="sum"),
    }
    if s != 0:
        mistakes["the cosine similarities were divided by logit_scale; " + scale] = \
            both(logits(factor=1 / s))
    return {hint: value.float() for hint, value in mistakes.items()}


def _naive_log_softmax_loss(image_features: Tensor, text_features: Tensor,
                            logit_scale: float) -> Tensor:
    """log(softmax(...)) in two steps, in float32: underflows when the scale is large."""
    logits = math.exp(logit_scale) * F.normalize(image_features, dim=-1) \
        @ F.normalize(text_features, dim=-1).T
    diagonal = torch.arange(len(logits))
    return -(logits.softmax(1).log()[diagonal, diagonal].mean()
             + logits.softmax(0).log()[diagonal, diagonal].mean()) / 2


def _expect_loss(out, image_features: Tensor, text_features: Tensor, logit_scale: float,
                 what: str) -> Tensor:
    B = len(image_features)
    if isinstance(out, (float, int)) and not isinstance(out, bool):
        fail(f"{what} is a Python {type(out).__name__}: return the loss as a tensor (no "
             ".item()), so that it keeps its gradient and CLIP can be trained with it")
    if isinstance(out, Tensor) and out.shape == () and not bool(torch.isfinite(out).all()):
        if same_values(out, _naive_log_softmax_loss(image_features, text_features, logit_scale)):
            fail(f"{what} is {float(out)}: log(softmax(...)) in two steps underflows — with "
                 f"exp(logit_scale) = {math.exp(logit_scale):.3g} some probabilities are 0 in "
                 "float32 and log(0) = −inf; use F.cross_entropy (or F.log_softmax), which "
                 "computes the log of the softmax in one stable step")
    shape_hint = None
    if isinstance(out, Tensor):
        shape_hint = ("the loss is one number: F.cross_entropy's default reduction='mean' "
                      "averages over the batch (not reduction='none')" if out.shape == (B,) else
                      "return the mean of the two directions, one number" if out.shape == (2,)
                      else "the loss is one number, a tensor of shape ()")
    return expect_tensor(out, shape=(), dtype=image_features.dtype, what=what,
                         shape_hint=shape_hint)


def _loss_crash(err: Exception) -> str | None:
    text = str(err)
    if "out of bounds" in text or "to match target batch_size" in text:
        return ("the labels are torch.arange(B), one per row (B = len(image_features), not the "
                "feature size D): row i's match is column i")
    return None


def _check_loss_gradients(fn, image_features: Tensor, text_features: Tensor,
                          logit_scale: float, what: str) -> None:
    """The loss must carry gradients to both features and to logit_scale, the reference's."""
    names = ("image_features", "text_features", "logit_scale")

    def leaves():
        return [x.clone().requires_grad_() for x in (image_features, text_features,
                                                      torch.tensor(logit_scale))]

    ref = leaves()
    du.contrastive_loss(*ref).backward()                        # the reference, before yours
    mine = leaves()
    out = call_explained(fn, *mine, names=names, what=what, explain=_loss_crash, grad=True)
    if not isinstance(out, Tensor) or not out.requires_grad:
        fail(f"{what} has no gradient (requires_grad is False): something cut it from the "
             "graph — .detach(), .item(), .numpy(), torch.no_grad() or torch.tensor(value) — "
             "and CLIP could not learn from it")
    out.backward()
    for name, leaf, reference in zip(names, mine, ref):
        if leaf.grad is None:
            fail(f"{what}: {name} gets no gradient — " + (
                "use logit_scale.exp(), a tensor operation: math.exp(logit_scale), "
                "float(logit_scale) or .item() turn it into a Python number cut from the graph, "
                "and CLIP could not learn its temperature" if name == "logit_scale" else
                "something detaches it (.detach(), .data, .numpy()) before the loss"))
        expect_finite(leaf.grad, what=f"the gradient of the loss with respect to {name}")
        if not close(leaf.grad, reference.grad, atol=1e-5, rtol=1e-3):
            fail(f"{what}: the gradient with respect to {name} differs from the reference's "
                 "although the loss matches — is part of the computation detached or made "
                 "outside autograd?")


@exercise_check("Exercise 3 · The symmetric contrastive loss")
def check_contrastive_loss(fn) -> str:
    """Check ``contrastive_loss(image_features, text_features, logit_scale) -> Tensor`` ``()``."""
    names = ("image_features", "text_features", "logit_scale")
    for img, txt, s, description in _loss_cases():
        what = f"the loss ({description})"
        scale = torch.tensor(s)
        expected = du.contrastive_loss(img, txt, scale)          # the reference, before yours
        mistakes = _loss_mistakes(img, txt, s)
        out = call_explained(fn, img.clone(), txt.clone(), scale.clone(), names=names, what=what,
                   explain=_loss_crash)
        out = _expect_loss(out, img, txt, s, what)
        compare(out, expected, mistakes, what=what, atol=1e-5, rtol=1e-4,
                term_hint="logits = exp(logit_scale) · normalise(image) normalise(text)ᵀ, "
                          "then (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2")
    img, txt, s, description = _loss_cases()[0]
    _check_loss_gradients(fn, img, txt, s, f"the loss ({description})")
    probe_device(fn, img, txt, torch.tensor(s), what="contrastive_loss")
    return ("normalised features, logits scaled by exp(logit_scale), the mean of both "
            "directions' cross-entropies, with gradients to the features and to logit_scale")


# ── Exercise 4 · The zero-shot classifier ────────────────────────────────────────────


def _zero_shot_cases():
    """(image_features (N, D), class_text_features (K, P, D), description); varied norms."""
    g = torch.Generator().manual_seed(64)
    cases = []
    for N, K, P, D in [(5, 3, 4, 8), (6, 6, 3, 16), (4, 5, 5, 6), (1, 2, 1, 3), (7, 1, 2, 4)]:
        centres = torch.randn(K, 1, D, generator=g)
        prompts = (centres + 0.7 * torch.randn(K, P, D, generator=g)) \
            * (torch.rand(K, P, 1, generator=g) * 3 + 0.3)
        images = torch.randn(N, D, generator=g) * (torch.rand(N, 1, generator=g) * 3 + 0.3)
        cases.append((images, prompts, f"N = {N} images, K = {K} classes of P = {P} prompts, "
                                       f"D = {D}"))
    return cases


def _zero_shot_mistakes(image_features: Tensor, class_text_features: Tensor
                        ) -> dict[str, Tensor]:
    """The scores that the usual mistakes give (float64, then float32)."""
    i, c = image_features.double(), class_text_features.double()
    N, K, P = len(i), len(c), c.shape[1]
    weights = _unit(_unit(c).mean(1))                                        # (K, D)
    right = _unit(i) @ weights.T
    mistakes = {
        "the prompts were averaged before being normalised: normalise each prompt embedding "
        "first, so that every prompt has the same say in the mean":
            _unit(i) @ _unit(c.mean(1)).T,
        "the mean of the normalised prompts (or of the P scores) was not normalised again: the "
        "mean of unit vectors is shorter than 1, so normalise it, and the scores are cosines":
            _unit(i) @ _unit(c).mean(1).T,
        "the normalised prompts were summed and not normalised again: take their mean and "
        "normalise it": _unit(i) @ _unit(c).sum(1).T,
        "the image features are not normalised: the scores are cosine similarities, so "
        "normalise each image's features too": i @ weights.T,
        "the images were normalised over the batch (dim=0): normalise each row, "
        "F.normalize(image_features, dim=-1)": _unit(i, 0) @ weights.T,
        "nothing was normalised: normalise each prompt, their mean, and each image, so that "
        "the scores are cosine similarities": i @ c.mean(1).T,
        "only the first prompt of each class was used: average all P prompts of a class "
        "(prompt ensembling)": _unit(i) @ _unit(c[:, 0]).T,
        "the best prompt's score was taken (a max over the prompts): average the P normalised "
        "prompts into one class embedding": torch.einsum("nd,kpd->nkp", _unit(i),
                                                         _unit(c)).amax(-1),
        "a softmax was applied: return the cosine similarities themselves, in [-1, 1] (the "
        "argmax, the predicted class, is the same)": right.softmax(-1),
        "a softmax of 100 × the cosines was applied (CLIP's probabilities): return the cosine "
        "similarities themselves, in [-1, 1]": (100 * right).softmax(-1),
    }
    if N == K:
        mistakes["the scores are (K, N), one row per class: return (N, K), one row per "
                 "image"] = right.T
    if P == K:
        mistakes["the mean was taken over the classes (dim 0); average each class's prompts, "
                 "over dim 1: (K, P, D) -> (K, D)"] = _unit(i) @ _unit(_unit(c).mean(0)).T
    return {hint: value.float() for hint, value in mistakes.items()}


def _zero_shot_shape_hint(out: Tensor, N: int, K: int, P: int) -> str:
    shape = tuple(out.shape)
    if shape == (K, N):
        return "transposed — one row per image, one column per class: (N, K)"
    if shape == (N, P):
        return ("the mean was taken over the classes (dim 0); average each class's prompts, "
                "over dim 1: (K, P, D) -> (K, D)")
    if shape in ((N, K, P), (N, P, K), (K, P, N)):
        return ("one score per image and class: average each class's P normalised prompts "
                "(dim 1) into one class embedding first")
    return f"one score per image and class, (N, K) = ({N}, {K})"


def _zero_shot_crash(err: Exception) -> str | None:
    text = str(err)
    if "cannot be multiplied" in text:
        return ("the class embeddings are (K, D): multiply the images (N, D) by their "
                "transpose, (N, D) @ (D, K) -> (N, K)")
    return None


@exercise_check("Exercise 4 · The zero-shot classifier")
def check_zero_shot_scores(fn) -> str:
    """Check ``zero_shot_scores(image_features, class_text_features) -> Tensor`` ``(N, K)``."""
    names = ("image_features", "class_text_features")
    for images, prompts, description in _zero_shot_cases():
        (N, _), (K, P, _) = images.shape, prompts.shape
        what = f"the score matrix ({description})"
        expected = du.zero_shot_scores(images, prompts)          # the reference, before yours
        mistakes = _zero_shot_mistakes(images, prompts)
        out = call_explained(fn, images.clone(), prompts.clone(), names=names, what=what,
                   explain=_zero_shot_crash)
        out = expect_tensor(out, shape=(N, K), dtype=images.dtype, what=what,
                            shape_hint=_zero_shot_shape_hint(out, N, K, P)
                            if isinstance(out, Tensor) else None)
        compare(out, expected, mistakes, what=what, atol=1e-5, rtol=1e-4,
                item_names=[f"image {n}" for n in range(N)],
                term_hint="score[n, k] = normalise(image n) · w_k, with w_k = normalise(mean "
                          "over p of normalise(prompt k, p))")
    images, prompts, _ = _zero_shot_cases()[0]
    probe_device(fn, images, prompts, what="zero_shot_scores")
    return ("cosine similarity of each normalised image with each class's normalised mean of "
            "normalised prompts, (N, K), one prompt or many, one class or many")
