"""Tests of lesson 06's exercise checks: the reference passes, a stub is "not attempted", right
versions written in other forms pass, and each planted mistake (the ones learners make, an
input changed in place, a tensor made on the CPU, a NaN) fails with a hint that names it."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du

from check_helpers import DEVICE, GENERIC, IN_PLACE, NAN, table_tests  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = {
    "patchify": (dc.check_patchify, du.patchify),
    "causal_mask": (dc.check_causal_mask, du.causal_mask),
    "contrastive_loss": (dc.check_contrastive_loss, du.contrastive_loss),
    "zero_shot_scores": (dc.check_zero_shot_scores, du.zero_shot_scores),
}


# -- patchify --


def patchify_f_unfold(images, patch_size):
    """F.unfold gives (B, C·p·p, N), the columns in (C, p, p) order."""
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def patchify_tensor_unfold(images, patch_size):
    p, (B, C) = patch_size, images.shape[:2]
    x = images.unfold(2, p, p).unfold(3, p, p)               # (B, C, H/p, W/p, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)


def patchify_loops(images, patch_size):
    p, (B, C, H, W) = patch_size, images.shape
    patches = [images[:, :, r:r + p, c:c + p].reshape(B, -1)
               for r in range(0, H, p) for c in range(0, W, p)]
    return torch.stack(patches, dim=1)


def patchify_conv(images, patch_size):
    """A convolution whose kernels pick one value each: (C, p, p) order by construction."""
    p, C = patch_size, images.shape[1]
    picks = torch.eye(C * p * p, dtype=images.dtype, device=images.device)
    return F.conv2d(images, picks.reshape(-1, C, p, p), stride=p).flatten(2).transpose(1, 2)


def make_patchify(order=(2, 4, 1, 3, 5), *, fixed_p=None, split="grid_first"):
    """A learner's patchify: reshape(B, C, H/p, p, W/p, p), permute to ``order``, reshape."""

    def patchify(images, patch_size):
        p = fixed_p or patch_size
        B, C, H, W = images.shape
        if split == "grid_first":
            x = images.reshape(B, C, H // p, p, W // p, p)
        else:
            x = images.reshape(B, C, p, H // p, p, W // p).permute(0, 1, 3, 2, 5, 4)
        return x.permute(0, *order).reshape(B, (H // p) * (W // p), C * p * p)

    return patchify


def patchify_no_permute(images, patch_size):
    B, C, H, W = images.shape
    return images.reshape(B, (H // patch_size) * (W // patch_size), -1)


def patchify_unfold_no_permute(images, patch_size):
    p, (B, C) = patch_size, images.shape[:2]
    return images.unfold(2, p, p).unfold(3, p, p).reshape(B, -1, C * p * p)


def patchify_view(images, patch_size):
    p, (B, C, H, W) = patch_size, images.shape
    x = images.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.view(B, -1, C * p * p)


def patchify_grid(images, patch_size):
    p, (B, C, H, W) = patch_size, images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, H // p, W // p, C * p * p)


def patchify_in_place(images, patch_size):
    images.clamp_(-1, 1)
    return du.patchify(images, patch_size)


def patchify_cpu_loops(images, patch_size):
    p, (B, C, H, W) = patch_size, images.shape
    out = torch.zeros(B, (H // p) * (W // p), C * p * p)
    for n, (r, c) in enumerate((r, c) for r in range(0, H, p) for c in range(0, W, p)):
        out[:, n] = images[:, :, r:r + p, c:c + p].reshape(B, -1)
    return out


def patchify_swaps_two(images, patch_size):
    out = du.patchify(images, patch_size).clone()
    out[:, [0, -1]] = out[:, [-1, 0]]
    return out


PATCHIFY_RIGHT = [("F_unfold", patchify_f_unfold), ("tensor_unfold", patchify_tensor_unfold),
                  ("loops", patchify_loops), ("conv", patchify_conv),
                  ("notebook_like", make_patchify())]
PATCHIFY_MISTAKES = [
    ("unfold_no_transpose", lambda images, p: F.unfold(images, p, stride=p),
     "F.unfold's layout (B, C·p·p, N)"),
    ("channels_last", make_patchify((2, 4, 3, 5, 1)), "(p, p, C) order (channels last)"),
    ("column_major", make_patchify((4, 2, 1, 3, 5)), "the patches are in column order"),
    ("row_col_swapped", make_patchify((2, 4, 1, 5, 3)), "each patch is transposed"),
    ("image_transposed", make_patchify((4, 2, 1, 5, 3)), "the image was transposed"),
    ("no_permute", patchify_no_permute, "reshaped to (B, N, C·p·p) without a permute"),
    ("unfold_no_permute", patchify_unfold_no_permute,
     "the unfolded patches (B, C, H/p, W/p, p, p) were reshaped without a permute"),
    ("split_p_first", make_patchify(split="p_first"), "H was split as (p, H/p)"),
    ("fixed_patch_size", make_patchify(fixed_p=4), "use the argument patch_size"),
    ("view_after_permute", patchify_view, ".view cannot regroup it: use .reshape"),
    ("grid_not_flattened", patchify_grid, "flatten into one sequence of patches"),
    ("swapped_two_patches", patchify_swaps_two,
     f"{GENERIC} (largest difference"),
    ("swapped_two_patches_where", patchify_swaps_two,
     "patch 0 of image 1 differs most: it is grid row 0, column 0, so it should hold "
     "images[1, :, 0:4, 0:4]"),
    ("in_place", patchify_in_place, f"input `images` {IN_PLACE}"),
    ("cpu_loops", patchify_cpu_loops, DEVICE),
    ("nan", lambda images, p: du.patchify(images, p) / 0 * 0, NAN),
    ("float64", lambda images, p: du.patchify(images, p).double(),
     "should have dtype torch.float32"),
    ("no_return", lambda images, p: None, "forget the `return`"),
]


# -- causal_mask --


def mask_arange(length, *, device=None):
    i = torch.arange(length, device=device)
    return i[None, :] <= i[:, None]


def mask_float_tril(length, *, device=None):
    return torch.tril(torch.ones(length, length, device=device)).bool()


def mask_loop(length, *, device=None):
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    for i in range(length):
        mask[i, :i + 1] = True
    return mask


def mask_not_triu(length, *, device=None):
    return ~torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def make_mask(build, *, use_device=True):
    """A learner's causal_mask: ``build(ones)`` on an (L, L) bool tensor of ones."""

    def causal_mask(length, *, device=None):
        ones = torch.ones(length, length, dtype=torch.bool,
                          device=device if use_device else None)
        return build(ones)

    return causal_mask


def mask_additive(length, *, device=None):
    keep = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.zeros(length, length, device=device).masked_fill(~keep, float("-inf"))


def mask_half_on_device(length, *, device=None):
    return torch.arange(length, device=device)[None, :] <= torch.arange(length)[:, None]


def mask_no_device_argument(length):
    return torch.ones(length, length, dtype=torch.bool).tril()


def mask_one_wrong_entry(length, *, device=None):
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if length > 3:
        mask[3, 1] = False
    return mask


MASK_RIGHT = [("arange", mask_arange), ("float_tril", mask_float_tril), ("loop", mask_loop),
              ("not_triu", mask_not_triu)]
MASK_MISTAKES = [
    ("triu", make_mask(torch.triu), "the future it is not allowed to see"),
    ("strict_tril", make_mask(lambda ones: ones.tril(-1)), "the diagonal is False (tril(-1)"),
    ("strict_tril_nan", make_mask(lambda ones: ones.tril(-1)), "a softmax over it gives NaN"),
    ("inverted", make_mask(lambda ones: ones.triu(1)), "nn.MultiheadAttention's attn_mask"),
    ("everything", make_mask(lambda ones: ones), "nothing is masked"),
    ("diagonal", make_mask(lambda ones: ones & torch.eye(len(ones), dtype=torch.bool,
                                                         device=ones.device)),
     "only the diagonal is True"),
    ("additive_float", mask_additive, "this is the additive float mask"),
    ("float_ones", make_mask(lambda ones: ones.tril().float()), "a float mask is added"),
    ("long", make_mask(lambda ones: ones.tril().long()), "should have dtype torch.bool"),
    ("batched", make_mask(lambda ones: ones.tril()[None, None]), "return the (5, 5) mask itself"),
    ("fixed_length", lambda length, *, device=None: du.causal_mask(24, device=device),
     "one row and one column per token"),
    ("one_wrong_entry", mask_one_wrong_entry, "row 3 (what token 3 sees) is the first that "
     "differs: it should be [T, T, T, T, F], yours is [T, F, T, T, F]"),
    ("no_device_argument", mask_no_device_argument, "keep the signature causal_mask(length, *"),
    ("made_on_cpu", make_mask(torch.tril, use_device=False),
     "and got a mask on cpu: make it on the device asked for"),
    ("half_on_device", mask_half_on_device, DEVICE),
    ("no_return", lambda length, *, device=None: None, "forget the `return`"),
]


# -- contrastive_loss --


def loss_log_softmax(image_features, text_features, logit_scale):
    img = image_features / image_features.norm(dim=-1, keepdim=True)
    txt = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = logit_scale.exp() * img @ txt.T
    diagonal = torch.arange(len(logits), device=logits.device)
    image_to_text = -logits.log_softmax(dim=1)[diagonal, diagonal].mean()
    text_to_image = -logits.log_softmax(dim=0)[diagonal, diagonal].mean()
    return (image_to_text + text_to_image) / 2


def loss_float64(image_features, text_features, logit_scale):
    """float64 intermediates; the text -> image logits from text @ imageᵀ."""
    img = F.normalize(image_features.double(), dim=1)
    txt = F.normalize(text_features.double(), dim=1)
    scale = torch.exp(logit_scale.double())
    labels = torch.arange(img.shape[0], device=img.device)
    loss = (F.cross_entropy(scale * img @ txt.T, labels)
            + F.cross_entropy(scale * txt @ img.T, labels)) / 2
    return loss.to(image_features.dtype)


def loss_cosine_similarity(image_features, text_features, logit_scale):
    """F.cosine_similarity for every pair; one-hot targets as class probabilities."""
    cos = F.cosine_similarity(image_features[:, None, :], text_features[None, :, :], dim=-1)
    logits = logit_scale.exp() * cos
    targets = torch.eye(len(cos), device=cos.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def loss_logsumexp(image_features, text_features, logit_scale):
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) \
        @ F.normalize(text_features, dim=-1).T
    matching = logits.diagonal()
    return ((logits.logsumexp(1) - matching).mean() + (logits.logsumexp(0) - matching).mean()) / 2


def make_loss(*, normalise=-1, scale="exp", second="T", halve=True, labels="arange",
              reduction="mean", labels_on_cpu=False):
    """A learner's contrastive_loss with one knob turned."""

    def contrastive_loss(image_features, text_features, logit_scale):
        if normalise is None:
            img, txt = image_features, text_features
        elif normalise == "all":
            img, txt = image_features / image_features.norm(), text_features / text_features.norm()
        else:
            img, txt = F.normalize(image_features, dim=normalise), F.normalize(text_features,
                                                                               dim=normalise)
        if scale == "exp":
            factor = logit_scale.exp()
        elif scale == "raw":
            factor = logit_scale
        elif scale == "divide":
            factor = 1 / logit_scale.exp()
        elif scale == "by_log":
            factor = 1 / logit_scale
        elif scale == "math":
            factor = math.exp(logit_scale)
        else:
            factor = 1.0
        logits = factor * img @ txt.T
        B = len(logits)
        device = None if labels_on_cpu else logits.device
        target = {"arange": lambda: torch.arange(B, device=device),
                  "zeros": lambda: torch.zeros(B, dtype=torch.long, device=device),
                  "feature_size": lambda: torch.arange(img.shape[1], device=device)}[labels]()
        first = F.cross_entropy(logits, target, reduction=reduction)
        if second == "none":
            return first
        other = F.cross_entropy(logits.T if second == "T" else logits, target,
                                reduction=reduction)
        return (first + other) / 2 if halve else first + other

    return contrastive_loss


def loss_text_to_image_only(image_features, text_features, logit_scale):
    logits = logit_scale.exp() * F.normalize(text_features, dim=-1) \
        @ F.normalize(image_features, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def loss_naive_log_softmax(image_features, text_features, logit_scale):
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) \
        @ F.normalize(text_features, dim=-1).T
    diagonal = torch.arange(len(logits), device=logits.device)
    return -(logits.softmax(1).log()[diagonal, diagonal].mean()
             + logits.softmax(0).log()[diagonal, diagonal].mean()) / 2


def loss_half_detached(image_features, text_features, logit_scale):
    """The image -> text direction sees the text features detached: same value, less gradient."""
    img, txt = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    labels = torch.arange(len(img), device=img.device)
    scale = logit_scale.exp()
    return (F.cross_entropy(scale * img @ txt.detach().T, labels)
            + F.cross_entropy(scale * txt @ img.T, labels)) / 2


def loss_detached_image(image_features, text_features, logit_scale):
    return du.contrastive_loss(image_features.detach(), text_features, logit_scale)


def loss_in_place(image_features, text_features, logit_scale):
    image_features /= image_features.norm(dim=-1, keepdim=True)
    return du.contrastive_loss(image_features, text_features, logit_scale)


def loss_scale_in_place(image_features, text_features, logit_scale):
    scale = logit_scale.exp_()
    return du.contrastive_loss(image_features, text_features, scale.log())


def loss_both_directions(image_features, text_features, logit_scale):
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) \
        @ F.normalize(text_features, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return torch.stack([F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)])


LOSS_RIGHT = [("log_softmax", loss_log_softmax), ("float64", loss_float64),
              ("cosine_similarity", loss_cosine_similarity), ("logsumexp", loss_logsumexp),
              ("notebook_like", make_loss())]
LOSS_MISTAKES = [
    ("not_normalised", make_loss(normalise=None), "the features are not normalised"),
    ("normalised_over_batch", make_loss(normalise=0), "normalised over the batch (dim=0)"),
    ("normalised_all_at_once", make_loss(normalise="all"),
     "the whole matrix was normalised at once"),
    ("scale_without_exp", make_loss(scale="raw"), "logit_scale was used as the scale itself"),
    ("divided_by_exp", make_loss(scale="divide"), "were divided by exp(logit_scale)"),
    ("divided_by_logit_scale", make_loss(scale="by_log"), "were divided by logit_scale;"),
    ("no_temperature", make_loss(scale="none"), "the temperature is missing"),
    ("one_direction", make_loss(second="none"), "only one direction counts"),
    ("same_direction_twice", make_loss(second="same"), "(or the same one twice)"),
    ("text_to_image_only", loss_text_to_image_only, "only the text → image direction counts"),
    ("sum_not_mean", make_loss(halve=False), "the two directions are added"),
    ("same_twice_added", make_loss(second="same", halve=False),
     "the same direction was counted twice and added"),
    ("labels_zeros", make_loss(labels="zeros"), "the labels are wrong"),
    ("labels_feature_size", make_loss(labels="feature_size"), "not the feature size D"),
    ("reduction_sum", make_loss(reduction="sum"), "reduction='sum'"),
    ("reduction_none", make_loss(reduction="none"), "not reduction='none'"),
    ("two_directions_stacked", loss_both_directions, "return the mean of the two directions"),
    ("naive_log_softmax", loss_naive_log_softmax, "log(softmax(...)) in two steps underflows"),
    ("math_exp", make_loss(scale="math"), "logit_scale gets no gradient"),
    ("detached_image", loss_detached_image, "image_features gets no gradient"),
    ("half_detached", loss_half_detached,
     "the gradient with respect to text_features differs from the reference's"),
    ("item", lambda *args: du.contrastive_loss(*args).item(), "is a Python float"),
    ("rewrapped", lambda *args: torch.tensor(du.contrastive_loss(*args).item()),
     "has no gradient (requires_grad is False)"),
    ("in_place", loss_in_place, f"input `image_features` {IN_PLACE}"),
    ("scale_in_place", loss_scale_in_place, f"input `logit_scale` {IN_PLACE}"),
    ("labels_on_cpu", make_loss(labels_on_cpu=True), DEVICE),
    ("nan", lambda *args: du.contrastive_loss(*args) / 0 * 0, NAN),
    ("float64", lambda *args: du.contrastive_loss(*args).double(),
     "should have dtype torch.float32"),
    ("off_by_a_little", lambda *args: du.contrastive_loss(*args) + 0.01, GENERIC),
    ("no_return", lambda *args: None, "forget the `return`"),
]


# -- zero_shot_scores --


def zero_shot_einsum(image_features, class_text_features):
    prompts = class_text_features / class_text_features.norm(dim=-1, keepdim=True)
    weights = prompts.mean(dim=1)
    weights = weights / weights.norm(dim=-1, keepdim=True)
    images = image_features / image_features.norm(dim=-1, keepdim=True)
    return torch.einsum("nd,kd->nk", images, weights)


def zero_shot_loops(image_features, class_text_features):
    N, (K, P, _) = len(image_features), class_text_features.shape
    out = image_features.new_zeros(N, K)
    for k in range(K):
        weight = sum(F.normalize(prompt, dim=0) for prompt in class_text_features[k]) / P
        weight = weight / weight.norm()
        for n in range(N):
            out[n, k] = torch.dot(F.normalize(image_features[n], dim=0), weight)
    return out


def zero_shot_cosine_similarity(image_features, class_text_features):
    weights = F.normalize(class_text_features, dim=-1).mean(1)                # (K, D)
    return F.cosine_similarity(image_features[:, None, :], weights[None, :, :], dim=-1)


def zero_shot_float64(image_features, class_text_features):
    weights = F.normalize(F.normalize(class_text_features.double(), dim=2).sum(1), dim=1)
    scores = F.normalize(image_features.double(), dim=1) @ weights.T
    return scores.to(image_features.dtype)


def make_zero_shot(*, prompts="unit", mean="mean", renormalise=True, images="unit",
                   transpose=False, softmax=None, cpu=False):
    """A learner's zero_shot_scores with one knob turned."""

    def zero_shot_scores(image_features, class_text_features):
        c = class_text_features
        c = F.normalize(c, dim=-1) if prompts == "unit" else c
        if mean == "mean":
            w = c.mean(1)
        elif mean == "sum":
            w = c.sum(1)
        elif mean == "classes":
            w = c.mean(0)
        elif mean == "first":
            w = c[:, 0]
        w = F.normalize(w, dim=-1) if renormalise else w
        x = {"unit": lambda: F.normalize(image_features, dim=-1),
             "batch": lambda: F.normalize(image_features, dim=0),
             "raw": lambda: image_features}[images]()
        scores = w @ x.T if transpose else x @ w.T
        if softmax is not None:
            scores = (softmax * scores).softmax(-1)
        return scores.cpu() if cpu else scores

    return zero_shot_scores


def zero_shot_mean_of_scores(image_features, class_text_features):
    cos = torch.einsum("nd,kpd->nkp", F.normalize(image_features, dim=-1),
                       F.normalize(class_text_features, dim=-1))
    return cos.mean(-1)


def zero_shot_best_prompt(image_features, class_text_features):
    cos = torch.einsum("nd,kpd->nkp", F.normalize(image_features, dim=-1),
                       F.normalize(class_text_features, dim=-1))
    return cos.amax(-1)


def zero_shot_every_prompt(image_features, class_text_features):
    return torch.einsum("nd,kpd->nkp", F.normalize(image_features, dim=-1),
                        F.normalize(class_text_features, dim=-1))


def zero_shot_untransposed(image_features, class_text_features):
    weights = F.normalize(F.normalize(class_text_features, dim=-1).mean(1), dim=-1)
    return F.normalize(image_features, dim=-1) @ weights


def zero_shot_in_place(image_features, class_text_features):
    class_text_features /= class_text_features.norm(dim=-1, keepdim=True)
    return du.zero_shot_scores(image_features, class_text_features)


def zero_shot_cpu_loops(image_features, class_text_features):
    out = torch.zeros(len(image_features), len(class_text_features))
    weights = F.normalize(F.normalize(class_text_features, dim=-1).mean(1), dim=-1)
    for n, image in enumerate(F.normalize(image_features, dim=-1)):
        out[n] = weights @ image
    return out


ZERO_SHOT_RIGHT = [("einsum", zero_shot_einsum), ("loops", zero_shot_loops),
                   ("cosine_similarity", zero_shot_cosine_similarity),
                   ("float64", zero_shot_float64), ("notebook_like", make_zero_shot())]
ZERO_SHOT_MISTAKES = [
    ("prompts_not_normalised", make_zero_shot(prompts="raw"),
     "the prompts were averaged before being normalised"),
    ("mean_not_normalised", make_zero_shot(renormalise=False), "was not normalised again"),
    ("mean_of_scores", zero_shot_mean_of_scores, "(or of the P scores) was not normalised again"),
    ("sum_not_normalised", make_zero_shot(mean="sum", renormalise=False),
     "summed and not normalised again"),
    ("images_not_normalised", make_zero_shot(images="raw"),
     "the image features are not normalised"),
    ("images_over_batch", make_zero_shot(images="batch"), "normalised over the batch (dim=0)"),
    ("nothing_normalised", make_zero_shot(prompts="raw", renormalise=False, images="raw"),
     "nothing was normalised"),
    ("first_prompt_only", make_zero_shot(mean="first"), "only the first prompt"),
    ("best_prompt", zero_shot_best_prompt, "the best prompt's score was taken"),
    ("softmax", make_zero_shot(softmax=1.0), "a softmax was applied"),
    ("softmax_100", make_zero_shot(softmax=100.0), "a softmax of 100 × the cosines"),
    ("transposed", make_zero_shot(transpose=True), "one row per image"),
    ("mean_over_classes", make_zero_shot(mean="classes"),
     "the mean was taken over the classes (dim 0)"),
    ("every_prompt", zero_shot_every_prompt, "average each class's P normalised prompts"),
    ("weights_not_transposed", zero_shot_untransposed, "multiply the images (N, D) by their "
     "transpose"),
    ("in_place", zero_shot_in_place, f"input `class_text_features` {IN_PLACE}"),
    ("cpu_result", make_zero_shot(cpu=True), "the result is on cpu"),
    ("cpu_loops", zero_shot_cpu_loops, DEVICE),
    ("nan", lambda images, prompts: du.zero_shot_scores(images, prompts) / 0 * 0, NAN),
    ("float64", lambda images, prompts: du.zero_shot_scores(images, prompts).double(),
     "should have dtype torch.float32"),
    ("off_by_a_little", lambda images, prompts: du.zero_shot_scores(images, prompts) + 0.01,
     "(largest difference 0.01 at item 0 (image 0))"),
    ("no_return", lambda images, prompts: None, "forget the `return`"),
]

RIGHT = {"patchify": PATCHIFY_RIGHT, "causal_mask": MASK_RIGHT, "contrastive_loss": LOSS_RIGHT,
         "zero_shot_scores": ZERO_SHOT_RIGHT}
MISTAKES = {"patchify": PATCHIFY_MISTAKES, "causal_mask": MASK_MISTAKES,
            "contrastive_loss": LOSS_MISTAKES, "zero_shot_scores": ZERO_SHOT_MISTAKES}


# -- the tests --


(test_reference_passes, test_stub_is_not_attempted, test_right_versions_in_other_forms_pass,
 test_planted_mistakes_fail_with_their_hint) = table_tests(CHECKS, RIGHT, MISTAKES)


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _ in CHECKS.values()] == [
        "Exercise 1 · Cutting an image into patches",
        "Exercise 2 · The causal mask: each word sees only the words before it",
        "Exercise 3 · The symmetric contrastive loss",
        "Exercise 4 · The zero-shot classifier"]


def test_every_check_has_device_and_return_mistakes_and_other_right_forms():
    for name in CHECKS:
        hints = [hint for _, _, hint in MISTAKES[name]]
        assert DEVICE in hints
        assert "forget the `return`" in hints
        assert len(RIGHT[name]) >= 3
        if name != "causal_mask":   # it takes no tensor, and a bool mask holds no NaN
            assert any(IN_PLACE in hint for hint in hints)
            assert NAN in hints


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


def test_the_underflow_case_really_underflows_with_log_of_softmax():
    """The case that names log(softmax(...)) is one where the reference stays finite."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    scale = torch.tensor(math.log(100))
    assert torch.isfinite(du.contrastive_loss(images, texts, scale))
    assert not torch.isfinite(loss_naive_log_softmax(images, texts, scale))


def test_the_loss_check_names_math_exp_only_through_the_gradient(capsys):
    """math.exp(logit_scale) gives the right value: only its missing gradient is wrong."""
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    scale = torch.tensor(1.5)
    assert torch.allclose(make_loss(scale="math")(img, txt, scale),
                          du.contrastive_loss(img, txt, scale))
